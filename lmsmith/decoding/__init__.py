"""Text generation: strategies (greedy, beam, sampling with top-k/top-p/min-p), streaming, stop rules.

    from lmsmith.decoding import generate, GenerationConfig
    generate(model, tok, "Once upon a time", strategy="top_p", top_p=0.9, seed=0)

The engine (`engine.py`) and beam search (`beam.py`) work on token ids; this
module is the text edge: it encodes prompts, passes a decode callback for stop
strings and streaming, and returns only the new text.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from ..errors import LmsmithError
from .config import STRATEGIES, GenerationConfig
from .engine import Completion, Engine, Event, Request, generate_ids, model_device, stream_ids
from .sampling import distribution

__all__ = ["STRATEGIES", "Completion", "Engine", "Event", "GenerationConfig", "Request", "distribution", "encode_chat",
           "encode_prompt", "generate", "generate_ids", "generate_stream", "next_token_probs", "resolve_config",
           "stream_ids"]


def resolve_config(tokenizer, config: GenerationConfig | None = None, **overrides) -> GenerationConfig:
    """`config` (default GenerationConfig()) with `overrides` applied and eos_ids from the tokenizer if unset."""
    config = config or GenerationConfig()
    if overrides:
        config = config.replace(**overrides)
    if config.eos_ids is None and tokenizer is not None:
        config = config.replace(eos_ids=list(getattr(tokenizer, "eos_ids", None) or
                                             ([tokenizer.eos_id] if tokenizer.eos_id is not None else [])))
    return config


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Prompt ids: the tokenizer's encoding, with bos first when the tokenizer says prompts start with it."""
    if not isinstance(text, str):
        raise LmsmithError(f"a prompt must be a string, got {type(text).__name__}")
    add_bos = bool(getattr(tokenizer, "add_bos", False)) and tokenizer.bos_id is not None
    ids = tokenizer.encode(text, add_bos=add_bos)
    if not ids and tokenizer.bos_id is not None:
        ids = [tokenizer.bos_id]  # an empty prompt starts from bos (unconditional generation)
    return ids


def encode_chat(tokenizer, messages: list[dict]) -> list[int]:
    """Prompt ids for a conversation: the tokenizer's chat template with the generation prompt.

    Templates of real models often write the bos token themselves; it is added only when the
    tokenizer asks for it and the rendered text does not start with it.
    """
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    bos = getattr(tokenizer, "bos_token", None)
    add_bos = bool(getattr(tokenizer, "add_bos", False)) and not (bos and text.startswith(bos))
    return tokenizer.encode(text, add_bos=add_bos)


def _decoder(tokenizer):
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


def generate(model, tokenizer, prompt_or_prompts: str | Sequence[str], config: GenerationConfig | None = None,
             *, precision: str | None = None, draft=None, draft_tokens: int | None = None, stats: dict | None = None,
             **overrides) -> str | list[str] | list[list[str]]:
    """Generate text; returns only the new text (the prompt is not repeated).

    Args:
        model: a `Transformer`.
        tokenizer: an `lmsmith.Tokenizer` (encode/decode/eos_ids).
        prompt_or_prompts: one prompt or a list of prompts (batched together, left-padded).
        config: a GenerationConfig; keyword `overrides` change its fields (e.g. `max_new_tokens=20`).
        precision: None/"fp32" or an `lmsmith.precision` policy ("auto", "bf16", "fp16").
        draft: speculative decoding: a draft model sharing the tokenizer (e.g. a distilled student) or
            "prompt-lookup"; `draft_tokens` fixes the tokens drafted per step (default adaptive). Greedy
            output is identical to the model alone; sampling keeps its distribution.
        stats: a dict that receives the engine's counters (draft_tokens, draft_accepted, decode_steps, ...).

    Returns:
        A string for one prompt, a list of strings for a list of prompts. With
        `num_return_sequences = n > 1` each prompt's entry is a list of n strings instead.
    """
    config = resolve_config(tokenizer, config, **overrides)
    single = isinstance(prompt_or_prompts, str)
    prompts = [prompt_or_prompts] if single else list(prompt_or_prompts)
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    comps = generate_ids(model, ids, config, decode=_decoder(tokenizer), precision=precision, draft=draft,
                         draft_tokens=draft_tokens, stats=stats)
    n = config.num_return_sequences
    texts: list = [c.text for c in comps]
    if n > 1:
        texts = [texts[i * n:(i + 1) * n] for i in range(len(prompts))]
    return texts[0] if single else texts


def generate_stream(model, tokenizer, prompt: str, config: GenerationConfig | None = None,
                    *, precision: str | None = None, draft=None, draft_tokens: int | None = None,
                    stats: dict | None = None, **overrides) -> Iterator[str]:
    """Yield the new text piece by piece as tokens are produced (one prompt, one sequence).

    Pieces never split a multi-byte character and never contain (the start of) a stop string;
    their concatenation equals `generate(...)` on the same arguments. Beam search yields its
    result in one piece at the end.
    """
    config = resolve_config(tokenizer, config, **overrides)
    if config.num_return_sequences != 1:
        raise LmsmithError("generate_stream makes one sequence; use generate for num_return_sequences > 1")
    ids = [encode_prompt(tokenizer, prompt)]
    if config.strategy == "beam":
        yield generate_ids(model, ids, config, decode=_decoder(tokenizer), precision=precision)[0].text
        return
    for ev in stream_ids(model, ids, config, decode=_decoder(tokenizer), precision=precision, draft=draft,
                         draft_tokens=draft_tokens, stats=stats):
        if ev.text:
            yield ev.text


@torch.inference_mode()
def next_token_probs(model, tokenizer, text: str, k: int = 5, temperature: float = 1.0) -> list[tuple[str, float]]:
    """The k most likely next tokens after `text`, as (token_text, probability), most likely first.

    Probabilities are softmax(logits / temperature) over the whole vocabulary (no filters).
    """
    if k < 1:
        raise LmsmithError(f"k {k} must be >= 1")
    if temperature <= 0:
        raise LmsmithError(f"temperature {temperature} must be > 0 to show a distribution")
    return [(tokenizer.decode([i]), p) for i, p in next_token_table(model, encode_prompt(tokenizer, text), k,
                                                                     temperature)]


def next_token_table(model, ids: list[int], k: int, temperature: float = 1.0) -> list[tuple[int, float]]:
    """(token_id, probability) of the k most likely next tokens after prompt ids."""
    from .engine import check_prompts

    ids = check_prompts([ids], model.config.max_seq_len)[0]
    with torch.inference_mode():
        x = torch.tensor([ids], device=model_device(model))
        logits = model(x, last_only=True)[0, -1].float()
        probs = torch.softmax(logits / temperature, dim=-1)
        top = torch.topk(probs, min(k, probs.shape[-1]))
    return list(zip(top.indices.tolist(), top.values.tolist()))
