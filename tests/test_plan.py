"""`lmsmith plan`: the quoted rules of thumb, sharding arithmetic, and its memory prediction against a
measured training step (one process, and FSDP on 2 ranks)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmsmith.cli import main
from lmsmith.config import preset
from lmsmith.distributed import plan as pl

ROOT = Path(__file__).parent.parent


def test_rules_of_thumb_reproduce_the_quoted_llama_figures():
    big = pl.rule_of_thumb(preset("llama-3.1-405b"))
    assert big["full (bf16 AdamW, 8 B/param)"] == pytest.approx(3.25e12, rel=0.005)  # Hugging Face: 3.25 TB
    assert big["full (mixed-precision AdamW, 16 B/param)"] == pytest.approx(6.5e12, rel=0.005)  # "about 6.5 TB"
    small = pl.rule_of_thumb(preset("llama-3.1-8b"))
    assert small["full (bf16 AdamW, 8 B/param)"] / 2**30 == pytest.approx(60, rel=0.005)  # 60 "GB" (GiB)
    assert small["LoRA (bf16 base, 2 B/param)"] == pytest.approx(16e9, rel=0.01)  # 16 GB


def test_cli_prints_the_tables_and_device_counts(capsys):
    assert main(["plan", "--model", "llama-3.1-405b", "--gpus", "8", "--nodes", "16",
                 "--activation-checkpointing"]) == 0
    out = capsys.readouterr().out
    assert "405.85B parameters" in out and "3.25 TB" in out and "6.49 TB" in out
    row = next(line for line in out.splitlines() if line.strip().startswith("full (bf16"))
    assert row.split()[-3] == "41" and row.split()[-2:] == ["3.25", "TB"]  # 80 GB devices for 3.25 TB; HF's figure
    assert "950.0 GB" in out and "250.0 GB" in out  # Hugging Face's LoRA / QLoRA figures beside ours
    assert "tp 8" in out and "Assumptions:" in out
    assert main(["plan", "--model", "llama-3.1-405b", "--gpus", "8", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["layouts"] == []  # 3.25 TB + activations never fit on 8 x 80 GB


def test_sharded_state_falls_as_one_over_n_and_lora_is_small():
    job = pl.Job(preset("llama-3.1-8b"))
    one = pl.memory_per_device(job, pl.Layout(1, 1, 1, 1))
    eight = pl.memory_per_device(job, pl.Layout(1, 8, 1, 1))
    for kind in ("weights", "gradients", "optimizer", "master weights"):
        assert eight[kind] == pytest.approx(one[kind] / 8)
    assert sum(one[k] for k in ("weights", "gradients", "optimizer", "master weights")) == pytest.approx(
        16 * preset("llama-3.1-8b").num_params())  # ZeRO's 16 bytes per parameter
    ddp = pl.memory_per_device(job, pl.Layout(8, 1, 1, 1))
    assert ddp["weights"] == one["weights"]  # replicas hold everything
    lora = pl.memory_per_device(pl.Job(preset("llama-3.1-8b"), method="lora"), pl.Layout(1, 1, 1, 1))
    assert lora["optimizer"] < one["optimizer"] / 100
    fits = pl.plan(job, pl.Hardware(gpus_per_node=8))
    assert fits and all(o.peak <= 0.9 * 80e9 for o in fits)
    assert not pl.plan(job, pl.Hardware(gpus_per_node=1))  # 128 GB of state on one 80 GB GPU


def _measure(nproc: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "65536"}
    script = str(ROOT / "tests" / "dist_memory.py")
    cmd = [sys.executable, script] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), script]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads([x for x in proc.stdout.splitlines() if x.startswith("{")][-1])


@pytest.mark.parametrize("nproc", [1, 2], ids=["one-process", "fsdp-2-ranks"])
def test_predicted_peak_matches_a_measured_training_step(nproc):
    r = _measure(nproc)
    assert abs(r["predicted"] - r["measured"]) <= 0.15 * r["measured"], r


def test_bad_sizes_are_one_line_errors(capsys):
    assert main(["plan", "--model", "tiny", "--gpu-memory", "lots"]) == 1
    assert "write sizes like 80GB" in capsys.readouterr().err
    assert main(["plan", "--model", "no-such-model"]) == 1
