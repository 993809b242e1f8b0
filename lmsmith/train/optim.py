"""AdamW parameter groups and learning-rate schedules.

Weight decay policy: decay every weight matrix (>= 2-D) except the token
embedding (and so the LM head when it is tied to it). Norm gains and biases
are never decayed. The embedding is left alone because a row only receives
gradient when its token appears, so decay would steadily shrink rare tokens'
vectors toward zero between their occurrences (OLMo, nanochat do the same).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import LmsmithError

SCHEDULES = ("cosine", "wsd", "constant")


def lr_at(step: int, *, lr: float, max_steps: int, warmup_steps: int = 0, schedule: str = "cosine",
          min_lr_ratio: float = 0.1, decay_fraction: float = 0.2) -> float:
    """Learning rate for optimizer step `step` (0-based), a pure function.

    - warmup: linear from lr/warmup_steps up to lr over the first `warmup_steps` steps;
    - "cosine": then half a cosine from lr down to lr*min_lr_ratio, reached at the last step;
    - "wsd": warmup-stable-decay; flat at lr, then linear down to the minimum over the
      last `decay_fraction` of the steps (the minimum reached at the last step);
    - "constant": flat at lr after warmup.
    """
    if schedule not in SCHEDULES:
        raise LmsmithError(f"unknown LR schedule {schedule!r}; choose one of: {', '.join(SCHEDULES)}")
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    min_lr = lr * min_lr_ratio
    last = max_steps - 1
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        span = max(1, last - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    # wsd: the decay phase never starts before warmup ends.
    decay_steps = max(1, math.ceil(decay_fraction * max_steps))
    decay_start = max(warmup_steps, last - decay_steps + 1)
    if step < decay_start:
        return lr
    progress = min(1.0, (step - decay_start + 1) / max(1, last - decay_start + 1))
    return lr + (min_lr - lr) * progress


def param_groups(model: nn.Module, weight_decay: float,
                 trainable_params: list[nn.Parameter] | None = None) -> list[dict]:
    """Two AdamW groups: decayed weight matrices, and everything else (norms, biases, embeddings).

    `trainable_params` restricts training to those parameters (LoRA, prompt tuning);
    by default every parameter with requires_grad. Tied parameters appear once.
    """
    wanted = None if trainable_params is None else {id(p) for p in trainable_params}
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = getattr(getattr(model, "lm_head", None), "weight", None)
    if getattr(getattr(model, "config", None), "tie_embeddings", False) and head is not None:
        embeddings.add(id(head))  # a tied head is the embedding (also a pipeline's last-stage copy of it)
    decay, no_decay, seen = [], [], set()
    for _, p in model.named_parameters():
        if id(p) in seen or not p.requires_grad or (wanted is not None and id(p) not in wanted):
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 and id(p) not in embeddings else no_decay).append(p)
    if wanted is not None:
        # Parameters handed in that live outside `model` (e.g. a soft prompt) still train.
        for p in trainable_params:
            if id(p) not in seen:
                seen.add(id(p))
                (decay if p.ndim >= 2 else no_decay).append(p)
    if not seen:
        raise LmsmithError("no trainable parameters: every parameter has requires_grad=False")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(groups: list[dict], lr: float, betas: tuple[float, float], eps: float) -> torch.optim.AdamW:
    """AdamW, fused where the parameters' device supports it (CPU and CUDA in recent torch)."""
    params = [p for g in groups for p in g["params"]]
    devices = {p.device.type for p in params}
    fused = len(devices) == 1 and devices.pop() in ("cpu", "cuda") and all(p.is_floating_point() for p in params)
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=True)
