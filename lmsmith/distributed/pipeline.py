"""Pipeline parallelism: this rank keeps a contiguous run of blocks (interleaved: two runs) and runs a
torch.distributed.pipelining schedule (GPipe, 1F1B or interleaved 1F1B) over the micro-batches of each step.

The model is pruned in place rather than rebuilt, so every kept parameter keeps its Hugging Face
name (checkpoints of any layout load into any other): blocks of other stages become `_Skip`, the
first stage keeps the embedding, the last the final norm and the head. The pruned model itself is the
stage's module, so each stage runs `forward` (and FSDP / DDP see it): on later stages the skipped
embedding passes the incoming hidden states (B, T, D) through, on earlier ones the skipped head
passes them out; the last stage returns logits, which the schedule's loss sums. A tied head (all lmsmith
presets) lives on both ends, as in Megatron: the first stage's embedding and the last stage's head
start equal, and their gradients are summed across the two after every backward, so both take
the same update. With two stages per rank (interleaved) the model holds both stages' blocks and each
stage runs a `_StageView`: the same modules, with the other stage's blocks passed through.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LmsmithError
from ..loss import IGNORE_INDEX

SCHEDULES = ("1f1b", "gpipe", "interleaved")
STAGES_PER_RANK = {"1f1b": 1, "gpipe": 1, "interleaved": 2}
_KEPT_SCHEDULES = 4  # schedules of different step shapes kept (each holds its stage's buffers)


class _Skip(nn.Module):
    """A block, norm or embedding held by another stage: passes its input through."""

    def forward(self, x, *args):
        return x


class _StageView(nn.Module):
    """One of several stages on a rank: the rank's own modules of that stage (shared, not copied) in the
    model's structure, run by the model's own `forward`; what the stage lacks passes its input through."""

    def __init__(self, model: nn.Module, layers: range, first: bool, last: bool):
        super().__init__()
        object.__setattr__(self, "whole", model)  # not registered: its parameters stay the model's
        self.model = nn.Module()
        self.model.embed_tokens = model.model.embed_tokens if first else _Skip()
        self.model.layers = nn.ModuleList(b if i in layers else _Skip() for i, b in enumerate(model.model.layers))
        self.model.norm = model.model.norm if last else _Skip()
        self.lm_head = model.lm_head if last else _Skip()

    def forward(self, x):
        return type(self.whole).forward(self, x)

    def __getattr__(self, name):  # config, inv_freq, sequence_shards, hidden_states: the model's
        try:
            return super().__getattr__(name)
        except AttributeError:
            attr = getattr(type(self.whole), name, None)
            if callable(attr):
                return attr.__get__(self)  # a method of the model, run on this view's modules
            return getattr(self.whole, name)


def held(module: nn.Module) -> bool:
    """Whether this rank's stage holds `module` (not a `_Skip` of another stage's part)."""
    return not isinstance(module, _Skip)


def stage_layers(n_layers: int, stages: int, stage: int) -> range:
    """The blocks of `stage`: an even split, earlier stages one more when it does not divide."""
    base, extra = divmod(n_layers, stages)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (1 if stage < extra else 0))


class Pipeline:
    """This rank's stage and schedule. `step(micro_batches)` runs forward and backward of the step's
    micro-batches (re-cut into `microbatches` pieces) and returns this rank's summed loss (0 off the
    last stage)."""

    def __init__(self, model, ranks, schedule: str = "1f1b", microbatches: int | None = None):
        """Prune `model` to this rank's stages; the schedules are made once TP / FSDP are applied.

        1F1B and GPipe give each of the P ranks one stage; interleaved 1F1B gives each two (virtual
        stages r and r + P of 2P), so a rank's blocks are not contiguous and the bubble is halved."""
        if schedule not in SCHEDULES:
            raise LmsmithError(f"--pp-schedule {schedule!r}: choose {', '.join(SCHEDULES)}")
        pp = ranks.mesh["pp"]
        rank, ranks_in_pp = pp.get_local_rank(), pp.size()
        self.n_stages = ranks_in_pp * STAGES_PER_RANK[schedule]
        self.my_stages = list(range(rank, self.n_stages, ranks_in_pp))  # this rank's stage indices
        n_layers = len(model.model.layers)
        if self.n_stages > n_layers:
            raise LmsmithError(f"--pp {ranks_in_pp} --pp-schedule {schedule}: {self.n_stages} stages, but the model "
                               f"has only {n_layers} layers; use fewer stages or another schedule")
        self.first, self.last = 0 in self.my_stages, self.n_stages - 1 in self.my_stages
        self.microbatches = microbatches or ranks_in_pp
        self.model, self.ranks, self.kind = model, ranks, schedule
        self.tied = model.lm_head.weight is model.model.embed_tokens.weight
        self._layers = {k: stage_layers(n_layers, self.n_stages, k) for k in self.my_stages}
        mine = {i for layers in self._layers.values() for i in layers}
        for i in range(n_layers):
            if i not in mine:
                model.model.layers[i] = _Skip()
        if not self.first:
            model.model.embed_tokens = _Skip()
        if not self.last:
            model.model.norm = _Skip()
            model.lm_head = _Skip()
        # What each stage runs: the pruned model itself when the rank has one stage, else a view of it per stage.
        self.stage_modules = {k: model if len(self.my_stages) == 1 else
                              _StageView(model, self._layers[k], first=k == 0, last=k == self.n_stages - 1)
                              for k in self.my_stages}
        self._tie_group = _tie_group(ranks) if self.tied else None
        self._twin = self.tied and self.last and not self.first
        # The last stage's copy of a tied matrix is stored in checkpoints under the embedding's name.
        self.alias = {"lm_head.weight": "model.embed_tokens.weight"} if self._twin else {}
        self._schedules: dict[tuple, object] = {}  # made at the first step of each shape, after TP / FSDP

    @property
    def duplicate(self):
        """The last stage's copy of a tied matrix (trained, but counted once, on the first stage, in the
        gradient norm); looked up now, since FSDP / TP replace the parameter objects."""
        return self.model.lm_head.weight if self._twin else None

    def _schedule_for(self, shape: tuple[int, int]):
        """The schedule for steps of `shape` (rows, T): a stage's receive buffers are sized once, from the
        first micro-batches it runs, so each shape (an evaluation's short last batch, another SFT width)
        gets its own stage and schedule; the last few are kept."""
        from torch.distributed.pipelining import (
            PipelineStage,
            Schedule1F1B,
            ScheduleGPipe,
            ScheduleInterleaved1F1B,
        )

        if shape not in self._schedules:
            if len(self._schedules) >= _KEPT_SCHEDULES:
                self._schedules.pop(next(iter(self._schedules)))
            group = self.ranks.mesh["pp"].get_group()
            stages = [PipelineStage(self.stage_modules[k], k, self.n_stages, self.ranks.device, group=group)
                      for k in self.my_stages]
            if self.kind == "interleaved":
                schedule = ScheduleInterleaved1F1B(stages, self.microbatches, loss_fn=self._loss, scale_grads=False)
            else:
                cls = Schedule1F1B if self.kind == "1f1b" else ScheduleGPipe
                schedule = cls(stages[0], self.microbatches, loss_fn=self._loss, scale_grads=False)
            self._schedules[shape] = schedule
        return self._schedules[shape]

    @staticmethod
    def _loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed next-token cross-entropy of one micro-batch's logits (B, T, V), fp32, -100 ignored."""
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum")

    def _run(self, micro_batches: list[dict], train: bool) -> float:
        ids, labels = _stack(micro_batches)  # (Ranks.shard_batch already padded T for sequence parallelism)
        if not train and ids.shape[0] % self.microbatches:  # a short evaluation batch: pad rows without targets
            extra = self.microbatches - ids.shape[0] % self.microbatches
            ids = torch.cat([ids, ids.new_zeros(extra, ids.shape[1])])
            labels = torch.cat([labels, labels.new_full((extra, labels.shape[1]), IGNORE_INDEX)])
        if ids.shape[0] % self.microbatches:
            raise LmsmithError(f"a step of {ids.shape[0]} rows per data-parallel rank does not split into "
                               f"{self.microbatches} pipeline micro-batches; choose a --batch-size x --grad-accum "
                               f"divisible by {self.microbatches}")
        schedule = self._schedule_for(tuple(ids.shape))
        run = schedule.step if train else schedule.eval
        losses: list[torch.Tensor] = []
        if self.first:
            run(ids, target=labels if self.last else None, losses=losses)
        elif self.last:
            run(target=labels, losses=losses)
        else:
            run()
        return float(sum(float(x.detach()) for x in losses)) if self.last else 0.0

    def step(self, micro_batches: list[dict]) -> float:
        loss = self._run(micro_batches, train=True)
        self.sync_tied_gradients()
        self.average_replicas()
        return loss

    def average_replicas(self) -> None:
        """Plain data parallelism beside a pipeline: average the replicas' gradients once per step, as DDP
        would (DDP's hooks assume one forward per backward; a schedule runs many)."""
        layout = self.ranks.layout
        if layout.dp_replicate == 1 or layout.dp_shard > 1:  # none, or FSDP's reduce-scatter did it
            return
        import torch.distributed as dist

        group = self.ranks.mesh["dp_replicate"].get_group()
        for p in self.model.parameters():
            if p.grad is not None:
                grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                dist.all_reduce(grad, group=group)
                grad.div_(layout.dp_replicate)

    def evaluate(self, batch: dict) -> float:
        with torch.no_grad():
            return self._run([batch], train=False)

    def sync_tied_gradients(self) -> None:
        """Sum the tied embedding's and head's gradients between the first and last stage."""
        if self._tie_group is None:
            return
        import torch.distributed as dist

        w = self.model.model.embed_tokens.weight if self.first else self.model.lm_head.weight
        if w.grad is None:
            w.grad = torch.zeros_like(w)
        if hasattr(w.grad, "placements") and w.grad.placements != w.placements:
            # Under TP the embedding's gradient comes back Replicate(); the head's is Shard(0), as the weights.
            w.grad = w.grad.redistribute(placements=w.placements)
        grad = w.grad.to_local() if hasattr(w.grad, "to_local") else w.grad
        dist.all_reduce(grad, group=self._tie_group)


def _stack(micro_batches: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's micro-batches as one (rows, T) batch, right-padded to the longest (labels -100)."""
    width = max(b["input_ids"].shape[1] for b in micro_batches)

    def pad(t, value):
        return F.pad(t, (0, width - t.shape[1]), value=value)

    ids = torch.cat([pad(b["input_ids"], 0) for b in micro_batches])
    labels = torch.cat([pad(b["labels"], IGNORE_INDEX) for b in micro_batches])
    return ids, labels


def _tie_group(ranks):
    """The process group of this rank's first and last pipeline stage (same position in the other dims).

    Every rank creates every such group, in the same order, as torch.distributed requires."""
    import torch.distributed as dist

    grid = ranks.mesh.mesh.reshape(ranks.layout.pp, -1)  # (pp, everything else) of global ranks
    mine = None
    for col in range(grid.shape[1]):
        members = sorted({int(grid[0, col]), int(grid[-1, col])})
        group = dist.new_group(members)
        if ranks.rank in members:
            mine = group
    return mine
