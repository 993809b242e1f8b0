"""Rollouts: the batch source of `lmsmith rl` on the one training loop.

Each micro-batch the loop draws is sampled on the spot from the current policy: the next
`prompts_per_step` prompts (a shuffled pass over the prompts file, epoch after epoch), G
responses to each from the slot engine in one batched run (temperature, top-p, max tokens;
seeded per rollout), scored by the reward function, turned into group advantages
(`train.grpo.group_advantages`), and laid out as a training batch:

    input_ids (R, T) prompt + response (+ its end token), right-padded, R = prompts x G
    labels    (R, T) the response tokens (and the end token) as targets, -100 elsewhere
    advantages (R,)  one per response
    temperature      the sampling temperature (log-probabilities are of logits / temperature)
    old_logp  (R, T) only with reuse > 1: the sampling policy's log-probabilities
    stats            reward, accuracy (exact match against the answer, where prompts have one),
                     length, truncated (responses that hit max tokens), sampling (share of wall time)

A response that hits the token limit without its end token loses `missing_eos_penalty` from its
reward. With `reuse` = k the loop takes k optimizer steps on each rollout (the clipped ratio
then matters); one rollout is `grad_accum` micro-batches, sampled together.

Resume is exact: rollout i samples with seed (seed, i) from the weights the checkpoint holds,
and a rollout still in use (reuse > 1) is stored in the state itself.
"""

from __future__ import annotations

import time

import torch

from ..data.instruct import collate, epoch_order, pad_id_of
from ..errors import LmsmithError
from ..loss import IGNORE_INDEX
from ..train.grpo import group_advantages
from .rewards import exact_match


