"""Random-weight checkpoints and the runtime tokenizer agree with transformers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from elasticmoe.model.init_model import ARCHS, PRESETS, build_config, init_model
from elasticmoe.model.tokenizer import (
    DetokenizeState,
    Tokenizer,
    build_tokenizer,
)

transformers = pytest.importorskip("transformers")

SAMPLES = [
    "hello world",
    "héllo 世界 🙂",
    "def f(x):\n    return x + 1\n",
    "  leading spaces and trailing\t",
    "<|im_start|>user\nhi<|im_end|>",
    "",
]


def _read_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
                out[key] = f.get_tensor(key)
    return out


def _loading_problems(info: dict) -> dict:
    return {k: v for k, v in info.items() if v}


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: init_model(arch, "tiny", root / arch) for arch in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_loads_in_transformers_and_round_trips(
    arch: str, tiny_dirs: dict[str, Path], tmp_path: Path
) -> None:
    model_dir = tiny_dirs[arch]
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, output_loading_info=True
    )
    assert _loading_problems(info) == {}
    logits = model(torch.tensor([[5, 6, 7, 8]])).logits
    assert torch.isfinite(logits).all()
    # Unit-scale logits: the top token is not a near-tie.
    assert 0.3 < logits[0, -1].std().item() < 3.0

    # transformers fuses experts on load and splits them again on save; getting our own tensors
    # back proves both the names and the per-expert orientation (w1 vs w3, [I,H] vs [H,I]).
    model.save_pretrained(tmp_path / "resaved")
    ours = _read_tensors(model_dir)
    theirs = _read_tensors(tmp_path / "resaved")
    assert ours.keys() == theirs.keys()
    for key, tensor in ours.items():
        assert torch.equal(tensor, theirs[key]), key


@pytest.mark.parametrize("arch", ARCHS)
def test_names_and_shapes_match_hf_save_pretrained(
    arch: str, tiny_dirs: dict[str, Path], tmp_path: Path
) -> None:
    config = transformers.AutoConfig.from_pretrained(tiny_dirs[arch])
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "hf")
    ours = {k: tuple(v.shape) for k, v in _read_tensors(tiny_dirs[arch]).items()}
    theirs = {k: tuple(v.shape) for k, v in _read_tensors(tmp_path / "hf").items()}
    assert ours == theirs
    with safe_open(str(tiny_dirs[arch] / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}


@pytest.mark.parametrize("arch", ARCHS)
def test_config_round_trips_through_transformers(
    arch: str, tiny_dirs: dict[str, Path], tmp_path: Path
) -> None:
    config = transformers.AutoConfig.from_pretrained(tiny_dirs[arch])
    config.save_pretrained(tmp_path)
    ours = json.loads((tiny_dirs[arch] / "config.json").read_text())
    theirs = json.loads((tmp_path / "config.json").read_text())
    theirs.pop("transformers_version", None)
    assert ours == theirs


@pytest.mark.parametrize("arch", ARCHS)
def test_sharded_checkpoint_loads(arch: str, tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    model_dir = init_model(arch, "tiny", tmp_path / "sharded", max_shard_size_mb=0.2)
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    shard_files = sorted({*index["weight_map"].values()})
    assert len(shard_files) >= 2
    assert shard_files == sorted(p.name for p in model_dir.glob("*.safetensors"))
    assert shard_files[0] == f"model-00001-of-{len(shard_files):05d}.safetensors"
    assert not (model_dir / "model.safetensors").exists()

    tensors = _read_tensors(model_dir)
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in tensors.values()
    )
    # Same seed, same weights, whatever the sharding.
    unsharded = _read_tensors(tiny_dirs[arch])
    assert tensors.keys() == unsharded.keys() == index["weight_map"].keys()
    assert all(torch.equal(tensors[k], unsharded[k]) for k in tensors)

    _, info = transformers.AutoModelForCausalLM.from_pretrained(model_dir, output_loading_info=True)
    assert _loading_problems(info) == {}


def test_weights_are_deterministic_in_seed(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    same = _read_tensors(init_model("mixtral", "tiny", tmp_path / "same", seed=0))
    other = _read_tensors(init_model("mixtral", "tiny", tmp_path / "other", seed=1))
    reference = _read_tensors(tiny_dirs["mixtral"])
    key = "model.layers.0.block_sparse_moe.experts.0.w1.weight"
    assert all(torch.equal(same[k], reference[k]) for k in reference)
    assert not torch.equal(other[key], reference[key])


def test_bfloat16_and_overrides(tmp_path: Path) -> None:
    model_dir = init_model(
        "qwen3_moe", "tiny", tmp_path / "m", dtype="bfloat16", num_hidden_layers=3, num_experts=4
    )
    config = json.loads((model_dir / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    assert config["num_local_experts"] == 4 and "num_experts" not in config
    tensors = _read_tensors(model_dir)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert "model.layers.2.mlp.experts.3.up_proj.weight" in tensors
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, output_loading_info=True
    )
    assert _loading_problems(info) == {}
    assert model.dtype == torch.bfloat16


@pytest.mark.parametrize("arch", ARCHS)
def test_small_preset_config_is_valid(arch: str) -> None:
    config_dict = build_config(arch, "small")
    config = transformers.AutoConfig.for_model(**config_dict)
    config.validate()
    assert config.num_hidden_layers == 4 and config.hidden_size == 256
    assert config.num_experts_per_tok == 2


def test_qwen2_layer_types_follow_layer_override() -> None:
    config = build_config("qwen2_moe", "tiny", num_hidden_layers=5)
    assert config["layer_types"] == ["full_attention"] * 5


def test_bad_arch_and_preset(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mixtral, qwen2_moe, qwen3_moe, olmoe"):
        build_config("llama", "tiny")
    with pytest.raises(ValueError, match="tiny, small"):
        build_config("mixtral", "huge")
    with pytest.raises(ValueError, match="arch"):
        init_model("gpt2", "tiny", tmp_path / "x")
    with pytest.raises(ValueError, match="dtype"):
        init_model("mixtral", "tiny", tmp_path / "y", dtype="float16")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    assert set(PRESETS) == {"tiny", "small"}


def test_existing_directory(tmp_path: Path) -> None:
    target = tmp_path / "m"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        init_model("olmoe", "tiny", target)
    init_model("olmoe", "tiny", target, max_shard_size_mb=0.2, overwrite=True)
    assert len(list(target.glob("model-*.safetensors"))) >= 2
    # Overwriting with a single file must not leave the old shards or index behind.
    init_model("olmoe", "tiny", target, overwrite=True)
    assert [p.name for p in target.glob("*.safetensors")] == ["model.safetensors"]
    assert not (target / "model.safetensors.index.json").exists()
    assert (target / "notes.txt").read_text() == "keep me"


# --- tokenizer ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok_dir(tiny_dirs: dict[str, Path]) -> Path:
    return tiny_dirs["qwen2_moe"]


def test_tokenizer_matches_transformers(tok_dir: Path) -> None:
    hf = transformers.AutoTokenizer.from_pretrained(tok_dir)
    ours = Tokenizer.from_dir(tok_dir)
    assert ours.vocab_size == len(hf) == 512
    for text in SAMPLES:
        ids = ours.encode(text)
        assert ids == hf.encode(text), text
        assert ours.decode(ids, skip_special_tokens=False) == text
        assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids)
    assert ours.decode(ours.encode("<|im_start|>user\nhi<|im_end|>")) == "user\nhi"
    assert ours.bos_token_id == 0
    # <|endoftext|> from tokenizer_config/config, <|im_end|> from generation_config.
    assert ours.eos_token_ids == {0, 2}


def test_tokenizer_is_deterministic_and_sized() -> None:
    first = build_tokenizer(4096)
    assert first.get_vocab_size() == 4096
    assert first.to_str() == build_tokenizer(4096).to_str()
    assert [first.id_to_token(i) for i in range(4)] == [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|pad|>",
    ]
    with pytest.raises(ValueError, match="vocab_size"):
        build_tokenizer(100)


def test_incremental_detokenization_multibyte(tok_dir: Path) -> None:
    tok = Tokenizer.from_dir(tok_dir)
    text = "héllo 世界 🙂 naïve — ok"
    ids = tok.encode(text)
    # The test only means something if some characters really are split across tokens.
    assert any("\ufffd" in tok.decode([i]) for i in ids)

    state = DetokenizeState(tok)
    deltas = [state.update(ids[: n + 1]) for n in range(len(ids))]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text == state.text
    assert state.flush() == ""

    # Several ids at once, and a prompt giving left context, work the same way.
    batched = tok.detokenizer(prompt_ids=tok.encode("prefix "))
    assert batched.update(ids[:3]) + batched.update(ids) == text


def test_detokenizer_flushes_incomplete_tail(tok_dir: Path) -> None:
    tok = Tokenizer.from_dir(tok_dir)
    ids = tok.encode("a🙂")
    state = DetokenizeState(tok)
    # The stream ends mid-character: nothing is emitted until flush() gives up waiting.
    assert "\ufffd" not in state.update(ids[:-1])
    assert state.flush().endswith("\ufffd")
    assert state.text == tok.decode(ids[:-1])


def test_chat_template_matches_transformers(tok_dir: Path) -> None:
    hf = transformers.AutoTokenizer.from_pretrained(tok_dir)
    ours = Tokenizer.from_dir(tok_dir)
    conversations = [
        [{"role": "user", "content": "héllo 🙂"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "two "}, {"type": "text", "text": "parts"}],
            },
        ],
    ]
    for messages in conversations:
        expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        rendered = ours.apply_chat_template(messages, add_generation_prompt=True)
        assert rendered == expected
        assert rendered.endswith("<|im_start|>assistant\n")
        assert ours.apply_chat_template(messages, add_generation_prompt=False) == (
            hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        )


def test_chat_template_raise_exception(tok_dir: Path) -> None:
    import jinja2

    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    tok = Tokenizer(
        Tokenizer.from_dir(tok_dir).backend,
        {**cfg, "chat_template": "{{ raise_exception('no system role') }}"},
    )
    with pytest.raises(jinja2.exceptions.TemplateError, match="no system role"):
        tok.apply_chat_template([{"role": "system", "content": "x"}])


def test_tokenizer_file_errors(tok_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer\.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text((tok_dir / "tokenizer.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json"):
        Tokenizer.from_dir(tmp_path)


def test_runtime_modules_do_not_import_transformers() -> None:
    code = (
        "import sys, elasticmoe.model.tokenizer, elasticmoe.model.init_model; "
        "sys.exit('transformers' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
