"""Peak memory of a few training steps against `lmsmith plan`'s prediction (tests/test_plan.py,
bench/distributed.py), and their speed.

    python tests/dist_memory.py [steps=2 preset=small batch=4 seq=128]   one process
    torchrun --nproc_per_node 2 tests/dist_memory.py [dp_shard=2 | dp_replicate=2 dp_shard=1 | tp=2 dp_shard=1 |
                                                      pp=2 dp_shard=1 [schedule=interleaved]]

Run with MALLOC_MMAP_THRESHOLD_=65536 so freed tensors go back to the OS and the resident set's
high-water mark (VmHWM, reset through /proc/self/clear_refs) follows the live tensors.
Prints {"measured": bytes, "predicted": bytes, "parts": {...}, "tokens_per_s": ...} as JSON on rank 0
(memory: the mean over ranks; speed: global tokens over the median step after the first).
"""

import json
import statistics
import sys
import time

import torch

from lmsmith.config import preset
from lmsmith.distributed import Layout
from lmsmith.distributed import plan as pl
from lmsmith.distributed.parallelize import parallelize
from lmsmith.distributed.ranks import close_ranks, init_ranks
from lmsmith.model import build_model
from lmsmith.train import causal_lm_objective
from lmsmith.train.loop import accumulate_gradients
from lmsmith.train.optim import build_optimizer, param_groups

LAYOUT_KEYS = ("dp_replicate", "dp_shard", "tp", "pp")


def rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def main(opts: dict[str, str]) -> None:
    torch.set_num_threads(1)
    steps, BATCH, SEQ = int(opts.get("steps", 2)), int(opts.get("batch", 4)), int(opts.get("seq", 128))
    ranks = init_ranks(Layout(**{k: int(opts[k]) for k in LAYOUT_KEYS if k in opts}))
    ranks.pp_schedule = opts.get("schedule", "1f1b")
    cfg = preset(opts.get("preset", "small"), max_seq_len=SEQ)
    model = build_model(cfg, seed=0)
    parallelize(model, ranks)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (BATCH, SEQ + 1), generator=gen) for _ in range(steps)]
    ranks.barrier()
    base = rss("VmRSS") - sum(p.numel() * p.element_size() for p in _local(model))  # without the weights
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    optimizer = build_optimizer(param_groups(model, 0.1), 1e-3, (0.9, 0.95), 1e-8)
    times = []
    for ids in batches:
        t0 = time.perf_counter()
        batch = ranks.shard_batch({"input_ids": ids[:, :-1], "labels": ids[:, 1:]})
        accumulate_gradients(model, [batch], causal_lm_objective, policy="fp32", ranks=ranks)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    measured = rss("VmHWM") - base
    lay = ranks.layout
    layout = pl.Layout(lay.dp_replicate, lay.dp_shard, lay.tp, lay.pp)
    job = pl.Job(cfg, precision="fp32", seq_len=SEQ, batch=BATCH // ranks.dp_size, eager_attention=True)
    parts = pl.memory_per_device(job, layout)
    peaks = ranks.sum([float(measured)], over="world")
    if ranks.main:
        step = statistics.median(times[1:] or times)
        print(json.dumps({"measured": peaks[0] / ranks.world, "predicted": sum(parts.values()), "parts": parts,
                          "tokens_per_s": BATCH * SEQ / step, "world": ranks.world}))
    close_ranks(ranks)


def _local(model):
    return [p.to_local() if hasattr(p, "to_local") else p for p in {id(p): p for p in model.parameters()}.values()]


if __name__ == "__main__":
    sys.exit(main(dict(a.split("=", 1) for a in sys.argv[1:])))
