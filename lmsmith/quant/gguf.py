"""GGUF files: export a model (and its tokenizer) for llama.cpp, and load GGUF files back.

Export maps our Hugging Face parameter names to llama.cpp's tensor names
(`token_embd`, `blk.N.attn_q`, ...), chooses each tensor's type with
`plan_mix` (llama.cpp's per-tensor mixes), quantizes with our own block codecs
and streams the tensors through the `gguf` package's `GGUFWriter`, one at a time.

Two layout facts decide whether llama.cpp computes the same function:

- llama.cpp's `llama` architecture applies RoPE to *adjacent* pairs (GPT-J
  style); HF checkpoints pair dimension i with i + Dh/2 (`rotate_half`). The
  converter therefore permutes the rows of q and k inside each head so that
  the halves are interleaved (k with the KV head count). We do the same and
  undo it on load.
- llama.cpp's `qwen2` architecture uses NEOX RoPE, which *is* the HF layout:
  no permutation. We write `qwen2` for models with q/k/v bias.

Llama-3 rope scaling is stored as llama.cpp stores it: a `rope_freqs.weight`
tensor of per-frequency divisors (plus lmsmith.* keys with the exact
parameters, so our own loader does not have to infer them).

Loading reads GGUF files written by us or by llama.cpp's `convert_hf_to_gguf.py`
(llama / qwen2 architecture, any type our `dequantize` knows), after checking
the whole header against the file size first: a truncated or corrupt file is
an `LmsmithError`, never an out-of-bounds read or a hang.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ModelConfig
from ..errors import LmsmithError
from ..fileio import atomic_path, check_regular_file
from .blocks import QType, as_qtype, dequantize, quantize, type_info
from .gptq import gptq_quantize
from .imatrix import for_tensor
from .mixes import plan_mix, scheme_names

SUPPORTED_ARCHS = ("llama", "qwen2")

# scheme -> llama.cpp's general.file_type (LlamaFileType)
FILE_TYPES = {
    "f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "q3_k_m": 12, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18, "bf16": 32,
}

# GGUF token types (gguf.TokenType)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

_GGUF_MAGIC = b"GGUF"
# GGUF value types: id -> byte size of a scalar (8 = string, 9 = array are handled apart)
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


def _gguf():
    try:
        import gguf
    except ImportError:
        raise LmsmithError("GGUF support needs the `gguf` package: pip install gguf") from None
    return gguf


# ---------------------------------------------------------------------------------------------
# names and layouts
# ---------------------------------------------------------------------------------------------

_LAYER_MAP = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL_MAP = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def gguf_name(hf_name: str) -> str:
    """llama.cpp's tensor name for one of our (Hugging Face) parameter names."""
    if hf_name in _GLOBAL_MAP:
        return _GLOBAL_MAP[hf_name]
    parts = hf_name.split(".", 3)  # model, layers, i, rest
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _LAYER_MAP:
        return f"blk.{parts[2]}.{_LAYER_MAP[parts[3]]}"
    raise LmsmithError(f"parameter {hf_name!r} has no GGUF name; only Llama-family decoders can be exported")


