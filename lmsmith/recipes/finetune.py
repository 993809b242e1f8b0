"""`lmsmith finetune MODEL --data FILE`: SFT or DPO with full, LoRA or prompt tuning, on the one loop.

Read top to bottom: resolve the options (defaults < --config YAML < flags) -> load the
model and tokenizer -> read and encode the data (chat template, response-only labels,
optional packing) -> apply the method (full / LoRA / prompt or prefix tuning) -> measure
"before" (task accuracy, reference perplexity) -> the one training loop with the SFT or
DPO objective -> save (final/ HF directory, or adapter/ in peft format, + merged/) ->
measure "after" -> summary.

Checkpoints during training are the loop's: the whole model plus train_state/ for full
fine-tuning; for LoRA, prompt and prefix tuning only the trained tensors (by name) plus
train_state/, so they stay small and `--resume` continues the run exactly.
"""

from __future__ import annotations

import argparse
import math
import time
import typing
from pathlib import Path

from .options import add_run_arguments, add_train_flags, prepare_run_folder, resolve, save_options, train_fields

HELP = ("fine-tune a model on instruction or preference data: full, LoRA, prompt or prefix tuning; SFT, DPO, or a "
        "reward model")
DESCRIPTION = """Fine-tune MODEL (any HF directory: a pretrained, fine-tuned or merged model) on
instruction data (SFT) or preference pairs (DPO), reusing the training loop
(progress bar, metrics.jsonl, checkpoints, --resume).

Data (--data FILE, JSONL or a JSON array; the format is detected, or set --format):
  solution    {"instruction", "solution"}          alpaca  {"instruction", "input", "output"}
  chat        {"messages": [{"role", "content"}]}  completion {"prompt", "completion"}
  preference  {"prompt", "chosen", "rejected"}     (for --objective dpo)
Examples are rendered with the model's chat template; the loss covers only the
assistant turns (and their end-of-turn token). `lmsmith data synth` makes a demo set
with checkable answers.

Methods: full (all weights; writes OUT/final/), lora (low-rank adapters; writes
OUT/adapter/ in peft format, and OUT/merged/ with --merge), prompt (a soft prompt of
--virtual-tokens in front of the input; writes OUT/adapter/ in peft's PROMPT_TUNING
format), prefix (the virtual tokens' keys and values in every layer: prefix tuning /
P-tuning v2, peft's PREFIX_TUNING; much stronger than prompt on small models). prompt
and prefix also train the embedding/head rows of the chat template's special tokens
(--train-tokens auto; the base weights stay untouched). --adapter PATH continues
training an existing adapter of the chosen method (peft format, ours or peft's).
--objective dpo trains on preference pairs against a frozen reference (LoRA: the
base with the adapter off; full: a frozen copy; prompt/prefix: the base without
the prompt). --objective reward trains a reward model on preference pairs: a scalar
head on the last token of prompt + response, Bradley-Terry loss (--margin), full or
LoRA; OUT/final/ is a Hugging Face LlamaForSequenceClassification directory (LoRA
merged in) with the tokenizer and chat template the scores depend on: `lmsmith eval
OUT/final --preferences FILE`, `lmsmith rl MODEL --reward OUT/final`.

Checks: --eval-tasks FILE measures exact-match accuracy before and after;
--ref-data FILE measures perplexity on reference text before and after, so
catastrophic forgetting is visible.

example:
  lmsmith data synth --task mix --n 2000 --out synth/
  lmsmith finetune runs/pretrain/final --data synth/train.jsonl --method lora \\
      --eval-tasks synth/heldout.jsonl --out runs/lora
  lmsmith finetune runs/lora/merged --data synth/preference.jsonl --objective reward --out runs/rm"""

METHODS = ("full", "lora", "prompt", "prefix")
OBJECTIVES = ("sft", "dpo", "reward")
# Learning rates that work for each method when --lr is not given (adapters need larger steps).
DEFAULT_LR = {("full", "sft"): 5e-5, ("lora", "sft"): 2e-4, ("prompt", "sft"): 3e-2, ("prefix", "sft"): 1e-2,
              ("full", "dpo"): 5e-6, ("lora", "dpo"): 5e-5, ("prompt", "dpo"): 1e-2, ("prefix", "dpo"): 3e-3,
              ("full", "reward"): 1e-5, ("lora", "reward"): 1e-4}

