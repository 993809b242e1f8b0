"""Checkpoints as Hugging Face directories: load, save, atomically.

A checkpoint is what `transformers` reads and writes for Llama, Qwen2 and
Mistral models: `config.json`, `model.safetensors` (or
`model-0000i-of-0000n.safetensors` shards plus `model.safetensors.index.json`),
`generation_config.json`, and the tokenizer files. Training state may sit in a
`train_state/` folder beside them, written in the same atomic step (`extra=`).

Loading builds the model on the meta device and assigns tensors straight from
memory-mapped safetensors files. When no dtype conversion is needed the weights
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
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig
from .errors import LmsmithError
from .model import Transformer, build_model

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_NAME = "tokenizer.json"

# Keys some older HF checkpoints carry that are buffers, not weights: skipped silently.
_IGNORED_KEYS = re.compile(r".*rotary_emb\.inv_freq$")

# safetensors dtype strings <-> torch dtypes (the ones a Llama-family checkpoint uses).
_ST_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
_HF_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                   "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

_CONVERT_HINT = (
    "convert it to safetensors first: python -c \"from transformers import AutoModelForCausalLM as A; "
    "A.from_pretrained('{d}').save_pretrained('{d}', safe_serialization=True)\""
)


# ---------------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------------


def load(path: str | os.PathLike, dtype: torch.dtype | str | None = None,
         device: torch.device | str | None = None) -> tuple[Transformer, Any]:
    """Load a model (and its tokenizer, if the directory has one).

    Args:
        path: a Hugging Face model directory (Llama / Qwen2 / Mistral, safetensors
            weights, single file or sharded), or a `.gguf` file.
        dtype: convert weights to this dtype (torch.dtype or "fp32"/"bf16"/"fp16");
            None keeps the dtype of the file (or config.json's `torch_dtype` when the
            file mixes dtypes).
        device: where the weights go; None means CPU.

    Returns:
        `(model, tokenizer)`; tokenizer is None when the directory has no `tokenizer.json`.
        The model is in eval mode.

    Raises:
        LmsmithError: naming the file and the fix, for any unreadable or mismatched input.
    """
    from .precision import parse_dtype

    path = Path(path)
    dtype = parse_dtype(dtype)
    for matches, loader in _LOADERS:
        if matches(path):
            return loader(path, dtype, device)
    raise LmsmithError(f"{path}: not a model directory or a .gguf file")  # pragma: no cover


def _is_gguf(path: Path) -> bool:
    return path.suffix.lower() == ".gguf"


def _load_gguf(path: Path, dtype, device):
    from .quant.gguf import load_gguf

    return load_gguf(path, dtype=dtype, device=device)


def _is_int8(path: Path) -> bool:
    from .quant.int8 import is_int8_dir

    return path.is_dir() and is_int8_dir(path)


def _load_int8(path: Path, dtype, device):
    from .quant.int8 import load_int8

    return load_int8(path, dtype=dtype, device=device)


_LOADERS: list[tuple[Callable[[Path], bool], Callable]] = [
    (_is_gguf, _load_gguf),
    (_is_int8, _load_int8),
    (lambda p: True, lambda p, dtype, device: load_hf_dir(p, dtype=dtype, device=device)),
]


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
        raise LmsmithError(f"{cfg_file}: missing; a Hugging Face model directory needs a config.json{extra}")
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

    Reads `model.safetensors.index.json` when present, else the single
    `model.safetensors` (or, failing that, any `*.safetensors` in the directory).
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    index = path / WEIGHTS_INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise LmsmithError(f"{index}: not a valid safetensors index ({e}); regenerate the checkpoint") from None
        out = {}
        for name, fname in weight_map.items():
            f = path / fname
            if not f.is_file():
                raise LmsmithError(f"{f}: shard listed in {index.name} is missing; copy it or re-save the model")
            out[name] = f
        return out
    files = [path / WEIGHTS_NAME] if (path / WEIGHTS_NAME).is_file() else sorted(path.glob("*.safetensors"))
    if not files:
        if any((path / n).exists() for n in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
            raise LmsmithError(
                f"{path / 'pytorch_model.bin'}: pickle weights are not loaded (unsafe); "
                + _CONVERT_HINT.format(d=path)
            )
        raise LmsmithError(f"{path}: no {WEIGHTS_NAME} (or sharded safetensors with {WEIGHTS_INDEX_NAME}) found")
    out = {}
    for f in files:
        try:
            with safe_open(f, framework="pt") as st:
                for name in st.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    out[name] = f
        except (SafetensorError, OSError, ValueError) as e:
            raise LmsmithError(f"{f}: unreadable safetensors file ({e}); re-download or re-save it") from None
    return out


def load_hf_dir(path: str | os.PathLike, dtype: torch.dtype | None = None,
                device: torch.device | str | None = None, *, with_tokenizer: bool = True
                ) -> tuple[Transformer, Any]:
    """Load a Hugging Face model directory; see `load`."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    hf = read_hf_config(path)
    cfg = ModelConfig.from_hf(hf, source=str(path / CONFIG_NAME))
    files = weight_files(path)
    device = torch.device(device) if device is not None else torch.device("cpu")

    model = build_model(cfg, init=False)  # meta device: nothing allocated yet
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight", None)

    by_file: dict[Path, list[str]] = {}
    for name, f in files.items():
        by_file.setdefault(f, []).append(name)

    # Pass 1: validate names, shapes and dtypes from the headers only (no tensor data read).
    found: dict[str, tuple[Path, torch.dtype]] = {}
    for f, names in by_file.items():
        try:
            with safe_open(f, framework="pt") as st:
                keys = set(st.keys())
                for name in names:
                    if name not in keys:
                        raise LmsmithError(f"{f}: tensor {name!r} listed in the index is not in this shard; "
                                           "regenerate the checkpoint")
                    if _IGNORED_KEYS.match(name) or (name == "lm_head.weight" and cfg.tie_embeddings):
                        continue  # tied head: the embedding is the head
                    if name not in expected:
                        raise LmsmithError(
                            f"{f}: unexpected tensor {name!r} for {cfg.arch} with {cfg.n_layers} layers; "
                            "config.json does not match the weights"
                        )
                    sl = st.get_slice(name)
                    shape = tuple(sl.get_shape())
                    if shape != expected[name]:
                        raise LmsmithError(
                            f"{f}: tensor {name!r} has shape {list(shape)} but config.json implies "
                            f"{list(expected[name])}; config.json does not match the weights"
                        )
                    found[name] = (f, _st_to_torch_dtype(sl.get_dtype(), f, name))
        except SafetensorError as e:
            raise LmsmithError(f"{f}: corrupt or truncated safetensors file ({e}); re-download or re-save it") \
                from None
    missing = [n for n in expected if n not in found]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise LmsmithError(f"{path}: missing tensors {shown}; the checkpoint is incomplete or config.json "
                           "does not match the weights")

    # One compute dtype for the whole model: the requested one, else the file's when uniform,
    # else config.json's torch_dtype, else fp32.
    if dtype is None:
        file_dtypes = {d for _, d in found.values()}
        dtype = file_dtypes.pop() if len(file_dtypes) == 1 else (_config_dtype(hf) or torch.float32)
        if not dtype.is_floating_point:
            dtype = torch.float32

    # Pass 2: read. Same dtype on CPU: keep the mmap-backed tensor (no copy). Otherwise read each
    # tensor with pread, convert it, and let the read buffer go before the next one.
    state: dict[str, torch.Tensor] = {}
    for f, names in by_file.items():
        zero_copy = device.type == "cpu" and all(found[n][1] == dtype for n in names if n in found)
        backend = "mmap" if zero_copy else "pread"
        try:
            with _safe_open(f, backend) as st:
                for name in names:
                    if name not in found:
                        continue
                    t = st.get_tensor(name)
                    if not zero_copy:
                        t = t.to(device=device, dtype=dtype)
                    state[name] = t
        except SafetensorError as e:
            raise LmsmithError(f"{f}: corrupt or truncated safetensors file ({e}); re-download or re-save it") \
                from None

    model.load_state_dict(state, strict=False, assign=True)
    del state
    model.tie_weights()
    model.reset_buffers()
    model.eval()

    tokenizer = None
    if with_tokenizer and (path / TOKENIZER_NAME).is_file():
        from .tokenizer import Tokenizer

        tokenizer = Tokenizer.load(path)
    return model, tokenizer


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
    for dt, st in _ST_DTYPES.items():
        if st == name:
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


