"""Beam search, step for step as transformers 5.x `GenerationMixin._beam_search` does it.

Reproducing transformers exactly (same hypotheses, same order) means keeping its
particular rules, which are not the textbook ones:

- each step keeps the top `max(2, 1 + n_eos) * num_beams` candidates over all beams,
  so enough non-finished ones remain to continue;
- only a candidate among the top `num_beams` may become a finished hypothesis;
- a finished hypothesis scores sum(logprobs) / generated_len ** length_penalty, where
  generated_len counts new tokens (EOS included) after the padded prompt;
- `early_stopping`: True stops once num_beams hypotheses are finished; False stops when
  the best running beam, scored at the current length, cannot beat the worst finished
  one; "never" scores it at max_length when length_penalty > 0;
- scores of removed candidates are pushed down by -1e9, not -inf, and the search ends
  at max_length = padded prompt + max_new_tokens.

Penalties (repetition, frequency/presence, no-repeat-ngram) are applied to the
log-probabilities, as transformers applies its processors there in beam search.

Our one deliberate difference: the prompt is prefilled once per prompt (not once per
beam) and the cache is copied to the beams, which is the same arithmetic and faster.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from . import sampling
from .config import GenerationConfig
from .engine import Completion, _left_pad, _precision_context, check_prompts, model_device


def _gather_beams(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tensor (B, N, ...) gathered along dim 1 by index (B, M) -> (B, M, ...)."""
    while index.dim() < tensor.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(tensor, index, dim=1)


@torch.inference_mode()
def beam_search(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig,
    *,
    decode: Callable[[list[int]], str] | None = None,
    precision: str | None = None,
) -> list[Completion]:
    """Beam search over a batch of prompts (token ids), matching transformers' `generate(num_beams=...)`.

    Args:
        model: a `Transformer`.
        prompts: B lists of token ids.
        config: strategy "beam"; num_beams, length_penalty, early_stopping, num_return_sequences,
            max_new_tokens, eos_ids and the penalties are used. Stop strings cut the final text.
        decode: ids -> text (fills `Completion.text`; needed for stop strings).
        precision: None/"fp32" or an `lmsmith.precision` policy.

    Returns:
        B * num_return_sequences Completions, prompt-major, best hypothesis first; `score` is the
        length-penalised log-probability.
    """
    cfg = model.config
    device = model_device(model)
    prompts = check_prompts(prompts, cfg.max_seq_len)
    B, nrs = len(prompts), config.num_return_sequences
    lens = [len(p) for p in prompts]
    P = max(lens)
    max_new = min(config.max_new_tokens, cfg.max_seq_len - max(lens))
    if max_new <= 0:
        return [Completion([], "length", "" if decode else None, i) for i in range(B) for _ in range(nrs)]
    with _precision_context(precision, device):
        seqs, scores, gen_lens = _search(model, prompts, config, P, max_new, device)
    eos = set(config.eos_ids or ())
    out = []
    for b in range(B):
        for j in range(nrs):
            toks = seqs[b, j, P:P + gen_lens[b][j]].tolist()
            reason = "length"
            if toks and toks[-1] in eos:
                toks, reason = toks[:-1], "eos"
            text = None
            if decode is not None:
                text = decode(toks)
                cuts = [i for i in (text.find(s) for s in (config.stop or ())) if i >= 0]
                if cuts:
                    text, reason = text[:min(cuts)], "stop"
            out.append(Completion(toks, reason, text, b, float(scores[b, j])))
    return out