DEFAULTS: dict[str, typing.Any] = {
    "model": None,
    "out": "runs/finetune",
    "data": None,
    "format": None,
    "method": "full",
    "objective": "sft",
    "pack": False,
    "skip_bad": False,
    "seq_len": 512,
    "batch_size": 8,
    "epochs": 3.0,
    "max_steps": None,
    "time": None,
    "eval_data": None,
    "val_fraction": 0.05,
    "resume": False,
    "overwrite": False,
    "adapter": None,
    "merge": False,
    "lora_r": 8,
    "lora_alpha": 16.0,
    "lora_dropout": 0.0,
    "lora_targets": "q_proj,k_proj,v_proj,o_proj",
    "virtual_tokens": 20,
    "prompt_init": None,
    "prompt_encoder_hidden": None,
    "train_tokens": "auto",
    "beta": 0.1,
    "margin": 0.0,
    "eval_tasks": None,
    "eval_max_new_tokens": 32,
    "ref_data": None,
    "lr": None,
    "weight_decay": 0.0,
    "warmup_steps": 20,
    "save_every": 200,
    "log_every": 10,
}
# TrainConfig fields not offered as flags (set through other options or not meaningful here).
_SKIP_TRAIN_FIELDS = {"max_steps", "betas", "sample_prompt", "sample_every", "sample_tokens", "time_budget",
                      "eval_batches"}
# Validation examples held out of --data when no --eval-data is given: at most this many.
_MAX_HELD_OUT = 200


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model directory (HF format: pretrained, fine-tuned or merged)")
    add_run_arguments(p, DEFAULTS)
    g = p.add_argument_group("data")
    g.add_argument("--data", metavar="FILE", help="instruction or preference data (.jsonl or .json array)")
    g.add_argument("--format", help="solution | alpaca | chat | completion | preference (default: detected)")
    g.add_argument("--pack", action="store_true", default=None,
                   help="pack several short examples into each --seq-len row (labels never cross examples; "
                        "attention does)")
    g.add_argument("--skip-bad", action="store_true", default=None, help="skip and count malformed records")
    g.add_argument("--seq-len", type=int, help=f"tokens per row; longer examples are cut (default: "
                                               f"{DEFAULTS['seq_len']}, at most the model's context)")
    g.add_argument("--batch-size", type=int, help=f"rows per micro-batch (default: {DEFAULTS['batch_size']})")
    g.add_argument("--epochs", type=float, help=f"passes over the data (default: {DEFAULTS['epochs']:g})")
    g.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    g.add_argument("--time", metavar="DURATION", help="wall-time budget of the training, e.g. 90s, 10m, 1h: after a "
                                                      "few steps the run measures its speed and ends on time "
                                                      "(--epochs / --max-steps then cap it)")
    g.add_argument("--eval-data", metavar="FILE", help="validation examples (same formats as --data): validation "
                                                       "loss during and after training")
    g.add_argument("--val-fraction", type=float, help="without --eval-data: hold out this fraction of --data "
                                                      f"(at most {_MAX_HELD_OUT} examples; 0 disables; default "
                                                      f"{DEFAULTS['val_fraction']})")
    g = p.add_argument_group("method")
    g.add_argument("--method", help="full | lora | prompt | prefix (default: full)")
    g.add_argument("--objective", help="sft | dpo | reward (default: sft)")
    g.add_argument("--beta", type=float, help=f"DPO temperature (default: {DEFAULTS['beta']})")
    g.add_argument("--margin", type=float, help="reward: the Bradley-Terry margin the chosen response must win by "
                                                "(default: 0)")
    g.add_argument("--adapter", metavar="PATH", help="continue training this adapter (peft format: LoRA with "
                                                      "--method lora, PROMPT_TUNING with prompt, PREFIX_TUNING "
                                                      "with prefix)")
    g.add_argument("--merge", action="store_true", default=None, help="LoRA: also write OUT/merged/ (HF directory)")
    g.add_argument("--lora-r", type=int, help=f"LoRA rank (default: {DEFAULTS['lora_r']})")
    g.add_argument("--lora-alpha", type=float, help=f"LoRA alpha (default: {DEFAULTS['lora_alpha']:g})")
    g.add_argument("--lora-dropout", type=float, help="LoRA dropout (default: 0)")
    g.add_argument("--lora-targets", help="comma-separated module names, or all-linear (default: attention "
                                          "projections q_proj,k_proj,v_proj,o_proj)")
    g.add_argument("--virtual-tokens", type=int, help=f"prompt/prefix tuning: soft-prompt length "
                                                      f"(default: {DEFAULTS['virtual_tokens']})")
    g.add_argument("--prompt-init", metavar="TEXT", help="prompt tuning: initialise from this text's embeddings")
    g.add_argument("--prompt-encoder-hidden", type=int, metavar="H",
                   help="prompt tuning: a P-tuning MLP encoder of this width")
    g.add_argument("--train-tokens", metavar="LIST",
                   help="prompt/prefix tuning: also train the embedding and LM-head rows of these tokens "
                        "(comma-separated tokens or ids), 'auto' = the chat template's special tokens, which a "
                        "base model may never have seen and a soft prompt alone cannot teach it to emit; 'none' = "
                        "a pure soft prompt (default: auto)")
    g = p.add_argument_group("checks")
    g.add_argument("--eval-tasks", metavar="FILE", help="exact-match accuracy on these examples before and after")
    g.add_argument("--eval-max-new-tokens", type=int, help="answer length limit for --eval-tasks (default: 32)")
    g.add_argument("--ref-data", metavar="FILE", help="reference text: perplexity before and after (forgetting)")
    add_train_flags(p.add_argument_group("optimisation (the training loop's TrainConfig)"), DEFAULTS,
                    _SKIP_TRAIN_FIELDS, docs={"lr": "default: per method"})
    from .parallel import add_parallel_arguments

    add_parallel_arguments(p)


