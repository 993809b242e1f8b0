"""Reward functions for `lmsmith rl`: `reward(items, responses) -> [float, ...]`.

    make_reward("exact")              1.0 when the response equals the prompt's answer (after strip), else 0.0
    make_reward("runs/rm/final")      a reward model's score (`finetune --objective reward`)
    make_reward("mymod:fn")           a user's function fn(prompt, response) -> float (also "path/to/file.py:fn");
                                      with a third parameter named `answer` it also receives the answer

`items` are `rl.prompts.read_prompts` records. The prompt a user function sees is the user's
message (a string) for single-turn prompts, else the list of messages. An exception or a
non-finite value is a one-line error naming the prompt and its line.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import sys
from collections.abc import Callable
from pathlib import Path

from ..errors import LmsmithError
from ..eval.tasks import exact_match
from .prompts import prompt_text


def _where(item: dict) -> str:
    text = item["messages"][-1]["content"]
    shown = text if len(text) <= 60 else text[:57] + "..."
    return f"prompt {shown!r} (line {item['line']})"


def _check(value, item: dict, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise LmsmithError(f"--reward {name}: returned {value!r} for {_where(item)}; a reward must be a finite "
                           "number")
    return float(value)


class ExactReward:
    name = "exact"

    def __call__(self, items: list[dict], responses: list[str]) -> list[float]:
        return [float(exact_match(r, it["answer"])) for it, r in zip(items, responses)]


class ModelReward:
    """A reward model's scores (loaded once, kept on the policy's device, eval mode)."""

    def __init__(self, path: str, device=None, batch_size: int = 32):
        from ..loader import load

        model, tokenizer = load(path, device=device)
        if not hasattr(model, "score"):
            raise LmsmithError(f"--reward {path}: a language model, not a reward model (train one with "
                               "`lmsmith finetune MODEL --objective reward --data preference.jsonl`)")
        if tokenizer is None:
            raise LmsmithError(f"--reward {path}: no tokenizer.json; the reward model needs its chat template")
        self.model, self.tokenizer, self.name, self.batch_size = model, tokenizer, path, batch_size

    def __call__(self, items: list[dict], responses: list[str]) -> list[float]:
        from ..reward_model import score_batch

        values = score_batch(self.model, self.tokenizer, [it["messages"] for it in items], responses,
                             batch_size=self.batch_size)
        return [_check(v, it, self.name) for v, it in zip(values, items)]


class FunctionReward:
    """A user's `(prompt, response[, answer]) -> float`."""

    def __init__(self, spec: str):
        module, _, attr = spec.rpartition(":")
        if not module or not attr:
            raise LmsmithError(f"--reward {spec}: give exact, a reward-model directory, or module:function")
        fn = getattr(_import(module, spec), attr, None)
        if not callable(fn):
            raise LmsmithError(f"--reward {spec}: {module} has no function {attr!r}")
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            params = {}
        self.fn, self.name, self.wants_answer = fn, spec, "answer" in params

    def __call__(self, items: list[dict], responses: list[str]) -> list[float]:
        out = []
        for it, r in zip(items, responses):
            try:
                v = self.fn(prompt_text(it), r, answer=it["answer"]) if self.wants_answer else \
                    self.fn(prompt_text(it), r)
            except Exception as e:  # the user's code: any failure is reported with the prompt it failed on
                raise LmsmithError(f"--reward {self.name}: raised {type(e).__name__}: {e} for {_where(it)}") \
                    from None
            out.append(_check(v, it, self.name))
        return out


def _import(module: str, spec: str):
    if module.endswith(".py"):
        path = Path(module)
        if not path.is_file():
            raise LmsmithError(f"--reward {spec}: no such file {path}")
        loaded = importlib.util.spec_from_file_location(path.stem, path)
        mod = importlib.util.module_from_spec(loaded)
        loaded.loader.exec_module(mod)
        return mod
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # modules beside the user's command line, as `python -m` finds them
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise LmsmithError(f"--reward {spec}: cannot import {module} ({e})") from None


def make_reward(spec: str, device=None) -> Callable[[list[dict], list[str]], list[float]]:
    """The reward function `spec` names (see the module docstring)."""
    if spec == "exact":
        return ExactReward()
    if Path(spec).is_dir():
        return ModelReward(spec, device=device)
    if ":" not in spec:
        raise LmsmithError(f"--reward {spec}: no such reward-model directory; give exact, a directory made by "
                           "`lmsmith finetune --objective reward`, or module:function")
    return FunctionReward(spec)
