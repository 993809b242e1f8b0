"""`lmsmith info`: architecture, parameter counts and memory needs of a model directory or preset.

Read config.json (or the preset) -> compute with `lmsmith.memory` (no weights are
loaded or allocated) -> print an aligned table, or JSON with --json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import LmsmithError

HELP = "architecture, parameter counts and memory needs of a model or preset"
DESCRIPTION = """Show the shape, parameter counts and memory needs of a model directory or a preset.
Nothing is loaded or allocated: the numbers come from the config, so `lmsmith info llama-3.1-405b`
is instant.

examples:
  lmsmith info tiny
  lmsmith info models/my-model --json
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="PATH_OR_PRESET", help="a model directory or a preset name")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def resolve(target: str):
    """(ModelConfig, description) for a model directory or a preset name."""
    from ..checkpoint import read_config
    from ..config import PRESETS, preset

    path = Path(target)
    if path.is_dir():
        return read_config(path), f"model directory {path}"
    if target in PRESETS:
        return preset(target), f"preset {target}"
    if path.exists():
        raise LmsmithError(f"{target}: not a model directory (GGUF info arrives with the quantization work)")
    raise LmsmithError(f"{target}: no such model directory or preset; presets: {', '.join(PRESETS)}")


def run(args: argparse.Namespace) -> int:
    from ..memory import WEIGHT_FORMAT_NOTES, human_bytes, human_count, model_report

    cfg, source = resolve(args.target)
    report = model_report(cfg)
    if args.json:
        print(json.dumps({"source": source, **report}, indent=2))
        return 0

    s, p, w = report["shape"], report["params"], report["weights_bytes"]
    rs = s["rope_scaling"]
    rope = f"theta {s['rope_theta']:g}"
    if rs:
        rope += (f", {rs['rope_type']} scaling x{rs['factor']:g} from "
                 f"{rs['original_max_position_embeddings']} positions")
    rows: list[tuple[str, str, str]] = [
        ("source", source, ""),
        ("architecture", report["architecture"], ""),
        ("layers", str(s["layers"]), ""),
        ("dim", str(s["dim"]), "residual width (hidden_size)"),
        ("heads / kv heads", f"{s['heads']} / {s['kv_heads']}", _attn_kind(s["heads"], s["kv_heads"])),
        ("head dim", str(s["head_dim"]), ""),
        ("hidden dim", str(s["hidden_dim"]), "SwiGLU inner width (intermediate_size)"),
        ("vocab", str(s["vocab_size"]), ""),
        ("context", str(s["context"]), "max_position_embeddings"),
        ("rope", rope, ""),
        ("tied embeddings", "yes" if s["tied_embeddings"] else "no", ""),
        ("q/k/v bias", "yes" if s["qkv_bias"] else "no", ""),
        ("", "", ""),
        ("params total", human_count(p["total"]), f"{p['total']:,}"),
        ("  embedding", human_count(p["embedding"]), "input table" + ("" if s["tied_embeddings"] else " + LM head")),
        ("  non-embedding", human_count(p["non_embedding"]), f"{p['non_embedding']:,}"),
        ("", "", ""),
        ("weights fp32", human_bytes(w["fp32"]), "4 bytes/param"),
        ("weights bf16", human_bytes(w["bf16"]), "2 bytes/param"),
        ("weights int8", human_bytes(w["int8"]), WEIGHT_FORMAT_NOTES["int8"]),
        ("weights 4-bit", human_bytes(w["4-bit"]), WEIGHT_FORMAT_NOTES["4-bit"]),
        ("training (AdamW)", human_bytes(report["training_bytes"]),
         "mixed precision: fp32 master 4 + grads 4 + Adam m,v 8 = 16 bytes/param; activations extra"),
        ("KV cache / token", human_bytes(report["kv_cache_bytes_per_token_bf16"]),
         f"bf16; {human_bytes(report['kv_cache_bytes_full_context_bf16'])} for the full context per sequence"),
    ]
    # Numbers are right-aligned in one column; free text (source, architecture, rope) starts there too.
    text_rows = {"source", "architecture", "rope"}
    width = max(len(r[0]) for r in rows)
    vwidth = max(len(r[1]) for r in rows if r[0] not in text_rows)
    for label, value, note in rows:
        if not label:
            print()
            continue
        if label in text_rows:
            print(f"{label:<{width}}  {value}")
            continue
        line = f"{label:<{width}}  {value:>{vwidth}}"
        print(f"{line}  {note}".rstrip() if note else line)
    return 0


def _attn_kind(heads: int, kv: int) -> str:
    if kv == heads:
        return "multi-head attention"
    if kv == 1:
        return "multi-query attention"
    return f"grouped-query attention, {heads // kv} query heads per kv head"
