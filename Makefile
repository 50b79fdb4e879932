# The two commands of the README:
#   make run    set up from a fresh clone, then serve/generate with the default model
#   make test   set up from a fresh clone, then run the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch lies on this machine's disk; a bare `torch` would pull a CUDA build.
TORCH_SPEC ?= torch==2.13.0
PROMPT ?= def fibonacci(n):
PORT ?= 8000

.PHONY: setup run demo test lint protos clean redis dashboards golden default-model

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# Serves the default model at http://127.0.0.1:$(PORT)/v1 (local Ray instance, 2 expert workers);
# Ctrl-C stops it cleanly.
run: setup
	$(VENV)/bin/elasticmoe serve --model default --workers 2 --port $(PORT)

demo: setup
	$(VENV)/bin/elasticmoe generate --model default --prompt "$(PROMPT)" --max-tokens 48

# Retrains the shipped default model (elasticmoe/models/default) on 2 Ray Train CPU workers,
# about 30 minutes; the checkpoint is committed, so `make run` never needs this.
default-model: setup
	$(VENV)/bin/elasticmoe train --config examples/train/default.yaml

# Redis tests start a real redis-server; this installs Debian's package if missing.
redis:
	bash scripts/install-redis.sh

lint: setup
	$(VENV)/bin/ruff check elasticmoe operators tests bench tools

test: setup redis lint
	$(PY) -m pytest -q -ra

protos: setup
	$(PY) -m elasticmoe._proto.generate

dashboards: setup
	$(PY) tools/dashboards.py

# Regenerate the Kubernetes files derived from the code: the chart's CRD, the chart's
# copies of dashboards/policies/examples, and the golden renders in tests/golden/helm.
golden: setup
	$(PY) -m operators.elasticmoe_operator.crd
	$(PY) -m operators.elasticmoe_operator.chart

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
