"""Packed inference on every GGUF type of the mixes: the C++ kernels (quant/kernels.cpp), the torch
fallback, QuantEmbedding, and `lmsmith.load(gguf, packed=True)` against the dequantized weights."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_gguf import PROMPTS, make_model  # noqa: I001  (tests dir is on sys.path)

import lmsmith
from lmsmith.errors import LmsmithError
from lmsmith.quant import QType, dequantize, kernels, quantize
from lmsmith.quant.dequant_torch import DEQUANTIZE
from lmsmith.quant.gguf import export_gguf
from lmsmith.quant.linear import KERNEL_ROWS, QuantEmbedding, QuantLinear, apply_quantization, resident_bytes, set_exact

BLOCK_TYPES = ["q8_0", "q4_0", "q5_0", "q5_1", "q3_k", "q4_k", "q5_k", "q6_k"]
INT8_PATH = ["q8_0", "q3_k", "q4_k", "q5_k", "q6_k", "int8"]  # the types with an integer-activation product


def _linear(out_f: int, in_f: int, seed: int = 0, bias: bool = True) -> torch.nn.Linear:
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(0, 0.05, generator=g)
        if bias:
            lin.bias.normal_(0, 0.1, generator=g)
    return lin


def _in_features(fmt: str) -> int:
    return {"int8": 100}.get(fmt, 512 if fmt.endswith("_k") else 96)  # int8 rows of any length


@pytest.fixture(scope="module")
def lib():
    lib = kernels.library()
    assert lib is not None, "the C++ compiler the dev setup installs must build the kernels"
    return lib


@pytest.mark.parametrize("fmt", BLOCK_TYPES)
def test_every_decoder_gives_numpy_values(fmt, lib):
    """torch fallback, C++ dequantize and numpy dequantize agree bit for bit."""
    qt = QType[fmt.upper()]
    x = np.random.default_rng(1).standard_normal((7, 512)).astype(np.float32)
    data = quantize(x, qt)
    want = dequantize(data, qt, (7, 512))
    blocks = torch.from_numpy(data).reshape(-1, data.size // (7 * 512 // type_block(qt)))
    np.testing.assert_array_equal(DEQUANTIZE[qt](blocks).reshape(7, 512).numpy(), want)
    rows = torch.from_numpy(data).reshape(7, -1).contiguous()
    np.testing.assert_array_equal(kernels.dequantize(fmt, rows, None, 7, 512).numpy(), want)


def type_block(qt: QType) -> int:
    from lmsmith.quant import type_info

    return type_info(qt).block_size


@pytest.mark.parametrize("fmt", [*BLOCK_TYPES, "int8"])
@pytest.mark.parametrize("rows", [1, 3, 16, 17, KERNEL_ROWS + 5])
def test_exact_product_equals_dequantized_matmul(fmt, rows, lib):
    """Odd output counts, batch 1 and > 1, the kernel and the many-rows (BLAS) path, fp32 and bf16 inputs."""
    lin = _linear(37, _in_features(fmt))
    q = set_exact(QuantLinear.from_linear(lin, fmt))
    w = q.dequantized_weight()
    x = torch.randn(rows, lin.in_features, generator=torch.Generator().manual_seed(rows))
    torch.testing.assert_close(q(x), F.linear(x, w, lin.bias), rtol=1e-5, atol=1e-5)
    xb = x.to(torch.bfloat16)
    out = q(xb)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), F.linear(xb.float(), w, lin.bias), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("fmt", INT8_PATH)
def test_int8_activation_product_is_close_and_really_used(fmt, lib):
    lin = _linear(64, 512 if fmt != "int8" else 256, bias=False)
    q = QuantLinear.from_linear(lin, fmt)
    x = torch.randn(4, lin.in_features, generator=torch.Generator().manual_seed(2))
    fast, exact = q(x), set_exact(copy.deepcopy(q))(x)
    rel = ((fast - exact).norm() / exact.norm()).item()
    assert 1e-5 < rel < 0.02, rel  # 8-bit activations: not exact, but within about 1%


def test_torch_fallback_without_kernels(monkeypatch):
    lin = _linear(40, 512)
    for fmt in ("q4_k", "q6_k", "int8"):
        q = QuantLinear.from_linear(lin, fmt)
        x = torch.randn(2, 512)
        want = F.linear(x, q.dequantized_weight(), lin.bias)
        monkeypatch.setattr(kernels, "_lib", None)
        monkeypatch.setattr(kernels, "_tried", True)
        torch.testing.assert_close(q(x), want, rtol=1e-5, atol=1e-5)
        monkeypatch.undo()


def test_kernels_off_by_environment_and_built_atomically(tmp_path):
    code = "from lmsmith.quant import kernels; print(kernels.library() is None)"
    env = {**os.environ, "LMSMITH_KERNELS": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
    env = {**os.environ, "LMSMITH_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False" and "building the packed-matmul kernels" in out.stderr
    built = list(tmp_path.iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"  # no temporary left behind
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "building" not in out.stderr  # the second process reuses the build


def test_packed_embedding_reads_only_its_rows(lib):
    emb = torch.nn.Embedding(50, 256)
    lin = torch.nn.Linear(256, 50, bias=False)
    lin.weight = emb.weight
    q = QuantLinear.from_linear(lin, "q6_k")
    e = QuantEmbedding(50, 256, "q6_k", q.qweight)
    ids = torch.tensor([[3, 49, 0], [7, 7, 1]])
    torch.testing.assert_close(e(ids), F.embedding(ids, q.dequantized_weight()), rtol=0, atol=0)


def _greedy(model, tok, prompt, n=12):
    from lmsmith.decoding import GenerationConfig, generate_ids

    return generate_ids(model, [tok.encode(prompt)], GenerationConfig(max_new_tokens=n, eos_ids=[]))[0].ids


@pytest.fixture(scope="module")
def trained():
    return make_model(train_steps=30, seed=5)


@pytest.mark.parametrize("scheme", ["q4_k_m", "q3_k_m"])
@pytest.mark.parametrize("tied", [True, False])
def test_packed_gguf_generates_the_dequantized_tokens(tmp_path, scheme, tied, trained, lib):
    model, tok = trained if tied else make_model(train_steps=30, seed=5, tie_embeddings=False)
    path = tmp_path / f"m-{scheme}.gguf"
    export_gguf(model, tok, path, scheme)
    plain, _ = lmsmith.load(path)
    packed, tok2 = lmsmith.load(path, packed=True)
    formats = {m.fmt for m in packed.modules() if isinstance(m, (QuantLinear, QuantEmbedding))}
    assert {"q6_k", "q4_k"} <= formats and ("q3_k" in formats) == (scheme == "q3_k_m")
    assert isinstance(packed.model.embed_tokens, QuantEmbedding) and isinstance(packed.lm_head, QuantLinear)
    if tied:  # the head reads the embedding's bytes
        assert packed.lm_head.qweight.data_ptr() == packed.model.embed_tokens.qweight.data_ptr()
    # resident memory: the file's bytes (plus norms), far below the dequantized model
    assert resident_bytes(packed) <= 1.1 * path.stat().st_size
    assert resident_bytes(packed) < 0.3 * resident_bytes(plain)
    set_exact(packed)
    for p in PROMPTS[:2]:
        ids = torch.tensor([tok.encode(p)])
        with torch.no_grad():
            torch.testing.assert_close(packed(ids), plain(ids), rtol=1e-4, atol=1e-4)
        assert _greedy(packed, tok2, p) == _greedy(plain, tok, p)
    set_exact(packed, False)  # the default, int8 activations: close logits
    with torch.no_grad():
        ids = torch.tensor([tok.encode(PROMPTS[0])])
        fast, want = packed(ids), plain(ids)
    assert ((fast - want).norm() / want.norm()).item() < 0.03


def test_apply_quantization_mix_matches_the_gguf_file(tmp_path, trained, lib):
    """apply_quantization('q4_k_m') types and packs every tensor as the exported file does."""
    model, tok = trained
    path = tmp_path / "m.gguf"
    export_gguf(model, tok, path, "q4_k_m")
    from_file, _ = lmsmith.load(path, packed=True)
    q = copy.deepcopy(model)
    done = apply_quantization(q, "q4_k_m")
    assert done["model.embed_tokens"] == "q6_k" and "lm_head" not in done  # tied: the head follows
    for name, fmt in done.items():
        a, b = q.get_submodule(name), from_file.get_submodule(name)
        assert a.fmt == b.fmt == fmt, name
        if "k_proj" not in name and "q_proj" not in name:  # q/k rows are permuted in the file, then back
            assert torch.equal(a.qweight, b.qweight), name


def test_packed_needs_quantized_weights(tmp_path, trained):
    model, tok = trained
    lmsmith.save(model, tok, tmp_path / "float")
    with pytest.raises(LmsmithError, match="packed inference needs quantized weights"):
        lmsmith.load(tmp_path / "float", packed=True)


def test_cli_packed_generate_and_eval(tmp_path, trained, capsys, lib):
    from lmsmith.cli import main

    model, tok = trained
    path = tmp_path / "m.gguf"
    export_gguf(model, tok, path, "q4_k_m")
    assert main(["generate", str(path), "--packed", "--prompt", "def", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("def") and "[6 tokens in" in out.err
    (tmp_path / "t.txt").write_text("def add(a, b):\n    return a + b\n" * 4)
    assert main(["eval", str(path), "--packed", "--data", str(tmp_path / "t.txt"), "--json"]) == 0
    import json

    packed_ppl = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["perplexity"]
    assert main(["eval", str(path), "--data", str(tmp_path / "t.txt"), "--json"]) == 0
    plain_ppl = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["perplexity"]
    assert abs(packed_ppl - plain_ppl) / plain_ppl < 0.02
    assert main(["generate", str(path), "--packed", "--adapter", str(tmp_path), "--prompt", "x"]) == 1
    assert "--adapter does not apply to --packed" in capsys.readouterr().err


def test_serve_packed_gguf(tmp_path, trained, lib):
    """`lmsmith serve model.gguf --packed` answers the official client with the packed model's greedy text."""
    from test_serve import Server

    from lmsmith.decoding import GenerationConfig, generate

    model, tok = trained
    path = tmp_path / "m.gguf"
    export_gguf(model, tok, path, "q4_k_m")
    packed, tok2 = lmsmith.load(path, packed=True)
    s = Server(path, "--packed", "--max-batch", "2")
    try:
        r = s.client().completions.create(model="tiny", prompt="def add(a, b):", max_tokens=8, temperature=0)
        assert r.choices[0].text == generate(packed, tok2, "def add(a, b):", GenerationConfig(max_new_tokens=8))
    finally:
        code, err = s.stop()
    assert "Traceback" not in err and code in (0, 130), err
