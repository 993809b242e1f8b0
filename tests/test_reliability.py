"""Inputs that lie or break: refused fast with one line; a run killed while preparing resumes as the same job."""

from __future__ import annotations

import json
import os
import struct
import time

import pytest

import lmsmith
from lmsmith.cli import main
from lmsmith.config import ModelConfig
from lmsmith.errors import LmsmithError
from lmsmith.model import build_model

CFG = ModelConfig(vocab_size=128, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=32)


@pytest.fixture()
def hf_dir(tmp_path):
    d = tmp_path / "m"
    lmsmith.save(build_model(CFG, seed=0), None, d)
    return d


def _edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def _one_line_error(path, match):
    t0 = time.perf_counter()
    with pytest.raises(LmsmithError) as e:
        lmsmith.load(path)
    assert time.perf_counter() - t0 < 1.0
    assert "\n" not in str(e.value) and match in str(e.value), str(e.value)


def test_config_claiming_huge_model_is_refused_fast(hf_dir):
    _edit_config(hf_dir, num_hidden_layers=100000)
    _one_line_error(hf_dir, "claims 100000 layers")


@pytest.mark.parametrize("field,value,match", [
    ("rms_norm_eps", "1e-5", "rms_norm_eps"), ("rms_norm_eps", None, "rms_norm_eps"),
    ("rope_theta", "big", "rope_theta"), ("architectures", 5, "architectures"),
    ("rope_scaling", "linear", "rope_scaling"), ("head_dim", -32, "head_dim"),
    ("rms_norm_eps", float("nan"), "rms_norm_eps"), ("rope_theta", float("inf"), "rope_theta"),
])
def test_config_values_that_are_not_numbers(hf_dir, field, value, match):
    _edit_config(hf_dir, **{field: value})
    _one_line_error(hf_dir, match)


def test_integer_weights_index_outside_and_fifo_are_refused(hf_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(hf_dir / "model.safetensors"))
    save_file({k: v.to(__import__("torch").int32) for k, v in sd.items()}, str(hf_dir / "model.safetensors"))
    _one_line_error(hf_dir, "I32")
    (hf_dir / "model.safetensors").unlink()
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["a", "b"]}))
    _one_line_error(hf_dir, "weight_map")
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "/etc/passwd"}}))
    _one_line_error(hf_dir, "outside the model directory")
    (hf_dir / "model.safetensors.index.json").unlink()
    os.mkfifo(hf_dir / "model.safetensors")
    _one_line_error(hf_dir, "not a regular file")
    os.mkfifo(tmp_path / "pipe.gguf")
    _one_line_error(tmp_path / "pipe.gguf", "not a regular file")


def test_generation_config_eos_must_be_ids(tmp_path):
    from lmsmith.tokenizer import Tokenizer

    tok = Tokenizer.train(["hello world, hello there"] * 50, vocab_size=300)
    d = tmp_path / "t"
    tok.save(d)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": "x"}))
    with pytest.raises(LmsmithError, match="eos_token_id"):
        Tokenizer.load(d)


def _gguf(tmp_path, **meta_changes):
    from lmsmith.quant.gguf import export_gguf
    from lmsmith.tokenizer import Tokenizer

    tok = Tokenizer.train(["hello world, hello there"] * 50, vocab_size=300)
    path = tmp_path / "m.gguf"
    export_gguf(build_model(CFG.replace(vocab_size=tok.vocab_size), seed=0), tok, path, "f16", progress=False)
    return path


def test_gguf_claiming_huge_model_is_refused_fast(tmp_path):
    path = _gguf(tmp_path)
    raw = bytearray(path.read_bytes())
    key = b"llama.block_count"
    i = raw.index(key) + len(key)
    assert struct.unpack_from("<I", raw, i)[0] == 4  # u32 type
    raw[i + 4:i + 8] = struct.pack("<I", 100000)
    path.write_bytes(bytes(raw))
    _one_line_error(path, "claims 100000 layers")


