"""use_decode_layout: same values and names, column-major storage, split matmuls equal to F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmsmith.adapters.lora import LoraConfig, apply_lora, merge_lora
from lmsmith.checkpoint import save
from lmsmith.config import ModelConfig
from lmsmith.decoding import GenerationConfig, generate_ids
from lmsmith.decoding.layout import MIN_WEIGHTS, SPLIT_MAX_ROWS, DecodeLinear, is_column_major, use_decode_layout
from lmsmith.loader import load
from lmsmith.model import build_model

CFG = ModelConfig(vocab_size=96, dim=48, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, max_seq_len=64,
                  qkv_bias=True)


def _model(**kw):
    return build_model(ModelConfig(**{**CFG.__dict__, **kw}), seed=0).eval()


@pytest.mark.parametrize("threads", [2, 3, 5])
@pytest.mark.parametrize("rows", [1, 3, SPLIT_MAX_ROWS, SPLIT_MAX_ROWS + 1])
def test_decode_linear_equals_f_linear(threads, rows, monkeypatch):
    lin = nn.Linear(48, 40, bias=True)
    w, b = lin.weight.detach().clone(), lin.bias.detach().clone()
    use_decode_layout(lin, threads=threads, min_weights=0)
    assert type(lin) is DecodeLinear and isinstance(lin, nn.Linear)
    assert is_column_major(lin.weight) and torch.equal(lin.weight, w)
    assert lin.splits == {2: 2, 3: 3, 5: 4}[threads]  # the largest count <= threads dividing in_features=48
    calls = []
    real_bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a: calls.append(1) or real_bmm(*a))
    x = torch.randn(1, rows, 48)
    with torch.inference_mode():
        y = lin(x)
    assert y.shape == (1, rows, 40)
    torch.testing.assert_close(y, F.linear(x, w, b), atol=1e-5, rtol=1e-5)
    assert bool(calls) == (rows <= SPLIT_MAX_ROWS)  # the split path runs for decode-sized inputs only


def test_autograd_takes_the_plain_path_and_gradients_are_unchanged():
    ref, fast = _model(), use_decode_layout(_model(), threads=2, min_weights=0)
    ids = torch.randint(0, 96, (2, 10))
    for m in (ref, fast):
        m(ids).logsumexp(-1).sum().backward()
    for (name, p), q in zip(ref.named_parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_names_values_ties_and_checkpoints_are_unchanged(tmp_path):
    ref, fast = _model(), use_decode_layout(_model(), threads=2, min_weights=0)
    assert fast.lm_head.weight is fast.model.embed_tokens.weight  # still tied
    assert is_column_major(fast.model.layers[0].mlp.down_proj.weight)
    ref_sd, fast_sd = ref.state_dict(), fast.state_dict()
    assert list(ref_sd) == list(fast_sd)
    assert all(torch.equal(ref_sd[k], fast_sd[k]) for k in ref_sd)
    save(fast, None, tmp_path / "m")
    loaded, _ = load(tmp_path / "m")
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in ref_sd.items())
    ids = torch.randint(0, 96, (1, 12))
    with torch.inference_mode():
        torch.testing.assert_close(fast(ids), ref(ids), atol=1e-5, rtol=1e-5)


def test_generation_is_unchanged_for_batches_and_beams():
    ref, fast = _model(), use_decode_layout(_model(), threads=2, min_weights=0)
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    for cfg in (GenerationConfig(max_new_tokens=12, eos_ids=[]),
                GenerationConfig(strategy="beam", num_beams=3, max_new_tokens=10, eos_ids=[])):
        a = [c.ids for c in generate_ids(ref, prompts, cfg)]
        b = [c.ids for c in generate_ids(fast, prompts, cfg)]
        assert a == b


def test_lora_attaches_to_and_merges_into_a_decode_layout_model():
    model = use_decode_layout(_model(), threads=2, min_weights=0)
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    lora = model
    with torch.no_grad():
        for m in lora.modules():
            if hasattr(m, "lora_B"):
                m.lora_B.weight.normal_(0, 0.1)
    ids = torch.randint(0, 96, (1, 9))
    with torch.inference_mode():
        before = lora(ids)
    merged = merge_lora(lora)
    with torch.inference_mode():
        torch.testing.assert_close(merged(ids), before, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_keep_their_layout(dtype):
    # MKL's half-precision matrix-vector kernels are fastest on row-major weights.
    model = use_decode_layout(_model().to(dtype), threads=2, min_weights=0)
    assert not any(type(m) is DecodeLinear for m in model.modules())
    assert model.model.layers[0].mlp.up_proj.weight.is_contiguous()


@pytest.mark.parametrize("fast", [True, False])
def test_inference_dtype_auto_is_bf16_only_where_bf16_is_fast(fast, monkeypatch):
    from lmsmith import precision
    from lmsmith.recipes.generate import for_inference

    monkeypatch.setattr(precision, "bf16_is_fast", lambda device: fast)
    assert precision.inference_dtype("auto", "cpu") == (torch.bfloat16 if fast else torch.float32)
    assert precision.inference_dtype("fp16", "cpu") == torch.float16
    assert precision.inference_dtype("fp32", "cpu") == torch.float32
    model = for_inference(_model(), "auto")
    if fast:  # cast once, row-major (no autocast: it would cast every weight at every step)
        assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
        assert not any(type(m) is DecodeLinear for m in model.modules())
    else:
        assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    with pytest.raises(Exception, match="unknown dtype policy"):
        precision.inference_dtype("int4", "cpu")


def test_for_inference_leaves_packed_weights_packed():
    from lmsmith.quant.linear import apply_quantization
    from lmsmith.recipes.generate import for_inference

    model = _model()
    apply_quantization(model, "int8")
    model = for_inference(model, "bf16")
    scales = [m.weight_scale for m in model.modules() if hasattr(m, "qweight")]
    assert scales and all(s.dtype == torch.float32 for s in scales)  # the kernels need fp32 scales
    assert model.model.norm.weight.dtype == torch.float32


def test_generate_cli_dtype_bf16_equals_the_api_on_bf16_weights(tmp_path, capsys):
    from lmsmith.cli import main
    from lmsmith.decoding import generate
    from lmsmith.recipes.generate import for_inference
    from lmsmith.tokenizer import Tokenizer

    tok = Tokenizer.train(["the cat sat on the mat. def f(x): return x + 1\n" * 20], vocab_size=300,
                          show_progress=False)
    save(_model(vocab_size=300), tok, tmp_path / "m")
    model, tok = load(tmp_path / "m")
    want = generate(for_inference(model, "bf16"), tok, "the cat", max_new_tokens=12)
    assert main(["generate", str(tmp_path / "m"), "--prompt", "the cat", "--max-new-tokens", "12",
                 "--dtype", "bf16"]) == 0
    assert capsys.readouterr().out == "the cat" + want + "\n"


def test_small_matrices_keep_the_plain_layout():
    # Under MIN_WEIGHTS a matrix sits in the caches and the split only adds work.
    small, big = nn.Linear(192, 512, bias=False), nn.Linear(512, 1024, bias=False)
    assert 192 * 512 < MIN_WEIGHTS <= 512 * 1024
    use_decode_layout(small), use_decode_layout(big)
    assert type(small) is nn.Linear and small.weight.is_contiguous()
    assert type(big) is DecodeLinear and is_column_major(big.weight)
