"""`GenerationConfig`: how to choose the next token, and when to stop.

One validated dataclass for every strategy. Invalid combinations fail in
`__post_init__` with an `LmsmithError` that names the field and the fix, so a
typo never silently decodes with the wrong strategy.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ..errors import LmsmithError

STRATEGIES = ("greedy", "beam", "sample", "top_k", "top_p", "min_p")
SAMPLING_STRATEGIES = ("sample", "top_k", "top_p", "min_p")
# The value a named strategy uses for its own filter when the field is left unset.
STRATEGY_DEFAULTS = {"top_k": ("top_k", 40), "top_p": ("top_p", 0.9), "min_p": ("min_p", 0.05)}


@dataclass
class GenerationConfig:
    """How to decode.

    Attributes:
        strategy: "greedy" (argmax), "beam" (beam search, as transformers does it),
            "sample" (sample from the softmax, optionally filtered by any of top_k/top_p/min_p),
            "top_k" / "top_p" / "min_p" (sampling with that filter; defaults 40 / 0.9 / 0.05).
        temperature: sampling uses softmax(logits / T). T=0 means greedy; negative is an error.
            Greedy and beam search ignore it (argmax does not depend on T > 0).
        top_k: keep only the k most likely tokens (sampling).
        top_p: keep the smallest set of most likely tokens whose mass reaches p, p in (0, 1].
        min_p: keep tokens whose probability is at least min_p * (the top probability), in [0, 1].
        num_beams: beams for strategy "beam".
        length_penalty: beam search scores finished hypotheses by sum(logprobs) / generated_len ** lp.
        early_stopping: beam search stop rule, as in transformers: True (stop when num_beams
            hypotheses are finished), False (stop when no running beam can beat them, by a
            heuristic), "never" (only stop when that is certain).
        num_return_sequences: beams returned per prompt (beam), or samples per prompt (sampling).
        repetition_penalty: > 1 discourages tokens already in the prompt or output (HF/CTRL rule:
            positive logits divided by it, negative multiplied).
        frequency_penalty: subtract penalty * count(token in the output so far) (OpenAI rule).
        presence_penalty: subtract penalty once for every token that occurs in the output (OpenAI rule).
        no_repeat_ngram_size: forbid any n-gram of this size from occurring twice (prompt included).
        max_new_tokens: the most tokens generated per sequence.
        stop: strings that end generation; the output is cut before the stop string.
        eos_ids: token ids that end generation; None takes the tokenizer's `eos_ids`.
        seed: seeds a private torch.Generator, so sampling is reproducible and global RNG untouched.
    """

    strategy: str = "greedy"
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    no_repeat_ngram_size: int = 0
    max_new_tokens: int = 64
    stop: list[str] | None = None
    eos_ids: list[int] | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise LmsmithError(f"unknown decoding strategy {self.strategy!r}; choose one of: {', '.join(STRATEGIES)}")
        for name in ("temperature", "length_penalty", "repetition_penalty", "frequency_penalty", "presence_penalty",
                     "top_p", "min_p"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value)):
                raise LmsmithError(f"{name} {value!r} must be a finite number")
        if self.temperature is None or self.temperature < 0:
            raise LmsmithError(f"temperature {self.temperature} must be >= 0 (0 means greedy)")
        if self.strategy in STRATEGY_DEFAULTS:
            name, default = STRATEGY_DEFAULTS[self.strategy]
            if getattr(self, name) is None:
                setattr(self, name, default)
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise LmsmithError(f"top_k {self.top_k} must be an integer >= 1")
        if self.top_p is not None and not (0.0 < self.top_p <= 1.0):
            raise LmsmithError(f"top_p {self.top_p} must be in (0, 1]")
        if self.min_p is not None and not (0.0 <= self.min_p <= 1.0):
            raise LmsmithError(f"min_p {self.min_p} must be in [0, 1]")
        filters = [n for n in ("top_k", "top_p", "min_p") if getattr(self, n) is not None]
        if filters and self.strategy in ("greedy", "beam"):
            raise LmsmithError(
                f"{', '.join(filters)} only apply to sampling; strategy {self.strategy!r} is deterministic "
                f"(use strategy 'sample' or '{filters[0]}')"
            )
        if not isinstance(self.num_beams, int) or self.num_beams < 1:
            raise LmsmithError(f"num_beams {self.num_beams} must be an integer >= 1")
        if self.num_beams > 1 and self.strategy != "beam":
            raise LmsmithError(f"num_beams={self.num_beams} needs strategy 'beam' (got {self.strategy!r})")
        if self.strategy == "beam" and self.num_beams < 2:
            # One beam is greedy decoding; asking for beam search means more than one.
            self.num_beams = 4 if self.num_beams == 1 else self.num_beams
        if self.early_stopping not in (True, False, "never"):
            raise LmsmithError(f"early_stopping {self.early_stopping!r} must be True, False or 'never'")
        if not isinstance(self.num_return_sequences, int) or self.num_return_sequences < 1:
            raise LmsmithError(f"num_return_sequences {self.num_return_sequences} must be an integer >= 1")
        if self.strategy == "beam" and self.num_return_sequences > self.num_beams:
            raise LmsmithError(
                f"num_return_sequences {self.num_return_sequences} exceeds num_beams {self.num_beams}; "
                f"beam search returns at most num_beams hypotheses"
            )
        if self.strategy == "greedy" and self.num_return_sequences > 1:
            raise LmsmithError("greedy decoding returns one sequence per prompt; use sampling or beam search "
                               "for num_return_sequences > 1")
        if self.repetition_penalty is None or self.repetition_penalty <= 0:
            raise LmsmithError(f"repetition_penalty {self.repetition_penalty} must be > 0 (1.0 = off)")
        if not isinstance(self.no_repeat_ngram_size, int) or self.no_repeat_ngram_size < 0:
            raise LmsmithError(f"no_repeat_ngram_size {self.no_repeat_ngram_size} must be an integer >= 0 (0 = off)")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise LmsmithError(f"max_new_tokens {self.max_new_tokens} must be an integer >= 0")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None:
            if any(not isinstance(s, str) or not s for s in self.stop):
                raise LmsmithError(f"stop strings must be non-empty strings, got {self.stop!r}")
            self.stop = list(self.stop)
        if isinstance(self.eos_ids, int):
            self.eos_ids = [self.eos_ids]
        if self.eos_ids is not None:
            self.eos_ids = [int(i) for i in self.eos_ids]

    @property
    def is_sampling(self) -> bool:
        """True when tokens are drawn at random (a sampling strategy with temperature > 0)."""
        return self.strategy in SAMPLING_STRATEGIES and self.temperature > 0

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0
                or self.no_repeat_ngram_size > 0)

    def replace(self, **changes: Any) -> GenerationConfig:
        """A validated copy with fields changed; unknown field names are an error."""
        fields = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - fields)
        if unknown:
            raise LmsmithError(f"unknown generation option(s) {', '.join(unknown)}; valid: {', '.join(sorted(fields))}")
        return dataclasses.replace(self, **changes)
