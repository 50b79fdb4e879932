"""Offline throughput: the elasticmoe engine vs Hugging Face transformers on one checkpoint.

Replays ``--num-requests`` requests whose prompt/output lengths come from consecutive rows of
the Azure LLM conversation trace (scaled down, see ``scaling`` in the output), all submitted
at once, through

* elasticmoe: ``LLM(model, mode="local").generate(prompts, [SamplingParams(...)] * n)`` with
  greedy decoding and ``ignore_eos`` so request i yields exactly N_i tokens, and
* transformers: batched greedy ``generate`` in batches of ``--hf-batch-size`` (default: as
  many requests as elasticmoe runs at once, ``--max-num-seqs``; left padded,
  ``min_new_tokens = max_new_tokens`` = the batch's largest N_i); only each request's own
  N_i tokens count as useful output. It runs twice per round: in trace order, and with the
  requests sorted by length (less padding, shorter batches: the strongest honest form of
  this baseline). Ratios are against the faster of the two.

Prints one JSON document on stdout; progress goes to stderr. Example::

    python bench/engine.py --arch mixtral --preset small > engine.json
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import platform
import pstats
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

if __package__ in (None, ""):  # run as `python bench/engine.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    DEFAULT_TRACE,
    LengthScaling,
    console,
    emit_json,
    load_trace,
    scale_lengths,
    select_rows,
    timer,
)

TARGET_RATIO = 2.0
NUM_WARMUP = 2


@dataclass(frozen=True, slots=True)
class Workload:
    """The requests to replay: prompt token ids and the output length of each."""

    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def output_tokens(self) -> int:
        """Total requested output tokens (the useful work)."""
        return sum(self.output_lens)


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="picks the trace window and prompt ids")
    p.add_argument(
        "--start", type=int, default=None, help="first trace row (default: drawn from --seed)"
    )
    p.add_argument("--arch", default="mixtral", help="model family when building a model")
    p.add_argument("--preset", default="tiny", help="model size when building a model")
    p.add_argument(
        "--model",
        type=Path,
        default=None,
        help="checkpoint directory (default: build --arch/--preset with init_model)",
    )
    p.add_argument(
        "--hf-batch-size",
        type=int,
        default=None,
        help="transformers batch size (default: --max-num-seqs, the batch elasticmoe runs)",
    )
    p.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=1024)
    p.add_argument("--device", default="cpu", help="torch device for both paths")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument(
        "--check-requests",
        type=int,
        default=8,
        help="how many leading requests the greedy-agreement check covers",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed rounds per path, alternating elasticmoe/transformers; medians reported",
    )
    p.add_argument("--skip-hf", action="store_true", help="run only the elasticmoe path")
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="cProfile the timed elasticmoe run; print the top N functions "
        "(cumulative) on stderr. Inflates elasticmoe's time.",
    )
    args = p.parse_args(argv)
    if args.hf_batch_size is None:
        args.hf_batch_size = args.max_num_seqs
    if min(args.num_requests, args.hf_batch_size, args.repeats) < 1:
        p.error("--num-requests, --hf-batch-size and --repeats must be >= 1")
    return args


def _import_init_model(attempts: int = 5, delay_s: float = 60.0):
    """``elasticmoe.model.init_model.init_model``, retrying while it is not importable yet."""
    for attempt in range(1, attempts + 1):
        try:
            from elasticmoe.model.init_model import init_model
        except ImportError as exc:
            if attempt == attempts:
                raise
            console.print(f"[yellow]init_model not importable ({exc}); retry in {delay_s:.0f}s")
            time.sleep(delay_s)
        else:
            return init_model
    raise AssertionError("unreachable")


def _special_ids(cfg: dict[str, Any]) -> set[int]:
    ids: set[int] = set()
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = cfg.get(key)
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, list):
            ids.update(i for i in v if isinstance(i, int))
    return ids


def _make_prompts(lengths: list[int], vocab: list[int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.choice(vocab) for _ in range(n)] for n in lengths]


def _stats(xs: list[int]) -> dict[str, float]:
    return {
        "min": min(xs),
        "mean": round(statistics.fmean(xs), 2),
        "max": max(xs),
        "total": sum(xs),
    }


class ElasticmoeRunner:
    """The elasticmoe path: one ``LLM.generate`` call over all requests."""

    def __init__(self, model_dir: Path, args: argparse.Namespace) -> None:
        from elasticmoe import LLM, SamplingParams

        self._sp = SamplingParams
        self.engine_args = {
            "dtype": "float32",
            "device": args.device,
            "max_num_seqs": args.max_num_seqs,
            "max_num_batched_tokens": args.max_num_batched_tokens,
        }
        self.llm = LLM(model=str(model_dir), mode="local", **self.engine_args)
        self.profiler = cProfile.Profile() if args.profile else None

    def run(self, work: Workload, *, profile: bool = False) -> list[list[int]]:
        """Generate every request; returns the output token ids in request order."""
        prompts = [{"prompt_token_ids": p} for p in work.prompts]
        params = [self._sp(max_tokens=n, temperature=0, ignore_eos=True) for n in work.output_lens]
        prof = self.profiler if profile else None
        if prof:
            prof.enable()
        try:
            outs = self.llm.generate(prompts, params)
        finally:
            if prof:
                prof.disable()
        return [list(o.outputs[0].token_ids) for o in outs]

    def describe(self) -> dict[str, Any]:
        return {"engine_args": {"mode": "local", **self.engine_args}}


class TransformersRunner:
    """The baseline: batched greedy ``generate`` in fixed-size batches, trace order."""

    def __init__(self, model_dir: Path, args: argparse.Namespace, pad_id: int) -> None:
        import transformers
        from transformers import AutoModelForCausalLM

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        self.version = transformers.__version__
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        self.model.to(args.device).eval()
        self.device = args.device
        self.batch_size = args.hf_batch_size
        self.pad_id = pad_id
        self.unpadded: list[bool] = []
        self.generated_incl_padding = 0

    def _batch(self, prompts: list[list[int]], lens: list[int]) -> list[list[int]]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
        new = max(lens)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=self.pad_id,
            )
        gen = out[:, width:]
        self.generated_incl_padding += gen.numel()
        return [gen[i, :n].tolist() for i, n in enumerate(lens)]

    def run(
        self, work: Workload, *, progress: Progress | None = None, sort: bool = False
    ) -> list[list[int]]:
        """Generate every request batch by batch; returns each request's own N_i tokens,
        in request order. ``sort`` batches requests of similar length together."""
        n = len(work.prompts)
        order = list(range(n))
        if sort:
            order.sort(key=lambda i: (len(work.prompts[i]), work.output_lens[i]))
        self.unpadded, self.generated_incl_padding = [False] * n, 0
        tokens: list[list[int]] = [[] for _ in range(n)]
        task = progress.add_task("transformers", total=n) if progress else None
        for lo in range(0, n, self.batch_size):
            idx = order[lo : lo + self.batch_size]
            prompts = [work.prompts[i] for i in idx]
            out = self._batch(prompts, [work.output_lens[i] for i in idx])
            width = max(len(p) for p in prompts)
            for i, t, p in zip(idx, out, prompts, strict=True):
                tokens[i] = t
                self.unpadded[i] = len(p) == width
            if progress and task is not None:
                progress.advance(task, len(idx))
        if progress and task is not None:
            progress.remove_task(task)
        return tokens

    def describe(self, n: int, sort: bool) -> dict[str, Any]:
        return {
            "version": self.version,
            "batch_size": self.batch_size,
            "num_batches": -(-n // self.batch_size),
            "batch_order": "sorted by (prompt, output) length" if sort else "trace order",
            "generated_tokens_incl_padding": self.generated_incl_padding,
        }


def _throughput(tokens: int, walls: list[float]) -> dict[str, Any]:
    med = statistics.median(walls)
    return {
        "wall_s": round(med, 3),
        "wall_s_all": [round(w, 3) for w in walls],
        "output_tokens": tokens,
        "output_tokens_per_s": round(tokens / med, 2),
        "output_tokens_per_s_best": round(tokens / min(walls), 2),
    }


def _count_parameters(model_dir: Path) -> int:
    """Total parameters stored in the checkpoint's safetensors files (shapes only, no loading)."""
    from safetensors import safe_open

    total = 0
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                n = 1
                for d in st.get_slice(key).get_shape():
                    n *= d
                total += n
    return total


