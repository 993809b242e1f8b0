"""`lmsmith distill`: a student learns the teacher's next-token distributions, on the one training loop.

Read top to bottom: resolve the options -> load the teacher (any form lmsmith loads) -> the data (token
shards: --data DIR, --source, the teacher's own shards or the built-in corpus; instruction data: --data
FILE; or a teacher cache: --teacher-cache DIR, then no teacher is loaded) -> the student (a fresh preset
with the teacher's tokenizer, or a model directory with the same vocabulary; full or LoRA) -> the loop
with `train.distill.distill_objective` -> final/ (or adapter/) -> summary.

`lmsmith distill cache` runs the teacher once and writes its top-K targets (`data/teacher_cache.py`).
"""

from __future__ import annotations

import argparse
import math
import time
import typing
from pathlib import Path

from .options import add_run_arguments, add_train_flags, prepare_run_folder, resolve, save_options, train_fields
from .parallel import add_parallel_arguments, on_ranks, start_ranks

HELP = "distil a teacher into a smaller student (fkl / rkl / jsd); `distill cache`: the teacher's top-K on disk"
DESCRIPTION = """Knowledge distillation: train a STUDENT on the TEACHER's next-token distributions
(not only the one true next token), on the same training loop as pretrain and finetune.

  lmsmith distill --teacher runs/pretrain/final --student nano --out runs/distill

Teacher: any model lmsmith loads (HF directory, GGUF file, int8 directory); it runs
without gradients under the precision policy (--dtype). Student: a preset name
(a fresh model with the teacher's tokenizer; default nano) or a model directory
whose vocabulary is the teacher's (--method lora distils into a LoRA adapter).

Data: --data DIR (shards from `lmsmith data prepare`) or --source NAME=PATH
(every position is a target); --data FILE.jsonl (instruction / chat data: the
response tokens only); --teacher-cache DIR (targets from `lmsmith distill cache`:
no teacher is loaded). With none of these: the shards next to the teacher
(TEACHER/../data, when made with its tokenizer), else the built-in corpus.

Loss per target token: alpha * T^2 * D(teacher || student) + (1 - alpha) * CE,
D = --loss fkl (forward KL), rkl (reverse KL) or jsd (trl's generalised JSD with
--beta: 0 = fkl, 1 = rkl), both distributions at --temperature T. --alpha 0
trains the same student on the true tokens only (the baseline to beat).
Evaluation reports the student's perplexity (cross-entropy) and its KL to the
teacher on validation data.

  lmsmith distill cache --teacher DIR --top-k 64 --tokens 2e6 --out cache/
  lmsmith distill --teacher-cache cache/ --student nano --out runs/distill-cached

Ctrl-C writes a checkpoint; `lmsmith distill --out OUT --resume` continues exactly."""

