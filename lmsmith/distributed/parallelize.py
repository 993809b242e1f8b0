"""Parallelisms applied to a built, plain model, in torchtitan's order: TP -> AC -> compile -> FSDP / DDP.

The model stays the one in `model.py`; these functions swap its parameters for DTensors (tensor
parallelism, FSDP2) or hook its backward (replicate, PyTorch's composable DDP). Parameter names are
unchanged, so state dicts, checkpoints and adapters keep their Hugging Face names.
"""

from __future__ import annotations

import functools

import torch

from .ranks import Ranks


def apply_activation_checkpointing(model) -> None:
    """Recompute every block's activations during backward instead of storing them.

    Wraps each `model.model.layers[i].forward` with torch.utils.checkpoint (non-reentrant);
    parameters and state-dict names are untouched. Inference (no grad) skips the wrapper.
    """
    from torch.utils.checkpoint import checkpoint

    for block in model.model.layers:
        if getattr(block, "_lmsmith_checkpointed", False):
            continue
        inner = block.forward

        @functools.wraps(inner)
        def forward(*args, _inner=inner, **kwargs):
            if not torch.is_grad_enabled():
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward
        block._lmsmith_checkpointed = True


def apply_compile(model) -> None:
    """torch.compile each block in place (per-block, so `hidden_states` and any objective benefit)."""
    for block in model.model.layers:
        block.compile()


def apply_tp(model, tp_mesh) -> None:
    """Tensor parallelism with sequence parallelism on the norms (Megatron's layout, as in torchtitan).

    q/k/v/gate/up are split by output columns, o/down by input rows (one all-reduce per attention and
    per MLP, done as reduce-scatter + all-gather so the residual stream stays split along the sequence
    between blocks). The embedding is split by vocabulary rows and the LM head by vocabulary columns,
    its logits left split for the loss (`loss_parallel`); a tied head shares the embedding's DTensor
    (both are Shard(0) of the same matrix).
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    from .pipeline import held

    tied = held(model.lm_head) and model.lm_head.weight is getattr(model.model.embed_tokens, "weight", None)
    plan = {
        "model.embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "model.norm": SequenceParallel(),
        # The logits stay split by vocabulary (a DTensor): the loss is computed on the slices.
        "lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False),
    }
    # A pipeline stage holds only some of these (the others pass their input through).
    parallelize_module(model, tp_mesh, {k: v for k, v in plan.items() if held(model.get_submodule(k))})
    model.sequence_shards = tp_mesh.size()
    # Block.forward(x, cos, sin, mask, cache, layer) calls self_attn(norm(x), cos, sin, mask, cache, layer).
    for block in filter(held, model.model.layers):
        parallelize_module(block, tp_mesh, {
            "input_layernorm": SequenceParallel(),
            "self_attn": PrepareModuleInput(input_layouts=(Shard(1), None, None, None, None, None),
                                            desired_input_layouts=(Replicate(), None, None, None, None, None)),
            "self_attn.q_proj": ColwiseParallel(),
            "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(),
            "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
            "post_attention_layernorm": SequenceParallel(),
            "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "mlp.gate_proj": ColwiseParallel(),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1)),
        })
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight


def apply_fsdp(model, dp_mesh, param_dtype: torch.dtype | None = None, roots: list | None = None) -> None:
    """FSDP2: every block and then the root (embedding, final norm, head) sharded over `dp_mesh`.

    `roots` replaces the model as the outer unit(s): an interleaved pipeline's stage views, which hold
    the embedding / norm / head and are what the schedule calls.

    A 2-D mesh (dp_replicate, dp_shard) gives HSDP: shards within a group, replicas across groups.
    With `param_dtype` (bf16 where the hardware has it) the all-gathered weights are cast for the
    compute while the sharded masters and the gradient reductions stay fp32.
    """
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:
        from ..errors import LmsmithError

        raise LmsmithError(f"--dp-shard needs FSDP2 (torch >= 2.6); this is torch {torch.__version__}") from None

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    layers = list(model.model.layers)
    for i, block in enumerate(layers):
        # The last block's weights are needed again at once in backward: keep them gathered.
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=i < len(layers) - 1)
    for root in roots or [model]:
        fully_shard(root, mesh=dp_mesh, mp_policy=mp)


def apply_ddp(model, dp_mesh) -> None:
    """Plain data parallelism (every rank holds all weights; gradients all-reduced in buckets)."""
    from torch.distributed._composable.replicate import replicate

    replicate(model, device_mesh=dp_mesh)


def parallelize(model, ranks: Ranks, *, activation_checkpointing: bool = False, compile: bool = False,
                param_dtype: torch.dtype | None = None):
    """Apply the run's layout to `model` in place (PP split -> TP -> activation checkpointing -> compile ->
    FSDP/DDP; `ranks.pipeline` makes its schedules at the first step of each shape).

    Returns the model. A single process gets only activation checkpointing / compile, as before.
    """
    layout = ranks.layout
    layout.check_model(model.config)
    if ranks.distributed and layout.pp > 1 and ranks.pipeline is None:
        from .pipeline import Pipeline

        ranks.pipeline = Pipeline(model, ranks, ranks.pp_schedule, ranks.pp_microbatches)
    if ranks.distributed and layout.tp > 1:
        apply_tp(model, ranks.mesh["tp"])
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        apply_compile(model)
    if ranks.distributed and layout.dp > 1:
        if layout.dp_shard > 1:
            mesh = ranks.mesh["dp_shard"] if layout.dp_replicate == 1 else ranks.mesh["dp_replicate", "dp_shard"]
            views = [m for m in ranks.pipeline.stage_modules.values() if m is not model] if ranks.pipeline else []
            apply_fsdp(model, mesh, param_dtype, roots=views or None)
        elif ranks.pipeline is None:
            apply_ddp(model, ranks.mesh["dp_replicate"])
        # else: a pipeline all-reduces its replicas' gradients after each schedule step (Pipeline.step)
    return model
