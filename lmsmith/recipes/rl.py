"""`lmsmith rl MODEL --prompts FILE --reward exact|REWARD_DIR|module:function`: online RL (GRPO / RLOO).

Read top to bottom: resolve the options -> read the prompts (and held-out prompts) -> the reward
function -> load the policy (LoRA on a frozen base, or every weight) and its reference (the base
with the adapters off, or a frozen copy) -> held-out accuracy before -> the one training loop, its
batches drawn by `rl.rollout.Rollouts` (sample, score, advantages) and its objective
`train.grpo` -> save (adapter/ in peft format, merged/ with --merge; full: final/) -> curves
and summary.
"""

from __future__ import annotations

import argparse
import math
import os
import time
import typing
from pathlib import Path

from .options import add_run_arguments, add_train_flags, prepare_run_folder, resolve, save_options, train_fields

HELP = "online RL from a reward: GRPO / RLOO / REINFORCE on sampled responses (exact match, a reward model, a function)"
DESCRIPTION = """Optimise MODEL (an HF directory: usually an instruction-tuned one) against a reward, on
its own samples. Each step takes --prompts-per-step prompts from --prompts, samples
--group-size responses to each with the batched engine (--temperature, --max-new-tokens),
scores them with --reward, and turns the rewards into group-normalised advantages:

  --baseline mean           GRPO: reward minus the group's mean (scaled by its std: --scale-rewards group)
  --baseline leave-one-out  RLOO: reward minus the mean of the other responses
  --baseline none           REINFORCE: the reward itself

The loss is the clipped importance-weighted policy gradient (--clip-eps; --reuse K takes K
updates per rollout so the ratio moves) plus --kl times the KL to the reference (the model
before RL: the base with the LoRA adapters off, or a frozen copy for --method full), averaged
over response tokens. A response that never ends loses --missing-eos-penalty.

Rewards (--reward):
  exact              1 when the response equals the prompt's answer after strip (the prompts need answers)
  DIR                a reward model (`lmsmith finetune MODEL --objective reward`)
  module:function    your Python function (prompt, response) -> float; also path/to/file.py:function

Prompts (--prompts, JSONL): lmsmith data synth's files ({"instruction", "solution"}), chat
records ({"messages"}; a final assistant turn is the answer), or {"prompt", "answer"}.

--eval-prompts FILE measures held-out accuracy (greedy) and pass@1 / pass@K (--pass-k samples)
before, every --eval-every steps and at the end, into metrics.jsonl and OUT/rl.png.

example:
  lmsmith finetune runs/pretrain/final --data tasks/train.jsonl --method lora --merge --out runs/sft
  lmsmith rl runs/sft/merged --prompts tasks/train.jsonl --reward exact --eval-prompts tasks/heldout.jsonl \\
      --max-steps 100 --out runs/rl"""

METHODS = ("full", "lora")
DEFAULT_LR = {"full": 1e-5, "lora": 2e-4}

