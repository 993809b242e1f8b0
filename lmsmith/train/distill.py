"""Knowledge distillation: the student learns the teacher's next-token distribution, not only the true token.

    divergence(ls, lt, kind, beta) -> (N,)        per-position fkl | rkl | jsd between log-distributions
    DistillTargets(labels, spec, teacher=...)     what `student(ids, labels=targets)` turns into the loss
    distill_objective(spec, teacher=None)         the loop's objective (online teacher, or a top-K cache)

The losses, with p the teacher's and q the student's distribution at temperature T (logits / T):

    fkl  KL(p || q)                               forward KL: q covers everything p does (mean-seeking)
    rkl  KL(q || p)                               reverse KL: q sits on p's modes (mode-seeking)
    jsd  beta KL(p || m) + (1 - beta) KL(q || m)  m = beta p + (1 - beta) q: trl's generalised JSD (GKD);
                                                  beta = 0 is fkl, beta = 1 is rkl

    loss = alpha * T^2 * divergence + (1 - alpha) * CE(true token)     per target token, summed

T^2 keeps the gradient's size independent of T (Hinton et al., 2015). The objective follows the loop's
contract and only calls the student's `forward`: the teacher's targets ride in `labels=` as a
`DistillTargets`, which the model's loss hook (`loss.target_loss`) calls with the final hidden states.
The loss is computed in chunks of positions, each under activation checkpointing, so neither the
teacher's nor the student's (N, V) logits exist at once: a chunk's logits are rebuilt in backward.

A top-K cache (`data/teacher_cache.py`) gives the teacher as K ids, their log-probabilities and the log
of the remaining mass. Both distributions are then compared over K + 1 buckets (the K tokens, and
"everything else": the student's mass outside the K ids): no renormalisation, every bucket's mass is
exact, and with K = V there is no rest bucket and the loss equals online distillation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..errors import LmsmithError
from ..loss import IGNORE_INDEX

LOSSES = ("fkl", "rkl", "jsd")
# Logits per chunk (about 16 MB of fp32): a few such tensors live at a time, in cache.
_CHUNK_LOGITS = 1 << 22


@dataclass(frozen=True)
class DistillSpec:
    """How the student is compared with the teacher.

    Attributes:
        loss: "fkl" | "rkl" | "jsd".
        temperature: both distributions are softmax(logits / temperature); the divergence is scaled by T^2.
        beta: jsd's interpolation (0 = fkl, 1 = rkl).
        alpha: weight of the distillation term; 1 - alpha weighs the cross-entropy on the true tokens.
    """

    loss: str = "fkl"
    temperature: float = 1.0
    beta: float = 0.5
    alpha: float = 1.0

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise LmsmithError(f"--loss {self.loss!r}: choose one of {', '.join(LOSSES)}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise LmsmithError(f"--temperature {self.temperature}: must be a positive number")
        if not 0 <= self.beta <= 1:
            raise LmsmithError(f"--beta {self.beta}: must be in [0, 1] (0 = forward KL, 1 = reverse KL)")
        if not 0 <= self.alpha <= 1:
            raise LmsmithError(f"--alpha {self.alpha}: must be in [0, 1] (1 = distillation only, 0 = CE only)")


def _kl(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probabilities (N, M); buckets where p is 0 add 0 (and no NaN gradient)."""
    p = lp.exp()
    return (p * torch.where(p > 0, lp - lq, 0.0)).sum(-1)


def divergence(ls: torch.Tensor, lt: torch.Tensor, kind: str, beta: float = 0.5) -> torch.Tensor:
    """Per-row divergence between the student's and the teacher's distributions.

    Args:
        ls: (N, M) student log-probabilities; lt: (N, M) teacher log-probabilities (-inf allowed);
            M is the vocabulary, or the K + 1 buckets of a top-K cache.
        kind: "fkl" | "rkl" | "jsd" (see the module docstring); beta: jsd's interpolation.

    Returns:
        (N,) fp32 divergences.
    """
    if kind == "fkl" or (kind == "jsd" and beta == 0):
        return _kl(lt, ls)
    if kind == "rkl" or (kind == "jsd" and beta == 1):
        return _kl(ls, lt)
    m = torch.logaddexp(ls + math.log(1 - beta), lt + math.log(beta))  # log of the mixture (N, M)
    return beta * _kl(lt, m) + (1 - beta) * _kl(ls, m)


