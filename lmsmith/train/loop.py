"""The one training loop.

Pretraining, SFT, DPO and distillation differ only in their batches and their
objective; everything else lives here once: token-normalised gradient
accumulation, clipping, the LR schedule, throughput/MFU, eval, samples,
atomic checkpoints, bit-exact resume, Ctrl-C and NaN handling.

Run folder layout (`out_dir`):

    metrics.jsonl                one JSON row per log / eval / sample event
    loss.png                     train and validation loss, written at the end
    checkpoints/step-XXXXXXX/    HF directory + train_state/ (the last `keep_last`); when only some
                                 parameters train (adapters), just those + train_state/
    final/                       HF directory of the final model (no train_state; not written when
                                 only adapters train: save them in their own format)
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..distributed.materialize import init_sharded, is_meta
from ..distributed.parallelize import parallelize
from ..distributed.ranks import Ranks
from ..errors import LmsmithError
from ..loss import IGNORE_INDEX
from ..precision import POLICIES, autocast, autocast_dtype
from . import state as st
from .budget import StepBudget, format_duration
from .interrupt import StopFlag
from .metrics import MetricsLog, format_eval, format_postfix, measure_matmul_peak, plot_loss_curve, progress_bar
from .optim import SCHEDULES, build_optimizer, lr_at, param_groups


@dataclass
class TrainConfig:
    """Everything the loop needs to know; validated on construction.

    Attributes:
        lr: peak learning rate.
        min_lr_ratio: final LR as a fraction of `lr` (cosine / wsd end point).
        weight_decay: AdamW decay on weight matrices (not embeddings, norms, biases).
        betas: AdamW's two moment decay rates.
        eps: AdamW's epsilon.
        warmup_steps: linear warmup length in optimizer steps.
        schedule: "cosine" | "wsd" (warmup-stable-decay) | "constant".
        decay_fraction: for "wsd", the fraction of max_steps spent decaying.
        max_steps: optimizer steps in the whole run (with time_budget: the most it may take).
        grad_accum: micro-batches per optimizer step.
        clip_grad: max global gradient norm (0 disables clipping; the norm is still logged).
        dtype: precision policy "auto" | "fp32" | "bf16" | "fp16" (see lmsmith.precision).
        compile: torch.compile each block (opt-in; slow first steps).
        activation_checkpointing: recompute each block's activations in backward.
        seed: seeds python, numpy and torch at the start of the run.
        log_every: steps between metrics rows / progress-bar updates.
        eval_every: steps between evaluations (0: only at the end, if eval data is given).
        eval_batches: batches per evaluation.
        save_every: steps between checkpoints (0: only the final one).
        keep_last: checkpoints kept on disk (older ones deleted).
        sample_every: steps between generated samples (0: never).
        sample_prompt: prompt for the built-in sampler (needs a tokenizer).
        sample_tokens: tokens generated per sample.
        device: "cpu", "cuda", ... (None: where the model already is).
        peak_flops: matmul peak in FLOP/s for MFU (None: measured by a ~1 s probe).
        progress: show the tqdm progress bar.
        time_budget: seconds of wall time for the run (None: no limit); after a few steps the loop
            measures its speed and sets the step count and LR schedule so the run ends on time.
    """

    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 100
    schedule: str = "cosine"
    decay_fraction: float = 0.2
    max_steps: int = 1000
    grad_accum: int = 1
    clip_grad: float = 1.0
    dtype: str = "auto"
    compile: bool = False
    activation_checkpointing: bool = False
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0
    eval_batches: int = 20
    save_every: int = 500
    keep_last: int = 3
    sample_every: int = 0
    sample_prompt: str = ""
    sample_tokens: int = 48
    device: str | None = None
    peak_flops: float | None = None
    progress: bool = True
    time_budget: float | None = None

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> LmsmithError:
            return LmsmithError(f"TrainConfig.{name} = {getattr(self, name)!r}: {why}")

        self.betas = tuple(self.betas)
        for name in ("lr", "min_lr_ratio", "weight_decay", "eps", "decay_fraction", "clip_grad"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise bad(name, "must be a finite number")
        if not all(isinstance(b, (int, float)) and math.isfinite(b) for b in self.betas):
            raise bad("betas", "must be two finite numbers in [0, 1)")
        if not self.lr > 0:
            raise bad("lr", "must be > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise bad("min_lr_ratio", "must be in [0, 1]")
        if self.weight_decay < 0:
            raise bad("weight_decay", "must be >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise bad("betas", "must be two numbers in [0, 1)")
        if not self.eps > 0:
            raise bad("eps", "must be > 0")
        if self.schedule not in SCHEDULES:
            raise bad("schedule", f"choose one of {', '.join(SCHEDULES)}")
        if not 0 < self.decay_fraction <= 1:
            raise bad("decay_fraction", "must be in (0, 1]")
        for name in ("max_steps", "grad_accum", "eval_batches", "keep_last", "log_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise bad(name, "must be a positive integer")
        for name in ("warmup_steps", "eval_every", "save_every", "sample_every", "sample_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise bad(name, "must be a non-negative integer (0 disables)")
        if self.warmup_steps >= self.max_steps:
            raise bad("warmup_steps", f"must be smaller than max_steps ({self.max_steps})")
        if self.clip_grad < 0:
            raise bad("clip_grad", "must be >= 0 (0 disables clipping)")
        if self.dtype not in POLICIES:
            raise bad("dtype", f"choose one of {', '.join(POLICIES)}")
        if self.peak_flops is not None and not (self.peak_flops > 0 and math.isfinite(self.peak_flops)):
            raise bad("peak_flops", "must be > 0 FLOP/s, or None to measure it")
        if self.time_budget is not None and not (self.time_budget > 0 and math.isfinite(self.time_budget)):
            raise bad("time_budget", "must be a positive number of seconds, or None for no limit")

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step `step` (0-based) under this config."""
        return lr_at(step, lr=self.lr, max_steps=self.max_steps, warmup_steps=self.warmup_steps,
                     schedule=self.schedule, min_lr_ratio=self.min_lr_ratio,
                     decay_fraction=self.decay_fraction)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


