"""Training on Ray Train, export, fine-tuning, worker-death recovery and routing traces."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from elasticmoe import LLM, SamplingParams
from elasticmoe.autoscale.simulate import RoutingTrace, load_trace
from elasticmoe.model.checkpoint import CheckpointReader
from elasticmoe.model.config import load_config
from elasticmoe.model.registry import resolve_model
from elasticmoe.train.config import TrainConfigError, load_train_config, parse_train_config
from elasticmoe.train.data import PreparedData, TokenBlocks, prepare_data
from elasticmoe.train.loop import lr_at
from elasticmoe.train.modeling import TrainableMoE
from elasticmoe.train.trace import expert_skew, record_trace

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "train"

TINY = {
    "model": {
        "arch": "mixtral",
        "preset": "tiny",
        "overrides": {"hidden_size": 48, "head_dim": 12, "intermediate_size": 48},
        "router_aux_loss_coef": 0.01,
    },
    "tokenizer": {"vocab_size": 320},
    "data": {"corpus": "stdlib", "max_chars": 60_000, "seq_len": 32, "eval_fraction": 0.05},
    "train": {
        "steps": 30,
        "batch_size": 8,
        "lr": 5e-3,
        "min_lr": 5e-4,
        "warmup_steps": 3,
        "eval_every": 10,
        "eval_batches": 2,
        "log_every": 5,
        "checkpoint_every": 10,
    },
    "scaling": {"num_workers": 2},
    "max_failures": 2,
}


def _config(tmp: Path, name: str, **changes) -> dict:
    cfg = json.loads(json.dumps(TINY))
    cfg["output_dir"] = str(tmp / name)
    cfg["run_name"] = name
    cfg["storage_path"] = str(tmp / "runs")
    for key, value in changes.items():
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = node.setdefault(p, {})
        if value is None:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return cfg


# ---------------------------------------------------------------- config


def _error(data) -> str:
    with pytest.raises(TrainConfigError) as err:
        parse_train_config(data, "t.yaml")
    return str(err.value)


def test_bad_configs_name_the_field(tmp_path):
    base = _config(tmp_path, "x")
    assert "train.stepz" in _error({**base, "train": {**base["train"], "stepz": 1}})
    assert "train.lr" in _error({**base, "train": {**base["train"], "lr": -1}})
    missing = {k: v for k, v in base.items() if k != "output_dir"}
    assert "output_dir" in _error(missing)
    assert "model.arch" in _error({**base, "model": {"arch": "gpt2"}})
    assert "min_lr" in _error({**base, "train": {**base["train"], "min_lr": 1.0}})
    assert "init_from" in _error({**base, "model": {"init_from": "x", "preset": "small"}})
    assert "batch_size" in _error({**base, "train": {**base["train"], "batch_size": 7}})
    fault = {"exit_rank": 5, "exit_at_step": 3, "marker_file": "m"}
    assert "exit_rank" in _error({**base, "fault": fault})
    assert "t.yaml" in _error([1, 2])


def test_config_files(tmp_path):
    with pytest.raises(TrainConfigError, match="no such file"):
        load_train_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(TrainConfigError, match="not valid YAML"):
        load_train_config(bad)


def test_cli_train_reports_a_bad_config(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {steps: 0}\noutput_dir: out\nmodle: {}\n")
    res = subprocess.run(
        [sys.executable, "-m", "elasticmoe", "train", "--config", str(bad)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2
    assert "train.steps" in res.stderr and "modle" in res.stderr


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_example_train_configs_load(path):
    cfg = load_train_config(path, {"train.steps": 1000})
    assert cfg.scaling.num_workers >= 1


# ---------------------------------------------------------------- model and data


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_training_forward_matches_transformers(family, hf_family_models):
    """Loss and load-balancing loss equal transformers' (Switch aux loss, router coef)."""
    path, hf_model = hf_family_models[family]
    model = TrainableMoE(load_config(path), aux_loss_coef=hf_model.config.router_aux_loss_coef)
    model.load_checkpoint(CheckpointReader(path))
    assert set(model.hf_state_dict()) == set(CheckpointReader(path).name_to_file)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    ours = model(ids)
    with torch.no_grad():
        ref = hf_model(input_ids=ids, labels=ids, output_router_logits=True)
    torch.testing.assert_close(ours.aux_loss, ref.aux_loss.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.loss, ref.loss, rtol=1e-5, atol=1e-5)
    ours.loss.backward()  # the training forward is differentiable end to end
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_lr_schedule():
    lrs = [lr_at(s, 1.0, 0.1, 10, 110) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))


