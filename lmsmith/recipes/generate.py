"""`lmsmith generate MODEL --prompt TEXT`: generate text with any strategy, streamed to the terminal.

Also `--prompts-file` for a batch and `--compare` to run several strategies on one
prompt and print them side by side with diversity and repetition statistics.
The option helpers here (`add_generation_arguments`, `config_from_args`,
`load_for_generation`) are shared with `lmsmith chat`.
"""

from __future__ import annotations

import json
import sys
import textwrap
import time
from pathlib import Path

HELP = "generate text with any decoding strategy, streaming; --compare strategies side by side"
DESCRIPTION = """Generate a continuation of --prompt with MODEL (an HF directory or .gguf file).

Text streams to the terminal as tokens are produced. Strategies: greedy, beam,
sample (plain softmax sampling), top_k, top_p, min_p; --temperature 0 is greedy.
--prompts-file runs a batch (one prompt per line, or JSONL with a "prompt" field).
--compare runs several strategies on the same prompt (default: greedy, beam 4,
sample T=1, top_k 40, top_p 0.9, min_p 0.05) and prints their outputs with
distinct-1/distinct-2 (unique n-grams / n-grams) and rep-3 (fraction of 3-grams
that repeat an earlier one)."""

COMPARE_DEFAULT = "greedy,beam,sample,top_k,top_p,min_p"


def add_generation_arguments(p) -> None:
    """The decoding options shared by `generate` and `chat`."""
    from ..decoding.config import STRATEGIES

    g = p.add_argument_group("decoding")
    g.add_argument("--strategy", default="greedy", choices=STRATEGIES, help="decoding strategy (default: greedy)")
    g.add_argument("--temperature", type=float, default=1.0, help="softmax temperature for sampling; 0 = greedy")
    g.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (top_k default 40)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus mass in (0, 1] (top_p default 0.9)")
    g.add_argument("--min-p", type=float, default=None, help="keep tokens with p >= min_p * max p (default 0.05)")
    g.add_argument("--num-beams", type=int, default=None, help="beams for --strategy beam (default 4)")
    g.add_argument("--length-penalty", type=float, default=1.0, help="beam score = logprob / len**lp")
    g.add_argument("--early-stopping", default="false", choices=["true", "false", "never"],
                   help="beam search stopping rule, as in transformers (default: false)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (HF rule)")
    g.add_argument("--frequency-penalty", type=float, default=0.0, help="subtract penalty * count (OpenAI rule)")
    g.add_argument("--presence-penalty", type=float, default=0.0, help="subtract penalty if present (OpenAI)")
    g.add_argument("--no-repeat-ngram-size", type=int, default=0, help="forbid repeating n-grams of this size")
    g.add_argument("--max-new-tokens", type=int, default=128, help="most tokens to generate (default: 128)")
    g.add_argument("--stop", nargs="+", default=None, metavar="STR", help="stop strings (cut from the output)")
    g.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    add_dtype_argument(g)
    g.add_argument("--device", default=None, help="cpu, cuda, mps (default: the best available)")
    add_packed_argument(g)
    p.add_argument("--adapter", default=None, metavar="DIR", help="LoRA, prompt or prefix adapter (peft format)")
    add_draft_arguments(p)


def add_dtype_argument(p) -> None:
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="the weights' precision, cast once at load: auto = bf16 where the hardware multiplies it "
                        "natively (CPUs with AVX512-BF16 or AMX, CUDA), else fp32; bf16 / fp16 read half the bytes "
                        "per token; fp32 is exact (parity with transformers' fp32 logits). Packed quantized "
                        "weights stay as they are (default: auto)")


def add_draft_arguments(p) -> None:
    g = p.add_argument_group("speculative decoding")
    g.add_argument("--draft", default=None, metavar="DIR|prompt-lookup",
                   help="a small draft model with the same tokenizer (e.g. a distilled student) proposes tokens "
                        "that the model checks in one forward; 'prompt-lookup' copies them from the prompt and "
                        "text so far. Greedy output is unchanged, sampling keeps the model's distribution")
    g.add_argument("--draft-tokens", type=int, default=None, metavar="N",
                   help="tokens drafted per step (default: adaptive, grown while drafts are accepted)")


