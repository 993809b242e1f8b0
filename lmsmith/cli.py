"""`lmsmith <verb>`: one subcommand per recipe module in `lmsmith/recipes/`.

Each recipe module defines `HELP` (one line), `add_arguments(parser)` and
`run(args) -> int | None`. Recipes are imported only when their verb runs, so
`lmsmith --help` stays fast. A mistyped command line (unknown verb or option, a
missing or malformed argument) prints one line and exits 2, as argparse does; bad
input (`LmsmithError`: missing files, bad values or contents) prints one line and
exits 1; an interrupt (Ctrl-C, SIGTERM) exits 130. Never a traceback.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import signal
import sys
import threading

# verb -> (module under lmsmith.recipes, one-line help). Order is the order in --help.
VERBS: dict[str, tuple[str, str]] = {
    "tokenizer": ("tokenizer", "train a byte-level BPE tokenizer on text files"),
    "data": ("data", "prepare token shards from text corpora; make synthetic instruction tasks"),
    "init": ("init", "create a randomly initialised model directory from a preset"),
    "info": ("info", "architecture, parameter counts and memory needs of a model or preset"),
    "plan": ("plan", "memory per GPU and the parallel layouts that fit a training job"),
    "pretrain": ("pretrain", "pretrain a model on raw text (default: the built-in corpus, at most 10 min on CPU)"),
    "eval": ("eval", "perplexity and bits per byte on held-out text; exact-match accuracy on tasks"),
    "generate": ("generate", "generate text with any decoding strategy, streaming; --compare strategies"),
    "probs": ("probs", "the table of the most likely next tokens, step by step"),
    "chat": ("chat", "a multi-turn chat REPL with the model's chat template"),
    "finetune": ("finetune", "fine-tune on instruction or preference data: full, LoRA, prompt or prefix; SFT, DPO, "
                             "or a reward model"),
    "rl": ("rl", "online RL from a reward (GRPO / RLOO): exact match, a reward model, or your function"),
    "distill": ("distill", "distil a teacher into a smaller student (fkl / rkl / jsd); `distill cache` for top-K"),
    "merge": ("merge", "fold a LoRA adapter into the base weights"),
    "quantize": ("quantize", "quantize to f16/bf16/int8 or GGUF (Q8_0, Q4_K_M, Q3_K_M, ...); the quality table"),
    "serve": ("serve", "an OpenAI-compatible server (continuous batching) with a web chat page"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, as argparse does, but without the usage dump
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def parse_args(self, args=None, namespace=None):
        # A mistyped flag is named first (argparse would report a missing required option instead).
        known = _option_strings(self)
        for arg in args or []:
            if arg == "--":
                break
            flag = arg.split("=", 1)[0]
            if flag.startswith("--") and not any(k == flag or (k.startswith(flag) and len(flag) > 2)
                                                 for k in known):
                close = difflib.get_close_matches(flag, known, n=1)
                self.error(f"unknown option {flag}" + (f"; did you mean {close[0]}?" if close else ""))
        return super().parse_args(args, namespace)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lmsmith",
        description="lmsmith: train, fine-tune, quantize and run decoder-only language models.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `lmsmith VERB --help` for the options of each verb.",
    )
    parser.add_argument("--version", action="version", version=f"lmsmith {_version()}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    for verb, (_, help_line) in VERBS.items():
        sub.add_parser(verb, help=help_line, description=help_line, add_help=False)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    if argv[0] == "--version":
        parser.parse_args(argv)
    verb = argv[0]
    if verb not in VERBS:
        close = difflib.get_close_matches(verb, VERBS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        parser.error(f"unknown verb {verb!r}; {hint}choose one of: {', '.join(VERBS)}")
    # SIGTERM (a scheduler, `docker stop`) ends a verb as Ctrl-C does: cleanly, one line, no traceback.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_interrupt)
    try:  # importing a recipe imports torch: a Ctrl-C there is an interrupt too, not a traceback
        module = importlib.import_module(f"lmsmith.recipes.{VERBS[verb][0]}")
    except KeyboardInterrupt:
        print("lmsmith: interrupted", file=sys.stderr)
        return 130
    vp = _Parser(prog=f"lmsmith {verb}", description=getattr(module, "DESCRIPTION", VERBS[verb][1]),
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(vp)
    args = vp.parse_args(argv[1:])
    return run_guarded(module.run, args)


def _option_strings(parser: argparse.ArgumentParser) -> list[str]:
    """Every option of a parser and of its sub-commands (`data synth --task`)."""
    out = []
    for action in parser._actions:
        out += action.option_strings
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                out += _option_strings(sub)
    return out


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def run_guarded(fn, args) -> int:
    """Run a recipe; turn user errors into one line on stderr and a non-zero exit."""
    from .errors import LmsmithError

    try:
        rc = fn(args)
    except LmsmithError as e:
        print(f"lmsmith: error: {e}", file=sys.stderr)
        return 1
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        name = getattr(e, "filename", None)
        print(f"lmsmith: error: {e.strerror or e}: {name}" if name else f"lmsmith: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lmsmith: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
