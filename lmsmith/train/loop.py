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

import dataclasses
import functools
import math
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import LmsmithError
from ..precision import POLICIES, autocast, autocast_dtype
from . import state as st
from .metrics import MetricsLog, format_postfix, measure_matmul_peak, plot_loss_curve, progress_bar
from .optim import SCHEDULES, build_optimizer, lr_at, param_groups


@dataclass
class TrainConfig:
    """Everything the loop needs to know; validated on construction.

    Attributes:
        lr: peak learning rate.
        min_lr_ratio: final LR as a fraction of `lr` (cosine / wsd end point).
        weight_decay: AdamW decay on weight matrices (not embeddings, norms, biases).
        betas, eps: AdamW moments and epsilon.
        warmup_steps: linear warmup length in optimizer steps.
        schedule: "cosine" | "wsd" (warmup-stable-decay) | "constant".
        decay_fraction: for "wsd", the fraction of max_steps spent decaying.
        max_steps: optimizer steps in the whole run.
        grad_accum: micro-batches per optimizer step.
        clip_grad: max global gradient norm (0 disables clipping; the norm is still logged).
        dtype: precision policy "auto" | "fp32" | "bf16" (see lmsmith.precision).
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

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> LmsmithError:
            return LmsmithError(f"TrainConfig.{name} = {getattr(self, name)!r}: {why}")

        self.betas = tuple(self.betas)
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
        if self.peak_flops is not None and not self.peak_flops > 0:
            raise bad("peak_flops", "must be > 0 FLOP/s, or None to measure it")

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

    steps: int
    tokens: int
    final_loss: float | None
    val_loss: float | None
    val_ppl: float | None
    wall_time: float
    tokens_per_s: float
    checkpoint: Path | None
    final_dir: Path | None
    interrupted: bool = False
    losses: dict[int, float] = field(default_factory=dict)  # step -> train loss, this process's steps

    def summary(self) -> str:
        parts = [f"{self.steps} steps, {self.tokens:,} tokens in {self.wall_time:.1f}s "
                 f"({self.tokens_per_s:,.0f} tok/s)"]
        if self.final_loss is not None:
            parts.append(f"train loss {self.final_loss:.4f}")
        if self.val_loss is not None:
            parts.append(f"val loss {self.val_loss:.4f} (ppl {self.val_ppl:.2f})")
        where = self.final_dir or self.checkpoint
        if where is not None:
            parts.append(f"model in {where}")
        return "; ".join(parts)


# ---- model transforms -------------------------------------------------------------------


def apply_activation_checkpointing(model) -> None:
    """Recompute every block's activations during backward instead of storing them.

    Wraps each `model.model.layers[i].forward` with torch.utils.checkpoint (non-reentrant);
    parameters and state-dict names are untouched. Inference (no grad) skips the wrapper.
    """
    from torch.utils.checkpoint import checkpoint

    for block in model.model.layers:
        if getattr(block, "_lmsmith_checkpointed", False):
            continue
        inner = block.forward

        @functools.wraps(inner)
        def forward(*args, _inner=inner, **kwargs):
            if not torch.is_grad_enabled():
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward
        block._lmsmith_checkpointed = True


def apply_compile(model) -> None:
    """torch.compile each block in place (per-block, so `hidden_states` and any objective benefit)."""
    for block in model.model.layers:
        block.compile()


# ---- sampling ---------------------------------------------------------------------------


@torch.no_grad()
def sample_text(model, tokenizer, prompt: str, max_new_tokens: int = 48, temperature: float = 0.0,
                seed: int | None = None) -> str:
    """Continue `prompt` with greedy (temperature 0) or temperature sampling, using the KV cache.

    A small helper for progress samples; the generation engine proper lives elsewhere.
    """
    from ..model import KVCache

    # A document starts after bos for models that use one, else after the eos separator.
    bos = getattr(tokenizer, "bos_id", None) if getattr(tokenizer, "add_bos", False) else None
    start = bos if bos is not None else getattr(tokenizer, "eos_id", None)
    ids = ([start] if start is not None else []) + (tokenizer.encode(prompt) if prompt else [])
    if not ids:
        ids = [0]
    device = next(model.parameters()).device
    cfg = model.config
    max_len = min(cfg.max_seq_len, len(ids) + max_new_tokens)
    ids = ids[-(max_len - max_new_tokens):] if max_len > max_new_tokens else ids[-1:]
    max_new_tokens = min(max_new_tokens, max_len - len(ids))
    dtype = next(model.parameters()).dtype
    cache = KVCache(cfg, 1, max_len, dtype=dtype, device=device)
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    eos = set(getattr(tokenizer, "eos_ids", None) or [])
    was_training = model.training
    model.eval()
    try:
        logits = model(torch.tensor([ids], device=device), cache=cache, last_only=True)
        out: list[int] = []
        for _ in range(max_new_tokens):
            last = logits[0, -1].float()
            if temperature > 0:
                tok = int(torch.multinomial(torch.softmax(last / temperature, -1), 1, generator=gen))
            else:
                tok = int(last.argmax())
            if tok in eos:
                break
            out.append(tok)
            if len(out) == max_new_tokens:
                break
            logits = model(torch.tensor([[tok]], device=device), cache=cache)
    finally:
        model.train(was_training)
    return prompt + tokenizer.decode(out)


# ---- the loop ---------------------------------------------------------------------------


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _batch_tokens(batch: dict) -> tuple[int, int]:
    """(tokens processed, sequence length) of a batch, for throughput and MFU."""
    ids = batch.get("input_ids")
    if isinstance(ids, torch.Tensor) and ids.ndim == 2:
        return ids.numel(), ids.shape[1]
    return 0, 0


class _StopFlag:
    """First Ctrl-C asks the loop to stop at the next step boundary; a second one interrupts at once."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def evaluate(model, eval_batches: Callable[[], Iterator[dict]], objective, *, n_batches: int,
             policy: str = "auto", device: torch.device | str = "cpu") -> dict[str, float]:
    """Mean loss per item over `n_batches` batches of a fresh eval iterator, and its perplexity."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad(), autocast(policy, device):
            for i, batch in enumerate(eval_batches()):
                if i >= n_batches:
                    break
                loss_sum, _, n = objective(model, _to_device(batch, device))
                total += float(loss_sum)
                count += n
    finally:
        model.train(was_training)
    if count == 0:
        raise LmsmithError("evaluation data produced no target tokens; check the validation split")
    val = total / count
    return {"val_loss": val, "val_ppl": math.exp(min(val, 700.0))}


def accumulate_gradients(model, micro_batches, objective, *, params=None, policy: str = "fp32",
                         device: torch.device | str = "cpu") -> tuple[float, int, dict[str, float]]:
    """Forward/backward every micro-batch; leave in `.grad` the gradient of the per-item mean loss.

    The mean is over ALL items (tokens) of all micro-batches together, so micro-batches
    with different token counts are weighted by their counts. Returns (mean loss, items, metrics).
    """
    params = [p for p in model.parameters() if p.requires_grad] if params is None else params
    loss_total, n_total, metrics_sum = 0.0, 0, {}
    for batch in micro_batches:
        with autocast(policy, device):
            loss_sum, metrics, n = objective(model, batch)
        loss_sum.backward()
        loss_total += float(loss_sum.detach())
        n_total += n
        for k, v in metrics.items():
            metrics_sum[k] = metrics_sum.get(k, 0.0) + float(v) / len(micro_batches)
    if n_total == 0:
        raise LmsmithError("a training step had no target tokens (every label is -100); check the data")
    # Gradients hold d(sum of losses); one division gives the per-item mean over every
    # micro-batch of the step (not a mean of micro-batch means).
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, 1.0 / n_total)
    return loss_total / n_total, n_total, metrics_sum



def train(model, batches, objective, config: TrainConfig, *, out_dir, tokenizer=None,
          eval_batches: Callable[[], Iterator[dict]] | None = None,
          sample_fn: Callable[[Any], str] | None = None, resume: bool = False,
          trainable_params: list[torch.nn.Parameter] | None = None) -> TrainResult:
    """Train `model` on `batches` with `objective` for `config.max_steps` optimizer steps.

    Args:
        model: an lmsmith Transformer (or anything with `.config`, `.model.layers`, `.hidden_states`).
        batches: an iterator of dict batches; if it has `state_dict()` / `load_state_dict()`
            its position is saved in checkpoints (otherwise resume skips consumed batches).
        objective: `objective(model, batch) -> (loss_sum, metrics, n)`, see train.objectives.
        config: a TrainConfig.
        out_dir: the run folder (created).
        tokenizer: saved into checkpoints and used by the built-in sampler.
        eval_batches: a callable returning a fresh eval iterator each time.
        sample_fn: `sample_fn(model) -> str`, called every `sample_every` steps.
        resume: continue from the latest complete checkpoint in `out_dir` (a fresh start if none).
        trainable_params: train only these (LoRA, prompt tuning); default all with requires_grad.

    Returns:
        A TrainResult. Ctrl-C writes a checkpoint and returns with `interrupted=True`.

    Raises:
        LmsmithError: on a non-finite loss or gradient (the last good checkpoint is kept).
    """
    cfg = config
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_root = out_dir / "checkpoints"
    st.clean_temporaries(ckpt_root)
    device = torch.device(cfg.device) if cfg.device else next(model.parameters()).device
    model.to(device)
    model.train()
    st.seed_everything(cfg.seed)

    groups = param_groups(model, cfg.weight_decay, trainable_params)
    params = [p for g in groups for p in g["params"]]
    optimizer = build_optimizer(groups, cfg.lr, cfg.betas, cfg.eps)
    # Adapters train a few tensors of a frozen base: checkpoint only those.
    trained_ids = {id(p) for p in params}
    trainable = None
    if len(trained_ids) < len({id(p) for p in model.parameters()}):
        trainable = {n: p for n, p in model.named_parameters() if id(p) in trained_ids}

    start_step, rows, resumed_from, tokens_before = 0, [], None, 0
    if resume:
        latest = st.latest_checkpoint(ckpt_root)
        if latest is not None:
            state, opt_tensors, rng_tensors = st.load_train_state(latest)
            st.load_model_weights(model, latest)
            st.optimizer_from_files(optimizer, {k: v.to(device) for k, v in opt_tensors.items()},
                                    state["optimizer"])
            start_step, rows, resumed_from = state["step"], state["metrics"], latest
            tokens_before = state.get("tokens", 0)
            if hasattr(batches, "load_state_dict") and state.get("data_state") is not None:
                batches.load_state_dict(state["data_state"])
            else:
                # No iterator state: replay the consumed batches so the data lines up.
                for _ in range(start_step * cfg.grad_accum):
                    next(batches)
            st.set_rng_state(rng_tensors, state["rng"])
    # Transforms after loading so the weights land in plain modules.
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.compile:
        apply_compile(model)

    log = MetricsLog(out_dir / "metrics.jsonl", rows)
    mcfg = getattr(model, "config", None)
    compute_dtype = autocast_dtype(cfg.dtype, device) or next(model.parameters()).dtype
    peak = cfg.peak_flops
    reprobed = False
    if peak is None and mcfg is not None and hasattr(mcfg, "flops_per_token"):
        peak = measure_matmul_peak(compute_dtype, device)

    def data_state():
        return batches.state_dict() if hasattr(batches, "state_dict") else None

    def checkpoint(step: int, data, rng) -> Path:
        path = st.save_checkpoint(ckpt_root, step, model=model, tokenizer=tokenizer, optimizer=optimizer,
                                  config=cfg.to_dict(), data_state=data, rng=rng, metrics=log.rows,
                                  extra={"tokens": tokens_before + tokens_run}, trainable=trainable)
        st.prune_checkpoints(ckpt_root, cfg.keep_last)
        return path

    def run_eval(step: int) -> dict | None:
        if eval_batches is None:
            return None
        with torch.random.fork_rng(devices=[]):
            ev = evaluate(model, eval_batches, objective, n_batches=cfg.eval_batches, policy=cfg.dtype,
                          device=device)
        log.write({"step": step, **ev})
        bar.write(f"step {step}: val loss {ev['val_loss']:.4f}, ppl {ev['val_ppl']:.2f}")
        return ev

    def run_sample(step: int) -> None:
        fn = sample_fn
        if fn is None and tokenizer is not None:
            def fn(m):
                return sample_text(m, tokenizer, cfg.sample_prompt, cfg.sample_tokens)
        if fn is None:
            return
        # Sampling may draw random numbers; keep the training RNG stream untouched.
        py_state = random.getstate()
        with torch.random.fork_rng(devices=[]), autocast(cfg.dtype, device):
            text = fn(model)
        random.setstate(py_state)
        log.write({"step": step, "sample": text})
        bar.write(f"step {step} sample: {text!r}")

    bar = progress_bar(cfg.max_steps, start_step, cfg.progress)
    if resumed_from is not None:
        bar.write(f"resumed from {resumed_from} at step {start_step}")
    losses: dict[int, float] = {}
    last_ckpt = st.latest_checkpoint(ckpt_root)
    tokens_run, last_loss, last_eval = 0, None, None
    t_start = t_log = time.perf_counter()
    tokens_since_log, seq_len = 0, 0
    step = start_step
    interrupted = False
    in_update = False

    with _StopFlag() as stop:
        try:
            while step < cfg.max_steps:
                # The state a Ctrl-C checkpoint must hold: what this step has not consumed yet.
                snap_data, snap_rng = data_state(), st.get_rng_state()
                lr = cfg.lr_at(step)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                micro = []
                for _ in range(cfg.grad_accum):
                    try:
                        micro.append(_to_device(next(batches), device))
                    except StopIteration:
                        raise LmsmithError(f"the training data ran out at step {step + 1} of {cfg.max_steps}; "
                                           "use more data, more epochs, or fewer max_steps") from None
                    ntok, seq_len = _batch_tokens(micro[-1])
                    tokens_since_log += ntok
                    tokens_run += ntok
                loss, n_total, step_metrics = accumulate_gradients(model, micro, objective, params=params,
                                                                   policy=cfg.dtype, device=device)
                del micro
                grad_norm = float(torch.nn.utils.clip_grad_norm_(
                    params, cfg.clip_grad if cfg.clip_grad > 0 else float("inf"), foreach=True))
                if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                    where = f"; the last good checkpoint is {last_ckpt}" if last_ckpt else "; no checkpoint was saved"
                    raise LmsmithError(
                        f"training diverged at step {step + 1}: loss {loss}, grad norm {grad_norm}{where}. "
                        "Lower the learning rate, raise warmup_steps or enable clip_grad, then resume")
                in_update = True
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                in_update = False
                step += 1
                last_loss = loss
                losses[step] = loss
                bar.update(1)

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
                    row = {"step": step, "loss": loss, "lr": lr, "tokens": tokens_before + tokens_run,
                           "tokens_per_s": tok_s, "mfu": mfu, "grad_norm": grad_norm,
                           "elapsed": now - t_start, **step_metrics}
                    log.write(row)
                    bar.set_postfix_str(format_postfix(loss, lr, tok_s, mfu))
                    t_log, tokens_since_log = now, 0
                if cfg.eval_every and step % cfg.eval_every == 0:
                    last_eval = run_eval(step)
                if cfg.sample_every and step % cfg.sample_every == 0:
                    run_sample(step)
                if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
                    last_ckpt = checkpoint(step, data_state(), st.get_rng_state())
                if stop.requested:
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            interrupted = True
            if in_update:
                bar.write("interrupted during the optimizer update; the in-memory state is not saved")
            else:
                # Mid-step: parameters are still those after `step`, so save them with the
                # data/RNG state captured before this step started.
                optimizer.zero_grad(set_to_none=True)
                last_ckpt = checkpoint(step, snap_data, snap_rng)
            bar.close()
            print(f"\nInterrupted at step {step}. Checkpoint: {last_ckpt}. "
                  f"Resume with the same command plus --resume (train(..., resume=True)).", file=sys.stderr)
        finally:
            bar.close()

    final_dir = None
    if not interrupted:
        if eval_batches is not None and (not cfg.eval_every or step % cfg.eval_every != 0 or last_eval is None):
            last_eval = run_eval(step)
        if step > start_step or st.latest_checkpoint(ckpt_root) is None:
            last_ckpt = checkpoint(step, data_state(), st.get_rng_state())
        if trainable is None:
            final_dir = out_dir / "final"
            st.save_model(model, tokenizer, final_dir)
        note = plot_loss_curve(log.rows, out_dir / "loss.png")
        if note:
            print(f"note: {note}", file=sys.stderr)
    wall = time.perf_counter() - t_start
    if last_eval is None:
        last_eval = next((r for r in reversed(log.rows) if "val_loss" in r), None)
    result = TrainResult(
        steps=step, tokens=tokens_run, final_loss=last_loss,
        val_loss=last_eval["val_loss"] if last_eval else None,
        val_ppl=last_eval["val_ppl"] if last_eval else None,
        wall_time=wall, tokens_per_s=tokens_run / max(wall, 1e-9), checkpoint=last_ckpt,
        final_dir=final_dir, interrupted=interrupted, losses=losses)
    if not interrupted and cfg.progress:
        print(result.summary(), file=sys.stderr)
    return result