@dataclass
class TrainResult:
    """Summary of a run (also printed at the end)."""

    steps: int  # the run's step count, including steps done before a resume
    tokens: int  # tokens trained on in the whole run
    final_loss: float | None
    val_loss: float | None
    val_ppl: float | None
    wall_time: float
    tokens_per_s: float
    checkpoint: Path | None
    final_dir: Path | None
    interrupted: bool = False
    losses: dict[int, float] = field(default_factory=dict)  # step -> train loss, this process's steps
    steps_run: int = 0  # steps and tokens of this process (after a resume: the resumed part)
    tokens_run: int = 0
    time_budget: float | None = None  # the budget the step count was fitted to, if any

    def summary(self) -> str:
        resumed = f" ({self.steps_run} in this session)" if self.steps_run != self.steps else ""
        parts = [f"{self.steps} steps{resumed}, {self.tokens:,} tokens; {self.wall_time:.1f}s here "
                 f"({self.tokens_per_s:,.0f} tok/s)"]
        if self.final_loss is not None:
            parts.append(f"train loss {self.final_loss:.4f}")
        if self.val_loss is not None:
            ppl = f" (ppl {self.val_ppl:.2f})" if self.val_ppl is not None else ""
            parts.append(f"val loss {self.val_loss:.4f}{ppl}")
        where = self.final_dir or self.checkpoint
        if where is not None:
            parts.append(f"model in {where}")
        return "; ".join(parts)


# ---- sampling ---------------------------------------------------------------------------


