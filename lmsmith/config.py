"""Model shape: `ModelConfig`, its validation, and the named presets.

Field names are lmsmith's own (short, as in the papers); `to_hf()` / `from_hf()`
translate to and from a Hugging Face `config.json` of the Llama, Qwen2 and
Mistral families, which is the on-disk contract.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import LmsmithError

# HF `architectures[0]` -> our arch name, and back.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "mistral",
}
_ARCH_TO_HF = {v: k for k, v in ARCHITECTURES.items()}
_MODEL_TYPE = {"llama": "llama", "qwen2": "qwen2", "mistral": "mistral"}


@dataclass
class ModelConfig:
    """The shape of a Llama-family decoder.

    Attributes:
        vocab_size: rows of the embedding and of the LM head.
        dim: width of the residual stream (HF `hidden_size`).
        n_layers: number of transformer blocks.
        n_heads: query heads.
        n_kv_heads: key/value heads (GQA); equal to n_heads is MHA, 1 is MQA.
        hidden_dim: SwiGLU inner width (HF `intermediate_size`).
        max_seq_len: context length (HF `max_position_embeddings`).
        head_dim: per-head width; defaults to dim // n_heads.
        norm_eps: RMSNorm epsilon.
        rope_theta: RoPE base.
        rope_scaling: None, or Llama-3 style
            {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
            "original_max_position_embeddings"}.
        tie_embeddings: LM head shares the embedding matrix.
        qkv_bias: bias on q/k/v projections (Qwen2).
        arch: "llama", "qwen2" or "mistral" (decides the HF architecture we write).
        sliding_window: Mistral's attention window (None = full attention); applied for arch "mistral".
    """

    vocab_size: int = 4096
    dim: int = 192
    n_layers: int = 4
    n_heads: int = 6
    n_kv_heads: int | None = None
    hidden_dim: int | None = None
    max_seq_len: int = 512
    head_dim: int | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_embeddings: bool = True
    qkv_bias: bool = False
    arch: str = "llama"
    sliding_window: int | None = None
    init_std: float = field(default=0.02, repr=False)

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.hidden_dim is None:
            # Llama's rule: 2/3 of 4*dim, rounded up to a multiple of 256.
            self.hidden_dim = 256 * math.ceil(int(8 * self.dim / 3) / 256)
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise LmsmithError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        for name in ("head_dim", "sliding_window"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise LmsmithError(f"ModelConfig.{name} must be a positive integer or None, got {value!r}")
        for name in ("norm_eps", "rope_theta", "init_std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                raise LmsmithError(f"ModelConfig.{name} must be a positive finite number, got {value!r}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            raise LmsmithError(f"ModelConfig.rope_scaling must be a mapping (llama3 scaling) or None, "
                               f"got {self.rope_scaling!r}")
        if self.head_dim is None:
            if self.dim % self.n_heads != 0:
                raise LmsmithError(
                    f"ModelConfig: dim ({self.dim}) must be divisible by n_heads ({self.n_heads}), "
                    "or give head_dim explicitly"
                )
            self.head_dim = self.dim // self.n_heads
        if self.head_dim % 2 != 0:
            raise LmsmithError(f"ModelConfig: head_dim ({self.head_dim}) must be even for rotary embeddings")
        if self.n_heads % self.n_kv_heads != 0:
            raise LmsmithError(
                f"ModelConfig: n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads}) "
                "for grouped-query attention"
            )
        if self.arch not in _ARCH_TO_HF:
            raise LmsmithError(f"ModelConfig: unknown arch {self.arch!r}; supported: {', '.join(_ARCH_TO_HF)}")
        if self.rope_scaling is not None:
            self.rope_scaling = _check_rope_scaling(self.rope_scaling)

    # ---- derived numbers -------------------------------------------------------------

    def num_params(self, embedding: bool = True) -> int:
        """Parameter count, computed from the shape (no model needed)."""
        d, hd = self.dim, self.head_dim
        attn = d * self.n_heads * hd + 2 * d * self.n_kv_heads * hd + self.n_heads * hd * d
        if self.qkv_bias:
            attn += self.n_heads * hd + 2 * self.n_kv_heads * hd
        mlp = 3 * d * self.hidden_dim
        per_layer = attn + mlp + 2 * d
        total = self.n_layers * per_layer + d  # + final norm
        if embedding:
            total += self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return total

    @property
    def attention_window(self) -> int | None:
        """The sliding window attention applies: Mistral's; None (full attention) otherwise.
        Qwen2 configs carry a window too, but with use_sliding_window off."""
        return self.sliding_window if self.arch == "mistral" else None

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6*N (non-embedding matmuls incl. head) + attention."""
        t = seq_len or self.max_seq_len
        n = self.num_params(embedding=False) + self.vocab_size * self.dim  # the head is a matmul
        attn = 12 * self.n_layers * self.n_heads * self.head_dim * t / 2  # causal: half the scores
        return 6 * n + attn

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("init_std")
        return d

    # ---- Hugging Face config.json ----------------------------------------------------

    def to_hf(self, bos_id: int | None = None, eos_id: int | list[int] | None = None,
              pad_id: int | None = None, torch_dtype: str = "float32") -> dict[str, Any]:
        """The `config.json` dict transformers reads for this model."""
        hf: dict[str, Any] = {
            "architectures": [_ARCH_TO_HF[self.arch]],
            "model_type": _MODEL_TYPE[self.arch],
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "intermediate_size": self.hidden_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
            "initializer_range": self.init_std,
            "attention_dropout": 0.0,
            "use_cache": True,
            "torch_dtype": torch_dtype,
            "bos_token_id": bos_id,
            "eos_token_id": eos_id,
            "pad_token_id": pad_id,
        }
        if self.arch == "llama":
            hf["attention_bias"] = self.qkv_bias
            hf["mlp_bias"] = False
        elif self.qkv_bias is False and self.arch == "qwen2":
            raise LmsmithError("qwen2 architecture always has q/k/v bias; set qkv_bias=True or arch='llama'")
        if self.arch == "mistral" and self.qkv_bias:
            raise LmsmithError("mistral architecture has no q/k/v bias; use arch='qwen2' or 'llama'")
        if self.arch in ("qwen2", "mistral"):
            hf["sliding_window"] = self.sliding_window
        if self.arch == "qwen2":
            hf["use_sliding_window"] = False
        return hf

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Build from a Hugging Face `config.json` dict (Llama, Qwen2 or Mistral)."""
        archs = hf.get("architectures") or []
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise LmsmithError(f"{source}: architectures must be a list of names such as [\"LlamaForCausalLM\"], "
                               f"got {archs!r}")
        model_type = hf.get("model_type")
        arch = None
        for a in archs:
            if a in ARCHITECTURES:
                arch = ARCHITECTURES[a]
        if arch is None and model_type in _MODEL_TYPE.values():
            arch = model_type
        if arch is None:
            raise LmsmithError(
                f"{source}: unsupported architecture {archs or model_type!r}; "
                f"supported: {', '.join(ARCHITECTURES)}"
            )
        if hf.get("hidden_act", "silu") not in ("silu", "swish"):
            raise LmsmithError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (only silu)")
        if hf.get("mlp_bias"):
            raise LmsmithError(f"{source}: mlp_bias=true is not supported")
        try:
            n_heads = hf["num_attention_heads"]
            qkv_bias = True if arch == "qwen2" else bool(hf.get("attention_bias", False))
            sliding = hf.get("sliding_window")
            return cls(
                vocab_size=hf["vocab_size"],
                dim=hf["hidden_size"],
                n_layers=hf["num_hidden_layers"],
                n_heads=n_heads,
                n_kv_heads=hf.get("num_key_value_heads") or n_heads,
                hidden_dim=hf["intermediate_size"],
                max_seq_len=hf.get("max_position_embeddings", 2048),
                head_dim=hf.get("head_dim") or None,
                norm_eps=hf.get("rms_norm_eps", 1e-6),
                rope_theta=hf.get("rope_theta", _rope_parameters(hf).get("rope_theta", 10000.0)),
                rope_scaling=_hf_rope_scaling(hf),
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                qkv_bias=qkv_bias,
                arch=arch,
                sliding_window=sliding,
                init_std=hf.get("initializer_range", 0.02),
            )
        except KeyError as e:
            raise LmsmithError(f"{source}: missing required field {e.args[0]!r}") from None
        except LmsmithError as e:  # name the file and the HF field, not our dataclass
            msg = str(e)
            for ours, theirs in _HF_FIELDS.items():
                msg = msg.replace(f"ModelConfig.{ours} ", f"{theirs} ").replace(f"({ours})", f"({theirs})")
            raise LmsmithError(f"{source}: {msg.removeprefix('ModelConfig: ')}") from None


def _rope_parameters(hf: dict[str, Any]) -> dict[str, Any]:
    rp = hf.get("rope_parameters")
    return rp if isinstance(rp, dict) else {}


# Our field names -> config.json's, for messages about a config.json.
_HF_FIELDS = {"vocab_size": "vocab_size", "dim": "hidden_size", "n_layers": "num_hidden_layers",
              "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads",
              "hidden_dim": "intermediate_size", "max_seq_len": "max_position_embeddings", "head_dim": "head_dim",
              "norm_eps": "rms_norm_eps", "rope_theta": "rope_theta", "rope_scaling": "rope_scaling",
              "sliding_window": "sliding_window", "init_std": "initializer_range"}


def _hf_rope_scaling(hf: dict[str, Any]) -> dict[str, Any] | None:
    rs = hf.get("rope_scaling")
    if rs is not None and not isinstance(rs, dict):
        raise LmsmithError(f"rope_scaling must be a mapping such as {{\"rope_type\": \"llama3\", ...}} or null, "
                           f"got {rs!r}")
    if rs is None:
        # transformers 5 writes rope settings under "rope_parameters".
        rp = hf.get("rope_parameters")
        if isinstance(rp, dict) and rp.get("rope_type", "default") != "default":
            rs = {k: v for k, v in rp.items() if k != "rope_theta"}
    if not rs:
        return None
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "default":
        return None
    return dict(rs)


def _check_rope_scaling(rs: dict[str, Any]) -> dict[str, Any]:
    kind = rs.get("rope_type", rs.get("type"))
    if kind != "llama3":
        raise LmsmithError(f"rope_scaling type {kind!r} is not supported (supported: llama3)")
    need = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in need if k not in rs]
    if missing:
        raise LmsmithError(f"rope_scaling (llama3) is missing {', '.join(missing)}")
    return {"rope_type": "llama3", **{k: rs[k] for k in need}}


def _llama3_scaling(factor: float, original: int = 8192) -> dict[str, Any]:
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": original}


PRESETS: dict[str, dict[str, Any]] = {
    # ~0.5M params: the default distillation student of the `tiny` demo model (`lmsmith distill`).
    "nano": dict(vocab_size=4096, dim=96, n_layers=2, n_heads=3, n_kv_heads=1, hidden_dim=256,
                 max_seq_len=256, tie_embeddings=True),
    # ~2.4M params: tests and CPU demos (`lmsmith pretrain` default).
    "tiny": dict(vocab_size=4096, dim=192, n_layers=4, n_heads=6, n_kv_heads=2, hidden_dim=512,
                 max_seq_len=256, tie_embeddings=True),
    # ~22M params: a real small model that trains on a laptop.
    "small": dict(vocab_size=8192, dim=512, n_layers=6, n_heads=8, n_kv_heads=4, hidden_dim=1536,
                  max_seq_len=512, tie_embeddings=True),
    # ~117M params, GPT-2-small sized; dims are multiples of 256 so every K-quant applies.
    "base": dict(vocab_size=32768, dim=768, n_layers=12, n_heads=12, n_kv_heads=4, hidden_dim=2304,
                 max_seq_len=1024, tie_embeddings=True),
    # Real shapes (random init): planning, memory checks, tests of scale.
    "smollm2-135m": dict(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536,
                         max_seq_len=8192, rope_theta=100000.0, norm_eps=1e-5, tie_embeddings=True),
    "qwen2.5-0.5b": dict(vocab_size=151936, dim=896, n_layers=24, n_heads=14, n_kv_heads=2, hidden_dim=4864,
                         max_seq_len=32768, rope_theta=1000000.0, norm_eps=1e-6, tie_embeddings=True,
                         qkv_bias=True, arch="qwen2"),
    "llama-3.2-1b": dict(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, hidden_dim=8192,
                         head_dim=64, max_seq_len=131072, rope_theta=500000.0, norm_eps=1e-5,
                         rope_scaling=_llama3_scaling(32.0), tie_embeddings=True),
    "llama-3.1-8b": dict(vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336,
                         max_seq_len=131072, rope_theta=500000.0, norm_eps=1e-5,
                         rope_scaling=_llama3_scaling(8.0), tie_embeddings=False),
    "llama-3.1-405b": dict(vocab_size=128256, dim=16384, n_layers=126, n_heads=128, n_kv_heads=8,
                           hidden_dim=53248, max_seq_len=131072, rope_theta=500000.0, norm_eps=1e-5,
                           rope_scaling=_llama3_scaling(8.0), tie_embeddings=False),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named preset, optionally with fields overridden (e.g. vocab_size to fit a tokenizer)."""
    if name not in PRESETS:
        raise LmsmithError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
