"""The one loader: every on-disk format is a `WeightSource`; one sequence turns a source into a model.

Formats differ only in how they read tensors (`checkpoint.open_hf_dir` for Hugging Face
directories, `quant.int8.open_int8` for int8 directories, `quant.gguf.open_gguf` for GGUF
files). Building is the same for all, and it checks before it trusts:

    1. the reader checks every tensor it lists against the file's size (no read past the end);
    2. `check_claims`: the layers, vocabulary and widths the metadata claims must match the tensors
       present, before anything is allocated (a config that claims 100,000 layers is refused
       in milliseconds, not after minutes of building);
    3. build on the meta device, check every name and shape, swap in packed modules (int8, packed GGUF);
    4. `load_state_dict(assign=True)`, tie the head, recompute the RoPE buffers, eval mode.

This module sits above the formats (it imports them); they import only what lies below
(`fileio`, `config`, `model`), so there is no import cycle.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig
from .errors import LmsmithError
from .model import Transformer, build_model


@dataclass
class WeightSource:
    """What a format reader hands the builder.

    Attributes:
        path: the file or directory, for messages.
        where: what makes the claims (e.g. "config.json", "GGUF metadata"), for messages.
        config: the model shape the metadata claims.
        shapes: Hugging Face tensor name -> shape, for every tensor the file holds (already checked
            against the file size by the reader).
        read: `read(dtype, device) -> {name: tensor}` the float tensors (not those of packed modules);
            dtype None: the format's natural dtype.
        packed: `packed(dtype, device) -> {module name: nn.Module}`: modules that replace the plain
            ones (int8's and GGUF's QuantLinear / QuantEmbedding); their tensors are not in `read`'s result.
        tokenizer: `tokenizer() -> Tokenizer | None`.
        files: tensor name -> the file holding it, when that is not `path` (sharded directories).
        head: "lm" (a causal LM) or "score" (a reward model: `reward_model.RewardModel`).
    """

    path: Path
    where: str
    config: ModelConfig
    shapes: dict[str, tuple[int, ...]]
    read: Callable[[torch.dtype | None, torch.device], dict[str, torch.Tensor]]
    packed: Callable[[torch.dtype | None, torch.device], dict[str, torch.nn.Module]] | None = None
    tokenizer: Callable[[], Any] | None = None
    files: dict[str, Path] | None = None
    head: str = "lm"

    def file_of(self, name: str) -> Path:
        return (self.files or {}).get(name, self.path)


def open_source(path: str | os.PathLike, packed: bool = False) -> WeightSource:
    """The reader for `path`: a `.gguf` file, an lmsmith int8 directory, or a Hugging Face directory.

    `packed`: keep a GGUF file's quantized tensors as their bytes (int8 directories always are).
    """
    path = Path(path)
    if path.suffix.lower() == ".gguf":
        from .quant.gguf import open_gguf

        return open_gguf(path, packed=packed)
    from .quant.int8 import is_int8_dir

    if path.is_dir() and is_int8_dir(path):
        from .quant.int8 import open_int8

        return open_int8(path)
    if packed:
        raise LmsmithError(f"{path}: packed inference needs quantized weights (a .gguf file or an int8 "
                           "directory), this holds float ones; make one with `lmsmith quantize`")
    from .checkpoint import open_hf_dir

    return open_hf_dir(path)


def load(path: str | os.PathLike, dtype: torch.dtype | str | None = None,
         device: torch.device | str | None = None, packed: bool = False) -> tuple[Transformer, Any]:
    """Load a model (and its tokenizer, if the file or directory has one).

    Args:
        path: a Hugging Face model directory (Llama / Qwen2 / Mistral, safetensors weights, single
            file or sharded), an lmsmith int8 directory, or a `.gguf` file.
        dtype: convert weights to this dtype (torch.dtype or "fp32"/"bf16"/"fp16"); None keeps the
            dtype of the file (or config.json's `torch_dtype` when the file mixes dtypes; fp32 for
            GGUF and the float parts of int8).
        device: where the weights go; None means CPU.
        packed: keep a GGUF file's quantized matrices packed (`QuantLinear` / `QuantEmbedding`:
            resident memory about the file's size, products run on the packed bytes) instead of
            dequantizing them. int8 directories are always packed; a float checkpoint is an error.

    Returns:
        `(model, tokenizer)`; tokenizer is None when there is none. The model is in eval mode. A
        one-label sequence-classification directory (`finetune --objective reward`) gives a
        `RewardModel` (score it with `lmsmith.score`).

    Raises:
        LmsmithError: naming the file and the fix, for any unreadable or mismatched input.
    """
    from .precision import parse_dtype

    source = open_source(path, packed=packed)
    model = build(source, parse_dtype(dtype), torch.device(device) if device is not None else torch.device("cpu"))
    return model, (source.tokenizer() if source.tokenizer else None)


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def check_claims(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]], path: Path, where: str,
                 files: dict[str, Path] | None = None) -> None:
    """Refuse metadata whose layer count, vocabulary or width disagrees with the tensors present.

    Cheap (no model is built), so a file that claims a huge model fails at once.
    """
    layer_of = {n: int(m.group(1)) for n in shapes if (m := _LAYER.match(n))}
    layers = set(layer_of.values())
    extra = sorted(n for n, i in layer_of.items() if i >= cfg.n_layers)
    if extra:
        raise LmsmithError(f"{files.get(extra[0], path) if files else path}: tensor {extra[0]!r} is beyond the "
                           f"{cfg.n_layers} layers {where} claims; metadata and weights disagree")
    if layers != set(range(cfg.n_layers)):
        held = f"only {len(layers)} of them" if layers else "none"
        raise LmsmithError(f"{path}: {where} claims {cfg.n_layers} layers but the weights hold {held}; "
                           "the metadata does not match the weights")
    emb = shapes.get("model.embed_tokens.weight")
    if emb is None:
        raise LmsmithError(f"{path}: no embedding tensor (model.embed_tokens.weight / token_embd.weight)")
    if tuple(emb) != (cfg.vocab_size, cfg.dim):
        raise LmsmithError(f"{path}: {where} claims vocabulary {cfg.vocab_size} x width {cfg.dim} but the "
                           f"embedding is {list(emb)}; metadata and weights disagree")


def build(source: WeightSource, dtype: torch.dtype | None, device: torch.device) -> Transformer:
    """Build the model a source describes and assign its tensors (see the module docstring)."""
    cfg, path = source.config, source.path
    check_claims(cfg, source.shapes, path, source.where, source.files)
    cls = Transformer
    if source.head == "score":
        from .reward_model import RewardModel

        cls = RewardModel
    model = build_model(cfg, init=False, cls=cls)  # meta device: nothing allocated yet
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight", None)
    for name, shape in source.shapes.items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue  # a tied head stored anyway: the embedding is the head
        if name not in expected:
            raise LmsmithError(f"{source.file_of(name)}: unexpected tensor {name!r} for {cfg.arch} with "
                               f"{cfg.n_layers} layers; {source.where} does not match the weights")
        if tuple(shape) != expected[name]:
            raise LmsmithError(f"{source.file_of(name)}: tensor {name!r} has shape {list(shape)} but "
                               f"{source.where} implies {list(expected[name])}; metadata and weights disagree")
    missing = [n for n in expected if n not in source.shapes]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise LmsmithError(f"{path}: missing tensors {shown}; the file is incomplete or {source.where} does "
                           "not match the weights")
    for name, module in (source.packed(dtype, device) if source.packed else {}).items():
        model.set_submodule(name, module)
    state = source.read(dtype, device)
    model.load_state_dict(state, strict=False, assign=True)
    del state
    model.tie_weights()
    model.reset_buffers()
    model.eval()
    return model
