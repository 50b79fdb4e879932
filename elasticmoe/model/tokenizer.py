"""Tokenizers for elasticmoe: building one offline, and the runtime wrapper the engine uses.

Two halves live here:

* :func:`build_tokenizer` / :func:`save_tokenizer_files` make a small byte-level BPE tokenizer
  for the random test models written by :mod:`elasticmoe.model.init_model`. It is trained on
  Python standard-library sources so that every machine can build it with no network access.
* :class:`Tokenizer` and :class:`DetokenizeState` are what the engine uses at serving time for
  any Hugging Face model directory (ours or a real checkpoint). They depend only on the
  ``tokenizers`` and ``jinja2`` packages: importing ``transformers`` in an engine process costs
  seconds and gigabytes we do not need.
"""

from __future__ import annotations

import json
import sysconfig
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

__all__ = [
    "BOS_TOKEN",
    "DEFAULT_CHAT_TEMPLATE",
    "EOS_TOKEN",
    "IM_END_TOKEN",
    "IM_START_TOKEN",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "DetokenizeState",
    "Tokenizer",
    "build_tokenizer",
    "save_tokenizer_files",
]

EOS_TOKEN = "<|endoftext|>"
BOS_TOKEN = EOS_TOKEN
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|pad|>"
# Order matters: BpeTrainer assigns special tokens the first ids, so <|endoftext|> is id 0.
SPECIAL_TOKENS: tuple[str, ...] = (EOS_TOKEN, IM_START_TOKEN, IM_END_TOKEN, PAD_TOKEN)

# ChatML, the format Qwen models use. Content may be a plain string or an OpenAI-style list of
# parts; only text parts are rendered because these test models have no other modalities.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set content = message['content'] -%}"
    "{%- elif message['content'] is none -%}"
    "{%- set content = '' -%}"
    "{%- else -%}"
    "{%- set ns = namespace(text='') -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{%- set ns.text = ns.text + part['text'] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set content = ns.text -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# A fixed, sorted list so that the corpus (and therefore the vocabulary) is identical on every
# run. Files missing from an unusual Python build are skipped rather than failing.
_CORPUS_FILES: tuple[str, ...] = tuple(
    sorted(
        [
            "abc.py",
            "argparse.py",
            "base64.py",
            "calendar.py",
            "collections/__init__.py",
            "contextlib.py",
            "copy.py",
            "csv.py",
            "dataclasses.py",
            "difflib.py",
            "enum.py",
            "fractions.py",
            "functools.py",
            "heapq.py",
            "json/__init__.py",
            "json/decoder.py",
            "json/encoder.py",
            "logging/__init__.py",
            "pathlib.py",
            "random.py",
            "shutil.py",
            "statistics.py",
            "string.py",
            "textwrap.py",
        ]
    )
)
# Caps training time (about a second on one core) while leaving plenty of text for 4k merges.
_CORPUS_MAX_CHARS = 1_500_000


def _corpus_texts() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = []
    remaining = _CORPUS_MAX_CHARS
    for rel in _CORPUS_FILES:
        path = stdlib / rel
        if remaining <= 0:
            break
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")[:remaining]
        remaining -= len(text)
        texts.append(text)
    if not texts:
        raise FileNotFoundError(f"no tokenizer training sources found under {stdlib}")
    return texts


def build_tokenizer(vocab_size: int, texts: Iterable[str] | None = None) -> tokenizers.Tokenizer:
    """Train a deterministic byte-level BPE tokenizer with exactly ``vocab_size`` tokens.

    The corpus is ``texts`` or, by default, a fixed list of Python standard-library sources, so
    no download is needed.
    Ids 0-3 are the special tokens in :data:`SPECIAL_TOKENS`. If the corpus yields fewer merges
    than requested, the vocabulary is padded with ``<|reserved_N|>`` special tokens so that the
    tokenizer and the model's embedding matrix always agree on the vocabulary size.
    """
    min_size = 256 + len(SPECIAL_TOKENS)
    if vocab_size < min_size:
        raise ValueError(
            f"vocab_size must be >= {min_size} (256 byte tokens + {len(SPECIAL_TOKENS)} specials), "
            f"got {vocab_size}"
        )
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # trim_offsets=False keeps offsets byte-faithful; the processor adds no BOS/EOS tokens.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus_texts() if texts is None else texts, trainer=trainer)

    missing = vocab_size - tok.get_vocab_size(with_added_tokens=True)
    if missing > 0:
        tok.add_special_tokens([f"<|reserved_{i}|>" for i in range(missing)])
    actual = tok.get_vocab_size(with_added_tokens=True)
    if actual != vocab_size:  # pragma: no cover - would mean a tokenizers behaviour change
        raise RuntimeError(f"trained tokenizer has {actual} tokens, wanted {vocab_size}")
    return tok


