"""Checkpoints as Hugging Face directories: read (a `loader.WeightSource`), save, atomically.

A checkpoint is what `transformers` reads and writes for Llama, Qwen2 and
Mistral models: `config.json`, `model.safetensors` (or
`model-0000i-of-0000n.safetensors` shards plus `model.safetensors.index.json`),
`generation_config.json`, and the tokenizer files. Training state may sit in a
`train_state/` folder beside them, written in the same atomic step (`extra=`).

Reading checks config.json and every safetensors header first; `lmsmith.loader` builds
the model on the meta device and assigns tensors straight from memory-mapped
safetensors files. When no dtype conversion is needed the weights
stay backed by the file mapping (a private, copy-on-write mapping: writing to a
weight never touches the file), so peak resident memory is about one model
size. With a conversion, tensors are read one at a time with `pread`, converted,
and the read buffer dropped. Pickle files (`pytorch_model.bin`) are never
opened.

Saving streams one tensor at a time into a temporary sibling directory, fsyncs
it, then renames it into place, so a crash never leaves a half-written
checkpoint under the final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig
from .errors import LmsmithError
from .fileio import ST_DTYPES, atomic_dir, check_regular_file, tensor_nbytes, write_json, write_safetensors
from .model import Transformer

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_NAME = "tokenizer.json"

# Keys some older HF checkpoints carry that are buffers, not weights: skipped silently.
_IGNORED_KEYS = re.compile(r".*rotary_emb\.inv_freq$")

_HF_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                   "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

_CONVERT_HINT = (
    "convert it to safetensors first: python -c \"from transformers import AutoModelForCausalLM as A; "
    "A.from_pretrained('{d}').save_pretrained('{d}', safe_serialization=True)\""
)


# ---------------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------------


def _check_dir(path: Path) -> None:
    if path.is_dir():
        return
    if path.exists():
        raise LmsmithError(f"{path}: is a file, not a model directory; give the directory holding config.json")
    hint = ""
    if path.parent.is_dir():
        # A crash between the two renames of an atomic save leaves the previous checkpoint here.
        old = sorted(path.parent.glob(f"{path.name}.old-*"))
        if old:
            hint = f" (an earlier save left {old[-1]}; rename it to {path.name} to recover it)"
    raise LmsmithError(f"{path}: no such model directory{hint}; check the path")


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """The raw `config.json` dict of a model directory."""
    path = Path(path)
    _check_dir(path)
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        extra = ""
        if (path / "params.json").is_file():
            extra = (" (params.json is Meta's original format; convert it with transformers' "
                     "convert_llama_weights_to_hf)")
        elif (path / "final" / CONFIG_NAME).is_file() or (path / "checkpoints").is_dir():
            # A run folder: its model is final/ (or, while it trains or after an interrupt, a checkpoint).
            found = path / "final" if (path / "final" / CONFIG_NAME).is_file() else \
                max((path / "checkpoints").glob("step-*[0-9]"), default=None)
            extra = f" (this is a run folder; its model is {found})" if found else " (this is a run folder)"
        raise LmsmithError(f"{cfg_file}: missing; a Hugging Face model directory needs a config.json{extra}")
    check_regular_file(cfg_file, "config.json")
    try:
        hf = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LmsmithError(f"{cfg_file}: not valid JSON ({e}); restore or regenerate the file") from None
    if not isinstance(hf, dict):
        raise LmsmithError(f"{cfg_file}: expected a JSON object, got {type(hf).__name__}")
    return hf


def read_config(path: str | os.PathLike) -> ModelConfig:
    """The `ModelConfig` of a Hugging Face model directory (reads only config.json)."""
    cfg_file = Path(path) / CONFIG_NAME
    return ModelConfig.from_hf(read_hf_config(path), source=str(cfg_file))


def _config_dtype(hf: dict[str, Any]) -> torch.dtype | None:
    name = hf.get("dtype") or hf.get("torch_dtype")
    return _HF_DTYPE_NAMES.get(name) if isinstance(name, str) else None


def weight_files(path: str | os.PathLike) -> dict[str, Path]:
    """Tensor name -> safetensors file holding it, for a model directory.

    Reads `model.safetensors.index.json` when present (its shards must lie inside the directory),
    else the single `model.safetensors` (or, failing that, any `*.safetensors` in the directory).
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    index = path / WEIGHTS_INDEX_NAME
    if index.is_file():
        check_regular_file(index, "safetensors index")
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise LmsmithError(f"{index}: not a valid safetensors index ({e}); regenerate the checkpoint") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise LmsmithError(f"{index}: weight_map must map tensor names to shard file names; "
                               "regenerate the checkpoint")
        out = {}
        root = path.resolve()
        for name, fname in weight_map.items():
            f = path / fname
            if os.path.isabs(fname) or not f.resolve().is_relative_to(root):
                raise LmsmithError(f"{index}: shard {fname!r} lies outside the model directory; a checkpoint's "
                                   "shards are file names inside it")
            if not f.exists():
                raise LmsmithError(f"{f}: shard listed in {index.name} is missing; copy it or re-save the model")
            check_regular_file(f, "safetensors shard")
            out[name] = f
        return out
    files = [path / WEIGHTS_NAME] if (path / WEIGHTS_NAME).exists() else sorted(path.glob("*.safetensors"))
    if not files:
        if any((path / n).exists() for n in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
            raise LmsmithError(
                f"{path / 'pytorch_model.bin'}: pickle weights are not loaded (unsafe); "
                + _CONVERT_HINT.format(d=path)
            )
        raise LmsmithError(f"{path}: no {WEIGHTS_NAME} (or sharded safetensors with {WEIGHTS_INDEX_NAME}) found")
    out = {}
    for f in files:
        check_regular_file(f, "safetensors file")
        try:
            with safe_open(f, framework="pt") as st:
                for name in st.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    out[name] = f
        except (SafetensorError, OSError, ValueError) as e:
            raise LmsmithError(f"{f}: unreadable safetensors file ({e}); re-download or re-save it") from None
    return out


def open_hf_dir(path: str | os.PathLike, *, with_tokenizer: bool = True):
    """A `loader.WeightSource` for a Hugging Face directory: config.json, then every safetensors header
    (names, shapes, dtypes; no tensor data read). Weights of an integer dtype are refused."""
    from safetensors import SafetensorError, safe_open

    from .loader import WeightSource

    path = Path(path)
    hf = read_hf_config(path)
    cfg = ModelConfig.from_hf(hf, source=str(path / CONFIG_NAME))
    files = weight_files(path)
    by_file: dict[Path, list[str]] = {}
    for name, f in files.items():
        by_file.setdefault(f, []).append(name)

    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, torch.dtype] = {}
    for f, names in by_file.items():
        try:
            with safe_open(f, framework="pt") as st:
                keys = set(st.keys())
                for name in names:
                    if name not in keys:
                        raise LmsmithError(f"{f}: tensor {name!r} listed in the index is not in this shard; "
                                           "regenerate the checkpoint")
                    if _IGNORED_KEYS.match(name):
                        continue
                    sl = st.get_slice(name)
                    shapes[name] = tuple(sl.get_shape())
                    dtypes[name] = _st_to_torch_dtype(sl.get_dtype(), f, name)
        except SafetensorError as e:
            raise LmsmithError(f"{f}: corrupt or truncated safetensors file ({e}); re-download or re-save it") \
                from None

    def read(dtype: torch.dtype | None, device: torch.device) -> dict[str, torch.Tensor]:
        # One compute dtype for the whole model: the requested one, else the file's when uniform,
        # else config.json's torch_dtype, else fp32.
        wanted = {n for n in shapes if not (n == "lm_head.weight" and cfg.tie_embeddings)}
        if dtype is None:
            file_dtypes = {dtypes[n] for n in wanted}
            dtype = file_dtypes.pop() if len(file_dtypes) == 1 else (_config_dtype(hf) or torch.float32)
        # Same dtype on CPU: keep the mmap-backed tensor (no copy). Otherwise read each tensor with
        # pread, convert it, and let the read buffer go before the next one.
        state: dict[str, torch.Tensor] = {}
        for f, names in by_file.items():
            names = [n for n in names if n in wanted]
            zero_copy = device.type == "cpu" and all(dtypes[n] == dtype for n in names)
            try:
                with _safe_open(f, "mmap" if zero_copy else "pread") as st:
                    for name in names:
                        t = st.get_tensor(name)
                        state[name] = t if zero_copy else t.to(device=device, dtype=dtype)
            except SafetensorError as e:
                raise LmsmithError(f"{f}: corrupt or truncated safetensors file ({e}); re-download or re-save it") \
                    from None
        return state

    def tokenizer():
        if not with_tokenizer or not (path / TOKENIZER_NAME).is_file():
            return None
        from .tokenizer import Tokenizer

        return Tokenizer.load(path)

    return WeightSource(path=path, where=CONFIG_NAME, config=cfg, shapes=shapes, read=read, tokenizer=tokenizer,
                        files=dict(files), head=_head_of(hf, path))