def test_gguf_fuzz_never_hangs_reads_out_of_bounds_or_tracebacks(tmp_path):
    import random

    path = _gguf(tmp_path)
    good = path.read_bytes()
    rng = random.Random(0)
    bad = tmp_path / "bad.gguf"
    cases = [good[:n] for n in (10, 24, 100, 1000, len(good) // 2, len(good) - 1)]
    for _ in range(40):  # flipped counts, lengths, offsets: random 8-byte words in the header
        raw = bytearray(good)
        i = rng.randrange(8, min(len(raw), 4000) - 8)
        raw[i:i + 8] = struct.pack("<Q", rng.choice([0, 1, 2**31, 2**63 - 1, 2**64 - 1, rng.randrange(2**40)]))
        cases.append(bytes(raw))
    for data in cases:
        bad.write_bytes(data)
        t0 = time.perf_counter()
        try:
            lmsmith.load(bad)
        except LmsmithError as e:
            assert "\n" not in str(e)
        assert time.perf_counter() - t0 < 5.0


def test_quantize_never_overwrites_without_overwrite(hf_dir, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    assert main(["quantize", str(hf_dir), "--scheme", "q8_0", "--out", str(data), "--no-progress"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert data.read_text().startswith('{"prompt"')


def test_cli_parse_errors_exit_2_and_name_the_mistyped_flag(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "m", "--promt", "hi"])
    assert e.value.code == 2 and "--promt; did you mean --prompt?" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["pretrian"])
    assert e.value.code == 2 and "did you mean 'pretrain'" in capsys.readouterr().err


def test_text_that_is_not_text(hf_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "a", "completion": "b"}\n\xff\xfe binary \x00\n')
    from lmsmith.data.instruct import read_examples

    with pytest.raises(LmsmithError, match=r"bad.jsonl:2: not UTF-8"):
        read_examples(bad)
    examples, stats = read_examples(bad, skip_bad=True)
    assert len(examples) == 1 and stats.bad_lines == 1
    prompts = tmp_path / "p.txt"
    prompts.write_bytes(b"hello\n\xff\n")
    from lmsmith.recipes.generate import read_prompts

    with pytest.raises(LmsmithError, match=r"p.txt:2: not UTF-8"):
        read_prompts(str(prompts))


def test_endless_chat_template_is_one_line_error():
    from lmsmith.tokenizer import Tokenizer

    tok = Tokenizer.train(["hello world"] * 50, vocab_size=300)
    tok.chat_template = "{% for i in range(10**9) %}x{% endfor %}"
    with pytest.raises(LmsmithError, match="chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("flags,match", [
    (["--lr", "inf"], "lr"), (["--clip-grad", "nan"], "clip_grad"), (["--weight-decay", "nan"], "weight_decay"),
    (["--tokens", "nan"], "--tokens"), (["--tokens", "-5"], "--tokens"), (["--time", "soon"], "--time"),
])
def test_training_numbers_that_are_not_numbers(tmp_path, flags, match, capsys):
    assert main(["pretrain", "--out", str(tmp_path / "r"), "--no-progress", *flags]) == 1
    assert match in capsys.readouterr().err


def test_kill_during_data_preparation_resumes_the_same_job(tmp_path, monkeypatch, capsys):
    import sysconfig
    from pathlib import Path

    import lmsmith.data as data

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for f in sorted((Path(sysconfig.get_paths()["stdlib"]) / "json").glob("*.py")):
        (corpus / f.name).write_text(f.read_text())
    args = ["--vocab-size", "300", "--batch-size", "4", "--seq-len", "32", "--max-steps", "6", "--dtype", "fp32",
            "--no-progress", "--log-every", "1", "--eval-every", "0"]
    full = tmp_path / "full"
    assert main(["pretrain", "--source", f"code={corpus}", "--out", str(full), *args]) == 0
    run = tmp_path / "run"
    real = data.prepare

    def killed(*a, **kw):
        raise SystemExit(137)  # the process dies after the tokenizer was saved, before the shards

    monkeypatch.setattr(data, "prepare", killed)
    with pytest.raises(SystemExit):
        main(["pretrain", "--source", f"code={corpus}", "--out", str(run), *args])
    monkeypatch.setattr(data, "prepare", real)
    assert (run / "config.yaml").exists() and (run / "tokenizer" / "tokenizer.json").exists()
    capsys.readouterr()
    assert main(["pretrain", "--out", str(run), "--resume", "--no-progress"]) == 0  # no --source: the saved one
    out = capsys.readouterr().out
    assert "6 steps" in out and "(768 tokens" in out and "precision fp32" in out

    def losses(d):
        return [json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]

    assert losses(run) == losses(full)

    # The run's own validation split is the quality table's held-out text; a run folder is not a model.
    capsys.readouterr()
    assert main(["quantize", str(full / "final"), "--report", "--eval-data", str(full / "data"), "--schemes", "q8_0",
                 "--max-chars", "3000", "--no-progress", "--plot", str(tmp_path / "q.png")]) == 0
    assert "q8_0" in capsys.readouterr().out
    with pytest.raises(LmsmithError, match="its model is .*final"):
        lmsmith.load(full)


def _stdlib_text() -> str:
    import sysconfig
    from pathlib import Path

    return "".join(f.read_text() for f in sorted((Path(sysconfig.get_paths()["stdlib"]) / "json").glob("*.py")))


def test_long_texts_encode_in_pieces_to_the_same_ids():
    from lmsmith.tokenizer import Tokenizer, text_pieces

    text = _stdlib_text()
    tok = Tokenizer.train([text], vocab_size=400)
    pieces = list(text_pieces(text, size=997))
    assert "".join(pieces) == text and len(pieces) > 20 and max(map(len, pieces)) <= 997
    whole = tok.backend.encode(text, add_special_tokens=False).ids
    assert sum((tok.backend.encode(p, add_special_tokens=False).ids for p in pieces), []) == whole
    assert list(text_pieces("x" * 10_000, size=1000)) == ["x" * 1000] * 10  # no space: cut where it must


_MEMORY_CHILD = r"""
import resource, sys
from pathlib import Path
from lmsmith.data import prepare
from lmsmith.data.sources import Source
from lmsmith.tokenizer import Tokenizer
text = Path(sys.argv[1]).read_text()
tok = Tokenizer.train([text[:200_000]], vocab_size=400)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
prepare([Source("big", path=sys.argv[1])], tok, Path(sys.argv[2]), progress=False)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)
"""


def test_a_long_one_line_document_prepares_in_bounded_memory(tmp_path):
    """8 MB on one line: the encoder alone took ~1.4 GB for it in one call; in pieces it stays small."""
    import subprocess
    import sys

    line = _stdlib_text().replace("\n", " ")
    (tmp_path / "big.txt").write_text((line * (8 * 2**20 // len(line) + 1))[: 8 * 2**20])
    out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(tmp_path / "big.txt"), str(tmp_path / "shards")],
                         capture_output=True, text=True, check=True)
    extra_mb = int(out.stdout.split()[-1])
    assert extra_mb < 300, extra_mb
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["sources"][0]["documents"] == 1


def test_a_huge_answer_is_truncated_not_fatal():
    from lmsmith.data.instruct import encode_sft
    from lmsmith.tokenizer import Tokenizer

    tok = Tokenizer.train([_stdlib_text()], vocab_size=400)
    answer = _stdlib_text().replace("\n", " ") * 40  # ~3 MB
    items, stats = encode_sft([{"messages": [{"role": "user", "content": "q"},
                                             {"role": "assistant", "content": answer}]}], tok, 64)
    assert stats.truncated == 1 and len(items) == 1 and len(items[0]["input_ids"]) == 64


def _tokenizer_dir(tmp_path):
    from lmsmith.tokenizer import Tokenizer

    Tokenizer.train(["hello world, hello there"] * 50, vocab_size=300).save(tmp_path / "tok")
    return tmp_path / "tok"


def test_generation_and_context_numbers(hf_dir, tmp_path, capsys):
    from lmsmith.decoding import GenerationConfig

    for bad in (dict(temperature=float("nan")), dict(strategy="beam", num_beams=0),
                dict(repetition_penalty=float("inf"))):
        with pytest.raises(LmsmithError):
            GenerationConfig(**bad)
    assert main(["pretrain", "--init-from", str(hf_dir), "--tokenizer", str(_tokenizer_dir(tmp_path)), "--seq-len",
                 "64", "--out", str(tmp_path / "r")]) == 1
    assert "longer than the context" in capsys.readouterr().err
    assert main(["eval", str(hf_dir), "--data", "/no/such/file.txt"]) == 1
    err = capsys.readouterr().err
    assert "--data /no/such/file.txt" in err and "--source" not in err
