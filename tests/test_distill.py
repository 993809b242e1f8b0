"""Knowledge distillation: the losses against a direct computation, chunking, the top-K cache, and
`lmsmith distill` end to end (beats cross-entropy on KL, resumes exactly, one-line errors)."""

import json
import math
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from lmsmith.cli import main
from lmsmith.config import ModelConfig
from lmsmith.model import build_model
from lmsmith.train import distill as D

COMMON = ("--dtype", "fp32", "--no-progress", "--peak-flops", "1e12")


def _direct(zs: np.ndarray, zt: np.ndarray, kind: str, beta: float, T: float) -> np.ndarray:
    """The textbook formulas in float64: p teacher, q student, both softmax(z / T)."""
    def softmax(z):
        e = np.exp(z / T - (z / T).max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    p, q = softmax(zt.astype(np.float64)), softmax(zs.astype(np.float64))

    def kl(a, b):
        return (a * np.log(a / b)).sum(-1)

    if kind == "fkl":
        return kl(p, q)
    if kind == "rkl":
        return kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


@pytest.mark.parametrize("kind,beta", [("fkl", 0.5), ("rkl", 0.5), ("jsd", 0.1), ("jsd", 0.5), ("jsd", 0.9),
                                       ("jsd", 0.0), ("jsd", 1.0)])
@pytest.mark.parametrize("T", [1.0, 2.0, 0.5])
def test_divergences_equal_the_direct_formulas(kind, beta, T):
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(6, 50, generator=g) * 3, torch.randn(6, 50, generator=g) * 3
    got = D.divergence(torch.log_softmax(zs / T, -1), torch.log_softmax(zt / T, -1), kind, beta)
    want = _direct(zs.numpy(), zt.numpy(), kind, beta, T)
    if kind == "jsd" and beta == 0:  # trl's convention: the ends of jsd are the two KLs
        want = _direct(zs.numpy(), zt.numpy(), "fkl", 0, T)
    if kind == "jsd" and beta == 1:
        want = _direct(zs.numpy(), zt.numpy(), "rkl", 0, T)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-6)


def test_the_loss_scales_by_t_squared_mixes_alpha_and_has_no_nan_gradient_at_zero_mass():
    g = torch.Generator().manual_seed(1)
    cfg = ModelConfig(vocab_size=40, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=64, max_seq_len=16)
    student, teacher = build_model(cfg, seed=0), build_model(cfg, seed=1)
    ids = torch.randint(0, 40, (2, 8), generator=g)
    labels = torch.randint(0, 40, (2, 8), generator=g)
    labels[0, :3] = -100
    th = teacher.hidden_states(ids).detach()
    zs = student(ids)[labels != -100].detach()
    zt = teacher.lm_head(th)[labels != -100].detach()
    T, alpha = 2.0, 0.3
    spec = D.DistillSpec("rkl", T, 0.5, alpha)
    loss = student(ids, labels=D.DistillTargets(labels, spec, teacher_hidden=th, teacher_head=teacher.lm_head))
    ce = torch.nn.functional.cross_entropy(zs, labels[labels != -100], reduction="sum")
    want = alpha * T ** 2 * _direct(zs.numpy(), zt.numpy(), "rkl", 0, T).sum() + (1 - alpha) * float(ce)
    assert float(loss.detach()) == pytest.approx(want, rel=1e-4)
    # A teacher with zero mass on some tokens (-inf log-probs) gives finite gradients.
    lt = torch.log_softmax(torch.randn(4, 10), -1)
    lt[:, :3] = float("-inf")
    zs = torch.randn(4, 10, requires_grad=True)
    for kind in ("fkl", "jsd"):
        D.divergence(torch.log_softmax(zs, -1), lt, kind, 0.5).sum().backward()
        assert torch.isfinite(zs.grad).all()


def test_chunked_loss_and_gradients_equal_one_chunk(monkeypatch):
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, hidden_dim=64, max_seq_len=32)
    teacher = build_model(cfg, seed=1)
    ids = torch.randint(0, 64, (3, 20), generator=torch.Generator().manual_seed(0))
    labels = ids.roll(-1, 1)
    labels[:, -1] = -100
    th = teacher.hidden_states(ids)

    def run(chunk_logits):
        monkeypatch.setattr(D, "_CHUNK_LOGITS", chunk_logits)
        student = build_model(cfg, seed=0)
        spec = D.DistillSpec("jsd", 1.5, 0.3, 0.8)
        loss = student(ids, labels=D.DistillTargets(labels, spec, teacher_hidden=th, teacher_head=teacher.lm_head))
        loss.backward()
        return float(loss.detach()), {n: p.grad.clone() for n, p in student.named_parameters()}

    one, grads_one = run(1 << 30)
    many, grads_many = run(64 * 5)  # chunks of 5 positions
    assert many == pytest.approx(one, rel=1e-6)
    for n in grads_one:
        torch.testing.assert_close(grads_many[n], grads_one[n], rtol=1e-5, atol=1e-7)