def resolve_options(args: argparse.Namespace) -> dict:
    """defaults < YAML file < flags; unknown YAML keys and bad choices are errors naming the valid ones."""
    from ..errors import LmsmithError

    opts = resolve(args, DEFAULTS, _SKIP_TRAIN_FIELDS, conflicts={"epochs": ("max_steps",)})
    if opts["method"] not in METHODS:
        raise LmsmithError(f"unknown --method {opts['method']!r}; choose one of: {', '.join(METHODS)}")
    if opts["objective"] not in OBJECTIVES:
        raise LmsmithError(f"unknown --objective {opts['objective']!r}; choose one of: {', '.join(OBJECTIVES)}")
    if opts["objective"] == "reward":
        if opts["method"] not in ("full", "lora"):
            raise LmsmithError(f"--objective reward trains with --method full or lora, not {opts['method']}")
        if opts["eval_tasks"] or opts["ref_data"]:
            raise LmsmithError("--eval-tasks / --ref-data measure generation; a reward model is measured by its "
                               "preference accuracy on the validation pairs (and `lmsmith eval RM --preferences FILE`)")
    if not opts["data"]:
        raise LmsmithError("--data FILE is required (instruction or preference data; "
                           "`lmsmith data synth` makes a demo set)")
    if opts["adapter"]:
        from ..adapters import adapter_type

        kind = adapter_type(opts["adapter"])
        method = {"LORA": "lora", "PROMPT_TUNING": "prompt", "PREFIX_TUNING": "prefix"}[kind]
        if opts["method"] != method:
            raise LmsmithError(f"--adapter {opts['adapter']} is a {kind} adapter; continue it with --method {method}")
        if method != "lora":  # the adapter fixes the soft-prompt length
            from ..adapters.lora import read_adapter_config

            opts["virtual_tokens"] = int(read_adapter_config(opts["adapter"]).get("num_virtual_tokens") or 0)
    if opts["lr"] is None:
        opts["lr"] = DEFAULT_LR[(opts["method"], opts["objective"])]
    if not (math.isfinite(float(opts["epochs"])) and float(opts["epochs"]) > 0):
        raise LmsmithError(f"--epochs {opts['epochs']}: must be a positive number of passes over the data")
    if not 0 <= float(opts["val_fraction"]) < 0.5:
        raise LmsmithError(f"--val-fraction {opts['val_fraction']}: must be in [0, 0.5)")
    for key in ("batch_size", "seq_len"):
        if not isinstance(opts[key], int) or opts[key] < 1:
            raise LmsmithError(f"--{key.replace('_', '-')} {opts[key]!r}: must be a positive integer")
    if opts["time"] is not None:
        from ..train.budget import parse_duration

        opts["time"] = parse_duration(opts["time"])
    return opts


