"""Distributed training under torchrun (gloo, CPU): every layout gives the one-process losses.

Each launch starts 2 (or 4) processes of the tiny model for 10 steps; the reference is the same run in
one process. Checkpoints move between world sizes and layouts; the final folder loads in transformers.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmsmith.cli import main

WORKER = Path(__file__).with_name("dist_worker.py")
ROOT = WORKER.parent.parent


def _launch(nproc: int, *args: str, module: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    cmd += ["-m", "lmsmith", *args] if module else [str(WORKER), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _losses(proc: subprocess.CompletedProcess) -> dict[int, float]:
    line = [x for x in proc.stdout.splitlines() if x.startswith("{")][-1]
    return {int(k): v for k, v in json.loads(line).items()}


def _alone(out: Path, *args: str) -> dict[int, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(WORKER), str(out), *args], capture_output=True, text=True, env=env,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _losses(proc)


def _close(a: dict[int, float], b: dict[int, float], tol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for step in a:
        assert abs(a[step] - b[step]) <= tol * max(1.0, abs(a[step])), (step, a[step], b[step])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, 10 steps, a checkpoint at step 5: (losses, run folder)."""
    out = tmp_path_factory.mktemp("alone") / "run"
    return _alone(out, "save=5"), out


@pytest.mark.parametrize("nproc,layout", [(2, ["dp_shard=2"]), (2, ["dp_replicate=2", "dp_shard=1"]),
                                          (2, ["tp=2", "dp_shard=1", "stream=1", "meta=1"]),
                                          (4, ["tp=2", "dp_shard=2", "stream=1", "meta=1"]),
                                          (4, ["pp=2", "dp_shard=2", "gpipe=1"]),
                                          (4, ["pp=2", "dp_replicate=2", "dp_shard=1"]),
                                          (2, ["pp=2", "dp_shard=1", "interleaved=1"]),
                                          (4, ["pp=2", "dp_shard=2", "interleaved=1", "meta=1"])],
                         ids=["fsdp", "ddp", "tp-sp", "fsdp-x-tp", "pp-gpipe-x-fsdp", "pp-x-ddp", "pp-interleaved",
                              "pp-interleaved-x-fsdp"])
def test_every_layout_gives_the_single_process_losses(reference, tmp_path, nproc, layout):
    """meta=1: the model is built on the meta device and each rank initialises only its shards."""
    losses, _ = reference
    _close(_losses(_launch(nproc, str(tmp_path / "run"), *layout)), losses)