def test_batches_are_a_function_of_the_step(tmp_path):
    cfg = parse_train_config(_config(tmp_path, "d"))
    info = prepare_data(cfg.data, tmp_path / "data", vocab_size=300)
    assert info["vocab_size"] == 300 and info["eval_blocks"] >= 1
    blocks = TokenBlocks(PreparedData(tmp_path / "data"), seed=0)
    again = TokenBlocks(PreparedData(tmp_path / "data"), seed=0)
    a = blocks.train_batch(7, 8, rank=0, world=2)
    assert a.shape == (4, 32)
    assert torch.equal(a, again.train_batch(7, 8, rank=0, world=2))
    assert not torch.equal(a, blocks.train_batch(7, 8, rank=1, world=2))
    # the two ranks together see the global batch a single worker would
    single = blocks.train_batch(7, 8, rank=0, world=1)
    both = torch.cat([blocks.train_batch(7, 8, r, 2) for r in range(2)])
    assert torch.equal(single, both)


# ---------------------------------------------------------------- Ray Train runs


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained from scratch on 2 Ray Train workers (a TrainResult).

    ``run_training`` starts a fresh local Ray instance (``address="local"``) and shuts it
    down, so these runs never join another Ray instance running on the machine.
    """
    from elasticmoe.train.trainer import run_training

    tmp = tmp_path_factory.mktemp("train")
    cfg = parse_train_config(_config(tmp, "scratch"))
    result = run_training(cfg)
    return result


@pytest.mark.slow
def test_two_workers_lower_the_loss(trained):
    events = trained.events
    start = [e for e in events if e["event"] == "start"]
    assert len(start) == 1 and start[0]["world_size"] == 2 and start[0]["step"] == 0
    train = [e for e in events if e["event"] == "train"]
    evals = [e for e in events if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [10, 20, 30]
    assert train[-1]["lm_loss"] < train[0]["lm_loss"] - 0.5
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert trained.steps == 30 and trained.eval_loss == evals[-1]["eval_loss"]
    info = json.loads((trained.output_dir / "training.json").read_text())
    assert info["eval_loss"] == trained.eval_loss


@pytest.mark.slow
def test_export_loads_in_transformers_and_elasticmoe_with_equal_greedy_outputs(trained):
    path = trained.output_dir
    tok = transformers.AutoTokenizer.from_pretrained(path)
    hf, loading = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, output_loading_info=True
    )
    assert not any(loading.values()), loading  # no missing/unexpected/mismatched keys
    hf.eval()
    llm = LLM(model=str(path), dtype="float32")
    prompts = ["def fibonacci(n):", "import os\n", "class Point:"]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    outs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outs, strict=True):
        ids = tok(prompt, return_tensors="pt").input_ids
        assert ids[0].tolist() == out.prompt_token_ids
        ref = hf.generate(
            ids, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=3
        )
        assert ref[0, ids.shape[1] :].tolist() == out.outputs[0].token_ids, prompt


@pytest.mark.slow
def test_worker_death_resumes_from_the_last_checkpoint(trained, tmp_path):
    """Fine-tune the trained model; worker 1 exits at step 25; the run resumes at step 20."""
    from elasticmoe.train.trainer import run_training

    marker = tmp_path / "fault-fired"
    cfg = parse_train_config(
        _config(
            tmp_path,
            "finetune",
            model={"init_from": str(trained.output_dir)},
            **{"train.steps": 30, "train.warmup_steps": 2},
            fault={
                "exit_rank": 1,
                "exit_at_step": 25,
                "marker_file": str(marker),
                "delay_s": 6.0,  # three polls of the Ray Train controller
            },
        )
    )
    result = run_training(cfg)
    assert marker.is_file()
    starts = [e for e in result.events if e["event"] == "start"]
    assert [(s["step"], s["resumed"]) for s in starts] == [(0, False), (20, True)]
    steps = [e["step"] for e in result.events if e["event"] == "train"]
    assert steps[-1] == 30 and 25 in steps  # steps 21-25 ran again after the restart
    assert result.steps == 30
    # fine-tuning kept the tokenizer and shapes of the checkpoint it started from
    assert (result.output_dir / "tokenizer.json").read_text() == (
        trained.output_dir / "tokenizer.json"
    ).read_text()
    assert load_config(result.output_dir) == load_config(trained.output_dir)


@pytest.mark.slow
def test_trace_recorder_writes_what_policy_simulate_reads(trained, tmp_path):
    out = tmp_path / "trace.csv"
    summary = record_trace(
        str(trained.output_dir), out, prompt_tokens=16, max_tokens=2, batch=4, max_prompts=8
    )
    trace = load_trace(out)
    assert isinstance(trace, RoutingTrace)
    assert trace.num_layers == 2 and trace.num_experts == 8
    load = trace.window_load(-1.0, trace.duration_s + 1)
    assert sum(load.values()) == summary.total.sum()
    # 8 prompts x (16 prompt + 1 decode) tokens, top-2, in each of 2 layers
    assert summary.total.sum() == 8 * 17 * 2 * 2
    assert summary.skew()["max_layer"] >= summary.skew()["mean_over_layers"] >= 1.0


def test_expert_skew():
    skew = expert_skew([[1, 1, 1, 1], [4, 0, 0, 0]])
    assert skew["per_layer"] == [1.0, 4.0]
    assert skew["mean_over_layers"] == 2.5 and skew["max_layer"] == 4.0


def test_default_model_is_the_shipped_trained_checkpoint():
    path = resolve_model("default")
    assert path.name == "default" and path.parent.name == "models"
    info = json.loads((path / "training.json").read_text())
    assert info["eval_loss"] < 4.0
    assert (path / "model.safetensors").stat().st_size <= 20_000_000
    assert resolve_model("mixtral-small").name == "mixtral-small"  # random built-ins remain


@pytest.mark.slow
def test_cli_train_then_trace_record_then_policy_simulate(tmp_path):
    """The commands a user runs, end to end (a fresh local Ray instance in the subprocess)."""
    cli = [sys.executable, "-m", "elasticmoe"]
    out = tmp_path / "model"
    sets = {
        "output_dir": str(out),
        "storage_path": str(tmp_path / "runs"),
        "scaling.num_workers": 1,
        "train.steps": 6,
        "train.warmup_steps": 1,
        "train.batch_size": 4,
        "train.log_every": 2,
        "data.max_chars": 40000,
        "data.seq_len": 32,
        "tokenizer.vocab_size": 300,
    }
    args = [f"--set={k}={v}" for k, v in sets.items()]
    res = subprocess.run(
        [*cli, "train", "--config", str(EXAMPLES / "tiny.yaml"), *args, "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout)
    assert summary["steps"] == 6 and summary["output_dir"] == str(out)
    assert "step      6  loss" in res.stderr and "eval" in res.stderr  # progress lines

    trace = tmp_path / "trace.csv"
    res = subprocess.run(
        [*cli, "trace", "record", "--model", str(out), "--out", str(trace)]
        + ["--prompts", "4", "--prompt-tokens", "16", "--max-tokens", "2", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout)["num_experts"] == 8
    policy = EXAMPLES.parent / "policies" / "default.yaml"
    res = subprocess.run(
        [*cli, "policy", "simulate", "--policy", str(policy), "--trace", str(trace), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "expert-routing trace" in res.stdout
