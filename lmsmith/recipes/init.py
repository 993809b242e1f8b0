"""`lmsmith init`: a randomly initialised model directory from a preset.

Resolve the preset (vocab from the tokenizer) -> check the weights fit in RAM ->
build directly in the target dtype -> save atomically as a Hugging Face directory
(loadable by transformers) -> summary.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..errors import LmsmithError

HELP = "create a randomly initialised model directory from a preset"
DESCRIPTION = """Create a randomly initialised model directory (config.json, model.safetensors,
generation_config.json and the tokenizer files) from a named preset. The directory loads in
transformers (AutoModelForCausalLM.from_pretrained) and is the starting point for `lmsmith pretrain`.

The preset's vocab_size is replaced by the tokenizer's vocabulary size.

examples:
  lmsmith init --preset tiny --tokenizer tok/ --out models/tiny
  lmsmith init --preset llama-3.2-1b --tokenizer tok/ --out models/l1b --dtype bf16
"""

# Leave this fraction of available RAM for the interpreter, torch and the page cache.
_RAM_HEADROOM = 0.9


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..config import PRESETS

    parser.add_argument("--preset", required=True, metavar="NAME",
                        help=f"model shape: {', '.join(PRESETS)}")
    parser.add_argument("--tokenizer", metavar="DIR",
                        help="tokenizer directory (tokenizer.json); its vocab size replaces the preset's")
    parser.add_argument("--out", "-o", required=True, metavar="DIR", help="model directory to create")
    parser.add_argument("--seed", type=int, default=0, help="random seed for the weights (default 0)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                        help="dtype of the saved weights (default fp32)")
    parser.add_argument("--vocab-size", type=int, metavar="N",
                        help="vocabulary rows (default: the tokenizer's; may exceed it, e.g. to a multiple of 64)")
    parser.add_argument("--max-seq-len", type=int, metavar="N", help="context length (default: the preset's)")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..checkpoint import save
    from ..config import preset
    from ..memory import available_memory_bytes, human_bytes, human_count
    from ..precision import parse_dtype

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise LmsmithError(f"{out}: exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        raise LmsmithError(f"{out}: directory is not empty; choose a new --out or delete it first")

    overrides: dict = {}
    tokenizer = None
    if args.tokenizer:
        from ..tokenizer import Tokenizer

        tokenizer = Tokenizer.load(args.tokenizer)
        vocab = tokenizer.vocab_size
        if args.vocab_size is not None:
            if args.vocab_size < vocab:
                raise LmsmithError(f"--vocab-size {args.vocab_size} is smaller than the tokenizer's {vocab} tokens; "
                                   f"use at least {vocab}")
            vocab = args.vocab_size
        overrides["vocab_size"] = vocab
    elif args.vocab_size is not None:
        overrides["vocab_size"] = args.vocab_size
    if args.max_seq_len is not None:
        overrides["max_seq_len"] = args.max_seq_len
    base = preset(args.preset)
    cfg = preset(args.preset, **overrides)
    if tokenizer is not None and cfg.vocab_size != base.vocab_size:
        print(f"lmsmith: note: vocab_size {base.vocab_size} of preset {args.preset!r} replaced by "
              f"{cfg.vocab_size} (from the tokenizer)", file=sys.stderr)
    if tokenizer is None:
        print(f"lmsmith: warning: no --tokenizer: keeping the preset's vocab_size {cfg.vocab_size} and saving "
              "without tokenizer files (train one with `lmsmith tokenizer train`)", file=sys.stderr)

    dtype = parse_dtype(args.dtype)
    n = cfg.num_params()
    need = n * dtype.itemsize
    avail = available_memory_bytes()
    if avail is not None and need > avail * _RAM_HEADROOM:
        hint = ("use a smaller preset" if dtype == torch.bfloat16
                else "use --dtype bf16 (half the memory) or a smaller preset")
        raise LmsmithError(
            f"preset {args.preset!r} ({human_count(n)} params) needs {human_bytes(need)} of RAM in {args.dtype} "
            f"but only {human_bytes(avail)} is available; {hint}"
        )

    t0 = time.perf_counter()
    model = _build_in_dtype(cfg, dtype, args.seed)
    save(model, tokenizer, out)
    dt = time.perf_counter() - t0
    print(f"Wrote {out}: {args.preset} ({human_count(n)} params, {cfg.n_layers} layers, dim {cfg.dim}, "
          f"vocab {cfg.vocab_size}) in {args.dtype}, {human_bytes(need)} of weights, seed {args.seed}, "
          f"{'with' if tokenizer else 'without'} tokenizer, in {dt:.1f}s. "
          f"Inspect it with `lmsmith info {out}`.")
    return 0


def _build_in_dtype(cfg, dtype, seed: int):
    """Materialise the model directly in `dtype` so a bf16 8B model never needs fp32 memory.

    `build_model(dtype=...)` initialises in fp32 and casts afterwards (peak: the fp32 size);
    here the meta model is cast first and then allocated and initialised in place.
    """
    import torch

    from ..model import build_model

    if dtype == torch.float32:
        return build_model(cfg, seed=seed)
    model = build_model(cfg, init=False).to(dtype)  # still meta: nothing allocated
    model.to_empty(device="cpu")
    model.tie_weights()
    model.init_weights(generator=torch.Generator().manual_seed(seed))
    model.reset_buffers()  # rotary frequencies stay fp32
    return model
