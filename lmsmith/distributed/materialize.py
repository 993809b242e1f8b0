"""Meta-device init per shard: no rank ever holds the whole model to initialise it.

`build_model(cfg, init=False)` leaves the weights on the meta device (no memory); the parallelisms
(pipeline pruning, TP, FSDP) are applied to that; then `init_sharded` allocates only this rank's
shards and fills them with exactly the values one process's `build_model(cfg, seed=seed)` would
have: the full tensors are drawn in the single-process order, one at a time, on CPU, and each rank
keeps its slices (a pipeline stage skips the slices of other stages' tensors after drawing them,
so the random stream stays aligned). Peak extra memory: the largest single tensor.
"""

from __future__ import annotations

import torch


def is_meta(model) -> bool:
    return any(p.is_meta for p in model.parameters())


@torch.no_grad()
def init_sharded(model, device: torch.device | str, seed: int, alias: dict[str, str] | None = None) -> None:
    """Materialise a meta-device (possibly sharded, pruned) Transformer on `device` with build_model's values.

    Args:
        model: a Transformer whose parameters are on the meta device, plain or DTensor.
        device: where this rank's shards live.
        seed: the seed build_model(seed=) would have used.
        alias: parameter names this model holds under another name in the whole model (a pipeline's
            last-stage copy of a tied head: {"lm_head.weight": "model.embed_tokens.weight"}).
    """
    from ..model import Transformer, init_parameter_

    cfg = model.config
    with torch.device("meta"):
        whole = Transformer(cfg)  # only for the names, shapes and order of every parameter
    model.to_empty(device=device)
    held: dict[str, list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        held.setdefault((alias or {}).get(name, name), []).append(p)
    generator = torch.Generator().manual_seed(seed)
    for name, ref in whole.named_parameters():
        full = torch.empty(ref.shape, dtype=torch.float32)
        init_parameter_(name, full, cfg, generator)
        for p in held.get(name, []):
            _copy_shard(p, full)
    # (to_empty recomputed the rotary frequencies on `device`: Transformer._apply does.)


def _copy_shard(p: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's part of `full` into `p` (a DTensor's local shard, or the whole tensor)."""
    if hasattr(p, "placements"):
        from torch.distributed.tensor import distribute_tensor

        # src_data_rank=None: every rank drew the same full tensor, so each slices its own (no traffic).
        local = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()
        p.to_local().copy_(local)
    else:
        p.copy_(full)
