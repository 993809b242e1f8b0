"""`lmsmith pretrain` end to end on a small real corpus: it learns, resumes exactly, and errors clearly."""

import json
import math
import shutil
import sysconfig
from pathlib import Path

import pytest

from lmsmith.cli import main


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """About 300 KB of real Python source from the standard library."""
    root = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for sub in ("json", "email", "logging"):
        for f in sorted((stdlib / sub).glob("*.py")):
            shutil.copy(f, root / f"{sub}_{f.name}")
    return root


def _losses(run: Path, key: str = "loss") -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


def _args(corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["pretrain", "--source", f"code={corpus}", "--vocab-size", "512", "--out", str(out),
            "--batch-size", "8", "--seq-len", "64", "--dtype", "fp32", "--no-progress", *extra]


def test_pretrain_learns_below_unigram_baseline(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(_args(corpus, out, "--max-steps", "150", "--lr", "3e-3", "--eval-every", "150", "--log-every", "5"))
    assert rc == 0
    text = capsys.readouterr().out
    val = _losses(out, "val_loss")
    assert val, "no validation rows in metrics.jsonl"
    final_val = val[max(val)]
    assert final_val < math.log(512) - 1.5  # well below where a random model starts (ln 512 = 6.2)
    baseline = float(text.split("a unigram model scores ")[1].split(" /")[0])
    assert final_val < baseline - 0.3
    assert (out / "final" / "model.safetensors").exists()
    assert (out / "loss.png").stat().st_size > 1000
    assert "Sample" in text


def test_pretrain_resume_after_interrupt_reproduces_losses(corpus, tmp_path, monkeypatch, capsys):
    common = ("--max-steps", "24", "--save-every", "8", "--log-every", "1", "--lr", "3e-3")
    full = tmp_path / "full"
    assert main(_args(corpus, full, *common)) == 0

    from lmsmith.data import mixture

    original = mixture.MixtureBatches.__next__

    def interrupt_at_13(self):
        if self.step == 13:
            raise KeyboardInterrupt
        return original(self)

    part = tmp_path / "part"
    monkeypatch.setattr(mixture.MixtureBatches, "__next__", interrupt_at_13)
    assert main(_args(corpus, part, *common)) == 130
    monkeypatch.setattr(mixture.MixtureBatches, "__next__", original)
    # The command the interrupt message prints: the run's saved options supply source, model and schedule.
    capsys.readouterr()
    assert main(["pretrain", "--out", str(part), "--resume", "--no-progress"]) == 0
    assert _losses(part) == _losses(full)
    # The summary counts the whole run (24 steps of 8 x 64 tokens), and says what this session did.
    assert "for 24 steps (12,288 tokens, 11 of them in this session)" in capsys.readouterr().out


def test_pretrain_resume_refuses_other_sources_and_overwrite_checks_inputs_first(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(corpus, out, "--max-steps", "2", "--save-every", "1")) == 0
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    other = tmp_path / "other.txt"
    other.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(400)))
    capsys.readouterr()
    cases = [
        (["--out", str(out), "--resume", "--source", f"text={other}"], "not the sources this resume names"),
        (["--out", str(out), "--resume", "--overwrite"], "pass one"),
        (["--out", str(out), "--overwrite", "--init-from", str(tmp_path / "typo")], "no such model directory"),
        (["--out", str(out), "--overwrite", "--tokenizer", str(out / "tokenizer")], "inside the run folder"),
        (["--out", str(tmp_path / "new"), "--init-from", str(corpus)], "has no tokenizer.json"),
        (["--out", str(out), "--overwrite", "--source", f"text={tmp_path / 'typo.txt'}"], "does not exist"),
    ]
    for extra, expect in cases:
        assert main(["pretrain", *extra, "--no-progress"]) == 1, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expect in err[0], (extra, err)
        # nothing of the run was deleted or re-prepared
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
        assert (out / "tokenizer" / "tokenizer.json").exists()
        assert [e["name"] for e in json.loads((out / "data" / "manifest.json").read_text())["sources"]] == ["code"]