DEFAULTS: dict[str, typing.Any] = {
    "teacher": "runs/pretrain/final",
    "student": "nano",
    "out": "runs/distill",
    "source": None,
    "data": None,
    "teacher_cache": None,
    "format": None,
    "val_fraction": 0.05,
    "loss": "fkl",
    "temperature": 1.0,
    "beta": 0.5,
    "alpha": 1.0,
    "on_policy": 0.0,
    "baseline": False,
    "method": "full",
    "lora_r": 8,
    "lora_alpha": 16.0,
    "lora_dropout": 0.0,
    "lora_targets": "q_proj,k_proj,v_proj,o_proj",
    "batch_size": 16,
    "seq_len": 256,
    "max_steps": 2000,
    "tokens": None,
    "time": "10m",
    "resume": False,
    "overwrite": False,
    "lr": None,
    "warmup_steps": 100,
    "eval_every": 250,
    "eval_batches": 20,
    "save_every": 250,
    "log_every": 10,
    "model": None,
}
_SKIP_TRAIN_FIELDS = {"max_steps", "betas", "sample_prompt", "sample_every", "sample_tokens", "time_budget"}
METHODS = ("full", "lora")
# --lr when not given: a fresh student learns like pretraining; a trained one, or an adapter, with smaller steps.
_DEFAULT_LR = {"preset": 2e-3, "full": 1e-4, "lora": 2e-4}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .distill_cache import add_cache_arguments

    add_run_arguments(p, DEFAULTS)
    g = p.add_argument_group("teacher and student")
    g.add_argument("--teacher", metavar="MODEL", help=f"teacher: HF directory, .gguf file or int8 directory "
                                                      f"(default: {DEFAULTS['teacher']})")
    g.add_argument("--teacher-cache", metavar="DIR", help="train from `lmsmith distill cache` targets instead "
                                                          "(no teacher is loaded)")
    g.add_argument("--student", metavar="PRESET|DIR", help=f"a preset (fresh, with the teacher's tokenizer) or a "
                                                           f"model directory (default: {DEFAULTS['student']})")
    g.add_argument("--method", help="full | lora (LoRA needs --student DIR; default: full)")
    g.add_argument("--lora-r", type=int, help=f"LoRA rank (default: {DEFAULTS['lora_r']})")
    g.add_argument("--lora-alpha", type=float, help=f"LoRA alpha (default: {DEFAULTS['lora_alpha']:g})")
    g.add_argument("--lora-dropout", type=float, help="LoRA dropout (default: 0)")
    g.add_argument("--lora-targets", help="comma-separated module names, or all-linear (default: attention)")
    g = p.add_argument_group("loss")
    g.add_argument("--loss", help="fkl | rkl | jsd (default: fkl)")
    g.add_argument("--temperature", type=float, help="softmax temperature of both distributions; the loss is "
                                                     "scaled by T^2 (default: 1)")
    g.add_argument("--beta", type=float, help="jsd's interpolation: 0 = forward KL, 1 = reverse KL (default: 0.5)")
    g.add_argument("--alpha", type=float, help="weight of the distillation term; 1 - alpha weighs the "
                                               "cross-entropy on the true tokens (default: 1; 0 = no teacher)")
    g.add_argument("--on-policy", type=float, metavar="FRACTION",
                   help="this fraction of every batch is the student's own samples (prompt: a row's first half, or "
                        "its instruction), scored by the teacher: on-policy distillation (GKD; default: 0)")
    g.add_argument("--baseline", action="store_true", default=None,
                   help="then train the same student on the true tokens only (--alpha 0: same steps, data, seed) in "
                        "OUT/baseline and compare the two on validation data")
    g = p.add_argument_group("data")
    g.add_argument("--data", metavar="DIR|FILE", help="token shards (`lmsmith data prepare`) or instruction data "
                                                      "(.jsonl / .json: responses only)")
    g.add_argument("--source", action="append", metavar="NAME=PATH[:WEIGHT]", help="a text source (repeatable)")
    g.add_argument("--format", help="instruction data format (default: detected)")
    g.add_argument("--val-fraction", type=float, help="instruction data: fraction held out for validation "
                                                      f"(default: {DEFAULTS['val_fraction']})")
    g.add_argument("--batch-size", type=int, help=f"rows per micro-batch (default: {DEFAULTS['batch_size']})")
    g.add_argument("--seq-len", type=int, help=f"tokens per row (default: {DEFAULTS['seq_len']})")
    g = p.add_argument_group("budget")
    g.add_argument("--max-steps", type=int, help=f"optimizer steps (default: {DEFAULTS['max_steps']})")
    g.add_argument("--tokens", type=float, help="token budget instead of --max-steps (e.g. 2e7)")
    g.add_argument("--time", metavar="DURATION", help=f"wall-time budget of the training, e.g. 90s, 10m "
                                                      f"(default: {DEFAULTS['time']} or {DEFAULTS['max_steps']:,} "
                                                      "steps, whichever comes first)")
    g.add_argument("--model", type=_model_overrides, metavar="K=V,...",
                   help="a preset student's ModelConfig fields, e.g. dim=128,n_layers=3")
    add_train_flags(p.add_argument_group("optimisation (the training loop's TrainConfig)"), DEFAULTS,
                    _SKIP_TRAIN_FIELDS, docs={"lr": "default: 2e-3 for a fresh student, 1e-4 for a trained "
                                                    "one, 2e-4 for LoRA"})
    add_parallel_arguments(p)
    sub = p.add_subparsers(dest="action", metavar="[cache]", parser_class=type(p))
    add_cache_arguments(sub.add_parser("cache", help="run the teacher once; write its top-K targets to disk",
                                       description=add_cache_arguments.__doc__,
                                       formatter_class=argparse.RawDescriptionHelpFormatter))


