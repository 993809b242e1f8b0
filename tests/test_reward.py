"""Reward models: the Bradley-Terry objective, `finetune --objective reward` (full and LoRA) saving a
sequence-classification directory that transformers scores identically, ranking held-out pairs above
chance, `lmsmith.load` / `lmsmith.score`, `lmsmith eval --preferences`, and one-line errors."""

import json
import random
import re

import pytest
import torch
import torch.nn.functional as F

import lmsmith
from lmsmith.checkpoint import save
from lmsmith.cli import main
from lmsmith.config import ModelConfig
from lmsmith.data import synth
from lmsmith.model import build_model
from lmsmith.reward_model import RewardModel, reward_ids, score_batch
from lmsmith.tokenizer import Tokenizer
from lmsmith.train.reward import bradley_terry_loss, reward_objective

COMMON = ("--dtype", "fp32", "--no-progress", "--seq-len", "64", "--peak-flops", "1e12")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Reversal preference pairs, 240 to train and 60 held out, and an untrained tiny model whose tokenizer
    knows the task's text. Prompts use the first 12 words; chosen: the words reversed; rejected: the same
    with its last word replaced by one of the other 12 (a word the prompt does not have), a rule an
    untrained model can learn in a few steps."""
    root = tmp_path_factory.mktemp("pairs")
    rng = random.Random(1)
    qs = {}
    while len(qs) < 300:
        words = rng.sample(synth.WORDS[:12], 3)
        answer = " ".join(words[::-1])
        qs[f"Reverse the words: {' '.join(words)}"] = (answer, " ".join([*words[::-1][:2],
                                                                          rng.choice(synth.WORDS[12:])]))
    rows = [{"task": "reverse", "prompt": q, "chosen": a, "rejected": w} for q, (a, w) in qs.items()]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:240]))
    (root / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[240:]))
    tok = Tokenizer.train([f"{q}\n{a}" for q, (a, _) in qs.items()] * 3, vocab_size=300, show_progress=False)
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=192,
                      max_seq_len=64, tie_embeddings=True)
    save(build_model(cfg, seed=0), tok, root / "model")
    return root


def test_bradley_terry_loss_equals_the_direct_formula():
    chosen, rejected = torch.tensor([1.5, -0.2, 0.3]), torch.tensor([0.5, 0.4, 0.3])
    for margin in (0.0, 0.7):
        direct = sum(math_log1p_exp(-(c - r - margin)) for c, r in zip(chosen.tolist(), rejected.tolist()))
        assert bradley_terry_loss(chosen, rejected, margin).item() == pytest.approx(direct, rel=1e-6)


def math_log1p_exp(x: float) -> float:
    import math

    return math.log1p(math.exp(x))  # -log sigmoid(-x)


def test_objective_scores_the_last_real_token_of_each_row(pairs):
    model, tok = lmsmith.load(pairs / "model")
    rm = RewardModel.from_causal_lm(model, seed=3).eval()
    a = reward_ids(tok, "Reverse the words: cat dog sun", "sun dog cat")
    b = reward_ids(tok, "Reverse the words: owl", "owl")
    assert a[-1] in tok.eos_ids and b[-1] in tok.eos_ids  # scored at the end-of-turn token
    batch = {"chosen_ids": torch.tensor([a]), "chosen_mask": torch.ones(1, len(a), dtype=torch.long),
             "rejected_ids": F.pad(torch.tensor([b]), (0, len(a) - len(b)), value=7),
             "rejected_mask": F.pad(torch.ones(1, len(b), dtype=torch.long), (0, len(a) - len(b)))}
    loss, metrics, n = reward_objective(0.0)(rm, batch)
    ra, rb = rm(torch.tensor([a])), rm(torch.tensor([b]))  # each alone, unpadded
    assert n == 1 and loss.item() == pytest.approx(-F.logsigmoid(ra - rb).item(), rel=1e-5)
    assert metrics["margin"] == pytest.approx((ra - rb).item(), abs=1e-5)


@pytest.fixture(scope="module")
def trained(pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm") / "full"
    rc = main(["finetune", str(pairs / "model"), "--data", str(pairs / "train.jsonl"), "--objective", "reward",
               "--method", "full", "--lr", "3e-3", "--max-steps", "80", "--batch-size", "16", "--warmup-steps", "5",
               "--save-every", "0", "--log-every", "10", "--val-fraction", "0.1", "--out", str(out), *COMMON])
    assert rc == 0
    return out


def test_reward_model_ranks_heldout_pairs_above_chance(pairs, trained, capsys):
    rc = main(["eval", str(trained / "final"), "--preferences", str(pairs / "heldout.jsonl"), "--json"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert result["by"] == "reward" and result["total"] == 60
    assert result["accuracy"] >= 0.75, result  # chance is 0.5; an untrained head is near it
    model, tok = lmsmith.load(pairs / "model")
    untrained = RewardModel.from_causal_lm(model).eval()
    from lmsmith.data.instruct import read_examples
    from lmsmith.eval.preferences import preference_accuracy

    held = read_examples(pairs / "heldout.jsonl")[0]
    assert preference_accuracy(untrained, tok, held)["accuracy"] < result["accuracy"]


def test_saved_reward_model_scores_identically_in_transformers(pairs, trained):
    transformers = pytest.importorskip("transformers")
    d = trained / "final"
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForSequenceClassification"] and cfg["num_labels"] == 1
    assert "chat_template" in (d / "tokenizer_config.json").read_text()
    rm, tok = lmsmith.load(d)
    assert isinstance(rm, RewardModel)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(d), torch_dtype=torch.float32).eval()
    prompts = ["Reverse the words: cat dog sun", "Reverse the words: owl moon", "Reverse the words: a"]
    responses = ["sun dog cat", "owl moon", "a b c d e f"]
    ours = score_batch(rm, tok, prompts, responses)
    seqs = [reward_ids(tok, p, r) for p, r in zip(prompts, responses)]
    width = max(map(len, seqs))
    pad = cfg["pad_token_id"]
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask).logits[:, 0]
    assert torch.allclose(torch.tensor(ours), theirs, atol=1e-5), (ours, theirs)
    # The public API: a string prompt and the same prompt as chat messages score the same.
    one = lmsmith.score(rm, tok, prompts[0], responses[0])
    assert one == pytest.approx(ours[0], abs=1e-5)
    assert lmsmith.score(rm, tok, [{"role": "user", "content": prompts[0]}], responses[0]) == one


def test_lora_reward_model_is_saved_merged_and_reports_accuracy(pairs, tmp_path, capsys):
    out = tmp_path / "lora"
    rc = main(["finetune", str(pairs / "model"), "--data", str(pairs / "train.jsonl"), "--objective", "reward",
               "--method", "lora", "--lora-r", "4", "--lr", "1e-2", "--max-steps", "6", "--batch-size", "8",
               "--warmup-steps", "0", "--save-every", "3", "--log-every", "1", "--out", str(out), *COMMON])
    assert rc == 0
    text = capsys.readouterr().out
    assert re.search(r"Reward model: preference accuracy [\d.]+% on \d+ validation pairs", text), text
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"accuracy", "margin", "chosen", "rejected"} <= set(rows[0])
    rm, _ = lmsmith.load(out / "final")
    base, _ = lmsmith.load(pairs / "model")
    assert isinstance(rm, RewardModel) and not any("lora" in n for n, _ in rm.named_parameters())
    # The head trained with the adapters; the merged weights differ from the base's.
    assert not torch.equal(rm.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)


def test_language_model_preference_accuracy_by_logprob(pairs, capsys):
    rc = main(["eval", str(pairs / "model"), "--preferences", str(pairs / "heldout.jsonl")])
    assert rc == 0
    assert re.search(r"preference accuracy [\d.]+% \(\d+/60\) by response log-probability", capsys.readouterr().out)


@pytest.mark.parametrize("extra,expect", [
    (("--method", "prompt"), "--objective reward trains with --method full or lora"),
    (("--eval-tasks", "X"), "--eval-tasks / --ref-data measure generation"),
    (("--data", "SFT"), "--objective reward needs preference data"),
])
def test_reward_bad_input_is_one_line(pairs, tmp_path, capsys, extra, expect):
    sft = tmp_path / "sft.jsonl"
    sft.write_text('{"instruction": "a", "solution": "b"}\n')
    extra = [str(sft) if e == "SFT" else e for e in extra]
    data = [] if "--data" in extra else ["--data", str(pairs / "train.jsonl")]
    rc = main(["finetune", str(pairs / "model"), *data, "--objective", "reward", *extra,
               "--out", str(tmp_path / "o"), *COMMON])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and expect in err and len(err.splitlines()) == 1, err


def test_reward_model_does_not_generate(trained, capsys):
    rc = main(["generate", str(trained / "final"), "--prompt", "hi"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "is a reward model" in err and len(err.splitlines()) == 1, err