DEFAULTS: dict[str, typing.Any] = {
    "model": None,
    "out": "runs/rl",
    "prompts": None,
    "reward": "exact",
    "eval_prompts": None,
    "method": "lora",
    "adapter": None,
    "merge": False,
    "lora_r": 8,
    "lora_alpha": 16.0,
    "lora_targets": "q_proj,k_proj,v_proj,o_proj",
    "group_size": 8,
    "prompts_per_step": 8,
    "temperature": 0.7,
    "top_p": 1.0,
    "max_new_tokens": 32,
    "baseline": "mean",
    "scale_rewards": None,
    "clip_eps": 0.2,
    "kl": 0.0,
    "reuse": 1,
    "missing_eos_penalty": 1.0,
    "pass_k": 8,
    "max_eval_prompts": 200,
    "max_steps": 100,
    "time": None,
    "resume": False,
    "overwrite": False,
    "lr": None,
    "weight_decay": 0.0,
    "warmup_steps": 5,
    "eval_every": 25,
    "save_every": 50,
    "log_every": 1,
}
# TrainConfig fields not offered as flags.
_SKIP_TRAIN_FIELDS = {"max_steps", "betas", "sample_prompt", "sample_every", "sample_tokens", "time_budget",
                      "eval_batches"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="the policy to start from (HF directory, e.g. a fine-tuned or merged model)")
    add_run_arguments(p, DEFAULTS)
    g = p.add_argument_group("prompts and reward")
    g.add_argument("--prompts", metavar="FILE", help="prompts to sample from (JSONL; with answers for --reward exact)")
    g.add_argument("--reward", help="exact | REWARD_MODEL_DIR | module:function (default: exact)")
    g.add_argument("--eval-prompts", metavar="FILE", help="held-out prompts with answers: accuracy and pass@k during "
                                                          "training")
    g.add_argument("--max-eval-prompts", type=int, help="evaluate on at most this many of them (default: 200)")
    g.add_argument("--pass-k", type=int, help="samples per held-out prompt for pass@1 / pass@k (default: 8; 0: "
                                              "greedy accuracy only)")
    g = p.add_argument_group("sampling")
    g.add_argument("--group-size", type=int, help="responses sampled per prompt, G (default: 8)")
    g.add_argument("--prompts-per-step", type=int, help="prompts per micro-batch (default: 8)")
    g.add_argument("--temperature", type=float, help="sampling temperature; log-probabilities are those of the "
                                                  "tempered distribution (default: 0.7)")
    g.add_argument("--top-p", type=float, help="nucleus sampling (default: 1.0, off)")
    g.add_argument("--max-new-tokens", type=int, help="response length limit (default: 32)")
    g = p.add_argument_group("objective")
    g.add_argument("--baseline", help="mean (GRPO) | leave-one-out (RLOO) | none (REINFORCE) (default: mean)")
    g.add_argument("--scale-rewards", help="group (divide advantages by the group's std) | none (default: group "
                                           "for the mean baseline, none otherwise)")
    g.add_argument("--clip-eps", type=float, help="ratio clipping epsilon (default: 0.2)")
    g.add_argument("--kl", type=float, help="KL penalty coefficient to the reference (default: 0; the KL is "
                                            "logged either way when there is a reference)")
    g.add_argument("--reuse", type=int, help="optimizer steps per rollout (default: 1)")
    g.add_argument("--missing-eos-penalty", type=float, help="subtracted from the reward of a response that hits "
                                                             "--max-new-tokens without ending (default: 1.0)")
    g = p.add_argument_group("method")
    g.add_argument("--method", help="lora | full (default: lora)")
    g.add_argument("--adapter", metavar="DIR", help="continue training this LoRA adapter (peft format)")
    g.add_argument("--merge", action="store_true", default=None, help="LoRA: also write OUT/merged/")
    g.add_argument("--lora-r", type=int, help="LoRA rank (default: 8)")
    g.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: 16)")
    g.add_argument("--lora-targets", help="comma-separated module names, or all-linear (default: q,k,v,o_proj)")
    g = p.add_argument_group("length")
    g.add_argument("--max-steps", type=int, help="optimizer steps (default: 100)")
    g.add_argument("--time", metavar="DURATION", help="wall-time budget, e.g. 10m (--max-steps then caps it)")
    add_train_flags(p.add_argument_group("optimisation (the training loop's TrainConfig)"), DEFAULTS,
                    _SKIP_TRAIN_FIELDS, docs={"lr": "default: lora 2e-4, full 1e-5"})


def resolve_options(args: argparse.Namespace) -> dict:
    from ..errors import LmsmithError
    from ..train.grpo import BASELINES, SCALES

    opts = resolve(args, DEFAULTS, _SKIP_TRAIN_FIELDS)
    if not opts["prompts"]:
        raise LmsmithError("--prompts FILE is required (`lmsmith data synth` makes a demo set with answers)")
    if opts["method"] not in METHODS:
        raise LmsmithError(f"unknown --method {opts['method']!r}; choose one of: {', '.join(METHODS)}")
    if opts["baseline"] not in BASELINES:
        raise LmsmithError(f"unknown --baseline {opts['baseline']!r}; choose one of: {', '.join(BASELINES)}")
    if opts["scale_rewards"] is None:
        opts["scale_rewards"] = "group" if opts["baseline"] == "mean" else "none"
    if opts["scale_rewards"] not in SCALES:
        raise LmsmithError(f"unknown --scale-rewards {opts['scale_rewards']!r}; choose one of: {', '.join(SCALES)}")
    if opts["adapter"] and opts["method"] != "lora":
        raise LmsmithError("--adapter continues a LoRA adapter: use it with --method lora")
    for key in ("group_size", "prompts_per_step", "max_new_tokens", "reuse", "max_steps", "max_eval_prompts"):
        if not isinstance(opts[key], int) or opts[key] < 1:
            raise LmsmithError(f"--{key.replace('_', '-')} {opts[key]!r}: must be a positive integer")
    if not isinstance(opts["pass_k"], int) or opts["pass_k"] < 0:
        raise LmsmithError(f"--pass-k {opts['pass_k']!r}: must be >= 0")
    for key, low in (("temperature", 0.0), ("clip_eps", 0.0)):
        if not (math.isfinite(float(opts[key])) and float(opts[key]) > low):
            raise LmsmithError(f"--{key.replace('_', '-')} {opts[key]}: must be > {low:g}")
    if not 0 < float(opts["top_p"]) <= 1:
        raise LmsmithError(f"--top-p {opts['top_p']}: must be in (0, 1]")
    for key in ("kl", "missing_eos_penalty"):
        if not (math.isfinite(float(opts[key])) and float(opts[key]) >= 0):
            raise LmsmithError(f"--{key.replace('_', '-')} {opts[key]}: must be >= 0")
    if opts["lr"] is None:
        opts["lr"] = DEFAULT_LR[opts["method"]]
    if opts["time"] is not None:
        from ..train.budget import parse_duration

        opts["time"] = parse_duration(opts["time"])
    return opts