def save_tokenizer_files(
    tok: tokenizers.Tokenizer,
    out_dir: str | Path,
    *,
    model_max_length: int = 2048,
    chat_template: str = DEFAULT_CHAT_TEMPLATE,
) -> None:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``.

    The files follow the Hugging Face layout so ``transformers.AutoTokenizer.from_pretrained``
    loads them as a ``PreTrainedTokenizerFast``; :meth:`Tokenizer.from_dir` reads the same files.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))

    added_tokens_decoder = {
        str(tok.token_to_id(t.content)): {
            "content": t.content,
            "lstrip": t.lstrip,
            "normalized": t.normalized,
            "rstrip": t.rstrip,
            "single_word": t.single_word,
            "special": t.special,
        }
        for t in tok.get_added_tokens_decoder().values()
    }
    tokenizer_config: dict[str, Any] = {
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": dict(
            sorted(added_tokens_decoder.items(), key=lambda kv: int(kv[0]))
        ),
        "bos_token": BOS_TOKEN,
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "model_max_length": model_max_length,
        "pad_token": PAD_TOKEN,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }
    special_tokens_map = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
    for name, obj in (
        ("tokenizer_config.json", tokenizer_config),
        ("special_tokens_map.json", special_tokens_map),
    ):
        (out / name).write_text(
            json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _token_content(value: Any) -> str | None:
    # tokenizer_config stores special tokens either as plain strings or as serialized AddedToken
    # dicts ({"content": ..., "__type": "AddedToken"}) depending on the transformers version.
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _as_id_list(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _select_chat_template(value: Any) -> str | None:
    # Some checkpoints store several named templates; the one named "default" is what HF uses.
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        chosen = named.get("default")
        return chosen if isinstance(chosen, str) else None
    return None


def _clean_up_tokenization(text: str) -> str:
    # Same substitutions as transformers' clean_up_tokenization, for checkpoints that enable it.
    for before, after in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(before, after)
    return text


class Tokenizer:
    """Runtime tokenizer for a Hugging Face model directory, without importing transformers.

    Wraps a ``tokenizers.Tokenizer`` loaded from ``tokenizer.json`` and adds what the serving
    path needs from ``tokenizer_config.json`` and the generation config: the BOS policy, the
    set of ids that end generation, and chat-template rendering.
    """

    def __init__(
        self,
        tok: tokenizers.Tokenizer,
        tokenizer_config: Mapping[str, Any] | None = None,
        *,
        extra_eos_token_ids: Iterable[int] = (),
        config_bos_token_id: int | None = None,
        chat_template: str | None = None,
    ) -> None:
        """Wrap ``tok``; prefer :meth:`from_dir`, which fills the other arguments from files."""
        self._tok = tok
        self._config: dict[str, Any] = dict(tokenizer_config or {})
        self._add_bos = bool(self._config.get("add_bos_token", False))
        self._clean_up_spaces = bool(self._config.get("clean_up_tokenization_spaces", False))
        self.chat_template: str = (
            chat_template
            or _select_chat_template(self._config.get("chat_template"))
            or DEFAULT_CHAT_TEMPLATE
        )

        self.special_tokens: dict[str, str] = {}
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            content = _token_content(self._config.get(key))
            if content is not None:
                self.special_tokens[key] = content

        bos = self.special_tokens.get("bos_token")
        bos_id = tok.token_to_id(bos) if bos is not None else None
        self._bos_token_id: int | None = bos_id if bos_id is not None else config_bos_token_id

        eos_ids: set[int] = set(extra_eos_token_ids)
        eos = self.special_tokens.get("eos_token")
        if eos is not None and (eos_id := tok.token_to_id(eos)) is not None:
            eos_ids.add(eos_id)
        self._eos_token_ids = frozenset(eos_ids)
        self._compiled_template: Any = None

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load from a model directory holding ``tokenizer.json`` (and usually
        ``tokenizer_config.json``). EOS ids from ``generation_config.json`` and ``config.json``
        are added so that generation stops on every token the model card declares.
        """
        root = Path(path)
        tok_file = root / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {tok_file}")
        raw = tok_file.read_text(encoding="utf-8")
        try:
            json.loads(raw)
            tok = tokenizers.Tokenizer.from_str(raw)
        except Exception as exc:  # tokenizers raises a bare Exception for bad files
            raise ValueError(f"{tok_file} is not a valid tokenizer file: {exc}") from exc

        cfg_file = root / "tokenizer_config.json"
        tokenizer_config = _read_json(cfg_file) if cfg_file.is_file() else {}

        extra_eos: list[int] = []
        config_bos: int | None = None
        for name in ("generation_config.json", "config.json"):
            file = root / name
            if not file.is_file():
                continue
            data = _read_json(file)
            extra_eos.extend(_as_id_list(data.get("eos_token_id")))
            bos_ids = _as_id_list(data.get("bos_token_id"))
            if config_bos is None and bos_ids:
                config_bos = bos_ids[0]

        # Newer transformers save the template in its own file, which then takes precedence.
        template_file = root / "chat_template.jinja"
        chat_template = (
            template_file.read_text(encoding="utf-8") if template_file.is_file() else None
        )
        return cls(
            tok,
            tokenizer_config,
            extra_eos_token_ids=extra_eos,
            config_bos_token_id=config_bos,
            chat_template=chat_template,
        )

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Number of tokens including added/special tokens (may be below the model's vocab)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        """The BOS id, or None when the tokenizer declares none."""
        return self._bos_token_id

    @property
    def eos_token_ids(self) -> set[int]:
        """Every id that ends generation (tokenizer EOS plus generation/model config EOS ids)."""
        return set(self._eos_token_ids)

    def token_to_id(self, token: str) -> int | None:
        """Id of ``token``, or None when it is not in the vocabulary."""
        return self._tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids for ``text``.

        BOS is prepended only when ``tokenizer_config`` sets ``add_bos_token`` and the
        tokenizer's own post-processor has not already added it.
        """
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if (
            add_special_tokens
            and self._add_bos
            and self._bos_token_id is not None
            and (not ids or ids[0] != self._bos_token_id)
        ):
            ids = [self._bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text for ``ids``; bytes of an incomplete UTF-8 character become U+FFFD."""
        text = self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self._clean_up_spaces else text

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """Render ``messages`` with the model's chat template, like transformers does.

        The template sees ``messages``, ``add_generation_prompt``, the special tokens
        (``bos_token``, ``eos_token``, ...) and any extra ``kwargs`` (e.g. ``tools``).
        """
        if self._compiled_template is None:
            self._compiled_template = _compile_chat_template(self.chat_template)
        context: dict[str, Any] = {**self.special_tokens, **kwargs}
        return self._compiled_template.render(
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            **context,
        )

    def detokenizer(
        self, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True
    ) -> DetokenizeState:
        """A fresh :class:`DetokenizeState` for one request's output stream."""
        return DetokenizeState(self, prompt_ids=prompt_ids, skip_special_tokens=skip_special_tokens)


def _compile_chat_template(template: str) -> Any:
    # Mirrors transformers' environment (trim/lstrip blocks, loopcontrols, raise_exception,
    # tojson without HTML escaping, strftime_now) so templates from the Hub render identically.
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: tuple[str, str] | None = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise ValueError(f"invalid chat template: {exc}") from exc


class DetokenizeState:
    """Incremental detokenizer for one output stream.

    Feed it all output ids so far with :meth:`update`; it returns only the newly finished text.
    Like vLLM's ``detokenize_incrementally`` it decodes a short window (``prefix_offset`` to the
    end) and holds text back while the window ends in U+FFFD, i.e. while a multi-byte UTF-8
    character is split across tokens. Decoding a window rather than the whole sequence keeps
    each step O(window), and the few tokens of left context keep tokenizers that merge leading
    spaces (SentencePiece) decoding the same as a full decode would.
    """

    _CONTEXT_TOKENS = 5

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        """Start a stream; ``prompt_ids`` only provide left context and are never emitted."""
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = list(prompt_ids[-self._CONTEXT_TOKENS :]) if prompt_ids else []
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._context_len = len(self._ids)
        self.text = ""
        """All text emitted so far."""

    @property
    def num_output_ids(self) -> int:
        """How many output ids have been consumed."""
        return len(self._ids) - self._context_len

    def _decode(self, start: int, end: int | None = None) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self._skip_special)

    def update(self, output_ids: Sequence[int]) -> str:
        """Consume all output ids so far (a growing list) and return the new text delta."""
        seen = self.num_output_ids
        if len(output_ids) < seen:
            raise ValueError(f"output ids shrank from {seen} to {len(output_ids)}")
        if len(output_ids) == seen:
            return ""
        self._ids.extend(output_ids[seen:])
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset)
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            # Incomplete character (or a token that decodes to nothing): wait for more ids.
            return ""
        delta = new_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """Return any held-back text at end of stream, even if it ends in U+FFFD."""
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset)
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        if len(new_text) <= len(prefix_text):
            return ""
        delta = new_text[len(prefix_text) :]
        self.text += delta
        return delta