@torch.no_grad()
def sample_text(model, tokenizer, prompt: str, max_new_tokens: int = 48, temperature: float = 0.0,
                seed: int | None = None) -> str:
    """Continue `prompt` with greedy (temperature 0) or temperature sampling, using the KV cache.

    Progress samples during training, on the generation engine (`decoding.engine`).
    """
    from ..decoding.config import GenerationConfig
    from ..decoding.engine import generate_ids

    # A document starts after bos for models that use one, else after the eos separator.
    bos = getattr(tokenizer, "bos_id", None) if getattr(tokenizer, "add_bos", False) else None
    start = bos if bos is not None else getattr(tokenizer, "eos_id", None)
    ids = ([start] if start is not None else []) + (tokenizer.encode(prompt) if prompt else [])
    ids = ids or [0]
    context = model.config.max_seq_len
    ids = ids[-max(1, context - max_new_tokens):]  # room for the new tokens
    config = GenerationConfig(strategy="sample" if temperature > 0 else "greedy", temperature=temperature,
                              max_new_tokens=max_new_tokens, seed=seed,
                              eos_ids=list(getattr(tokenizer, "eos_ids", None) or []))
    was_training = model.training
    model.eval()
    try:
        out = generate_ids(model, [ids], config)[0].ids
    finally:
        model.train(was_training)
    return prompt + tokenizer.decode(out)


# ---- the loop ---------------------------------------------------------------------------


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _batch_tokens(batch: dict) -> tuple[int, int]:
    """(tokens processed, longest row) of a batch, for throughput and MFU: every 2-D integer tensor whose
    key names ids (`input_ids`, DPO's `chosen_ids` / `rejected_ids`, ...), so any objective's batch counts."""
    total, width = 0, 0
    for key, v in batch.items():
        if key.endswith("ids") and isinstance(v, torch.Tensor) and v.ndim == 2 and not v.is_floating_point():
            total += v.numel()
            width = max(width, v.shape[1])
    return total, width


def evaluate(model, eval_batches: Callable[[], Iterator[dict]], objective, *, n_batches: int,
             policy: str = "auto", device: torch.device | str = "cpu", ranks: Ranks | None = None
             ) -> dict[str, float]:
    """Mean loss per item over `n_batches` batches of a fresh eval iterator, with the objective's metrics.

    Returns `val_loss`, `val_<metric>` for each metric the objective reports (averaged over batches),
    and `val_ppl` = exp(val_loss) only for objectives whose loss is a per-token negative log-likelihood
    (those marked `objective.perplexity = True`): exp of a DPO loss is no perplexity. An objective whose
    loss is not one but that reports a per-token NLL metric names it (`objective.perplexity_of = "ce"`:
    distillation) and `val_ppl` is exp of that. Under data
    parallelism each rank evaluates its slice of every batch and the sums are added over the ranks.
    """
    ranks = ranks or Ranks()
    device = torch.device(device)
    was_training = model.training
    model.eval()
    total, count, sums, batches = 0.0, 0, {}, 0
    try:
        with torch.no_grad(), autocast(policy, device):
            for i, batch in enumerate(eval_batches()):
                if i >= n_batches:
                    break
                local = _to_device(ranks.shard_batch(batch, even=False), device)
                if ranks.pipeline is not None:  # a forward-only pass of the schedule; losses on the last stage
                    loss_sum, metrics = ranks.pipeline.evaluate(local), {}
                    # counted once, where the loss is
                    n = int((local["labels"] != IGNORE_INDEX).sum()) if ranks.pipeline.last else 0
                else:
                    loss_sum, metrics, n = objective(model, local)
                total += float(loss_sum)
                count += n
                batches += 1
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
    finally:
        model.train(was_training)
    keys = sorted(sums)
    # A pipeline's losses (and their counts) are on its last stages only: add them over every rank.
    total, count, *summed = ranks.sum([total, count, *(sums[k] for k in keys)],
                                      over="world" if ranks.pipeline is not None else "dp")
    sums = {k: v / ranks.dp_size for k, v in zip(keys, summed)}
    if count == 0:
        raise LmsmithError("evaluation data produced no target tokens; check the validation split")
    val = total / count
    out = {"val_loss": val, **{f"val_{k}": v / batches for k, v in sums.items()}}
    if getattr(objective, "perplexity", False):
        out["val_ppl"] = math.exp(min(val, 700.0))
    elif f"val_{getattr(objective, 'perplexity_of', None)}" in out:  # e.g. distillation's cross-entropy
        out["val_ppl"] = math.exp(min(out[f"val_{objective.perplexity_of}"], 700.0))
    return out


