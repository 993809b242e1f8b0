"""Online RL (`lmsmith rl`): advantages and the clipped objective against hand computations, rollout
batches, a reward that pays for one token raises that token's frequency, exact-match and reward-model
rewards with held-out metrics and curves, one-line errors for a failing reward function, exact resume."""

import json
import math
import random

import pytest
import torch

import lmsmith
from lmsmith.checkpoint import save
from lmsmith.cli import main
from lmsmith.config import ModelConfig
from lmsmith.data import synth
from lmsmith.model import build_model
from lmsmith.reward_model import RewardModel
from lmsmith.rl.prompts import read_prompts
from lmsmith.rl.rollout import Rollouts
from lmsmith.tokenizer import Tokenizer
from lmsmith.train.grpo import clipped_policy_loss, group_advantages

COMMON = ("--dtype", "fp32", "--no-progress", "--peak-flops", "1e12")


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """Reversal prompts with answers (100 to train, 20 held out) and an untrained tiny model."""
    root = tmp_path_factory.mktemp("rl")
    rng = random.Random(2)
    qs = {}
    while len(qs) < 120:
        q, a, _ = synth._reverse(rng, (2, 3))
        qs[q] = a
    rows = [{"task": "reverse", "instruction": q, "solution": a} for q, a in qs.items()]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:100]))
    (root / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[100:]))
    tok = Tokenizer.train([f"{q}\n{a}" for q, a in qs.items()] * 3, vocab_size=300, show_progress=False)
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=192,
                      max_seq_len=64, tie_embeddings=True)
    save(build_model(cfg, seed=0), tok, root / "model")
    return root


def test_group_advantages_match_hand_computation():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    grpo = group_advantages(r, "mean", "group")
    std = math.sqrt(sum((x - 0.5) ** 2 for x in (1, 0, 0, 1)) / 3)  # unbiased, as GRPO
    assert torch.allclose(grpo[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-4))
    assert torch.equal(grpo[1], torch.zeros(4))  # a group that all agrees teaches nothing
    rloo = group_advantages(r, "leave-one-out", "none")
    assert torch.allclose(rloo[0], torch.tensor([1 - 1 / 3, -2 / 3, -2 / 3, 1 - 1 / 3]))
    assert torch.equal(group_advantages(r, "none", "none"), r)


def test_clipped_objective_matches_hand_computation():
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.1, -3.0]], requires_grad=True)
    old = torch.tensor([[-1.5, -1.9, 0.0], [-0.2, -0.1, 0.0]])
    ref = torch.tensor([[-1.2, -2.5, 0.0], [-0.4, -0.3, 0.0]])
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[True, True, False], [True, True, False]])
    eps, kl = 0.2, 0.1
    loss, metrics = clipped_policy_loss(logp, old, adv, mask, clip_eps=eps, kl=kl, ref_logp=ref)
    expect, kls = 0.0, []
    for i in range(2):
        for t in range(2):
            ratio = math.exp(logp[i, t].item() - old[i, t].item())
            a = adv[i].item()
            pg = -min(ratio * a, min(max(ratio, 1 - eps), 1 + eps) * a)
            d = ref[i, t].item() - logp[i, t].item()
            kls.append(math.exp(d) - d - 1)
            expect += pg + kl * kls[-1]
    assert loss.item() == pytest.approx(expect, rel=1e-6)
    assert metrics["kl"] == pytest.approx(sum(kls) / 4, rel=1e-6)
    # Row 0 token 0: ratio e^0.5 > 1.2 with a positive advantage is clipped: no gradient through it.
    loss.backward()
    assert logp.grad[0, 0] == pytest.approx(kl * (1 - math.exp(ref[0, 0].item() - logp[0, 0].item())), rel=1e-5)
    assert logp.grad[0, 2] == 0 and logp.grad[1, 2] == 0  # outside the mask


class _Counter:
    """A reward callable for the Python API: 1 per response containing `needle`."""

    def __init__(self, needle):
        self.needle = needle

    def __call__(self, items, responses):
        return [float(self.needle in r) for r in responses]


