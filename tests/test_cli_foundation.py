"""`lmsmith --help`, `lmsmith init`, `lmsmith info`, end to end; memory arithmetic."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lmsmith import memory
from lmsmith.cli import VERBS, main
from lmsmith.config import ModelConfig, preset


def test_help_lists_every_verb(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for verb in VERBS:
        assert verb in out


@pytest.mark.parametrize("verb", ["init", "info"])
def test_verb_help(verb, capsys):
    with pytest.raises(SystemExit) as e:
        main([verb, "--help"])
    assert e.value.code == 0
    assert "example" in capsys.readouterr().out


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from lmsmith.tokenizer import Tokenizer

    texts = [f"line {i}: the quick brown fox jumps over {i * 7} lazy dogs\n" for i in range(300)]
    tok = Tokenizer.train(texts, vocab_size=280, min_frequency=1, show_progress=False)
    assert tok.vocab_size == 280
    d = tmp_path_factory.mktemp("tok")
    tok.save(d)
    return d


def test_init_then_info(tokenizer_dir, tmp_path, capsys):
    out_dir = tmp_path / "m"
    assert main(["init", "--preset", "tiny", "--tokenizer", str(tokenizer_dir), "--out", str(out_dir),
                 "--seed", "1"]) == 0
    cap = capsys.readouterr()
    assert "replaced by 280" in cap.err and str(out_dir) in cap.out
    files = set(os.listdir(out_dir))
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= files

    assert main(["info", str(out_dir)]) == 0
    text = capsys.readouterr().out
    assert "LlamaForCausalLM" in text and "280" in text

    assert main(["info", str(out_dir), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    cfg = preset("tiny", vocab_size=280)
    assert rep["params"]["total"] == cfg.num_params()
    assert rep["shape"]["vocab_size"] == 280

    import lmsmith

    model, tok = lmsmith.load(out_dir)
    assert tok is not None and tok.vocab_size == 280 and model.config.vocab_size == 280

    transformers = pytest.importorskip("transformers")
    import torch

    hf = transformers.AutoModelForCausalLM.from_pretrained(out_dir).eval()
    x = torch.tensor([tok.encode("the quick brown fox")])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), atol=1e-4, rtol=0)


def test_init_bf16_without_tokenizer(tmp_path, capsys):
    out_dir = tmp_path / "m"
    assert main(["init", "--preset", "tiny", "--out", str(out_dir), "--dtype", "bf16", "--max-seq-len", "128"]) == 0
    assert "no --tokenizer" in capsys.readouterr().err
    import lmsmith

    model, tok = lmsmith.load(out_dir)
    assert tok is None
    assert model.lm_head.weight.dtype.itemsize == 2 and model.config.max_seq_len == 128
    assert "tokenizer.json" not in os.listdir(out_dir)


def test_init_refuses_what_does_not_fit(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 8 * 10**9)
    rc = main(["init", "--preset", "llama-3.1-8b", "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert "--dtype bf16" in err[-1] and "32.12 GB" in err[-1]
    assert not (tmp_path / "m").exists()


def test_info_405b_without_allocating(capsys):
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert main(["info", "llama-3.1-405b"]) == 0
    out = capsys.readouterr().out
    assert "405.85B" in out and "811.71 GB" in out
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KB: nothing materialised


@pytest.mark.parametrize("argv", [["info", "/no/such/dir"], ["info", "llama-9"],
                                  ["init", "--preset", "llama-9", "--out", "/tmp/_lmsmith_never"]])
def test_bad_input_one_line(argv, capsys):
    assert main(argv) == 1
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmsmith: error:"), cap.err
    assert "Traceback" not in cap.err


def test_subprocess_info_tiny():
    proc = subprocess.run([sys.executable, "-m", "lmsmith", "info", "tiny"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "2.4M" in proc.stdout and "LlamaForCausalLM" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "lmsmith", "info", "/no/such/dir"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1


# ---- memory arithmetic -------------------------------------------------------------------------


def test_memory_arithmetic():
    cfg = ModelConfig(vocab_size=1000, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128,
                      tie_embeddings=False)
    counts = memory.param_counts(cfg)
    assert counts["embedding"] == 2 * 1000 * 64  # table + untied head
    assert counts["total"] == counts["embedding"] + counts["non_embedding"] == cfg.num_params()
    w = memory.weight_memory(cfg)
    n = cfg.num_params()
    assert w["fp32"] == 4 * n and w["bf16"] == 2 * n
    assert w["int8"] == round(n * 8.5 / 8) and w["4-bit"] == round(n * 4.5 / 8)
    assert memory.training_bytes(cfg) == 16 * n
    assert memory.kv_cache_bytes_per_token(cfg) == 2 * 2 * 2 * 16 * 2


def test_known_kv_cache_size():
    # Llama-3.1-8B: 32 layers x 8 kv heads x 128 x (K and V) x 2 bytes = 128 KiB per token.
    assert memory.kv_cache_bytes_per_token(preset("llama-3.1-8b")) == 131072


def test_human_units():
    assert memory.human_bytes(16_060_522_496) == "16.06 GB"
    assert memory.human_bytes(512) == "512 B"
    assert memory.human_count(134_515_008) == "134.5M"
    assert memory.human_count(8_030_261_248) == "8.03B"
    assert memory.available_memory_bytes() is None or memory.available_memory_bytes() > 0
