"""int8 weight-only checkpoints: a Hugging Face-style directory lmsmith saves and runs packed.

Layout (everything else as in a normal checkpoint: tokenizer files, generation_config.json):

- `config.json`: the model's HF config plus
  `"quantization_config": {"quant_method": "lmsmith_int8", "bits": 8, ...}`;
- `model.safetensors`: every 2-D weight as `<name>.weight` int8 `(out, in)` and
  `<name>.weight_scale` (one float per output row; w ~= q * scale[:, None],
  symmetric, per output channel); norms and biases stay float.

`open_int8` reads it for `lmsmith.load` (directories `is_int8_dir` accepts): the linear
layers become packed `QuantLinear("int8")` modules (1 byte per weight resident) and the
embedding is dequantized (it is a table lookup).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import LmsmithError
from .linear import QuantLinear, quantize_int8

QUANT_METHOD = "lmsmith_int8"
SCALE_SUFFIX = "_scale"


def is_int8_dir(path: str | os.PathLike) -> bool:
    """True for a directory whose config.json says it holds lmsmith int8 weights."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        hf = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    qc = hf.get("quantization_config") if isinstance(hf, dict) else None
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


def save_int8(model, tokenizer, path: str | os.PathLike, *, scale_dtype: torch.dtype = torch.float32) -> Path:
    """Save `model` with int8 per-channel weights (atomically) as described in the module docstring.

    Returns the directory written.
    """
    from ..checkpoint import CONFIG_NAME, GENERATION_CONFIG_NAME, WEIGHTS_NAME, special_ids
    from ..fileio import atomic_dir, write_json, write_safetensors

    cfg = model.config
    ids = special_ids(tokenizer)
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    quantized = []
    for name, p in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        p = p.detach().cpu()
        if p.ndim == 2:
            q, scale = quantize_int8(p)
            tensors[name] = q
            tensors[name + SCALE_SUFFIX] = scale.to(scale_dtype)
            quantized.append(name)
        else:
            tensors[name] = p.float()
    hf = cfg.to_hf(bos_id=ids["bos_id"], eos_id=ids["eos_id"], pad_id=ids["pad_id"], torch_dtype="float32")
    hf["quantization_config"] = {
        "quant_method": QUANT_METHOD,
        "bits": 8,
        "symmetric": True,
        "granularity": "per_output_channel",
        "scale_suffix": SCALE_SUFFIX,
        "scale_dtype": str(scale_dtype).removeprefix("torch."),
        "quantized_weights": len(quantized),
    }
    with atomic_dir(path) as tmp:
        write_json(tmp / CONFIG_NAME, hf)
        write_safetensors(tensors, tmp / WEIGHTS_NAME, metadata={"quantization": QUANT_METHOD})
        gen = {"bos_token_id": ids["bos_id"], "eos_token_id": ids["eos_id"], "pad_token_id": ids["pad_id"],
               "do_sample": False}
        write_json(tmp / GENERATION_CONFIG_NAME, {k: v for k, v in gen.items() if v is not None})
        if tokenizer is not None:
            tokenizer.save(tmp)
    return path


def open_int8(path: str | os.PathLike):
    """A `loader.WeightSource` for an int8 directory: linear layers become packed `QuantLinear("int8")`
    modules, the embedding is dequantized (a lookup table), norms and biases stay float.

    The dtype given to the loader is that of the float parts (default float32); the packed
    layers compute in the dtype of their input.
    """
    from safetensors import SafetensorError, safe_open

    from ..checkpoint import CONFIG_NAME, TOKENIZER_NAME, WEIGHTS_NAME, read_hf_config
    from ..config import ModelConfig
    from ..fileio import check_regular_file
    from ..loader import WeightSource

    path = Path(path)
    hf = read_hf_config(path)
    if not is_int8_dir(path):
        raise LmsmithError(f"{path}: config.json has no lmsmith int8 quantization_config; use lmsmith.load")
    cfg = ModelConfig.from_hf(hf, source=str(path / CONFIG_NAME))
    file = path / WEIGHTS_NAME
    check_regular_file(file, "int8 weight file")
    shapes, kinds = {}, {}
    try:
        with safe_open(file, framework="pt") as st:
            keys = set(st.keys())
            for name in keys:
                if name.endswith(SCALE_SUFFIX):
                    continue
                sl = st.get_slice(name)
                shapes[name], kinds[name] = tuple(sl.get_shape()), sl.get_dtype()
                if kinds[name] == "I8":
                    scale = name + SCALE_SUFFIX
                    if scale not in keys or tuple(st.get_slice(scale).get_shape()) != shapes[name][:1]:
                        raise LmsmithError(f"{file}: int8 tensor {name!r} has no {scale!r} of one value per row")
                elif kinds[name] not in ("F32", "F16", "BF16"):
                    raise LmsmithError(f"{file}: tensor {name!r} has dtype {kinds[name]}; an int8 checkpoint "
                                       "holds I8 weights and float norms, biases and scales")
    except SafetensorError as e:
        raise LmsmithError(f"{file}: corrupt or truncated safetensors file ({e})") from None
    packed_weights = [n for n, k in kinds.items() if k == "I8" and n != "model.embed_tokens.weight"]
    packed_biases = {n.removesuffix(".weight") + ".bias" for n in packed_weights}

    def tensor(st, name: str) -> torch.Tensor:
        t = st.get_tensor(name)
        if kinds[name] == "I8":
            t = t.float() * st.get_tensor(name + SCALE_SUFFIX).float()[:, None]
        return t

    def packed(dtype: torch.dtype | None, device: torch.device) -> dict[str, torch.nn.Module]:
        modules = {}
        with safe_open(file, framework="pt") as st:
            for name in packed_weights:
                module, bias = name.removesuffix(".weight"), name.removesuffix(".weight") + ".bias"
                out, inp = shapes[name]
                modules[module] = QuantLinear(inp, out, "int8", st.get_tensor(name).to(device),
                                              st.get_tensor(name + SCALE_SUFFIX).float().to(device),
                                              st.get_tensor(bias).to(device) if bias in kinds else None)
        return modules

    def read(dtype: torch.dtype | None, device: torch.device) -> dict[str, torch.Tensor]:
        with safe_open(file, framework="pt") as st:
            return {n: tensor(st, n).to(device=device, dtype=dtype or torch.float32) for n in shapes
                    if n not in packed_weights and n not in packed_biases}

    def tokenizer():
        if not (path / TOKENIZER_NAME).is_file():
            return None
        from ..tokenizer import Tokenizer

        return Tokenizer.load(path)

    return WeightSource(path=file, where=CONFIG_NAME, config=cfg, shapes=shapes, read=read, packed=packed,
                        tokenizer=tokenizer)
