"""`lmsmith eval MODEL --data FILE...`: perplexity and bits per byte on held-out text."""

from __future__ import annotations

import json
import time
from pathlib import Path

HELP = "perplexity and bits per byte of a model on held-out text; exact-match accuracy on tasks"
DESCRIPTION = """Perplexity and bits per byte of MODEL (an HF directory or .gguf file) on text.

Each --data path is a text file (one document), a folder (its text files), or a
.jsonl/.jsonl.gz file (one document per line, field --text-field). Texts longer
than the window are scored with a sliding window: windows of --seq-len tokens
advance by --stride, so every token is predicted once with at least
seq_len - stride tokens of context. Bits per byte is comparable across
tokenizers; perplexity only between models sharing a tokenizer.

--tasks FILE (instruction data with answers, e.g. heldout.jsonl from `lmsmith data
synth`) reports the exact-match accuracy of greedy answers under the chat
template (compared after strip), per task, with a few examples.

--preferences FILE (pairs {"prompt", "chosen", "rejected"}, e.g. preference.jsonl) reports
how often MODEL ranks the chosen response higher: a reward model (`lmsmith finetune
--objective reward`) by its score, a language model by the response's log-probability."""


def add_arguments(p) -> None:
    from .generate import add_packed_argument

    p.add_argument("model", help="model directory (or .gguf file)")
    p.add_argument("--data", nargs="+", metavar="PATH", help="text files, folders or .jsonl files")
    p.add_argument("--tasks", metavar="FILE", help="instruction data with answers (e.g. from `lmsmith data synth`): "
                                                   "exact-match accuracy of greedy answers, per task")
    p.add_argument("--preferences", metavar="FILE", help="preference pairs: how often the model ranks chosen above "
                                                         "rejected (a reward model by score, an LM by log-probability)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="answer length limit for --tasks (default: 32)")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text)")
    p.add_argument("--seq-len", type=int, default=None, help="window length in tokens (default: model context)")
    p.add_argument("--stride", type=int, default=None, help="window advance in tokens (default: seq-len / 2)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default: 8)")
    p.add_argument("--dtype", default="fp32", choices=["auto", "fp32", "bf16"],
                   help="compute precision (default: fp32, exact)")
    p.add_argument("--max-docs", type=int, default=None, help="score at most this many documents")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--adapter", default=None, metavar="DIR", help="LoRA, prompt or prefix adapter (peft format)")
    add_packed_argument(p)


def run(args) -> int:
    from ..data.sources import Source, iter_documents
    from ..decoding.layout import use_decode_layout
    from ..errors import LmsmithError
    from ..eval import perplexity
    from .generate import load_model

    if not (args.data or args.tasks or args.preferences):
        raise LmsmithError("give --data PATH (perplexity on text), --tasks FILE (exact-match accuracy) or "
                           "--preferences FILE (preference accuracy)")
    for path in args.data or ():  # before the model loads: a typo should not cost a model load
        if not Path(path).exists():
            raise LmsmithError(f"--data {path}: no such file or folder; give held-out text files, folders or .jsonl")
    model, tokenizer = load_model(args)
    if hasattr(model, "score") and (args.data or args.tasks):
        raise LmsmithError(f"{args.model} is a reward model: it scores responses (--preferences FILE) but has no "
                           "LM head for --data or --tasks")
    if args.preferences:
        if args.adapter:
            from ..adapters import load_adapter

            model = load_adapter(model, args.adapter, tokenizer)
            args.adapter = None
        _preferences(model, tokenizer, args)
        if not (args.data or args.tasks):
            return 0
    if args.adapter:
        from ..adapters import load_adapter

        model = load_adapter(model, args.adapter, tokenizer)
    use_decode_layout(model)  # --tasks decodes answers token by token
    if args.tasks:
        _tasks(model, tokenizer, args)
        if not args.data:
            return 0
    texts = []
    for path in args.data:
        for _, text in iter_documents(Source(name="eval", path=path), text_field=args.text_field):
            if text.strip():
                texts.append(text)
            if args.max_docs and len(texts) >= args.max_docs:
                break
    if not texts:
        raise LmsmithError(f"no text found in {', '.join(args.data)}")
    t0 = time.time()
    try:
        result = perplexity(model, tokenizer, texts, seq_len=args.seq_len, stride=args.stride,
                            batch_size=args.batch_size, dtype_policy=args.dtype)
    except ValueError as e:
        raise LmsmithError(str(e)) from None
    if args.json:
        print(json.dumps(result.as_dict()))
        return 0
    print(f"{args.model}: perplexity {result.perplexity:.3f} · loss {result.loss:.4f} nats/token · "
          f"{result.bits_per_byte:.4f} bits/byte over {result.tokens:,} tokens "
          f"({result.bytes:,} bytes, {result.texts} documents) in {time.time() - t0:.1f}s")
    return 0


def _preferences(model, tokenizer, args) -> None:
    """Preference accuracy on --preferences, overall and per task."""
    from ..data.instruct import read_examples
    from ..errors import LmsmithError
    from ..eval.preferences import preference_accuracy

    examples, stats = read_examples(args.preferences)
    if stats.format != "preference":
        raise LmsmithError(f"--preferences {args.preferences}: needs pairs {{prompt, chosen, rejected}}, got "
                           f"format '{stats.format}'")
    if args.max_docs:
        examples = examples[: args.max_docs]
    t0 = time.time()
    result = preference_accuracy(model, tokenizer, examples, batch_size=args.batch_size)
    if args.json:
        print(json.dumps(result))
        return
    how = "reward" if result["by"] == "reward" else "response log-probability"
    print(f"{args.model}: preference accuracy {result['accuracy']:.1%} ({result['correct']}/{result['total']}) by "
          f"{how}, mean margin {result['margin']:.3f}, on {args.preferences} in {time.time() - t0:.1f}s")
    for task, d in result["per_task"].items():
        print(f"  {task:<12} {d['accuracy']:7.1%}  ({d['correct']}/{d['total']})")


def _tasks(model, tokenizer, args) -> None:
    """Exact-match accuracy on --tasks: overall, per task, and a few examples (mistakes first)."""
    from ..data.instruct import read_examples
    from ..data.synth import heldout_warning
    from ..eval.tasks import format_accuracy, task_accuracy

    examples, _ = read_examples(args.tasks)
    if args.max_docs:
        examples = examples[: args.max_docs]
    note = heldout_warning(examples, args.tasks)
    t0 = time.time()
    result = task_accuracy(model, tokenizer, examples, max_new_tokens=args.max_new_tokens)
    if args.json:
        print(json.dumps({**result, "note": note} if note else result))
        return
    print(f"{args.model}: exact-match accuracy {format_accuracy(result)} on {args.tasks} in {time.time() - t0:.1f}s")
    if note:
        print(note)
    for task, d in result["per_task"].items():
        print(f"  {task:<12} {d['accuracy']:7.1%}  ({d['correct']}/{d['total']})")
    for ex in result["examples"]:
        mark = "ok " if ex["correct"] else "bad"
        print(f"  [{mark}] {ex['prompt']!r} -> {ex['got']!r} (expected {ex['expected']!r})")
