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


def _renamed(msd: dict, osd: dict, alias: dict[str, str]) -> tuple[dict, dict]:
    """State dicts in their stored form: a tied head dropped from the model's (it is the embedding), and
    parameter names mapped through `alias` (model keys, optimizer state keys, param-group names)."""
    if "model.embed_tokens.weight" in msd and "lm_head.weight" in msd and _same(msd["lm_head.weight"],
                                                                                msd["model.embed_tokens.weight"]):
        msd = {k: v for k, v in msd.items() if k != "lm_head.weight"}  # a tied head is stored as the embedding
    if not alias:
        return msd, osd
    msd = {alias.get(k, k): v for k, v in msd.items()}
    osd = {"state": {alias.get(k, k): v for k, v in osd["state"].items()},
           "param_groups": [{**g, "params": [alias.get(n, n) for n in g["params"]]} for g in osd["param_groups"]]}
    return msd, osd


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two state-dict entries are one parameter (state_dict() detaches: compare storage)."""
    a, b = (t.to_local() if hasattr(t, "to_local") else t for t in (a, b))
    return a.shape == b.shape and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def save_sharded(directory: Path, model, optimizer, trainable_only: bool, alias: dict[str, str] | None = None
                 ) -> None:
    """Every rank writes its shards of the model's and optimizer's state into `directory/dcp`
    (with `trainable_only`, just the trained parameters: an adapter run's frozen base is rebuilt).

    `alias` renames parameters to their canonical names: a pipeline's last-stage copy of a tied head is
    stored as the embedding it equals, so every layout finds it under one name."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = _renamed(*get_state_dict(model, optimizer, options=_options(trainable_only)), alias or {})
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(Path(directory) / DCP_DIR))


def load_sharded(directory: Path, model, optimizer, trainable_only: bool, alias: dict[str, str] | None = None
                 ) -> None:
    """Read `directory/dcp` into this process's (sharded or plain) model and optimizer, resharding."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    opts = _options(trainable_only)
    alias = alias or {}
    full_msd, osd = get_state_dict(model, optimizer, options=opts)
    msd, osd = _renamed(full_msd, osd, alias)
    # Only the tensors are read: the param groups (hyperparameters; the loop sets the LR every step)
    # stay this run's, since each rank of a pipeline wrote its own stage's groups and DCP keeps one.
    sd = {"model": msd, "optim": {"state": osd["state"]}}
    dcp.load(sd, checkpoint_id=str(Path(directory) / DCP_DIR))
    back = {v: k for k, v in alias.items()}
    msd, osd = _renamed(sd["model"], {"state": sd["optim"]["state"], "param_groups": osd["param_groups"]}, back)
    for k in full_msd.keys() - msd.keys():  # the tied head, stored once as the embedding
        msd[k] = msd["model.embed_tokens.weight"]
    set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd, options=opts)


def load_full(model, optimizer, weights: dict[str, torch.Tensor], opt_tensors: dict[str, torch.Tensor],
              opt_meta: dict, param_names: list[str], trainable_only: bool, keep: set[str] | None = None) -> None:
    """A single-process checkpoint (full tensors; optimizer state keyed by parameter index) into a
    sharded model: each rank keeps its slices. `param_names[i]` names the optimizer's i-th parameter;
    only names in `keep` (a pipeline stage's) are loaded."""
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
        if keep is not None:
            g["params"] = [name for name in g["params"] if name in keep]
        if g["params"]:
            groups.append(g)
    if keep is not None:
        state = {k: v for k, v in state.items() if k in keep}
    set_state_dict(model, optimizer, model_state_dict=weights,
                   optim_state_dict={"state": state, "param_groups": groups},
                   options=_options(trainable_only, full=True))


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The whole model's weights as plain CPU tensors on rank 0 (empty elsewhere), gathered for final/."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def gathered_copy(model, ranks: Ranks, lora_cfg=None):
    """A plain (unsharded, CPU) copy of a sharded model on rank 0 (None elsewhere), to write as an HF
    directory, or with `lora_cfg` as an adapter (and merged); a prompt-tuned model comes back as a plain
    PromptTunedModel with the trained prompt. Every rank takes part in the gather."""
    from ..adapters.prompt_tuning import PromptTunedModel

    full = full_state_dict(model)
    if not ranks.main:
        return None
    from ..model import build_model

    prompt = isinstance(model, PromptTunedModel)
    plain = build_model(model.base.config if prompt else model.config, init=False)
    if lora_cfg is not None:
        from ..adapters.lora import apply_lora

        apply_lora(plain, lora_cfg)  # the same modules, still on the meta device, then the gathered tensors
    plain.load_state_dict(full, strict=False, assign=True)
    plain.tie_weights()
    plain.reset_buffers()
    if prompt:  # the wrapper's own tensors (table, encoder, token rows, prefix) over a fresh wrapper's
        plain = PromptTunedModel(plain, model.prompt_config)
        plain.load_state_dict(full, strict=False)
    return plain


def stored_tensors(path: Path, config):
    """(a meta-device Transformer of `config`, fetch(name) -> that weight read from the sharded checkpoint
    at `path` by this process alone): every stage's shards, one tensor at a time (a pipeline run's final
    model, written by rank 0 without building the whole model)."""
    import torch.distributed.checkpoint as dcp

    from ..model import build_model

    meta = build_model(config, init=False)
    shapes = _renamed(meta.state_dict(), {}, {})[0]  # a tied head once, as the embedding

    def fetch(name: str) -> torch.Tensor:
        t = torch.empty(shapes[name].shape, dtype=shapes[name].dtype)
        dcp.load({"model": {name: t}}, checkpoint_id=str(Path(path) / DCP_DIR), no_dist=True)
        return t

    return meta, fetch