def run(args: argparse.Namespace) -> int:
    from .parallel import on_ranks, start_ranks

    with on_ranks(start_ranks(args)) as ranks:
        return _run(args, ranks)


def _run(args: argparse.Namespace, ranks) -> int:
    from ..data.instruct import InstructBatches, encode_preference, encode_sft, pack, pad_id_of, read_examples
    from ..data.synth import heldout_warning
    from ..errors import LmsmithError
    from ..loader import load
    from ..train import TrainConfig, train
    from ..train.dpo import dpo_objective, sft_objective

    t_start = time.time()
    opts = resolve_options(args)
    out = Path(opts["out"])
    dpo = opts["objective"] == "dpo"
    reward = opts["objective"] == "reward"

    # ---- data first: a typo in the data fails before a big model loads ---------------------------
    examples, read_stats = read_examples(opts["data"], opts["format"], skip_bad=bool(opts["skip_bad"]))
    is_pref = read_stats.format == "preference"
    if (dpo or reward) and not is_pref:
        raise LmsmithError(f"{opts['data']}: --objective {opts['objective']} needs preference data "
                           f"({{prompt, chosen, rejected}}), got format '{read_stats.format}'")
    if not (dpo or reward) and is_pref:
        raise LmsmithError(f"{opts['data']}: preference data trains with --objective dpo or reward "
                           "(or give SFT data: instruction/solution, chat, ...)")
    eval_examples = read_examples(opts["eval_tasks"])[0] if opts["eval_tasks"] else None
    examples, val_examples = _validation_split(opts, examples)
    ref_texts = _ref_texts(opts["ref_data"]) if opts["ref_data"] else None

    if ranks.main:
        prepare_run_folder(out, bool(opts["resume"]), bool(opts["overwrite"]),
                           inputs={"MODEL": opts["model"], "--adapter": opts["adapter"], "--data": opts["data"],
                                   "--eval-data": opts["eval_data"]})
    ranks.barrier()
    if ranks.distributed and opts["method"] in ("prompt", "prefix") and (ranks.layout.tp > 1 or ranks.layout.pp > 1):
        raise LmsmithError(f"--method {opts['method']} under --tp / --pp is not built: the virtual tokens "
                           "change the sequence the model's parallel layers split; use --dp-shard or --dp-replicate")

    # ---- model ------------------------------------------------------------------------------------
    base, tokenizer = load(opts["model"])
    if tokenizer is None:
        raise LmsmithError(f"{opts['model']}: no tokenizer.json beside the weights; fine-tuning needs the "
                           "model's tokenizer and chat template")
    if reward and not hasattr(base, "score"):
        from ..reward_model import RewardModel

        base = RewardModel.from_causal_lm(base, seed=int(opts["seed"]))  # the LM's decoder, a new score head
    if opts["method"] == "full":
        base.float()  # fp32 master weights: AdamW on bf16 weights rounds small updates away
    # LoRA / prompt tuning keep the frozen base in its own dtype (the memory saving); adapters are fp32.
    seq_len = min(int(opts["seq_len"]), base.config.max_seq_len)
    ranks.layout.check_model(base.config)

    # ---- encode -------------------------------------------------------------------------------------
    room = seq_len - (opts["virtual_tokens"] if opts["method"] in ("prompt", "prefix") else 0)
    if room < 2:
        raise LmsmithError(f"--seq-len {seq_len} leaves no room after {opts['virtual_tokens']} virtual tokens")
    if reward:
        from ..train.reward import encode_reward_pairs

        items, enc = encode_reward_pairs(examples, tokenizer, room)
    elif dpo:
        items, enc = encode_preference(examples, tokenizer, room)
    else:
        items, enc = encode_sft(examples, tokenizer, room)
        if opts["pack"]:
            items = pack(items, room)
    batches = InstructBatches(items, int(opts["batch_size"]), seed=int(opts["seed"]), pad_id=pad_id_of(tokenizer))
    eval_batches, n_eval_batches = None, 1
    if val_examples:
        if reward:
            from ..train.reward import encode_reward_pairs as encode
        else:
            encode = encode_preference if dpo else encode_sft
        val_items = encode(val_examples, tokenizer, room)[0]
        n_eval_batches = -(-len(val_items) // int(opts["batch_size"]))

        def eval_batches():  # one pass over the validation examples, in order
            import itertools

            vb = InstructBatches(val_items, int(opts["batch_size"]), seed=0, pad_id=pad_id_of(tokenizer))
            return itertools.islice(vb, vb.batches_per_epoch)
    max_steps = opts["max_steps"]
    if not max_steps:
        max_steps = max(1, math.ceil(float(opts["epochs"]) * batches.batches_per_epoch / int(opts["grad_accum"])))
    bad = f", {read_stats.bad_lines} malformed skipped" if read_stats.bad_lines else ""
    print(f"data: {opts['data']} ({read_stats.format}{bad}): {enc.describe()}"
          + (f"; packed into {len(items):,} rows" if opts["pack"] and not (dpo or reward) else ""))

    # ---- method ---------------------------------------------------------------------------------------
    import torch

    torch.manual_seed(int(opts["seed"]))  # LoRA's A and the soft prompt's rows are drawn here: same seed, same run
    model, trainable, reference_context, reference, method_desc, lora_cfg = _apply_method(opts, base, tokenizer)
    n_trainable = sum(p.numel() for p in trainable)
    n_total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    if reward:
        from ..train.reward import reward_objective

        objective = reward_objective(float(opts["margin"]))
        if opts["method"] == "lora":  # the new head trains with the adapters
            model.score.weight.requires_grad_(True)
            trainable = [*trainable, model.score.weight]
            n_trainable = sum(p.numel() for p in trainable)
    elif dpo:
        objective = dpo_objective(float(opts["beta"]), reference=reference, reference_context=reference_context)
    else:
        objective = sft_objective

    # ---- before ----------------------------------------------------------------------------------------
    max_new = int(opts["eval_max_new_tokens"])
    if ranks.layout.tp > 1 and (eval_examples or ref_texts):
        print("note: --eval-tasks / --ref-data are skipped under tensor parallelism (the KV cache holds every "
              "head); evaluate the result with `lmsmith eval` afterwards")
        eval_examples = ref_texts = None
    acc_before = _accuracy(model, tokenizer, eval_examples, max_new) if eval_examples else None
    ppl_before = _ppl(model, tokenizer, ref_texts, seq_len) if ref_texts else None
    if acc_before:
        print(f"accuracy before: {_fmt_acc(acc_before)}")
        if note := heldout_warning(eval_examples, opts["eval_tasks"]):
            print(note)
    if ppl_before:
        print(f"reference perplexity before: {ppl_before:.3f}")

    # ---- the loop -----------------------------------------------------------------------------------------
    warmup = min(int(opts["warmup_steps"]), max(0, max_steps // 10))
    train_opts = {f.name: opts[f.name] for f, _ in train_fields(_SKIP_TRAIN_FIELDS)}
    train_opts.update(max_steps=max_steps, warmup_steps=warmup, time_budget=opts["time"],
                      eval_batches=n_eval_batches)  # every validation example (at most _MAX_HELD_OUT of --data)
    config = TrainConfig(**train_opts)
    if ranks.main:
        save_options(out, {**opts, "max_steps": max_steps},
                     path_keys=("model", "data", "adapter", "eval_tasks", "ref_data", "eval_data"))
    print(f"lmsmith finetune: {opts['method']} {opts['objective']} of {opts['model']}; {method_desc}; "
          f"{max_steps:,} steps x {opts['batch_size']} x {opts['grad_accum']}; run folder {out}")
    result = train(model, batches, objective, config, out_dir=out, tokenizer=tokenizer, eval_batches=eval_batches,
                   resume=bool(opts["resume"]), trainable_params=trainable, ranks=ranks)

    # ---- save ------------------------------------------------------------------------------------------------
    written = _save_on_main(ranks, lambda m: _save_outputs(opts, out, m, tokenizer, lora_cfg, result), model,
                            opts["method"], lora_cfg)

    # ---- after and summary ---------------------------------------------------------------------------------------
    acc_after = _accuracy(model, tokenizer, eval_examples, max_new) if eval_examples else None
    ppl_after = _ppl(model, tokenizer, ref_texts, seq_len) if ref_texts else None
    lines = [f"Fine-tuned {opts['model']} with {opts['method']} {opts['objective'].upper()}: "
             f"{n_trainable:,} trainable of {n_total:,} parameters ({100 * n_trainable / max(n_total, 1):.3g}%), "
             f"{result.steps:,} steps in {(time.time() - t_start) / 60:.1f} min"
             + (f", final loss {result.final_loss:.4f}." if result.final_loss is not None else ".")]
    if dpo:
        last = next((r for r in reversed(_rows(out)) if "reward_margin" in r), None)
        if last:
            lines.append(f"DPO reward margin {last['reward_margin']:.3f}, "
                         f"accuracy {last['reward_accuracy']:.0%}.")
    if reward and result.val_loss is not None:
        val_rows = [r for r in _rows(out) if "val_accuracy" in r]
        if val_rows:
            lines.append(f"Reward model: preference accuracy {val_rows[-1]['val_accuracy']:.1%} on "
                         f"{len(val_examples):,} validation pairs (Bradley-Terry loss {result.val_loss:.4f}).")
    elif result.val_loss is not None:
        what = "validation pairs" if dpo else "validation responses"
        extra = f", perplexity {result.val_ppl:.2f}" if result.val_ppl is not None else ""
        val_rows = [r for r in _rows(out) if "val_reward_accuracy" in r]
        if val_rows:
            extra += f", preference accuracy {val_rows[-1]['val_reward_accuracy']:.0%}"
        lines.append(f"Loss on {len(val_examples):,} {what} {result.val_loss:.4f}{extra}.")
    if acc_after:
        before = f"{_fmt_acc(acc_before)} -> " if acc_before else ""
        lines.append(f"Task accuracy {before}{_fmt_acc(acc_after)}.")
    if ppl_after:
        before = f"{ppl_before:.3f} -> " if ppl_before else ""
        change = f" ({100 * (ppl_after / ppl_before - 1):+.1f}%)" if ppl_before else ""
        lines.append(f"Reference perplexity {before}{ppl_after:.3f}{change}.")
    if result.interrupted:
        lines.append(f"Interrupted: continue with `lmsmith finetune {opts['model']} --data {opts['data']} "
                     f"--method {opts['method']} --out {out} --resume`.")
    lines.append(f"Wrote {', '.join(str(w) for w in written)}; metrics in {out / 'metrics.jsonl'}.")
    lines.append(_next_commands(opts, written))
    print("\n" + " ".join(lines))
    if acc_after:
        for ex in acc_after["examples"]:
            mark = "ok " if ex["correct"] else "bad"
            print(f"  [{mark}] {ex['prompt']!r} -> {ex['got']!r} (expected {ex['expected']!r})")
    return 130 if result.interrupted else 0


def _validation_split(opts: dict, examples: list[dict]) -> tuple[list[dict], list[dict] | None]:
    """(training examples, validation examples): --eval-data's, else a seeded random fraction of --data."""
    import random

    from ..data.instruct import read_examples

    if opts["eval_data"]:
        return examples, read_examples(opts["eval_data"], opts["format"])[0]
    n = min(_MAX_HELD_OUT, int(len(examples) * float(opts["val_fraction"])))
    if n < 1 or len(examples) - n < 1:
        return examples, None
    held = set(random.Random(int(opts["seed"])).sample(range(len(examples)), n))
    print(f"validation: {n:,} of {len(examples):,} examples held out of --data (--val-fraction; --eval-data FILE "
          "gives your own)")
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def _apply_method(opts: dict, base, tokenizer):
    """(model to train, trainable params, reference context, reference model, description, LoraConfig)."""
    import copy

    method, dpo = opts["method"], opts["objective"] == "dpo"
    if method == "full":
        reference = None
        if dpo:
            reference = copy.deepcopy(base).eval()  # frozen copy: DPO's reference for full fine-tuning
            for p in reference.parameters():
                p.requires_grad_(False)
        trainable = [p for p in {id(p): p for p in base.parameters()}.values()]
        return base, trainable, None, reference, f"{base.num_params() / 1e6:.1f}M params", None
    if method == "lora":
        from ..adapters import LoraConfig, apply_lora, load_lora, lora_disabled, lora_parameters, lora_summary

        if opts["adapter"]:
            cfg = load_lora(base, opts["adapter"])  # continue training an existing adapter
            for p in base.parameters():
                p.requires_grad_(False)
            trainable = lora_parameters(base)
            for p in trainable:
                p.requires_grad_(True)
        else:
            targets = opts["lora_targets"]
            targets = targets if targets == "all-linear" else [t.strip() for t in str(targets).split(",") if t.strip()]
            cfg = LoraConfig(r=int(opts["lora_r"]), alpha=float(opts["lora_alpha"]),
                             dropout=float(opts["lora_dropout"]), target_modules=targets)
            trainable = apply_lora(base, cfg)
        print(lora_summary(base, cfg))
        return base, trainable, (lora_disabled if dpo else None), None, f"LoRA r={cfg.r}", cfg
    from ..adapters import PromptTuningConfig, apply_prompt_tuning

    if opts["adapter"]:  # continue training an existing soft prompt (its own settings and token rows)
        from ..adapters import load_prompt_tuning

        wrapped = load_prompt_tuning(base, opts["adapter"])
        pcfg, token_ids = wrapped.prompt_config, list(wrapped.prompt_config.train_tokens)
    else:
        token_ids = _train_token_ids(opts["train_tokens"], tokenizer)
        pcfg = PromptTuningConfig(n_virtual_tokens=int(opts["virtual_tokens"]), init_text=opts["prompt_init"],
                                  encoder_hidden=opts["prompt_encoder_hidden"], train_tokens=tuple(token_ids),
                                  deep=method == "prefix")
        wrapped = apply_prompt_tuning(base, pcfg, tokenizer)
    trainable = wrapped.prompt_parameters()
    # The reference for DPO is the wrapped base without the prompt (frozen already; no copy).
    reference = base if dpo else None
    rows = (f", plus the embedding/head rows of {len(token_ids)} tokens "
            f"({' '.join(repr(tokenizer.id_to_token(i)) for i in token_ids)})" if token_ids else "")
    kind = "prefix tuning (keys/values in every layer) with" if pcfg.deep else "prompt tuning:"
    print(f"{kind} {pcfg.n_virtual_tokens} virtual tokens{rows}; {sum(p.numel() for p in trainable):,} "
          f"trainable parameters; base frozen")
    return wrapped, trainable, None, reference, f"{pcfg.n_virtual_tokens} virtual tokens", None


def _train_token_ids(spec, tokenizer) -> list[int]:
    """--train-tokens: 'auto' (the chat template's special tokens), 'none', or comma-separated tokens / ids."""
    from ..errors import LmsmithError

    spec = str(spec).strip()
    if spec == "auto":
        return tokenizer.template_token_ids()
    if spec in ("none", ""):
        return []
    ids = []
    for item in (t.strip() for t in spec.split(",")):
        if not item:
            continue
        i = int(item) if item.isdigit() else tokenizer.token_to_id(item)
        if i is None or not 0 <= i < tokenizer.vocab_size:
            raise LmsmithError(f"--train-tokens: {item!r} is not a token of this tokenizer (give tokens such as "
                               f"'<|im_end|>' or ids below {tokenizer.vocab_size}, 'auto' or 'none')")
        ids.append(i)
    return sorted(set(ids))


def _save_outputs(opts: dict, out: Path, model, tokenizer, lora_cfg, result) -> list[Path]:
    """full: the loop's final/; lora/prompt/prefix: adapter/ in peft's format (+ merged/ for LoRA; the loop
    writes no final/ when only adapters train)."""
    import copy

    from ..checkpoint import save

    if result.interrupted:
        return [result.checkpoint] if result.checkpoint else []
    if opts["method"] == "full":
        return [result.final_dir]
    if opts.get("objective") == "reward":  # a reward model ships as one HF directory: the adapter merged in
        from ..adapters import merge_lora

        return [save(merge_lora(copy.deepcopy(model)), tokenizer, out / "final")]
    adapter = out / "adapter"
    written = [adapter]
    if opts["method"] == "lora":
        from ..adapters import merge_lora, save_lora

        save_lora(model, lora_cfg, adapter, base_model_name_or_path=str(opts["model"]))
        tokenizer.save(adapter)
        if opts["merge"]:
            merged = merge_lora(copy.deepcopy(model))
            save(merged, tokenizer, out / "merged")
            written.append(out / "merged")
    else:
        from ..adapters import save_prompt_tuning

        save_prompt_tuning(model, adapter, base_model_name_or_path=str(opts["model"]))
        tokenizer.save(adapter)
    return written


def _save_on_main(ranks, save, model, method: str, lora_cfg):
    """Run `save(model)` on rank 0 with the adapters' full tensors (FSDP / TP gather them first)."""
    if not ranks.shards_weights or method == "full":  # the loop wrote final/ already (gathered)
        written = save(model) if ranks.main else []
    else:
        from ..distributed.dcp import gathered_copy

        plain = gathered_copy(model, ranks, lora_cfg)  # every rank takes part; rank 0 gets a plain model
        written = save(plain) if ranks.main else []
    ranks.barrier()
    return [Path(w) for w in ranks.broadcast([str(w) for w in written])]


def _next_commands(opts: dict, written: list[Path]) -> str:
    if not written:
        return ""
    if opts["objective"] == "reward":
        return (f"Next: `lmsmith eval {written[0]} --preferences FILE`, "
                f"`lmsmith rl {opts['model']} --prompts FILE --reward {written[0]}`.")
    first = written[-1] if opts["method"] == "lora" and opts["merge"] else written[0]
    task = f" --tasks {opts['eval_tasks']}" if opts["eval_tasks"] else " --tasks FILE"
    if opts["method"] == "full" or first.name == "merged":
        return f"Next: `lmsmith chat {first}`, `lmsmith eval {first}{task}`."
    return (f"Next: `lmsmith chat {opts['model']} --adapter {first}`, "
            f"`lmsmith eval {opts['model']} --adapter {first}{task}`.")


def _accuracy(model, tokenizer, examples, max_new_tokens: int) -> dict:
    from ..eval.tasks import task_accuracy

    return task_accuracy(model, tokenizer, examples, max_new_tokens=max_new_tokens)


def _fmt_acc(result: dict) -> str:
    from ..eval.tasks import format_accuracy

    return format_accuracy(result)


def _ref_texts(path: str) -> list[str]:
    from ..data.sources import Source, iter_documents
    from ..errors import LmsmithError

    if not Path(path).exists():
        raise LmsmithError(f"{path}: no such reference text (--ref-data)")
    texts = [t for _, t in iter_documents(Source(name="ref", path=path)) if t.strip()]
    if not texts:
        raise LmsmithError(f"{path}: no text found for --ref-data")
    return texts


def _ppl(model, tokenizer, texts: list[str], seq_len: int) -> float:
    from ..eval import perplexity

    was_training = model.training
    try:
        return perplexity(model, tokenizer, texts, seq_len=min(seq_len, model.config.max_seq_len)).perplexity
    finally:
        model.train(was_training)


def _rows(out: Path) -> list[dict]:
    import json

    f = out / "metrics.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.exists() else []
