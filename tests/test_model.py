"""The decoder: KV-cache decoding, padding, config validation, preset sizes, meta-device build."""

from __future__ import annotations

import pytest
import torch

from lmsmith.config import PRESETS, ModelConfig, preset
from lmsmith.errors import LmsmithError
from lmsmith.model import KVCache, build_model


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, max_seq_len=64)
    return ModelConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def model():
    return build_model(tiny_cfg(), seed=0).eval()


def ids(n: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, n), generator=torch.Generator().manual_seed(seed))


# ---- KV cache ----------------------------------------------------------------------------------


@pytest.mark.parametrize("grad", [False, True])  # SDPA with an offset mask / explicit attention with an offset
@pytest.mark.parametrize("chunks", [[1] * 6, [5, 1, 1, 1], [3, 4, 1, 1], [2, 3, 4], [9]])
def test_cache_matches_full_forward(model, chunks, grad):
    """Prefill chunk(s) then single tokens: every step's logits equal the full forward's."""
    x = ids(sum(chunks), batch=2)
    with torch.no_grad():
        full = model(x)  # (B, T, V)
    cache = KVCache(model.config, batch_size=2, max_len=32)
    start = 0
    for n in chunks:
        with torch.set_grad_enabled(grad):
            out = model(x[:, start:start + n], cache=cache)
        torch.testing.assert_close(out.detach(), full[:, start:start + n], atol=1e-5, rtol=0)
        start += n
        assert cache.length == start


@torch.no_grad()
def test_cache_last_only(model):
    x = ids(7)
    cache = KVCache(model.config, 1, 16)
    out = model(x, cache=cache, last_only=True)
    assert out.shape == (1, 1, 256)
    torch.testing.assert_close(out[:, 0], model(x)[:, -1], atol=1e-5, rtol=0)


def test_cache_overflow_is_an_error(model):
    cache = KVCache(model.config, 1, 4)
    with pytest.raises(ValueError, match="full"):
        model(ids(5), cache=cache)


@torch.no_grad()
def test_cache_reorder(model):
    x = ids(6, batch=3)
    cache = KVCache(model.config, 3, 16)
    model(x, cache=cache)
    cache.reorder(torch.tensor([2, 0]))
    nxt = ids(1, batch=3, seed=5)
    out = model(nxt[[2, 0]], cache=cache)
    want = model(torch.cat([x, nxt], dim=1))[[2, 0], -1:]
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)


# ---- padding -----------------------------------------------------------------------------------


@torch.no_grad()
def test_left_padded_batch_matches_single_rows(model):
    lengths = [7, 3, 5]
    rows = [ids(n, seed=i)[0] for i, n in enumerate(lengths)]
    T = max(lengths)
    batch = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    positions = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r)
        batch[i, T - n:] = r
        mask[i, T - n:] = 1
        positions[i, T - n:] = torch.arange(n)  # real tokens count from 0 whatever the padding

    out = model(batch, attention_mask=mask, positions=positions)
    assert torch.isfinite(out).all()  # padding rows see themselves, not NaN
    for i, r in enumerate(rows):
        n = len(r)
        torch.testing.assert_close(out[i, T - n:], model(r[None])[0], atol=1e-5, rtol=0)

    # ... and decoding continues correctly from a padded, cached prefill.
    cache = KVCache(model.config, len(rows), 16)
    model(batch, attention_mask=mask, positions=positions, cache=cache)
    nxt = ids(1, batch=len(rows), seed=9)
    mask2 = torch.cat([mask, torch.ones(len(rows), 1, dtype=torch.long)], dim=1)
    pos2 = torch.tensor([[n] for n in lengths])
    step = model(nxt, attention_mask=mask2, positions=pos2, cache=cache)
    for i, r in enumerate(rows):
        want = model(torch.cat([r, nxt[i]])[None])[0, -1]
        torch.testing.assert_close(step[i, 0], want, atol=1e-5, rtol=0)


# ---- config validation -------------------------------------------------------------------------


def test_dim_not_divisible_by_heads():
    with pytest.raises(LmsmithError, match="divisible by n_heads"):
        ModelConfig(dim=100, n_heads=3)
    # an explicit head_dim lifts the restriction
    assert ModelConfig(dim=100, n_heads=3, head_dim=32).head_dim == 32


