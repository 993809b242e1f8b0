"""Tokenizer: byte-level BPE over Hugging Face `tokenizers`, plus chat templates.

One class serves two kinds of tokenizer:

- ones we **train** (`Tokenizer.train`): byte-level BPE with the Qwen2 pre-tokenizer
  (regex split with digits one by one, then ByteLevel). Every byte has a token, so
  `decode(encode(s)) == s` for any UTF-8 string. llama.cpp knows this pre-tokenizer
  as `qwen2`, so a GGUF export tokenizes prompts exactly as we do.
- ones we **load** from a model directory (`Tokenizer.load`): any `tokenizer.json`
  (Llama-3, Qwen2, SentencePiece-converted Llama-2, ...) with bos/eos/pad and the
  chat template read from `tokenizer_config.json`.

The backend never adds special tokens on its own: `encode` asks for
`add_special_tokens=False` and prepends/appends bos/eos itself, so one flag means
the same thing for every tokenizer.

Special tokens spelled inside ordinary text (say a user message containing
"<|im_end|>") ARE matched and become the special id. That is the `tokenizers`
(and transformers) default; we keep it so our ids equal transformers' ids.
Sanitise untrusted text before encoding if that matters to you.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import warnings
from collections.abc import Iterable, Iterator
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as _HFTokenizer

from .errors import LmsmithError

# The Qwen2 pre-tokenizer regex, verbatim from transformers' models/qwen2/tokenization_qwen2.py
# (llama.cpp's "qwen2" pre-tokenizer is the same expression). `\p{N}` alone (not `\p{N}{1,3}` as in
# Llama-3) puts every digit in its own piece, which helps arithmetic.
QWEN2_PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""  # noqa: E501
# Llama-3's regex (llama.cpp "llama-bpe"); only used to name loaded tokenizers.
LLAMA3_PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""  # noqa: E501

EOS_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|bos|>"
PAD_TOKEN = "<|pad|>"
DEFAULT_SPECIAL_TOKENS = [EOS_TOKEN, BOS_TOKEN, PAD_TOKEN, "<|im_start|>", "<|im_end|>"]

# ChatML, written exactly as the Hugging Face hub writes it, so transformers renders the same string.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Names real models use, tried in order when tokenizer_config.json does not say.
_BOS_NAMES = ("<|bos|>", "<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")
_EOS_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>", "<|eot_id|>")
_PAD_NAMES = ("<|pad|>", "<pad>", "[PAD]", "<|finetune_right_pad_id|>")
# Tokens that end a turn or a document: generation stops on any of them.
_END_NAMES = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|endoftext|>", "<end_of_turn>")

# What transformers writes for "no limit known" (its VERY_LARGE_INTEGER, int(1e30)).
_NO_MAX_LENGTH = int(1e30)

_TEXT_CHUNK_BYTES = 1 << 20  # files are fed to the trainer in ~1 MB pieces so huge files stream


class Tokenizer:
    """A byte-level BPE tokenizer (HF `tokenizers` backend) with special ids and a chat template.

    Build one with `Tokenizer.train(...)` or `Tokenizer.load(path)`; the constructor is for
    wrapping an existing `tokenizers.Tokenizer`.
    """

    def __init__(
        self,
        backend: _HFTokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        chat_template: str | None = None,
        model_max_length: int | None = None,
        extra_eos_ids: Iterable[int] = (),
        pre_tokenizer_name: str | None = None,
        config: dict | None = None,
    ) -> None:
        self.backend = backend
        self.bos_token = bos_token if bos_token is not None else self._first_known(_BOS_NAMES)
        self.eos_token = eos_token if eos_token is not None else self._first_known(_EOS_NAMES)
        self.pad_token = pad_token if pad_token is not None else self._first_known(_PAD_NAMES)
        self.unk_token = unk_token
        self.chat_template: str = chat_template or CHATML_TEMPLATE
        self.model_max_length = model_max_length
        self.pre_tokenizer_name: str = pre_tokenizer_name or _guess_pre_tokenizer(backend)
        self._extra_eos_ids = [int(i) for i in extra_eos_ids]
        # The tokenizer_config.json we were loaded with: saved back with our fields updated, so keys we
        # do not understand (add_bos_token, processor_class, ...) survive a load/save round trip.
        self._config = dict(config or {})
        self._post_adds_bos: bool | None = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def train(
        cls,
        inputs: Iterable[str] | Iterable[os.PathLike] | str | os.PathLike,
        vocab_size: int,
        *,
        min_frequency: int = 2,
        special_tokens: list[str] | None = None,
        show_progress: bool = True,
    ) -> Tokenizer:
        """Train a byte-level BPE tokenizer with exactly `vocab_size` tokens (specials included).

        `inputs` is an iterable of text strings, or file paths: `Path` objects, or a list/tuple of
        strings that all name existing files (a single path is accepted too). Files are read as
        UTF-8 (undecodable bytes replaced). Special tokens get ids 0.. in the order given; the
        default is `<|endoftext|>` (eos), `<|bos|>`, `<|pad|>`, `<|im_start|>`, `<|im_end|>`.
        If the corpus is too small (or `min_frequency` too high) to make `vocab_size` tokens, the
        result is smaller and a warning says so.
        """
        specials = list(DEFAULT_SPECIAL_TOKENS if special_tokens is None else special_tokens)
        if len(set(specials)) != len(specials):
            raise LmsmithError(f"special tokens {specials} contain duplicates; list each token once")
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        minimum = len(specials) + len(alphabet)
        if vocab_size < minimum:
            raise LmsmithError(
                f"vocab size {vocab_size} is too small: {len(specials)} special tokens + "
                f"{len(alphabet)} byte tokens need at least {minimum}; "
                f"use a vocab size of {minimum} or more (e.g. 8192)"
            )
        if min_frequency < 1:
            raise LmsmithError(f"min_frequency {min_frequency} must be at least 1")

        backend = _HFTokenizer(models.BPE(unk_token=None, byte_fallback=False))
        backend.normalizer = None  # no NFC/NFKC: round trip must be byte-exact
        backend.pre_tokenizer = qwen2_pre_tokenizer()
        backend.decoder = decoders.ByteLevel()
        backend.post_processor = None  # never add specials behind the caller's back
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            show_progress=show_progress,
            special_tokens=specials,
            initial_alphabet=alphabet,  # all 256 bytes, even ones the corpus lacks
        )
        backend.train_from_iterator(_training_texts(inputs), trainer=trainer)

        tok = cls(
            backend,
            pre_tokenizer_name="qwen2",
            eos_token=_pick(specials, _EOS_NAMES),
            bos_token=_pick(specials, _BOS_NAMES),
            pad_token=_pick(specials, _PAD_NAMES),
        )
        if tok.vocab_size < vocab_size:
            warnings.warn(
                f"the corpus only supports {tok.vocab_size} tokens, fewer than the {vocab_size} requested "
                f"(min_frequency={min_frequency}): there are no more pairs to merge; give more text"
                + (" or lower min_frequency" if min_frequency > 1 else ""),
                stacklevel=2,
            )
        return tok

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a tokenizer from a model directory (tokenizer.json + optional tokenizer_config.json),
        or from a tokenizer.json file (a tokenizer_config.json beside it is read too)."""
        path = Path(path)
        if path.is_dir():
            directory, file = path, path / "tokenizer.json"
        else:
            directory, file = path.parent, path
        if not file.is_file():
            where = f"directory {path}" if path.is_dir() else f"{file}"
            raise LmsmithError(
                f"no tokenizer.json found at {where}; point at a model directory that has one, "
                f"or train one with `lmsmith tokenizer train`"
            )
        try:
            backend = _HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises bare Exception for bad JSON / unknown components
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise LmsmithError(
                f"{file} is not a valid tokenizer.json ({first}); re-download or re-save the tokenizer"
            ) from None

        config = _read_json(directory / "tokenizer_config.json") if file.name == "tokenizer.json" else {}
        chat_template = _template_from_config(config.get("chat_template"))
        jinja_file = directory / "chat_template.jinja"  # newer transformers save the template here
        if jinja_file.is_file():
            chat_template = jinja_file.read_text(encoding="utf-8")
        generation = _read_json(directory / "generation_config.json")
        extra = generation.get("eos_token_id")
        extra = [] if extra is None else [extra] if isinstance(extra, int) else extra
        if not isinstance(extra, list) or not all(isinstance(i, int) and not isinstance(i, bool) and
                                                  0 <= i < backend.get_vocab_size() for i in extra):
            raise LmsmithError(f"{directory / 'generation_config.json'}: eos_token_id must be a token id or a list "
                               f"of ids below {backend.get_vocab_size()}, got {generation.get('eos_token_id')!r}")

        max_len = config.get("model_max_length")
        max_len = int(max_len) if isinstance(max_len, (int, float)) and max_len < _NO_MAX_LENGTH else None
        return cls(
            backend,
            bos_token=_token_content(config.get("bos_token")),
            eos_token=_token_content(config.get("eos_token")),
            pad_token=_token_content(config.get("pad_token")),
            unk_token=_token_content(config.get("unk_token")),
            chat_template=chat_template,
            model_max_length=max_len,
            extra_eos_ids=extra,
            config=config,
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write `tokenizer.json` and `tokenizer_config.json` (with the chat template) into directory `path`.

        The pair loads in transformers with `AutoTokenizer.from_pretrained(path)`.
        """
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise LmsmithError(f"{path} exists and is not a directory; choose a directory to save the tokenizer in")
        path.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(path / "tokenizer.json"))
        config = dict(self._config)
        # A stale chat_template.jinja would override the template we write into the config.
        if (path / "chat_template.jinja").is_file():
            (path / "chat_template.jinja").unlink()
        added = {
            str(i): {
                "content": t.content,
                "lstrip": t.lstrip,
                "normalized": t.normalized,
                "rstrip": t.rstrip,
                "single_word": t.single_word,
                "special": t.special,
            }
            for i, t in sorted(self.backend.get_added_tokens_decoder().items())
        }
        config.update(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": self.bos_token,
                "eos_token": self.eos_token,
                "pad_token": self.pad_token,
                "unk_token": self.unk_token,
                "model_max_length": self.model_max_length or _NO_MAX_LENGTH,
                "chat_template": self.chat_template,
                "clean_up_tokenization_spaces": False,
                "added_tokens_decoder": added,
            }
        )
        config.pop("auto_map", None)  # remote-code tokenizer classes no longer apply: the class is ours
        with open(path / "tokenizer_config.json", "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
            f.write("\n")

    # ------------------------------------------------------------------ encoding

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False,
               max_tokens: int | None = None) -> list[int]:
        """Token ids of `text`; prepend bos / append eos when asked and the tokenizer has them.

        Long texts are encoded in pieces (see `text_pieces`), so memory stays bounded whatever the
        length; with `max_tokens`, encoding stops once that many ids are there (the result may hold
        a few more: cut it yourself).
        """
        ids: list[int] = []
        for piece in text_pieces(text):
            ids += self.backend.encode(piece, add_special_tokens=False).ids
            if max_tokens is not None and len(ids) >= max_tokens:
                break
        return self._wrap(ids, add_bos, add_eos)

    def encode_batch(self, texts: list[str], add_bos: bool = False, add_eos: bool = False) -> list[list[int]]:
        """`encode` for many texts at once, on the Rust batch encoder (parallel across cores); long texts
        go through it piece by piece."""
        texts = list(texts)
        short = [i for i, t in enumerate(texts) if len(t) <= PIECE_CHARS]
        out: list[list[int]] = [[] for _ in texts]
        for i, e in zip(short, self.backend.encode_batch([texts[i] for i in short], add_special_tokens=False)):
            out[i] = e.ids
        for i, t in enumerate(texts):
            if len(t) > PIECE_CHARS:
                out[i] = self.encode(t)
        return [self._wrap(ids, add_bos, add_eos) for ids in out]

    def _wrap(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        if add_eos and self.eos_id is not None:
            ids = [*ids, self.eos_id]
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids` (a list, tuple, numpy array or 1-D tensor)."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string (its byte-level spelling, e.g. 'Ġthe'), or None."""
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        """Token string of an id, or None when out of range."""
        return self.backend.id_to_token(int(i))

    # ------------------------------------------------------------------ properties

    @property
    def vocab_size(self) -> int:
        """One more than the largest id, added/special tokens included: the embedding rows needed.
        Equals the token count when ids are contiguous (always for tokenizers we train)."""
        # Model ids are 0..n-1; added tokens may extend past them. Avoids building the whole vocab dict.
        added = self.backend.get_added_tokens_decoder()
        return max(self.backend.get_vocab_size(with_added_tokens=False), max(added, default=-1) + 1)

    @property
    def bos_id(self) -> int | None:
        """Id of the beginning-of-sequence token, or None."""
        return self._id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        """Id of the end-of-sequence token (also the document separator in pretraining), or None."""
        return self._id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        """Id of the padding token, or None."""
        return self._id(self.pad_token)

    @property
    def eos_ids(self) -> list[int]:
        """Every id that ends generation: eos, end-of-turn tokens in the vocab, generation_config's eos."""
        ids: list[int] = []
        candidates = [self.eos_id, *self._extra_eos_ids, *(self._id(t) for t in _END_NAMES)]
        for i in candidates:
            if i is not None and i not in ids:
                ids.append(i)
        return ids

    @property
    def add_bos(self) -> bool:
        """Whether the original model expects bos first (Llama family: `add_bos_token` in the config or a
        post-processor that prepends it). False for tokenizers we train. `encode` never adds it by itself."""
        if self.bos_token is None or self.bos_id is None:
            return False
        if "add_bos_token" in self._config:
            return bool(self._config["add_bos_token"])
        if self._post_adds_bos is None:  # parsing the whole tokenizer.json costs ms: once (every prompt asks)
            post = json.loads(self.backend.to_str()).get("post_processor") or {}
            steps = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
            self._post_adds_bos = any(
                (single := step.get("single") if step.get("type") == "TemplateProcessing" else None)
                and single[0].get("SpecialToken", {}).get("id") == self.bos_token for step in steps)
        return self._post_adds_bos

    @property
    def hash(self) -> str:
        """sha256 of the tokenizer.json content (canonical JSON), stable across processes and saves."""
        canonical = json.dumps(
            json.loads(self.backend.to_str()), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        )
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def _first_known(self, names: Iterable[str]) -> str | None:
        return next((n for n in names if self.backend.token_to_id(n) is not None), None)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
            f"pad={self.pad_token!r}, pre_tokenizer={self.pre_tokenizer_name!r})"
        )

    # ------------------------------------------------------------------ chat

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """Render `messages` ([{"role": ..., "content": ...}, ...]) with the chat template.

        Rendered as transformers renders it (sandboxed jinja2, trim_blocks/lstrip_blocks,
        `raise_exception`, special-token variables), so the string is identical to
        `AutoTokenizer.apply_chat_template(messages, tokenize=False)`. Encode the result with
        `encode` (no add_bos: templates that want a bos write `bos_token` themselves).
        """
        import jinja2

        # transformers drops None-valued keys (OpenAI-style content=None) before rendering; so do we.
        chat = [{k: v for k, v in m.items() if v is not None} for m in messages]
        variables = {
            name: value
            for name, value in (
                ("bos_token", self.bos_token),
                ("eos_token", self.eos_token),
                ("unk_token", self.unk_token),
                ("pad_token", self.pad_token),
            )
            if value is not None
        }
        try:
            return _compile_template(self.chat_template).render(
                messages=chat,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except jinja2.TemplateError as e:
            raise LmsmithError(f"chat template rejected the messages: {e}") from None
        except (OverflowError, MemoryError, RecursionError, TypeError, ValueError, KeyError, IndexError) as e:
            # A template is code from the model's files: one that loops for ever or fails is the file's fault.
            raise LmsmithError(f"the chat template failed ({type(e).__name__}: {str(e)[:120]}); fix "
                               "chat_template in tokenizer_config.json") from None

    def template_token_ids(self) -> list[int]:
        """Ids of the special tokens the chat template writes (e.g. <|im_start|>, <|im_end|>), with eos_ids.

        Found by rendering a two-turn chat and keeping the special/added tokens of its encoding,
        so it works for any template. These are the tokens a base model may never have seen.
        """
        text = self.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}])
        added = {i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}
        return sorted({i for i in self.encode(text) if i in added} | set(self.eos_ids))