def hf_name(gguf_tensor: str) -> str | None:
    """Our parameter name for a llama.cpp tensor name (None for tensors we do not load, e.g. rope_freqs)."""
    for k, v in _GLOBAL_MAP.items():
        if v == gguf_tensor:
            return k
    parts = gguf_tensor.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
        for k, v in _LAYER_MAP.items():
            if v == parts[2]:
                return f"model.layers.{parts[1]}.{k}"
    return None


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotary layout -> llama.cpp's interleaved one: within each head, rows (i, i + Dh/2) become adjacent."""
    shape = w.shape
    return w.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of `permute_qk`."""
    shape = w.shape
    return w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def llama3_rope_factors(cfg: ModelConfig) -> np.ndarray:
    """Per-frequency divisors (Dh/2,) for Llama-3 rope scaling, as llama.cpp's `rope_freqs.weight` holds them."""
    rs = cfg.rope_scaling
    hd = cfg.head_dim
    freqs = 1.0 / (cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old = rs["original_max_position_embeddings"]
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


def _fit_llama3_scaling(factors: np.ndarray, rope_theta: float, head_dim: int, max_seq_len: int) -> dict:
    """Recover Llama-3 scaling parameters from a foreign file's rope_freqs (llama.cpp stores only the factors).

    In the blended band 1/f = (1 - s)/factor + s with s linear in 1/wavelength; two band
    points fix that line, and low_freq_factor = 1 (what every Llama-3 release uses) fixes the rest.
    """
    factors = np.asarray(factors, np.float64)
    factor = float(factors.max())
    if factor <= 1.0 + 1e-6:
        return {}
    freqs = 1.0 / (rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    inv_wavelen = freqs / (2 * math.pi)
    mid = (factors > 1.0 + 1e-4) & (factors < factor * (1 - 1e-4))
    rs = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
    if mid.sum() >= 2:
        s = (1.0 / factors[mid] - 1.0 / factor) / (1.0 - 1.0 / factor)
        a, b = np.polyfit(inv_wavelen[mid], s, 1)  # s = a / wavelen + b = (old/wavelen - low)/(high - low)
        if b < 0:
            high = 1.0 - 1.0 / b
            rs.update(high_freq_factor=float(high), original_max_position_embeddings=int(round(-a / b)))
    return rs


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------


@dataclass
class ExportSummary:
    """What `export_gguf` wrote: per-tensor types, fallbacks, sizes."""

    path: Path
    scheme: str
    arch: str
    types: dict[str, QType]
    fallbacks: dict[str, tuple[QType, QType]]
    n_params: int
    tensor_bytes: int
    file_bytes: int
    seconds: float
    type_counts: dict[str, int] = field(default_factory=dict)

    @property
    def bits_per_weight(self) -> float:
        """Tensor data bits per parameter (metadata excluded)."""
        return 8.0 * self.tensor_bytes / max(self.n_params, 1)


def _gguf_arch(cfg: ModelConfig) -> str:
    # qwen2 in llama.cpp: NEOX rope + q/k/v bias. A biased model with Llama-3 rope scaling
    # stays llama (llama.cpp's llama arch loads optional q/k/v biases and rope_freqs).
    return "qwen2" if cfg.qkv_bias and cfg.rope_scaling is None else "llama"


def _tokenizer_metadata(tokenizer, n_vocab: int) -> dict[str, Any]:
    """tokens / types / merges / special ids in llama.cpp's "gpt2" (byte-level BPE) form."""
    spec = json.loads(tokenizer.backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise LmsmithError(
            f"tokenizer model {model.get('type')!r} cannot be written to GGUF by lmsmith (only byte-level BPE)"
        )
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    added = tokenizer.backend.get_added_tokens_decoder()
    if vocab and max(vocab.values()) >= n_vocab:
        raise LmsmithError(
            f"tokenizer has ids up to {max(vocab.values())} but the model has only {n_vocab} embedding rows"
        )
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]  # holes: llama.cpp's converter fills them so
    types = [_UNUSED] * n_vocab
    for tok, i in vocab.items():
        tokens[i] = tok
        types[i] = _NORMAL
    for i, t in added.items():
        types[i] = _CONTROL if t.special else _USER_DEFINED
    merges = []
    for m in model.get("merges") or []:
        merges.append(m if isinstance(m, str) else " ".join(m))
    return {"tokens": tokens, "types": types, "merges": merges}


def export_gguf(model, tokenizer, path: str | os.PathLike, scheme: str = "f16", *, name: str | None = None,
                progress: bool = True, imatrix: dict[str, np.ndarray] | None = None,
                hessians: dict[str, np.ndarray] | None = None) -> ExportSummary:
    """Write `model` (+ tokenizer) as a GGUF file llama.cpp runs.

    Args:
        model: a `lmsmith` Transformer (any dtype; tensors are converted one at a time).
        tokenizer: a byte-level BPE `Tokenizer`, or None (then llama.cpp cannot run the file,
            but lmsmith can load it).
        path: the `.gguf` file to write (written to a temporary sibling, then renamed).
        scheme: one of `scheme_names()` (f32, f16, bf16, q8_0, q6_k, q5_k_m, q4_k_m, q4_0, q3_k_m).
        name: `general.name` (default: the file stem).
        progress: show a progress bar over tensors.
        imatrix: `{GGUF tensor name: importance (cols,)}` (`quant.imatrix.collect` / `.load`): the
            K-quant tensors it covers are quantized to minimise the importance-weighted error
            (calibrated, as llama-quantize --imatrix); the file's types and sizes do not change.
        hessians: `{GGUF tensor name: sum x x^T (cols, cols)}` (`imatrix.collect(hessians=True)`):
            those tensors are quantized with error compensation between block spans (`gptq.py`).

    Returns:
        An `ExportSummary` with each tensor's type, the fallbacks taken and the sizes.
    """
    import time

    gguf = _gguf()
    key = str(scheme).lower()
    if key not in scheme_names():
        raise LmsmithError(f"unknown GGUF scheme {scheme!r}; known schemes: {', '.join(scheme_names())}")
    cfg: ModelConfig = model.config
    path = Path(path)
    arch = _gguf_arch(cfg)
    t0 = time.perf_counter()

    # Our tensors in llama.cpp order, with their GGUF names (tied head: no output.weight).
    params = dict(model.state_dict())
    if cfg.tie_embeddings:
        params.pop("lm_head.weight", None)
    names = {gguf_name(n): n for n in params}
    shapes = {g: tuple(params[n].shape) for g, n in names.items()}
    plan = plan_mix(key, shapes, cfg.n_layers, n_head=cfg.n_heads, n_head_kv=cfg.n_kv_heads)
    types = dict(plan.types)

    with atomic_path(path) as tmp:  # fsynced, then renamed into place: never a half-written .gguf
        writer = gguf.GGUFWriter(str(tmp), arch)
        try:
            writer.add_name(name or path.stem)
            writer.add_file_type(FILE_TYPES[key])
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            writer.add_context_length(cfg.max_seq_len)
            writer.add_embedding_length(cfg.dim)
            writer.add_block_count(cfg.n_layers)
            writer.add_feed_forward_length(cfg.hidden_dim)
            writer.add_head_count(cfg.n_heads)
            writer.add_head_count_kv(cfg.n_kv_heads)
            writer.add_layer_norm_rms_eps(cfg.norm_eps)
            writer.add_rope_freq_base(cfg.rope_theta)
            writer.add_rope_dimension_count(cfg.head_dim)
            if cfg.head_dim != cfg.dim // cfg.n_heads:
                writer.add_key_length(cfg.head_dim)
                writer.add_value_length(cfg.head_dim)
            writer.add_vocab_size(cfg.vocab_size)
            if cfg.rope_scaling is not None:
                for k, v in cfg.rope_scaling.items():
                    if k != "rope_type":
                        writer.add_float32(f"lmsmith.rope_scaling.{k}", float(v))
            if tokenizer is not None:
                meta = _tokenizer_metadata(tokenizer, cfg.vocab_size)
                writer.add_tokenizer_model("gpt2")
                writer.add_tokenizer_pre(tokenizer.pre_tokenizer_name or "default")
                writer.add_token_list(meta["tokens"])
                writer.add_token_types(meta["types"])
                writer.add_token_merges(meta["merges"])
                for setter, value in ((writer.add_bos_token_id, tokenizer.bos_id),
                                      (writer.add_eos_token_id, tokenizer.eos_id),
                                      (writer.add_pad_token_id, tokenizer.pad_id)):
                    if value is not None:
                        setter(int(value))
                writer.add_add_bos_token(bool(tokenizer.add_bos))
                writer.add_add_eos_token(False)
                if tokenizer.chat_template:
                    writer.add_chat_template(tokenizer.chat_template)

            # Tensor infos first (the header needs every size), then the data streamed one tensor at a time.
            order = list(names)
            extra: dict[str, np.ndarray] = {}
            if cfg.rope_scaling is not None:
                extra["rope_freqs.weight"] = llama3_rope_factors(cfg)
                types["rope_freqs.weight"] = QType.F32
            for g in [*extra, *order]:
                shape = extra[g].shape if g in extra else shapes[g]
                qt = types[g]
                rows_shape = shape if len(shape) == 2 else (1, shape[-1])
                nbytes = rows_shape[0] * type_info(qt).row_bytes(rows_shape[1])
                writer.add_tensor_info(g, shape, np.dtype(np.float32), nbytes,
                                       raw_dtype=gguf.GGMLQuantizationType(int(qt)))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()

            bar = _bar(len(extra) + len(order), progress, f"GGUF {key}")
            tensor_bytes = 0
            for g in [*extra, *order]:
                if g in extra:
                    arr = extra[g]
                else:
                    arr = params[names[g]].detach().to("cpu", torch.float32).numpy()
                    if arch == "llama" and g.endswith(("attn_q.weight", "attn_q.bias")):
                        arr = permute_qk(arr, cfg.n_heads)
                    elif arch == "llama" and g.endswith(("attn_k.weight", "attn_k.bias")):
                        arr = permute_qk(arr, cfg.n_kv_heads)
                qt = types[g]
                importance = for_tensor(imatrix, g, arr.shape[-1]) if arr.ndim == 2 else None
                if hessians is not None and g in hessians and arr.ndim == 2 and type_info(qt).block_size > 1:
                    data = gptq_quantize(arr, qt, hessians[g], importance).reshape(-1)
                else:
                    data = quantize(arr.reshape(-1, arr.shape[-1]), qt, importance).reshape(-1)
                tensor_bytes += data.nbytes
                writer.write_tensor_data(data)
                bar.update(1)
            bar.close()
            writer.close()
        except BaseException:
            writer.close()
            raise

    counts: dict[str, int] = {}
    for g in order:
        counts[types[g].name] = counts.get(types[g].name, 0) + 1
    n_params = sum(int(np.prod(s)) for s in shapes.values())
    return ExportSummary(path=path, scheme=key, arch=arch, types={g: types[g] for g in order},
                         fallbacks=dict(plan.fallbacks), n_params=n_params, tensor_bytes=tensor_bytes,
                         file_bytes=path.stat().st_size, seconds=time.perf_counter() - t0, type_counts=counts)


def _bar(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, dynamic_ncols=True, file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# reading: validate first, then GGUFReader
# ---------------------------------------------------------------------------------------------


def _validate(path: Path) -> None:
    """Walk the GGUF header with explicit bounds checks, so GGUFReader never sees a malformed file.

    GGUFReader trusts counts and lengths (a corrupt array length makes it loop for
    ever; a truncated file gives numpy errors deep inside). Here every count is
    checked against the bytes that remain before it is used, and every tensor's
    data range against the file size.
    """
    size = path.stat().st_size
    if size < 24:
        raise LmsmithError(f"{path}: not a GGUF file (only {size} bytes); re-export or re-download it")
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if mm[:4] != _GGUF_MAGIC:
            raise LmsmithError(f"{path}: not a GGUF file (bad magic {bytes(mm[:4])!r})")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", mm, 4)
        if version not in (2, 3):
            raise LmsmithError(f"{path}: GGUF version {version} is not supported (2 or 3)")
        pos = 24

        def need(n: int, what: str) -> None:
            if n < 0 or pos + n > size:
                raise LmsmithError(f"{path}: truncated or corrupt GGUF header ({what} runs past the end of the "
                                   f"{size}-byte file); re-export or re-download it")

        def read(fmt: str, what: str):
            nonlocal pos
            n = struct.calcsize(fmt)
            need(n, what)
            out = struct.unpack_from(fmt, mm, pos)
            pos += n
            return out[0] if len(out) == 1 else out

        def string(what: str) -> bytes:
            nonlocal pos
            n = read("<Q", what)
            need(n, what)
            s = mm[pos:pos + n]
            pos += n
            return s

        def value(vtype: int, what: str, depth: int = 0) -> None:
            nonlocal pos
            if vtype in _SCALAR_SIZES:
                need(_SCALAR_SIZES[vtype], what)
                pos += _SCALAR_SIZES[vtype]
            elif vtype == _STRING:
                string(what)
            elif vtype == _ARRAY and depth == 0:
                itype, count = read("<IQ", what)
                if itype in _SCALAR_SIZES:
                    need(count * _SCALAR_SIZES[itype], what)
                    pos += count * _SCALAR_SIZES[itype]
                elif itype == _STRING:
                    need(count * 8, what)  # every string has at least its 8-byte length
                    for _ in range(count):
                        string(what)
                else:
                    raise LmsmithError(f"{path}: corrupt GGUF metadata ({what} has array type {itype})")
            else:
                raise LmsmithError(f"{path}: corrupt GGUF metadata ({what} has value type {vtype})")

        if n_kv > size // 13 or n_tensors > size // 24:  # smallest possible kv / tensor-info entries
            raise LmsmithError(f"{path}: corrupt GGUF header ({n_kv} keys, {n_tensors} tensors in {size} bytes)")
        alignment = 32
        for i in range(n_kv):
            key = string(f"key {i}")
            vtype = read("<I", f"key {i}")
            start = pos
            value(vtype, f"value of {key[:64]!r}")
            if key == b"general.alignment" and vtype == 4:
                alignment = struct.unpack_from("<I", mm, start)[0]
                if alignment == 0 or alignment & (alignment - 1):
                    raise LmsmithError(f"{path}: corrupt GGUF header (alignment {alignment})")
        infos = []
        for i in range(n_tensors):
            tname = string(f"tensor info {i}")
            n_dims = read("<I", f"tensor info {i}")
            if not 1 <= n_dims <= 4:
                raise LmsmithError(f"{path}: corrupt GGUF tensor info ({tname[:64]!r} has {n_dims} dimensions)")
            dims = [read("<Q", f"tensor info {i}") for _ in range(n_dims)]
            ttype, offset = read("<IQ", f"tensor info {i}")
            infos.append((tname, dims, ttype, offset))
        data_start = pos + (-pos % alignment)
        gguf = _gguf()
        ranges = []
        for tname, dims, ttype, offset in infos:
            try:
                block, tsize = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)]
            except (ValueError, KeyError):
                raise LmsmithError(f"{path}: tensor {tname.decode(errors='replace')!r} has unknown type {ttype}") \
                    from None
            n = math.prod(dims)
            if any(d == 0 for d in dims) or dims[0] % block:
                raise LmsmithError(f"{path}: corrupt GGUF tensor info for {tname.decode(errors='replace')!r} "
                                   f"(shape {dims})")
            end = data_start + offset + n // block * tsize
            if end > size:
                raise LmsmithError(
                    f"{path}: truncated GGUF file: tensor {tname.decode(errors='replace')!r} needs bytes up to "
                    f"{end} but the file has {size}; re-export or re-download it"
                )
            if offset % alignment:
                raise LmsmithError(f"{path}: corrupt GGUF tensor info: {tname.decode(errors='replace')!r} starts at "
                                   f"offset {offset}, not a multiple of the alignment {alignment}")
            ranges.append((data_start + offset, end, tname))
        ranges.sort()
        for (_, end_a, a), (start_b, _, b) in zip(ranges, ranges[1:]):
            if start_b < end_a:
                raise LmsmithError(f"{path}: corrupt GGUF tensor info: {b.decode(errors='replace')!r} overlaps "
                                   f"{a.decode(errors='replace')!r}; re-export or re-download it")
        if len({name for _, _, name in ranges}) != len(ranges):
            raise LmsmithError(f"{path}: corrupt GGUF tensor info: a tensor name appears twice")


def read_gguf(path: str | os.PathLike):
    """Open a GGUF file with `gguf.GGUFReader` after validating it; errors become `LmsmithError`."""
    gguf = _gguf()
    path = Path(path)
    check_regular_file(path, "GGUF file")  # a FIFO or device would block the reader
    _validate(path)
    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, KeyError, IndexError, TypeError, OverflowError, OSError, UnicodeDecodeError) as e:
        raise LmsmithError(f"{path}: corrupt GGUF file ({e}); re-export or re-download it") from None


