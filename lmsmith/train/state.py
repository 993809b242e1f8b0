"""Run state: atomic checkpoints with `train_state/`, resume, RNG.

A checkpoint is `out_dir/checkpoints/step-XXXXXXX/`: a loadable Hugging Face
directory (written by `lmsmith.checkpoint.save`) plus `train_state/`. When only
some parameters train (LoRA, prompt/prefix tuning: the base is frozen), the
folder holds just those, by name, in `trainable.safetensors` plus `train_state/`:
a checkpoint of a LoRA run on an 8B model is megabytes, not 16 GB.

    train_state/optimizer.safetensors   optimizer tensors (exp_avg, exp_avg_sq, step)
    train_state/rng.safetensors         torch CPU/CUDA generator states
    train_state/state.json              step, optimizer param groups, numpy/python RNG,
                                        data iterator state, TrainConfig, metrics so far

Nothing is pickled. The whole folder is written under a hidden temporary name
and renamed into place, so a crash mid-write never leaves a directory that
looks like a checkpoint: every `step-*` folder is complete.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import LmsmithError

STEP_RE = re.compile(r"^step-(\d{7,})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


# ---- RNG -------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed python, numpy (if installed) and torch (CPU and every CUDA device)."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def get_rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, json-able) describing every RNG the loop may touch."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    v, internal, gauss = random.getstate()
    info: dict[str, Any] = {"python": [v, list(internal), gauss]}
    try:
        import numpy as np
        name, keys, pos, has_gauss, cached = np.random.get_state()
        info["numpy"] = [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    except ImportError:
        pass
    return tensors, info


def set_rng_state(tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = sorted((k for k in tensors if k.startswith("torch_cuda_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda][: torch.cuda.device_count()])
    v, internal, gauss = info["python"]
    random.setstate((v, tuple(internal), gauss))
    if "numpy" in info:
        try:
            import numpy as np
            name, keys, pos, has_gauss, cached = info["numpy"]
            np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
        except ImportError:
            pass


# ---- optimizer state (safetensors + JSON, never pickle) ---------------------------------


def optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for name, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{name}"] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_files(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                         meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ---- writing a checkpoint ---------------------------------------------------------------


def save_model(model, tokenizer, path: Path, ranks=None, checkpoint: Path | None = None) -> Path:
    """Write the final model as an HF directory, atomically (by rank 0; a sharded model is gathered one
    tensor at a time; pipeline stages are read back one tensor at a time from `checkpoint`, the sharded
    checkpoint of the same step)."""
    from ..checkpoint import save

    if ranks is None or not ranks.distributed:
        return save(model, tokenizer, path)
    if ranks.pipeline is not None:
        from ..distributed.dcp import stored_tensors

        ranks.barrier()
        if ranks.main:  # every stage's tensors read back from the checkpoint, one at a time
            meta, fetch = stored_tensors(checkpoint, model.config)
            save(meta, tokenizer, path, fetch=fetch)
    elif ranks.shards_weights:
        # Streamed: each sharded tensor is gathered in turn (every rank joins), written by rank 0 and
        # dropped, so no rank ever holds the whole model (`fileio.write_safetensors`).
        if ranks.main:
            save(model, tokenizer, path)
        else:
            from ..checkpoint import state_dict_for_save
            from ..fileio import gather_in_turn

            gather_in_turn(state_dict_for_save(model))
    elif ranks.main:
        save(model, tokenizer, path)
    ranks.barrier()
    return path


TRAINABLE_FILE = "trainable.safetensors"


def save_checkpoint(ckpt_root: Path, step: int, *, model, tokenizer, optimizer, config: dict,
                    data_state: Any, rng: tuple[dict, dict], metrics: list[dict],
                    extra: dict | None = None, trainable: dict[str, torch.Tensor] | None = None,
                    ranks=None) -> Path:
    """Write `ckpt_root/step-XXXXXXX/` atomically (HF directory + train_state/); return its path.

    With `trainable` ({name: parameter}) only those tensors are written (`trainable.safetensors`),
    not the whole model: the frozen rest is rebuilt from the base on resume. When the weights are
    sharded over ranks (FSDP, TP) every rank writes its shards (`distributed.dcp`); replicated weights
    (DDP) are written by rank 0 alone, as one process would.
    """
    if ranks is not None and ranks.distributed:
        return _save_on_ranks(ckpt_root, step, ranks, model=model, tokenizer=tokenizer, optimizer=optimizer,
                              config=config, data_state=data_state, rng=rng, metrics=metrics, extra=extra,
                              trainable=trainable)
    ckpt_root = Path(ckpt_root)
    ckpt_root.mkdir(parents=True, exist_ok=True)
    opt_tensors, rng_tensors, state_json = _state_files(optimizer, rng, step=step, config=config,
                                                        data_state=data_state, metrics=metrics, extra=extra,
                                                        sharded=False)

    def write_train_state(directory: Path) -> None:
        ts = directory / "train_state"
        ts.mkdir()
        save_file(opt_tensors, str(ts / "optimizer.safetensors"))
        save_file(rng_tensors, str(ts / "rng.safetensors"))
        (ts / "state.json").write_text(state_json)

    from ..checkpoint import save
    from ..fileio import save_atomic_dir

    final = ckpt_root / step_dir_name(step)
    if trainable is not None:
        def write(directory: Path) -> None:
            save_file({k: v.detach().to("cpu").contiguous() for k, v in trainable.items()},
                      str(directory / TRAINABLE_FILE))
            write_train_state(directory)

        return save_atomic_dir(final, write)
    # One atomic write for the HF files and train_state/ together.
    save(model, tokenizer, final, extra=write_train_state)
    return final


def _state_files(optimizer, rng, *, step, config, data_state, metrics, extra, sharded: bool):
    """(optimizer tensors, rng tensors, state.json text) of a checkpoint; sharded runs keep the
    optimizer in dcp/ instead."""
    opt_tensors, opt_meta = ({}, None) if sharded else optimizer_to_files(optimizer)
    rng_tensors, rng_info = rng
    state = {"format": 2 if sharded else 1, "step": step, "optimizer": opt_meta, "rng": rng_info,
             "data_state": data_state, "config": config, "metrics": metrics, **(extra or {})}
    try:
        return opt_tensors, rng_tensors, json.dumps(state)
    except TypeError as e:
        raise LmsmithError(f"training state is not JSON-serialisable ({e}); the data iterator's "
                           "state_dict() must return plain lists/dicts/numbers/strings") from None


def _save_on_ranks(ckpt_root: Path, step: int, ranks, *, model, tokenizer, optimizer, config, data_state, rng,
                   metrics, extra, trainable) -> Path:
    """A checkpoint of a distributed run: rank 0 alone for replicated weights, every rank for shards."""
    import contextlib

    from ..fileio import atomic_dir

    final = Path(ckpt_root) / step_dir_name(step)
    if not ranks.shards_weights:
        if ranks.main:
            save_checkpoint(ckpt_root, step, model=model, tokenizer=tokenizer, optimizer=optimizer, config=config,
                            data_state=data_state, rng=rng, metrics=metrics, extra=extra, trainable=trainable)
        ranks.barrier()
        return final
    from ..distributed.dcp import save_sharded

    _, rng_tensors, state_json = _state_files(optimizer, rng, step=step, config=config, data_state=data_state,
                                              metrics=metrics, extra=extra, sharded=True)
    with contextlib.ExitStack() as stack:
        tmp = None
        if ranks.main:
            Path(ckpt_root).mkdir(parents=True, exist_ok=True)
            tmp = str(stack.enter_context(atomic_dir(final)))
        tmp = Path(ranks.broadcast(tmp))  # every rank writes into rank 0's temporary folder
        save_sharded(tmp, model, optimizer, trainable_only=trainable is not None, alias=_alias(ranks))
        ranks.barrier()
        if ranks.main:
            _write_model_card(model, tokenizer, tmp)
            ts = tmp / "train_state"
            ts.mkdir()
            save_file(rng_tensors, str(ts / "rng.safetensors"))
            (ts / "state.json").write_text(state_json)
    ranks.barrier()  # rank 0 has renamed the folder into place
    return final


def _write_model_card(model, tokenizer, directory: Path) -> None:
    """config.json and the tokenizer of a sharded checkpoint (its weights are in dcp/)."""
    from ..checkpoint import CONFIG_NAME, special_ids
    from ..fileio import write_json

    ids = special_ids(tokenizer)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")  # the training weights' dtype
    write_json(directory / CONFIG_NAME, model.config.to_hf(bos_id=ids["bos_id"], eos_id=ids["eos_id"],
                                                           pad_id=ids["pad_id"], torch_dtype=dtype))
    if tokenizer is not None:
        tokenizer.save(directory)


# ---- finding and reading checkpoints ----------------------------------------------------


def list_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `ckpt_root`, oldest first (temporary folders ignored)."""
    ckpt_root = Path(ckpt_root)
    if not ckpt_root.is_dir():
        return []
    found = []
    for p in ckpt_root.iterdir():
        m = STEP_RE.match(p.name)
        if m and (p / "train_state" / "state.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    found = list_checkpoints(ckpt_root)
    return found[-1][1] if found else None


def prune_checkpoints(ckpt_root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints, and leftover temporary folders."""
    found = list_checkpoints(ckpt_root)
    for _, path in found[: max(0, len(found) - keep_last)]:
        shutil.rmtree(path, ignore_errors=True)


def clean_temporaries(out_dir: Path) -> None:
    """Remove what a killed run left half-written in its run folder (none of it ever counts as a result).

    The atomic writers (`fileio.atomic_dir`) put a folder together under `<name>.tmp-*` and move the
    previous copy to `<name>.old-*` during the swap: `checkpoints/step-XXXXXXX`, `final`, `adapter`,
    `merged`, `tokenizer` and the shard folder `data`.
    """
    out_dir = Path(out_dir)
    pattern = re.compile(r"^(step-\d+|final|adapter|merged|tokenizer|data)\.(tmp|old)-")
    for folder in (out_dir, out_dir / "checkpoints"):
        if folder.is_dir():
            for p in folder.iterdir():
                if pattern.match(p.name) and p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)


def load_model_weights(model, path: Path) -> None:
    """Copy the weights of a checkpoint folder into `model` in place (exact, no dtype change).

    An adapter-only checkpoint (`trainable.safetensors`) sets just the parameters it names;
    every one of them must exist in `model` (the same method and settings as the run)."""
    path = Path(path)
    if (path / TRAINABLE_FILE).exists():
        named = dict(model.named_parameters())
        saved = load_file(str(path / TRAINABLE_FILE))
        bad = [k for k, v in saved.items() if k not in named or named[k].shape != v.shape]
        if bad:
            raise LmsmithError(f"{path / TRAINABLE_FILE}: {bad[0]!r} does not fit the model being trained; "
                               f"resume with the same method and settings (rank, virtual tokens, targets)")
        with torch.no_grad():
            for k, v in saved.items():
                named[k].copy_(v)
        return
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise LmsmithError(f"{path}: no *.safetensors weights found; is this a checkpoint folder?")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    tied = getattr(model.config, "tie_embeddings", False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise LmsmithError(f"{path}: weights do not match the model (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}); resume with the same model config")
    if tied:
        model.tie_weights()


class _Unreadable(Exception):
    """A checkpoint file that parses but does not hold what a checkpoint must."""


def restore_latest(ckpt_root: Path, model, optimizer, batches, device, grad_accum: int, *, ranks=None,
                   trainable_only: bool = False) -> tuple[Path, dict] | None:
    """Load the newest checkpoint that reads back completely into model, optimizer, data iterator and RNGs.

    A damaged checkpoint (state.json, optimizer, RNG or weight file unreadable: a disk error, a copy
    cut short) is reported and skipped for the next older one. Returns (path, state.json dict), or
    None when there is no checkpoint at all.
    Any checkpoint loads into any layout (`ranks`): a sharded one (dcp/) is resharded, a
    single-process one split into this run's shards.

    Raises:
        LmsmithError: when checkpoints exist but none is readable, or one does not fit the model.
    """
    from safetensors import SafetensorError

    found = list_checkpoints(ckpt_root)
    for i, (_, path) in enumerate(reversed(found)):
        try:
            state, opt_tensors, rng_tensors = load_train_state(path)
            _load_weights_and_optimizer(path, state, opt_tensors, model, optimizer, device, ranks, trainable_only)
        except (OSError, ValueError, KeyError, TypeError, IndexError, SafetensorError, RuntimeError,
                _Unreadable) as e:
            older = found[-2 - i][1] if i + 1 < len(found) else None
            why = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            if older is None:
                raise LmsmithError(f"{path}: checkpoint unreadable ({why}) and no older one to fall back to; "
                                   "start afresh with --overwrite") from None
            print(f"warning: {path} is unreadable ({why}); resuming from the older {older.name}", file=sys.stderr)
            continue
        if hasattr(batches, "load_state_dict") and state.get("data_state") is not None:
            batches.load_state_dict(state["data_state"])
        else:
            # No iterator state: replay the consumed batches so the data lines up.
            for _ in range(state["step"] * grad_accum):
                next(batches)
        set_rng_state(rng_tensors, state["rng"])
        return path, state
    return None


def _load_weights_and_optimizer(path: Path, state: dict, opt_tensors: dict, model, optimizer, device, ranks,
                                trainable_only: bool) -> None:
    """Any checkpoint into this run's model and optimizer, whatever layout either was written with:
    a sharded one (dcp/) is resharded, a single-process one is split into this run's shards."""
    from ..distributed.dcp import is_dcp_checkpoint, load_full, load_sharded

    if is_dcp_checkpoint(path):
        load_sharded(path, model, optimizer, trainable_only, alias=_alias(ranks))
    elif ranks is not None and ranks.shards_weights:
        files = [path / TRAINABLE_FILE] if (path / TRAINABLE_FILE).exists() else sorted(path.glob("*.safetensors"))
        weights = {}
        for f in files:
            weights.update(load_file(str(f)))
        alias = {v: k for k, v in _alias(ranks).items()}  # the embedding's entries feed a pipeline's tied head
        if ranks.pipeline is not None:
            # This stage holds some of the parameters: name the one-process optimizer's by the whole model's order.
            from ..model import build_model
            from .optim import param_groups

            whole = build_model(model.config, init=False)
            names = {id(p): n for n, p in whole.named_parameters()}
            order = [alias.get(names[id(p)], names[id(p)]) for g in param_groups(whole, 0.0) for p in g["params"]]
            weights.update({alias[k]: weights[k] for k in alias if k in weights})
        else:
            names = {id(p): n for n, p in model.named_parameters()}
            order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
        own = {n for n, _ in model.named_parameters()} | set(model.state_dict())
        load_full(model, optimizer, {k: v for k, v in weights.items() if k in own}, opt_tensors, state["optimizer"],
                  order, trainable_only, keep=own)
    else:
        load_model_weights(model, path)
        optimizer_from_files(optimizer, {k: v.to(device) for k, v in opt_tensors.items()}, state["optimizer"])


def _alias(ranks) -> dict[str, str]:
    """Parameter renames for checkpoints of this rank (a pipeline's copy of a tied head)."""
    return ranks.pipeline.alias if ranks is not None and ranks.pipeline is not None else {}


def load_train_state(path: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(state.json dict, optimizer tensors, rng tensors) of a checkpoint folder."""
    ts = Path(path) / "train_state"
    state = json.loads((ts / "state.json").read_text(encoding="utf-8"))
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or \
            not isinstance(state.get("metrics"), list) or "optimizer" not in state or "rng" not in state:
        raise _Unreadable(f"{ts / 'state.json'} lacks step, metrics, optimizer or rng")
    opt = ts / "optimizer.safetensors"
    opt_tensors = load_file(str(opt)) if state.get("format", 1) < 2 else {}  # format 2: optimizer in dcp/
    return state, opt_tensors, load_file(str(ts / "rng.safetensors"))