def load_draft(args, model, tokenizer):
    """None, 'prompt-lookup', or the --draft model (same device, decode layout), its vocabulary checked."""
    from ..errors import LmsmithError
    from ..loader import load

    draft = getattr(args, "draft", None)
    if draft is None:
        if getattr(args, "draft_tokens", None) is not None:
            raise LmsmithError("--draft-tokens needs --draft DIR or --draft prompt-lookup")
        return None
    if draft == "prompt-lookup":
        return draft
    if not Path(draft).exists():
        raise LmsmithError(f"--draft {draft}: no such model; give a model directory or 'prompt-lookup'")
    device = next(model.parameters()).device
    small, draft_tok = load(draft, device=device)
    if draft_tok is not None:
        from ..tokenizer import first_difference

        i = first_difference(tokenizer, draft_tok)
        if i is not None:
            raise LmsmithError(f"--draft {draft}: token id {i} differs between its tokenizer and the model's; a "
                               "draft must share the model's vocabulary (distil one: `lmsmith distill`)")
    return for_inference(small, getattr(args, "dtype", "fp32"))


def draft_report(stats: dict) -> str:
    """'; draft: 80% of 120 accepted, 3.1 tokens per forward' for a speculative run, else ''."""
    if not stats.get("draft_tokens"):
        return ""
    rate = stats["draft_accepted"] / stats["draft_tokens"]
    per = stats["generated_tokens"] / max(stats["decode_steps"], 1)
    return f"; draft: {rate:.0%} of {stats['draft_tokens']} accepted, {per:.2f} tokens per target forward"


def config_from_args(args, **changes):
    """A GenerationConfig from the parsed decoding options (`changes` override fields)."""
    from ..decoding import GenerationConfig

    beams = args.num_beams if args.num_beams is not None else (4 if args.strategy == "beam" else 1)
    kw = dict(strategy=args.strategy, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
              min_p=args.min_p, num_beams=beams,
              length_penalty=args.length_penalty,
              early_stopping={"true": True, "false": False, "never": "never"}[args.early_stopping],
              repetition_penalty=args.repetition_penalty, frequency_penalty=args.frequency_penalty,
              presence_penalty=args.presence_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size,
              max_new_tokens=args.max_new_tokens, stop=args.stop, seed=args.seed)
    kw.update(changes)
    return GenerationConfig(**kw)


def add_packed_argument(p) -> None:
    p.add_argument("--packed", action="store_true",
                   help="keep a .gguf file's quantized weights packed: resident memory about the file's size, and "
                        "the products run on the packed bytes (faster than float on CPU; int8 directories always "
                        "are packed)")


def load_model(args):
    """(model, tokenizer) from args.model (args.device, --packed); errors for a missing tokenizer and for
    an adapter on packed weights."""
    from ..errors import LmsmithError
    from ..loader import load
    from ..precision import default_device

    packed = getattr(args, "packed", False)
    if packed and getattr(args, "adapter", None):
        raise LmsmithError("--adapter does not apply to --packed weights; merge it into the model (lmsmith merge), "
                           "quantize that, then run it --packed")
    device = (args.device or default_device()) if hasattr(args, "device") else None  # eval: CPU
    model, tokenizer = load(args.model, device=device, packed=packed)
    if tokenizer is None:
        where = "the file holds no tokenizer lmsmith can read" if str(args.model).lower().endswith(".gguf") else \
            "no tokenizer.json beside the weights"
        raise LmsmithError(f"{args.model}: {where}; lmsmith needs the model's tokenizer")
    return model, tokenizer


def load_for_generation(args):
    """(model, tokenizer) from args.model on args.device, adapter applied, in the decode layout."""
    model, tokenizer = load_model(args)
    if hasattr(model, "score"):
        from ..errors import LmsmithError

        raise LmsmithError(f"{args.model} is a reward model (a score head, no LM head): it scores responses "
                           "(lmsmith.score, `lmsmith eval --preferences`, `lmsmith rl --reward`) but does not generate")
    if getattr(args, "adapter", None):
        from ..adapters import load_adapter

        model = load_adapter(model, args.adapter, tokenizer)
    return for_inference(model, getattr(args, "dtype", "fp32")), tokenizer


def for_inference(model, policy: str):
    """The model in the dtype `policy` means for inference (`precision.inference_dtype`), in the decode
    layout. The weights are cast once: under autocast every step would cast every weight again. Packed
    quantized models keep their bytes (their products run in fp32 on them)."""
    import torch

    from ..decoding.layout import use_decode_layout
    from ..precision import inference_dtype
    from ..quant.linear import has_packed_weights

    dtype = inference_dtype(policy, next(model.parameters()).device)
    if dtype != torch.float32 and not has_packed_weights(model):
        model = model.to(dtype)
    return use_decode_layout(model)


