"""int8 weight-only checkpoints: a Hugging Face-style directory lmsmith saves and runs packed.

Layout (everything else as in a normal checkpoint: tokenizer files, generation_config.json):

- `config.json`: the model's HF config plus
  `"quantization_config": {"quant_method": "lmsmith_int8", "bits": 8, ...}`;
- `model.safetensors`: every 2-D weight as `<name>.weight` int8 `(out, in)` and
  `<name>.weight_scale` (one float per output row; w ~= q * scale[:, None],
  symmetric, per output channel); norms and biases stay float.

`load_int8` builds the model with the linear layers as packed `QuantLinear("int8")`
modules (1 byte per weight resident) and the embedding dequantized (it is a
table lookup). `checkpoint.load` calls it for directories `is_int8_dir` accepts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

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
    from ..checkpoint import (
        CONFIG_NAME,
        GENERATION_CONFIG_NAME,
        WEIGHTS_NAME,
        _write_json,
        atomic_dir,
        special_ids,
        write_safetensors,
    )

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
        _write_json(tmp / CONFIG_NAME, hf)
        write_safetensors(tensors, tmp / WEIGHTS_NAME, metadata={"quantization": QUANT_METHOD})
        gen = {"bos_token_id": ids["bos_id"], "eos_token_id": ids["eos_id"], "pad_token_id": ids["pad_id"],
               "do_sample": False}
        _write_json(tmp / GENERATION_CONFIG_NAME, {k: v for k, v in gen.items() if v is not None})
        if tokenizer is not None:
            tokenizer.save(tmp)
    return path


@torch.no_grad()
def load_int8(path: str | os.PathLike, dtype: torch.dtype | str | None = None,
              device: torch.device | str | None = None) -> tuple[Any, Any]:
    """Load an int8 directory as `(model, tokenizer)` with packed int8 linear layers.

    `dtype` is the dtype of the float parts (embedding, norms; default float32); the
    linear layers compute in the dtype of their input.
    """
    from safetensors import SafetensorError, safe_open

    from ..checkpoint import TOKENIZER_NAME, WEIGHTS_NAME, read_hf_config
    from ..config import ModelConfig
    from ..model import build_model
    from ..precision import parse_dtype

    path = Path(path)
    dtype = parse_dtype(dtype) or torch.float32
    dev = torch.device(device) if device is not None else torch.device("cpu")
    hf = read_hf_config(path)
    if not is_int8_dir(path):
        raise LmsmithError(f"{path}: config.json has no lmsmith int8 quantization_config; use lmsmith.load")
    cfg = ModelConfig.from_hf(hf, source=str(path / "config.json"))
    model = build_model(cfg, init=False)
    expected = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight", None)
    file = path / WEIGHTS_NAME
    state: dict[str, torch.Tensor] = {}
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    try:
        with safe_open(file, framework="pt") as st:
            keys = set(st.keys())
            for name, shape in expected.items():
                if name not in keys:
                    raise LmsmithError(f"{file}: missing tensor {name!r}; the int8 checkpoint is incomplete")
                t = st.get_tensor(name)
                if tuple(t.shape) != shape:
                    raise LmsmithError(f"{file}: tensor {name!r} has shape {list(t.shape)}, config implies "
                                       f"{list(shape)}")
                if t.dtype == torch.int8:
                    if name + SCALE_SUFFIX not in keys:
                        raise LmsmithError(f"{file}: int8 tensor {name!r} has no {name + SCALE_SUFFIX!r}")
                    scale = st.get_tensor(name + SCALE_SUFFIX).float()
                    module = name.removesuffix(".weight")
                    if module in linears:
                        bias_name = module + ".bias"
                        bias = st.get_tensor(bias_name).to(dev) if bias_name in keys else None
                        out, inp = shape
                        model.set_submodule(module, QuantLinear(inp, out, "int8", t.to(dev), scale.to(dev), bias))
                        continue
                    t = t.float() * scale[:, None]  # the embedding: a lookup table, kept in float
                if name.endswith(".bias") and name.removesuffix(".bias") in linears and \
                        name.removesuffix(".bias") + ".weight" in keys and \
                        st.get_slice(name.removesuffix(".bias") + ".weight").get_dtype() == "I8":
                    continue  # taken by its QuantLinear above
                state[name] = t.to(device=dev, dtype=dtype)
    except SafetensorError as e:
        raise LmsmithError(f"{file}: corrupt or truncated safetensors file ({e})") from None
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.reset_buffers()
    model.eval()
    tokenizer = None
    if (path / TOKENIZER_NAME).is_file():
        from ..tokenizer import Tokenizer

        tokenizer = Tokenizer.load(path)
    return model, tokenizer