def test_kv_heads_must_divide_heads():
    with pytest.raises(LmsmithError, match="must divide n_heads"):
        ModelConfig(dim=64, n_heads=4, n_kv_heads=3)


def test_positive_fields():
    with pytest.raises(LmsmithError, match="n_layers"):
        ModelConfig(n_layers=0)


def test_unknown_preset_lists_presets():
    with pytest.raises(LmsmithError) as e:
        preset("llama-9")
    for name in PRESETS:
        assert name in str(e.value)


def test_unsupported_rope_scaling():
    with pytest.raises(LmsmithError, match="llama3"):
        tiny_cfg(rope_scaling={"rope_type": "yarn", "factor": 4.0})


# ---- sizes -------------------------------------------------------------------------------------

# Published parameter counts of the real models these presets copy.
REAL_SIZES = {
    "smollm2-135m": 134_515_008,
    "qwen2.5-0.5b": 494_032_768,
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.1-8b": 8_030_261_248,
}


@pytest.mark.parametrize("name", list(REAL_SIZES))
def test_preset_sizes_match_real_models(name):
    assert preset(name).num_params() == pytest.approx(REAL_SIZES[name], rel=1e-3)


def test_405b_preset_size():
    assert preset("llama-3.1-405b").num_params() == pytest.approx(405.85e9, rel=1e-3)


@pytest.mark.parametrize("name", ["tiny", "small", "smollm2-135m"])
def test_built_model_matches_config_count(name):
    cfg = preset(name)
    model = build_model(cfg, init=False)  # counting needs shapes only: meta is enough
    assert model.num_params() == cfg.num_params()


def test_built_model_counts_for_odd_shapes():
    for cfg in [tiny_cfg(qkv_bias=True, arch="qwen2"), tiny_cfg(tie_embeddings=False, head_dim=24, hidden_dim=100)]:
        assert build_model(cfg, seed=0).num_params() == cfg.num_params()


def test_meta_build_allocates_nothing():
    model = build_model(preset("llama-3.1-8b"), init=False)
    assert all(p.is_meta for p in model.parameters())
    assert model.lm_head.weight is not model.model.embed_tokens.weight  # untied preset
    tied = build_model(preset("llama-3.2-1b"), init=False)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight


def test_build_is_seeded_and_dtype():
    a = build_model(tiny_cfg(), seed=3)
    b = build_model(tiny_cfg(), seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    c = build_model(tiny_cfg(), seed=3, dtype=torch.bfloat16)
    assert c.lm_head.weight.dtype == torch.bfloat16
    assert c(ids(4)).dtype == torch.bfloat16


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_training_attention_path_equals_sdpa(n_kv_heads):
    """With gradients on, short sequences take the explicit attention path; it must equal SDPA's."""
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, hidden_dim=64,
                      max_seq_len=32)
    model = build_model(cfg, seed=0)
    x = torch.randint(0, 64, (3, 17))
    with torch.no_grad():
        reference = model(x)  # SDPA
    trained = model(x)  # explicit path (grad enabled)
    assert trained.requires_grad
    torch.testing.assert_close(trained, reference, atol=1e-5, rtol=1e-5)
    trained.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_half_precision_keeps_rotary_frequencies_fp32():
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, hidden_dim=64, max_seq_len=32,
                      rope_theta=500000.0)
    exact = build_model(cfg, seed=0).inv_freq.clone()
    direct = build_model(cfg, seed=0, dtype=torch.bfloat16)
    assert direct.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    cast = build_model(cfg, seed=0).to(torch.bfloat16)
    for m in (direct, cast, cast.half()):
        assert m.inv_freq.dtype == torch.float32
        torch.testing.assert_close(m.inv_freq, exact, rtol=0, atol=0)


def test_an_empty_batch_gives_a_zero_loss():
    """A data-parallel rank's share of a short last evaluation batch can be 0 rows: the forward still runs
    (FSDP gathers weights on every rank) and contributes nothing."""
    import torch

    from lmsmith.config import preset
    from lmsmith.model import build_model

    model = build_model(preset("tiny", vocab_size=64), seed=0)
    ids = torch.zeros(0, 16, dtype=torch.long)
    with torch.no_grad():
        assert float(model(ids, labels=ids)) == 0.0
        assert model(ids).shape == (0, 16, 64)