def _measure(
    model_dir: Path, work: Workload, warm: Workload, args: argparse.Namespace, pad_id: int
) -> tuple[
    dict[str, Any], list[list[int]], dict[str, Any] | None, list[list[int]] | None, list[bool]
]:
    """Load and warm up both paths, then time ``--repeats`` rounds, alternating the two."""
    with console.status("elasticmoe: loading"), timer() as t_load:
        emoe = ElasticmoeRunner(model_dir, args)
    with console.status("elasticmoe: warm-up"), timer() as t_warm:
        emoe.run(warm)
    emoe_info: dict[str, Any] = {
        **emoe.describe(),
        "load_s": round(t_load.elapsed, 3),
        "warmup_s": round(t_warm.elapsed, 3),
    }
    hf: TransformersRunner | None = None
    hf_info: dict[str, Any] | None = None
    if not args.skip_hf:
        with console.status("transformers: loading"), timer() as t_load:
            hf = TransformersRunner(model_dir, args, pad_id)
        with console.status("transformers: warm-up"), timer() as t_warm:
            hf.run(warm)
        hf_info = {"load_s": round(t_load.elapsed, 3), "warmup_s": round(t_warm.elapsed, 3)}

    emoe_walls: list[float] = []
    hf_walls: dict[bool, list[float]] = {False: [], True: []}  # by sort
    emoe_runs: list[list[list[int]]] = []
    hf_runs: dict[bool, list[list[list[int]]]] = {False: [], True: []}
    hf_padding: dict[bool, int] = {}
    trace_unpadded: list[bool] = []
    n = len(work.prompts)
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
    with progress:
        for r in range(args.repeats):
            label = f"round {r + 1}/{args.repeats}"
            task = progress.add_task(f"elasticmoe {label} ({n} requests at once)", total=1)
            with timer() as t:
                emoe_runs.append(emoe.run(work, profile=True))
            progress.update(task, completed=1)
            progress.remove_task(task)
            emoe_walls.append(t.elapsed)
            console.print(
                f"elasticmoe   {label}: {work.output_tokens / t.elapsed:8.1f} tok/s "
                f"({t.elapsed:.2f}s)"
            )
            for sort in (False, True) if hf is not None else ():
                with timer() as t:
                    hf_runs[sort].append(hf.run(work, progress=progress, sort=sort))
                hf_walls[sort].append(t.elapsed)
                hf_padding[sort] = hf.generated_incl_padding
                if not sort:
                    trace_unpadded = list(hf.unpadded)
                console.print(
                    f"transformers{' sorted' if sort else ''} {label}: "
                    f"{work.output_tokens / t.elapsed:8.1f} tok/s ({t.elapsed:.2f}s)"
                )

    tokens = emoe_runs[0]
    emoe_info.update(_throughput(sum(len(t) for t in tokens), emoe_walls))
    emoe_info["requests_with_wrong_length"] = sum(
        len(t) != n_i for t, n_i in zip(tokens, work.output_lens, strict=True)
    )
    emoe_info["identical_across_repeats"] = all(run == tokens for run in emoe_runs)
    emoe_info["profiled"] = emoe.profiler is not None
    if emoe.profiler is not None:
        buf = io.StringIO()
        stats = pstats.Stats(emoe.profiler, stream=buf).sort_stats("cumulative")
        stats.print_stats(args.profile)
        console.print(buf.getvalue(), markup=False, highlight=False, soft_wrap=True)
    hf_tokens: list[list[int]] | None = None
    unpadded: list[bool] = []
    if hf is not None and hf_info is not None:
        hf_tokens = hf_runs[False][0]
        unpadded = trace_unpadded
        variants = {}
        for sort in (False, True):
            hf.generated_incl_padding = hf_padding[sort]
            variants["sorted" if sort else "trace_order"] = {
                **hf.describe(n, sort),
                **_throughput(sum(len(t) for t in hf_runs[sort][0]), hf_walls[sort]),
                "identical_across_repeats": all(r == hf_runs[sort][0] for r in hf_runs[sort]),
            }
        best = max(variants, key=lambda k: variants[k]["output_tokens_per_s"])
        hf_info = {**hf_info, "baseline": best, **variants[best], "variants": variants}
    return emoe_info, tokens, hf_info, hf_tokens, unpadded


