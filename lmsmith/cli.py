"""`lmsmith <verb>`: one subcommand per recipe module in `lmsmith/recipes/`.

Each recipe module defines `HELP` (one line), `add_arguments(parser)` and
`run(args) -> int | None`. Recipes are imported only when their verb runs, so
`lmsmith --help` stays fast. User errors (`LmsmithError`, missing files, bad
values) print one line and exit 1, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# verb -> (module under lmsmith.recipes, one-line help). Order is the order in --help.
VERBS: dict[str, tuple[str, str]] = {
    "tokenizer": ("tokenizer", "train a byte-level BPE tokenizer on text files"),
    "data": ("data", "prepare token shards from text corpora; make synthetic instruction tasks"),
    "init": ("init", "create a randomly initialised model directory from a preset"),
    "info": ("info", "architecture, parameter counts and memory needs of a model or preset"),
    "pretrain": ("pretrain", "pretrain a model on raw text (default: the built-in Python corpus, ~10 min on CPU)"),
    "eval": ("eval", "perplexity and bits per byte on held-out text; exact-match accuracy on tasks"),
    "generate": ("generate", "generate text with any decoding strategy, streaming; --compare strategies"),
    "probs": ("probs", "the table of the most likely next tokens, step by step"),
    "chat": ("chat", "a multi-turn chat REPL with the model's chat template"),
    "finetune": ("finetune", "fine-tune on instruction or preference data: full, LoRA or prompt; SFT or DPO"),
    "merge": ("merge", "fold a LoRA adapter into the base weights"),
    "quantize": ("quantize", "quantize to f16/bf16/int8 or GGUF (Q8_0, Q4_K_M, Q3_K_M, ...); the quality table"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, as argparse does, but without the usage dump
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


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
        parser.error(f"unknown verb {verb!r}; choose one of: {', '.join(VERBS)}")
    module = importlib.import_module(f"lmsmith.recipes.{VERBS[verb][0]}")
    vp = _Parser(prog=f"lmsmith {verb}", description=getattr(module, "DESCRIPTION", VERBS[verb][1]),
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(vp)
    args = vp.parse_args(argv[1:])
    return run_guarded(module.run, args)


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
