"""This process's place in a torchrun job, and the few collectives the training loop needs.

The loop asks the same questions whether it runs alone or on 1,000 GPUs: which slice of the global
batch is mine (`shard_batch`), how many target tokens did the whole step have (`sum`), did any rank
get Ctrl-C (`any`), am I the one who prints and writes (`main`). A single process gets `Ranks()`,
whose answers cost nothing.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch

from ..errors import LmsmithError
from .layout import DIMS, Layout


def pad_for_sequence_parallel(batch: dict, multiple: int) -> dict:
    """Every (B, T) tensor of `batch` right-padded to a T that `multiple` divides: labels with -100 (no
    loss), masks and everything else with 0. Causal attention never looks right, so the real positions'
    outputs are unchanged."""
    import torch.nn.functional as F

    from ..loss import IGNORE_INDEX

    out = {}
    for key, v in batch.items():
        if isinstance(v, torch.Tensor) and v.ndim == 2 and v.shape[1] % multiple:
            fill = IGNORE_INDEX if key.endswith("labels") else 0
            v = F.pad(v, (0, multiple - v.shape[1] % multiple), value=fill)
        out[key] = v
    return out


def launched_by_torchrun() -> bool:
    """True in a process torchrun (or torch.distributed.launch) started: it sets these variables."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"))


class Ranks:
    """Rank, world and data-parallel position of this process; `Ranks()` is a single process.

    Attributes:
        rank, world: this process's global rank and the number of processes.
        dp_rank, dp_size: position among the data-parallel replicas (ranks with different data).
        layout: the resolved Layout; mesh: the DeviceMesh (None alone).
        device: the device this rank trains on.
    """

    def __init__(self, layout: Layout | None = None, mesh=None, device: torch.device | None = None):
        self.layout = layout or Layout(dp_shard=1)
        self.mesh = mesh
        self.pipeline = None  # this rank's distributed.pipeline.Pipeline when pp > 1 (set by parallelize)
        self.pp_schedule, self.pp_microbatches = "1f1b", None
        self.device = device or torch.device("cpu")
        if mesh is None:
            self.rank, self.world, self.dp_rank, self.dp_size = 0, 1, 0, 1
            self._dp_group = None
            return
        import torch.distributed as dist

        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        dp = mesh["dp"]
        self.dp_rank, self.dp_size = dp.get_local_rank(), dp.size()
        self._dp_group = dp.get_group()

    @property
    def main(self) -> bool:
        """The rank that logs, prints, draws the progress bar and writes single files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.mesh is not None

    @property
    def shards_weights(self) -> bool:
        """Whether parameters are DTensors (FSDP or TP): saving and loading then go through DCP."""
        return self.distributed and (self.layout.dp_shard > 1 or self.layout.tp > 1 or self.layout.pp > 1)

    def shard_batch(self, batch: dict, even: bool = True) -> dict:
        """This rank's rows of a global batch: rows [dp_rank * b, (dp_rank + 1) * b) of every tensor.

        Every rank draws the same global batch (batch k depends on (seed, k) only), so the union of
        the slices is exactly what one process would train on. Training batches must split evenly;
        with `even=False` (evaluation: the last validation batch is short) the slices differ by at
        most a row, and a rank may get none. Under tensor parallelism the sequences are right-padded to
        a multiple of --tp (sequence parallelism splits them evenly; see `pad_for_sequence_parallel`).
        """
        if self.layout.tp > 1:
            batch = pad_for_sequence_parallel(batch, self.layout.tp)
        if self.dp_size == 1:
            return batch
        out = {}
        for key, v in batch.items():
            if isinstance(v, torch.Tensor) and v.ndim >= 1:
                rows = v.shape[0]
                if rows % self.dp_size and even:
                    raise LmsmithError(f"a batch of {rows} rows does not split over {self.dp_size} data-parallel "
                                       f"ranks; choose a --batch-size divisible by {self.dp_size}")
                v = v[self.dp_rank * rows // self.dp_size:(self.dp_rank + 1) * rows // self.dp_size]
            out[key] = v
        return out

    def sum(self, values: list[float], over: str = "dp") -> list[float]:
        """Element-wise sum of `values` over the data-parallel ranks (`over="world"`: every rank)."""
        if not self.distributed:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(t, group=self._dp_group if over == "dp" else None)  # None: the default (world) group
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on any (a Ctrl-C seen by one rank stops them all)."""
        if not self.distributed:
            return flag
        import torch.distributed as dist

        t = torch.tensor([1.0 if flag else 0.0], device=self._collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def from_main(self, value: int | None) -> int | None:
        """Rank 0's integer decision (or None) on every rank, e.g. the step count a time budget fitted:
        each rank measures its own clock, but all must stop at the same step."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        t = torch.tensor([-1 if value is None else value], dtype=torch.int64, device=self._collective_device())
        dist.broadcast(t, src=0)
        return None if int(t) < 0 else int(t)

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank (small JSON-like objects: paths, decisions)."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _collective_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def init_ranks(layout: Layout, device: str | None = None, timeout_s: float = 1800) -> Ranks:
    """Join the torchrun job (one process group, a DeviceMesh of `layout`) or return `Ranks()` alone.

    gloo on CPU (tests, laptops), NCCL on CUDA; each rank takes GPU LOCAL_RANK. A layout whose product
    is not the world size, or context parallelism without CUDA, is a one-line error on every rank.
    """
    if not launched_by_torchrun():
        if layout.size != 1:
            raise LmsmithError(f"{layout.describe()} needs several processes ({layout.size}): launch with "
                               f"torchrun --nproc_per_node {layout.size} -m lmsmith ...")
        return Ranks(layout.resolve(1))
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    world = int(os.environ["WORLD_SIZE"])
    resolved = layout.resolve(world)
    cuda = torch.cuda.is_available() and device != "cpu"
    if resolved.cp > 1 and not cuda:
        raise LmsmithError(f"--cp {resolved.cp}: context parallelism needs CUDA (ring attention over NCCL); "
                           f"on CPU use --cp 1")
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    mesh = init_device_mesh(dev.type, resolved.shape, mesh_dim_names=DIMS)
    mesh[("dp_replicate", "dp_shard")]._flatten(mesh_dim_name="dp")
    return Ranks(resolved, mesh, dev)


def close_ranks(ranks: Ranks, finished: bool = False) -> None:
    """Leave the process group (every rank, at the end of a run or on an error).

    `finished`: the run ended normally on every rank; a barrier first, so no rank tears its connections
    down while another still completes a collective (gloo then aborts the slower process: "terminate
    called without an active exception")."""
    if ranks.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            if finished:
                dist.barrier()
            dist.destroy_process_group()
