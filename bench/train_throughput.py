"""lmsmith's training step vs transformers' LlamaForCausalLM, same config/weights/batch/dtype.

Both run in one process, alternating step by step after warmup, so thermal and
background noise hit both alike. Prints tokens/s each, the ratio, peak extra
memory (RSS while stepping) and MFU against matmul peaks measured here.

    python bench/train_throughput.py [--preset small] [--batch 8] [--seq 256] [--dtype auto] [--steps 6]
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import torch


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Highest resident set size seen while the block runs (sampled every 2 ms)."""

    def __enter__(self):
        self.base = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_bytes())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--dtype", default="auto", help="auto | fp32 | bf16 (autocast policy for both)")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per framework")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    import transformers

    from lmsmith.config import preset
    from lmsmith.model import build_model
    from lmsmith.precision import autocast, autocast_dtype
    from lmsmith.train import causal_lm_objective
    from lmsmith.train.metrics import measure_matmul_peak
    from lmsmith.train.optim import build_optimizer, param_groups

    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    cfg = preset(args.preset)
    device = "cpu"
    ours = build_model(cfg, seed=0)
    hf_cfg = transformers.LlamaConfig(**cfg.to_hf())
    hf_cfg._attn_implementation = "sdpa"
    theirs = transformers.LlamaForCausalLM(hf_cfg)
    missing, unexpected = theirs.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    theirs.tie_weights()
    theirs.train()

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g)
    batch = {"input_ids": x[:, :-1].contiguous(), "labels": x[:, 1:].contiguous()}

    def optimizer(model):
        return build_optimizer(param_groups(model, 0.1), 3e-4, (0.9, 0.95), 1e-8)

    opt_ours, opt_theirs = optimizer(ours), optimizer(theirs)

    def step_ours():
        with autocast(args.dtype, device):
            loss_sum, _, n = causal_lm_objective(ours, batch)
        (loss_sum / n).backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)
        return float(loss_sum.detach()) / n

    def step_theirs():
        with autocast(args.dtype, device):
            out = theirs(input_ids=batch["input_ids"], labels=_hf_labels(batch))
        out.loss.backward()
        opt_theirs.step()
        opt_theirs.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    l_ours, l_theirs = step_ours(), step_theirs()
    print(f"first-step loss: lmsmith {l_ours:.5f}  transformers {l_theirs:.5f}")
    for _ in range(args.warmup - 1):
        step_ours()
        step_theirs()

    times = {"lmsmith": [], "transformers": []}
    peaks = {"lmsmith": 0, "transformers": 0}
    # Timed steps run alone: the memory sampler is a Python thread that would take CPU from them.
    for _ in range(args.steps):
        for name, fn in (("lmsmith", step_ours), ("transformers", step_theirs)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    for name, fn in (("lmsmith", step_ours), ("transformers", step_theirs)):
        with PeakRSS() as mem:
            fn()
        peaks[name] = max(peaks[name], mem.peak - mem.base)

    ntok = args.batch * args.seq
    flops_tok = cfg.flops_per_token(args.seq)
    cdtype = autocast_dtype(args.dtype, device) or torch.float32
    peak_bf16 = measure_matmul_peak(torch.bfloat16, device, seconds=1.5)
    peak_fp32 = measure_matmul_peak(torch.float32, device, seconds=1.5)
    peak = peak_bf16 if cdtype == torch.bfloat16 else peak_fp32
    print(f"preset {args.preset} ({cfg.num_params() / 1e6:.1f}M params), batch {args.batch}x{args.seq}, "
          f"dtype {args.dtype} -> {cdtype}, threads {torch.get_num_threads()}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    print(f"matmul peak: bf16 {peak_bf16 / 1e12:.3f} TFLOP/s, fp32 {peak_fp32 / 1e12:.3f} TFLOP/s")
    tps = {}
    for name in times:
        med = sorted(times[name])[len(times[name]) // 2]
        tps[name] = ntok / med
        mfu = tps[name] * flops_tok / peak
        print(f"{name:>12}: {med * 1000:7.0f} ms/step  {tps[name]:8,.0f} tok/s  MFU {100 * mfu:5.1f}%  "
              f"peak extra RSS {peaks[name] / 2**20:7.0f} MiB")
    print(f"ratio lmsmith / transformers: {tps['lmsmith'] / tps['transformers']:.2f}x")


def _hf_labels(batch):
    """HF's loss shifts inside; labels[t] = input_ids[t], and our last target appended is dropped.

    Position t of HF predicts labels[t+1] = input_ids[t+1] = our labels[t] for t < T-1, so HF
    scores T-1 positions per row and we score T; the matmul work is the same.
    """
    return batch["input_ids"]


if __name__ == "__main__":
    main()
