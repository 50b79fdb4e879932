"""Corpus -> tokenizer -> token blocks, with a train/eval split and a deterministic batch order.

The driver prepares everything once (:func:`prepare_data`) into the run's storage directory;
every Ray Train worker then memory-maps the same token arrays (:class:`TokenBlocks`). A
step's batch is a pure function of (seed, step, rank, world size), so a run resumed from a
checkpoint at step K sees exactly the batches it would have seen without the failure.
"""

from __future__ import annotations

import fnmatch
import json
import shutil
import sysconfig
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from elasticmoe.model.init_model import _EOS_ID
from elasticmoe.model.tokenizer import Tokenizer, build_tokenizer, save_tokenizer_files
from elasticmoe.train.config import DataConfig

__all__ = ["PreparedData", "TokenBlocks", "corpus_documents", "prepare_data"]

_TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst")
# What a checkpoint's tokenizer consists of (copied as-is when fine-tuning and on export).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _expand(entry: str, exclude: list[str]) -> list[tuple[str, Path]]:
    """(stable name, path) of the files an entry names: a file, a directory or a glob."""
    if entry == "stdlib":
        root = _stdlib_root()
        files = [p for p in root.rglob("*.py") if p.is_file()]
    else:
        path = Path(entry).expanduser()
        if path.is_file():
            return [(str(path), path)]
        if path.is_dir():
            root = path
            files = [p for p in path.rglob("*") if p.is_file() and p.suffix in _TEXT_SUFFIXES]
        else:
            root = Path(".")
            files = sorted(p for p in Path(".").glob(entry) if p.is_file())
            if not files:
                raise FileNotFoundError(f"data.corpus: {entry!r} matches no file or directory")
    out = []
    for p in files:
        rel = p.relative_to(root).as_posix() if p.is_relative_to(root) else p.as_posix()
        if any(fnmatch.fnmatch(rel, pat) for pat in exclude):
            continue
        out.append((rel, p))
    return out


def corpus_documents(data: DataConfig, seed: int = 0) -> list[str]:
    """The corpus as a list of documents (one per file), up to ``data.max_chars`` characters.

    Files are ordered by a hash of their name (mixed with ``seed``) rather than
    alphabetically, so a capped corpus samples the whole library, not just ``a*``-``m*``.
    """
    entries = ["stdlib"] if data.corpus == "stdlib" else list(data.corpus)
    files: dict[str, Path] = {}
    for entry in entries:
        files.update(_expand(entry, data.exclude))
    if not files:
        raise FileNotFoundError(f"data.corpus {data.corpus!r}: no text files found")
    names = sorted(files, key=lambda n: (zlib.crc32(f"{seed}:{n}".encode()), n))
    docs: list[str] = []
    remaining = data.max_chars
    for name in names:
        if remaining <= 0:
            break
        text = files[name].read_text(encoding="utf-8", errors="replace")[:remaining]
        if text.strip():
            docs.append(text)
            remaining -= len(text)
    return docs


@dataclass(frozen=True)
class PreparedData:
    """Files written by :func:`prepare_data` under ``root``."""

    root: Path

    @property
    def tokenizer_dir(self) -> Path:
        """Tokenizer files (HF layout), copied into the exported checkpoint."""
        return self.root / "tokenizer"

    @property
    def train_tokens(self) -> Path:
        return self.root / "train.npy"

    @property
    def eval_tokens(self) -> Path:
        return self.root / "eval.npy"

    @property
    def info(self) -> Path:
        return self.root / "data.json"


def prepare_data(
    data: DataConfig,
    out_dir: Path,
    *,
    vocab_size: int | None,
    tokenizer_dir: Path | None = None,
    seed: int = 0,
) -> dict:
    """Read the corpus, train (or load) the tokenizer, tokenize, split, and save.

    With ``tokenizer_dir`` (fine-tuning) that checkpoint's tokenizer is used; otherwise a BPE
    tokenizer of ``vocab_size`` tokens is trained on the corpus. Documents are joined with
    ``<|endoftext|>``; the last ``eval_fraction`` of the token stream (at least one block) is
    held out. Returns (and writes to ``data.json``) the counts.
    """
    prepared = PreparedData(out_dir)
    prepared.root.mkdir(parents=True, exist_ok=True)
    docs = corpus_documents(data, seed)
    if tokenizer_dir is not None:
        tok = Tokenizer.from_dir(tokenizer_dir).backend
        prepared.tokenizer_dir.mkdir(parents=True, exist_ok=True)
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copy2(tokenizer_dir / name, prepared.tokenizer_dir / name)
    else:
        assert vocab_size is not None, "vocab_size is needed to train a tokenizer"
        tok = build_tokenizer(vocab_size, docs)
        save_tokenizer_files(tok, prepared.tokenizer_dir)
    eos = tok.token_to_id("<|endoftext|>")
    eos = _EOS_ID if eos is None else eos
    ids: list[int] = []
    for enc in tok.encode_batch(docs, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eos)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    dtype = np.uint16 if vocab <= 65536 else np.int32
    stream = np.asarray(ids, dtype=dtype)
    block = data.seq_len
    num_blocks = len(stream) // block
    num_eval = max(1, round(num_blocks * data.eval_fraction))
    if num_blocks - num_eval < 1:
        raise ValueError(
            f"data.corpus gives {len(stream)} tokens: fewer than 2 blocks of data.seq_len="
            f"{block}; add text or lower seq_len"
        )
    blocks = stream[: num_blocks * block].reshape(num_blocks, block)
    np.save(prepared.train_tokens, blocks[: num_blocks - num_eval])
    np.save(prepared.eval_tokens, blocks[num_blocks - num_eval :])
    info = {
        "documents": len(docs),
        "characters": sum(len(d) for d in docs),
        "tokens": len(stream),
        "vocab_size": vocab,
        "train_blocks": num_blocks - num_eval,
        "eval_blocks": num_eval,
        "seq_len": block,
    }
    prepared.info.write_text(json.dumps(info, indent=2) + "\n")
    return info


class TokenBlocks:
    """Train/eval blocks of one prepared run, and the batch each rank trains on at a step."""

    def __init__(self, prepared: PreparedData, seed: int) -> None:
        self.train = np.load(prepared.train_tokens, mmap_mode="r")
        self.eval = np.load(prepared.eval_tokens, mmap_mode="r")
        self.seed = seed
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = rng.permutation(len(self.train))
            self._perm_epoch = epoch
        assert self._perm is not None
        return self._perm

    def train_batch(self, step: int, batch_size: int, rank: int, world: int) -> torch.Tensor:
        """This rank's share [batch_size // world, seq_len] of the global batch of ``step``.

        The global batch takes the next ``batch_size`` blocks of a per-epoch shuffle.
        """
        per_rank = batch_size // world
        start = step * batch_size + rank * per_rank
        rows = []
        for i in range(start, start + per_rank):
            epoch, offset = divmod(i, len(self.train))
            rows.append(self._permutation(epoch)[offset])
        return torch.from_numpy(self.train[np.asarray(rows)].astype(np.int64))

    def eval_batches(
        self, batch_size: int, max_batches: int, rank: int, world: int
    ) -> Iterator[torch.Tensor]:
        """This rank's eval blocks (the first ``max_batches * batch_size``), in batches."""
        n = min(len(self.eval), batch_size * max_batches)
        mine = np.arange(rank, n, world)
        per_rank = max(1, batch_size // world)
        for i in range(0, len(mine), per_rank):
            yield torch.from_numpy(self.eval[mine[i : i + per_rank]].astype(np.int64))
