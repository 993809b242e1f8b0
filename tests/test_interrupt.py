"""Ctrl-C and SIGTERM at any moment, then --resume: the loss sequence of an uninterrupted run, exactly."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import torch
from test_train import Stream, model, tcfg

from lmsmith.errors import LmsmithError
from lmsmith.train import causal_lm_objective, train
from lmsmith.train import state as st
from lmsmith.train.budget import fit_steps, format_duration, parse_duration


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _train_losses(out):
    return {r["step"]: r["loss"] for r in _rows(out) if "loss" in r}


class Signalling(Stream):
    """Sends `signals` to this process when batch `at` is drawn (0-based), i.e. during that step."""

    def __init__(self, at: int, signals=(signal.SIGINT,), **kw):
        super().__init__(**kw)
        self.at, self.signals = at, signals

    def __next__(self):
        if self.k == self.at:
            for s in self.signals:
                os.kill(os.getpid(), s)
        return super().__next__()


def _signal_during_objective(at_call: int, signals):
    calls = {"n": 0}

    def objective(m, batch):
        calls["n"] += 1
        if calls["n"] == at_call:
            for s in signals:
                os.kill(os.getpid(), s)
        return causal_lm_objective(m, batch)

    objective.perplexity = True
    return objective


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    train(model(), Stream(), causal_lm_objective, tcfg(), out_dir=out)
    return _train_losses(out), _rows(out)


@pytest.mark.parametrize("at,signals", [
    (4, (signal.SIGINT,)),                   # one Ctrl-C while step 5 draws its batch
    (3, (signal.SIGINT,)),                   # right after step 3 was checkpointed (save_every 3)
    (7, (signal.SIGTERM,)),                  # what a scheduler sends
    (5, (signal.SIGINT, signal.SIGINT)),     # two Ctrl-C at once: interrupts mid-step
])
def test_signal_then_resume_is_exact(tmp_path, reference, at, signals, capsys):
    ref_losses, ref_rows = reference
    out = tmp_path / "run"
    res = train(model(), Signalling(at, signals), causal_lm_objective, tcfg(), out_dir=out)
    assert res.interrupted
    done = res.steps
    assert done == (at if len(signals) > 1 else at + 1)  # a single signal lets the step in flight finish
    assert st.latest_checkpoint(out / "checkpoints").name == st.step_dir_name(done)
    state, _, _ = st.load_train_state(out / "checkpoints" / st.step_dir_name(done))
    assert state["data_state"] == {"k": done} and state["step"] == done
    assert state["tokens"] == done * 8 * 32  # only completed steps count
    err = capsys.readouterr().err
    assert ("SIGTERM" in err) == (signals[0] == signal.SIGTERM) and "--resume" in err
    res = train(model(seed=3), Stream(), causal_lm_objective, tcfg(), out_dir=out, resume=True)
    assert _train_losses(out) == ref_losses
    assert res.tokens == 12 * 8 * 32 and res.steps_run == 12 - done


def test_signal_during_backward_of_a_step_after_a_checkpoint_keeps_it(tmp_path, reference):
    """Step 7's forward, right after step 6 was saved: the good step-6 checkpoint is not rewritten."""
    out = tmp_path / "run"
    res = train(model(), Stream(), _signal_during_objective(7, (signal.SIGINT, signal.SIGINT)), tcfg(),
                out_dir=out)
    assert res.interrupted and res.steps == 6
    ckpt = out / "checkpoints" / "step-0000006"
    state, _, _ = st.load_train_state(ckpt)
    assert state["data_state"] == {"k": 6}
    train(model(), Stream(), causal_lm_objective, tcfg(), out_dir=out, resume=True)
    assert _train_losses(out) == reference[0]


def test_signal_in_the_last_step_then_resume_finishes(tmp_path, reference):
    out = tmp_path / "run"
    res = train(model(), Signalling(11), causal_lm_objective, tcfg(), out_dir=out)
    assert res.interrupted and res.steps == 12 and res.final_dir is None
    res = train(model(), Stream(), causal_lm_objective, tcfg(), out_dir=out, resume=True)
    assert not res.interrupted and (out / "final" / "model.safetensors").exists()
    assert _train_losses(out) == reference[0]