# ---- end to end -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A `tiny` teacher pretrained briefly on real Python source (512-token vocabulary); its shards in
    run/data, next to run/final."""
    root = tmp_path_factory.mktemp("teacher")
    corpus = root / "corpus"
    corpus.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for sub in ("json", "email"):
        for f in sorted((stdlib / sub).glob("*.py")):
            shutil.copy(f, corpus / f"{sub}_{f.name}")
    run = root / "run"
    assert main(["pretrain", "--source", f"code={corpus}", "--vocab-size", "512", "--out", str(run),
                 "--batch-size", "8", "--seq-len", "64", "--max-steps", "200", "--lr", "3e-3", "--eval-every", "0",
                 "--save-every", "0", "--log-every", "50", *COMMON]) == 0
    return run / "final"


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _student_args(teacher: Path, out: Path, *extra: str) -> list[str]:
    return ["distill", "--teacher", str(teacher), "--student", "nano", "--model", "dim=48,n_layers=1",
            "--out", str(out), "--batch-size", "8", "--seq-len", "64", "--lr", "3e-3", "--eval-batches", "8",
            "--log-every", "5", *COMMON, *extra]


def test_distilled_student_ends_closer_to_the_teacher_than_cross_entropy(teacher, tmp_path, capsys):
    outs = {}
    for name, alpha in (("kd", "1"), ("ce", "0")):
        out = tmp_path / name
        assert main(_student_args(teacher, out, "--alpha", alpha, "--max-steps", "120", "--eval-every", "120",
                                  "--save-every", "0")) == 0
        outs[name] = [r for r in _rows(out) if "val_kl" in r][-1]
    text = capsys.readouterr().out
    assert "the shards the teacher was trained on" in text
    assert "student perplexity" in text and "KL to the teacher" in text
    kd, ce = outs["kd"], outs["ce"]
    assert kd["val_kl"] < 0.9 * ce["val_kl"], (kd, ce)
    # Evaluation reports the student's cross-entropy perplexity, not exp(distillation loss).
    assert kd["val_ppl"] == pytest.approx(math.exp(kd["val_ce"]), rel=1e-6)
    assert (tmp_path / "kd" / "final" / "model.safetensors").exists()


def test_distill_resume_reproduces_the_uninterrupted_losses(teacher, tmp_path, monkeypatch):
    common = ("--max-steps", "16", "--save-every", "6", "--log-every", "1", "--eval-every", "0")
    full = tmp_path / "full"
    assert main(_student_args(teacher, full, *common)) == 0
    from lmsmith.data import mixture

    original = mixture.MixtureBatches.__next__

    def interrupt_at_9(self):
        if self.step == 9:
            raise KeyboardInterrupt
        return original(self)

    part = tmp_path / "part"
    monkeypatch.setattr(mixture.MixtureBatches, "__next__", interrupt_at_9)
    assert main(_student_args(teacher, part, *common)) == 130
    monkeypatch.setattr(mixture.MixtureBatches, "__next__", original)
    assert main(["distill", "--out", str(part), "--resume", "--no-progress"]) == 0
    losses = {r["step"]: r["loss"] for r in _rows(full) if "loss" in r}
    assert {r["step"]: r["loss"] for r in _rows(part) if "loss" in r} == losses


def test_cache_with_the_whole_vocabulary_equals_online_and_trains(teacher, tmp_path, capsys):
    from lmsmith.data.teacher_cache import TeacherCache
    from lmsmith.loader import load

    cache_dir = tmp_path / "cache"
    assert main(["distill", "cache", "--teacher", str(teacher), "--top-k", "512", "--tokens", "4096",
                 "--val-tokens", "1024", "--seq-len", "64", "--out", str(cache_dir), "--dtype", "fp32"]) == 0
    assert "Cached the teacher's top-512" in capsys.readouterr().out
    cache = TeacherCache(cache_dir)
    assert cache.windows("train") == 64 and cache.windows("validation") == 16
    batch = cache.batch("train", np.arange(4))
    t_model, _ = load(teacher)
    student = build_model(ModelConfig(vocab_size=512, dim=48, n_layers=1, n_heads=3, n_kv_heads=1,
                                      hidden_dim=128, max_seq_len=64), seed=0)
    for kind in ("fkl", "rkl", "jsd"):
        spec = D.DistillSpec(kind, 1.0, 0.5, 1.0)
        online = D.distill_objective(spec, t_model)(student, batch)[0]
        cached = D.distill_objective(spec)(student, batch)[0]
        assert float(cached) == pytest.approx(float(online), rel=5e-3)  # fp16 log-probs on disk
    # Training from the cache: no teacher loaded; eval on the cached validation windows.
    out = tmp_path / "from-cache"
    assert main(["distill", "--teacher-cache", str(cache_dir), "--student", "nano", "--model", "dim=48,n_layers=1",
                 "--out", str(out), "--batch-size", "8", "--max-steps", "6", "--eval-every", "6",
                 "--save-every", "0", *COMMON]) == 0
    assert [r for r in _rows(out) if "val_kl" in r]
    # A truncated array is refused with the fix.
    f = cache_dir / "train.logp.bin"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(Exception, match="truncated or stale"):
        TeacherCache(cache_dir)


def test_top_k_cache_keeps_the_rest_mass(teacher, tmp_path):
    from lmsmith.data.teacher_cache import TeacherCache

    assert main(["distill", "cache", "--teacher", str(teacher), "--top-k", "8", "--tokens", "640",
                 "--val-tokens", "64", "--seq-len", "64", "--out", str(tmp_path / "c"), "--dtype", "fp32"]) == 0
    cache = TeacherCache(tmp_path / "c")
    b = cache.batch("train", np.arange(2))
    mass = b["teacher_logp"].exp().sum(-1) + b["teacher_rest"].exp()
    torch.testing.assert_close(mass, torch.ones_like(mass), rtol=0, atol=5e-3)
    assert (b["teacher_logp"][..., :-1] >= b["teacher_logp"][..., 1:] - 1e-3).all()  # most likely first
    assert (tmp_path / "c" / "train.ids.bin").stat().st_size == 10 * 64 * 8 * 2


def test_vocabulary_mismatch_names_the_first_differing_id(teacher, tmp_path, capsys):
    from lmsmith.checkpoint import save
    from lmsmith.tokenizer import Tokenizer

    tok = Tokenizer.train(["completely other text " * 50, "zebra yak quux"] * 20, vocab_size=280,
                          show_progress=False)
    other = tmp_path / "other"
    save(build_model(ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, n_kv_heads=1,
                                 hidden_dim=64, max_seq_len=64), seed=0), tok, other)
    assert main(["distill", "--teacher", str(teacher), "--student", str(other), "--out", str(tmp_path / "o"),
                 "--max-steps", "2", *COMMON]) == 1
    err = capsys.readouterr().err
    assert "token id" in err and "the teacher's" in err and len(err.strip().splitlines()) == 1


def test_lora_distillation_writes_a_peft_adapter(teacher, tmp_path):
    out = tmp_path / "lora"
    assert main(["distill", "--teacher", str(teacher), "--student", str(teacher), "--method", "lora",
                 "--lora-r", "2", "--out", str(out), "--batch-size", "4", "--seq-len", "64", "--max-steps", "3",
                 "--eval-every", "0", "--save-every", "0", *COMMON]) == 0
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 2


def test_on_policy_rows_are_the_students_samples_with_targets_on_them_only():
    cfg = ModelConfig(vocab_size=40, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=64, max_seq_len=32)
    student = build_model(cfg, seed=0)
    ids = torch.randint(0, 40, (4, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.roll(-1, 1)}
    new = D.on_policy_batch(student, batch, 0.5)
    assert torch.equal(new["input_ids"][2:], ids[2:]) and torch.equal(new["labels"][2:], batch["labels"][2:])
    for r in range(2):
        assert torch.equal(new["input_ids"][r, :8], ids[r, :8])  # the prompt: the row's first half
        assert (new["labels"][r, :7] == -100).all() and (new["labels"][r, 7:] != -100).all()
        assert torch.equal(new["labels"][r, 7:-1], new["input_ids"][r, 8:])  # shifted: the samples
    assert not torch.equal(new["input_ids"][:2], ids[:2])
    again = D.on_policy_batch(student, batch, 0.5)  # seeded by the batch: a resume draws the same
    assert torch.equal(again["input_ids"], new["input_ids"])
    # Instruction rows keep their prompt (the tokens before the first target).
    labels = batch["labels"].clone()
    labels[:, :5] = -100
    inst = D.on_policy_batch(student, {"input_ids": ids, "labels": labels}, 0.25)
    assert torch.equal(inst["input_ids"][0, :6], ids[0, :6]) and (inst["labels"][0, :5] == -100).all()
    with pytest.raises(Exception, match="teacher"):
        D.distill_objective(D.DistillSpec(), None, on_policy=0.5)


def test_on_policy_distillation_trains_from_the_cli(teacher, tmp_path, capsys):
    out = tmp_path / "gkd"
    assert main(_student_args(teacher, out, "--on-policy", "0.5", "--max-steps", "4", "--eval-every", "4",
                              "--save-every", "0")) == 0
    assert "50% of each batch sampled by the student" in capsys.readouterr().out
    assert [r for r in _rows(out) if "val_kl" in r]


def test_baseline_trains_the_same_student_without_the_teacher_and_compares(teacher, tmp_path, capsys):
    out = tmp_path / "kd"
    assert main(_student_args(teacher, out, "--max-steps", "30", "--eval-every", "30", "--save-every", "0",
                              "--baseline")) == 0
    text = capsys.readouterr().out
    assert "Distilled vs without the teacher" in text
    base = [r for r in _rows(out / "baseline") if "val_kl" in r][-1]
    kd = [r for r in _rows(out) if "val_kl" in r][-1]
    assert base["step"] == kd["step"] == 30 and kd["val_kl"] < base["val_kl"]
    assert (out / "baseline" / "final" / "model.safetensors").exists()