def accumulate_gradients(model, micro_batches, objective, *, params=None, policy: str = "fp32",
                         device: torch.device | str = "cpu", ranks: Ranks | None = None
                         ) -> tuple[float, int, dict[str, float]]:
    """Forward/backward every micro-batch; leave in `.grad` the gradient of the per-item mean loss.

    The mean is over ALL items (tokens) of all micro-batches together, and over every data-parallel
    rank (the global token count), so micro-batches and ranks with different token counts are weighted
    by their counts: the gradient equals one process's on the whole global batch. Returns (mean loss,
    items, metrics), the same on every rank.
    """
    ranks = ranks or Ranks()
    params = [p for p in model.parameters() if p.requires_grad] if params is None else params
    if ranks.pipeline is not None:
        loss_total, n_total, metrics_sum = _pipeline_step(micro_batches, ranks, policy, device)
    else:
        loss_total, n_total, metrics_sum = 0.0, 0, {}
        for batch in micro_batches:
            with autocast(policy, device):
                loss_sum, metrics, n = objective(model, batch)
            loss_sum.backward()
            loss_total += float(loss_sum.detach())
            n_total += n
            for k, v in metrics.items():
                metrics_sum[k] = metrics_sum.get(k, 0.0) + float(v) / len(micro_batches)
        keys = sorted(metrics_sum)
        loss_total, n_total, *summed = ranks.sum([loss_total, n_total, *(metrics_sum[k] for k in keys)])
        metrics_sum = {k: v / ranks.dp_size for k, v in zip(keys, summed)}
    n_total = int(n_total)
    if n_total == 0:
        raise LmsmithError("a training step had no target tokens (every label is -100); check the data")
    # Gradients hold d(sum of losses) (DDP / FSDP average them over the dp ranks: times dp_size undoes
    # that); one division by the global count gives the per-item mean over every micro-batch and rank
    # of the step (not a mean of means).
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, ranks.dp_size / n_total)
    return loss_total / n_total, n_total, metrics_sum


def _pipeline_step(micro_batches, ranks: Ranks, policy: str, device) -> tuple[float, int, dict]:
    """(global loss sum, global target count, {}) of a step the pipeline schedule runs: it does every
    micro-batch's forward and backward itself, and only last stages hold losses (one per data-parallel
    slice and tensor-parallel rank)."""
    with autocast(policy, device):
        local = ranks.pipeline.step(micro_batches)  # 0 off the last stage
    loss = ranks.sum([local], over="world")[0] / (ranks.layout.tp * ranks.layout.cp)
    n = ranks.sum([sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro_batches)])[0]
    return loss, n, {}


def _clip_gradients(params, max_norm: float, ranks: Ranks) -> float:
    """Clip to `max_norm` by the norm of ALL gradients (every pipeline stage's) and return that norm.

    A DTensor total (FSDP / TP gradients) is made whole first; pipeline stages add their squares."""
    grads = [p.grad for p in params if p.grad is not None]
    twin = ranks.pipeline.duplicate if ranks.pipeline is not None else None
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None and p is not twin],
                                         foreach=True)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    if ranks.pipeline is not None:
        squares = ranks.sum([float(norm) ** 2], over="world")[0] / (ranks.dp_size * ranks.layout.tp * ranks.layout.cp)
        norm = torch.tensor(math.sqrt(squares))
    coef = max_norm / (float(norm) + 1e-6)  # as clip_grad_norm_ does, as a float (DTensor gradients take it)
    if coef < 1.0 and grads:
        torch._foreach_mul_(grads, coef)
    return float(norm)


def _is_eval(row: dict) -> bool:
    return any(k.startswith("val_") for k in row)


@dataclass
class _Committed:
    """What a checkpoint of the last completed step holds besides the weights and the optimizer:
    the data position and RNG *after* that step (the next step starts from them), its token count
    and the training time spent so far."""

    step: int
    data: Any
    rng: tuple[dict, dict]
    tokens: int
    elapsed: float


