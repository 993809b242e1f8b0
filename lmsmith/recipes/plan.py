"""`lmsmith plan`: how much memory a training job needs per GPU, and which parallel layouts fit.

Read the model's config (a preset or a directory; no weights) -> the quoted rules of thumb for the
whole job -> per-device memory and an estimated step time for every layout of --gpus x --nodes
(`distributed/plan.py`) -> the layouts that fit, fastest first, with every assumption printed.
"""

from __future__ import annotations

import argparse
import json
import math

HELP = "memory per GPU and the parallel layouts that fit a training job (no weights loaded)"
DESCRIPTION = """Plan a training job: per-device memory (weights, gradients, optimizer state,
activations; the KV cache for inference) for every layout of the devices (FSDP, DDP, tensor and
pipeline parallelism), an estimated step time from FLOPs, the stated MFU and the interconnect,
best first. Nothing is loaded: `lmsmith plan --model llama-3.1-405b` is instant.

examples:
  lmsmith plan --model llama-3.1-405b --gpus 8 --nodes 16
  lmsmith plan --model llama-3.1-8b --gpus 1 --gpu-memory 24GB --method qlora --activation-checkpointing
  lmsmith plan --model runs/pretrain/final --gpus 2 --gpu-memory 16GB --precision fp32
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..distributed.plan import METHODS, OPTIMIZERS, PRECISIONS

    p.add_argument("--model", required=True, metavar="PRESET|DIR", help="a preset (see `lmsmith info`) or model dir")
    p.add_argument("--gpus", type=int, default=8, help="devices per node (default 8)")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpu-memory", default="80GB", help="memory per device, e.g. 80GB, 24GB (default 80GB)")
    p.add_argument("--seq-len", type=int, default=4096, help="tokens per sequence (default 4096)")
    p.add_argument("--batch", type=int, default=1, help="sequences per micro-batch per data-parallel rank (default 1)")
    p.add_argument("--micro-batches", type=int, default=8, help="micro-batches per step (default 8)")
    p.add_argument("--method", choices=METHODS, default="full", help="full, lora or qlora (default full)")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank on every block linear (default 16)")
    p.add_argument("--precision", choices=list(PRECISIONS), default="mixed",
                   help="mixed: bf16 compute, fp32 master + moments (16 B/param, default); bf16: all bf16 "
                        "(8 B/param); fp32")
    p.add_argument("--optimizer", choices=list(OPTIMIZERS), default="adamw", help="adamw, adamw8bit or sgd")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--context", type=int, default=None, help="also the inference KV cache at this context")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 TFLOP/s per device (H100: 989)")
    p.add_argument("--mfu", type=float, default=0.40, help="fraction of the peak reached (default 0.40)")
    p.add_argument("--intra-bw", default="450GB", help="per-device bandwidth inside a node, per second (NVLink)")
    p.add_argument("--inter-bw", default="50GB", help="per-device bandwidth between nodes, per second (IB 400G)")
    p.add_argument("--top", type=int, default=8, help="layouts shown (default 8)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def run(args) -> int:
    from ..checkpoint import parse_size
    from ..distributed import plan as pl
    from ..errors import LmsmithError
    from .info import resolve

    cfg, what = resolve(args.model)
    for name in ("gpus", "nodes", "seq_len", "batch", "micro_batches", "top", "lora_r"):
        if getattr(args, name) < 1:
            raise LmsmithError(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    if not 0 < args.mfu <= 1:
        raise LmsmithError(f"--mfu {args.mfu} must be in (0, 1]")
    sizes = []
    flags = (("--gpu-memory", args.gpu_memory), ("--intra-bw", args.intra_bw), ("--inter-bw", args.inter_bw))
    for flag, value in flags:
        try:
            sizes.append(parse_size(value))
        except LmsmithError:
            raise LmsmithError(f"{flag} {value!r} is not a size; write sizes like 80GB or 24GiB") from None
        if sizes[-1] <= 0:
            raise LmsmithError(f"{flag} {value!r} must be more than 0 bytes")
    memory, intra, inter = sizes
    job = pl.Job(cfg, method=args.method, precision=args.precision, optimizer=args.optimizer, seq_len=args.seq_len,
                 batch=args.batch, micro_batches=args.micro_batches,
                 activation_checkpointing=args.activation_checkpointing, lora_r=args.lora_r)
    hw = pl.Hardware(gpus_per_node=args.gpus, nodes=args.nodes, memory=memory, peak_flops=args.peak_tflops * 1e12,
                     mfu=args.mfu, intra_bw=intra, inter_bw=inter)
    options = pl.plan(job, hw)
    rules = pl.rule_of_thumb(cfg)
    if args.json:
        print(json.dumps({"model": what, "params": cfg.num_params(), "rules_of_thumb_bytes": rules,
                          "layouts": [{"layout": o.layout.__dict__, "memory_bytes": o.memory, "peak_bytes": o.peak,
                                       "step_seconds": o.seconds, "tokens_per_s": o.tokens_per_s}
                                      for o in options[:args.top]]}, indent=2))
        return 0
    _print_rules(cfg, what, rules, memory, pl.HF_QUOTED.get(args.model))
    _print_layouts(job, hw, options[:args.top], len(options))
    if args.context:
        kv = pl.kv_cache_bytes(cfg, args.context, args.batch)
        print(f"\nInference KV cache at {args.context:,} tokens x batch {args.batch} (bf16): {_gb(kv)}; "
              f"bf16 weights {_gb(2 * cfg.num_params())}")
    _print_assumptions(job, hw)
    return 0


def _gb(n: float) -> str:
    return f"{n / 1e12:.2f} TB" if n >= 1e12 else f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _print_rules(cfg, what: str, rules: dict, memory: float, quoted: tuple | None) -> None:
    print(f"{what}: {cfg.num_params() / 1e9:.2f}B parameters\n")
    print("The whole job, weights and training state only (no activations), by the quoted rules:")
    hf = f"{'Hugging Face quotes':>21}" if quoted else ""
    print(f"  {'method':<44} {'total':>10} {'GiB':>9} {'devices of ' + _gb(memory):>16}{hf}")
    hf_rows = dict(zip((0, 2, 3), quoted)) if quoted else {}
    for i, (name, total) in enumerate(rules.items()):
        q = f"{_gb(hf_rows[i]):>21}" if i in hf_rows else (" " * 21 if quoted else "")
        print(f"  {name:<44} {_gb(total):>10} {total / 2**30:>9,.0f} {math.ceil(total / memory):>16,}{q}")
    if quoted:
        print("  Hugging Face's full-fine-tuning figure is the 8 B/param rule (its 8B figure in GiB); its LoRA and "
              "QLoRA figures add an allowance the post does not itemise (adapters, activations, buffers) "
              "above the weights shown here.")


def _print_layouts(job, hw, options, n_fit: int) -> None:
    print(f"\nPer device, {job.method} training ({job.precision}, {job.optimizer}), {hw.devices} devices of "
          f"{_gb(hw.memory)}, micro-batch {job.batch} x {job.seq_len} tokens"
          f"{', activation checkpointing' if job.activation_checkpointing else ''}:")
    if not options:
        print("  no layout fits: add devices, use --activation-checkpointing, --method lora/qlora, "
              "a shorter --seq-len or a smaller --batch")
        return
    kinds = list(options[0].memory)
    head = f"  {'layout':<34}" + "".join(f"{k:>15}" for k in kinds) + f"{'peak':>11}{'step':>9}{'tokens/s':>11}"
    print(head)
    for o in options:
        cells = "".join(f"{_gb(o.memory.get(k, 0)):>15}" for k in kinds)
        print(f"  {o.layout.brief():<34}{cells}{_gb(o.peak):>11}{o.seconds:>8.2f}s{o.tokens_per_s:>11,.0f}")
    if n_fit > len(options):
        print(f"  ... {n_fit - len(options)} more layouts fit (--top N)")


def _print_assumptions(job, hw) -> None:
    from ..distributed.plan import PRECISIONS

    w, g, s, m = PRECISIONS[job.precision]
    print("\nAssumptions:")
    print(f"  bytes per parameter: weights {w}, gradients {g}, optimizer state {s} per moment, fp32 master {m}; "
          "8-bit AdamW: 2 bytes for both moments; QLoRA: NF4 at 4.127 bits (block linears), bf16 elsewhere")
    print("  sharded state divided by dp-shard x tp x pp; FSDP holds two gathered blocks and one block's gradients")
    print("  activations per layer and token: ~8 x dim + 2 x (q + kv) + 4 x hidden values (split by tp), "
          "flash attention (no T x T scores); with checkpointing, each layer's fp32 input + one layer")
    print(f"  step time: 6 x params x tokens (+ attention) FLOPs at {hw.mfu:.0%} of {hw.peak_flops / 1e12:,.0f} "
          f"TFLOP/s per device; FSDP moves 3 x its weights per micro-batch and DDP 2 x the gradients per step, "
          f"overlapped with compute; TP's 4 all-reduces per layer are not; {hw.intra_bw / 1e9:,.0f} GB/s in a "
          f"node, {hw.inter_bw / 1e9:,.0f} GB/s between nodes; pipeline bubble (pp - 1) / micro-batches")
    print(f"  a layout fits when its peak is at most 90% of {_gb(hw.memory)} (allocator and CUDA context keep "
          "the rest)")