# ---------------------------------------------------------------------- helpers


def qwen2_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """The Qwen2 pre-tokenizer: regex split (pieces kept, "Isolated"), then ByteLevel without a regex."""
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


@lru_cache(maxsize=16)
def _compile_template(source: str):
    # Same environment as transformers' _compile_jinja_template: chat templates from the hub are untrusted
    # code, hence the immutable sandbox; trim/lstrip blocks change whitespace, so they must match exactly.
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters; transformers overrides it with plain json.dumps
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise LmsmithError(
            f"chat template has a syntax error at line {e.lineno}: {e.message}; fix the template"
        ) from None


def _training_texts(inputs) -> Iterator[str]:
    """Texts for the trainer: the strings themselves, or the contents of the files named."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if not isinstance(inputs, (list, tuple)):
        # A generator: peek at the first item; Path objects mean "files" (strings from a generator are texts).
        it = iter(inputs)
        first = next(it, None)
        if first is None:
            return iter(())
        inputs = itertools.chain([first], it)
        if isinstance(first, os.PathLike):
            inputs = list(inputs)
    if isinstance(inputs, (list, tuple)) and inputs and all(_looks_like_path(x) for x in inputs):
        files = [Path(x) for x in inputs]
        for f in files:
            if not f.is_file():
                raise LmsmithError(f"training file {f} does not exist or is not a file; check the path")
        return _read_files(files)
    return _check_strings(inputs)


def _looks_like_path(x) -> bool:
    if isinstance(x, os.PathLike):
        return True
    # A str counts as a path only when it names an existing file: training text has newlines or is long.
    return isinstance(x, str) and "\n" not in x and len(x) < 4096 and os.path.isfile(x)


def _check_strings(items) -> Iterator[str]:
    for x in items:
        if isinstance(x, os.PathLike):
            raise LmsmithError(f"mixed inputs: {x} is a path among texts; pass either all texts or all file paths")
        if not isinstance(x, str):
            raise LmsmithError(f"training input {x!r:.60} is a {type(x).__name__}, not a string; pass texts or paths")
        yield x


def _read_files(files: list[Path]) -> Iterator[str]:
    for f in files:
        with open(f, encoding="utf-8", errors="replace", newline="") as fh:  # newline="": keep \r\n as is
            while True:
                # Read whole lines up to ~1 MB so a piece never splits a line (or a word) in two.
                chunk = "".join(fh.readlines(_TEXT_CHUNK_BYTES))
                if not chunk:
                    break
                yield chunk


def _pick(specials: list[str], names: Iterable[str]) -> str | None:
    return next((n for n in names if n in specials), None)


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as "str" or {"content": "str", ...} (AddedToken)."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _template_from_config(value: Any) -> str | None:
    """`chat_template` is a string, or a list of {"name", "template"} dicts of which "default" is used."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default") or next((t for t in named.values() if isinstance(t, str)), None)
    return None