def add_arguments(p) -> None:
    p.add_argument("model", help="model directory (or .gguf file)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the text to continue")
    src.add_argument("--prompts-file", help="one prompt per line, or JSONL with a 'prompt' field (batched)")
    p.add_argument("--num-samples", type=int, default=1, help="sequences per prompt (sampling or beam)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per batch with --prompts-file (default: 8)")
    p.add_argument("--out", default=None, metavar="FILE.jsonl",
                   help="with --prompts-file: also write the generations as {prompt, completion} JSONL, instruction "
                        "data that `lmsmith finetune` and `lmsmith distill --data` read (sequence-level distillation)")
    p.add_argument("--compare", nargs="?", const=COMPARE_DEFAULT, default=None, metavar="LIST",
                   help=f"compare strategies on --prompt (default list: {COMPARE_DEFAULT})")
    add_generation_arguments(p)


def run(args) -> int:
    from ..errors import LmsmithError

    if args.num_samples < 1:
        raise LmsmithError(f"--num-samples {args.num_samples} must be >= 1")
    if args.out and not args.prompts_file:
        raise LmsmithError("--out writes the generations of --prompts-file; give the prompts as a file")
    if args.compare is not None and args.prompt is None:
        raise LmsmithError("--compare needs --prompt (one prompt to compare strategies on)")
    # Validate options before the (slow) model load.
    config = config_from_args(args, num_return_sequences=args.num_samples)
    model, tokenizer = load_for_generation(args)
    draft = load_draft(args, model, tokenizer)
    if draft is not None and (args.compare is not None or config.strategy == "beam"):
        raise LmsmithError("--draft speeds up greedy and sampling decoding; not --compare or beam search")
    args.draft_model = draft
    if args.compare is not None:
        return _compare(model, tokenizer, args)
    if args.prompts_file:
        return _batch(model, tokenizer, args, config)
    if config.num_return_sequences > 1 or config.strategy == "beam":
        return _batch(model, tokenizer, args, config, prompts=[args.prompt])
    return _stream(model, tokenizer, args, config)


def _stream(model, tokenizer, args, config) -> int:
    from ..decoding import encode_prompt, resolve_config, stream_ids

    config = resolve_config(tokenizer, config)
    ids = encode_prompt(tokenizer, args.prompt)
    out = sys.stdout
    out.write(args.prompt)
    out.flush()
    t0, n, reason = time.perf_counter(), 0, "length"
    decode = lambda x: tokenizer.decode(x, skip_special_tokens=True)  # noqa: E731
    stats: dict = {}
    for ev in stream_ids(model, [ids], config, decode=decode,
                         draft=getattr(args, "draft_model", None), draft_tokens=args.draft_tokens, stats=stats):
        if ev.token is not None:
            n += 1
        if ev.text:
            out.write(ev.text)
            out.flush()  # one flush per token: the text appears as it is produced
        if ev.finish_reason:
            reason = ev.finish_reason
    dt = time.perf_counter() - t0
    out.write("\n")
    print(f"[{n} tokens in {dt:.2f}s, {n / max(dt, 1e-9):.1f} tokens/s, finished: {reason}{draft_report(stats)}]",
          file=sys.stderr)
    return 0


def _write_records(path: str, records: list[dict]) -> None:
    """The generations as {"prompt", "completion"} JSONL (finetune's and distill's completion format),
    written atomically."""
    from ..fileio import atomic_file

    with atomic_file(path) as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")


def read_prompts(path: str) -> list[str]:
    """Prompts from a file: JSONL with a 'prompt' field (or a JSON string per line), else one per line."""
    from ..errors import LmsmithError
    from ..fileio import check_regular_file

    check_regular_file(path, "prompts file")
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise LmsmithError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); save the prompts as "
                           "UTF-8") from None
    lines = [ln for ln in text.split("\n") if ln.strip()]
    prompts = []
    jsonl = path.endswith((".jsonl", ".json")) or (lines and lines[0].lstrip().startswith("{"))
    for i, line in enumerate(lines, 1):
        if not jsonl:
            prompts.append(line)
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise LmsmithError(f"{path}:{i}: not valid JSON ({e.msg}); use JSONL with a 'prompt' field") from None
        if isinstance(obj, str):
            prompts.append(obj)
        elif isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
            prompts.append(obj["prompt"])
        else:
            raise LmsmithError(f"{path}:{i}: expected an object with a string 'prompt' field")
    if not prompts:
        raise LmsmithError(f"{path}: no prompts found")
    return prompts