def run(args: argparse.Namespace) -> int:
    from ..errors import LmsmithError
    from ..rl.prompts import read_prompts
    from ..rl.rewards import make_reward

    t_start = time.time()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise LmsmithError("lmsmith rl runs on one process (its sampling and training alternate); run it without "
                           "torchrun")
    opts = resolve_options(args)
    out = Path(opts["out"])
    prompts = read_prompts(opts["prompts"])  # before the model loads: a typo costs no model load
    heldout = read_prompts(opts["eval_prompts"])[: int(opts["max_eval_prompts"])] if opts["eval_prompts"] else None
    if opts["reward"] == "exact":
        _need_answers(prompts, opts["prompts"], "--reward exact")
    if heldout:
        _need_answers(heldout, opts["eval_prompts"], "--eval-prompts")
    prepare_run_folder(out, bool(opts["resume"]), bool(opts["overwrite"]),
                       inputs={"MODEL": opts["model"], "--adapter": opts["adapter"], "--prompts": opts["prompts"],
                               "--reward": opts["reward"] if Path(opts["reward"]).exists() else None})

    policy, tokenizer, trainable, reference, reference_context, lora_cfg = _policy(opts)
    reward = make_reward(opts["reward"], device=policy.model.norm.weight.device)
    return _train(opts, out, policy, tokenizer, trainable, reference, reference_context, lora_cfg, prompts,
                  heldout, reward, t_start)


def _need_answers(items: list[dict], path: str, what: str) -> None:
    from ..errors import LmsmithError

    missing = next((it for it in items if it["answer"] is None), None)
    if missing is not None:
        raise LmsmithError(f"{path}:{missing['line']}: no answer to check ({what} compares responses with "
                           "\"answer\" / \"solution\" / a final assistant turn)")


def _policy(opts: dict):
    """(policy, tokenizer, trainable params, frozen reference or None, reference context or None, LoraConfig)."""
    import copy

    import torch

    from ..errors import LmsmithError
    from ..loader import load

    model, tokenizer = load(opts["model"])
    if tokenizer is None:
        raise LmsmithError(f"{opts['model']}: no tokenizer.json beside the weights; RL needs the chat template")
    if hasattr(model, "score"):
        raise LmsmithError(f"{opts['model']} is a reward model; give it as --reward and a language model as MODEL")
    torch.manual_seed(int(opts["seed"]))  # LoRA's A matrices are drawn here
    if opts["method"] == "full":
        model.float()  # fp32 master weights
        reference = None
        if float(opts["kl"]) > 0:
            reference = copy.deepcopy(model).eval()
            for p in reference.parameters():
                p.requires_grad_(False)
        return model, tokenizer, list({id(p): p for p in model.parameters()}.values()), reference, None, None
    from ..adapters import lora_disabled
    from .finetune import _apply_method

    # The same adapter set-up as finetune's (a new adapter, or --adapter continued); its reference is ours.
    model, trainable, _, _, _, cfg = _apply_method({**opts, "objective": "sft", "lora_dropout": 0.0}, model,
                                                   tokenizer)
    return model, tokenizer, trainable, None, lora_disabled, cfg


