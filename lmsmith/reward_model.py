"""A reward model: the decoder with a scalar head, scored at a sequence's last token.

    rm = RewardModel.from_causal_lm(model)          # a fine-tuned LM's backbone + a fresh score head
    rm(input_ids (B, T), attention_mask=(B, T)) -> (B,) fp32 rewards
    score(rm, tokenizer, "What is 2 + 2?", "4") -> float
    score_batch(rm, tokenizer, prompts, responses) -> [float, ...]

It is Hugging Face's `LlamaForSequenceClassification` (`Qwen2...`, `Mistral...`) with one
label: the same parameter names (`model.*` and `score.weight`), the same rule for the scored
position (the rightmost token that is not padding), so a saved directory loads in transformers
and scores identically. A (prompt, response) pair is rendered with the model's chat template
as one user turn and one assistant turn, cut after the response's end-of-turn token: that token
is the one scored, in training (`train.reward`) and here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .config import ModelConfig
from .model import Transformer

__all__ = ["RewardModel", "reward_ids", "score", "score_batch"]


class RewardModel(Transformer):
    """The decoder (`model.*`) and a bias-free `score` head (D -> 1) instead of the LM head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        del self.lm_head
        self.score = nn.Linear(cfg.dim, 1, bias=False)

    def tie_weights(self) -> None:
        """Nothing to tie: there is no LM head."""

    def forward(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                **kwargs) -> torch.Tensor:
        """Rewards (B,) in fp32: the score head at each row's last real token.

        Args:
            input_ids: (B, T) token ids, padded on either side.
            attention_mask: (B, T) with 1 for real tokens; None: every token is real. The scored
                position is the rightmost real token, as transformers' sequence classifiers pick it.
        """
        h = self.hidden_states(input_ids, attention_mask=attention_mask, **kwargs)  # (B, T, D)
        B, T = input_ids.shape
        if attention_mask is None:
            last = torch.full((B,), T - 1, device=h.device)
        else:
            cols = torch.arange(T, device=h.device)
            last = (cols * attention_mask.to(h.device).long()).argmax(dim=1)  # (B,)
        return self.score(h[torch.arange(B, device=h.device), last]).squeeze(-1).float()

    @classmethod
    def from_causal_lm(cls, lm: Transformer, seed: int = 0) -> RewardModel:
        """A reward model sharing `lm`'s decoder modules (no copy) with a new score head drawn
        N(0, init_std), as transformers initialises it."""
        with torch.device("meta"):
            rm = cls(lm.config)
        rm.model = lm.model
        w = lm.model.norm.weight
        rm.score = nn.Linear(lm.config.dim, 1, bias=False, device=w.device, dtype=w.dtype)
        gen = torch.Generator(device=w.device).manual_seed(seed)
        with torch.no_grad():
            rm.score.weight.normal_(0.0, lm.config.init_std, generator=gen)
        rm.reset_buffers()
        return rm.train(lm.training)

    def adapt_hf_config(self, hf: dict) -> dict:
        """config.json of a one-label sequence classifier (written by `checkpoint.save`)."""
        archs = [a.replace("ForCausalLM", "ForSequenceClassification") for a in hf["architectures"]]
        return {**hf, "architectures": archs, "num_labels": 1, "id2label": {"0": "LABEL_0"},
                "label2id": {"LABEL_0": 0}}


def _messages(prompt) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(m) for m in prompt]


def reward_ids(tokenizer, prompt, response: str, max_len: int | None = None) -> list[int]:
    """Token ids a reward model scores for (prompt, response): the chat rendering of the prompt's
    turns and the response as the assistant's, up to and including its end-of-turn token. Longer
    than `max_len`: the last `max_len` ids (the response and its end are what is judged).

    `prompt` is a user message (str) or a list of {"role", "content"} messages."""
    from .data.instruct import tokenize_messages

    ids, target = tokenize_messages(tokenizer, [*_messages(prompt), {"role": "assistant", "content": response}])
    end = max((i for i, t in enumerate(target) if t), default=len(ids) - 1)
    ids = ids[: end + 1]
    return ids[-max_len:] if max_len else ids


@torch.no_grad()
def score_batch(reward_model: RewardModel, tokenizer, prompts: Sequence, responses: Sequence[str], *,
                batch_size: int = 16) -> list[float]:
    """Rewards of each (prompts[i], responses[i]) pair, batched (right-padded)."""
    from .data.instruct import collate, pad_id_of

    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    device = reward_model.model.norm.weight.device
    limit = reward_model.config.max_seq_len
    seqs = [reward_ids(tokenizer, p, r, limit) for p, r in zip(prompts, responses)]
    was_training = reward_model.training
    reward_model.eval()
    out: list[float] = []
    try:
        for s in range(0, len(seqs), batch_size):
            b = collate([{"input_ids": x, "attention_mask": [1] * len(x)} for x in seqs[s:s + batch_size]],
                        pad_id_of(tokenizer))
            out += reward_model(b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device)).tolist()
    finally:
        reward_model.train(was_training)
    return out


def score(reward_model: RewardModel, tokenizer, prompt, response: str) -> float:
    """The reward of one response: `prompt` a user message (str) or a list of chat messages."""
    return score_batch(reward_model, tokenizer, [prompt], [response])[0]
