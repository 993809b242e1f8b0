"""The one training loop: objectives, AdamW + schedules, run state, metrics."""

from ..distributed.parallelize import apply_activation_checkpointing, apply_compile
from .loop import TrainConfig, TrainResult, accumulate_gradients, evaluate, sample_text, train
from .objectives import IGNORE_INDEX, causal_lm_objective
from .optim import build_optimizer, lr_at, param_groups

__all__ = ["TrainConfig", "TrainResult", "train", "evaluate", "sample_text", "accumulate_gradients",
           "apply_activation_checkpointing", "apply_compile", "causal_lm_objective", "IGNORE_INDEX",
           "lr_at", "param_groups", "build_optimizer"]