def _train(opts, out, policy, tokenizer, trainable, reference, reference_context, lora_cfg, prompts, heldout,
           reward, t_start) -> int:
    from ..rl.evaluate import heldout_metrics
    from ..rl.rollout import Rollouts
    from ..train import TrainConfig, train
    from ..train.grpo import grpo_objective

    max_steps = int(opts["max_steps"])
    warmup = min(int(opts["warmup_steps"]), max(0, max_steps // 10))
    train_opts = {f.name: opts[f.name] for f, _ in train_fields(_SKIP_TRAIN_FIELDS)}
    train_opts.update(max_steps=max_steps, warmup_steps=warmup, time_budget=opts["time"], eval_batches=1)
    config = TrainConfig(**train_opts)
    rollouts = Rollouts(policy, tokenizer, prompts, reward, group_size=int(opts["group_size"]),
                        prompts_per_step=int(opts["prompts_per_step"]), temperature=float(opts["temperature"]),
                        top_p=float(opts["top_p"]), max_new_tokens=int(opts["max_new_tokens"]),
                        baseline=opts["baseline"], scale=opts["scale_rewards"],
                        missing_eos_penalty=float(opts["missing_eos_penalty"]), reuse=int(opts["reuse"]),
                        grad_accum=int(opts["grad_accum"]), seed=int(opts["seed"]), precision=opts["dtype"])
    objective = grpo_objective(float(opts["clip_eps"]), float(opts["kl"]), reference=reference,
                               reference_context=reference_context)

    def eval_fn(model):
        return heldout_metrics(model, tokenizer, heldout, k=int(opts["pass_k"]), temperature=float(opts["temperature"]),
                               top_p=float(opts["top_p"]), max_new_tokens=int(opts["max_new_tokens"]),
                               seed=int(opts["seed"]), precision=opts["dtype"])

    before = None
    if heldout and not opts["resume"]:
        before = eval_fn(policy)
        print(f"held-out before: {_fmt(before)}")
    save_options(out, {**opts, "max_steps": max_steps},
                 path_keys=("model", "prompts", "eval_prompts", "adapter"))
    print(f"lmsmith rl: {opts['method']} {opts['baseline']}-baseline policy gradient on {opts['model']}; reward "
          f"{opts['reward']}; {max_steps:,} steps x {rollouts.P} prompts x {rollouts.G} samples; run folder {out}")
    result = train(policy, rollouts, objective, config, out_dir=out, tokenizer=tokenizer,
                   eval_fn=eval_fn if heldout else None, resume=bool(opts["resume"]), trainable_params=trainable)
    from .finetune import _rows, _save_outputs

    # finetune's outputs: final/ (the loop's) for full, adapter/ (+ merged/ with --merge) for LoRA
    written = [] if result.interrupted else _save_outputs({**opts, "objective": "sft"}, out, policy, tokenizer,
                                                          lora_cfg, result)
    rows = _rows(out)
    _plot(rows, before, out)
    sampling = rollouts.sample_seconds / max(result.wall_time, 1e-9)
    summary = {"steps": result.steps, "wall_s": result.wall_time, "sampling_share": sampling, "before": before,
               "after": next((r for r in reversed(rows) if "val_accuracy" in r), None),
               "reward_first": next((r["reward"] for r in rows if "reward" in r), None),
               "reward_last": next((r["reward"] for r in reversed(rows) if "reward" in r), None)}
    if not result.interrupted:
        from ..fileio import write_json

        write_json(out / "rl_summary.json", summary)
    _print_summary(opts, out, result, summary, written)
    return 130 if result.interrupted else 0


def _fmt(m: dict) -> str:
    return ", ".join(f"{k.removeprefix('val_')} {v:.1%}" for k, v in m.items())


def _plot(rows: list[dict], before: dict | None, out: Path) -> None:
    from ..train.metrics import plot_curves

    rows = ([{"step": 0, **before}] if before else []) + rows
    panels = {"reward (training samples)": {"reward": "reward"},
              "accuracy": {"training samples": "accuracy", "held-out (greedy)": "val_accuracy",
                           "held-out pass@1": "val_pass@1"}}
    for k in sorted({k for r in rows for k in r if k.startswith("val_pass@") and k != "val_pass@1"}):
        panels["accuracy"][f"held-out {k.removeprefix('val_')}"] = k
    note = plot_curves(rows, out / "rl.png", panels)
    if note:
        print(f"note: {note}")


def _print_summary(opts, out: Path, result, summary: dict, written: list[Path]) -> None:
    from ..train.budget import format_duration

    lines = [f"RL on {opts['model']}: {result.steps:,} steps in {format_duration(result.wall_time)}, "
             f"{summary['sampling_share']:.0%} of it sampling."]
    if summary["reward_first"] is not None:
        lines.append(f"Mean reward {summary['reward_first']:.3f} (first step) -> {summary['reward_last']:.3f} (last).")
    after = summary["after"]
    if after:
        shown = {k: v for k, v in after.items() if k.startswith("val_") and "_accuracy_" not in k}
        before = f"{_fmt({k: summary['before'][k] for k in shown if k in summary['before']})} -> " \
            if summary["before"] else ""
        lines.append(f"Held-out {before}{_fmt(shown)}.")
    if result.interrupted:
        lines.append(f"Interrupted: continue with `lmsmith rl {opts['model']} --prompts {opts['prompts']} "
                     f"--out {out} --resume`.")
    if written:
        lines.append(f"Wrote {', '.join(str(w) for w in written)}; metrics in {out / 'metrics.jsonl'}, curves in "
                     f"{out / 'rl.png'}.")
    print("\n" + " ".join(lines))

