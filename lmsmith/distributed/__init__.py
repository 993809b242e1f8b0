"""Training on several processes (torchrun): the layout, the ranks, the parallelisms, checkpoints.

PyTorch is the runtime (torch.distributed, DeviceMesh, DTensor, FSDP2, distributed checkpoints);
this package only decides what goes where:

    layout.py       Layout: --dp-replicate R --dp-shard K --tp T --pp P --cp C (product = world size)
    ranks.py        Ranks: this process's place in the mesh and the few collectives the loop needs
                    (global token counts, agreeing on a stop); single-process runs get a trivial one
    parallelize.py  apply_tp / apply_fsdp / apply_ddp on a built model, in torchtitan's order
    dcp.py          sharded checkpoints (torch.distributed.checkpoint) that resume on any layout
    plan.py         the memory / step-time planner behind `lmsmith plan`
"""

from .layout import Layout
from .ranks import Ranks

__all__ = ["Layout", "Ranks"]