def _model_overrides(text: str) -> dict:
    import yaml

    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"{item!r}: give KEY=VALUE pairs, e.g. dim=128,n_layers=3")
        out[key.strip()] = yaml.safe_load(value)
    return out


def resolve_options(args: argparse.Namespace) -> dict:
    from ..errors import LmsmithError
    from ..train.budget import parse_duration
    from ..train.distill import DistillSpec
    from .pretrain import BUDGET_CONFLICTS

    opts = resolve(args, DEFAULTS, _SKIP_TRAIN_FIELDS, conflicts=BUDGET_CONFLICTS)
    if isinstance(opts["source"], str):
        opts["source"] = [opts["source"]]
    if opts["method"] not in METHODS:
        raise LmsmithError(f"unknown --method {opts['method']!r}; choose one of: {', '.join(METHODS)}")
    DistillSpec(str(opts["loss"]), float(opts["temperature"]), float(opts["beta"]), float(opts["alpha"]))
    if opts["time"] is not None:
        opts["time"] = parse_duration(opts["time"])
    for key in ("batch_size", "seq_len"):
        if not isinstance(opts[key], int) or opts[key] < 1:
            raise LmsmithError(f"--{key.replace('_', '-')} {opts[key]!r}: must be a positive integer")
    if sum(bool(opts[k]) for k in ("data", "source", "teacher_cache")) > 1:
        raise LmsmithError("give one of --data, --source and --teacher-cache")
    if opts["max_steps"] is None and opts["tokens"] is None and opts["time"] is None:
        raise LmsmithError("give the run a length: --max-steps N, --tokens N or --time DURATION")
    return opts


def run(args: argparse.Namespace) -> int:
    if getattr(args, "action", None) == "cache":
        from .distill_cache import run_cache

        return run_cache(args)
    with on_ranks(start_ranks(args)) as ranks:
        return _run(args, ranks)


