"""The one training loop: schedules, accumulation, resume, atomic checkpoints, NaN, Ctrl-C."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmsmith.config import ModelConfig
from lmsmith.errors import LmsmithError
from lmsmith.model import build_model
from lmsmith.train import (
    TrainConfig,
    accumulate_gradients,
    apply_activation_checkpointing,
    causal_lm_objective,
    lr_at,
    param_groups,
    sample_text,
    train,
)
from lmsmith.train import state as st

CFG = ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, max_seq_len=64)


class Stream:
    """A learnable synthetic stream: each token's successor is fixed by a permutation.

    Batch k depends only on (seed, k); its position is checkpointable, like MixtureBatches.
    """

    def __init__(self, batch=8, seq=32, seed=0, vocab=256, fail_at=None, exc=RuntimeError):
        self.batch, self.seq, self.seed, self.vocab = batch, seq, seed, vocab
        self.perm = torch.randperm(vocab, generator=torch.Generator().manual_seed(1234))
        self.k, self.fail_at, self.exc = 0, fail_at, exc

    def __iter__(self):
        return self

    def __next__(self):
        if self.fail_at is not None and self.k == self.fail_at:
            raise self.exc("injected")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.k)
        self.k += 1
        x = torch.empty(self.batch, self.seq + 1, dtype=torch.long)
        x[:, 0] = torch.randint(0, self.vocab, (self.batch,), generator=g)
        for t in range(self.seq):
            x[:, t + 1] = self.perm[x[:, t]]
        return {"input_ids": x[:, :-1].clone(), "labels": x[:, 1:].clone()}

    def state_dict(self):
        return {"k": self.k}

    def load_state_dict(self, sd):
        self.k = sd["k"]


def tcfg(**kw):
    base = dict(lr=3e-3, warmup_steps=2, max_steps=12, dtype="fp32", log_every=1, save_every=3, keep_last=10,
                clip_grad=1.0, peak_flops=1e11, progress=False, seed=0)
    return TrainConfig(**{**base, **kw})


def model(seed=0):
    return build_model(CFG, seed=seed)


# ---- schedules and groups ------------------------------------------------------------------


def test_lr_schedules():
    kw = dict(lr=1.0, max_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(99, **kw) == pytest.approx(0.1)  # cosine ends at min_lr on the last step
    cos = [lr_at(s, **kw) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(cos, cos[1:]))
    wsd = [lr_at(s, schedule="wsd", decay_fraction=0.2, **kw) for s in range(100)]
    assert wsd[10:80] == [1.0] * 70  # stable
    assert wsd[99] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(wsd[80:], wsd[81:]))  # linear decay over the last 20%
    assert lr_at(50, schedule="constant", **kw) == 1.0


def test_config_validation():
    with pytest.raises(LmsmithError, match="schedule"):
        TrainConfig(schedule="linear")
    with pytest.raises(LmsmithError, match="warmup_steps"):
        TrainConfig(warmup_steps=10, max_steps=10)
    with pytest.raises(LmsmithError, match="grad_accum"):
        TrainConfig(grad_accum=0)


def test_weight_decay_groups():
    m = model()
    decay, no_decay = param_groups(m, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    d = {id(p) for p in decay["params"]}
    names = {n for n, p in m.named_parameters() if id(p) in d}
    assert "model.layers.0.self_attn.q_proj.weight" in names
    assert "model.embed_tokens.weight" not in names  # embeddings (and the tied head) are not decayed
    assert not any("norm" in n for n in names)
    total = sum(len(g["params"]) for g in (decay, no_decay))
    assert total == len({id(p) for p in m.parameters()})  # tied weight counted once


# ---- accumulation ----------------------------------------------------------------------------


def test_grad_accumulation_normalises_over_tokens(tmp_path):
    big = next(Stream(batch=8, seed=3))
    big["labels"][0, :20] = -100  # unequal target counts between the two halves
    big["labels"][5, 3:7] = -100
    halves = [{k: v[:4] for k, v in big.items()}, {k: v[4:] for k, v in big.items()}]
    m1, m2 = model(), model()
    l1, n1, _ = accumulate_gradients(m1, [big], causal_lm_objective)
    l2, n2, _ = accumulate_gradients(m2, halves, causal_lm_objective)
    assert n1 == n2 == 8 * 32 - 24
    assert l1 == pytest.approx(l2, rel=1e-6)
    for (name, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-4, atol=1e-6, msg=name)
    # And one full optimizer step through the loop lands on the same parameters.
    labels_a, labels_b = [big], halves

    class Fixed:
        def __init__(self, items):
            self.items = list(items)

        def __iter__(self):
            return self

        def __next__(self):
            return self.items.pop(0)

    m1, m2 = model(), model()
    kw = dict(max_steps=1, warmup_steps=0, save_every=0, clip_grad=0.0)
    train(m1, Fixed(labels_a), causal_lm_objective, tcfg(**kw), out_dir=tmp_path / "a")
    train(m2, Fixed(labels_b), causal_lm_objective, tcfg(grad_accum=2, **kw), out_dir=tmp_path / "b")
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p1, p2, rtol=1e-4, atol=1e-5)


def test_activation_checkpointing_same_gradients():
    batch = next(Stream(batch=2))
    m1, m2 = model(), model()
    apply_activation_checkpointing(m2)
    accumulate_gradients(m1, [batch], causal_lm_objective)
    accumulate_gradients(m2, [batch], causal_lm_objective)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad)
    assert set(m1.state_dict()) == set(m2.state_dict())


# ---- runs ----------------------------------------------------------------------------------------


def test_learns_and_writes_metrics_and_plot(tmp_path):
    cfg = tcfg(max_steps=40, lr=1e-2, warmup_steps=4, eval_every=20, eval_batches=2, save_every=20, log_every=5)
    res = train(model(), Stream(), causal_lm_objective, cfg, out_dir=tmp_path,
                eval_batches=lambda: Stream(seed=99))
    first, last = res.losses[1], res.final_loss
    assert first > math.log(256) - 0.5
    assert last < 0.5 * first, (first, last)
    assert res.val_loss is not None and res.val_loss < 0.6 * first
    assert res.val_ppl == pytest.approx(math.exp(res.val_loss))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(5, 41, 5))
    for key in ("step", "loss", "lr", "tokens", "tokens_per_s", "mfu", "grad_norm", "elapsed"):
        assert key in train_rows[0]
    assert train_rows[-1]["tokens"] == 40 * 8 * 32
    assert sum("val_loss" in r and "val_ppl" in r for r in rows) == 2
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert (tmp_path / "final" / "config.json").is_file()
    assert res.checkpoint.name == "step-0000040"
    assert res.steps == 40 and res.tokens == 40 * 8 * 32


def test_mfu_never_above_100_percent_when_the_peak_probe_ran_on_a_busy_machine(tmp_path, monkeypatch):
    import lmsmith.train.loop as loop

    calls = []

    def probe(dtype, device, refresh=False):
        calls.append(refresh)
        return 1.0 if not refresh else 1e18  # an absurdly low first measurement, then a sane one

    monkeypatch.setattr(loop, "measure_matmul_peak", probe)
    train(model(), Stream(), causal_lm_objective, tcfg(max_steps=4, peak_flops=None, save_every=0), out_dir=tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    mfus = [r["mfu"] for r in rows if "mfu" in r]
    assert calls == [False, True] and all(0 < m <= 1 for m in mfus)


def test_resume_is_bit_identical(tmp_path):
    ref = train(model(), Stream(), causal_lm_objective, tcfg(), out_dir=tmp_path / "ref")
    # Crash (not Ctrl-C) while fetching step 8's batch: nothing saved past step 6.
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="injected"):
        train(model(), Stream(fail_at=7), causal_lm_objective, tcfg(), out_dir=out)
    assert st.latest_checkpoint(out / "checkpoints").name == "step-0000006"
    # A fresh process would rebuild the model with a different init; resume must not care.
    res = train(model(seed=5), Stream(), causal_lm_objective, tcfg(), out_dir=out, resume=True)
    assert sorted(res.losses) == list(range(7, 13))
    assert [res.losses[s] for s in range(7, 13)] == [ref.losses[s] for s in range(7, 13)]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 13))
    assert [r["loss"] for r in rows if "loss" in r] == [ref.losses[s] for s in range(1, 13)]


def test_ctrl_c_saves_resumable_checkpoint(tmp_path, capsys):
    ref = train(model(), Stream(), causal_lm_objective, tcfg(grad_accum=2), out_dir=tmp_path / "ref")
    out = tmp_path / "run"
    # KeyboardInterrupt on the second micro-batch of step 5 (mid-step).
    res = train(model(), Stream(fail_at=9, exc=KeyboardInterrupt), causal_lm_objective, tcfg(grad_accum=2),
                out_dir=out)
    assert res.interrupted and res.steps == 4
    assert "resume" in capsys.readouterr().err.lower()
    assert st.latest_checkpoint(out / "checkpoints").name == "step-0000004"
    res = train(model(), Stream(), causal_lm_objective, tcfg(grad_accum=2), out_dir=out, resume=True)
    assert [res.losses[s] for s in range(5, 13)] == [ref.losses[s] for s in range(5, 13)]


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    real = st.save_file
    calls = {"n": 0}

    def flaky(tensors, path, *a, **kw):
        if path.endswith("rng.safetensors"):
            calls["n"] += 1
            if calls["n"] == 2:  # the second checkpoint dies midway through its train_state
                raise OSError("disk full (injected)")
        return real(tensors, path, *a, **kw)

    monkeypatch.setattr(st, "save_file", flaky)
    with pytest.raises(OSError, match="injected"):
        train(model(), Stream(), causal_lm_objective, tcfg(), out_dir=tmp_path)
    ckpts = tmp_path / "checkpoints"
    assert [p.name for p in ckpts.iterdir()] == ["step-0000003"]  # no half-written folder left
    assert st.latest_checkpoint(ckpts).name == "step-0000003"
    m = model(seed=9)
    st.load_model_weights(m, ckpts / "step-0000003")
    state, opt, _ = st.load_train_state(ckpts / "step-0000003")
    assert state["step"] == 3 and opt
    from lmsmith.loader import load

    loaded, _ = load(ckpts / "step-0000003")  # a plain HF directory for everyone else
    torch.testing.assert_close(loaded.state_dict(), m.state_dict())


def test_nan_loss_stops_with_clear_message(tmp_path):
    calls = {"n": 0}

    def poisoned(m, batch):
        calls["n"] += 1
        loss, metrics, n = causal_lm_objective(m, batch)
        return (loss * float("nan") if calls["n"] == 5 else loss), metrics, n

    with pytest.raises(LmsmithError, match=r"diverged at step 5.*step-0000003"):
        train(model(), Stream(), poisoned, tcfg(), out_dir=tmp_path)
    ckpts = st.list_checkpoints(tmp_path / "checkpoints")
    assert [s for s, _ in ckpts] == [3]
    m = model(seed=9)
    st.load_model_weights(m, ckpts[0][1])
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_keep_last(tmp_path):
    train(model(), Stream(), causal_lm_objective, tcfg(max_steps=6, save_every=1, keep_last=2), out_dir=tmp_path)
    assert [s for s, _ in st.list_checkpoints(tmp_path / "checkpoints")] == [5, 6]


def test_sample_text_greedy():
    class ByteTok:
        bos_id, eos_ids = None, []

        def encode(self, text, add_bos=False):
            return list(text.encode())

        def decode(self, ids):
            return bytes(i % 256 for i in ids).decode("latin-1")

    out = sample_text(model(), ByteTok(), "ab", max_new_tokens=5)
    assert out.startswith("ab") and len(out) == 7
    assert out == sample_text(model(), ByteTok(), "ab", max_new_tokens=5)  # greedy is deterministic


def test_fused_linear_cross_entropy_matches_reference():
    from lmsmith.train.objectives import linear_cross_entropy

    g = torch.Generator().manual_seed(0)
    h = torch.randn(50, 16, generator=g, requires_grad=True)
    w = torch.randn(40, 16, generator=g, requires_grad=True)
    t = torch.randint(0, 40, (50,), generator=g)
    ref = torch.nn.functional.cross_entropy(h @ w.t(), t, reduction="sum")
    gh, gw = torch.autograd.grad(ref * 0.5, (h, w))
    out = linear_cross_entropy(h, w, t, chunk_rows=7)  # several uneven chunks
    fh, fw = torch.autograd.grad(out * 0.5, (h, w))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(fh, gh)
    torch.testing.assert_close(fw, gw)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, t, chunk_rows=7), ref.detach())