def _penalise(log_probs: torch.Tensor, seqs: torch.Tensor, P: int, cur_len: int, pad: torch.Tensor,
              config: GenerationConfig) -> torch.Tensor:
    """Apply the penalties to flat log-probs (B*nb, V) given running sequences (B*nb, max_len)."""
    V = log_probs.shape[-1]
    hist = seqs[:, :cur_len]
    real = torch.arange(cur_len, device=seqs.device)[None, :] >= pad[:, None]  # not left padding
    if config.repetition_penalty != 1.0:
        # Padding goes to an extra column V that is dropped (as transformers' processor does).
        idx = hist.masked_fill(~real, V)
        seen = torch.zeros(hist.shape[0], V + 1, dtype=torch.bool, device=seqs.device)
        seen.scatter_(1, idx, True)
        log_probs = sampling.apply_repetition_penalty(log_probs, seen[:, :V], config.repetition_penalty)
    if config.frequency_penalty != 0.0 or config.presence_penalty != 0.0:
        gen = hist[:, P:]
        counts = torch.zeros(hist.shape[0], V, dtype=torch.int32, device=seqs.device)
        counts.scatter_add_(1, gen, torch.ones_like(gen, dtype=torch.int32))
        log_probs = sampling.apply_frequency_presence_penalty(log_probs, counts, config.frequency_penalty,
                                                              config.presence_penalty)
    if config.no_repeat_ngram_size > 0:
        pads = pad.tolist()
        rows = [row[p:] for row, p in zip(hist.tolist(), pads)]
        banned = [sampling.banned_ngram_tokens(r, config.no_repeat_ngram_size) for r in rows]
        log_probs = sampling.ban_tokens_(log_probs.clone(), banned)
    return log_probs


