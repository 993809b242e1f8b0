"""How the world's processes split the work: data (replicated or sharded), tensor, pipeline, context.

The flags follow torchtitan's: `--dp-replicate R --dp-shard K --tp T --pp P --cp C`, whose product
must be the world size torchrun started. The mesh's dimensions are ordered outermost first
(pp, dp_replicate, dp_shard, cp, tp): tensor parallelism talks the most, so its ranks are neighbours
(the same node), pipeline stages the least.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import LmsmithError

DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


@dataclass(frozen=True)
class Layout:
    """Degrees of each parallelism (1 = not used). `dp_shard=-1` means "the rest of the world"."""

    dp_replicate: int = 1
    dp_shard: int = -1
    tp: int = 1
    pp: int = 1
    cp: int = 1

    def resolve(self, world: int) -> Layout:
        """This layout with dp_shard filled in for `world` processes; a one-line error if it cannot fit."""
        for name in ("dp_replicate", "tp", "pp", "cp"):
            if getattr(self, name) < 1:
                raise LmsmithError(f"--{name.replace('_', '-')} {getattr(self, name)} must be >= 1")
        rest = self.dp_replicate * self.tp * self.pp * self.cp
        shard = self.dp_shard
        if shard == -1:
            if world % rest:
                raise LmsmithError(f"{self.describe(shard='?')} does not divide the world size {world}: "
                                   f"choose degrees whose product is {world}")
            shard = world // rest
        if shard < 1:
            raise LmsmithError(f"--dp-shard {shard} must be >= 1 (or -1: the rest of the world)")
        out = Layout(self.dp_replicate, shard, self.tp, self.pp, self.cp)
        if out.size != world:
            raise LmsmithError(f"{out.describe()} = {out.size} processes, but torchrun started {world}: "
                               f"the product of the degrees must equal the world size "
                               f"(--nproc_per_node x --nnodes)")
        return out

    @property
    def size(self) -> int:
        return self.dp_replicate * max(self.dp_shard, 1) * self.tp * self.pp * self.cp

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many different slices of each global batch are trained at once."""
        return self.dp_replicate * self.dp_shard

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(getattr(self, d) for d in DIMS)

    def describe(self, shard: int | str | None = None) -> str:
        shard = self.dp_shard if shard is None else shard
        return (f"--dp-replicate {self.dp_replicate} --dp-shard {shard} --tp {self.tp} --pp {self.pp} "
                f"--cp {self.cp}")

    def brief(self) -> str:
        """Only the degrees above 1, e.g. "dp-shard 16 tp 8" ("1 device" when none)."""
        parts = [f"{name.replace('_', '-')} {getattr(self, name)}" for name in ("dp_replicate", "dp_shard", "tp",
                                                                                "pp", "cp") if getattr(self, name) > 1]
        return " ".join(parts) or "1 device"

    def check_model(self, config) -> None:
        """Errors a layout gives for this model, before any process builds it."""
        if self.tp > 1:
            for name, heads in (("attention heads", config.n_heads), ("key/value heads", config.n_kv_heads)):
                if heads % self.tp:
                    raise LmsmithError(f"--tp {self.tp}: the model's {heads} {name} do not divide evenly; "
                                       f"choose a --tp that divides {heads}")
            if config.hidden_dim % self.tp:
                raise LmsmithError(f"--tp {self.tp}: the MLP width {config.hidden_dim} does not divide evenly")
        if self.pp > config.n_layers:
            raise LmsmithError(f"--pp {self.pp}: the model has only {config.n_layers} layers to split into stages")
