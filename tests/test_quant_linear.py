"""Packed quantized inference (QuantLinear, apply_quantization), int8 directories, the quantize verb."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_gguf import PROMPTS, logits, make_model  # noqa: I001  (tests dir is on sys.path)

from lmsmith.errors import LmsmithError
from lmsmith.loader import load as load_int8
from lmsmith.quant import QType, dequantize, quantize
from lmsmith.quant.dequant_torch import q4_k as dequantize_q4_k_torch
from lmsmith.quant.int8 import is_int8_dir, save_int8
from lmsmith.quant.linear import QuantLinear, apply_quantization, resident_bytes


@pytest.fixture(scope="module")
def model_tok():
    return make_model(tie_embeddings=False, seed=3)


def _rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("fmt", ["q8_0", "q4_k"])
def test_quant_linear_equals_f_linear_on_dequantized_weight(fmt):
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(512, 96, bias=True)
    with torch.no_grad():
        lin.weight.normal_(0, 0.05, generator=g)
        lin.bias.normal_(0, 0.1, generator=g)
    q = QuantLinear.from_linear(lin, fmt)
    q.exact = True  # float activations (the default rounds them to int8: tests/test_quant_kernels.py)
    qt = QType[fmt.upper()]
    w = torch.from_numpy(dequantize(quantize(lin.weight.detach().numpy(), qt), qt, (96, 512)))
    torch.testing.assert_close(q.dequantized_weight(), w, rtol=0, atol=0)  # torch and numpy decoders agree
    x = torch.randn(3, 7, 512, generator=g)
    torch.testing.assert_close(q(x), F.linear(x, w, lin.bias), rtol=1e-5, atol=1e-5)
    q._rows_per_chunk = 10  # chunked path gives the same result
    torch.testing.assert_close(q(x), F.linear(x, w, lin.bias), rtol=1e-5, atol=1e-5)
    assert q.qweight.dtype == torch.uint8 and q.qweight.numel() == 96 * 512 * {"q8_0": 34 / 32, "q4_k": 144 / 256}[fmt]


def test_q4_k_torch_decoder_matches_numpy():
    x = np.random.default_rng(0).standard_normal((8, 512)).astype(np.float32)
    data = quantize(x, QType.Q4_K)
    ours = dequantize_q4_k_torch(torch.from_numpy(data).reshape(-1, 144)).reshape(8, 512).numpy()
    np.testing.assert_array_equal(ours, dequantize(data, QType.Q4_K, (8, 512)))


@pytest.mark.parametrize("scheme,max_rel,max_ratio", [("int8", 0.02, 0.27), ("q8_0", 0.02, 0.28),
                                                      ("q4_k", 0.2, 0.16)])
def test_apply_quantization_logits_and_memory(model_tok, scheme, max_rel, max_ratio):
    model, tok = model_tok
    q = copy.deepcopy(model)
    linear_bytes = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, torch.nn.Linear))
    before = resident_bytes(q)
    done = apply_quantization(q, scheme)
    assert "lm_head" in done and "model.layers.0.mlp.down_proj" in done
    assert done["lm_head"] == ("q8_0" if scheme == "q4_k" else scheme)  # the head keeps 8 bits
    after = resident_bytes(q)
    # embedding (float) and norms are unchanged; the linear weights shrink with the bits
    shrink = before - after
    packed = linear_bytes - shrink
    assert packed / linear_bytes < max_ratio
    for p in PROMPTS:
        assert _rel_err(logits(q, tok, p), logits(model, tok, p)) < max_rel
    # greedy decoding with a KV cache runs on the packed model
    from lmsmith.model import KVCache

    ids = torch.tensor([tok.encode(PROMPTS[0])])
    cache = KVCache(q.config, 1, 64)
    with torch.no_grad():
        out = q(ids, cache=cache, last_only=True)
        for _ in range(5):
            out = q(out.argmax(-1), cache=cache)
    assert cache.length == ids.shape[1] + 5


def test_apply_quantization_tied_head_untouched_and_bf16():
    model, tok = make_model(seed=4)
    q = copy.deepcopy(model).to(torch.bfloat16)
    done = apply_quantization(q, "int8")
    assert "lm_head" not in done and q.lm_head.weight is q.model.embed_tokens.weight
    out = logits(q, tok, PROMPTS[1])
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    with pytest.raises(LmsmithError, match="int8"):
        apply_quantization(copy.deepcopy(model), "q2_k")


def test_int8_directory_roundtrip(tmp_path, model_tok):
    model, tok = model_tok
    out = save_int8(model, tok, tmp_path / "int8")
    assert is_int8_dir(out) and not is_int8_dir(tmp_path)
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", framework="pt") as st:
        assert st.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.int8
        assert st.get_tensor("model.layers.0.self_attn.q_proj.weight_scale").shape == (256,)
        assert st.get_tensor("model.norm.weight").dtype == torch.float32
    import json

    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "lmsmith_int8"
    m2, tok2 = load_int8(out)
    assert isinstance(m2.model.layers[0].mlp.up_proj, QuantLinear) and isinstance(m2.lm_head, QuantLinear)
    assert tok2.encode(PROMPTS[0]) == tok.encode(PROMPTS[0])
    for p in PROMPTS:
        assert _rel_err(logits(m2, tok2, p), logits(model, tok, p)) < 0.03
    assert resident_bytes(m2) < 0.4 * resident_bytes(model)
    import lmsmith.checkpoint

    m3, _ = lmsmith.load(out)
    assert isinstance(m3.model.layers[0].mlp.up_proj, QuantLinear)


def test_quantize_cli(tmp_path, model_tok, capsys):
    import lmsmith.checkpoint
    from lmsmith.cli import main

    model, tok = model_tok
    src = tmp_path / "src"
    lmsmith.checkpoint.save(model, tok, src)
    assert main(["quantize", str(src), "--scheme", "q4_k_m", "--out", str(tmp_path / "m.gguf"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "Q4_K_M" in out and "Q6_K" in out and "m.gguf" in out
    assert main(["quantize", str(src), "--scheme", "bf16", "--out", str(tmp_path / "bf16")]) == 0
    m_bf16, _ = lmsmith.load(tmp_path / "bf16")
    assert m_bf16.model.embed_tokens.weight.dtype == torch.bfloat16
    assert main(["quantize", str(src), "--scheme", "q9_z", "--out", str(tmp_path / "x.gguf")]) == 1
    assert "known schemes" in capsys.readouterr().err
    import pydoc_data.topics

    data = tmp_path / "eval.txt"
    data.write_text("\n".join(list(pydoc_data.topics.topics.values())[-3:]))
    assert main(["quantize", str(src), "--report", "--eval-data", str(data), "--schemes", "int8,q3_k_m",
                 "--seq-len", "64", "--max-chars", "1500", "--plot", str(tmp_path / "q.png"),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and "q3_k_m" in out and "1:" in out
    assert (tmp_path / "q.png").stat().st_size > 1000
