"""Fold a LoRA adapter into the base weights and save a plain Hugging Face directory.

`lmsmith merge MODEL ADAPTER --out DIR` loads MODEL, applies the LoRA adapter in
ADAPTER (saved by lmsmith or peft), adds (B @ A) * scaling to each target weight,
and writes DIR with the tokenizer: loadable by transformers, llama.cpp
converters and `lmsmith` alike, with no adapter at run time.
"""

from __future__ import annotations

HELP = "fold a LoRA adapter into the base weights"
DESCRIPTION = __doc__.split("\n", 2)[2].strip() if __doc__ else HELP


def add_arguments(p) -> None:
    p.add_argument("model", help="base model directory")
    p.add_argument("adapter", help="LoRA adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--out", required=True, metavar="DIR", help="where to write the merged model")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="dtype of the written weights (default: the base model's)")


def run(args) -> int:
    from pathlib import Path

    from ..adapters import adapter_type, load_lora, merge_lora
    from ..checkpoint import save
    from ..errors import LmsmithError
    from ..loader import load

    if Path(args.out).resolve() == Path(args.model).resolve():
        raise LmsmithError(f"--out {args.out} is the base model directory; write the merged model elsewhere")
    kind = adapter_type(args.adapter)  # checks the adapter before the (slow) model load
    if kind != "LORA":
        raise LmsmithError(f"{args.adapter}: a {kind} adapter adds virtual tokens, it has no weight update to "
                           f"merge; load it at run time with --adapter instead")
    model, tokenizer = load(args.model)
    config = load_lora(model, args.adapter)
    stats: dict = {}
    merge_lora(model, stats=stats)
    out = save(model, tokenizer, args.out, dtype=args.dtype)
    rs = " (rsLoRA)" if config.use_rslora else ""
    print(f"merged LoRA r={config.r}, alpha={config.alpha:g}{rs} from {args.adapter} into {stats['layers']} "
          f"linear layers of {args.model}; max |ΔW| {stats['max_abs_delta']:.3g}; wrote {out}"
          f"{'' if tokenizer is not None else ' (no tokenizer found beside the base model)'}")
    return 0