def test_vocab_parallel_cross_entropy_equals_the_whole_logits():
    """The loss of logits split by vocabulary (uneven: 11 over 2 ranks) and its gradient per slice."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(WORKER.with_name("dist_loss_parallel.py"))], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_sharded_checkpoint_resumes_on_one_process_and_final_loads_in_transformers(reference, tmp_path):
    from transformers import AutoModelForCausalLM

    import lmsmith

    losses, alone = reference
    run = tmp_path / "run"
    # stream=1: the worker fails if final/ gathers more than one whole tensor at a time
    _close(_losses(_launch(2, str(run), "dp_shard=2", "save=5", "stream=1")), losses)
    assert (run / "checkpoints" / "step-0000005" / "dcp" / ".metadata").is_file()
    hf = AutoModelForCausalLM.from_pretrained(run / "final")  # streamed from the shards by rank 0
    ours, _ = lmsmith.load(alone / "final")
    ids = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        # fp32 reductions in another order: the weights agree to ~1e-6, the logits to ~1e-5
        torch.testing.assert_close(hf(ids).logits, ours(ids), atol=1e-4, rtol=1e-4)
    shutil.rmtree(run / "checkpoints" / "step-0000010")
    resumed = _alone(run, "resume=1")  # 2 ranks -> 1
    _close(resumed, {k: v for k, v in losses.items() if k > 5})


def test_single_process_checkpoint_resumes_sharded_on_two(reference, tmp_path):
    losses, alone = reference
    run = tmp_path / "run"
    shutil.copytree(alone, run)
    shutil.rmtree(run / "checkpoints" / "step-0000010")
    shutil.rmtree(run / "final")
    _close(_losses(_launch(2, str(run), "dp_shard=2", "resume=1")), {k: v for k, v in losses.items() if k > 5})


def test_pipeline_1f1b_resumes_on_one_process_and_one_on_the_pipeline(reference, tmp_path):
    """2 stages (1F1B, the tied head on both ends): the one-process losses; its checkpoint resumes alone,
    a one-process checkpoint resumes on the pipeline, and final/ (read back from every stage's shards, one
    tensor at a time) loads in transformers."""
    from transformers import AutoModelForCausalLM

    import lmsmith

    losses, alone = reference
    run = tmp_path / "run"
    _close(_losses(_launch(2, str(run), "pp=2", "dp_shard=1", "save=5", "stream=1")), losses)  # one tensor at a time
    hf = AutoModelForCausalLM.from_pretrained(run / "final")
    ours, _ = lmsmith.load(alone / "final")
    ids = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        # The tied matrix's two gradient halves are added across stages, not in one buffer: after 10 Adam
        # steps at lr 3e-3 the weights agree to ~4e-5, the logits (of size ~1) to a few 1e-4.
        torch.testing.assert_close(hf(ids).logits, ours(ids), atol=5e-4, rtol=1e-4)
    rest = {k: v for k, v in losses.items() if k > 5}
    shutil.rmtree(run / "checkpoints" / "step-0000010")
    _close(_alone(run, "resume=1"), rest)  # pipeline -> 1
    other = tmp_path / "other"
    shutil.copytree(alone, other)
    shutil.rmtree(other / "checkpoints" / "step-0000010")
    shutil.rmtree(other / "final")
    _close(_losses(_launch(2, str(other), "pp=2", "dp_shard=1", "resume=1")), rest)  # 1 -> pipeline


def test_pipeline_x_tp_resumes_on_one_process_and_final_loads_in_transformers(reference, tmp_path):
    """2 stages x 2 tensor-parallel ranks (sequence parallel between the stages, the tied matrix split by
    vocabulary on both ends): the one-process losses, final/ loads in transformers, and the checkpoint
    resumes on one process."""
    from transformers import AutoModelForCausalLM

    import lmsmith

    losses, alone = reference
    run = tmp_path / "run"
    _close(_losses(_launch(4, str(run), "pp=2", "tp=2", "dp_shard=1", "save=5", "stream=1")), losses)
    hf = AutoModelForCausalLM.from_pretrained(run / "final")
    ours, _ = lmsmith.load(alone / "final")
    ids = torch.randint(0, 512, (2, 24))
    with torch.no_grad():  # as for the pipeline alone: the tied matrix's gradient halves added across stages
        torch.testing.assert_close(hf(ids).logits, ours(ids), atol=5e-4, rtol=1e-4)
    shutil.rmtree(run / "checkpoints" / "step-0000010")
    _close(_alone(run, "resume=1"), {k: v for k, v in losses.items() if k > 5})


def test_lora_under_fsdp(tmp_path):
    _close(_losses(_launch(2, str(tmp_path / "run"), "dp_shard=2", "lora=1", "save=5")),
           _alone(tmp_path / "alone", "lora=1"))


@pytest.mark.parametrize("layout", [["--dp-shard", "2"], ["--pp", "2", "--dp-shard", "1"]], ids=["fsdp", "pp"])
def test_pretrain_cli_under_torchrun_equals_one_process(tmp_path, layout):
    src = tmp_path / "src"
    src.mkdir()
    import json as json_module

    for f in Path(json_module.__file__).parent.glob("*.py"):
        shutil.copy(f, src / f.name)
    args = ["pretrain", "--source", f"code={src}", "--vocab-size", "300", "--preset", "tiny", "--max-steps", "6",
            "--batch-size", "8", "--seq-len", "64", "--log-every", "1", "--eval-every", "3",
            "--eval-batches", "20", "--dtype", "fp32", "--no-progress"]
    # 20 batches reach the validation split's short last batch: a pipeline cuts it, padded, into smaller
    # micro-batches than the others', so it needs a schedule of its own.
    assert main([*args, "--out", str(tmp_path / "alone")]) == 0
    proc = _launch(2, *args, "--out", str(tmp_path / "two"), *layout, module=True)
    assert proc.stdout.count("Trained tiny") == 1  # the summary comes from rank 0 only

    def rows(run):
        return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                if "loss" in r or "val_loss" in r]

    a, b = rows(tmp_path / "alone"), rows(tmp_path / "two")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        key = "loss" if "loss" in x else "val_loss"
        assert abs(x[key] - y[key]) < 1e-5, (x, y)
    assert (tmp_path / "two" / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("layout", [["--dp-shard", "2"], ["--dp-replicate", "2", "--dp-shard", "1"]],
                         ids=["fsdp", "ddp"])
def test_distill_cli_under_torchrun_equals_one_process(tmp_path, layout):
    """The teacher whole on every rank, the student sharded (FSDP) or replicated (DDP): the distillation
    losses, the validation KL and the student's perplexity equal one process's."""
    import json as json_module

    from lmsmith.checkpoint import save
    from lmsmith.config import ModelConfig
    from lmsmith.model import build_model
    from lmsmith.tokenizer import Tokenizer

    src = tmp_path / "src"
    src.mkdir()
    for f in Path(json_module.__file__).parent.glob("*.py"):
        shutil.copy(f, src / f.name)
    tok = Tokenizer.train([f.read_text() for f in src.glob("*.py")], vocab_size=300, show_progress=False)
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128,
                      max_seq_len=64, tie_embeddings=True)
    save(build_model(cfg, seed=3), tok, tmp_path / "teacher")
    args = ["distill", "--teacher", str(tmp_path / "teacher"), "--student", "nano", "--model", "dim=48,n_layers=1",
            "--source", f"code={src}", "--max-steps", "4", "--batch-size", "4", "--seq-len", "64", "--log-every", "1",
            "--eval-every", "2", "--eval-batches", "3", "--dtype", "fp32", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "alone")]) == 0
    _launch(2, *args, "--out", str(tmp_path / "two"), *layout, module=True)

    def rows(run):
        return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                if "loss" in r or "val_loss" in r]

    a, b = rows(tmp_path / "alone"), rows(tmp_path / "two")
    assert [r["step"] for r in a] == [r["step"] for r in b] and any("val_kl" in r for r in a)
    for x, y in zip(a, b):
        for key in ("loss", "val_loss", "val_kl", "val_ppl"):
            if key in x:
                assert abs(x[key] - y[key]) < 1e-5 * max(1.0, abs(x[key])), (key, x, y)
    assert (tmp_path / "two" / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("flags,message", [
    (["--dp-shard", "2"], "needs several processes"),
    (["--tp", "3"], "needs several processes"),
    (["--cp", "2"], "context parallelism needs CUDA"),
    (["--pp", "2"], "needs several processes"),
])
def test_layout_errors_are_one_line(tmp_path, capsys, flags, message):
    assert main(["pretrain", "--out", str(tmp_path / "run"), "--max-steps", "2", *flags]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_layout_product_and_heads():
    from lmsmith.config import preset
    from lmsmith.distributed import Layout
    from lmsmith.errors import LmsmithError

    assert Layout(tp=2).resolve(8).dp_shard == 4
    with pytest.raises(LmsmithError, match="= 8 processes, but torchrun started 4"):
        Layout(dp_replicate=2, dp_shard=2, tp=2).resolve(4)
    with pytest.raises(LmsmithError, match="does not divide the world size 6"):
        Layout(tp=4).resolve(6)
    cfg = preset("tiny")
    with pytest.raises(LmsmithError, match=f"--tp 4: the model.s {cfg.n_heads} attention heads do not divide"):
        Layout(tp=4, dp_shard=1).check_model(cfg)
    with pytest.raises(LmsmithError, match=f"--tp 3: the model.s {cfg.n_kv_heads} key/value heads"):
        Layout(tp=3, dp_shard=1).check_model(cfg)
    with pytest.raises(LmsmithError, match=f"--pp 8: the model has only {cfg.n_layers} layers"):
        Layout(pp=8, dp_shard=1).check_model(cfg)
    Layout(pp=2, tp=2, dp_shard=1).check_model(cfg)  # pipeline stages of tensor-parallel ranks


@pytest.fixture(scope="module")
def sft_task(tmp_path_factory):
    """64 word-reversal examples and an untrained 2-layer model with a tokenizer trained on them."""
    import random

    from lmsmith.checkpoint import save
    from lmsmith.config import ModelConfig
    from lmsmith.model import build_model
    from lmsmith.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("sft")
    rng = random.Random(0)
    words = ["cat", "dog", "sun", "owl", "tree", "wolf", "moon", "fish"]
    rows = []
    for _ in range(64):
        q = " ".join(rng.sample(words, 3))
        rows.append({"instruction": f"Reverse the words: {q}", "solution": " ".join(reversed(q.split()))})
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = Tokenizer.train([r["instruction"] + "\n" + r["solution"] for r in rows] * 3, vocab_size=300,
                          show_progress=False)
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=192,
                      max_seq_len=64, tie_embeddings=True)
    save(build_model(cfg, seed=0), tok, root / "model")
    return root


@pytest.mark.parametrize("method,layout", [(["--method", "lora", "--lora-r", "4", "--lr", "3e-3"], ["--dp-shard", "2"]),
                                           (["--method", "prompt", "--virtual-tokens", "4", "--lr", "3e-2"],
                                            ["--dp-replicate", "2", "--dp-shard", "1"]),
                                           (["--method", "prompt", "--virtual-tokens", "4", "--lr", "3e-2"],
                                            ["--dp-shard", "2"]),
                                           (["--method", "prefix", "--virtual-tokens", "4", "--lr", "1e-2"],
                                            ["--dp-shard", "2"])],
                         ids=["lora-fsdp", "prompt-ddp", "prompt-fsdp", "prefix-fsdp"])
def test_finetune_adapters_under_torchrun_equal_one_process(sft_task, tmp_path, method, layout):
    """`torchrun -m lmsmith finetune`: LoRA, prompt and prefix tuning under FSDP (the adapter gathered from
    the shards) and prompt tuning under DDP give the one-process losses and adapter."""
    from safetensors.torch import load_file

    args = ["finetune", str(sft_task / "model"), "--data", str(sft_task / "train.jsonl"), *method,
            "--max-steps", "6", "--batch-size", "8", "--log-every", "1", "--val-fraction", "0", "--dtype", "fp32",
            "--no-progress", "--seq-len", "64", "--peak-flops", "1e12", "--warmup-steps", "1"]
    assert main([*args, "--out", str(tmp_path / "alone")]) == 0
    _launch(2, *args, "--out", str(tmp_path / "two"), *layout, module=True)

    def losses(run):
        return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]

    a, b = losses(tmp_path / "alone"), losses(tmp_path / "two")
    assert len(a) == 6 and all(abs(x - y) < 1e-5 for x, y in zip(a, b)), (a, b)
    wa = load_file(tmp_path / "alone" / "adapter" / "adapter_model.safetensors")
    wb = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("layout", [["--pp", "2"], ["--tp", "2"]], ids=["pp", "tp"])
def test_full_finetune_under_pp_or_tp_equals_one_process(sft_task, tmp_path, layout):
    """`finetune --pp 2`: each stage trains only the parameters it holds (the tied head's last-stage copy by
    the embedding's name). `--tp 2`: batches of odd widths (sequence parallelism pads them to even). Both
    give the one-process training and validation losses."""
    args = ["finetune", str(sft_task / "model"), "--data", str(sft_task / "train.jsonl"), "--max-steps", "4",
            "--batch-size", "8", "--log-every", "1", "--val-fraction", "0.2", "--eval-every", "2", "--dtype", "fp32",
            "--no-progress", "--seq-len", "64", "--peak-flops", "1e12", "--warmup-steps", "1", "--lr", "1e-3"]
    assert main([*args, "--out", str(tmp_path / "alone")]) == 0
    _launch(2, *args, "--out", str(tmp_path / "two"), *layout, "--dp-shard", "1", module=True)

    def losses(run):
        rows = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        return [r.get("loss", r.get("val_loss")) for r in rows if "loss" in r or "val_loss" in r]

    a, b = losses(tmp_path / "alone"), losses(tmp_path / "two")
    assert len(a) == 6 and all(abs(x - y) < 1e-5 for x, y in zip(a, b)), (a, b)
    assert (tmp_path / "two" / "final" / "model.safetensors").is_file()


def test_ctrl_c_stops_every_rank_at_the_same_step_with_one_checkpoint(tmp_path):
    """SIGINT to the whole torchrun process group (what a terminal's Ctrl-C does): every rank stops after
    the same step, the sharded checkpoint of that step is complete, and --resume continues from it."""
    import signal
    import time

    src = tmp_path / "src"
    src.mkdir()
    import json as json_module

    for f in Path(json_module.__file__).parent.glob("*.py"):
        shutil.copy(f, src / f.name)
    out = tmp_path / "run"
    args = ["pretrain", "--source", f"code={src}", "--vocab-size", "300", "--preset", "tiny", "--batch-size", "4",
            "--seq-len", "64", "--log-every", "1", "--eval-every", "0", "--save-every", "0", "--no-progress",
            "--out", str(out), "--dp-shard", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lmsmith"]
    proc = subprocess.Popen([*cmd, *args, "--max-steps", "100000"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline and not (
            (out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 5):
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=180)
    stops = [line for line in err.splitlines() if line.startswith("Stopped by SIGINT at step")]
    assert len(stops) == 1, err[-3000:]  # said once, by rank 0
    step = int(stops[0].split("at step ")[1].split(".")[0])
    ckpt = out / "checkpoints" / f"step-{step:07d}"
    assert (ckpt / "dcp" / ".metadata").is_file() and len(list((ckpt / "dcp").glob("*.distcp"))) == 2
    _launch(2, *args, "--resume", "--max-steps", str(step + 2), module=True)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r][-3:] == [step, step + 1, step + 2]
    assert (out / "final" / "model.safetensors").is_file()
