"""Vocabulary-parallel cross-entropy on each rank's slice against F.cross_entropy on the whole logits.

    torchrun --nproc_per_node 2 tests/dist_loss_parallel.py

Vocabulary 11 over 2 ranks (6 + 5 columns, as DTensor's Shard splits it); targets in both halves and
on the boundary; the losses, their sum and the gradient of each rank's slice must match.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from lmsmith.distributed.loss_parallel import vocab_sharded


def main() -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    g = torch.Generator().manual_seed(0)
    full = (torch.randn(7, 11, generator=g) * 3).requires_grad_()  # the same on every rank
    targets = torch.tensor([0, 5, 6, 10, 3, 7, 5])
    weights = torch.rand(7, generator=g)  # a non-uniform upstream gradient
    (F.cross_entropy(full, targets, reduction="none") * weights).sum().backward()
    reference = F.cross_entropy(full.detach(), targets, reduction="none")

    sharded = distribute_tensor(full.detach(), mesh, [Shard(-1)])
    local, cross_entropy = vocab_sharded(sharded)
    local = local.detach().requires_grad_()
    losses = cross_entropy(local, targets, reduction="none")
    torch.testing.assert_close(losses, reference)
    torch.testing.assert_close(cross_entropy(local.detach(), targets), reference.sum())
    (losses * weights).sum().backward()
    mine = distribute_tensor(full.grad, mesh, [Shard(-1)]).to_local()
    torch.testing.assert_close(local.grad, mine)
    if dist.get_rank() == 0:
        print("ok")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
