"""Checkpoints: logits parity with transformers both ways, sharding, dtypes, atomic writes, bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import lmsmith
from lmsmith import checkpoint as ck
from lmsmith import fileio
from lmsmith.config import ModelConfig
from lmsmith.errors import LmsmithError
from lmsmith.model import build_model

transformers = pytest.importorskip("transformers")

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16}

# Every variant the loader must map: (id, ModelConfig kwargs).
CONFIGS = {
    "mha-untied": dict(n_heads=4, n_kv_heads=4, tie_embeddings=False),
    "gqa-tied": dict(n_heads=4, n_kv_heads=2, tie_embeddings=True),
    "mqa": dict(n_heads=4, n_kv_heads=1, tie_embeddings=False),
    "qwen2": dict(n_heads=4, n_kv_heads=2, qkv_bias=True, arch="qwen2", rope_theta=1e6, norm_eps=1e-6),
    "mistral": dict(n_heads=4, n_kv_heads=2, arch="mistral", tie_embeddings=False, sliding_window=4096),
    "llama3-rope": dict(n_heads=4, n_kv_heads=2, rope_theta=500000.0, rope_scaling=LLAMA3_SCALING),
    "odd-sizes": dict(n_heads=4, n_kv_heads=2, head_dim=24, hidden_dim=100, vocab_size=250),
}


def make_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=256, dim=64, n_layers=2, hidden_dim=128, max_seq_len=128)
    return ModelConfig(**{**base, **kw})


def prompts(cfg: ModelConfig, batch: int = 3, length: int = 40) -> torch.Tensor:
    # 40 positions: past llama3's original_max_position_embeddings (16), so the scaling matters.
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, cfg.vocab_size, (batch, length), generator=g)


@torch.no_grad()
def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Random values everywhere, norms and biases included (their defaults 1/0 would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=g) * 0.1 + (1.0 if "norm" in name else 0.0)
        p.copy_(noise.to(p.dtype))


def hf_model(cfg: ModelConfig):
    """A transformers model of this shape with its own random init (then perturbed)."""
    hf_cfg = transformers.AutoConfig.for_model(**{k: v for k, v in cfg.to_hf().items() if k != "architectures"})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager")
    randomize(model, seed=3)
    return model.eval()


def hf_load(path, **kw):
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", **kw).eval()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_transformers_to_lmsmith(name, tmp_path):
    cfg = make_cfg(**CONFIGS[name])
    ref = hf_model(cfg)
    ref.save_pretrained(tmp_path)
    model, tok = lmsmith.load(tmp_path)
    assert tok is None
    assert model.config.tie_embeddings == cfg.tie_embeddings
    x = prompts(cfg)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_lmsmith_to_transformers(name, tmp_path):
    cfg = make_cfg(**CONFIGS[name])
    model = build_model(cfg, seed=0)
    randomize(model, seed=4)
    ck.save(model, None, tmp_path / "ckpt")
    ref = hf_load(tmp_path / "ckpt")
    assert type(ref).__name__ == cfg.to_hf()["architectures"][0]
    x = prompts(cfg)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x).logits, atol=1e-4, rtol=0)
    # and our own round trip is exact
    again, _ = lmsmith.load(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_sharded_both_ways(tmp_path):
    cfg = make_cfg(**CONFIGS["gqa-tied"])
    model = build_model(cfg, seed=0)
    ck.save(model, None, tmp_path / "ours", max_shard_size="40KB")
    files = sorted(os.listdir(tmp_path / "ours"))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2 and "model.safetensors.index.json" in files
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    x = prompts(cfg)
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(hf_load(tmp_path / "ours")(x).logits, want, atol=1e-4, rtol=0)
        loaded, _ = lmsmith.load(tmp_path / "ours")
        assert torch.equal(loaded(x), want)

    ref = hf_model(make_cfg(**CONFIGS["mha-untied"]))
    ref.save_pretrained(tmp_path / "theirs", max_shard_size="40KB")
    assert (tmp_path / "theirs" / "model.safetensors.index.json").is_file()
    loaded, _ = lmsmith.load(tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ref(x).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_files(dtype, tmp_path):
    cfg = make_cfg(**CONFIGS["gqa-tied"])
    model = build_model(cfg, seed=0)
    ck.save(model, None, tmp_path / "ours", dtype=dtype)
    hf_cfg = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert hf_cfg["torch_dtype"] == str(dtype).removeprefix("torch.")

    # dtype=None keeps the file's dtype; dtype=fp32 converts and equals the rounded fp32 model.
    half, _ = lmsmith.load(tmp_path / "ours")
    assert {p.dtype for p in half.parameters()} == {dtype}
    full, _ = lmsmith.load(tmp_path / "ours", dtype="fp32")
    rounded = build_model(cfg, seed=0).to(dtype).float()
    x = prompts(cfg)
    with torch.no_grad():
        torch.testing.assert_close(full(x), rounded(x), atol=1e-5, rtol=0)
        # transformers reads the half-precision file too
        theirs = hf_load(tmp_path / "ours", dtype=torch.float32)
        torch.testing.assert_close(theirs(x).logits, full(x), atol=1e-4, rtol=0)

    # a half-precision file written by transformers
    ref = hf_model(cfg).to(dtype)
    ref.save_pretrained(tmp_path / "theirs")
    loaded, _ = lmsmith.load(tmp_path / "theirs")
    assert loaded.model.embed_tokens.weight.dtype == dtype
    for name, p in ref.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], p), name


def test_load_to_dtype_and_weights_writable_without_touching_file(tmp_path):
    cfg = make_cfg(**CONFIGS["mha-untied"])
    ck.save(build_model(cfg, seed=0), None, tmp_path / "m")
    a, _ = lmsmith.load(tmp_path / "m", dtype=torch.bfloat16)
    assert a.lm_head.weight.dtype == torch.bfloat16 and a.inv_freq.dtype == torch.float32
    b, _ = lmsmith.load(tmp_path / "m")
    before = b.model.norm.weight.clone()
    with torch.no_grad():
        b.model.norm.weight.add_(1.0)  # memory-mapped copy-on-write: the file must not change
    c, _ = lmsmith.load(tmp_path / "m")
    assert torch.equal(c.model.norm.weight, before)
    assert not any(p.is_meta for p in c.parameters())


def test_tied_model_stays_tied(tmp_path):
    cfg = make_cfg(**CONFIGS["gqa-tied"])
    ck.save(build_model(cfg, seed=0), None, tmp_path / "m")
    from safetensors import safe_open

    with safe_open(tmp_path / "m" / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()  # noqa: SIM118 (safe_open is not a mapping)
    m, _ = lmsmith.load(tmp_path / "m")
    assert m.lm_head.weight is m.model.embed_tokens.weight


def test_generation_config_and_tokenizer_round_trip(tmp_path):
    tokenizer_mod = pytest.importorskip("lmsmith.tokenizer")
    texts = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(200)]
    tok = tokenizer_mod.Tokenizer.train(texts, vocab_size=270, show_progress=False)
    cfg = make_cfg(**CONFIGS["gqa-tied"]).replace(vocab_size=tok.vocab_size)
    model = build_model(cfg, seed=0)
    ck.save(model, tok, tmp_path / "m")
    names = set(os.listdir(tmp_path / "m"))
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= names
    gen = json.loads((tmp_path / "m" / "generation_config.json").read_text())
    assert gen["do_sample"] is False and gen["eos_token_id"] in (tok.eos_id, tok.eos_ids)
    hf_cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert hf_cfg["bos_token_id"] == tok.bos_id and hf_cfg["pad_token_id"] == tok.pad_id

    m2, tok2 = lmsmith.load(tmp_path / "m")
    ids = tok.encode("def g(x): return x")
    assert tok2.encode("def g(x): return x") == ids
    assert tok2.eos_id == tok.eos_id and tok2.vocab_size == tok.vocab_size
    x = torch.tensor([ids])
    with torch.no_grad():
        assert torch.equal(m2(x), model(x))
    # transformers reads the whole directory, tokenizer included
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "m")
    assert hf_tok("def g(x): return x", add_special_tokens=False)["input_ids"] == ids


# ---- atomic writes ----------------------------------------------------------------------------


def _leftovers(parent: Path, name: str) -> list[str]:
    return [p for p in os.listdir(parent) if p.startswith(name + ".")]


def test_atomic_save_crash_keeps_previous(tmp_path, monkeypatch):
    cfg = make_cfg(**CONFIGS["gqa-tied"])
    first = build_model(cfg, seed=0)
    ck.save(first, None, tmp_path / "ckpt")
    before = {f: (tmp_path / "ckpt" / f).read_bytes() for f in os.listdir(tmp_path / "ckpt")}

    real = ck.write_safetensors

    def crash(tensors, file, **kw):
        with open(file, "wb") as fh:
            fh.write(b"half a file")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ck, "write_safetensors", crash)
    with pytest.raises(OSError, match="simulated"):
        ck.save(build_model(cfg, seed=1), None, tmp_path / "ckpt")
    after = {f: (tmp_path / "ckpt" / f).read_bytes() for f in os.listdir(tmp_path / "ckpt")}
    assert after == before
    assert _leftovers(tmp_path, "ckpt") == []

    # a crash in the caller's extra writer is rolled back the same way
    monkeypatch.setattr(ck, "write_safetensors", real)

    def bad_extra(d):
        (d / "train_state").mkdir()
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        ck.save(build_model(cfg, seed=1), None, tmp_path / "ckpt", extra=bad_extra)
    assert not (tmp_path / "ckpt" / "train_state").exists()
    assert _leftovers(tmp_path, "ckpt") == []

    # a crash before anything exists leaves nothing under the final name
    monkeypatch.setattr(ck, "write_safetensors", crash)
    with pytest.raises(OSError):
        ck.save(first, None, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists() and _leftovers(tmp_path, "fresh") == []


def test_save_replaces_and_extra_lands_inside(tmp_path):
    cfg = make_cfg(**CONFIGS["gqa-tied"])
    ck.save(build_model(cfg, seed=0), None, tmp_path / "ckpt", max_shard_size="40KB")
    ck.save(build_model(cfg, seed=1), None, tmp_path / "ckpt",
            extra=lambda d: (d / "train_state").mkdir() or (d / "train_state" / "step.json").write_text("7"))
    names = os.listdir(tmp_path / "ckpt")
    assert "model.safetensors" in names and "model.safetensors.index.json" not in names  # old shards gone
    assert (tmp_path / "ckpt" / "train_state" / "step.json").read_text() == "7"
    assert _leftovers(tmp_path, "ckpt") == []
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(tmp_path / "ckpt").st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700
    m, _ = lmsmith.load(tmp_path / "ckpt")
    with torch.no_grad():
        x = prompts(cfg)
        assert torch.equal(m(x), build_model(cfg, seed=1)(x))


def test_save_atomic_dir_helper(tmp_path):
    fileio.save_atomic_dir(tmp_path / "d", lambda d: (d / "a.txt").write_text("x"))
    assert (tmp_path / "d" / "a.txt").read_text() == "x"


def test_parse_size():
    assert ck.parse_size("2GB") == 2 * 10**9
    assert ck.parse_size("500MiB") == 500 * 2**20
    assert ck.parse_size(123) == 123
    with pytest.raises(LmsmithError):
        ck.parse_size("lots")


# ---- bad input: one-line LmsmithError naming the file -------------------------------------------


@pytest.fixture
def saved(tmp_path):
    cfg = make_cfg(**CONFIGS["mha-untied"])
    ck.save(build_model(cfg, seed=0), None, tmp_path / "m")
    return tmp_path / "m"


def _err(path, match: str) -> str:
    with pytest.raises(LmsmithError) as e:
        lmsmith.load(path)
    msg = str(e.value)
    assert "\n" not in msg
    assert match in msg, msg
    return msg


def test_missing_directory(tmp_path):
    _err(tmp_path / "nope", str(tmp_path / "nope"))


def test_path_is_a_file(tmp_path):
    (tmp_path / "f.txt").write_text("x")
    _err(tmp_path / "f.txt", "f.txt")


def test_no_config(saved):
    (saved / "config.json").unlink()
    _err(saved, "config.json")


def test_config_not_json(saved):
    (saved / "config.json").write_text("{not json")
    msg = _err(saved, "config.json")
    assert "JSON" in msg


def test_unknown_architecture(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (saved / "config.json").write_text(json.dumps(cfg))
    msg = _err(saved, "config.json")
    assert "LlamaForCausalLM" in msg and "Qwen2ForCausalLM" in msg


def test_truncated_safetensors(saved):
    f = saved / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    _err(saved, "model.safetensors")


def test_garbage_safetensors(saved):
    (saved / "model.safetensors").write_bytes(b"\x00\x01garbage" * 10)
    _err(saved, "model.safetensors")


def test_shape_mismatch(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (saved / "config.json").write_text(json.dumps(cfg))
    msg = _err(saved, "model.safetensors")
    assert "mlp" in msg and ("[128, 64]" in msg or "[64, 128]" in msg) and "96]" in msg


def _rewrite(saved: Path, fn) -> None:
    from safetensors.torch import load_file, save_file

    sd = load_file(saved / "model.safetensors")
    fn(sd)
    save_file({k: v.clone() for k, v in sd.items()}, saved / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor(saved):
    _rewrite(saved, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    msg = _err(saved, "missing tensors")
    assert "model.layers.1.mlp.up_proj.weight" in msg and str(saved) in msg


def test_unexpected_tensor(saved):
    _rewrite(saved, lambda sd: sd.update({"model.layers.7.mlp.up_proj.weight": torch.zeros(2)}))
    msg = _err(saved, "model.safetensors")
    assert "model.layers.7.mlp.up_proj.weight" in msg and "unexpected" in msg


def test_pickle_only_is_refused(saved):
    (saved / "model.safetensors").rename(saved / "pytorch_model.bin")
    msg = _err(saved, "pytorch_model.bin")
    assert "save_pretrained" in msg and "safe_serialization" in msg


def test_missing_shard(tmp_path):
    cfg = make_cfg(**CONFIGS["mha-untied"])
    ck.save(build_model(cfg, seed=0), None, tmp_path / "m", max_shard_size="40KB")
    victim = sorted((tmp_path / "m").glob("model-*.safetensors"))[1]
    victim.unlink()
    _err(tmp_path / "m", victim.name)


def test_truncated_gguf_is_a_clear_error(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    _err(tmp_path / "m.gguf", "GGUF")


def test_read_config(saved):
    cfg = ck.read_config(saved)
    assert cfg.dim == 64 and cfg.n_layers == 2 and not cfg.tie_embeddings


def test_missing_dir_points_at_leftover_old(tmp_path):
    (tmp_path / "ckpt.old-x1y2").mkdir()  # what a crash between the two renames would leave
    msg = _err(tmp_path / "ckpt", "ckpt.old-x1y2")
    assert "rename" in msg
