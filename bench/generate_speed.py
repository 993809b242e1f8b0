"""Generation speed: lmsmith vs transformers `generate` on the same weights, same greedy tokens.

Prints decode tokens/s at batch 1 and 8, prefill tokens/s, and beam search (4 beams),
each as lmsmith / transformers, plus the memory-bandwidth bound: a decode step must
read every weight once, so tokens/s <= bandwidth / weight bytes (batch 1).

    python bench/generate_speed.py [--preset small] [--new 64] [--prompt-len 32] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch


def best_of(fn, repeat=3):
    fn()  # warm-up (allocator, kernels)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def bandwidth_gbs() -> float:
    """Measured read bandwidth (bytes summed / s) on a tensor far larger than the caches.

    A decode step only reads weights, so a streaming read, not a copy, is its ceiling.
    """
    x = torch.ones(64 * 2**20, dtype=torch.float32)  # 256 MB
    t, _ = best_of(lambda: x.sum(), repeat=5)
    return x.numel() * 4 / t / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--new", type=int, default=64, help="new tokens per sequence")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--prefill-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--row-major", action="store_true",
                    help="keep PyTorch's default weight layout (skip use_decode_layout) to see what it adds")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import LlamaConfig, LlamaForCausalLM

    from lmsmith.config import preset
    from lmsmith.decoding import GenerationConfig, generate_ids
    from lmsmith.decoding.layout import use_decode_layout
    from lmsmith.model import build_model

    cfg = preset(args.preset)
    model = build_model(cfg, seed=0).eval()
    hf = LlamaForCausalLM(LlamaConfig(**cfg.to_hf(bos_id=None, eos_id=None, pad_id=0)))
    hf.load_state_dict(model.state_dict(), strict=False)
    hf.tie_weights()
    hf.eval()
    if not args.row_major:
        use_decode_layout(model)  # what the generate/chat/probs/eval verbs do after loading
    n_params = model.num_params()
    print(f"model: preset {args.preset}, {n_params / 1e6:.1f}M params, fp32 "
          f"({'row-major' if args.row_major else 'decode layout'}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; prompt {args.prompt_len} tokens, {args.new} new tokens")

    g = torch.Generator().manual_seed(0)

    def ours(prompts, **kw):
        cfg_ = GenerationConfig(max_new_tokens=args.new, eos_ids=[], **kw)
        return [c.ids for c in generate_ids(model, prompts, cfg_)]

    def theirs(prompts, **kw):
        ids = torch.tensor(prompts)
        with torch.inference_mode():
            out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=args.new, min_new_tokens=args.new, pad_token_id=0, eos_token_id=None,
                              top_k=None, top_p=None, temperature=None, **kw)
        return out[:, ids.shape[1]:].tolist()

    rows = []
    for batch in (1, 8):
        prompts = torch.randint(0, cfg.vocab_size, (batch, args.prompt_len), generator=g).tolist()
        t_ours, a = best_of(lambda p=prompts: ours(p))
        t_hf, b = best_of(lambda p=prompts: theirs(p))
        assert a == b, f"greedy tokens differ at batch {batch}"
        n = batch * args.new
        rows.append((f"decode batch {batch} (greedy)", n / t_ours, n / t_hf))

    prompts = torch.randint(0, cfg.vocab_size, (1, args.prompt_len), generator=g).tolist()
    t_ours, a = best_of(lambda: ours(prompts, strategy="beam", num_beams=4), repeat=2)
    t_hf, b = best_of(lambda: theirs(prompts, num_beams=4), repeat=2)
    assert a == b, "beam search tokens differ"
    rows.append(("beam search, 4 beams", args.new / t_ours, args.new / t_hf))

    x = torch.randint(0, cfg.vocab_size, (1, args.prefill_len), generator=g)
    with torch.inference_mode():
        t_ours, _ = best_of(lambda: model(x, last_only=True))
        t_hf, _ = best_of(lambda: hf(input_ids=x, logits_to_keep=1, use_cache=False))
    rows.append((f"prefill {args.prefill_len} tokens", args.prefill_len / t_ours, args.prefill_len / t_hf))

    print(f"\n{'':<28} {'lmsmith tok/s':>14} {'transformers':>13} {'ratio':>7}")
    for name, o, h in rows:
        print(f"{name:<28} {o:>14.1f} {h:>13.1f} {o / h:>6.2f}x")

    # The physical limit at batch 1: every weight matrix is read once per token (the embedding only one row,
    # but a tied LM head reads the whole matrix).
    bw = bandwidth_gbs()
    weight_bytes = n_params * 4
    bound = bw * 1e9 / weight_bytes
    print(f"\nmemory read bandwidth {bw:.1f} GB/s; weights {weight_bytes / 1e6:.0f} MB read per token "
          f"-> bound {bound:.0f} tokens/s at batch 1; lmsmith reaches {rows[0][1] / bound * 100:.0f}% of it")


if __name__ == "__main__":
    main()