def train(model, batches, objective, config: TrainConfig, *, out_dir, tokenizer=None,
          eval_batches: Callable[[], Iterator[dict]] | None = None,
          eval_fn: Callable[[Any], dict[str, float]] | None = None,
          sample_fn: Callable[[Any], str] | None = None, resume: bool = False,
          trainable_params: list[torch.nn.Parameter] | None = None, ranks: Ranks | None = None) -> TrainResult:
    """Train `model` on `batches` with `objective` for `config.max_steps` optimizer steps.

    Args:
        model: an lmsmith Transformer (or anything with `.config`, `.model.layers`, `.hidden_states`).
        batches: an iterator of dict batches; if it has `state_dict()` / `load_state_dict()`
            its position is saved in checkpoints (otherwise resume skips consumed batches).
        objective: `objective(model, batch) -> (loss_sum, metrics, n)`, see train.objectives.
        config: a TrainConfig. With `time_budget`, max_steps is the most steps the run may take:
            after a few steps the loop measures its speed and sets the step count (and so the LR
            schedule) to end on time.
        out_dir: the run folder (created).
        tokenizer: saved into checkpoints and used by the built-in sampler.
        eval_batches: a callable returning a fresh eval iterator each time.
        eval_fn: `eval_fn(model) -> {"val_<name>": float}`, metrics that are no loss (RL's held-out
            accuracy), measured at the same steps as the validation loss and logged in the same row.
        sample_fn: `sample_fn(model) -> str`, called every `sample_every` steps.
        resume: continue from the newest readable checkpoint in `out_dir` (a fresh start if none).
        trainable_params: train only these (LoRA, prompt tuning); default all with requires_grad.
        ranks: this process's place in a torchrun job (`distributed.init_ranks`); None: one process.
            The loop applies the layout's parallelisms to `model` (before the optimizer is built), gives
            each data-parallel rank its slice of every global batch, normalises by the global token
            count, logs and prints on rank 0 only, stops every rank on a Ctrl-C any of them saw, and
            writes sharded checkpoints (`distributed.dcp`) that resume on any world size.

    Returns:
        A TrainResult. Ctrl-C or SIGTERM writes a checkpoint of the last completed step and returns
        with `interrupted=True`; `--resume` from it reproduces the uninterrupted run exactly.

    Raises:
        LmsmithError: on a non-finite loss or gradient (the last good checkpoint is kept).
    """
    cfg = dataclasses.replace(config)  # a time budget's fitted step count goes into this copy
    ranks = ranks or Ranks()
    clock = time.perf_counter()
    out_dir = Path(out_dir)
    ckpt_root = out_dir / "checkpoints"
    if ranks.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        st.clean_temporaries(out_dir)
    ranks.barrier()
    meta = is_meta(model)  # build_model(init=False): each rank initialises only its shards, after parallelize
    device = torch.device(cfg.device) if cfg.device else ranks.device if meta else next(model.parameters()).device
    if not meta:
        model.to(device)
    model.train()
    st.seed_everything(cfg.seed)
    # The layout's parallelisms (and checkpointing / compile) before the optimizer sees the parameters.
    half = autocast_dtype(cfg.dtype, device)
    names = {id(p): n for n, p in model.named_parameters()}
    trainable_names = [names.get(id(p)) for p in trainable_params] if trainable_params is not None else None
    parallelize(model, ranks, activation_checkpointing=cfg.activation_checkpointing, compile=cfg.compile,
                param_dtype=half if half == torch.bfloat16 else None)
    # A pipeline stage's tied-head copy goes by the embedding's name in the whole model.
    alias = ranks.pipeline.alias if ranks.pipeline is not None else {}
    if meta:
        init_sharded(model, device, cfg.seed, alias)
    if trainable_names is not None:  # FSDP / TP replaced the parameters: the same names, new tensors
        # A pipeline stage keeps only its own.
        named = {alias.get(n, n): p for n, p in model.named_parameters()}
        trainable_params = [named[n] if n is not None else p for n, p in zip(trainable_names, trainable_params)
                            if n is None or n in named]

    groups = param_groups(model, cfg.weight_decay, trainable_params)
    params = [p for g in groups for p in g["params"]]
    optimizer = build_optimizer(groups, cfg.lr, cfg.betas, cfg.eps)
    # Adapters train a few tensors of a frozen base: checkpoint only those.
    trained_ids = {id(p) for p in params}
    trainable = None
    if len(trained_ids) < len({id(p) for p in model.parameters()}):
        trainable = {n: p for n, p in model.named_parameters() if id(p) in trained_ids}

    start_step, rows, resumed_from, tokens_before, elapsed_before = 0, [], None, 0, 0.0
    fitted = False
    if resume:
        restored = st.restore_latest(ckpt_root, model, optimizer, batches, device, cfg.grad_accum,
                                     ranks=ranks, trainable_only=trainable is not None)
        if restored is not None:
            resumed_from, state = restored
            start_step, rows = state["step"], state["metrics"]
            tokens_before, elapsed_before = state.get("tokens", 0), state.get("elapsed", 0.0)
            saved = state.get("config") or {}
            if cfg.time_budget and state.get("fitted"):
                # The budget's step count was fitted before the interruption: go on with its schedule.
                cfg.max_steps, cfg.warmup_steps, fitted = saved["max_steps"], saved["warmup_steps"], True
    log = MetricsLog(out_dir / "metrics.jsonl", rows, write=ranks.main)
    mcfg = getattr(model, "config", None)
    compute_dtype = autocast_dtype(cfg.dtype, device) or next(model.parameters()).dtype
    peak = cfg.peak_flops
    reprobed = False
    if peak is None and mcfg is not None and hasattr(mcfg, "flops_per_token"):
        peak = measure_matmul_peak(compute_dtype, device)

    def data_state():
        return batches.state_dict() if hasattr(batches, "state_dict") else None

    def checkpoint(c: _Committed) -> Path:
        with stop.critical():
            path = st.save_checkpoint(ckpt_root, c.step, model=model, tokenizer=tokenizer, optimizer=optimizer,
                                      config=cfg.to_dict(), data_state=c.data, rng=c.rng, metrics=log.rows,
                                      extra={"tokens": c.tokens, "elapsed": c.elapsed,
                                             "fitted": bool(budget and budget.fitted)},
                                      trainable=trainable, ranks=ranks)
            if ranks.main:
                st.prune_checkpoints(ckpt_root, cfg.keep_last)
        return path

    def run_eval(step: int) -> dict | None:
        if eval_batches is None and eval_fn is None:
            return None
        ev, extra = {}, {}
        py_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            if eval_batches is not None:
                ev = evaluate(model, eval_batches, objective, n_batches=cfg.eval_batches, policy=cfg.dtype,
                              device=device, ranks=ranks)
            if eval_fn is not None:
                extra = eval_fn(model)
        random.setstate(py_state)
        row = {"step": step, **ev, **extra}
        log.write(row)
        bar.write(f"step {step}: {format_eval(ev, extra)}")
        return row

    def run_sample(step: int) -> None:
        fn = sample_fn
        if fn is None and tokenizer is not None:
            def fn(m):
                return sample_text(m, tokenizer, cfg.sample_prompt, cfg.sample_tokens)
        if fn is None or ranks.layout.tp > 1 or ranks.layout.pp > 1:  # a KV cache of all heads and layers
            return
        # Every rank samples (FSDP gathers weights in each forward); rank 0 reports.
        # Sampling may draw random numbers; keep the training RNG stream untouched.
        py_state = random.getstate()
        with torch.random.fork_rng(devices=[]), autocast(cfg.dtype, device):
            text = fn(model)
        random.setstate(py_state)
        log.write({"step": step, "sample": text})
        bar.write(f"step {step} sample: {text!r}")

    bar = progress_bar(cfg.max_steps, start_step, cfg.progress and ranks.main, quiet=not ranks.main)
    if resumed_from is not None:
        bar.write(f"resumed from {resumed_from} at step {start_step}")
    losses: dict[int, float] = {}
    last_ckpt = st.latest_checkpoint(ckpt_root)
    # A checkpoint of the resumed step already exists: an interrupt before the next step must not rewrite it.
    saved_step = start_step if resumed_from is not None else None
    last_loss = None
    # The final evaluation of a run killed while writing final/ is already in the resumed rows.
    last_eval = next((r for r in reversed(rows) if _is_eval(r) and r["step"] == start_step), None)
    t_start = t_log = time.perf_counter()
    tokens_since_log, seq_len = 0, 0
    interrupted = False
    committed = _Committed(start_step, data_state(), st.get_rng_state(), tokens_before, elapsed_before)

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - clock

    budget = None
    if cfg.time_budget:  # steps timed before the first fit: a few, within the warmup
        budget = StepBudget(cfg.time_budget, config.max_steps, start_step, max(3, min(cfg.warmup_steps, 20)),
                            eval_every=cfg.eval_every, fitted=fitted)

    def eval_estimate(sec_per_step: float) -> float:
        # An evaluation batch is a forward pass, about a third of a training micro-batch.
        return cfg.eval_batches * sec_per_step / cfg.grad_accum / 3 if eval_batches else 0.0

    def set_length(steps: int | None) -> None:
        if steps is not None:
            cfg.max_steps = steps
            bar.total = steps
            bar.refresh()

    with StopFlag() as stop:
        try:
            while committed.step < cfg.max_steps:
                if ranks.any(stop.requested):  # one rank's Ctrl-C stops all of them at the same step
                    raise KeyboardInterrupt
                step = committed.step
                lr = cfg.lr_at(step)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                micro, step_tokens = [], 0
                for _ in range(cfg.grad_accum):
                    try:
                        batch = next(batches)  # the global micro-batch: every rank draws the same one
                    except StopIteration:
                        raise LmsmithError(f"the training data ran out at step {step + 1} of {cfg.max_steps}; "
                                           "use more data, more epochs, or fewer max_steps") from None
                    ntok, seq_len = _batch_tokens(batch)
                    step_tokens += ntok
                    micro.append(_to_device(ranks.shard_batch(batch), device))
                loss, n_total, step_metrics = accumulate_gradients(model, micro, objective, params=params,
                                                                   policy=cfg.dtype, device=device, ranks=ranks)
                del micro
                grad_norm = _clip_gradients(params, cfg.clip_grad if cfg.clip_grad > 0 else float("inf"), ranks)
                if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                    where = f"; the last good checkpoint is {last_ckpt}" if last_ckpt else "; no checkpoint was saved"
                    raise LmsmithError(
                        f"training diverged at step {step + 1}: loss {loss}, grad norm {grad_norm}{where}. "
                        "Lower the learning rate, raise warmup_steps or enable clip_grad, then resume")
                with stop.critical():  # the update and the state that describes it change together
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    step += 1
                    committed = _Committed(step, data_state(), st.get_rng_state(), committed.tokens + step_tokens,
                                           elapsed())
                tokens_since_log += step_tokens
                last_loss = loss
                losses[step] = loss
                bar.update(1)

                fit = budget.after_step(step, elapsed(), eval_estimate) if budget else None
                if budget and (fit := ranks.from_main(fit)) is not None:
                    set_length(fit)
                    cfg.warmup_steps = min(cfg.warmup_steps, max(step, cfg.max_steps // 10))
                    bar.write(f"time budget {format_duration(cfg.time_budget)}: the run takes about "
                              f"{cfg.max_steps:,} steps at this speed")

                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    now = time.perf_counter()
                    tok_s = tokens_since_log / max(now - t_log, 1e-9)
                    mfu = None
                    if peak and mcfg is not None and seq_len:
                        achieved = tok_s * mcfg.flops_per_token(seq_len)
                        if achieved > peak and cfg.peak_flops is None and not reprobed:
                            # The start-up probe ran while the machine was busy (training cannot beat the
                            # matmul peak): measure again, once, and never report above 100%.
                            reprobed = True
                            peak = max(measure_matmul_peak(compute_dtype, device, refresh=True), achieved)
                            now = time.perf_counter()  # the probe's second is not training time
                        mfu = achieved / peak
                    row = {"step": step, "loss": loss, "lr": lr, "tokens": committed.tokens,
                           "tokens_per_s": tok_s, "mfu": mfu, "grad_norm": grad_norm,
                           "elapsed": now - t_start, **step_metrics}
                    log.write(row)
                    keys = getattr(objective, "progress_metrics", ())  # e.g. RL's reward and accuracy
                    shown = {k: step_metrics[k] for k in keys if k in step_metrics}
                    bar.set_postfix_str(format_postfix(loss, lr, tok_s, mfu, shown))
                    t_log, tokens_since_log = now, 0
                t0 = time.perf_counter()
                if cfg.eval_every and step % cfg.eval_every == 0:
                    last_eval = run_eval(step)
                    if budget:
                        budget.eval_seconds = time.perf_counter() - t0
                if cfg.sample_every and step % cfg.sample_every == 0:
                    run_sample(step)
                if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
                    t0 = time.perf_counter()
                    last_ckpt, saved_step = checkpoint(committed), step
                    if budget:
                        budget.save_seconds = time.perf_counter() - t0
                if budget and step < cfg.max_steps and step % (cfg.save_every or cfg.eval_every or 50) == 0:
                    set_length(ranks.from_main(budget.after_overhead(step, elapsed())))
            if ranks.any(stop.requested):
                raise KeyboardInterrupt  # the signal came during the last step: save it, finish on resume
        except KeyboardInterrupt:
            interrupted = True
            optimizer.zero_grad(set_to_none=True)
            bar.close()
            # The weights are those of the last completed step; save them with the data and RNG
            # state after that step, unless a checkpoint of that very step is already on disk.
            if saved_step != committed.step:
                # A signal held during the save: the save completed, or the older checkpoint stands.
                with contextlib.suppress(KeyboardInterrupt):
                    checkpoint(committed)
                last_ckpt = st.latest_checkpoint(ckpt_root)
            why = f"Stopped by {stop.signal_name}" if stop.signal_name else "Interrupted"
            if ranks.main:
                print(f"\n{why} at step {committed.step}. Checkpoint: {last_ckpt}. "
                      f"Resume with the same command plus --resume (train(..., resume=True)).", file=sys.stderr)
        finally:
            bar.close()

    step = committed.step
    final_dir = None
    if not interrupted:
        if (eval_batches is not None or eval_fn is not None) and (last_eval is None or last_eval["step"] != step):
            last_eval = run_eval(step)
        if step > start_step or last_ckpt is None:
            committed.elapsed = elapsed()
            last_ckpt = checkpoint(committed)
        if trainable is None:
            final_dir = out_dir / "final"
            st.save_model(model, tokenizer, final_dir, ranks=ranks, checkpoint=last_ckpt)
        note = plot_loss_curve(log.rows, out_dir / "loss.png") if ranks.main else None
        if note:
            print(f"note: {note}", file=sys.stderr)
    wall = time.perf_counter() - t_start
    if last_eval is None:
        last_eval = next((r for r in reversed(log.rows) if _is_eval(r)), None)
    tokens_run = committed.tokens - tokens_before
    result = TrainResult(
        steps=step, tokens=committed.tokens, final_loss=last_loss,
        val_loss=last_eval.get("val_loss") if last_eval else None,
        val_ppl=last_eval.get("val_ppl") if last_eval else None,
        wall_time=wall, tokens_per_s=tokens_run / max(wall, 1e-9), checkpoint=last_ckpt,
        final_dir=final_dir, interrupted=interrupted, losses=losses, steps_run=step - start_step,
        tokens_run=tokens_run, time_budget=cfg.time_budget if budget and budget.fitted else None)
    if not interrupted and cfg.progress and ranks.main:
        print(result.summary(), file=sys.stderr)
    return result