def test_corrupt_latest_checkpoint_falls_back_to_an_older_one(tmp_path, reference, capsys):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="injected"):
        train(model(), Stream(fail_at=10), causal_lm_objective, tcfg(), out_dir=out)
    ckpts = out / "checkpoints"
    assert st.latest_checkpoint(ckpts).name == "step-0000009"
    (ckpts / "step-0000009" / "train_state" / "state.json").write_text("{not json")
    (ckpts / "step-0000006" / "model.safetensors").write_bytes(b"\0" * 100)  # and the one before
    # Leftovers of a kill while writing final/ and the shards are cleaned on the next start.
    (out / "final.tmp-abc").mkdir()
    (out / "data.tmp-x1y2").mkdir()
    res = train(model(), Stream(), causal_lm_objective, tcfg(), out_dir=out, resume=True)
    err = capsys.readouterr().err
    assert "step-0000009 is unreadable" in err and "step-0000006 is unreadable" in err
    assert res.steps_run == 9  # from step 3
    assert _train_losses(out) == reference[0]
    assert not (out / "final.tmp-abc").exists() and not (out / "data.tmp-x1y2").exists()


def test_no_readable_checkpoint_is_one_line_error(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError):
        train(model(), Stream(fail_at=4), causal_lm_objective, tcfg(), out_dir=out)
    (out / "checkpoints" / "step-0000003" / "train_state" / "optimizer.safetensors").write_bytes(b"junk")
    with pytest.raises(LmsmithError, match="unreadable.*--overwrite"):
        train(model(), Stream(), causal_lm_objective, tcfg(), out_dir=out, resume=True)


def test_killed_final_write_adds_no_second_validation_row(tmp_path, monkeypatch):
    def evals():
        return iter([Stream(seed=9).__next__() for _ in range(2)])

    out = tmp_path / "run"
    from lmsmith.train import loop

    def die(*a, **kw):
        raise SystemExit("killed while writing final/")

    monkeypatch.setattr(loop.st, "save_model", die)
    with pytest.raises(SystemExit):
        train(model(), Stream(), causal_lm_objective, tcfg(eval_batches=2), out_dir=out, eval_batches=evals)
    monkeypatch.undo()
    train(model(), Stream(), causal_lm_objective, tcfg(eval_batches=2), out_dir=out, eval_batches=evals, resume=True)
    assert [r["step"] for r in _rows(out) if "val_loss" in r] == [12]
    assert (out / "final" / "model.safetensors").exists()


def test_time_budget_ends_on_time(tmp_path):
    budget = 20.0
    t0 = time.perf_counter()
    res = train(model(), Stream(), causal_lm_objective,
                tcfg(max_steps=100_000, warmup_steps=10, save_every=50, time_budget=budget, log_every=10),
                out_dir=tmp_path / "b", eval_batches=lambda: iter([Stream(seed=9).__next__() for _ in range(2)]))
    wall = time.perf_counter() - t0
    assert res.time_budget == budget and 20 < res.steps < 100_000
    assert abs(wall - budget) < 0.1 * budget, (wall, res.steps)
    # The fitted length is the schedule's: the LR reaches its minimum at the last step.
    rows = [r for r in _rows(tmp_path / "b") if "lr" in r]
    assert rows[-1]["step"] == res.steps and rows[-1]["lr"] == pytest.approx(3e-3 * 0.1, rel=1e-6)


def test_durations():
    assert parse_duration("10m") == 600 and parse_duration("1h30m") == 5400 and parse_duration("90s") == 90
    assert parse_duration(12.5) == 12.5 and format_duration(5400) == "1h30m" and format_duration(90) == "1m30s"
    for bad in ("ten minutes", "5x", "-3m", "0", "nan"):
        with pytest.raises(LmsmithError, match="--time"):
            parse_duration(bad)
    assert fit_steps(100, 10, 5, 1.0, 10**9) == 5 + int(100 * 0.99 - 10)
    assert fit_steps(100, 10, 5, 1.0, 50) == 50
    assert fit_steps(10, 20, 5, 1.0, 50) == 6  # over budget already: one more step


def test_cpu_only_objective_metrics_and_tokens_for_pair_batches(tmp_path):
    """The loop counts tokens of any objective's batch (DPO's chosen/rejected ids) and keeps its eval metrics."""
    from lmsmith.train.loop import _batch_tokens, evaluate

    batch = {"chosen_ids": torch.zeros(2, 5, dtype=torch.long), "rejected_ids": torch.zeros(2, 7, dtype=torch.long),
             "chosen_labels": torch.zeros(2, 5, dtype=torch.long)}
    assert _batch_tokens(batch) == (24, 7)

    def pair_objective(m, b):
        return torch.tensor(2.0), {"reward_accuracy": 0.5}, 4

    ev = evaluate(model(), lambda: iter([batch]), pair_objective, n_batches=1, policy="fp32")
    assert ev == {"val_loss": 0.5, "val_reward_accuracy": 0.5}  # no "perplexity" of a DPO loss
    ev = evaluate(model(), lambda: iter([Stream().__next__()]), causal_lm_objective, n_batches=1, policy="fp32")
    assert "val_ppl" in ev
