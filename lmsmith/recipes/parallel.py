"""The parallelism flags every training verb takes under torchrun, and joining the job.

    torchrun --nproc_per_node 2 -m lmsmith pretrain --dp-shard 2
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m lmsmith finetune MODEL --data d.jsonl --dp-shard 8 --dp-replicate 2
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

HELP = ("under torchrun (torchrun --nproc_per_node N -m lmsmith VERB ...): how the N processes split the work; "
        "the product of the degrees must equal the world size")


def add_parallel_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallelism", HELP)
    g.add_argument("--dp-shard", type=int, default=-1, metavar="K",
                   help="FSDP2: shard weights, gradients and optimizer state over K ranks "
                        "(default -1: every rank the other degrees leave)")
    g.add_argument("--dp-replicate", type=int, default=1, metavar="R",
                   help="DDP: R full replicas (with --dp-shard K > 1: HSDP, R groups of K shards)")
    g.add_argument("--tp", type=int, default=1, metavar="T",
                   help="tensor parallelism over T ranks, with sequence parallelism on the norms (T divides the "
                        "attention and key/value head counts)")
    g.add_argument("--pp", type=int, default=1, metavar="P",
                   help="pipeline parallelism: P stages of consecutive blocks (the embedding on the first, the head "
                        "on the last)")
    g.add_argument("--pp-schedule", default="1f1b", choices=("1f1b", "gpipe", "interleaved"),
                   help="pipeline schedule (default 1f1b: one forward, one backward, less activation memory; "
                        "interleaved: 1F1B over 2 stages per rank, r and r + P of 2P, for a smaller bubble)")
    g.add_argument("--pp-microbatches", type=int, default=None, metavar="M",
                   help="pipeline micro-batches per step, cut from each rank's rows (default: P)")
    g.add_argument("--cp", type=int, default=1, metavar="C", help="context parallelism (CUDA only; not built yet: 1)")


def start_ranks(args: argparse.Namespace, device: str | None = None):
    """Join the torchrun job with the flags' layout (or return the single-process Ranks).

    On every rank but 0 standard output is silenced: logs, summaries and samples come from rank 0.
    """
    from ..distributed import Layout
    from ..distributed.ranks import init_ranks
    from ..errors import LmsmithError

    if args.cp != 1:
        raise LmsmithError(f"--cp {args.cp}: context parallelism needs CUDA and is not built yet; use --cp 1")
    layout = Layout(dp_replicate=args.dp_replicate, dp_shard=args.dp_shard, tp=args.tp, pp=args.pp, cp=args.cp)
    ranks = init_ranks(layout, device)
    ranks.pp_schedule, ranks.pp_microbatches = args.pp_schedule, args.pp_microbatches
    if not ranks.main:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the rest of this process
    return ranks


@contextlib.contextmanager
def on_ranks(ranks):
    """Leave the process group at the end (also after an error), so torchrun sees every rank exit."""
    from ..distributed.ranks import close_ranks

    try:
        yield ranks
    except BaseException:
        close_ranks(ranks)
        raise
    close_ranks(ranks, finished=True)
