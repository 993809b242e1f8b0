"""`lmsmith pretrain`: self-supervised next-token training on raw text.

Read top to bottom: resolve the options (defaults < --config YAML < flags) ->
tokenizer (given, or trained on the corpus) -> token shards (given, or prepared)
-> model (a preset, or continued from a directory) -> the one training loop ->
summary. With no arguments it trains the `tiny` preset on the built-in corpus
(the Python standard library's source, the interpreter's documentation topics
and worked examples of the synthetic tasks) in about 10 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import math
import os
import time
import typing
from pathlib import Path

from ..precision import describe_policy
from ..train.budget import format_duration
from .options import add_run_arguments, add_train_flags, prepare_run_folder, resolve, save_options, train_fields
from .parallel import add_parallel_arguments, on_ranks, start_ranks

HELP = "pretrain a model on raw text (default: the built-in Python corpus, at most 10 min)"
DESCRIPTION = """Pretrain a decoder-only model by next-token prediction on raw text.

With no arguments: train a 4096-token BPE tokenizer and the `tiny` preset on the
built-in corpus (the Python standard library's source and pydoc topics, found
from this interpreter, plus worked examples of the `lmsmith data synth` tasks
as plain text; no download) for a budget that ends in about 10 minutes
on 2 CPU cores, writing everything under runs/pretrain/.