def _agreement(
    ours: list[list[int]], theirs: list[list[int]], unpadded: list[bool], first_k: int
) -> dict[str, Any]:
    k = min(first_k, len(ours))
    same = [a == b for a, b in zip(ours, theirs, strict=True)]
    first_diff = []
    for a, b in zip(ours[:k], theirs[:k], strict=True):
        pos = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
        first_diff.append(pos)
    return {
        "note": "informational: HF left padding and batch shapes can legitimately change tokens",
        "first_k": k,
        "exact_matches_first_k": sum(same[:k]),
        "first_mismatch_pos_first_k": first_diff,
        "unpadded_requests": sum(unpadded),
        "exact_matches_unpadded": sum(s for s, u in zip(same, unpadded, strict=True) if u),
        "exact_matches_all": sum(same),
        "num_requests": len(same),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    rows = load_trace(args.trace)
    start, window = select_rows(rows, args.num_requests, seed=args.seed, start=args.start)
    scaling = LengthScaling()
    lengths = scale_lengths(window, scaling)

    with tempfile.TemporaryDirectory(prefix="elasticmoe-bench-") as tmp:
        if args.model is None:
            init_model = _import_init_model()
            with console.status(f"building {args.arch}/{args.preset}"):
                model_dir = init_model(args.arch, args.preset, Path(tmp) / "model", overwrite=True)
            preset = args.preset
        else:
            model_dir, preset = args.model, None
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        vocab = [i for i in range(cfg["vocab_size"]) if i not in _special_ids(cfg)]
        pad_id = cfg.get("pad_token_id")
        if not isinstance(pad_id, int):
            eos = cfg.get("eos_token_id")
            pad_id = eos if isinstance(eos, int) else (eos or [0])[0]

        work = Workload(
            _make_prompts([p for p, _ in lengths], vocab, args.seed), [o for _, o in lengths]
        )
        warm_lens = lengths[:NUM_WARMUP]
        warm = Workload(
            _make_prompts([p for p, _ in warm_lens], vocab, args.seed + 10_000),
            [o for _, o in warm_lens],
        )

        n_params = _count_parameters(Path(model_dir))
        emoe, emoe_tokens, hf, hf_tokens, unpadded = _measure(
            Path(model_dir), work, warm, args, pad_id
        )

    agreement = None
    ratio = ratio_best = None
    if hf is not None and hf_tokens is not None:
        agreement = _agreement(emoe_tokens, hf_tokens, unpadded, args.check_requests)
        ratio = emoe["output_tokens_per_s"] / hf["output_tokens_per_s"]
        ratio_best = emoe["output_tokens_per_s_best"] / hf["output_tokens_per_s_best"]
    experts = cfg.get("num_local_experts", cfg.get("num_experts"))
    result: dict[str, Any] = {
        "benchmark": "engine_offline_throughput",
        "model": {
            "path": str(args.model) if args.model else "(built in a temp dir)",
            "arch": cfg.get("model_type"),
            "preset": preset,
            "parameters": n_params,
            "hidden_size": cfg.get("hidden_size"),
            "num_hidden_layers": cfg.get("num_hidden_layers"),
            "num_experts": experts,
            "num_experts_per_tok": cfg.get("num_experts_per_tok"),
            "vocab_size": cfg.get("vocab_size"),
        },
        "trace": {
            "path": str(args.trace),
            "rows_total": len(rows),
            "start_row": start,
            "num_requests": len(window),
            "selection": "consecutive rows; start drawn with random.Random(seed).randrange"
            if args.start is None
            else "consecutive rows from --start",
            "span_s": round(window[-1].timestamp, 3),
            "arrivals": "ignored: offline, all requests submitted at once",
        },
        "scaling": {
            **scaling.to_dict(),
            "prompt": f"clamp(ceil(ContextTokens / {scaling.context_divisor:g}), "
            f"{scaling.prompt_min}, {scaling.prompt_max})",
            "output": f"clamp(ceil(GeneratedTokens / {scaling.generated_divisor:g}), "
            f"{scaling.output_min}, {scaling.output_max})",
            "prompt_ids": f"uniform over vocab minus special ids, random.Random({args.seed})",
            "trace_context_tokens": _stats([r.context_tokens for r in window]),
            "trace_generated_tokens": _stats([r.generated_tokens for r in window]),
            "prompt_len": _stats([p for p, _ in lengths]),
            "output_len": _stats([o for _, o in lengths]),
        },
        "env": {
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "device": args.device,
            "python": platform.python_version(),
            "machine": platform.machine(),
        },
        "warmup": f"{NUM_WARMUP} requests per path (other prompt ids, same lengths as rows 0-1)",
        "timing": f"time.perf_counter around each path's full run; {args.repeats} rounds, "
        "alternating elasticmoe and transformers; wall_s is the median, tokens/s use it",
        "elasticmoe": emoe,
        "transformers": hf,
        "ratio_output_tokens_per_s": round(ratio, 3) if ratio is not None else None,
        "ratio_output_tokens_per_s_best": round(ratio_best, 3) if ratio_best is not None else None,
        "target_ratio": TARGET_RATIO,
        "meets_target": (ratio >= TARGET_RATIO) if ratio is not None else None,
        "greedy_agreement": agreement,
    }
    emit_json(result)
    return result


if __name__ == "__main__":
    main()