class DistillTargets:
    """The teacher's side of one batch, given to the student as `labels=`; the model calls `loss`.

    Args:
        labels: (B, T) the true next tokens, -100 where a position carries no loss (prompts, padding).
        spec: the DistillSpec.
        teacher_hidden: (B, T, Dt) the teacher's final hidden states and `teacher_head` its LM head
            (online); or
        cached: (ids (B, T, K) int, logp (B, T, K) float, rest (B, T) float) from a top-K cache, the
            log-probabilities at the spec's temperature.

    After the model's forward, `metrics` holds the sums `ce` (cross-entropy of the true tokens) and `kl`
    (forward KL to the teacher at temperature 1; over the cache's buckets for a cache) over the targets.
    """

    def __init__(self, labels: torch.Tensor, spec: DistillSpec, *, teacher_hidden: torch.Tensor | None = None,
                 teacher_head=None, cached: tuple | None = None):
        if (teacher_hidden is None) == (cached is None):
            raise ValueError("give the teacher's hidden states or a cached top-K, not both")
        self.labels, self.spec = labels, spec
        self.teacher_hidden, self.teacher_head, self.cached = teacher_hidden, teacher_head, cached
        self.metrics: dict[str, float] = {}

    def loss(self, h: torch.Tensor, head, weight: torch.Tensor | None) -> torch.Tensor:
        """The summed loss over the target positions, from the student's hidden states h (B, T, D)."""
        keep = self.labels != IGNORE_INDEX
        hs, targets = h[keep], self.labels[keep]  # (N, D), (N,)
        teacher = (self.teacher_hidden[keep],) if self.cached is None else tuple(c[keep] for c in self.cached)
        vocab = weight.shape[0] if weight is not None else None
        rows = max(1, _CHUNK_LOGITS // (vocab or 32768))
        total = hs.new_zeros((), dtype=torch.float32)
        ce_sum = kl_sum = 0.0

        def chunk(hs_c, targets_c, *teacher_c):
            return self._chunk_loss(hs_c, targets_c, teacher_c, head, weight)

        for s in range(0, hs.shape[0], rows):
            args = (hs[s:s + rows], targets[s:s + rows], *(t[s:s + rows] for t in teacher))
            if torch.is_grad_enabled() and hs.requires_grad:  # the chunk's logits are rebuilt in backward
                loss, ce, kl = checkpoint(chunk, *args, use_reentrant=False)
            else:
                loss, ce, kl = chunk(*args)
            total = total + loss
            ce_sum += float(ce)
            kl_sum += float(kl)
        self.metrics = {"ce": ce_sum, "kl": kl_sum}
        return total

    def _chunk_loss(self, hs, targets, teacher, head, weight):
        """(loss, ce, kl) summed over a chunk of n positions; ce and kl detached (metrics)."""
        spec = self.spec
        zs = (F.linear(hs, weight) if weight is not None else head(hs)).float()  # (n, V)
        ls = F.log_softmax(zs / spec.temperature, dim=-1)
        ls1 = ls if spec.temperature == 1 else F.log_softmax(zs, dim=-1)
        if self.cached is None:
            with torch.no_grad():
                zt = self.teacher_head(teacher[0]).float()  # (n, V)
                if zt.shape[-1] != zs.shape[-1]:
                    raise LmsmithError(f"the teacher's head has {zt.shape[-1]} outputs and the student's "
                                       f"{zs.shape[-1]}: distillation needs one vocabulary")
                lt = F.log_softmax(zt / spec.temperature, dim=-1)
                lt1 = lt if spec.temperature == 1 else F.log_softmax(zt, dim=-1)
            ls_b, lt_b, ls1_b, lt1_b = ls, lt, ls1, lt1
        else:
            ls_b, lt_b = _buckets(ls, *teacher)
            ls1_b, lt1_b = ls_b, lt_b  # a cache holds one temperature
        div = divergence(ls_b, lt_b, spec.loss, spec.beta).sum() * spec.temperature ** 2
        ce = F.nll_loss(ls1, targets, reduction="sum")
        loss = spec.alpha * div + (1 - spec.alpha) * ce if spec.alpha < 1 else div
        with torch.no_grad():
            kl = _kl(lt1_b, ls1_b.detach()).sum()
        return loss, ce.detach(), kl


def _buckets(ls: torch.Tensor, ids: torch.Tensor, logp: torch.Tensor, rest: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Student (N, V) log-probs and a top-K teacher as K (+ 1 rest) buckets: ((N, K+1), (N, K+1)).

    The student's rest is its log-mass outside the K ids; with K = V there is no rest bucket."""
    ids = ids.long()
    ls_k = ls.gather(1, ids)  # (N, K)
    lt_k = logp.float()
    if ids.shape[1] >= ls.shape[1]:
        return ls_k, lt_k
    ls_rest = ls.scatter(1, ids, float("-inf")).logsumexp(dim=-1, keepdim=True)  # (N, 1)
    return torch.cat([ls_k, ls_rest], 1), torch.cat([lt_k, rest.float()[:, None]], 1)


def on_policy_batch(student, batch: dict, fraction: float) -> dict:
    """The batch with its first round(fraction * B) rows replaced by the student's own samples.

    A row keeps its prompt (the tokens before its first target: instruction data), or the first half of
    its tokens (token shards, where every position is a target); the student continues it by sampling
    (temperature 1) to the row's length, and only the sampled tokens are targets. The teacher then scores
    the sequences the student actually produces (generalised knowledge distillation, Agarwal et al.,
    2024). The seed comes from the batch's tokens, so a resumed run draws the same samples.

    Args:
        batch: {"input_ids": (B, T), "labels": (B, T)}.
    """
    from ..decoding.config import GenerationConfig
    from ..decoding.engine import generate_ids

    ids, labels = batch["input_ids"], batch["labels"]
    B, T = ids.shape
    n = round(fraction * B)
    if n == 0 or T < 2:
        return batch
    prompts = []
    for r in range(n):
        first = int((labels[r] != IGNORE_INDEX).nonzero()[0]) if (labels[r] != IGNORE_INDEX).any() else 0
        prompts.append(ids[r, :first + 1 if first > 0 else T // 2].tolist())
    seed = int(ids[:n].sum()) * 1_000_003 % (1 << 31)
    longest = T + 1 - min(len(p) for p in prompts)
    config = GenerationConfig(strategy="sample", temperature=1.0, max_new_tokens=longest, seed=seed, eos_ids=None)
    was_training = student.training
    student.eval()
    try:
        comps = generate_ids(student, prompts, config)
    finally:
        student.train(was_training)
    ids, labels = ids.clone(), labels.clone()
    for r, (p, c) in enumerate(zip(prompts, comps)):
        seq = (p + c.ids)[:T + 1]  # prompt + samples (shorter only at the student's context limit)
        ids[r, :len(seq) - 1] = torch.tensor(seq[:-1], dtype=ids.dtype)
        labels[r] = IGNORE_INDEX
        labels[r, len(p) - 1:len(seq) - 1] = torch.tensor(seq[len(p):], dtype=labels.dtype)  # the samples only
    return {**batch, "input_ids": ids, "labels": labels}


def distill_objective(spec: DistillSpec, teacher: torch.nn.Module | None = None, on_policy: float = 0.0):
    """The loop's objective `(student, batch) -> (loss_sum, metrics, n)` for distillation.

    With `teacher`, it runs on every batch without gradients (under the loop's autocast); without,
    the batch carries the cached top-K: `teacher_ids` (B, T, K), `teacher_logp` (B, T, K),
    `teacher_rest` (B, T). Metrics: `ce` and `kl` per target token; evaluation reports exp(ce) as
    the student's perplexity. `on_policy`: that fraction of every training batch is the student's own
    samples (`on_policy_batch`; needs the teacher; evaluation stays on the data).
    """
    if on_policy and teacher is None:
        raise LmsmithError("--on-policy needs the teacher to score the student's samples, not a teacher cache")
    if not 0 <= on_policy <= 1:
        raise LmsmithError(f"--on-policy {on_policy}: must be a fraction in [0, 1]")
    if teacher is not None:
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)

    def objective(model, batch: dict) -> tuple[torch.Tensor, dict, int]:
        if on_policy and model.training:
            batch = on_policy_batch(model, batch, on_policy)
        labels = batch["labels"]
        if teacher is not None:
            with torch.no_grad():
                th = teacher.hidden_states(batch["input_ids"], attention_mask=batch.get("attention_mask"))
            targets = DistillTargets(labels, spec, teacher_hidden=th, teacher_head=teacher.lm_head)
        else:
            targets = DistillTargets(labels, spec, cached=(batch["teacher_ids"], batch["teacher_logp"],
                                                           batch["teacher_rest"]))
        loss = model(batch["input_ids"], labels=targets, attention_mask=batch.get("attention_mask"))
        n = int((labels != IGNORE_INDEX).sum())
        per = max(n, 1)
        return loss, {k: v / per for k, v in targets.metrics.items()}, n

    objective.perplexity_of = "ce"  # evaluation: exp(val_ce) is the student's perplexity
    return objective