class Rollouts:
    """An endless iterator of rollout batches (see the module docstring)."""

    def __init__(self, policy, tokenizer, prompts: list[dict], reward, *, group_size: int = 8,
                 prompts_per_step: int = 8, temperature: float = 1.0, top_p: float = 1.0,
                 max_new_tokens: int = 64, baseline: str = "mean", scale: str = "group",
                 missing_eos_penalty: float = 1.0, reuse: int = 1, grad_accum: int = 1, seed: int = 0,
                 precision: str | None = None):
        from ..decoding import encode_chat

        if group_size < 2 and baseline != "none":
            raise LmsmithError(f"--group-size {group_size}: a {baseline} baseline needs at least 2 responses "
                               "per prompt (or --baseline none)")
        self.policy, self.tokenizer, self.prompts, self.reward = policy, tokenizer, prompts, reward
        self.G, self.P = group_size, min(prompts_per_step, len(prompts))
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens
        self.baseline, self.scale, self.penalty = baseline, scale, missing_eos_penalty
        self.reuse, self.grad_accum, self.seed, self.precision = reuse, grad_accum, seed, precision
        limit = policy.config.max_seq_len - 1
        self.prompt_ids = [encode_chat(tokenizer, p["messages"])[-limit:] for p in prompts]
        self.eos = list(getattr(tokenizer, "eos_ids", None) or [])
        self.k, self.sampled, self.epoch, self.position = 0, 0, 0, 0
        self._order = epoch_order(len(prompts), seed, 0)
        self._cache: list[dict] = []
        self._saved: list[dict] | None = None
        self.sample_seconds, self._t0 = 0.0, time.perf_counter()

    def __iter__(self) -> Rollouts:
        return self

    def __next__(self) -> dict:
        phase = self.k % (self.grad_accum * self.reuse)
        if phase == 0:
            self._cache = [self._sample() for _ in range(self.grad_accum)]
            self._saved = None  # its JSON form, made once when a checkpoint first needs it
        self.k += 1
        return self._cache[phase % self.grad_accum]

    # ---- one rollout ---------------------------------------------------------------------------------

    def _next_prompts(self) -> list[int]:
        idx = []
        while len(idx) < self.P:
            if self.position >= len(self.prompts):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = epoch_order(len(self.prompts), self.seed, self.epoch)
            take = self._order[self.position:self.position + self.P - len(idx)]
            idx += take
            self.position += len(take)
        return idx

    @torch.no_grad()
    def _sample(self) -> dict:
        from ..decoding import GenerationConfig, generate_ids

        t0 = time.perf_counter()
        idx = self._next_prompts()
        config = GenerationConfig(strategy="sample", temperature=self.temperature, top_p=self.top_p,
                                  max_new_tokens=self.max_new_tokens, num_return_sequences=self.G,
                                  seed=(self.seed * 1_000_003 + self.sampled) % 2**62, eos_ids=self.eos)
        self.sampled += 1
        was_training = self.policy.training
        self.policy.eval()
        try:
            comps = generate_ids(self.policy, [self.prompt_ids[i] for i in idx], config,
                                 decode=lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True),
                                 precision=self.precision)
        finally:
            self.policy.train(was_training)
        items = [self.prompts[idx[c.prompt_index]] for c in comps]
        texts = [c.text for c in comps]
        rewards = self.reward(items, texts)
        if len(rewards) != len(comps):
            raise LmsmithError(f"the reward function returned {len(rewards)} values for {len(comps)} responses")
        truncated = [c.finish_reason == "length" for c in comps]
        rewards = [r - self.penalty * t for r, t in zip(rewards, truncated)]
        adv = group_advantages(torch.tensor(rewards).view(self.P, self.G), self.baseline, self.scale).view(-1)
        batch = self._layout(idx, comps, adv)
        checked = [exact_match(t, it["answer"]) for t, it in zip(texts, items) if it["answer"] is not None]
        self.sample_seconds += time.perf_counter() - t0
        stats = {"reward": sum(rewards) / len(rewards),
                 "length": sum(len(c.ids) + (c.eos_token is not None) for c in comps) / len(comps),
                 "truncated": sum(truncated) / len(comps),
                 "sampling": self.sample_seconds / max(time.perf_counter() - self._t0, 1e-9)}
        if checked:
            stats["accuracy"] = sum(checked) / len(checked)
        if self.reuse > 1:
            batch["old_logp"] = self._logp(batch)
        return {**batch, "stats": stats}

    def _layout(self, idx: list[int], comps, adv: torch.Tensor) -> dict:
        items = []
        for c in comps:
            prompt = self.prompt_ids[idx[c.prompt_index]]
            response = c.ids + ([c.eos_token] if c.eos_token is not None else [])
            items.append({"input_ids": (prompt + response)[:-1],
                          "labels": [IGNORE_INDEX] * (len(prompt) - 1) + response})
        return {**collate(items, pad_id_of(self.tokenizer)), "advantages": adv, "temperature": self.temperature}

    def _logp(self, batch: dict) -> torch.Tensor:
        from ..precision import autocast

        device = self.policy.model.norm.weight.device
        with autocast(self.precision or "fp32", device):
            nll = self.policy(batch["input_ids"].to(device), labels=batch["labels"].to(device), reduction="none",
                              temperature=self.temperature)
        return (-nll).float().cpu()

    # ---- resume ----------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        state = {"k": self.k, "sampled": self.sampled, "epoch": self.epoch, "position": self.position,
                 "seed": self.seed, "n": len(self.prompts), "cache": None}
        if self.k % (self.grad_accum * self.reuse):  # a rollout still in use: keep it, the weights moved on
            if self._saved is None:  # (the loop asks after every step; the rollout changes once per reuse)
                self._saved = [{k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in b.items()}
                               for b in self._cache]
            state["cache"] = self._saved
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("n") != len(self.prompts):
            raise LmsmithError(f"the checkpoint sampled from {state.get('n')} prompts, this prompts file has "
                               f"{len(self.prompts)}; resume with the same --prompts")
        self.k, self.sampled = int(state["k"]), int(state["sampled"])
        self.epoch, self.position, self.seed = int(state["epoch"]), int(state["position"]), int(state["seed"])
        self._order = epoch_order(len(self.prompts), self.seed, self.epoch)
        dtypes = {"input_ids": torch.long, "labels": torch.long, "advantages": torch.float32,
                  "old_logp": torch.float32}
        self._saved = state.get("cache")
        self._cache = [{k: (torch.tensor(v, dtype=dtypes[k]) if k in dtypes else v) for k, v in b.items()}
                       for b in self._saved or []]