def _batch(model, tokenizer, args, config, prompts=None) -> int:
    from ..decoding import encode_prompt, generate_ids, resolve_config

    config = resolve_config(tokenizer, config)
    prompts = prompts if prompts is not None else read_prompts(args.prompts_file)
    decode = lambda x: tokenizer.decode(x, skip_special_tokens=True)  # noqa: E731
    t0, total, stats, records = time.perf_counter(), 0, {}, []
    for start in range(0, len(prompts), args.batch_size):
        chunk = prompts[start:start + args.batch_size]
        step: dict = {}
        comps = generate_ids(model, [encode_prompt(tokenizer, p) for p in chunk], config, decode=decode,
                             draft=getattr(args, "draft_model", None),
                             draft_tokens=args.draft_tokens, stats=step)
        stats = {k: stats.get(k, 0) + v for k, v in step.items()}
        n = config.num_return_sequences
        for j, c in enumerate(comps):
            total += len(c.ids)
            i = start + c.prompt_index
            tag = f"[{i + 1}]" if n == 1 else f"[{i + 1}.{j % n + 1}]"
            print(f"{tag} {prompts[i]}{c.text}  ({c.finish_reason})", flush=True)
            records.append({"prompt": prompts[i], "completion": c.text, "finish_reason": c.finish_reason})
    dt = time.perf_counter() - t0
    if getattr(args, "out", None):
        _write_records(args.out, records)
    print(f"[{len(prompts)} prompts, {total} tokens in {dt:.2f}s, {total / max(dt, 1e-9):.1f} tokens/s"
          f"{draft_report(stats)}]" + (f"; wrote {len(records)} examples to {args.out}" if args.out else ""),
          file=sys.stderr)
    return 0


# ------------------------------------------------------------------ --compare

def ngram_stats(ids: list[int]) -> dict[str, float]:
    """distinct-1, distinct-2 (unique n-grams / n-grams) and rep-3 (repeated 3-grams / 3-grams)."""
    def grams(n):
        return [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]

    out = {}
    for n in (1, 2):
        g = grams(n)
        out[f"distinct-{n}"] = len(set(g)) / len(g) if g else 0.0
    g3 = grams(3)
    out["rep-3"] = 1 - len(set(g3)) / len(g3) if g3 else 0.0
    return out


def compare_configs(spec: str, args) -> list[tuple[str, object]]:
    """(label, GenerationConfig) for each comma-separated strategy name in `spec`."""
    from ..decoding.config import STRATEGIES
    from ..errors import LmsmithError

    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown or not names:
        raise LmsmithError(f"--compare: unknown strategy {', '.join(map(repr, unknown)) or repr(spec)}; "
                           f"choose from: {', '.join(STRATEGIES)}")
    seed = 0 if args.seed is None else args.seed  # a comparison should be reproducible
    beams = 4 if args.num_beams is None else args.num_beams
    base = dict(top_k=None, top_p=None, min_p=None, num_beams=1, seed=seed)
    presets = {
        "greedy": ("greedy", dict(strategy="greedy")),
        "beam": (f"beam {beams}", dict(strategy="beam", num_beams=beams)),
        "sample": (f"sample T={args.temperature:g}", dict(strategy="sample")),
        "top_k": (f"top_k {args.top_k or 40}", dict(strategy="top_k", top_k=args.top_k or 40)),
        "top_p": (f"top_p {args.top_p or 0.9:g}", dict(strategy="top_p", top_p=args.top_p or 0.9)),
        "min_p": (f"min_p {args.min_p or 0.05:g}", dict(strategy="min_p", min_p=args.min_p or 0.05)),
    }
    return [(presets[n][0], config_from_args(args, **{**base, **presets[n][1]})) for n in names]


def _compare(model, tokenizer, args) -> int:
    from ..decoding import encode_prompt, generate_ids, resolve_config

    ids = encode_prompt(tokenizer, args.prompt)
    decode = lambda x: tokenizer.decode(x, skip_special_tokens=True)  # noqa: E731
    rows = []
    width = 100
    print(f"prompt: {args.prompt!r}\n")
    for label, config in compare_configs(args.compare, args):
        config = resolve_config(tokenizer, config)
        t0 = time.perf_counter()
        c = generate_ids(model, [ids], config, decode=decode)[0]
        dt = time.perf_counter() - t0
        stats = ngram_stats(c.ids)
        rows.append((label, len(c.ids), stats, c.finish_reason, dt))
        print(f"== {label} " + "=" * max(0, width - len(label) - 4))
        body = (c.text or "").replace("\r", "")
        for para in body.split("\n") or [""]:
            print(textwrap.fill(para, width=width, replace_whitespace=False) if para else "")
        print()
    header = (f"{'strategy':<14} {'tokens':>6} {'distinct-1':>10} {'distinct-2':>10} {'rep-3':>6} "
              f"{'finish':>7} {'time':>7}")
    print(header)
    print("-" * len(header))
    for label, n, s, reason, dt in rows:
        print(f"{label:<14} {n:>6} {s['distinct-1']:>10.3f} {s['distinct-2']:>10.3f} {s['rep-3']:>6.3f} "
              f"{reason:>7} {dt:>6.2f}s")
    return 0
