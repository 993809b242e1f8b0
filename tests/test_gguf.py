"""GGUF export/import: gguf-py reads what we write; we read back ours and converter-style files."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

from lmsmith.config import ModelConfig
from lmsmith.errors import LmsmithError
from lmsmith.loader import load as load_gguf
from lmsmith.model import build_model
from lmsmith.quant import plan_mix, scheme_names
from lmsmith.quant.gguf import FILE_TYPES, export_gguf, gguf_name

gguf = pytest.importorskip("gguf", reason="the gguf package is the reference reader")

PROMPTS = ["def add(a, b):\n    return a + b", "The quick brown fox 12345", "héllo wörld — ✓ <|im_end|> x"]


@functools.lru_cache(maxsize=1)
def make_tokenizer():
    import pydoc_data.topics

    from lmsmith.tokenizer import Tokenizer

    texts = list(pydoc_data.topics.topics.values())[:300]
    return Tokenizer.train(texts, 700, show_progress=False)


def make_model(train_steps: int = 0, seed: int = 0, **overrides):
    """A K-quant friendly model (rows of 256/512) on the test tokenizer, optionally trained a little
    on Python docs so its greedy continuations are not degenerate."""
    tok = make_tokenizer()
    shape = dict(vocab_size=704, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=512, max_seq_len=256)
    cfg = ModelConfig(**{**shape, **overrides})
    model = build_model(cfg, seed=seed)
    if train_steps:
        import pydoc_data.topics

        text = "\n".join(list(pydoc_data.topics.topics.values())[:40])
        ids = torch.tensor(tok.encode(text)[: 64 * 65 * 4])
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(train_steps):
            starts = torch.randint(0, len(ids) - 65, (8,), generator=g)
            batch = torch.stack([ids[s : s + 65] for s in starts])
            logits = model(batch[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
    return model, tok


@pytest.fixture(scope="module")
def model_tok():
    return make_model()


def logits(model, tok, text):
    with torch.no_grad():
        return model(torch.tensor([tok.encode(text)]))[0]


def _field(reader, key):
    f = reader.get_field(key)
    return None if f is None else f.contents()


@pytest.mark.parametrize("scheme", scheme_names())
def test_gguf_py_reads_every_scheme(tmp_path, model_tok, scheme):
    model, tok = model_tok
    cfg = model.config
    path = tmp_path / f"m-{scheme}.gguf"
    summary = export_gguf(model, tok, path, scheme, progress=False)
    r = gguf.GGUFReader(str(path))
    assert _field(r, "general.architecture") == "llama"
    assert _field(r, "general.file_type") == FILE_TYPES[scheme]
    assert _field(r, "llama.block_count") == cfg.n_layers
    assert _field(r, "llama.embedding_length") == cfg.dim
    assert _field(r, "llama.feed_forward_length") == cfg.hidden_dim
    assert _field(r, "llama.attention.head_count") == cfg.n_heads
    assert _field(r, "llama.attention.head_count_kv") == cfg.n_kv_heads
    assert _field(r, "llama.context_length") == cfg.max_seq_len
    assert _field(r, "llama.rope.dimension_count") == cfg.head_dim
    assert math.isclose(_field(r, "llama.attention.layer_norm_rms_epsilon"), cfg.norm_eps, rel_tol=1e-6)
    assert _field(r, "tokenizer.ggml.model") == "gpt2"
    assert _field(r, "tokenizer.ggml.pre") == "qwen2"
    tokens = _field(r, "tokenizer.ggml.tokens")
    assert len(tokens) == cfg.vocab_size  # holes past the tokenizer's 700 ids filled
    assert tokens[:2] == ["<|endoftext|>", "<|bos|>"] and tokens[-1] == f"[PAD{cfg.vocab_size - 1}]"
    types = _field(r, "tokenizer.ggml.token_type")
    assert types[0] == gguf.TokenType.CONTROL and types[300] == gguf.TokenType.NORMAL
    assert types[-1] == gguf.TokenType.UNUSED
    assert _field(r, "tokenizer.ggml.eos_token_id") == tok.eos_id
    assert _field(r, "tokenizer.chat_template") == tok.chat_template
    assert len(_field(r, "tokenizer.ggml.merges")) > 100

    names = {t.name: t for t in r.tensors}
    assert "output.weight" not in names  # tied
    params = {gguf_name(n): tuple(p.shape) for n, p in model.state_dict().items() if n != "lm_head.weight"}
    plan = plan_mix(scheme, params, cfg.n_layers)
    assert set(names) == set(params)
    for name, shape in params.items():
        t = names[name]
        assert tuple(reversed(t.shape.tolist())) == shape, name
        assert int(t.tensor_type) == int(plan.types[name]), name
    assert summary.types == plan.types
    # gguf-py's own dequantizer agrees with the values we meant to store
    emb = names["token_embd.weight"]
    ref = gguf.quants.dequantize(emb.data, emb.tensor_type)
    diff = np.abs(ref - model.model.embed_tokens.weight.detach().numpy()).max()
    assert diff < {"f32": 1e-7, "f16": 1e-3, "bf16": 1e-2}.get(scheme, 0.05)


def test_roundtrip_f32_exact_and_q8_close(tmp_path, model_tok):
    model, tok = model_tok
    for scheme, tol in (("f32", 1e-5), ("q8_0", 0.05)):
        path = tmp_path / f"{scheme}.gguf"
        export_gguf(model, tok, path, scheme, progress=False)
        m2, tok2 = load_gguf(path)
        assert m2.config.vocab_size == model.config.vocab_size and m2.config.tie_embeddings
        for p in PROMPTS:
            a, b = logits(model, tok, p), logits(m2, tok2, p)
            assert (a - b).abs().max().item() < tol * max(1.0, a.abs().max().item()), scheme


def test_lmsmith_load_dispatches_gguf(tmp_path, model_tok):
    import lmsmith.checkpoint

    model, tok = model_tok
    path = tmp_path / "m.gguf"
    export_gguf(model, tok, path, "f32", progress=False)
    m2, tok2 = lmsmith.load(path, dtype="bf16")
    assert m2.model.embed_tokens.weight.dtype == torch.bfloat16 and tok2 is not None


def test_tokenizer_roundtrip(tmp_path, model_tok):
    model, tok = model_tok
    path = tmp_path / "t.gguf"
    export_gguf(model, tok, path, "q8_0", progress=False)
    _, tok2 = load_gguf(path)
    texts = [*PROMPTS, "  leading spaces\n\n\ttabs 3.14159 don't I'll", "日本語のテキスト 🙂", "<|im_start|>user\nhi"]
    for t in texts:
        assert tok2.encode(t) == tok.encode(t), t
        assert tok2.decode(tok2.encode(t)) == t
    assert (tok2.bos_id, tok2.eos_id, tok2.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert tok2.vocab_size == tok.vocab_size
    msgs = [{"role": "user", "content": "hi"}]
    assert tok2.apply_chat_template(msgs, True) == tok.apply_chat_template(msgs, True)
    assert tok2.decode(tok.encode("<|im_end|>x"), skip_special_tokens=True) == "x"


def test_qwen2_arch_no_permute(tmp_path):
    model, tok = make_model(qkv_bias=True, arch="qwen2", seed=1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.5)
    path = tmp_path / "q.gguf"
    s = export_gguf(model, tok, path, "f32", progress=False)
    assert s.arch == "qwen2"
    r = gguf.GGUFReader(str(path))
    assert _field(r, "general.architecture") == "qwen2"
    q = next(t for t in r.tensors if t.name == "blk.0.attn_q.weight")
    np.testing.assert_array_equal(np.asarray(q.data), model.model.layers[0].self_attn.q_proj.weight.detach().numpy())
    m2, _ = load_gguf(path)
    assert m2.config.arch == "qwen2" and m2.config.qkv_bias
    assert (logits(model, tok, PROMPTS[0]) - logits(m2, tok, PROMPTS[0])).abs().max() < 1e-5


def _converter_permute(w, n_head, n_head_kv):
    # convert_hf_to_gguf.LlamaModel.permute, restated
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_converter_style(model, tok, path):
    """A GGUF laid out as llama.cpp's convert_hf_to_gguf.py writes an untied Llama-3 model in f16:
    its own key set (no lmsmith.* keys), permuted q/k, rope_freqs for llama3 scaling, llama-bpe pre."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("converted")
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_feed_forward_length(cfg.hidden_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.head_dim)
    vocab = tok.backend.get_vocab()
    tokens = [f"[PAD{i}]" for i in range(cfg.vocab_size)]
    types = [gguf.TokenType.UNUSED] * cfg.vocab_size
    for t, i in vocab.items():
        tokens[i], types[i] = t, gguf.TokenType.NORMAL
    for i in tok.backend.get_added_tokens_decoder():
        types[i] = gguf.TokenType.CONTROL
    import json

    merges = json.loads(tok.backend.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(tok.bos_id)
    w.add_eos_token_id(tok.eos_id)
    w.add_chat_template(tok.chat_template)
    # llama3 rope factors as LlamaModel.generate_extra_tensors computes them
    rs, base, dim = cfg.rope_scaling, cfg.rope_theta, cfg.head_dim
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    lo_w, hi_w = rs["original_max_position_embeddings"] / rs["low_freq_factor"], \
        rs["original_max_position_embeddings"] / rs["high_freq_factor"]
    factors = []
    for f in freqs:
        wl = 2 * math.pi / f
        if wl < hi_w:
            factors.append(1)
        elif wl > lo_w:
            factors.append(rs["factor"])
        else:
            sm = (rs["original_max_position_embeddings"] / wl - rs["low_freq_factor"]) / \
                (rs["high_freq_factor"] - rs["low_freq_factor"])
            factors.append(1 / ((1 - sm) / rs["factor"] + sm))
    w.add_tensor("rope_freqs.weight", np.asarray(factors, np.float32))
    for n, p in model.state_dict().items():
        a = p.detach().float().numpy()
        if n.endswith("q_proj.weight"):
            a = _converter_permute(a, cfg.n_heads, cfg.n_heads)
        elif n.endswith("k_proj.weight"):
            a = _converter_permute(a, cfg.n_heads, cfg.n_kv_heads)
        w.add_tensor(gguf_name(n), a.astype(np.float16) if a.ndim == 2 else a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_loads_converter_style_file(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    model, tok = make_model(tie_embeddings=False, rope_scaling=scaling, rope_theta=500000.0, seed=2)
    path = tmp_path / "conv.gguf"
    write_converter_style(model, tok, path)
    m2, tok2 = load_gguf(path)
    assert not m2.config.tie_embeddings and m2.config.rope_scaling is not None
    torch.testing.assert_close(m2.inv_freq, model.inv_freq, rtol=1e-5, atol=0)
    text = PROMPTS[0] * 6  # long enough for the scaled frequencies to matter
    a, b = logits(model, tok, text), logits(m2, tok2, text)
    assert (a - b).abs().max() < 0.02  # f16 weights
    assert tok2.encode(text) == tok.encode(text)


def test_truncated_and_corrupt_files(tmp_path, model_tok):
    model, tok = model_tok
    path = tmp_path / "good.gguf"
    export_gguf(model, tok, path, "q8_0", progress=False)
    blob = path.read_bytes()
    for cut in (0, 3, 10, 23, 24, 100, 5000, len(blob) // 3, len(blob) - 1):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(blob[:cut])
        with pytest.raises(LmsmithError):
            load_gguf(bad)
    corruptions = {
        "magic": b"GGUX" + blob[4:],
        "version": blob[:4] + (99).to_bytes(4, "little") + blob[8:],
        "tensor_count": blob[:8] + (2**40).to_bytes(8, "little") + blob[16:],
        "kv_count": blob[:16] + (2**62).to_bytes(8, "little") + blob[24:],
        "first_key_length": blob[:24] + (2**63).to_bytes(8, "little") + blob[32:],
    }
    # an array length in the tokens list blown up: the reader would loop for ever without bounds checks
    at = blob.index(b"tokenizer.ggml.tokens") + len(b"tokenizer.ggml.tokens") + 4 + 4
    corruptions["array_length"] = blob[:at] + (2**50).to_bytes(8, "little") + blob[at + 8:]
    for what, data in corruptions.items():
        bad = tmp_path / f"{what}.gguf"
        bad.write_bytes(data)
        with pytest.raises(LmsmithError):
            load_gguf(bad)


def test_unknown_scheme_and_arch(tmp_path, model_tok):
    model, tok = model_tok
    with pytest.raises(LmsmithError, match="q4_k_m"):
        export_gguf(model, tok, tmp_path / "x.gguf", "q2_k")
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(LmsmithError, match="supported: llama, qwen2"):
        load_gguf(tmp_path / "gpt2.gguf")