def _search(model, prompts, config: GenerationConfig, P: int, max_new: int, device):
    B, nb = len(prompts), config.num_beams
    eos_ids = list(config.eos_ids or ())
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device) if eos_ids else None
    early_stopping, length_penalty = config.early_stopping, config.length_penalty
    max_length = P + max_new
    beams_to_keep = max(2, 1 + len(eos_ids)) * nb
    top_num_beam_mask = torch.cat((torch.ones(nb, dtype=torch.bool), torch.zeros(beams_to_keep - nb, dtype=torch.bool)))
    top_num_beam_mask = top_num_beam_mask.to(device)

    ids, mask, positions = _left_pad(prompts, max_length, device)  # (B, P)
    running_sequences = torch.zeros(B, nb, max_length, dtype=torch.long, device=device)
    running_sequences[:, :, :P] = ids[:, None]
    sequences = running_sequences.clone()
    running_beam_scores = torch.zeros(B, nb, dtype=torch.float, device=device)
    running_beam_scores[:, 1:] = -1e9  # only the first beam's tokens count at step one
    beam_scores = torch.full((B, nb), -1e9, dtype=torch.float, device=device)
    is_sent_finished = torch.zeros(B, nb, dtype=torch.bool, device=device)
    heuristic_unsatisfied = torch.ones(B, 1, dtype=torch.bool, device=device)
    running_beam_indices = torch.full((B, nb, max_new), -1, dtype=torch.int32, device=device)
    beam_indices = running_beam_indices.clone()
    batch_offset = torch.arange(B, device=device)[:, None] * nb

    # Prefill each prompt once, then copy its keys/values to its beams.
    cache = model.make_cache(B * nb, max_length, device=device)
    logits = model(ids, positions=positions, attention_mask=mask, cache=cache.rows(0, B), last_only=True)[:, -1].float()
    cache.reorder(torch.arange(B, device=device).repeat_interleave(nb))  # row b*nb + j: prompt b
    logits = logits.repeat_interleave(nb, dim=0)  # (B*nb, V)
    pad = torch.tensor([P - len(p) for p in prompts], device=device).repeat_interleave(nb)
    beam_mask = mask.repeat_interleave(nb, dim=0) if mask is not None else None
    pos = torch.tensor([len(p) for p in prompts], device=device).repeat_interleave(nb)[:, None]
    penalties = config.has_penalties

    cur_len = P
    while True:
        V = logits.shape[-1]
        log_probs = F.log_softmax(logits, dim=-1)
        if penalties:
            log_probs = _penalise(log_probs, running_sequences.view(B * nb, -1), P, cur_len, pad, config)
        log_probs = log_probs.view(B, nb, V) + running_beam_scores[:, :, None]
        log_probs = log_probs.reshape(B, nb * V)

        # c. the top candidates over all beams
        topk_log_probs, topk_indices = torch.topk(log_probs, k=beams_to_keep)
        topk_current_beam = topk_indices // V
        topk_running_beam_indices = _gather_beams(running_beam_indices, topk_current_beam)
        topk_running_sequences = _gather_beams(running_sequences, topk_current_beam)
        topk_ids = topk_indices % V
        topk_running_sequences[:, :, cur_len] = topk_ids
        topk_running_beam_indices[:, :, cur_len - P] = (topk_current_beam + batch_offset).to(torch.int32)

        # d. which candidates end here (EOS, or max_length reached)
        hits = torch.full_like(topk_ids, cur_len + 1 >= max_length, dtype=torch.bool)
        if eos is not None:
            hits = hits | torch.isin(topk_ids, eos)

        # e. the best unfinished candidates continue
        topk_running_log_probs = topk_log_probs + hits.to(torch.float32) * -1.0e9
        next_topk = torch.topk(topk_running_log_probs, k=nb)[1]
        running_sequences = _gather_beams(topk_running_sequences, next_topk)
        running_beam_scores = _gather_beams(topk_running_log_probs, next_topk)
        running_beam_indices = _gather_beams(topk_running_beam_indices, next_topk)

        # f. merge newly finished hypotheses into the finished set
        did_finish = hits & top_num_beam_mask[None, :]
        fin_scores = topk_log_probs / ((cur_len + 1 - P) ** length_penalty)
        full = torch.all(is_sent_finished, dim=-1, keepdim=True) & (early_stopping is True)
        fin_scores += full.to(torch.float32) * -1.0e9
        fin_scores += (~heuristic_unsatisfied).to(torch.float32) * -1.0e9
        fin_scores += (~did_finish) * -1.0e9
        merged_sequences = torch.cat((sequences, topk_running_sequences), dim=1)
        merged_scores = torch.cat((beam_scores, fin_scores), dim=1)
        merged_beam_indices = torch.cat((beam_indices, topk_running_beam_indices), dim=1)
        merged_finished = torch.cat((is_sent_finished, did_finish), dim=1)
        keep = torch.topk(merged_scores, k=nb)[1]
        sequences = _gather_beams(merged_sequences, keep)
        beam_scores = _gather_beams(merged_scores, keep)
        beam_indices = _gather_beams(merged_beam_indices, keep)
        is_sent_finished = _gather_beams(merged_finished, keep)

        # g. stopping rule for the whole search
        cur_len += 1
        if early_stopping == "never" and length_penalty > 0.0:
            best_len = max_length - P
        else:
            best_len = cur_len - P
        best_running = running_beam_scores[:, :1] / (best_len ** length_penalty)
        worst_finished = torch.where(is_sent_finished, torch.min(beam_scores, dim=1, keepdim=True)[0], -1.0e9)
        heuristic_unsatisfied = heuristic_unsatisfied & torch.any(best_running > worst_finished, dim=-1,
                                                                  keepdim=True)
        go_on = (bool(heuristic_unsatisfied.any())
                 and not (bool(is_sent_finished.all()) and early_stopping is True)
                 and not bool(hits.all()))
        if not go_on:
            break

        # a. forward the surviving beams' last tokens with their caches
        beam_idx = running_beam_indices[:, :, cur_len - 1 - P].reshape(-1).long()
        cache.reorder(beam_idx)
        last = running_sequences[:, :, cur_len - 1].reshape(B * nb, 1)
        if beam_mask is None:
            logits = model(last, cache=cache)[:, -1].float()
        else:
            logits = model(last, positions=pos, attention_mask=beam_mask, cache=cache)[:, -1].float()
            pos += 1

    nrs = config.num_return_sequences
    gen_lens = (beam_indices[:, :nrs] + 1).bool().sum(dim=-1)  # (B, nrs) generated length per hypothesis
    return sequences[:, :nrs], beam_scores[:, :nrs], gen_lens.tolist()
