"""GGUF block formats and per-tensor mixes, checked against the `gguf` package and llama.cpp's rules."""

import numpy as np
import pytest

from lmsmith.errors import LmsmithError
from lmsmith.quant import (
    QType,
    dequantize,
    fallback_type,
    plan_mix,
    quantize,
    scheme_names,
    tensor_types,
    type_info,
)

gguf = pytest.importorskip("gguf")
from gguf import quants as gq  # noqa: E402

ALL = [
    QType.Q8_0,
    QType.Q4_0,
    QType.Q5_0,
    QType.Q5_1,
    QType.Q3_K,
    QType.Q4_K,
    QType.Q5_K,
    QType.Q6_K,
    QType.F16,
    QType.BF16,
    QType.F32,
]
KQUANTS = [QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K]


def _rel_rmse(y, x):
    return float(np.sqrt(np.mean((y - x) ** 2)) / np.sqrt(np.mean(x**2)))


def _gaussian(rows=64, cols=1024, seed=1234):
    return np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)


def _nasty(cols=512):
    """Rows that stress the scale searches: outliers, zeros, constants, tiny and huge magnitudes."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((16, cols)).astype(np.float32)
    x[0, 3] = 40.0  # one outlier
    x[1, ::37] = -25.0  # several negative outliers
    x[2] = 0.0
    x[3] = 1.25  # constant positive
    x[4] = -0.75  # constant negative
    x[5] *= 1e-3  # tiny (scales in fp16 subnormals)
    x[6] *= 1e-9  # below fp16's range for the scales: must become zeros
    x[7] *= 300.0  # huge (scales still within fp16)
    x[8] = np.abs(x[8])  # all positive
    x[9] = -np.abs(x[9])  # all negative
    x[10, : cols // 2] = 0.0  # half zero
    x[11] = rng.standard_t(2, cols)  # heavy tails
    x[12, 16:32] = 0.0  # a zero sub-block inside a live block
    return x


def test_type_identity_and_sizes_match_gguf():
    for qt in ALL:
        g = gguf.GGMLQuantizationType[qt.name]
        assert qt == g
        assert (type_info(qt).block_size, type_info(qt).type_size) == gguf.GGML_QUANT_SIZES[g]
    assert type_info("q4_k").bits_per_weight == 4.5
    assert type_info(QType.Q3_K).bits_per_weight == 3.4375
    assert type_info(gguf.GGMLQuantizationType.Q6_K).bits_per_weight == 6.5625
    assert type_info("Q8_0").row_bytes(4096) == 128 * 34


# measured on this data: Q8_0 0.53%, Q4_0 8.58, Q5_0 4.25, Q5_1 3.80, Q3_K 15.07, Q4_K 7.18,
# Q5_K 3.63, Q6_K 1.77, F16 0.021, BF16 0.165
BOUNDS = {
    QType.Q8_0: 0.006,
    QType.Q4_0: 0.09,
    QType.Q5_0: 0.045,
    QType.Q5_1: 0.040,
    QType.Q3_K: 0.155,
    QType.Q4_K: 0.075,
    QType.Q5_K: 0.038,
    QType.Q6_K: 0.019,
    QType.F16: 0.0003,
    QType.BF16: 0.002,
    QType.F32: 0.0,
}


@pytest.mark.parametrize("qt", ALL, ids=lambda q: q.name)
def test_roundtrip_error_bound(qt):
    x = _gaussian()
    data = quantize(x, qt)
    assert data.dtype == np.uint8 and data.shape == (64, type_info(qt).row_bytes(1024))
    y = dequantize(data, qt, x.shape)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert _rel_rmse(y, x) <= BOUNDS[qt]


@pytest.mark.parametrize("qt", ALL, ids=lambda q: q.name)
def test_gguf_reads_our_bytes_bit_for_bit(qt):
    x = _nasty()
    data = quantize(x, qt)
    ours = dequantize(data, qt, x.shape)
    ref = gq.dequantize(data, gguf.GGMLQuantizationType[qt.name]).astype(np.float32)
    assert ref.shape == x.shape
    np.testing.assert_array_equal(ours.view(np.uint32), ref.view(np.uint32))
    assert np.isfinite(ours).all()
    # degenerate rows decode sensibly
    assert not ours[2].any()
    if type_info(qt).block_size > 1:
        assert not ours[6].any()  # scales below fp16's range: the block is zero, not garbage
    assert np.allclose(ours[3], 1.25, rtol=0.02) and np.allclose(ours[4], -0.75, rtol=0.02)
    tol = {QType.Q3_K: 0.45, QType.Q4_0: 0.4, QType.Q4_K: 0.2}.get(qt, 0.15)
    assert _rel_rmse(ours[7], x[7]) < tol and _rel_rmse(ours[5], x[5]) < tol


@pytest.mark.parametrize("qt", [QType.Q8_0, QType.Q4_0, QType.Q5_0, QType.Q5_1, QType.F16, QType.BF16])
def test_reference_formats_bytes_equal_gguf_quantize(qt):
    for x in (_gaussian(16, 256, seed=3), _nasty(256)):
        ours = quantize(x, qt)
        ref = gq.quantize(x, gguf.GGMLQuantizationType[qt.name]).view(np.uint8).reshape(ours.shape)
        np.testing.assert_array_equal(ours, ref)


def _plain_minmax(x, qt):
    """A plain min/max quantizer with the K-quant sub-block sizes (and unquantized sub-block scales)."""
    if qt in (QType.Q4_K, QType.Q5_K):
        nmax = 15 if qt == QType.Q4_K else 31
        b = x.reshape(-1, 32)
        mn, mx = np.minimum(b.min(1, keepdims=True), 0), b.max(1, keepdims=True)
        d = (mx - mn) / nmax
        y = np.clip(np.rint((b - mn) / d), 0, nmax) * d + mn
    else:  # symmetric: the extreme weight maps to -nmax
        nmax = 4 if qt == QType.Q3_K else 32
        b = x.reshape(-1, 16)
        ext = np.take_along_axis(b, np.abs(b).argmax(1)[:, None], 1)
        d = ext / -nmax
        y = np.clip(np.rint(b / d), -nmax, nmax - 1) * d
    return y.reshape(x.shape)


@pytest.mark.parametrize("qt", KQUANTS, ids=lambda q: q.name)
def test_scale_search_beats_plain_minmax(qt):
    rng = np.random.default_rng(11)
    for x in (_gaussian(32, 1024, seed=5), rng.standard_t(3, (32, 1024)).astype(np.float32)):
        ours = _rel_rmse(dequantize(quantize(x, qt), qt, x.shape), x)
        assert ours < _rel_rmse(_plain_minmax(x, qt), x)


def test_fallback_types_follow_llama_cpp():
    assert fallback_type(QType.Q4_K, 4096) == QType.Q4_K
    # cols=288: a multiple of 32 but not of 256
    assert fallback_type(QType.Q3_K, 288) == QType.Q4_0
    assert fallback_type(QType.Q4_K, 288) == QType.Q5_0
    assert fallback_type(QType.Q5_K, 288) == QType.Q5_1
    assert fallback_type(QType.Q6_K, 288) == QType.Q8_0
    # cols=100: not even a multiple of 32
    for qt in (QType.Q3_K, QType.Q4_K, QType.Q6_K, QType.Q8_0, QType.Q4_0):
        assert fallback_type(qt, 100) == QType.F16
    assert fallback_type(QType.F32, 100) == QType.F32


def test_quantize_refuses_misfit_rows_and_fallback_works():
    x = _gaussian(8, 288)
    with pytest.raises(LmsmithError, match=r"multiple of 256.*Q5_0"):
        quantize(x, QType.Q4_K)
    alt = fallback_type(QType.Q4_K, 288)
    y = dequantize(quantize(x, alt), alt, x.shape)
    assert _rel_rmse(y, x) < 0.05


def test_mix_reports_fallbacks():
    shapes = {
        "token_embd.weight": (1000, 288),
        "blk.0.attn_q.weight": (288, 288),
        "blk.0.ffn_down.weight": (288, 768),
        "blk.0.ffn_up.weight": (768, 100),
        "blk.0.attn_norm.weight": (288,),
        "output.weight": (1000, 288),
    }
    plan = plan_mix("q4_k_m", shapes, 1)
    assert plan.types["blk.0.attn_q.weight"] == QType.Q5_0
    assert plan.types["blk.0.ffn_down.weight"] == QType.Q6_K  # 768 = 3*256 fits; layer 0 uses more bits
    assert plan.types["blk.0.ffn_up.weight"] == QType.F16
    assert plan.types["blk.0.attn_norm.weight"] == QType.F32
    # llama.cpp's output rule picks Q8_0 itself when the row does not fit the base type's block
    assert plan.types["output.weight"] == QType.Q8_0
    assert plan.fallbacks == {
        "token_embd.weight": (QType.Q4_K, QType.Q5_0),
        "blk.0.attn_q.weight": (QType.Q4_K, QType.Q5_0),
        "blk.0.ffn_up.weight": (QType.Q4_K, QType.F16),
    }


def _llama_shapes(n_layers, tied=False):
    dim, kv, ff, vocab = 512, 128, 1536, 1024
    shapes = {"token_embd.weight": (vocab, dim)}
    for i in range(n_layers):
        shapes.update(
            {
                f"blk.{i}.attn_norm.weight": (dim,),
                f"blk.{i}.attn_q.weight": (dim, dim),
                f"blk.{i}.attn_k.weight": (kv, dim),
                f"blk.{i}.attn_v.weight": (kv, dim),
                f"blk.{i}.attn_output.weight": (dim, dim),
                f"blk.{i}.ffn_norm.weight": (dim,),
                f"blk.{i}.ffn_gate.weight": (ff, dim),
                f"blk.{i}.ffn_up.weight": (ff, dim),
                f"blk.{i}.ffn_down.weight": (dim, ff),
            }
        )
    shapes["output_norm.weight"] = (dim,)
    if not tied:
        shapes["output.weight"] = (vocab, dim)
    return shapes


def _per_layer(types, tensor, n):
    return "".join(
        {QType.Q3_K: "3", QType.Q4_K: "4", QType.Q5_K: "5", QType.Q6_K: "6"}[types[f"blk.{i}.{tensor}.weight"]]
        for i in range(n)
    )


def test_q4_k_m_matches_llama_cpp_for_32_layers():
    types = tensor_types("Q4_K_M", _llama_shapes(32), 32)
    # use_more_bits(i, 32): i < 4, i >= 28, or (i - 4) % 3 == 2 -> layers 0-3, 6, 9, ..., 27, 28-31 get Q6_K
    #            layer: 0         1         2         3
    #                   01234567890123456789012345678901
    more_bits = "66664464464464464464464464466666"
    assert _per_layer(types, "attn_v", 32) == more_bits
    assert _per_layer(types, "ffn_down", 32) == more_bits
    for t in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
        assert _per_layer(types, t, 32) == "4" * 32, t
    assert types["output.weight"] == QType.Q6_K
    assert types["token_embd.weight"] == QType.Q4_K
    assert types["output_norm.weight"] == types["blk.7.ffn_norm.weight"] == QType.F32


def test_q3_k_m_matches_llama_cpp_for_32_layers():
    types = tensor_types("q3_k_m", _llama_shapes(32), 32)
    assert _per_layer(types, "attn_v", 32) == "55" + "4" * 30  # first two attn_v get Q5_K
    assert _per_layer(types, "ffn_down", 32) == "55" + "4" * 30  # i < 32/16
    assert _per_layer(types, "attn_output", 32) == "4" * 32
    for t in ("attn_q", "attn_k", "ffn_gate", "ffn_up"):
        assert _per_layer(types, t, 32) == "3" * 32, t
    assert types["output.weight"] == QType.Q6_K
    assert types["token_embd.weight"] == QType.Q3_K
    assert types["blk.0.attn_norm.weight"] == QType.F32


def test_tied_embeddings_take_the_output_type():
    assert tensor_types("q4_k_m", _llama_shapes(2, tied=True), 2)["token_embd.weight"] == QType.Q6_K
    assert tensor_types("q3_k_m", _llama_shapes(2, tied=True), 2)["token_embd.weight"] == QType.Q6_K
    assert tensor_types("q8_0", _llama_shapes(2, tied=True), 2)["token_embd.weight"] == QType.Q8_0


def test_plain_schemes():
    shapes = _llama_shapes(4)
    q8 = tensor_types("q8_0", shapes, 4)
    assert {t for n, t in q8.items() if "norm" not in n} == {QType.Q8_0}
    q40 = tensor_types("q4_0", shapes, 4)
    assert q40["output.weight"] == QType.Q6_K and q40["blk.0.attn_v.weight"] == QType.Q4_0
    q6 = tensor_types("q6_k", shapes, 4)
    assert {t for n, t in q6.items() if "norm" not in n} == {QType.Q6_K}
    q5 = tensor_types("q5_k_m", shapes, 4)
    # use_more_bits(i, 4): i < 0? no; i >= 3; (i - 0) % 3 == 2 -> layers 2 and 3
    assert _per_layer(q5, "attn_v", 4) == _per_layer(q5, "ffn_down", 4) == "5566"
    assert q5["blk.0.attn_q.weight"] == QType.Q5_K and q5["output.weight"] == QType.Q6_K
    for scheme, qt in (("f16", QType.F16), ("bf16", QType.BF16), ("f32", QType.F32)):
        types = tensor_types(scheme, shapes, 4)
        assert types["output.weight"] == types["blk.1.attn_v.weight"] == types["token_embd.weight"] == qt
        assert types["blk.1.ffn_norm.weight"] == QType.F32


def test_70b_attn_v_rule():
    shapes = {f"blk.{i}.attn_v.weight": (1024, 8192) for i in range(80)}
    gqa = tensor_types("q3_k_m", shapes, 80, n_head=64, n_head_kv=8)
    assert {gqa[f"blk.{i}.attn_v.weight"] for i in range(80)} == {QType.Q5_K}
    mha = tensor_types("q3_k_m", shapes, 80, n_head=64, n_head_kv=64)
    assert mha["blk.5.attn_v.weight"] == QType.Q4_K


def test_unknown_scheme_lists_known_ones():
    with pytest.raises(LmsmithError) as err:
        tensor_types("q2_k", {"output.weight": (10, 256)}, 1)
    for name in scheme_names():
        assert name in str(err.value)
    assert {"q4_k_m", "q3_k_m", "q8_0", "q4_0", "q6_k", "q5_k_m", "f16", "bf16", "f32"} <= set(scheme_names())


def test_bad_inputs_error_clearly():
    with pytest.raises(LmsmithError, match="2-D"):
        quantize(np.zeros(256, np.float32), "q4_k")
    with pytest.raises(LmsmithError, match="2-D"):
        quantize(np.zeros((2, 2, 256), np.float32), "q4_k")
    with pytest.raises(LmsmithError, match="NaN or inf"):
        quantize(np.full((1, 32), np.nan, np.float32), "q8_0")
    with pytest.raises(LmsmithError, match="unsupported tensor type"):
        quantize(np.zeros((1, 256), np.float32), "iq2_xs")
    data = quantize(np.zeros((2, 256), np.float32), "q6_k")
    with pytest.raises(LmsmithError, match="must be 630 bytes"):
        dequantize(data, "q6_k", (3, 256))
    with pytest.raises(LmsmithError, match="blk.N"):
        tensor_types("q4_k_m", {"blk.9.attn_v.weight": (256, 256)}, 4)
    with pytest.raises(LmsmithError, match="n_layers"):
        tensor_types("q4_k_m", {}, 0)
