"""Greedy and beam search token ids equal transformers' `generate` on the same weights."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmsmith.config import ModelConfig  # noqa: E402
from lmsmith.decoding import GenerationConfig, generate_ids  # noqa: E402
from lmsmith.decoding.layout import use_decode_layout  # noqa: E402
from lmsmith.model import build_model  # noqa: E402

EOS, PAD = 3, 0


@pytest.fixture(scope="module", params=["row-major", "decode-layout"])
def models(request):
    cfg = ModelConfig(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128,
                      max_seq_len=128, tie_embeddings=False)
    model = build_model(cfg, seed=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # peaky distributions: few near-ties, loops like a real small model
        # Make EOS likely after some contexts so beams finish at different lengths.
        model.lm_head.weight[EOS] = model.lm_head.weight[117] * 1.03
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg.to_hf(bos_id=1, eos_id=EOS, pad_id=PAD)))
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    hf.eval()
    if request.param == "decode-layout":
        use_decode_layout(model, threads=2, min_weights=0)  # what the inference verbs do: column-major, split matmuls
    return model, hf


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 128, (n,), generator=g).tolist() for n in lengths]


def _hf(hf, prompts, **kw):
    P = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (P - len(p)) + p for p in prompts])
    pad = torch.tensor([P - len(p) for p in prompts])
    mask = (torch.arange(P)[None] >= pad[:, None]).long()
    out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=PAD, eos_token_id=EOS,
                      top_k=None, top_p=None, temperature=None, **kw)
    rows = []
    for row in out[:, P:].tolist():
        rows.append(row[:row.index(EOS) + 1] if EOS in row else row)  # after EOS only padding follows
    return rows


def _ours(model, prompts, **kw):
    comps = generate_ids(model, prompts, GenerationConfig(eos_ids=[EOS], **kw))
    return [c.ids + ([EOS] if c.finish_reason == "eos" else []) for c in comps]


@pytest.mark.parametrize("lengths", [(6,), (5, 9, 3, 7)])
def test_greedy_equals_transformers(models, lengths):
    model, hf = models
    for seed in range(3):
        prompts = _prompts(lengths, seed)
        expect = _hf(hf, prompts, max_new_tokens=24)
        assert _ours(model, prompts, max_new_tokens=24) == expect


def test_eos_is_exercised(models):
    model, hf = models
    rows = [r for s in range(3) for r in _hf(hf, _prompts((5, 9, 3, 7), s), max_new_tokens=24)]
    rows += [r for s in range(3) for r in _hf(hf, _prompts((5, 9, 3, 7), s), max_new_tokens=12, num_beams=4,
                                                  num_return_sequences=4)]
    assert any(r and r[-1] == EOS for r in rows), "the fixture model never generates EOS"
    assert any(EOS not in r for r in rows)


# Every beam size, length penalty and early-stopping rule appears, without the full (slow) product.
BEAM_CASES = [(2, 0.5, False), (2, 1.0, True), (2, 2.0, "never"), (4, 0.5, "never"), (4, 1.0, False),
              (4, 2.0, True), (4, 1.0, "never"), (2, 1.0, False)]


@pytest.mark.parametrize(("num_beams", "length_penalty", "early_stopping"), BEAM_CASES)
def test_beam_equals_transformers(models, num_beams, length_penalty, early_stopping):
    model, hf = models
    for lengths, seed in (((6,), 1), ((5, 9, 3), 2)):
        prompts = _prompts(lengths, seed)
        kw = dict(max_new_tokens=10, num_beams=num_beams, length_penalty=length_penalty,
                  early_stopping=early_stopping, num_return_sequences=num_beams)
        expect = _hf(hf, prompts, **kw)
        assert _ours(model, prompts, strategy="beam", **kw) == expect


def test_beam_one_return_sequence(models):
    model, hf = models
    prompts = _prompts((4, 8), 5)
    kw = dict(max_new_tokens=16, num_beams=3)
    assert _ours(model, prompts, strategy="beam", **kw) == _hf(hf, prompts, **kw)


@pytest.mark.parametrize("kw", [dict(repetition_penalty=1.5), dict(repetition_penalty=0.7),
                                dict(no_repeat_ngram_size=2), dict(no_repeat_ngram_size=3, repetition_penalty=1.3)])
def test_greedy_with_processors_equals_transformers(models, kw):
    model, hf = models
    for seed in range(2):
        prompts = _prompts((7,), seed)
        assert _ours(model, prompts, max_new_tokens=24, **kw) == _hf(hf, prompts, max_new_tokens=24, **kw)


@pytest.mark.parametrize("kw", [dict(repetition_penalty=1.5), dict(no_repeat_ngram_size=2)])
def test_beam_with_processors_equals_transformers(models, kw):
    model, hf = models
    prompts = _prompts((7,), 3)
    common = dict(max_new_tokens=12, num_beams=4, num_return_sequences=2)
    assert _ours(model, prompts, strategy="beam", **common, **kw) == _hf(hf, prompts, **common, **kw)


# ---- Mistral's sliding window ----------------------------------------------------------------------

WINDOW = 5


@pytest.fixture(scope="module")
def mistral():
    cfg = ModelConfig(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128,
                      max_seq_len=64, tie_embeddings=False, arch="mistral", sliding_window=WINDOW)
    model = build_model(cfg, seed=1)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    hf = transformers.MistralForCausalLM(transformers.MistralConfig(**cfg.to_hf(bos_id=1, eos_id=EOS, pad_id=PAD)))
    hf.config._attn_implementation = "eager"
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    return model.eval(), hf.eval()


@pytest.mark.parametrize("grad", [False, True])  # SDPA with a window mask / explicit attention
def test_sliding_window_logits_equal_transformers(mistral, grad):
    model, hf = mistral
    ids = torch.randint(4, 128, (2, 4 * WINDOW), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = hf(input_ids=ids).logits
    with torch.set_grad_enabled(grad):
        ours = model(ids)
    torch.testing.assert_close(ours.detach(), theirs, atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # the window changes the result: full attention differs
        model.model.layers[0].self_attn.window = None
        try:
            assert not torch.allclose(model(ids), theirs, atol=1e-2)
        finally:
            model.model.layers[0].self_attn.window = WINDOW


@pytest.mark.parametrize("lengths", [(6,), (5, 9, 3, 7)])
def test_sliding_window_greedy_equals_transformers(mistral, lengths):
    model, hf = mistral
    for seed in range(2):
        prompts = _prompts(lengths, seed)
        assert _ours(model, prompts, max_new_tokens=15) == _hf(hf, prompts, max_new_tokens=15)
