"""LoRA: low-rank adapters on the linear layers of a frozen model, in peft's format.

A wrapped linear computes `y = W x + b + (B (A dropout(x))) * scaling` with
A (r, in) and B (out, r); B starts at zero so the wrapped model equals the base
until training moves it. scaling = alpha / r (or alpha / sqrt(r) with rsLoRA).

Module layout mirrors peft's, so the state-dict names differ from peft's saved
keys only by a prefix: our `model.layers.0.self_attn.q_proj.lora_A.weight` is
peft's `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`, and
the frozen weight sits under `...q_proj.base_layer.weight` as in a PeftModel.

    trainable = apply_lora(model, LoraConfig(r=8))   # freeze base, wrap targets
    train(model, ..., trainable_params=trainable)
    save_lora(model, config, "adapter/")            # peft can load this
    merge_lora(model)                                # plain Transformer again
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..decoding.layout import DecodeLinear
from ..errors import LmsmithError

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class LoraConfig:
    """Which linears get adapters, and how big.

    Attributes:
        r: rank of the update (A is (r, in), B is (out, r)).
        alpha: scaling numerator; the update is multiplied by alpha / r (alpha / sqrt(r) with rsLoRA).
        dropout: dropout on the adapter's input during training (the base path sees no dropout).
        target_modules: module names (a module matches when its name equals one or ends in
            "." + one, e.g. "q_proj"), "all-linear" (every nn.Linear in the blocks, not the
            LM head, as peft does), or another string taken as a regex that must match the
            full module name (peft's rule).
        use_rslora: rank-stabilised scaling alpha / sqrt(r).
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: list(DEFAULT_TARGETS))
    use_rslora: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise LmsmithError(f"LoraConfig.r = {self.r!r}: the rank must be a positive integer (e.g. 8)")
        if not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise LmsmithError(f"LoraConfig.alpha = {self.alpha!r}: must be a number > 0 (e.g. 2 * r)")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise LmsmithError(f"LoraConfig.dropout = {self.dropout!r}: must be in [0, 1)")
        if isinstance(self.target_modules, tuple | set | frozenset):
            self.target_modules = sorted(self.target_modules) if isinstance(self.target_modules, set | frozenset) \
                else list(self.target_modules)
        if isinstance(self.target_modules, str):
            if self.target_modules != "all-linear":
                try:
                    re.compile(self.target_modules)
                except re.error as e:
                    raise LmsmithError(f"LoraConfig.target_modules = {self.target_modules!r}: not a module list, "
                                       f"'all-linear' or a valid regex ({e})") from None
        elif not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise LmsmithError(f"LoraConfig.target_modules = {self.target_modules!r}: give module names such as "
                               f"['q_proj', 'v_proj'], or 'all-linear'")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoraLinear(nn.Module):
    """A frozen `base_layer` (nn.Linear) plus a trainable low-rank update.

    Attributes:
        base_layer: the original linear (in -> out), frozen.
        lora_A: Linear(in, r, bias=False), kaiming-uniform init (as peft).
        lora_B: Linear(r, out, bias=False), zero init, so the wrapper starts equal to the base.
        scaling: alpha / r (or alpha / sqrt(r)).
        disabled: when True the forward is the base layer's alone (see `lora_disabled`).
    """

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False):
        super().__init__()
        self.base_layer = base_layer
        self.r, self.alpha = r, alpha
        self.scaling = alpha / (math.sqrt(r) if use_rslora else r)
        w = base_layer.weight
        # Adapters in fp32 when the base is half precision (peft's autocast_adapter_dtype):
        # tiny updates to B would otherwise round away in bf16.
        dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, device=w.device, dtype=dtype)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, device=w.device, dtype=dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # peft's init_lora_weights=True
        nn.init.zeros_(self.lora_B.weight)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:  # code that reads `q_proj.weight` sees the frozen base weight
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def delta_weight(self) -> torch.Tensor:
        """The update (B @ A) * scaling as an (out, in) fp32 tensor."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out)."""
        y = self.base_layer(x)
        if self.disabled:
            return y
        a = self.lora_A.weight
        z = self.lora_B(self.lora_A(self.lora_dropout(x.to(a.dtype))))
        return y + (z * self.scaling).to(y.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}"


# ---- applying -------------------------------------------------------------------------


_NOT_TARGETS = ("lm_head", "score", "lora_A", "lora_B")  # heads (LM, reward) and LoRA's own factors