def test_pretrain_resume_from_another_directory_and_with_a_new_length(corpus, tmp_path, monkeypatch):
    """config.yaml records absolute paths; a --max-steps given on resume beats the saved --tokens."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shutil.copy(next(corpus.glob("json_*.py")), tmp_path / "a" / "one.py")
    monkeypatch.chdir(tmp_path / "a")
    run = tmp_path / "run"
    assert main(["pretrain", "--source", "code=one.py", "--vocab-size", "300", "--out", str(run), "--tokens", "128",
                 "--batch-size", "2", "--seq-len", "32", "--save-every", "1", "--no-progress"]) == 0
    assert max(_losses(run)) == 2  # 128 tokens / (2 x 32)
    monkeypatch.chdir(tmp_path / "b")  # one.py is not here
    assert main(["pretrain", "--out", str(run), "--resume", "--max-steps", "4", "--no-progress"]) == 0
    assert max(_losses(run)) == 4


def test_overwrite_drops_a_symlinked_folder_not_its_target(corpus, tmp_path):
    out, elsewhere = tmp_path / "run", tmp_path / "big-disk"
    (out).mkdir()
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("not ours to delete")
    (out / "checkpoints").symlink_to(elsewhere, target_is_directory=True)
    assert main(_args(corpus, out, "--max-steps", "1", "--overwrite")) == 0
    assert (elsewhere / "keep.txt").exists() and not (out / "checkpoints").is_symlink()


def test_pretrain_refuses_to_clobber_a_run_and_bad_config(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(corpus, out, "--max-steps", "2", "--save-every", "1")) == 0
    capsys.readouterr()
    assert main(_args(corpus, out, "--max-steps", "2")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--resume" in err[0]

    # --overwrite starts afresh: another corpus gets its own tokenizer and shards, not the old run's
    other = tmp_path / "other.txt"
    other.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(400)))
    assert main(["pretrain", "--source", f"text={other}", "--vocab-size", "300", "--out", str(out), "--overwrite",
                 "--max-steps", "1", "--batch-size", "2", "--seq-len", "32", "--no-progress"]) == 0
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    assert [e["name"] for e in manifest["sources"]] == ["text"]
    assert json.loads((out / "final" / "config.json").read_text())["vocab_size"] <= 300  # not the old 512
    # a new weight for the same source keeps its shards: weights only steer sampling
    manifest_stamp = (out / "data" / "manifest.json").stat().st_mtime_ns
    assert main(["pretrain", "--out", str(out), "--resume", "--max-steps", "2", "--source", f"text={other}:2",
                 "--no-progress"]) == 0
    assert (out / "data" / "manifest.json").stat().st_mtime_ns == manifest_stamp
    # continued pretraining keeps the model's own tokenizer (a new one would not fit its embeddings)
    again = tmp_path / "again"
    assert main(["pretrain", "--init-from", str(out / "final"), "--source", f"code={corpus}", "--out", str(again),
                 "--max-steps", "1", "--batch-size", "2", "--seq-len", "32", "--no-progress"]) == 0
    assert (again / "final" / "tokenizer.json").read_bytes() == (out / "final" / "tokenizer.json").read_bytes()
    capsys.readouterr()

    cfg = tmp_path / "bad.yaml"
    cfg.write_text("preset: tiny\nlearning_rate: 0.1\n")
    assert main(["pretrain", "--config", str(cfg), "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "learning_rate" in err[0] and "lr" in err[0]


def test_pretrain_yaml_config_sets_model_shape(corpus, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"source: [code={corpus}]\nvocab_size: 512\nmax_steps: 3\nbatch_size: 4\nseq_len: 32\n"
                   "dtype: fp32\nprogress: false\nmodel:\n  dim: 64\n  n_layers: 2\n  n_heads: 4\n  n_kv_heads: 1\n"
                   "  hidden_dim: 128\n")
    out = tmp_path / "run"
    assert main(["pretrain", "--config", str(cfg), "--out", str(out)]) == 0
    saved = json.loads((out / "final" / "config.json").read_text())
    assert saved["hidden_size"] == 64 and saved["num_key_value_heads"] == 1 and saved["vocab_size"] == 512
    assert "max_steps: 3" in (out / "config.yaml").read_text()


@pytest.mark.parametrize("path", sorted((Path(__file__).parent.parent / "configs").glob("pretrain-*.yaml")))
def test_example_configs_resolve(path):
    import argparse

    from lmsmith.recipes.pretrain import resolve_options

    opts = resolve_options(argparse.Namespace(config=str(path)))
    assert opts["preset"] and opts["out"]
