"""`lmsmith probs MODEL --prompt TEXT`: the table of the most likely next tokens, step by step.

The model's output is a probability distribution over the vocabulary; this shows
its top k rows. With --steps N the most likely token is appended and the table
shown again, N times (greedy decoding, slowed down to be watched). With
--temperature T a second column shows softmax(logits / T) next to T=1: the same
ranking, sharpened (T < 1) or flattened (T > 1). For a prompt the built-in stories
grammar can produce ("The cat sat on the"), the grammar's exact next-word probabilities
and KL(true || model) are printed under each table.
"""

from __future__ import annotations

import argparse

HELP = "the table of the most likely next tokens, step by step"
DESCRIPTION = __doc__.split("\n", 2)[2].strip() if __doc__ else HELP


def add_arguments(p) -> None:
    from .generate import add_packed_argument

    p.add_argument("model", help="model directory (or .gguf file)")
    p.add_argument("--prompt", required=True, help="the text whose next token is predicted")
    p.add_argument("--top", type=int, default=5, help="rows in the table (default: 5)")
    p.add_argument("--temperature", type=float, default=None, help="also show softmax(logits / T) next to T=1")
    p.add_argument("--steps", type=int, default=1, help="append the greedy token and repeat, N tables (default: 1)")
    p.add_argument("--plot", default=None, metavar="PNG", help="write a bar chart of the tables to this PNG")
    p.add_argument("--compare-truth", action=argparse.BooleanOptionalAction, default=None,
                   help="for a prompt from the stories grammar (`data synth --task stories`, in the built-in "
                        "corpus): the model's probability of each next word beside the grammar's exact one, and the "
                        "KL (default: shown whenever the prompt is one the grammar can produce)")
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: the best available)")
    add_packed_argument(p)
    p.add_argument("--adapter", default=None, metavar="DIR", help="LoRA, prompt or prefix adapter (peft format)")


def show_token(text: str) -> str:
    """Token text with whitespace and control characters visible (repr without the outer quotes noise)."""
    return repr(text)


def run(args) -> int:
    import torch

    from ..decoding import encode_prompt
    from ..decoding.engine import check_prompts, model_device
    from ..errors import LmsmithError
    from .generate import load_for_generation

    if args.top < 1:
        raise LmsmithError(f"--top {args.top} must be >= 1")
    if args.steps < 1:
        raise LmsmithError(f"--steps {args.steps} must be >= 1")
    if args.temperature is not None and args.temperature <= 0:
        raise LmsmithError(f"--temperature {args.temperature} must be > 0 to show a distribution")
    if args.plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot  # noqa: F401
        except ImportError:
            raise LmsmithError("--plot needs matplotlib: pip install matplotlib") from None
    model, tokenizer = load_for_generation(args)
    ids = encode_prompt(tokenizer, args.prompt)
    T = args.temperature
    show_t = T is not None and T != 1.0
    tables = []
    text = args.prompt
    # Auto: the truth is shown when the grammar can produce the prompt; --compare-truth asks even when it cannot
    # (and says why there is none), --no-compare-truth never shows it.
    compare = args.compare_truth if args.compare_truth is not None else _truth(text) is not None
    for step in range(args.steps):
        check_prompts([ids], model.config.max_seq_len)
        with torch.inference_mode():
            logits = model(torch.tensor([ids], device=model_device(model)), last_only=True)[0, -1].float()
        p1 = logits.softmax(-1)
        pt = (logits / T).softmax(-1) if show_t else None
        top = torch.topk(p1, min(args.top, p1.shape[-1]))
        rows = []
        for i, p in zip(top.indices.tolist(), top.values.tolist()):
            rows.append((show_token(tokenizer.decode([i])), p, float(pt[i]) if show_t else None, i))
        tables.append((text, rows, _truth(text) if compare else None))
        print(f"{'step ' + str(step + 1) + ': ' if args.steps > 1 else ''}{text!r}")
        head = f"  {'#':>3}  {'token':<20} {'p(T=1)':>9}" + (f" {f'p(T={T:g})':>10}" if show_t else "")
        print(head)
        for r, (tok, p, q, _) in enumerate(rows, 1):
            line = f"  {r:>3}  {tok:<20} {p * 100:>8.2f}%"
            if show_t:
                line += f" {q * 100:>9.2f}%"
            print(line)
        print("  " + ", ".join(f"{tok} {p * 100:.2f}%" for tok, p, _, _ in rows))
        if compare:
            _print_truth(model, tokenizer, text, args.top)
        if step + 1 < args.steps:
            nxt = rows[0][3]
            ids = ids + [nxt]
            text = text + tokenizer.decode([nxt])
            print(f"  -> appending {rows[0][0]}\n")
    if args.plot:
        _plot(tables, T if show_t else None, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _truth(text: str) -> dict[str, float] | None:
    from ..data.stories import true_next_word

    try:
        return true_next_word(text)
    except ValueError:
        return None


def _print_truth(model, tokenizer, text: str, top: int) -> None:
    from ..eval.truth import compare_with_truth

    try:
        rows, kl, mass = compare_with_truth(model, tokenizer, text)
    except ValueError as e:
        print(f"  (no true distribution: {e})")
        return
    print(f"  {'':>3}  {'next word':<20} {'true p':>9} {'model p':>9}")
    for r, (word, p, q) in enumerate(rows[:top], 1):
        print(f"  {r:>3}  {word!r:<20} {p * 100:>8.2f}% {q * 100:>8.2f}%")
    if len(rows) > top:
        print(f"  ... {len(rows) - top} more words the grammar allows")
    print(f"  KL(true || model) = {kl:.3f} nats; the model puts {mass * 100:.1f}% of its probability on "
          f"the {len(rows)} words the grammar allows here")


def _word(shown: str) -> str:
    """A table's token (as `show_token` wrote it) as a stories word: no quotes, no leading space."""
    import ast

    text = ast.literal_eval(shown).removeprefix(" ")
    return "<end>" if text == "<|endoftext|>" else text


def _plot(tables, T, path) -> None:
    import matplotlib.pyplot as plt

    n = len(tables)
    shown = tables[:12]  # more panels than this are unreadable
    fig, axes = plt.subplots(len(shown), 1, figsize=(8, 2.6 * len(shown)), squeeze=False)
    for ax, (text, rows, truth) in zip(axes[:, 0], shown):
        labels = [tok for tok, *_ in rows]
        x = range(len(rows))
        w = 0.4 if T is not None else 0.8
        ax.bar([i - (w / 2 if T is not None else 0) for i in x], [p for _, p, _, _ in rows], width=w, label="T=1")
        if T is not None:
            ax.bar([i + w / 2 for i in x], [q for _, _, q, _ in rows], width=w, label=f"T={T:g}")
        if truth is not None:  # the stories grammar's exact probability of each shown token's word
            known = [(i, truth[word]) for i, word in zip(x, (_word(tok) for tok, *_ in rows)) if word in truth]
            ax.scatter([i for i, _ in known], [p for _, p in known], marker="_", s=900, color="black",
                       linewidths=2, zorder=3, label="true (grammar)")
        if T is not None or truth is not None:
            ax.legend()
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("probability")
        title = text if len(text) <= 60 else "..." + text[-57:]
        ax.set_title(repr(title), fontsize=9)
    if n > len(shown):
        fig.suptitle(f"first {len(shown)} of {n} steps")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