# Texts longer than this are encoded in pieces: the Rust encoder holds ~160 bytes per character of its
# input while it works (a 49 MB one-line document took 8 GB in one call).
PIECE_CHARS = 1 << 18
_CUT = re.compile(r"\S(?= )")


def text_pieces(text: str, size: int = PIECE_CHARS) -> Iterator[str]:
    """`text` in consecutive pieces of at most `size` characters, each cut just before a space that follows
    a non-space character: there the byte-level pre-tokenizers (Qwen2, Llama 3, GPT-2) start a new
    pre-token anyway, so the ids equal those of the whole text. A stretch of 4096 characters with no such
    place (one enormous word) is cut where it must be."""
    start = 0
    while len(text) - start > size:
        end = start + size
        last = None
        for last in _CUT.finditer(text, max(start, end - 4096), end):  # noqa: B007 (we want the last)
            pass
        cut = last.end() if last is not None and last.end() > start else end
        yield text[start:cut]
        start = cut
    yield text[start:]


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LmsmithError(f"{path} is not valid JSON ({e}); fix or delete the file") from None
    if not isinstance(data, dict):
        raise LmsmithError(f"{path} must hold a JSON object; fix or delete the file")
    return data


def _guess_pre_tokenizer(backend: _HFTokenizer) -> str:
    """Name of the pre-tokenizer family as llama.cpp spells it (GGUF tokenizer.ggml.pre), or "unknown"."""
    spec = json.loads(backend.to_str())
    pre, norm = spec.get("pre_tokenizer") or {}, spec.get("normalizer") or {}
    text = json.dumps(pre)
    if QWEN2_PRETOKENIZE_REGEX in _regexes(pre):
        return "qwen2"
    if LLAMA3_PRETOKENIZE_REGEX in _regexes(pre):
        return "llama-bpe"
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if "Metaspace" in text or "Prepend" in json.dumps(norm) or "▁" in json.dumps(norm):
        return "default"  # SentencePiece-style (Llama-2, Mistral): llama.cpp's "llama" vocab, no regex
    return "unknown"


def _regexes(node: Any) -> list[str]:
    """Every Split regex inside a pre_tokenizer JSON tree."""
    found = []
    if isinstance(node, dict):
        pattern = node.get("pattern")
        if node.get("type") == "Split" and isinstance(pattern, dict) and "Regex" in pattern:
            found.append(pattern["Regex"])
        for v in node.values():
            found += _regexes(v)
    elif isinstance(node, list):
        for v in node:
            found += _regexes(v)
    return found


def first_difference(a: Tokenizer, b: Tokenizer) -> int | None:
    """The first token id whose string differs between two tokenizers (or that only one has); None if
    they share one vocabulary (a distillation teacher and student, a draft and its target)."""
    if a.hash == b.hash:
        return None
    for i in range(max(a.vocab_size, b.vocab_size)):
        x = a.id_to_token(i) if i < a.vocab_size else None
        y = b.id_to_token(i) if i < b.vocab_size else None
        if x != y:
            return i
    return None