def _candidate_linears(model: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    """(name, module) of every plain linear that may carry LoRA: inside the blocks, never the LM head."""
    for name, m in model.named_modules():
        # type(), not isinstance: quantized or already-wrapped linears are not LoRA targets; nor are heads.
        if type(m) not in (nn.Linear, DecodeLinear) or name.rsplit(".", 1)[-1] in _NOT_TARGETS:
            continue
        yield name, m


def _matches(name: str, targets: list[str] | str) -> bool:
    if targets == "all-linear":
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _target_names(model: nn.Module, config: LoraConfig) -> list[str]:
    return [name for name, _ in _candidate_linears(model) if _matches(name, config.target_modules)]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def apply_lora(model: nn.Module, config: LoraConfig) -> list[nn.Parameter]:
    """Freeze every base parameter and wrap each target linear in a `LoraLinear`.

    Args:
        model: a `Transformer` (weights materialised; any dtype/device).
        config: the LoraConfig.

    Returns:
        The trainable parameters (every lora_A / lora_B weight), for `train(trainable_params=...)`.

    Raises:
        LmsmithError: if the model already has LoRA, or no module matches `target_modules`.
    """
    if lora_modules(model):
        raise LmsmithError("this model already has LoRA adapters; merge_lora() them or start from a fresh model")
    names = _target_names(model, config)
    if not names:
        kinds = sorted({n.rsplit(".", 1)[-1] for n, _ in _candidate_linears(model)})
        raise LmsmithError(f"LoRA target_modules {config.target_modules!r} match no linear layer; "
                           f"this model has: {', '.join(kinds)}")
    for p in model.parameters():
        p.requires_grad_(False)
    params: list[nn.Parameter] = []
    for name in names:
        base = model.get_submodule(name)
        wrapped = LoraLinear(base, config.r, config.alpha, config.dropout, config.use_rslora)
        _set_module(model, name, wrapped)
        params += [wrapped.lora_A.weight, wrapped.lora_B.weight]
    model._lmsmith_lora_config = config  # read by save_lora / load_adapter when no config is passed
    return params


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    """Module name -> LoraLinear, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every lora_A / lora_B weight of the model (the parameters LoRA trains)."""
    out = []
    for m in lora_modules(model).values():
        out += [m.lora_A.weight, m.lora_B.weight]
    return out


@contextlib.contextmanager
def lora_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model with every adapter switched off (DPO's frozen reference, no second copy).

    Yields the same model object; the previous state is restored on exit, even on error.
    """
    mods = list(lora_modules(model).values())
    before = [m.disabled for m in mods]
    for m in mods:
        m.disabled = True
    try:
        yield model
    finally:
        for m, b in zip(mods, before):
            m.disabled = b


@torch.no_grad()
def merge_lora(model: nn.Module, *, stats: dict | None = None) -> nn.Module:
    """Fold every adapter into its base weight (W += (B @ A) * scaling) and unwrap it.

    The sum is computed in fp32 and cast to the weight's dtype; the new weight is a
    fresh tensor (never written in place, so memory-mapped weights stay untouched).

    Args:
        model: a model with LoRA applied.
        stats: if a dict is given, it receives "layers" (count merged) and "max_abs_delta"
            (the largest |ΔW| entry).

    Returns:
        The same model object, now with plain nn.Linear layers (all parameters frozen).
    """
    mods = lora_modules(model)
    if not mods:
        raise LmsmithError("merge_lora: the model has no LoRA adapters to merge")
    max_delta = 0.0
    for name, m in mods.items():
        base = m.base_layer
        delta = m.delta_weight()
        max_delta = max(max_delta, float(delta.abs().max()))
        w = base.weight
        base.weight = nn.Parameter((w.float() + delta.to(w.device)).to(w.dtype), requires_grad=False)
        _set_module(model, name, base)
    if hasattr(model, "_lmsmith_lora_config"):
        del model._lmsmith_lora_config
    if stats is not None:
        stats.update(layers=len(mods), max_abs_delta=max_delta)
    return model


# ---- summary --------------------------------------------------------------------------


def lora_stats(model: nn.Module, config: LoraConfig) -> dict:
    """Parameter counts of LoRA on `model` (applied or not).

    Returns:
        {"per_type": {suffix: {"in", "out", "count", "lora", "full"}}, "trainable", "base",
        "total", "percent"} where per matrix lora = r * (in + out) and full = in * out;
        "total" counts base + LoRA parameters and percent = 100 * trainable / total (as peft prints).
    """
    mods = lora_modules(model)
    if mods:
        linears = {n: m.base_layer for n, m in mods.items()}
    else:
        linears = {n: model.get_submodule(n) for n in _target_names(model, config)}
    per_type: dict[str, dict] = {}
    for name, lin in linears.items():
        key = (name.rsplit(".", 1)[-1], lin.in_features, lin.out_features)
        label = key[0] if key[0] not in per_type or (per_type[key[0]]["in"], per_type[key[0]]["out"]) == key[1:] \
            else f"{key[0]} ({key[1]}x{key[2]})"
        row = per_type.setdefault(label, {"in": key[1], "out": key[2], "count": 0,
                                          "lora": config.r * (key[1] + key[2]), "full": key[1] * key[2]})
        row["count"] += 1
    trainable = sum(r["count"] * r["lora"] for r in per_type.values())
    lora_ids = {id(p) for p in lora_parameters(model)}
    base = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if id(p) not in lora_ids)
    total = base + trainable
    return {"per_type": per_type, "trainable": trainable, "base": base, "total": total,
            "percent": 100.0 * trainable / total if total else 0.0}


def lora_summary(model: nn.Module, config: LoraConfig) -> str:
    """A small table: per target type, r·(in+out) against in·out per matrix, then the total and percentage."""
    s = lora_stats(model, config)
    lines = [f"LoRA r={config.r}, alpha={config.alpha:g}, scaling={config.scaling:g}"
             f"{' (rsLoRA)' if config.use_rslora else ''}"]
    lines.append(f"  {'module':<16}{'in x out':>14}{'count':>7}{'LoRA/matrix':>13}{'full/matrix':>13}{'ratio':>9}")
    for name, r in s["per_type"].items():
        lines.append(f"  {name:<16}{str(r['in']) + ' x ' + str(r['out']):>14}{r['count']:>7}"
                     f"{r['lora']:>13,}{r['full']:>13,}{100 * r['lora'] / r['full']:>8.2f}%")
    lines.append(f"  trainable {s['trainable']:,} of {s['total']:,} parameters ({s['percent']:.4f}%); "
                 f"base {s['base']:,} frozen")
    return "\n".join(lines)


# ---- saving and loading (peft format) -------------------------------------------------


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under peft's saved names (`base_model.model.<module>.lora_A.weight`)."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach()
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach()
    return out


def _peft_target_modules(model: nn.Module, config: LoraConfig) -> list[str] | str:
    # peft saves "all-linear" expanded to the module suffixes it found; do the same so any
    # peft version reads it (older ones do not know "all-linear").
    if config.target_modules == "all-linear":
        return sorted({n.rsplit(".", 1)[-1] for n in lora_modules(model)})
    return config.target_modules


def save_lora(model: nn.Module, config: LoraConfig | None, path, base_model_name_or_path: str | None = None) -> Path:
    """Write the adapter in peft's format, atomically: adapter_config.json + adapter_model.safetensors.

    `PeftModel.from_pretrained(hf_model, path)` loads it onto the transformers model of
    our HF export. Tensors are written in their own dtype (fp32 for half-precision bases).
    """
    from ..fileio import atomic_dir, write_safetensors

    config = config or getattr(model, "_lmsmith_lora_config", None)
    if config is None:
        raise LmsmithError("save_lora: pass the LoraConfig used with apply_lora")
    tensors = lora_state_dict(model)
    if not tensors:
        raise LmsmithError("save_lora: the model has no LoRA adapters (call apply_lora first)")
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": _peft_target_modules(model, config),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": config.use_rslora,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }
    path = Path(path)
    with atomic_dir(path) as tmp:
        (tmp / ADAPTER_CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        write_safetensors(tensors, tmp / ADAPTER_WEIGHTS_NAME)
    return path


def read_adapter_config(path) -> dict:
    """adapter_config.json of an adapter directory, as a dict (clear errors when missing or broken)."""
    path = Path(path)
    f = path / ADAPTER_CONFIG_NAME
    if not path.is_dir():
        raise LmsmithError(f"{path}: not an adapter directory (expected a folder with {ADAPTER_CONFIG_NAME})")
    if not f.is_file():
        raise LmsmithError(f"{f}: missing; an adapter directory needs {ADAPTER_CONFIG_NAME} "
                           f"(written by save_lora / save_prompt_tuning or peft's save_pretrained)")
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LmsmithError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise LmsmithError(f"{f}: expected a JSON object")
    return cfg


def read_adapter_weights(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    f = Path(path) / ADAPTER_WEIGHTS_NAME
    if not f.is_file():
        hint = " (a pickle adapter_model.bin is never opened; re-save it with safe_serialization=True)" \
            if (Path(path) / "adapter_model.bin").exists() else ""
        raise LmsmithError(f"{f}: missing{hint}")
    try:
        return load_file(str(f))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for corrupt headers
        raise LmsmithError(f"{f}: not a readable safetensors file ({e})") from None


def lora_config_from_peft(cfg: dict, where: str = ADAPTER_CONFIG_NAME) -> LoraConfig:
    """Our LoraConfig from a peft adapter_config.json dict; unsupported options raise LmsmithError."""
    if cfg.get("peft_type") != "LORA":
        raise LmsmithError(f"{where}: peft_type {cfg.get('peft_type')!r} is not LORA")
    unsupported = []
    if cfg.get("use_dora"):
        unsupported.append("use_dora (DoRA)")
    if cfg.get("bias", "none") != "none":
        unsupported.append(f"bias={cfg.get('bias')!r}")
    if cfg.get("fan_in_fan_out"):
        unsupported.append("fan_in_fan_out")
    if cfg.get("lora_bias"):
        unsupported.append("lora_bias")
    for key in ("rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform", "layer_replication",
                "exclude_modules", "target_parameters", "trainable_token_indices"):
        if cfg.get(key):
            unsupported.append(key)
    if unsupported:
        raise LmsmithError(f"{where}: unsupported peft LoRA option(s) {', '.join(unsupported)}; lmsmith loads "
                           f"plain LoRA (bias none, no DoRA); merge it with peft's merge_and_unload instead")
    targets = cfg.get("target_modules")
    if targets is None:
        raise LmsmithError(f"{where}: target_modules is missing")
    try:
        return LoraConfig(r=int(cfg.get("r", 8)), alpha=float(cfg.get("lora_alpha", 8)),
                          dropout=float(cfg.get("lora_dropout", 0.0) or 0.0),
                          target_modules=targets if isinstance(targets, str) else list(targets),
                          use_rslora=bool(cfg.get("use_rslora", False)))
    except LmsmithError as e:
        raise LmsmithError(f"{where}: {e}") from None


_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<ab>lora_[AB])(?:\.[^.]+)?\.weight$")


@torch.no_grad()
def load_lora(model: nn.Module, path) -> LoraConfig:
    """Apply LoRA as an adapter directory describes and load its weights into `model`.

    Reads adapters written by `save_lora` or by peft's `save_pretrained` (keys with or
    without the adapter name, e.g. `.lora_A.default.weight`; rsLoRA scaling).

    Returns:
        The LoraConfig (the model is modified in place; its base stays frozen).

    Raises:
        LmsmithError: missing files, unsupported peft options, or tensors that do not fit the model.
    """
    path = Path(path)
    raw = read_adapter_config(path)
    config = lora_config_from_peft(raw, str(path / ADAPTER_CONFIG_NAME))
    tensors = read_adapter_weights(path)
    wanted: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise LmsmithError(f"{path / ADAPTER_WEIGHTS_NAME}: unexpected tensor {key!r} in a LoRA adapter")
        wanted.setdefault(m["module"], {})[m["ab"]] = t
    existing = set(_target_names(model, config))
    missing_modules = sorted(set(wanted) - existing)
    if missing_modules:
        raise LmsmithError(f"{path}: adapter targets {missing_modules[0]!r}, which this model does not have "
                           f"as a linear layer ({len(missing_modules)} such); is it for another model?")
    apply_lora(model, config)
    mods = lora_modules(model)
    not_loaded = sorted(set(mods) - set(wanted))
    if not_loaded:
        raise LmsmithError(f"{path}: no LoRA weights for {not_loaded[0]!r} ({len(not_loaded)} modules) although "
                           f"target_modules {config.target_modules!r} selects it; the adapter is for another model")
    for name, ab in wanted.items():
        m = mods[name]
        for which in ("lora_A", "lora_B"):
            if which not in ab:
                raise LmsmithError(f"{path}: {name}.{which}.weight is missing from the adapter")
            dst = getattr(m, which).weight
            src = ab[which]
            if tuple(src.shape) != tuple(dst.shape):
                raise LmsmithError(f"{path}: {name}.{which}.weight has shape {tuple(src.shape)}, the model needs "
                                   f"{tuple(dst.shape)} (r={config.r}); the adapter is for a different model shape")
            dst.copy_(src.to(dst.dtype))
    return config
