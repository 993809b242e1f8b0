"""The prompts `lmsmith rl` samples from, with the answers a checker compares against.

    read_prompts(path) -> [{"messages": [...], "answer": str | None, "task": str, "line": int}, ...]

Accepted records (JSONL or a JSON array), the formats finetune reads plus bare prompts:

    {"instruction", "solution"} / {"instruction", "input", "output"}   (lmsmith data synth's files)
    {"messages": [...]}            the last assistant turn, if any, is the answer
    {"prompt": str | messages, "answer"?: str}    ("completion", "solution" or "chosen" also name the answer)
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import LmsmithError


def _messages(value, where: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                 and isinstance(m.get("content"), str) for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise LmsmithError(f"{where}: the prompt must be a string or a list of {{role, content}} messages")


def _record(rec, where: str) -> dict:
    if not isinstance(rec, dict):
        raise LmsmithError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    answer = None
    if "messages" in rec:
        msgs = _messages(rec["messages"], where)
        if msgs[-1]["role"] == "assistant":
            msgs, answer = msgs[:-1], msgs[-1]["content"]
    elif "instruction" in rec:
        text = rec["instruction"] + (f"\n\n{rec['input']}" if rec.get("input") else "")
        msgs = _messages(text, where)
        answer = rec.get("solution", rec.get("output"))
    elif "prompt" in rec:
        msgs = _messages(rec["prompt"], where)
        answer = next((rec[k] for k in ("answer", "solution", "completion", "chosen") if k in rec), None)
    else:
        raise LmsmithError(f"{where}: no prompt; give \"prompt\", \"instruction\" or \"messages\"")
    if not msgs or msgs[-1]["role"] != "user":
        raise LmsmithError(f"{where}: the prompt must end with a user message")
    if answer is not None and not isinstance(answer, str):
        raise LmsmithError(f"{where}: the answer must be a string, got {type(answer).__name__}")
    return {"messages": msgs, "answer": answer, "task": str(rec.get("task", "all"))}


def read_prompts(path: str | os.PathLike) -> list[dict]:
    """Every prompt of `path` (see the module docstring); a bad record is a one-line error naming its line."""
    from ..data.instruct import records

    path = Path(path)
    if not path.exists():
        raise LmsmithError(f"{path}: no such prompts file (JSONL: one {{\"prompt\", \"answer\"}} per line)")
    out = []
    for line, rec, error in records(path):
        where = f"{path}:{line}"
        if error:
            raise LmsmithError(f"{where}: {error}")
        out.append({**_record(rec, where), "line": line})
    if not out:
        raise LmsmithError(f"{path}: no prompts")
    return out


def prompt_text(item: dict):
    """What reward functions see as the prompt: the user's message (str) for a single-turn prompt,
    else the list of messages."""
    msgs = item["messages"]
    return msgs[0]["content"] if len(msgs) == 1 else [dict(m) for m in msgs]