def _head_of(hf: dict[str, Any], path: Path) -> str:
    """"lm" for a causal LM, "score" for a one-label sequence classifier (a reward model)."""
    if not any(str(a).endswith("ForSequenceClassification") for a in hf.get("architectures") or []):
        return "lm"
    labels = hf.get("num_labels", len(hf.get("id2label") or {}) or 2)
    if labels != 1:
        raise LmsmithError(f"{path / CONFIG_NAME}: a sequence classifier with {labels} labels; lmsmith loads "
                           "one-label classifiers (reward models) only")
    return "score"


@contextlib.contextmanager
def _safe_open(f: Path, backend: str):
    from safetensors import safe_open

    try:
        handle = safe_open(f, framework="pt", backend=backend)
    except TypeError:  # safetensors < 0.7 has no backend argument
        handle = safe_open(f, framework="pt")
    with handle as st:
        yield st


def _st_to_torch_dtype(name: str, f: Path, tensor: str) -> torch.dtype:
    for dt, st in ST_DTYPES.items():
        if st == name and dt.is_floating_point and dt != torch.float64:
            return dt
    raise LmsmithError(f"{f}: tensor {tensor!r} has dtype {name}, which lmsmith does not load "
                       "(expected F32, F16 or BF16)")


# ---------------------------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------------------------


