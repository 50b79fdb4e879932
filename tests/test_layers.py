"""The layering the design promises: the core and the operator load neither torch nor Ray."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_PROBE = """
import json, sys, time
t0 = time.perf_counter()
import elasticmoe
import elasticmoe.core.actions, elasticmoe.core.decide, elasticmoe.core.expert_map
import elasticmoe.core.experts, elasticmoe.core.placement, elasticmoe.core.policy
import elasticmoe.core.protocol, elasticmoe.core.stats
import operators.elasticmoe_operator.handlers, operators.elasticmoe_operator.spec
from operators.elasticmoe_operator.spec import check_policy
seconds = time.perf_counter() - t0
heavy = sorted(m for m in ("torch", "ray", "grpc", "numpy") if m in sys.modules)
print(json.dumps({"heavy": heavy, "seconds": seconds}))
"""


def test_core_and_operator_import_neither_torch_nor_ray() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], cwd=ROOT, capture_output=True, text=True, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    # numpy and grpc are not forbidden by the design, but nothing in the core needs them
    assert result["heavy"] == [], f"the core/operator pulled in {result['heavy']}"


def test_public_api_still_loads_on_use() -> None:
    code = (
        "import sys, elasticmoe\n"
        "assert 'torch' not in sys.modules and 'ray' not in sys.modules\n"
        "from elasticmoe import LLM, SamplingParams\n"
        "assert LLM.__name__ == 'LLM' and SamplingParams(max_tokens=1).max_tokens == 1\n"
        "assert 'LLM' in dir(elasticmoe)\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_protocol_recovery_and_placement_tests_run_without_torch_or_ray() -> None:
    # --noconftest: tests/conftest.py imports Ray and torch for the other tests
    code = (
        "import sys, pytest\n"
        "rc = pytest.main(['-q', '-p', 'no:cacheprovider', '--noconftest',\n"
        "                  'tests/test_protocol.py', 'tests/test_controller_fake.py',\n"
        "                  'tests/test_placement.py'])\n"
        "loaded = sorted(m for m in ('torch', 'ray') if m in sys.modules)\n"
        "assert rc == 0 and loaded == [], (rc, loaded)\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True)


def test_model_imports_nothing_above_it() -> None:
    # The model defines the expert interface (model/moe.py); the experts, the router and the
    # engine implement or drive it. An import from those in model/ would run upward.
    import ast

    above = ("elasticmoe.experts", "elasticmoe.router", "elasticmoe.engine", "elasticmoe.control")
    upward = []
    for path in sorted((ROOT / "elasticmoe" / "model").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else []
            )
            upward += [f"{path.name}: {n}" for n in names if n.startswith(above)]
    assert upward == []