Data: --source NAME=PATH[:WEIGHT] (repeatable; text files, folders, .jsonl,
.parquet) is tokenized into OUT/data; or --data DIR uses shards made by
`lmsmith data prepare` (then --tokenizer, or --init-from's tokenizer, is required). Weights set how often
each source is sampled.

Options come from the defaults, then --config FILE.yaml (keys are the long
option names with '_' for '-', plus `model:` with ModelConfig fields such as
dim or n_layers), then flags. The resolved options are saved in OUT/config.yaml.

Interrupt with Ctrl-C at any time: a checkpoint is written and
`lmsmith pretrain --out OUT --resume` continues exactly where it stopped."""

# The default job: sized so the whole run (tokenizer, shards, training) ends in ~10 minutes on 2 cores.
DEFAULTS: dict[str, typing.Any] = {
    "preset": "tiny",
    "out": "runs/pretrain",
    "source": None,
    "data": None,
    "tokenizer": None,
    "init_from": None,
    "vocab_size": None,
    "batch_size": 16,
    "seq_len": 256,
    "max_steps": 2000,
    "tokens": None,
    # The default job stops at 2,000 steps or 10 minutes, whichever comes first: a CPU without bf16
    # trains ~5x slower. An explicit --max-steps or --tokens drops the time limit, an explicit --time the step cap.
    "time": "10m",
    "resume": False,
    "overwrite": False,
    "sample_prompt": "def ",
    "sample_every": 500,
    "lr": 2e-3,
    "warmup_steps": 100,
    "eval_every": 250,
    "eval_batches": 20,
    "save_every": 250,
    "log_every": 10,
    "model": None,
}
# TrainConfig fields not offered as flags (set through other options or not meaningful here).
_SKIP_TRAIN_FIELDS = {"max_steps", "betas", "sample_prompt", "time_budget"}
# The three ways to size a run; one given now clears the others' defaults and saved values.
BUDGET_CONFLICTS = {"max_steps": ("tokens", "time"), "tokens": ("max_steps", "time"), "time": ("max_steps", "tokens")}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p, DEFAULTS)
    g = p.add_argument_group("data")
    g.add_argument("--source", action="append", metavar="NAME=PATH[:WEIGHT]",
                   help="a corpus source (repeatable); default: the built-in Python corpus")
    g.add_argument("--data", metavar="DIR", help="token shards made by `lmsmith data prepare`")
    g.add_argument("--tokenizer", metavar="DIR",
                   help="tokenizer directory (default: the --init-from model's, else train one on the corpus)")
    g.add_argument("--vocab-size", type=int, help="vocabulary of the trained tokenizer (default: the preset's)")
    g = p.add_argument_group("model")
    g.add_argument("--preset", help=f"model shape (default: {DEFAULTS['preset']}; see `lmsmith info PRESET`)")
    g.add_argument("--init-from", metavar="DIR", help="continue pretraining this model directory instead")
    g = p.add_argument_group("budget and batch")
    g.add_argument("--max-steps", type=int, help=f"optimizer steps (default: {DEFAULTS['max_steps']})")
    g.add_argument("--tokens", type=float, help="token budget instead of --max-steps (e.g. 2e7)")
    g.add_argument("--time", metavar="DURATION",
                   help="wall-time budget of the whole command, e.g. 90s, 10m, 1h30m: after a few steps the "
                        "run measures its speed and sets its step count and LR schedule to end on time "
                        f"(default: {DEFAULTS['time']} or {DEFAULTS['max_steps']:,} steps, whichever comes first)")
    g.add_argument("--batch-size", type=int, help=f"sequences per micro-batch (default: {DEFAULTS['batch_size']})")
    g.add_argument("--seq-len", type=int, help=f"tokens per sequence (default: {DEFAULTS['seq_len']})")
    g.add_argument("--sample-prompt", help=f"prompt of the samples (default: {DEFAULTS['sample_prompt']!r})")
    add_train_flags(p.add_argument_group("optimisation (the training loop's TrainConfig)"), DEFAULTS,
                    _SKIP_TRAIN_FIELDS)
    add_parallel_arguments(p)


def resolve_options(args: argparse.Namespace) -> dict:
    """defaults < YAML file < flags (see recipes/options.py)."""
    from ..errors import LmsmithError
    from ..train.budget import parse_duration

    opts = resolve(args, DEFAULTS, _SKIP_TRAIN_FIELDS, conflicts=BUDGET_CONFLICTS)
    if isinstance(opts["source"], str):
        opts["source"] = [opts["source"]]
    if opts["time"] is not None:
        opts["time"] = parse_duration(opts["time"])
    if opts["tokens"] is not None and not (math.isfinite(float(opts["tokens"])) and float(opts["tokens"]) >= 1):
        raise LmsmithError(f"--tokens {opts['tokens']}: must be a positive number of tokens, e.g. 2e7")
    for key in ("batch_size", "seq_len"):
        if not isinstance(opts[key], int) or opts[key] < 1:
            raise LmsmithError(f"--{key.replace('_', '-')} {opts[key]!r}: must be a positive integer")
    if opts["max_steps"] is None and opts["tokens"] is None and opts["time"] is None:
        raise LmsmithError("give the run a length: --max-steps N, --tokens N or --time DURATION")
    return opts


def run(args: argparse.Namespace) -> int:
    with on_ranks(start_ranks(args)) as ranks:
        return _run(args, ranks)


def _run(args: argparse.Namespace, ranks) -> int:
    from ..config import preset
    from ..data import MixtureBatches, TokenShards, parse_source, prepare, resolve_sources, sequential_batches
    from ..train import TrainConfig, causal_lm_objective, sample_text, train

    t_start = time.time()
    opts = resolve_options(args)
    out = Path(opts["out"])
    _check_inputs(opts)
    sources = [parse_source(s) for s in opts["source"]] if opts["source"] else None
    # The corpus (None: --data shards), checked before anything is deleted: every source exists, names unique.
    corpus = None if opts["data"] else resolve_sources(sources)
    # --overwrite also remakes the tokenizer and shards: the corpus or vocabulary may have changed.
    tokens_per_step = opts["batch_size"] * opts["seq_len"] * opts["grad_accum"]
    max_steps = _max_steps(opts, tokens_per_step)
    if ranks.main:  # rank 0 prepares the folder, tokenizer and shards; the others then read them
        prepare_run_folder(out, bool(opts["resume"]), bool(opts["overwrite"]), made=("tokenizer", "data"),
                           inputs={"--init-from": opts["init_from"], "--tokenizer": opts["tokenizer"],
                                   "--data": opts["data"], **{f"--source {s.name}": s.path for s in sources or ()}})
        # The resolved options are recorded before any artifact: a run killed while it prepares its data
        # resumes as the same job.
        absolute_sources = [f"{s.name}={os.path.abspath(s.path)}:{s.weight!r}" for s in sources or ()]
        save_options(out, {**opts, "max_steps": opts["max_steps"] if opts["time"] else max_steps,
                           "source": absolute_sources or opts["source"]},
                     path_keys=("data", "tokenizer", "init_from"))
        tokenizer, shards = _tokenizer_and_shards(opts, out, corpus, prepare, TokenShards)
    ranks.barrier()
    if not ranks.main:
        tokenizer, shards = _tokenizer_and_shards(opts, out, corpus, prepare, TokenShards)

    # ---- model ------------------------------------------------------------------------------------
    # Sharded layouts build on the meta device: the loop gives each rank's shards the seed's values.
    model, cfg_desc = _model(opts, tokenizer, preset, meta=ranks.shards_weights)
    ranks.layout.check_model(model.config)

    # ---- budget and loop ---------------------------------------------------------------------------
    # Warmup is at most a tenth of the run; with a time budget the loop applies that once it has fitted
    # the run's length.
    warmup = int(opts["warmup_steps"]) if opts["time"] else min(int(opts["warmup_steps"]), max_steps // 10)
    warmup = min(warmup, max_steps - 1)
    train_opts = {f.name: opts[f.name] for f, _ in train_fields(_SKIP_TRAIN_FIELDS)}
    budget = None
    if opts["time"]:  # the loop gets what the tokenizer and shards left of the command's budget
        budget = max(1.0, opts["time"] - (time.time() - t_start) - _SUMMARY_SECONDS)
    train_opts.update(max_steps=max_steps, warmup_steps=warmup, sample_prompt=opts["sample_prompt"],
                      time_budget=budget)
    config = TrainConfig(**train_opts)

    # The weights asked for now (shards reused from an earlier run may have been made with others).
    weights = None if corpus is None else {s.name: float(s.weight) for s in corpus if s.name in shards.sources}
    batches = MixtureBatches(shards, "train", batch_size=opts["batch_size"], seq_len=opts["seq_len"],
                             seed=config.seed, weights=weights)
    has_val = any(shards.tokens(s, "validation") > opts["seq_len"] for s in shards.sources)

    def eval_batches():
        return sequential_batches(shards, "validation", batch_size=opts["batch_size"], seq_len=opts["seq_len"],
                                  max_batches=config.eval_batches)

    if budget and max_steps >= _UNCAPPED:
        length = f"as many steps of {tokens_per_step:,} tokens as fit in {format_duration(opts['time'])}"
    elif budget:
        length = (f"{max_steps:,} steps x {tokens_per_step:,} tokens or {format_duration(opts['time'])}, "
                  "whichever ends first")
    else:
        length = f"{max_steps:,} steps x {tokens_per_step:,} tokens = {max_steps * tokens_per_step:,} tokens"
    where_run = f"; {ranks.world} processes ({ranks.layout.describe()})" if ranks.distributed else ""
    print(f"lmsmith pretrain: {cfg_desc}; {length}; {describe_policy(config.dtype)}; run folder {out}{where_run}")
    result = train(model, batches, causal_lm_objective, config, out_dir=out, tokenizer=tokenizer,
                   eval_batches=eval_batches if has_val else None, resume=bool(opts["resume"]), ranks=ranks)

    # ---- summary ------------------------------------------------------------------------------------
    # Every rank samples (FSDP gathers the weights in each forward); tensor- and pipeline-parallel runs skip it.
    sample = (None if ranks.layout.tp > 1 or ranks.layout.pp > 1 else
              sample_text(model, tokenizer, opts["sample_prompt"], max_new_tokens=64, temperature=0.8, seed=0))
    baseline = _unigram_baseline(shards) if has_val and ranks.main else None
    resumed = f", {result.steps_run:,} of them in this session" if result.steps_run != result.steps else ""
    fitted = (f" (the {format_duration(opts['time'])} budget's step count)" if result.time_budget else "")
    lines = [f"Trained {cfg_desc} for {result.steps:,} steps{fitted} ({result.tokens:,} tokens{resumed}) in "
             f"{(time.time() - t_start) / 60:.1f} min, {result.tokens_per_s:,.0f} tokens/s while training."]
    if result.val_loss is not None:
        lines.append(f"Validation loss {result.val_loss:.3f}, perplexity {result.val_ppl:.2f}"
                     + (f" (a unigram model scores {baseline:.3f} / {math.exp(baseline):.0f})." if baseline else "."))
    if result.interrupted:
        lines.append(f"Interrupted: continue with `lmsmith pretrain --out {out} --resume`.")
    where = result.final_dir or result.checkpoint
    from ..distributed.dcp import is_dcp_checkpoint

    if where is not None and is_dcp_checkpoint(where):  # a sharded run's checkpoint holds no HF weights
        lines.append(f"Checkpoint: {where} (sharded over the ranks; --resume continues it on any layout). "
                     f"Loss curve: {out / 'loss.png'}. Metrics: {out / 'metrics.jsonl'}.")
    else:
        lines.append(f"Model: {where} (a Hugging Face directory). Loss curve: {out / 'loss.png'}. "
                     f"Metrics: {out / 'metrics.jsonl'}.")
        lines.append(f"Next: `lmsmith eval {where} --data FILE`, `lmsmith generate {where} --prompt TEXT`.")
    print("\n" + " ".join(lines))
    if sample is not None:
        print(f"\nSample (temperature 0.8):\n{sample}")
    return 130 if result.interrupted else 0


# Seconds kept from a --time budget for what follows the loop (a sample, the unigram baseline).
_SUMMARY_SECONDS = 5.0
_UNCAPPED = 10**9  # max_steps of a run whose length only its time budget sets


def _max_steps(opts: dict, tokens_per_step: int) -> int:
    """The run's step count, or with --time its cap (unlimited without --max-steps)."""
    if opts["tokens"]:
        return max(1, math.ceil(float(opts["tokens"]) / tokens_per_step))
    if opts["max_steps"] is not None:
        return int(opts["max_steps"])
    return _UNCAPPED


def _check_inputs(opts: dict) -> None:
    """Fail on missing inputs before anything in the run folder is touched."""
    from ..errors import LmsmithError

    for flag, key, what in (("--init-from", "init_from", "model directory"), ("--tokenizer", "tokenizer",
                            "tokenizer directory"), ("--data", "data", "token-shard folder")):
        if opts[key] and not Path(opts[key]).exists():
            raise LmsmithError(f"{flag} {opts[key]}: no such {what}; check the path")
    if opts["init_from"] and not opts["tokenizer"] and not (Path(opts["init_from"]) / "tokenizer.json").exists():
        raise LmsmithError(f"--init-from {opts['init_from']} has no tokenizer.json; pass --tokenizer DIR with the "
                           "tokenizer the model was trained with")
    if opts["init_from"]:
        from ..checkpoint import read_config

        context = read_config(opts["init_from"]).max_seq_len
        if opts["seq_len"] > context:
            raise LmsmithError(f"--seq-len {opts['seq_len']} is longer than the context of {opts['init_from']} "
                               f"({context}, max_position_embeddings in its config.json); use --seq-len "
                               f"{context} or less")


def _tokenizer_and_shards(opts: dict, out: Path, corpus, prepare, TokenShards):
    """The run's tokenizer and token shards: made by the first rank to get here, reused afterwards."""
    tokenizer = _tokenizer(opts, out, corpus)
    if opts["data"]:
        shards = TokenShards(opts["data"])
        shards.check_tokenizer(tokenizer)
    else:
        shards = _shards(out / "data", tokenizer, corpus, prepare, TokenShards, bool(opts["resume"]))
    return tokenizer, shards


def _tokenizer(opts: dict, out: Path, corpus):
    """The given tokenizer; else --init-from's own; else one saved in the run folder by an earlier run;
    else train one."""
    from ..config import preset
    from ..data import iter_documents
    from ..errors import LmsmithError
    from ..tokenizer import Tokenizer

    if opts["tokenizer"]:
        return Tokenizer.load(opts["tokenizer"])
    if opts["init_from"]:
        return Tokenizer.load(opts["init_from"])  # continued pretraining keeps the model's vocabulary
    if opts["data"]:
        raise LmsmithError("--data needs --tokenizer: the tokenizer the shards were made with")
    saved = out / "tokenizer"
    if (saved / "tokenizer.json").exists():
        return Tokenizer.load(saved)
    vocab = opts["vocab_size"] or preset(opts["preset"]).vocab_size

    def texts(limit_bytes: int = 200_000_000):
        seen = 0
        for src in corpus:
            for _, text in iter_documents(src, skip_bad=True):
                yield text
                seen += len(text)
                if seen > limit_bytes:  # enough text to learn merges from; keeps huge corpora cheap
                    return

    print(f"training a {vocab}-token BPE tokenizer on {', '.join(s.name for s in corpus)} ...")
    tok = Tokenizer.train(texts(), vocab_size=vocab)
    from ..fileio import atomic_dir

    with atomic_dir(saved) as tmp:  # a kill mid-save leaves no half tokenizer for the resume to load
        tok.save(tmp)
    return tok


def _shards(folder: Path, tokenizer, corpus, prepare, TokenShards, resume: bool):
    """Reuse shards already prepared from these sources with this tokenizer (a resumed run), else prepare them.

    A resumed run whose shards came from other sources is an error: re-preparing would train the rest
    of the run on another corpus.
    """
    from ..errors import LmsmithError

    def key(name: str, path: str) -> tuple:  # weights only steer sampling: a change needs no new shards
        return name, path if path.startswith("<in-memory:") else os.path.abspath(path)

    if (folder / "manifest.json").exists():
        shards = TokenShards(folder)
        m = shards.manifest
        made_from = sorted(key(e["name"], e["path"]) for e in m["sources"] + m.get("excluded", []))
        wanted = sorted(key(s.name, s.path if s.path is not None else f"<in-memory:{s.name}>")
                        for s in corpus)
        if shards.tokenizer_hash == tokenizer.hash and made_from == wanted:
            return shards
        if resume:
            raise LmsmithError(f"{folder} was prepared from {', '.join(n for n, _ in made_from)} "
                               f"({'; '.join(p for _, p in made_from)}), not the sources this resume names; "
                               "resume without --source, or start a new run with --out NEWDIR")
    prepare(corpus, tokenizer, folder)
    return TokenShards(folder)


def _model(opts: dict, tokenizer, preset, meta: bool = False):
    from ..errors import LmsmithError
    from ..loader import load
    from ..model import build_model

    if opts["init_from"]:
        model, _ = load(opts["init_from"], dtype=None)
        model.float()
        if model.config.vocab_size < tokenizer.vocab_size:
            raise LmsmithError(f"{opts['init_from']}: vocab {model.config.vocab_size} is smaller than the "
                               f"tokenizer's {tokenizer.vocab_size}; use the model's own tokenizer")
        return model, f"{opts['init_from']} ({model.num_params() / 1e6:.1f}M params)"
    overrides = dict(opts["model"] or {})
    overrides["vocab_size"] = tokenizer.vocab_size
    base = preset(opts["preset"])
    overrides.setdefault("max_seq_len", max(base.max_seq_len, opts["seq_len"]))
    try:
        cfg = preset(opts["preset"], **overrides)
    except TypeError as e:
        raise LmsmithError(f"model options: {e}") from None
    model = build_model(cfg, seed=opts["seed"], init=not meta)
    return model, f"{opts['preset']} ({model.num_params() / 1e6:.1f}M params)"


def _unigram_baseline(shards) -> float:
    """Cross-entropy (nats/token) of the validation tokens under the train split's unigram frequencies."""
    import numpy as np

    counts = np.zeros(shards.vocab_size, dtype=np.float64)
    for s in shards.sources:
        for m in shards.memmaps(s, "train"):
            counts += np.bincount(m, minlength=shards.vocab_size)[: shards.vocab_size]
    logp = np.log((counts + 1) / (counts.sum() + len(counts)))
    nll, n = 0.0, 0
    for s in shards.sources:
        for m in shards.memmaps(s, "validation"):
            nll -= logp[m].sum()
            n += len(m)
    return nll / max(n, 1)
