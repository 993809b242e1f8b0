"""Sharded checkpoints with torch.distributed.checkpoint (DCP), resumable on any world size or layout.

A distributed run's checkpoint folder is the single-process one with the weights and optimizer state
replaced by a DCP folder that every rank writes its own shards into:

    step-XXXXXXX/dcp/             .metadata + one __<rank>_0.distcp per rank (model + optimizer, by name)
    step-XXXXXXX/train_state/     state.json and rng.safetensors, as in a single-process checkpoint
    step-XXXXXXX/config.json ...  the model's config and tokenizer (no weights: see dcp/)

DCP stores every tensor under its parameter name with its global shape, and reads back whatever
slices the loading rank's sharding needs, so 2 ranks -> 1, 1 -> 2 or FSDP -> FSDP x TP all resume.
A single-process checkpoint (full weights + optimizer by index) loads into a sharded model too
(`load_full`). The folder is assembled under a temporary name and renamed by rank 0 after every rank
has written, so a crash never leaves a folder that looks complete.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .ranks import Ranks

DCP_DIR = "dcp"


def is_dcp_checkpoint(path: Path) -> bool:
    return (Path(path) / DCP_DIR / ".metadata").is_file()


def _options(trainable_only: bool, full: bool = False):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=trainable_only, full_state_dict=full, strict=not trainable_only)


def save_sharded(directory: Path, model, optimizer, trainable_only: bool) -> None:
    """Every rank writes its shards of the model's and optimizer's state into `directory/dcp`
    (with `trainable_only`, just the trained parameters: an adapter run's frozen base is rebuilt)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer, options=_options(trainable_only))
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(Path(directory) / DCP_DIR))


def load_sharded(directory: Path, model, optimizer, trainable_only: bool) -> None:
    """Read `directory/dcp` into this process's (sharded or plain) model and optimizer, resharding."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    opts = _options(trainable_only)
    msd, osd = get_state_dict(model, optimizer, options=opts)
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=str(Path(directory) / DCP_DIR))
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"], options=opts)


def load_full(model, optimizer, weights: dict[str, torch.Tensor], opt_tensors: dict[str, torch.Tensor],
              opt_meta: dict, param_names: list[str], trainable_only: bool) -> None:
    """A single-process checkpoint (full tensors; optimizer state keyed by parameter index) into a
    sharded model: each rank keeps its slices. `param_names[i]` names the optimizer's i-th parameter."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state: dict[str, dict] = {}
    for key, value in opt_tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(param_names[int(idx)], {})[name] = value
    for key, value in opt_meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(param_names[int(idx)], {})[name] = value
    groups, start = [], 0
    for g in opt_meta["param_groups"]:
        g = dict(g)
        n = len(g["params"])
        g["params"] = param_names[start:start + n]
        start += n
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    set_state_dict(model, optimizer, model_state_dict=weights,
                   optim_state_dict={"state": state, "param_groups": groups},
                   options=_options(trainable_only, full=True))


def full_state_dict(model, ranks: Ranks) -> dict[str, torch.Tensor]:
    """The whole model's weights as plain CPU tensors on rank 0 (empty elsewhere), gathered for final/."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def plain_copy(model, state: dict[str, torch.Tensor]):
    """A plain (unsharded, CPU) Transformer with `state`'s weights, to write as an HF directory."""
    from ..model import build_model

    plain = build_model(model.config, init=False)
    plain.load_state_dict(state, strict=False, assign=True)
    plain.tie_weights()
    plain.reset_buffers()
    return plain


def gathered_lora(model, ranks: Ranks, lora_cfg):
    """A plain CPU copy of a sharded LoRA model on rank 0 (None elsewhere), to save the adapter and merge."""
    from ..adapters.lora import apply_lora

    full = full_state_dict(model, ranks)
    if not ranks.main:
        return None
    from ..model import build_model

    plain = build_model(model.config, init=False)
    apply_lora(plain, lora_cfg)  # the same modules, still on the meta device, then the gathered tensors
    plain.load_state_dict(full, strict=False, assign=True)
    plain.tie_weights()
    plain.reset_buffers()
    return plain
