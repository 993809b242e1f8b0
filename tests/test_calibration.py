"""Calibrated quantization: importance matrices (collect, llama.cpp's file formats) and the K-quant
scale searches they weight; calibrated GGUF files keep their types and sizes and run in llama.cpp."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from test_gguf import make_model  # noqa: I001  (tests dir is on sys.path)

from lmsmith.errors import LmsmithError
from lmsmith.quant import QType, dequantize, imatrix, quantize


@pytest.fixture(scope="module")
def trained():
    return make_model(train_steps=30, seed=7)


def _chunks(tok, n=4, ctx=64):
    import pydoc_data.topics

    ids = tok.encode("\n".join(list(pydoc_data.topics.topics.values())[40:60]))
    return [ids[i * ctx:(i + 1) * ctx] for i in range(n)]


def test_collect_is_the_mean_squared_input_of_every_matrix(trained):
    model, tok = trained
    chunks = _chunks(tok)
    stats = imatrix.collect(model, chunks)
    assert set(stats) == {f"blk.{i}.{n}.weight" for i in range(2) for n in
                          ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")} | \
        {"token_embd.weight"}  # the tied head reads the embedding, as llama.cpp names it
    seen = []
    h = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, 512)))
    with torch.no_grad():
        for c in chunks:
            model(torch.tensor([c]))
    h.remove()
    x = torch.cat(seen)
    np.testing.assert_allclose(stats["blk.1.ffn_down.weight"].importance, (x * x).mean(0).numpy(), rtol=1e-5)
    assert stats["blk.1.ffn_down.weight"].count == sum(map(len, chunks))


def test_gguf_and_legacy_files_round_trip(tmp_path, trained):
    model, tok = trained
    stats = imatrix.collect(model, _chunks(tok, 2))
    path = imatrix.save(stats, tmp_path / "m.imatrix.gguf", datasets=["calib.txt"], chunk_size=64, chunk_count=2)
    from gguf import GGUFReader

    r = GGUFReader(str(path))  # the layout llama.cpp writes: <name>.in_sum2 (1 x cols) and <name>.counts (1 x 1)
    assert r.get_field("general.type").contents() == "imatrix"
    assert r.get_field("imatrix.chunk_count").contents() == 2
    names = {t.name for t in r.tensors}
    assert "blk.0.attn_q.weight.in_sum2" in names and "blk.0.attn_q.weight.counts" in names
    back = imatrix.load(path)
    for name, s in stats.items():
        np.testing.assert_allclose(back[name], s.importance, rtol=1e-6)
    # llama.cpp's legacy .dat: values stored as mean * ncall, divided back by ncall on reading
    dat = tmp_path / "m.dat"
    v = stats["blk.0.ffn_up.weight"].importance
    name = b"blk.0.ffn_up.weight"
    dat.write_bytes(struct.pack("<ii", 1, len(name)) + name + struct.pack("<ii", 3, v.size) + (v * 3).tobytes()
                    + struct.pack("<ii", 2, 5) + b"c.txt")
    np.testing.assert_allclose(imatrix.load(dat)["blk.0.ffn_up.weight"], v, rtol=1e-6)
    dat.write_bytes(dat.read_bytes()[:40])  # truncated: a one-line error, no read past the end
    with pytest.raises(LmsmithError, match="truncated or corrupt imatrix file"):
        imatrix.load(dat)
    huge = tmp_path / "huge.dat"
    huge.write_bytes(struct.pack("<ii", 1, 2**30) + b"x")  # a name longer than the file
    with pytest.raises(LmsmithError, match="runs past the end"):
        imatrix.load(huge)


@pytest.mark.parametrize("qt", [QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K])
def test_importance_changes_the_scales_and_lowers_the_weighted_error(qt):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((64, 512)) * 0.05).astype(np.float32)
    imp = rng.lognormal(0, 1.5, 512).astype(np.float32)  # a few columns matter far more
    plain, calibrated = quantize(x, qt), quantize(x, qt, imp)
    assert plain.shape == calibrated.shape and not np.array_equal(plain, calibrated)

    def weighted(data):
        return float((((dequantize(data, qt, x.shape) - x) ** 2) * imp).sum())

    assert weighted(calibrated) < 0.85 * weighted(plain)
    # uniform importance is not the unweighted search, but it must not be much worse on plain error
    flat = quantize(x, qt, np.ones(512, np.float32))
    err = float(((dequantize(flat, qt, x.shape) - x) ** 2).sum())
    assert err < 1.1 * float(((dequantize(plain, qt, x.shape) - x) ** 2).sum())
    with pytest.raises(LmsmithError, match="512 finite non-negative values"):
        quantize(x, qt, imp[:100])


def _saved_with_calibration(tmp_path, trained, topics: slice):
    """The trained model saved as tmp_path/m, and calibration text (pydoc topics) at tmp_path/calib.txt."""
    import pydoc_data.topics

    import lmsmith

    model, tok = trained
    lmsmith.save(model, tok, tmp_path / "m")
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(list(pydoc_data.topics.topics.values())[topics]))
    return model, tok, calib


def test_calibrated_cli_file_same_types_and_sizes_runs_in_llamacpp(tmp_path, trained, capsys):
    from lmsmith.cli import main

    model, tok, calib = _saved_with_calibration(tmp_path, trained, slice(60, 90))
    assert main(["quantize", str(tmp_path / "m"), "--scheme", "q3_k_m", "--out", str(tmp_path / "u.gguf"),
                 "--no-progress"]) == 0
    assert main(["quantize", str(tmp_path / "m"), "--scheme", "q3_k_m", "--out", str(tmp_path / "c.gguf"),
                 "--calibration", str(calib), "--calibration-ctx", "128", "--write-imatrix",
                 str(tmp_path / "im.gguf"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "Importance matrix: 15 matrices" in out and "calibrated with the importance matrix" in out
    from gguf import GGUFReader

    u, c = GGUFReader(str(tmp_path / "u.gguf")), GGUFReader(str(tmp_path / "c.gguf"))
    tu, tc = {t.name: t for t in u.tensors}, {t.name: t for t in c.tensors}
    assert {n: (int(t.tensor_type), int(t.n_bytes)) for n, t in tu.items()} == \
        {n: (int(t.tensor_type), int(t.n_bytes)) for n, t in tc.items()}
    assert not np.array_equal(np.asarray(tu["blk.0.ffn_up.weight"].data), np.asarray(tc["blk.0.ffn_up.weight"].data))
    # the saved matrix reproduces the calibrated file
    assert main(["quantize", str(tmp_path / "m"), "--scheme", "q3_k_m", "--out", str(tmp_path / "c2.gguf"),
                 "--imatrix", str(tmp_path / "im.gguf"), "--no-progress"]) == 0
    c2 = {t.name: t for t in GGUFReader(str(tmp_path / "c2.gguf")).tensors}
    assert all(np.array_equal(np.asarray(c2[n].data), np.asarray(t.data)) for n, t in tc.items())
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(tmp_path / "c.gguf"), n_ctx=128, verbose=False)
    assert len(llm.create_completion("def", max_tokens=5, temperature=0)["choices"][0]["text"]) > 0


def test_calibration_errors(tmp_path, trained, capsys):
    import lmsmith
    from lmsmith.cli import main

    model, tok = trained
    lmsmith.save(model, tok, tmp_path / "m")
    assert main(["quantize", str(tmp_path / "m"), "--scheme", "q4_k_m", "--out", str(tmp_path / "x.gguf"),
                 "--calibration", "a.txt", "--imatrix", "b.gguf"]) == 1
    assert "not both" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path / "m"), "--scheme", "int8", "--out", str(tmp_path / "i8"),
                 "--imatrix", str(tmp_path / "none.gguf")]) == 1
    assert "none.gguf" in capsys.readouterr().err
    other = make_model(seed=1, dim=128, n_heads=2, n_kv_heads=1, hidden_dim=256)[0]
    im = imatrix.save(imatrix.collect(other, _chunks(tok, 1)), tmp_path / "other.gguf")
    assert main(["quantize", str(tmp_path / "m"), "--scheme", "q4_k_m", "--out", str(tmp_path / "y.gguf"),
                 "--imatrix", str(im), "--no-progress"]) == 1
    assert "measured on another model" in capsys.readouterr().err


@pytest.mark.parametrize("qt", [QType.Q4_K, QType.Q3_K, QType.Q8_0])
def test_gptq_lowers_the_output_error_in_the_same_format(qt):
    """On correlated, unevenly scaled inputs: plain > importance-weighted > GPTQ in output error."""
    from lmsmith.quant.gptq import gptq_quantize

    rng = np.random.default_rng(0)
    cols, n = 512, 4096
    x = (rng.standard_normal((n, cols)) @ (rng.standard_normal((cols, cols)) * 0.3 + np.eye(cols))) \
        * rng.lognormal(0, 1, cols)
    w = (rng.standard_normal((48, cols)) * 0.05).astype(np.float32)
    h = x.T @ x
    imp = (np.diag(h) / n).astype(np.float32)
    ref = x @ w.T

    def err(data):
        return np.linalg.norm(x @ dequantize(data, qt, w.shape).T - ref) / np.linalg.norm(ref)

    plain, weighted, g = quantize(w, qt), quantize(w, qt, imp), gptq_quantize(w, qt, h, imp)
    assert g.shape == plain.shape and g.dtype == np.uint8
    assert err(g) < 0.92 * err(weighted) and err(weighted) <= err(plain)


def test_gptq_cli(tmp_path, trained, capsys):
    import lmsmith
    from lmsmith.cli import main

    model, tok, calib = _saved_with_calibration(tmp_path, trained, slice(60, 70))
    assert main(["quantize", str(tmp_path / "m"), "--scheme", "q4_k_m", "--out", str(tmp_path / "g.gguf"),
                 "--method", "gptq"]) == 1
    assert "--method gptq needs --calibration" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path / "m"), "--scheme", "q4_k_m", "--out", str(tmp_path / "g.gguf"),
                 "--method", "gptq", "--calibration", str(calib), "--calibration-tokens", "2000",
                 "--no-progress"]) == 0
    assert "GPTQ error compensation" in capsys.readouterr().out
    g, _ = lmsmith.load(tmp_path / "g.gguf")
    with torch.no_grad():
        ids = torch.tensor([tok.encode("def add(a, b):")])
        assert ((g(ids) - model(ids)).norm() / model(ids).norm()).item() < 0.1
