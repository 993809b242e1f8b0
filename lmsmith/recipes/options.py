"""Options shared by the training recipes: flags generated from TrainConfig, and
defaults < (with --resume: the run's saved OUT/config.yaml) < --config YAML < flags
resolution with clear errors."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path

from ..errors import LmsmithError


def add_run_arguments(p: argparse.ArgumentParser, defaults: dict) -> None:
    """--config, --out, --resume, --overwrite: what every training recipe's run folder needs."""
    g = p.add_argument_group("run")
    g.add_argument("--config", metavar="FILE.yaml", help="YAML file with any of these options (flags override it)")
    g.add_argument("--out", help=f"run folder (default: {defaults['out']})")
    g.add_argument("--resume", action="store_true", default=None,
                   help="continue the run in --out exactly, with the options it saved in OUT/config.yaml "
                        "(flags given now override them)")
    g.add_argument("--overwrite", action="store_true", default=None,
                   help="start afresh even if --out holds a run (its checkpoints and results are deleted; "
                        "for pretraining also the tokenizer and shards it made)")


def prepare_run_folder(out, resume: bool, overwrite: bool, inputs: dict | None = None,
                       made: tuple[str, ...] = ()) -> None:
    """Create the run folder `out`; refuse to mix a new run into an old one unless told how.

    With `overwrite`, the old run's checkpoints and results (final/, adapter/, merged/ and the recipe's
    own `made` folders) are deleted, but never an input: `inputs` maps a flag to the path it names, and
    one inside a folder about to be deleted is an error before anything is touched.
    """
    import shutil
    from pathlib import Path

    out = Path(out)
    if resume and overwrite:
        raise LmsmithError("--resume continues the run in --out and --overwrite starts it afresh; pass one")
    ckpts = out / "checkpoints"
    if ckpts.exists() and any(ckpts.iterdir()) and not resume and not overwrite:
        raise LmsmithError(f"{out} already holds a run; pass --resume to continue it, "
                           "--out NEWDIR for a new one, or --overwrite to start afresh")
    if overwrite:
        doomed = [out / d for d in ("checkpoints", "final", "adapter", "merged", *made)]
        for flag, path in (inputs or {}).items():
            if path and any(Path(path).resolve().is_relative_to(d.resolve()) for d in doomed):
                raise LmsmithError(f"{flag} {path} is inside the run folder that --overwrite would delete; "
                                   "copy it elsewhere or use another --out")
        # The old run's results go too: an interrupted new run must not sit next to the old final model.
        for d in doomed:
            if d.is_symlink():  # a link to storage elsewhere: drop the link, not what it points to
                d.unlink()
            else:
                shutil.rmtree(d, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


def train_fields(skip: set[str]) -> list[tuple[dataclasses.Field, type]]:
    """TrainConfig's fields (and their resolved types) that a recipe offers as flags."""
    from ..train import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    return [(f, hints[f.name]) for f in dataclasses.fields(TrainConfig) if f.name not in skip]


def field_docs() -> dict[str, str]:
    """TrainConfig's per-field descriptions, read from its docstring's `Attributes:` section."""
    import re

    from ..train import TrainConfig

    docs: dict[str, str] = {}
    for names, text in re.findall(r"^\s{8}([\w, ]+): (.+(?:\n\s{12}.+)*)", TrainConfig.__doc__ or "", re.M):
        for name in names.split(","):
            docs[name.strip()] = " ".join(text.split())
    return docs


def add_train_flags(group, defaults: dict, skip: set[str], docs: dict[str, str] | None = None) -> None:
    """One flag per TrainConfig field: --lr, --warmup-steps, --dtype, --compile/--no-compile, ..."""
    described = field_docs()
    for f, tp in train_fields(skip):
        flag = "--" + f.name.replace("_", "-")
        default = (docs or {}).get(f.name, f"default: {defaults.get(f.name, f.default)}")
        doc = f"{described.get(f.name, '')} ({default})".strip().replace("%", "%%")
        if tp is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=doc)
        else:
            # `float | None` (peak_flops) takes a float; anything else non-numeric a string.
            base = next((t for t in (tp, *typing.get_args(tp)) if t in (int, float)), str)
            group.add_argument(flag, type=base, default=None, help=doc)


# The resolved options of a run, written at its start and read back by --resume.
CONFIG_FILE = "config.yaml"
# Saved options a resume does not bring back: how the terminal shows the run is the caller's business.
_NOT_RESTORED = ("resume", "overwrite", "progress")


def save_options(out, opts: dict, path_keys: tuple[str, ...] = ()) -> None:
    """Write `opts` to OUT/config.yaml atomically, the options in `path_keys` as absolute paths (so
    `--resume` works from any directory)."""
    import os

    import yaml

    from ..fileio import atomic_file

    saved = {**opts, **{k: os.path.abspath(opts[k]) for k in path_keys if opts.get(k)}}
    with atomic_file(Path(out) / CONFIG_FILE) as fh:
        fh.write(yaml.safe_dump(saved, sort_keys=True))


def resolve(args: argparse.Namespace, defaults: dict, skip: set[str],
            conflicts: dict[str, tuple[str, ...]] | None = None) -> dict:
    """defaults < YAML file (args.config) < flags; unknown YAML keys are an error naming the valid ones.

    With --resume, the options the run saved in OUT/config.yaml come between the defaults and the YAML
    file, so `--out OUT --resume` alone continues with the same data, model and hyperparameters.
    `conflicts` names options that yield to one given now, whether they come from the defaults or the saved
    run (e.g. a new --max-steps drops the saved --tokens and the default --time, which would otherwise decide
    the run's length), unless they are given now too.
    """
    opts = dict(defaults)
    for f, _ in train_fields(skip):
        opts.setdefault(f.name, f.default)
    explicit = _explicit(args, opts)
    out = explicit.get("out", opts.get("out"))
    if explicit.get("resume") and out and (Path(out) / CONFIG_FILE).is_file():
        saved = _read_yaml(Path(out) / CONFIG_FILE)
        opts.update({k: v for k, v in saved.items() if k in opts and k not in _NOT_RESTORED})
    for given in explicit:
        for k in (conflicts or {}).get(given, ()):
            if k not in explicit:
                opts[k] = None
    opts.update(explicit)
    return opts


def _explicit(args: argparse.Namespace, opts: dict) -> dict:
    """What the user set this time: the --config file's options, then the flags given."""
    explicit: dict = {}
    if getattr(args, "config", None):
        loaded = {k.replace("-", "_"): v for k, v in _read_yaml(args.config).items()}
        unknown = sorted(set(loaded) - set(opts))
        if unknown:
            raise LmsmithError(f"{args.config}: unknown option(s) {', '.join(unknown)}; "
                               f"valid: {', '.join(sorted(opts))}")
        explicit.update(loaded)
    for key, value in vars(args).items():
        if key in opts and value is not None:
            explicit[key] = value
    return explicit


def _read_yaml(path) -> dict:
    """A YAML mapping of option: value; a clear one-line error for a missing file, bad YAML or a non-mapping."""
    import yaml

    try:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise LmsmithError(f"{path}: no such config file") from None
    except yaml.YAMLError as e:
        raise LmsmithError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(loaded, dict):
        raise LmsmithError(f"{path}: expected a mapping of option: value")
    return loaded