def gguf_metadata(reader) -> dict[str, Any]:
    """All key/value metadata of a `GGUFReader` as Python values (strings decoded, arrays as lists)."""
    out = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            out[key] = f.contents()
        except (ValueError, IndexError, UnicodeDecodeError) as e:
            raise LmsmithError(f"corrupt GGUF metadata value for {key!r} ({e})") from None
    return out


def _config_from_metadata(meta: dict[str, Any], tensors: dict[str, Any], path: Path) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise LmsmithError(f"{path}: GGUF architecture {arch!r} is not supported; supported: "
                           f"{', '.join(SUPPORTED_ARCHS)}")

    def get(key: str, default: Any = None, required: bool = True):
        v = meta.get(f"{arch}.{key}", default)
        if v is None and required:
            raise LmsmithError(f"{path}: GGUF metadata {arch}.{key} is missing")
        if v is not None and (isinstance(v, (str, bytes, list, bool)) or
                              (isinstance(v, float) and not math.isfinite(v))):
            raise LmsmithError(f"{path}: GGUF metadata {arch}.{key} = {str(v)[:40]!r} is not a finite number")
        return v

    if "token_embd.weight" not in tensors:
        raise LmsmithError(f"{path}: GGUF file has no token_embd.weight tensor")
    dim = int(get("embedding_length"))
    n_heads = int(get("attention.head_count"))
    head_dim = get("attention.key_length", required=False) or get("rope.dimension_count", required=False)
    vocab = int(tensors["token_embd.weight"][0][0])  # (vocab, dim) in numpy order
    rope_theta = float(get("rope.freq_base", 10000.0))
    n_layers = int(get("block_count"))
    rs = None
    if "lmsmith.rope_scaling.factor" in meta:
        rs = {"rope_type": "llama3", **{k[len("lmsmith.rope_scaling."):]: float(v) for k, v in meta.items()
                                        if k.startswith("lmsmith.rope_scaling.")}}
        rs["original_max_position_embeddings"] = int(rs["original_max_position_embeddings"])
    elif "rope_freqs.weight" in tensors:
        hd = int(head_dim or dim // n_heads)
        fshape, ftype, ft = tensors["rope_freqs.weight"]
        rs = _fit_llama3_scaling(_dequant_tensor(ft.data, ftype, fshape), rope_theta, hd, int(get("context_length")))
        rs = rs or None
    return ModelConfig(
        vocab_size=vocab,
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=int(get("attention.head_count_kv", n_heads)),
        hidden_dim=int(get("feed_forward_length")),
        max_seq_len=int(get("context_length", 2048)),
        head_dim=int(head_dim) if head_dim else None,
        norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=rope_theta,
        rope_scaling=rs,
        tie_embeddings="output.weight" not in tensors,
        qkv_bias="blk.0.attn_q.bias" in tensors,
        arch="qwen2" if arch == "qwen2" else "llama",
    )


def open_gguf(path: str | os.PathLike, packed: bool = False):
    """A `loader.WeightSource` for a GGUF file (ours, or llama.cpp's converter's).

    The header is validated first (every count, length and tensor range against the file size);
    the config is rebuilt from the metadata and the tokenizer from tokens + merges + pre-tokenizer
    name. Every tensor is dequantized with lmsmith's own codecs to float32 (then the loader's dtype,
    default float32), q/k un-permuted for the llama architecture. With `packed`, every matrix of a
    block type (Q8_0, Q4_0, Q5_0, Q5_1, Q3_K..Q6_K) keeps its bytes instead, as a `QuantLinear`
    (or `QuantEmbedding` for the token table, which a tied head then shares); q/k rows are
    un-permuted as bytes. The tokenizer is None (with a warning) when the file's tokenizer is not
    byte-level BPE with a pre-tokenizer lmsmith knows.
    """
    from ..loader import WeightSource

    path = Path(path)
    reader = read_gguf(path)
    meta = gguf_metadata(reader)
    # name -> (numpy shape with the row length last, ggml type, the reader's tensor)
    tensors: dict[str, tuple[tuple[int, ...], int, Any]] = {}
    for t in reader.tensors:
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        ttype = int(t.tensor_type)
        try:
            as_qtype(ttype)
        except LmsmithError:
            raise LmsmithError(f"{path}: tensor {t.name!r} has GGUF type {ttype}, which lmsmith cannot dequantize; "
                               f"supported: {', '.join(q.name for q in QType)}") from None
        tensors[t.name] = (shape, ttype, t)
    cfg = _config_from_metadata(meta, tensors, path)
    arch = meta["general.architecture"]
    by_hf: dict[str, str] = {}
    for g in tensors:
        n = hf_name(g)
        if n is None:
            if g == "rope_freqs.weight":
                continue
            raise LmsmithError(f"{path}: unexpected tensor {g!r} for a {arch} model")
        by_hf[n] = g

    def hf_layout(arr: np.ndarray, g: str) -> np.ndarray:
        """Rows of a tensor in our (Hugging Face) order: llama's q/k rows are interleaved in the file."""
        if arch == "llama" and g.endswith(("attn_q.weight", "attn_q.bias")):
            return unpermute_qk(arr, cfg.n_heads)
        if arch == "llama" and g.endswith(("attn_k.weight", "attn_k.bias")):
            return unpermute_qk(arr, cfg.n_kv_heads)
        return arr

    from .linear import PACKED_FORMATS

    kept = {n for n, g in by_hf.items() if packed and n.endswith(".weight") and len(tensors[g][0]) == 2
            and QType(tensors[g][1]).name.lower() in PACKED_FORMATS}
    biases = {n.removesuffix(".weight") + ".bias" for n in kept} & set(by_hf)

    def tensor(n: str, dtype: torch.dtype | None, device: torch.device) -> torch.Tensor:
        shape, ttype, t = tensors[by_hf[n]]
        arr = hf_layout(_dequant_tensor(t.data, ttype, shape), by_hf[n])
        return torch.from_numpy(np.ascontiguousarray(arr)).to(device=device, dtype=dtype or torch.float32)

    def read(dtype: torch.dtype | None, device: torch.device) -> dict[str, torch.Tensor]:
        return {n: tensor(n, dtype, device) for n in by_hf if n not in kept and n not in biases}

    def packed_modules(dtype: torch.dtype | None, device: torch.device) -> dict[str, torch.nn.Module]:
        from .linear import QuantEmbedding, QuantLinear

        modules: dict[str, torch.nn.Module] = {}
        for n in sorted(kept):
            (rows, cols), ttype, t = tensors[by_hf[n]]
            data = hf_layout(np.asarray(t.data, dtype=np.uint8).reshape(rows, -1), by_hf[n])
            qweight = torch.from_numpy(np.array(data, dtype=np.uint8)).to(device)  # a copy: the file is closed after
            fmt, name = QType(ttype).name.lower(), n.removesuffix(".weight")
            if name == "model.embed_tokens":
                modules[name] = QuantEmbedding(rows, cols, fmt, qweight, dtype=dtype or torch.float32)
                if cfg.tie_embeddings:
                    modules["lm_head"] = QuantLinear(cols, rows, fmt, qweight)
            else:
                bias = tensor(f"{name}.bias", None, device) if f"{name}.bias" in biases else None
                modules[name] = QuantLinear(cols, rows, fmt, qweight, bias=bias)
        return modules

    return WeightSource(path=path, where="GGUF metadata", config=cfg,
                        shapes={n: tensors[g][0] for n, g in by_hf.items()}, read=read,
                        packed=packed_modules if kept else None,
                        tokenizer=lambda: tokenizer_from_metadata(meta, path))


def _dequant_tensor(data: np.ndarray, ttype: int, shape: tuple[int, ...]) -> np.ndarray:
    """float32 values of one GGUF tensor (our own dequantize, so every type is read the same way)."""
    data = np.asarray(data)
    rows_shape = tuple(shape) if len(shape) == 2 else (int(np.prod(shape[:-1])), shape[-1])
    return dequantize(data, as_qtype(ttype), rows_shape).reshape(shape)


# ---------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------


def _pre_tokenizer(name: str):
    from tokenizers import Regex, pre_tokenizers

    from ..tokenizer import LLAMA3_PRETOKENIZE_REGEX, qwen2_pre_tokenizer

    if name == "qwen2":
        return qwen2_pre_tokenizer()
    if name in ("llama-bpe", "llama3", "smaug-bpe", "dbrx"):
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    if name in ("gpt-2", "gpt2", "default"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return None


KNOWN_PRE_TOKENIZERS = ("qwen2", "llama-bpe", "smaug-bpe", "gpt-2", "default")


def tokenizer_from_metadata(meta: dict[str, Any], path: Path | str = "GGUF"):
    """Rebuild a `lmsmith.tokenizer.Tokenizer` from GGUF tokenizer metadata, or None (with a warning)."""
    from tokenizers import AddedToken, decoders, models
    from tokenizers import Tokenizer as HFTokenizer

    from ..tokenizer import Tokenizer

    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is None:
        return None
    kind = meta.get("tokenizer.ggml.model")
    pre = meta.get("tokenizer.ggml.pre", "default")
    pre_tok = _pre_tokenizer(pre) if kind == "gpt2" else None
    if pre_tok is None:
        warnings.warn(f"{path}: tokenizer {kind!r} with pre-tokenizer {pre!r} cannot be rebuilt by lmsmith "
                      f"(byte-level BPE with pre-tokenizer {', '.join(KNOWN_PRE_TOKENIZERS)}); "
                      "loading the model without a tokenizer", stacklevel=3)
        return None
    types = list(meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens))
    if not isinstance(tokens, list) or len(types) != len(tokens) or not all(isinstance(t, str) for t in tokens):
        raise LmsmithError(f"{path}: corrupt GGUF tokenizer metadata (tokens and token types disagree); "
                           "re-export or re-download the file")
    vocab = {tok: i for i, (tok, ty) in enumerate(zip(tokens, types)) if ty != _UNUSED}
    try:
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
        backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, byte_fallback=False))
    except Exception as e:  # tokenizers raises bare Exception for inconsistent vocab/merges
        raise LmsmithError(f"{path}: corrupt GGUF tokenizer metadata ({str(e).splitlines()[0][:120]}); "
                           "re-export or re-download the file") from None
    backend.normalizer = None
    backend.pre_tokenizer = pre_tok
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = None
    # Added tokens in id order: control = special (matched in text, skipped by decode(skip_special)),
    # user-defined = matched in text, kept.
    specials = [AddedToken(tokens[i], special=True, normalized=False) for i, ty in enumerate(types) if ty == _CONTROL]
    user = [AddedToken(tokens[i], special=False, normalized=False) for i, ty in enumerate(types)
            if ty == _USER_DEFINED]
    if specials:
        backend.add_special_tokens(specials)
    if user:
        backend.add_tokens(user)

    def tok(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    config = {"add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False))}
    return Tokenizer(backend, bos_token=tok("bos"), eos_token=tok("eos"), pad_token=tok("padding"),
                     chat_template=meta.get("tokenizer.chat_template"), pre_tokenizer_name=pre, config=config)