def test_rollout_batch_layout(task):
    model, tok = lmsmith.load(task / "model")
    prompts = read_prompts(task / "train.jsonl")
    ro = Rollouts(model, tok, prompts, _Counter("a"), group_size=4, prompts_per_step=3, max_new_tokens=6, seed=5)
    b = next(ro)
    assert b["input_ids"].shape[0] == 12 and b["advantages"].shape == (12,)
    adv = b["advantages"].view(3, 4)
    assert torch.allclose(adv.sum(1), torch.zeros(3), atol=1e-4)  # mean baseline: zero-sum groups
    from lmsmith.decoding import encode_chat

    for r in range(12):
        p = encode_chat(tok, prompts[ro._order[r // 4]]["messages"])
        lab = b["labels"][r]
        first = int((lab != -100).nonzero()[0])
        assert first == len(p) - 1  # targets start where the response does
        assert b["input_ids"][r, :len(p)].tolist() == p
        n = int((lab != -100).sum())
        assert 1 <= n <= 7  # up to 6 new tokens, plus the end token when it ended
    assert 0 <= b["stats"]["accuracy"] <= 1 and b["stats"]["length"] > 0


def test_rl_raises_the_frequency_of_the_rewarded_token(task, tmp_path, capsys):
    """The reward is 1 for responses containing 'o' (a user function in a file): the loop optimises it."""
    fn = tmp_path / "my_reward.py"
    fn.write_text("def reward(prompt, response):\n    return float('o' in response)\n")
    out = tmp_path / "o"
    rc = main(["rl", str(task / "model"), "--prompts", str(task / "train.jsonl"), "--reward", f"{fn}:reward",
               "--method", "full", "--lr", "1e-2", "--max-steps", "20", "--group-size", "8",
               "--prompts-per-step", "8", "--max-new-tokens", "6", "--missing-eos-penalty", "0",
               "--warmup-steps", "0", "--save-every", "0", "--out", str(out), *COMMON])
    assert rc == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward"] for r in rows if "reward" in r]
    assert len(rewards) == 20 and sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.25, rewards
    # Sampled afresh from the saved policy and the start, with one seed: 'o' is more frequent now.
    from lmsmith.decoding import GenerationConfig, encode_chat, generate_ids

    def share(path):
        model, tok = lmsmith.load(path)
        prompts = [encode_chat(tok, p["messages"]) for p in read_prompts(task / "heldout.jsonl")]
        cfg = GenerationConfig(strategy="sample", max_new_tokens=6, num_return_sequences=8, seed=11,
                               eos_ids=tok.eos_ids)
        comps = generate_ids(model, prompts, cfg, decode=lambda x: tok.decode(x, skip_special_tokens=True))
        return sum("o" in c.text for c in comps) / len(comps)

    assert share(out / "final") > share(task / "model") + 0.15
    assert "sampling" in capsys.readouterr().out


def test_exact_reward_with_lora_heldout_metrics_and_curves(task, tmp_path, capsys):
    out = tmp_path / "exact"
    rc = main(["rl", str(task / "model"), "--prompts", str(task / "train.jsonl"), "--reward", "exact",
               "--eval-prompts", str(task / "heldout.jsonl"), "--pass-k", "4", "--eval-every", "2",
               "--max-steps", "4", "--group-size", "4", "--prompts-per-step", "4", "--max-new-tokens", "6",
               "--kl", "0.05", "--baseline", "leave-one-out", "--lora-r", "4", "--merge", "--out", str(out), *COMMON])
    assert rc == 0
    text = capsys.readouterr().out
    assert "held-out before: accuracy" in text and "Held-out accuracy" in text
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_accuracy" in r]
    assert [r["step"] for r in evals] == [2, 4] and all({"val_pass@1", "val_pass@4"} <= set(r) for r in evals)
    train_rows = [r for r in rows if "loss" in r]
    assert all(r["kl"] >= 0 for r in train_rows) and train_rows[0]["kl"] == pytest.approx(0, abs=1e-6)
    assert (out / "rl.png").stat().st_size > 1000 and (out / "adapter" / "adapter_config.json").exists()
    assert (out / "merged" / "model.safetensors").exists()
    summary = json.loads((out / "rl_summary.json").read_text())
    assert 0 < summary["sampling_share"] < 1 and summary["before"]["val_accuracy"] >= 0


def test_reward_model_as_the_reward(task, tmp_path):
    model, tok = lmsmith.load(task / "model")
    save(RewardModel.from_causal_lm(model, seed=1), tok, tmp_path / "rm")
    out = tmp_path / "o"
    rc = main(["rl", str(task / "model"), "--prompts", str(task / "train.jsonl"), "--reward", str(tmp_path / "rm"),
               "--max-steps", "2", "--group-size", "2", "--prompts-per-step", "2", "--max-new-tokens", "4",
               "--missing-eos-penalty", "0", "--out", str(out), *COMMON])
    assert rc == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "reward" in x]
    rm, _ = lmsmith.load(tmp_path / "rm")
    assert rows and all(math.isfinite(r["reward"]) for r in rows) and rows[0]["reward"] != 0


@pytest.mark.parametrize("body,expect", [
    ("raise ValueError('boom')", "raised ValueError: boom for prompt 'Reverse the words:"),
    ("return float('nan')", "returned nan for prompt 'Reverse the words:"),
])
def test_reward_function_errors_are_one_line_naming_the_prompt(task, tmp_path, capsys, body, expect):
    fn = tmp_path / "bad_reward.py"
    fn.write_text(f"def reward(prompt, response):\n    {body}\n")
    rc = main(["rl", str(task / "model"), "--prompts", str(task / "train.jsonl"), "--reward", f"{fn}:reward",
               "--max-steps", "2", "--group-size", "2", "--prompts-per-step", "2", "--max-new-tokens", "3",
               "--out", str(tmp_path / "o"), *COMMON])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and expect in err and "(line " in err and len(err.splitlines()) == 1, err


def test_bad_prompts_and_missing_answers_are_one_line(task, tmp_path, capsys):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "hello"}\n')
    rc = main(["rl", str(task / "model"), "--prompts", str(bad), "--reward", "exact", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and f"{bad}:1: no answer to check" in err and len(err.splitlines()) == 1, err


def test_rl_resume_equals_uninterrupted_run(task, tmp_path, monkeypatch):
    fn = tmp_path / "r.py"
    fn.write_text("def reward(prompt, response):\n    return float(len(response) % 3)\n")

    def args(out):
        return ["rl", str(task / "model"), "--prompts", str(task / "train.jsonl"), "--reward", f"{fn}:reward",
                "--method", "lora", "--lora-r", "4", "--lr", "1e-2", "--max-steps", "6", "--group-size", "4",
                "--prompts-per-step", "3", "--max-new-tokens", "5", "--reuse", "2", "--warmup-steps", "0",
                "--save-every", "3", "--out", str(out), *COMMON]

    full = tmp_path / "full"
    assert main(args(full)) == 0
    original, calls = Rollouts.__next__, {"n": 0}

    def interrupt_at_4(self):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original(self)

    part = tmp_path / "part"
    monkeypatch.setattr(Rollouts, "__next__", interrupt_at_4)
    assert main(args(part)) == 130  # after step 3: the checkpoint holds rollout 2, used once of twice (--reuse 2)
    monkeypatch.setattr(Rollouts, "__next__", original)
    assert main(["rl", str(task / "model"), "--out", str(part), "--resume", "--no-progress"]) == 0

    def losses(out):
        return {r["step"]: (r["loss"], r["reward"]) for r in
                (json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r}

    assert len(losses(full)) == 6 and losses(full) == losses(part)
    from safetensors.torch import load_file

    wa = load_file(str(full / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(part / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_log_probabilities_are_of_the_tempered_distribution(task):
    """Rollouts sampled at temperature T are scored under logits / T (the distribution they came from)."""
    model, _ = lmsmith.load(task / "model")
    ids = torch.tensor([[5, 9, 13, 17, 21]])
    labels = torch.tensor([[-100, 9, 13, 17, 30]])
    got = -model(ids, labels=labels, reduction="none", temperature=0.5)
    logits = model(ids)[0] / 0.5
    want = torch.log_softmax(logits, -1)[torch.arange(5), labels[0].clamp(min=0)] * (labels[0] != -100)
    assert torch.allclose(got[0], want, atol=1e-5)


def test_python_api_runs_rl_on_the_training_loop(task, tmp_path):
    """The README's Python recipe: Rollouts as the batch source of `train`, a plain callable as the reward."""
    from lmsmith.train import TrainConfig, train
    from lmsmith.train.grpo import grpo_objective

    policy, tok = lmsmith.load(task / "model")
    rollouts = Rollouts(policy, tok, read_prompts(task / "train.jsonl"),
                        lambda items, responses: [float(len(r) < 8) for r in responses], group_size=4,
                        prompts_per_step=4, max_new_tokens=6)
    result = train(policy, rollouts, grpo_objective(), TrainConfig(lr=1e-3, max_steps=3, warmup_steps=0, dtype="fp32",
                                                                   progress=False, peak_flops=1e12),
                   out_dir=tmp_path / "api", tokenizer=tok)
    assert result.steps == 3 and (tmp_path / "api" / "final" / "model.safetensors").exists()
    rows = [json.loads(x) for x in (tmp_path / "api" / "metrics.jsonl").read_text().splitlines()]
    assert all("reward" in r and "length" in r for r in rows if "loss" in r)