def _run(args: argparse.Namespace, ranks) -> int:
    from ..errors import LmsmithError
    from ..precision import describe_policy
    from ..train import TrainConfig, train
    from ..train.distill import DistillSpec, distill_objective

    t_start = time.time()
    opts = resolve_options(args)
    out = Path(opts["out"])
    if ranks.layout.tp > 1 or ranks.layout.pp > 1:
        raise LmsmithError("distill under --tp / --pp is not built: use data parallelism (--dp-shard / "
                           "--dp-replicate); the teacher runs whole on every rank")
    spec = DistillSpec(str(opts["loss"]), float(opts["temperature"]), float(opts["beta"]), float(opts["alpha"]))
    cache = _open_cache(opts, spec)
    teacher, tokenizer = (None, None) if cache else _load_teacher(opts["teacher"])
    if cache is not None:
        tokenizer = _cache_tokenizer(opts, cache)
    if ranks.main:
        prepare_run_folder(out, bool(opts["resume"]), bool(opts["overwrite"]), made=("data",),
                           inputs={"--teacher": opts["teacher"], "--student": opts["student"], "--data": opts["data"],
                                   "--teacher-cache": opts["teacher_cache"]})
        save_options(out, opts, path_keys=("teacher", "data", "teacher_cache"))
    ranks.barrier()
    batches, eval_batches, data_desc, seq_len, data_ref = _data(opts, out, tokenizer, cache, ranks)
    student, student_desc, trainable, lora_cfg = _student(opts, teacher, tokenizer, seq_len, cache)
    ranks.layout.check_model(student.config)

    tokens_per_step = opts["batch_size"] * seq_len * opts["grad_accum"]
    from .pretrain import _max_steps

    max_steps = _max_steps(opts, tokens_per_step)
    warmup = int(opts["warmup_steps"]) if opts["time"] else min(int(opts["warmup_steps"]), max_steps // 10)
    train_opts = {f.name: opts[f.name] for f, _ in train_fields(_SKIP_TRAIN_FIELDS)}
    lr = opts["lr"] if opts["lr"] is not None else _DEFAULT_LR[_student_kind(opts)]
    budget = max(1.0, opts["time"] - (time.time() - t_start)) if opts["time"] else None
    train_opts.update(max_steps=max_steps, warmup_steps=min(warmup, max(max_steps - 1, 0)), lr=lr,
                      time_budget=budget, sample_every=0)
    config = TrainConfig(**train_opts)
    if opts["on_policy"] and ranks.distributed:
        raise LmsmithError("--on-policy samples on one process; run it without torchrun (or with --on-policy 0)")
    objective = distill_objective(spec, teacher, on_policy=float(opts["on_policy"]))
    who = f"teacher cache {opts['teacher_cache']} (top-{cache.top_k})" if cache else f"teacher {opts['teacher']}"
    print(f"lmsmith distill: {who} -> student {student_desc}; {spec.loss} at T={spec.temperature:g}, "
          f"alpha {spec.alpha:g}{on_policy_desc(opts)}; {data_desc}; {describe_policy(config.dtype)}; run folder {out}")
    result = train(student, batches, objective, config, out_dir=out, tokenizer=tokenizer,
                   eval_batches=eval_batches, resume=bool(opts["resume"]),
                   trainable_params=trainable, ranks=ranks)
    written = _save(opts, out, student, tokenizer, lora_cfg, result, ranks)
    print("\n" + _summary(opts, out, result, written, t_start, student_desc))
    if result.interrupted:
        return 130
    if opts["baseline"] and not ranks.distributed:
        return _baseline(args, opts, out, result.steps, data_ref)
    return 0


def _baseline(args: argparse.Namespace, opts: dict, out: Path, steps: int, data_ref: str | None) -> int:
    """--baseline: the same student, steps, data and seed on the true tokens only (alpha 0) in OUT/baseline,
    then both students' validation perplexity and KL side by side."""
    import copy

    b = copy.copy(args)
    for key, value in opts.items():  # the resolved options (flags, YAML, a resumed run's saved ones) as flags
        if key in vars(b):
            setattr(b, key, value)
    where = out / "baseline"
    b.out, b.alpha, b.max_steps, b.time, b.tokens = str(where), 0.0, steps, None, None
    b.baseline, b.config, b.on_policy = False, None, 0.0
    b.data = data_ref if data_ref else b.data
    b.resume, b.overwrite = False, True
    print(f"\n--baseline: the same student on the true tokens only, {steps:,} steps, in {where} ...")
    rc = _run(b, _single_process())
    if rc:
        return rc
    kd, ce = _last_eval(out), _last_eval(where)
    if kd and ce and "val_ce" in kd and "val_ce" in ce:
        ppl_kd, ppl_ce = math.exp(min(kd["val_ce"], 700)), math.exp(min(ce["val_ce"], 700))
        print(f"\nDistilled vs without the teacher (same student, steps, data): perplexity {ppl_kd:.2f} vs "
              f"{ppl_ce:.2f} ({ppl_kd / ppl_ce:.3f}x), KL to the teacher {kd['val_kl']:.4f} vs {ce['val_kl']:.4f}.")
    return 0


def _single_process():
    from ..distributed.ranks import Ranks

    return Ranks()


def _last_eval(out: Path) -> dict | None:
    import json

    f = out / "metrics.jsonl"
    rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.exists() else []
    return next((r for r in reversed(rows) if "val_loss" in r), None)


def on_policy_desc(opts: dict) -> str:
    return f", {opts['on_policy']:.0%} of each batch sampled by the student" if opts["on_policy"] else ""


def _student_kind(opts: dict) -> str:
    if opts["method"] == "lora":
        return "lora"
    return "full" if Path(str(opts["student"])).exists() else "preset"


def _load_teacher(path: str):
    from ..errors import LmsmithError
    from ..loader import load

    if not Path(path).exists():
        hint = " (train the demo model first: `lmsmith pretrain`)" if path == DEFAULTS["teacher"] else ""
        raise LmsmithError(f"--teacher {path}: no such model{hint}")
    teacher, tokenizer = load(path)
    if tokenizer is None:
        raise LmsmithError(f"--teacher {path}: no tokenizer beside the weights; distillation needs the teacher's "
                           "tokenizer (the student shares it)")
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher, tokenizer


def _open_cache(opts: dict, spec):
    from ..data.teacher_cache import TeacherCache
    from ..errors import LmsmithError

    if not opts["teacher_cache"]:
        return None
    cache = TeacherCache(opts["teacher_cache"])
    if abs(cache.temperature - spec.temperature) > 1e-9:
        raise LmsmithError(f"--teacher-cache {cache.path} holds the teacher at temperature {cache.temperature:g}, "
                           f"not --temperature {spec.temperature:g}; pass --temperature {cache.temperature:g} or "
                           "remake the cache with `lmsmith distill cache --temperature`")
    made_by = cache.manifest.get("teacher_fingerprint")
    if opts["teacher"] != DEFAULTS["teacher"] and Path(str(opts["teacher"])).exists() and made_by:
        from ..data.teacher_cache import fingerprint

        if fingerprint(opts["teacher"]) != made_by:
            raise LmsmithError(f"--teacher-cache {cache.path} was made from {cache.manifest.get('teacher')}, not "
                               f"--teacher {opts['teacher']} (its config or weights differ); remake the cache or "
                               "drop --teacher")
    if opts["seq_len"] != DEFAULTS["seq_len"] and opts["seq_len"] != cache.seq_len:
        raise LmsmithError(f"--seq-len {opts['seq_len']}: the cache's windows hold {cache.seq_len} positions")
    opts["seq_len"] = cache.seq_len
    return cache


def _cache_tokenizer(opts: dict, cache):
    """The tokenizer the cache's shards were made with: the student directory's, or the teacher's."""
    from ..errors import LmsmithError
    from ..tokenizer import Tokenizer

    for where in (opts["student"], cache.manifest.get("teacher"), opts["teacher"]):
        if where and (Path(where) / "tokenizer.json").exists():
            tok = Tokenizer.load(where)
            if tok.hash == cache.tokenizer_hash:
                return tok
    raise LmsmithError(f"--teacher-cache {cache.path}: no tokenizer with hash {cache.tokenizer_hash[:12]} found "
                       "(the teacher's); pass --teacher DIR (not loaded, only its tokenizer is read)")


def check_vocabulary(teacher_tok, student_tok, teacher_vocab: int, student_vocab: int, student_name: str) -> None:
    """One-line error naming the first token id whose string differs (or the head sizes) between the two."""
    from ..errors import LmsmithError
    from ..tokenizer import first_difference

    i = first_difference(teacher_tok, student_tok)
    if i is not None:
        a = teacher_tok.id_to_token(i) if i < teacher_tok.vocab_size else None
        b = student_tok.id_to_token(i) if i < student_tok.vocab_size else None
        raise LmsmithError(f"--student {student_name}: token id {i} is {b!r} in its tokenizer and {a!r} in "
                           "the teacher's; distillation needs one vocabulary (--student PRESET builds a "
                           "student with the teacher's tokenizer)")
    if teacher_vocab != student_vocab:
        raise LmsmithError(f"--student {student_name}: its head has {student_vocab} rows, the teacher's "
                           f"{teacher_vocab}; distillation compares distributions over one vocabulary")


def _student(opts: dict, teacher, tokenizer, seq_len: int, cache):
    """(student, description, trainable parameters or None, LoraConfig or None)."""
    from ..config import preset
    from ..errors import LmsmithError
    from ..loader import load
    from ..model import build_model

    name = str(opts["student"])
    vocab = teacher.config.vocab_size if teacher is not None else cache.vocab_size
    if Path(name).exists():
        student, tok = load(name, dtype=None)
        check_vocabulary(tokenizer, tok or tokenizer, vocab, student.config.vocab_size, name)
        if seq_len > student.config.max_seq_len:
            raise LmsmithError(f"--seq-len {seq_len} is longer than the context of {name} "
                               f"({student.config.max_seq_len})")
        desc = f"{name} ({student.num_params() / 1e6:.1f}M params)"
    else:
        if opts["method"] == "lora":
            raise LmsmithError("--method lora trains an adapter on an existing model: give --student DIR")
        overrides = {**(opts["model"] or {}), "vocab_size": vocab}
        try:
            base = preset(name)
            overrides.setdefault("max_seq_len", max(base.max_seq_len, seq_len))
            cfg = preset(name, **overrides)
        except TypeError as e:
            raise LmsmithError(f"--model: {e}") from None
        student = build_model(cfg, seed=opts["seed"])
        desc = f"{name} ({student.num_params() / 1e6:.1f}M params)"
    if opts["method"] == "full":
        student.float()
        return student, desc, None, None
    from .finetune import _apply_method

    lora_opts = {**opts, "objective": "sft", "adapter": None}
    student, trainable, _, _, method_desc, lora_cfg = _apply_method(lora_opts, student, tokenizer)
    return student, f"{desc}, {method_desc}", trainable, lora_cfg


def _data(opts: dict, out: Path, tokenizer, cache, ranks):
    """(training batches, eval_batches callable or None, description, seq_len, the --data that gives the
    same data again: a shard folder or instruction file, None for a cache)."""
    B, T = int(opts["batch_size"]), int(opts["seq_len"])
    if cache is not None:
        def cached_eval():
            return cache.eval_batches("validation", B, max_batches=int(opts["eval_batches"]))

        has_val = cache.windows("validation") > 0
        return (cache.batches("train", B, seed=int(opts["seed"])), cached_eval if has_val else None,
                f"{cache.windows('train'):,} cached windows of {cache.seq_len}", cache.seq_len, None)
    data = opts["data"]
    if data and Path(data).is_file():
        return (*_instruction_data(opts, tokenizer), min(T, _context(opts)), data)
    shards = _shards(opts, out, tokenizer, ranks)
    from ..data import MixtureBatches, sequential_batches

    def eval_batches():
        return sequential_batches(shards, "validation", batch_size=B, seq_len=T,
                                  max_batches=int(opts["eval_batches"]))

    has_val = any(shards.tokens(s, "validation") > T for s in shards.sources)
    return (MixtureBatches(shards, "train", batch_size=B, seq_len=T, seed=int(opts["seed"])),
            eval_batches if has_val else None, f"shards {shards.path} (every position)", T, str(shards.path))


def _context(opts: dict) -> int:
    from ..checkpoint import read_config

    student = Path(str(opts["student"]))
    return read_config(student).max_seq_len if (student / "config.json").exists() else 1 << 30


def _shards(opts: dict, out: Path, tokenizer, ranks):
    """--data DIR; else the teacher's own shards (TEACHER/../data, same tokenizer); else --source or the
    built-in corpus tokenized into OUT/data (by rank 0; the others wait)."""
    from ..data import TokenShards, parse_source, prepare, resolve_sources
    from ..errors import LmsmithError
    from .pretrain import _shards as prepared_shards

    if opts["data"]:
        if not Path(opts["data"]).is_dir():
            raise LmsmithError(f"--data {opts['data']}: no such shard folder or data file")
        shards = TokenShards(opts["data"])
        shards.check_tokenizer(tokenizer)
        return shards
    near = Path(str(opts["teacher"])).parent / "data"
    if not opts["source"] and (near / "manifest.json").exists():
        shards = TokenShards(near)
        if shards.tokenizer_hash == tokenizer.hash:
            print(f"data: {near}, the shards the teacher was trained on (--data / --source choose others)")
            return shards
    corpus = resolve_sources([parse_source(s) for s in opts["source"]] if opts["source"] else None)
    if ranks.main:
        prepared_shards(out / "data", tokenizer, corpus, prepare, TokenShards, bool(opts["resume"]))
    ranks.barrier()
    return TokenShards(out / "data")


def _instruction_data(opts: dict, tokenizer):
    """Instruction / chat data: rows with the response tokens as the only targets."""
    import itertools

    from ..data.instruct import InstructBatches, encode_sft, pad_id_of, read_examples
    from .finetune import _validation_split

    room = min(int(opts["seq_len"]), _context(opts))
    examples, stats = read_examples(opts["data"], opts["format"])
    examples, val = _validation_split({**opts, "eval_data": None}, examples)
    items, enc = encode_sft(examples, tokenizer, room)
    B = int(opts["batch_size"])
    batches = InstructBatches(items, B, seed=int(opts["seed"]), pad_id=pad_id_of(tokenizer))
    eval_batches = None
    if val:
        val_items = encode_sft(val, tokenizer, room)[0]

        def eval_batches():
            vb = InstructBatches(val_items, B, seed=0, pad_id=pad_id_of(tokenizer))
            return itertools.islice(vb, vb.batches_per_epoch)
    return batches, eval_batches, f"{opts['data']} ({stats.format}: responses only): {enc.describe()}"


def _save(opts: dict, out: Path, student, tokenizer, lora_cfg, result, ranks) -> list[Path]:
    """full: the loop's final/ (written already); lora: adapter/ in peft's format."""
    if opts["method"] == "full" or result.interrupted:
        where = result.final_dir or result.checkpoint
        return [where] if where else []
    from .finetune import _save_on_main, _save_outputs

    save_opts = {"method": "lora", "merge": False, "model": str(opts["student"])}
    return _save_on_main(ranks, lambda m: _save_outputs(save_opts, out, m, tokenizer, lora_cfg, result),
                         student, "lora", lora_cfg)


def _summary(opts: dict, out: Path, result, written: list[Path], t_start: float, student_desc: str) -> str:
    last = _last_eval(out)
    lines = [f"Distilled into {student_desc}: {result.steps:,} steps ({result.tokens:,} tokens) in "
             f"{(time.time() - t_start) / 60:.1f} min."]
    if last is not None and "val_ce" in last:
        lines.append(f"Validation: student perplexity {math.exp(min(last['val_ce'], 700)):.2f}, "
                     f"KL to the teacher {last['val_kl']:.4f} nats/token.")
    if result.interrupted:
        lines.append(f"Interrupted: continue with `lmsmith distill --out {out} --resume`.")
    if written:
        lines.append(f"Wrote {', '.join(str(w) for w in written)}; metrics in {out / 'metrics.jsonl'}.")
        first = written[0]
        if opts["method"] == "full" and not result.interrupted:
            lines.append(f"Next: `lmsmith generate {opts['teacher']} --draft {first} --prompt TEXT` "
                         "(the student as the teacher's draft model).")
    return " ".join(lines)