def _nbytes(t: torch.Tensor, dtype: torch.dtype | None) -> int:
    return t.numel() * (dtype.itemsize if dtype is not None and t.is_floating_point() else t.element_size())


def write_safetensors(tensors: dict[str, torch.Tensor], file: str | os.PathLike,
                      dtype: torch.dtype | None = None, metadata: dict[str, str] | None = None) -> int:
    """Stream tensors into a safetensors file, one at a time; return bytes of tensor data.

    Why not `safetensors.torch.save_file`: it serialises every tensor to bytes
    first (a second copy of the model in memory) and refuses tensors that share
    a storage, which memory-mapped loads always do.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for name, t in tensors.items():
        out_dtype = dtype if dtype is not None and t.is_floating_point() else t.dtype
        if out_dtype not in _ST_DTYPES:
            raise LmsmithError(f"tensor {name!r}: dtype {out_dtype} cannot be written to safetensors")
        n = _nbytes(t, dtype)
        header[name] = {"dtype": _ST_DTYPES[out_dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    with open(file, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for t in tensors.values():
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            t = t.to("cpu").contiguous()
            if t.numel():
                # uint8 view of the tensor's own memory: no copy unless conversion made one above.
                fh.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return offset


def _plan_shards(tensors: dict[str, torch.Tensor], max_bytes: int, dtype) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        n = _nbytes(t, dtype)
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
                      max_shard_size: int | str = "2GB", dtype: torch.dtype | str | None = None) -> list[str]:
    """Write config, weights, generation config and tokenizer into an existing directory (not atomic).

    Returns the names of the files written. `save` wraps this in an atomic directory swap.
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
    _write_json(directory / CONFIG_NAME, hf)
    written.append(CONFIG_NAME)

    tensors = state_dict_for_save(model)
    max_bytes = parse_size(max_shard_size)
    shards = _plan_shards(tensors, max_bytes, dtype)
    if len(shards) == 1:
        write_safetensors(tensors, directory / WEIGHTS_NAME, dtype=dtype)
        written.append(WEIGHTS_NAME)
    else:
        weight_map, total = {}, 0
        for i, names in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            total += write_safetensors({n: tensors[n] for n in names}, directory / fname, dtype=dtype)
            weight_map.update({n: fname for n in names})
            written.append(fname)
        _write_json(directory / WEIGHTS_INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
        written.append(WEIGHTS_INDEX_NAME)

    gen = {"bos_token_id": ids["bos_id"], "eos_token_id": ids["eos_id"], "pad_token_id": ids["pad_id"],
           "do_sample": False}
    _write_json(directory / GENERATION_CONFIG_NAME, {k: v for k, v in gen.items() if v is not None})
    written.append(GENERATION_CONFIG_NAME)

    if tokenizer is not None:
        before = set(os.listdir(directory))
        tokenizer.save(directory)
        written += sorted(set(os.listdir(directory)) - before)
    return written


def save(model: Transformer, tokenizer, path: str | os.PathLike, *, max_shard_size: int | str = "2GB",
         dtype: torch.dtype | str | None = None,
         extra: Callable[[Path], None] | None = None) -> Path:
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

    Returns:
        The final path.
    """
    path = Path(path)
    with atomic_dir(path) as tmp:
        write_model_files(model, tokenizer, tmp, max_shard_size=max_shard_size, dtype=dtype)
        if extra is not None:
            extra(tmp)
    return path


def _write_json(file: Path, obj: Any) -> None:
    with open(file, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False)
        fh.write("\n")


# ---------------------------------------------------------------------------------------------
# atomic directory writes
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `path` atomically.

    The temporary directory is `<path>.tmp-XXXX` in the same parent (same file
    system, so the rename is atomic). On any exception it is deleted and `path`
    is untouched. An existing `path` is renamed to `<path>.old-XXXX`, the new
    directory renamed in, and the old one deleted; a crash between those two
    renames leaves the previous checkpoint under `<path>.old-XXXX` (which
    `load` points to), never a half-written one under `path`.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LmsmithError(f"{path}: exists and is not a directory; choose another output path")
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{path.name}.tmp-", dir=parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        _make_public(tmp)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_atomic_dir(path: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    """Run `writer(tmpdir)` and atomically move what it wrote to `path` (see `atomic_dir`)."""
    with atomic_dir(path) as tmp:
        writer(tmp)
    return Path(path)


def replace_dir(new: Path, path: Path) -> None:
    """Put directory `new` at `path`, replacing any directory there (rename away, rename in, delete)."""
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f"{path.name}.old-", dir=path.parent))
        os.rmdir(old)  # we only wanted a unique name
        os.rename(path, old)
    os.rename(new, path)
    _fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _make_public(d: Path) -> None:
    # mkdtemp creates 0700; a checkpoint should get the usual permissions.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(d, 0o777 & ~umask)


def _fsync_tree(root: Path) -> None:
    """Flush every file (and directory) under root to disk before the rename makes it visible."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems do not support fsync on directories
    finally:
        os.close(fd)
