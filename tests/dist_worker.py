"""One training run of the tiny model, alone or as one rank of a torchrun job (tests/test_distributed.py).

    python tests/dist_worker.py OUT [key=value ...]          one process
    torchrun --nproc_per_node 2 tests/dist_worker.py OUT dp_shard=2 [pp=2 [gpipe=1 | interleaved=1]] [save=5]
                                                      [resume=1] [lora=1] [stream=1]

Prints the losses of the steps it ran as one JSON line on rank 0. Every rank draws the same global
batch k from (seed, k), so any layout should reproduce the one-process losses.
"""

import json
import sys

import torch

from lmsmith.adapters.lora import LoraConfig, apply_lora
from lmsmith.config import preset
from lmsmith.distributed import Layout
from lmsmith.distributed.materialize import is_meta
from lmsmith.distributed.ranks import close_ranks, init_ranks
from lmsmith.model import build_model
from lmsmith.train import TrainConfig, causal_lm_objective, train

LAYOUT_KEYS = ("dp_replicate", "dp_shard", "tp", "pp")


class Batches:
    """Global batch k: 4 random sequences of 32 tokens, from (k) only; resumable."""

    def __init__(self):
        self.k = 0

    def __next__(self):
        g = torch.Generator().manual_seed(self.k)
        self.k += 1
        ids = torch.randint(0, 512, (4, 33), generator=g)
        return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}

    def state_dict(self):
        return {"k": self.k}

    def load_state_dict(self, state):
        self.k = state["k"]


def _watch_gathers() -> list[int]:
    """Forbid gathering the whole state dict and track the peak bytes of gathered tensors alive at once."""
    import weakref

    from torch.distributed.tensor import DTensor

    import lmsmith.distributed.dcp as dcp

    def refuse(model):
        raise AssertionError("final/ gathered the whole model at once")

    dcp.full_state_dict = refuse
    live, peak, real, real_stored = [0], [0], DTensor.full_tensor, dcp.stored_tensors

    def track(t):
        n = t.numel() * t.element_size()
        live[0] += n
        peak[0] = max(peak[0], live[0])
        weakref.finalize(t, lambda: live.__setitem__(0, live[0] - n))
        return t

    def full_tensor(self, *args, **kwargs):
        return track(real(self, *args, **kwargs))

    def stored_tensors(*args):  # a pipeline's final/: every tensor read back from the checkpoint
        meta, fetch = real_stored(*args)
        return meta, lambda name: track(fetch(name))

    DTensor.full_tensor = full_tensor
    dcp.stored_tensors = stored_tensors
    return peak


def main(out: str, opts: dict[str, int]) -> None:
    torch.set_num_threads(1)
    layout = Layout(**{k: opts[k] for k in LAYOUT_KEYS if k in opts}, **({} if "dp_shard" in opts else
                                                                       {"dp_shard": -1}))
    ranks = init_ranks(layout)
    ranks.pp_schedule = "gpipe" if opts.get("gpipe") else "interleaved" if opts.get("interleaved") else "1f1b"
    try:
        # meta=1: on the meta device; the loop gives each rank's shards build_model(seed=0)'s values
        model = build_model(preset("tiny", vocab_size=512), seed=0, init=not opts.get("meta"))
        torch.manual_seed(0)  # the adapters' random init: the same on every rank and in the reference
        params = apply_lora(model, LoraConfig(r=4, alpha=8, target_modules="all-linear")) if opts.get("lora") else None
        config = TrainConfig(max_steps=10, warmup_steps=2, lr=3e-3, dtype="fp32", save_every=opts.get("save", 0),
                             progress=False, peak_flops=1e12, log_every=1)
        assert is_meta(model) == bool(opts.get("meta"))  # the loop materialises a meta model itself
        peak = _watch_gathers() if opts.get("stream") else None
        result = train(model, Batches(), causal_lm_objective, config, out_dir=out, ranks=ranks,
                       resume=bool(opts.get("resume")), trainable_params=params)
        # final/ was streamed: never more than one whole tensor at once (a pipeline's is read by rank 0 alone)
        if peak is not None and (ranks.main or ranks.pipeline is None):
            largest = max(p.numel() * p.element_size() for p in build_model(model.config, init=False).parameters())
            assert 0 < peak[0] <= largest, f"gathered {peak[0]} bytes at once; the largest tensor is {largest}"
        if opts.get("interleaved"):  # 4 one-block stages: pipeline rank r runs blocks r and r + 2
            from lmsmith.distributed.pipeline import held

            r = ranks.mesh["pp"].get_local_rank()
            assert ranks.pipeline.my_stages == [r, r + 2]
            assert [i for i, b in enumerate(model.model.layers) if held(b)] == [r, r + 2]
        if ranks.main:
            print(json.dumps(result.losses))
    finally:
        close_ranks(ranks)


if __name__ == "__main__":
    main(sys.argv[1], {k: int(v) for k, v in (a.split("=") for a in sys.argv[2:])})