def state_dict_for_save(model: Transformer, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Tensors to write, in model order, under HF names.

    The tied `lm_head.weight` is dropped (transformers re-ties it from
    `tie_word_embeddings`). Tensors are detached but neither copied nor made
    contiguous here: the writer does that one tensor at a time to keep peak
    memory low. With `dtype`, floating-point tensors are converted lazily too.
    """
    sd = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_embeddings:
            continue
        sd[name] = t.detach()
    return sd


def parse_size(size: int | str) -> int:
    """'2GB' -> 2_000_000_000, '500MiB' -> 524_288_000, 1024 -> 1024 (HF's conventions)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(size).upper())
    if not m:
        raise LmsmithError(f"max_shard_size {size!r} is not a size; use e.g. 2GB, 500MB or 1GiB")
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
             "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    if m.group(2) not in units:
        raise LmsmithError(f"max_shard_size {size!r}: unknown unit; use B, KB, MB, GB, KiB, MiB or GiB")
    return int(float(m.group(1)) * units[m.group(2)])


def _plan_shards(tensors: dict[str, torch.Tensor], max_bytes: int, dtype) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        n = tensor_nbytes(t, dtype)
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def _weights_dtype(model: Transformer, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        return dtype
    return model.model.embed_tokens.weight.dtype


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def special_ids(tokenizer) -> dict[str, Any]:
    """bos/eos/pad ids for config.json and generation_config.json (eos is a list when several)."""
    if tokenizer is None:
        return {"bos_id": None, "eos_id": None, "pad_id": None}
    eos_ids = list(getattr(tokenizer, "eos_ids", None) or [])
    eos: int | list[int] | None = getattr(tokenizer, "eos_id", None)
    if len(eos_ids) > 1:
        eos = eos_ids
    return {"bos_id": getattr(tokenizer, "bos_id", None), "eos_id": eos, "pad_id": getattr(tokenizer, "pad_id", None)}


def write_model_files(model: Transformer, tokenizer, directory: str | os.PathLike, *,
                      max_shard_size: int | str = "2GB", dtype: torch.dtype | str | None = None,
                      fetch: Callable[[str], torch.Tensor] | None = None) -> list[str]:
    """Write config, weights, generation config and tokenizer into an existing directory (not atomic).

    Returns the names of the files written. `save` wraps this in an atomic directory swap. `fetch(name)`
    gives the weights of a model left on the meta device, one at a time (`fileio.write_safetensors`).
    """
    from .precision import parse_dtype

    directory = Path(directory)
    dtype = parse_dtype(dtype)
    cfg: ModelConfig = model.config
    ids = special_ids(tokenizer)
    wdtype = _weights_dtype(model, dtype)
    written = []

    hf = cfg.to_hf(bos_id=ids["bos_id"], eos_id=ids["eos_id"], pad_id=ids["pad_id"],
                   torch_dtype=_dtype_name(wdtype))
    if hasattr(model, "adapt_hf_config"):  # another head than the LM's (a reward model's score)
        hf = model.adapt_hf_config(hf)
    write_json(directory / CONFIG_NAME, hf)
    written.append(CONFIG_NAME)

    tensors = state_dict_for_save(model)
    max_bytes = parse_size(max_shard_size)
    shards = _plan_shards(tensors, max_bytes, dtype)
    if len(shards) == 1:
        write_safetensors(tensors, directory / WEIGHTS_NAME, dtype=dtype, fetch=fetch)
        written.append(WEIGHTS_NAME)
    else:
        weight_map, total = {}, 0
        for i, names in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            total += write_safetensors({n: tensors[n] for n in names}, directory / fname, dtype=dtype, fetch=fetch)
            weight_map.update({n: fname for n in names})
            written.append(fname)
        write_json(directory / WEIGHTS_INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
        written.append(WEIGHTS_INDEX_NAME)

    gen = {"bos_token_id": ids["bos_id"], "eos_token_id": ids["eos_id"], "pad_token_id": ids["pad_id"],
           "do_sample": False}
    write_json(directory / GENERATION_CONFIG_NAME, {k: v for k, v in gen.items() if v is not None})
    written.append(GENERATION_CONFIG_NAME)

    if tokenizer is not None:
        before = set(os.listdir(directory))
        tokenizer.save(directory)
        written += sorted(set(os.listdir(directory)) - before)
    return written


def save(model: Transformer, tokenizer, path: str | os.PathLike, *, max_shard_size: int | str = "2GB",
         dtype: torch.dtype | str | None = None,
         extra: Callable[[Path], None] | None = None, fetch: Callable[[str], torch.Tensor] | None = None) -> Path:
    """Save a model (and tokenizer) as a Hugging Face directory, atomically.

    Args:
        model: a `Transformer` (any dtype/device; tensors are moved to CPU one at a time).
        tokenizer: a `Tokenizer` or None (then no tokenizer files and no special ids).
        path: the directory to create or replace.
        max_shard_size: above this the weights are split into HF-named shards with an index
            (an int in bytes or a string like "2GB", "500MiB").
        dtype: convert floating weights to this dtype on the way out; None keeps theirs.
        extra: called with the temporary directory after the model files are written, to
            add more (e.g. the training loop's `train_state/`) inside the same atomic write.
        fetch: for a model on the meta device, reads each weight by name when it is written.

    Returns:
        The final path.
    """
    path = Path(path)
    with atomic_dir(path) as tmp:
        write_model_files(model, tokenizer, tmp, max_shard_size=max_shard_size, dtype=dtype, fetch=fetch)
        if extra is not None:
            extra(tmp)
    return path
