"""`lmsmith finetune` end to end on a tiny model and synthetic tasks: SFT learns, DPO moves the margin,
LoRA resumes exactly, prompt tuning leaves the base untouched and unlocks a skill the base learned in
pretraining, the forgetting check reports, errors are one line."""

import json
import random
import re

import pytest
import torch

from lmsmith.checkpoint import save
from lmsmith.cli import main
from lmsmith.config import ModelConfig
from lmsmith.data import synth
from lmsmith.loader import load
from lmsmith.model import build_model
from lmsmith.tokenizer import Tokenizer

COMMON = ("--dtype", "fp32", "--no-progress", "--seq-len", "64", "--peak-flops", "1e12")


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """3-word reversal: 600 train / 60 held-out questions, preference pairs, and an untrained tiny model
    whose tokenizer was trained on the task text (characters and a few merges)."""
    root = tmp_path_factory.mktemp("task")
    rng = random.Random(0)
    qs = {}
    while len(qs) < 660:
        q, a, wrong = synth._reverse(rng, (3, 3))
        qs[q] = (a, wrong)
    rows = [{"task": "reverse", "instruction": q, "solution": a} for q, (a, _) in qs.items()]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:600]))
    (root / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[600:]))
    prefs = [{"prompt": q, "chosen": a, "rejected": w} for q, (a, w) in list(qs.items())[:32]]
    (root / "pref.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prefs))
    (root / "ref.txt").write_text("Reverse the words: cat dog sun. The owl and the wolf sat under a tree.\n")
    tok = Tokenizer.train([f"{q}\n{a}" for q, (a, _) in qs.items()] * 3, vocab_size=300, show_progress=False)
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=192,
                      max_seq_len=64, tie_embeddings=True)
    save(build_model(cfg, seed=0), tok, root / "model")
    return root


def _rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_sft_raises_heldout_exact_match_accuracy(task, tmp_path, capsys):
    out = tmp_path / "sft"
    rc = main(["finetune", str(task / "model"), "--data", str(task / "train.jsonl"), "--method", "full",
               "--eval-tasks", str(task / "heldout.jsonl"), "--eval-max-new-tokens", "24", "--out", str(out),
               "--lr", "3e-3", "--max-steps", "300", "--batch-size", "32", "--warmup-steps", "10",
               "--save-every", "0", "--log-every", "50", *COMMON])
    assert rc == 0
    text = capsys.readouterr().out
    m = re.search(r"Task accuracy ([\d.]+)% \(\d+/60\) -> ([\d.]+)% \((\d+)/60\)", text)
    assert m, text
    before, after = float(m.group(1)), float(m.group(2))
    assert before == 0.0 and after >= 5.0, text  # from nothing to measurably right on unseen questions
    assert (out / "final" / "model.safetensors").exists()
    assert "lmsmith chat" in text


def test_dpo_with_lora_raises_the_margin_and_reports_forgetting(task, tmp_path, capsys):
    out = tmp_path / "dpo"
    rc = main(["finetune", str(task / "model"), "--data", str(task / "pref.jsonl"), "--objective", "dpo",
               "--method", "lora", "--lora-r", "4", "--lr", "5e-3", "--max-steps", "15", "--batch-size", "32",
               "--warmup-steps", "0", "--log-every", "1", "--save-every", "0", "--beta", "0.5",
               "--ref-data", str(task / "ref.txt"), "--out", str(out), *COMMON])
    assert rc == 0
    text = capsys.readouterr().out
    margins = [r["reward_margin"] for r in _rows(out) if "reward_margin" in r]
    assert abs(margins[0]) < 1e-6  # LoRA's B starts at zero: the policy equals the reference
    assert margins[-1] > 0.1 and sum(margins[-3:]) > sum(margins[:3])
    assert [r["reward_accuracy"] for r in _rows(out) if "reward_accuracy" in r][-1] > 0.5
    assert re.search(r"Reference perplexity [\d.]+ -> [\d.]+ \([+-][\d.]+%\)", text), text
    assert (out / "adapter" / "adapter_config.json").exists() and not (out / "final").exists()


def test_lora_resume_equals_uninterrupted_run(task, tmp_path, monkeypatch):
    def args(out, *extra):
        return ["finetune", str(task / "model"), "--data", str(task / "train.jsonl"), "--method", "lora",
                "--lora-r", "4", "--lr", "1e-2", "--max-steps", "10", "--batch-size", "8", "--warmup-steps", "2",
                "--save-every", "3", "--log-every", "1", "--out", str(out), *COMMON, *extra]

    full = tmp_path / "full"
    assert main(args(full)) == 0
    from lmsmith.data.instruct import InstructBatches

    original, calls = InstructBatches.__next__, {"n": 0}

    def interrupt_at_7(self):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return original(self)

    part = tmp_path / "part"
    monkeypatch.setattr(InstructBatches, "__next__", interrupt_at_7)
    assert main(args(part)) == 130
    # The checkpoints of an adapter run hold the adapter's tensors and train_state/, not the frozen base.
    ckpt = sorted((part / "checkpoints").iterdir())[-1]
    assert sorted(p.name for p in ckpt.iterdir()) == ["train_state", "trainable.safetensors"]
    from safetensors import safe_open

    with safe_open(str(ckpt / "trainable.safetensors"), "pt") as f:
        names = list(f.keys())  # noqa: SIM118 - a safetensors handle is not iterable
    assert names and all(".lora_A." in k or ".lora_B." in k for k in names)
    monkeypatch.setattr(InstructBatches, "__next__", original)
    assert main(["finetune", str(task / "model"), "--out", str(part), "--resume", "--no-progress"]) == 0
    a = {r["step"]: r["loss"] for r in _rows(full) if "loss" in r}
    b = {r["step"]: r["loss"] for r in _rows(part) if "loss" in r}
    assert len(a) == 10 and a == b  # bit-exact, fp32
    from safetensors.torch import load_file

    wa = load_file(str(full / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(part / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture
def seen(monkeypatch):
    """What the last `lmsmith.train.train` call got: "model", and "start", a copy of its trainable
    parameters (by name) before the first step, so a test can tell what training changed."""
    import lmsmith.train as train_mod

    seen, real_train = {}, train_mod.train

    def spy(model, *a, **k):
        seen["model"] = model
        seen["start"] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        return real_train(model, *a, **k)

    monkeypatch.setattr(train_mod, "train", spy)
    return seen


def test_prompt_tuning_leaves_base_weights_bit_identical(task, tmp_path, seen):
    out = tmp_path / "prompt"
    rc = main(["finetune", str(task / "model"), "--data", str(task / "train.jsonl"), "--method", "prompt",
               "--virtual-tokens", "4", "--lr", "3e-2", "--max-steps", "6", "--batch-size", "8",
               "--warmup-steps", "0", "--save-every", "0", "--out", str(out), *COMMON])
    assert rc == 0
    base, _ = load(task / "model")
    trained = seen["model"].base.state_dict()
    assert all(torch.equal(t, trained[k]) for k, t in base.state_dict().items())
    assert not torch.equal(seen["model"].prompt_embeddings.weight, seen["start"]["prompt_embeddings.weight"])
    assert (out / "adapter" / "adapter_model.safetensors").stat().st_size < 10_000


def test_cli_prefix_tuning_trains_keys_values_and_template_rows(task, tmp_path, seen, capsys):
    out = tmp_path / "prefix"
    rc = main(["finetune", str(task / "model"), "--data", str(task / "train.jsonl"), "--method", "prefix",
               "--virtual-tokens", "4", "--lr", "3e-2", "--max-steps", "6", "--batch-size", "8",
               "--warmup-steps", "0", "--save-every", "0", "--out", str(out), *COMMON])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "prefix tuning" in printed and "'<|im_end|>'" in printed  # the template's rows are named
    w = seen["model"]
    base, tok = load(task / "model")
    assert all(torch.equal(t, w.base.state_dict()[k]) for k, t in base.state_dict().items())
    start = seen["start"]
    assert not torch.equal(w.prefix_kv, start["prefix_kv"]) and not torch.equal(w.token_embeddings,
                                                                                 start["token_embeddings"])
    assert tok.token_to_id("<|im_end|>") in w.prompt_config.train_tokens
    meta = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert meta["peft_type"] == "PREFIX_TUNING"
    assert main(["eval", str(task / "model"), "--tasks", str(task / "heldout.jsonl"), "--adapter",
                 str(out / "adapter")]) == 0
    # Continuous fine-tuning: a second run starts from the saved prefix and its token rows.
    saved_kv = w.prefix_kv.detach().clone()
    common = ["--data", str(task / "train.jsonl"), "--adapter", str(out / "adapter"), "--max-steps", "2",
              "--batch-size", "8", "--save-every", "0", "--out", str(tmp_path / "again"), *COMMON]
    assert main(["finetune", str(task / "model"), "--method", "prefix", *common]) == 0
    torch.testing.assert_close(seen["start"]["prefix_kv"], saved_kv)
    assert seen["model"].prompt_config.train_tokens == w.prompt_config.train_tokens
    capsys.readouterr()
    assert main(["finetune", str(task / "model"), "--method", "prompt", *common]) == 1
    assert "is a PREFIX_TUNING adapter; continue it with --method prefix" in capsys.readouterr().err


def test_prompt_tuning_unlocks_a_skill_the_base_learned_in_plain_text(tmp_path, capsys):
    """The demo's story in small: pretraining on English text plus worked examples ("question\nanswer",
    as the built-in corpus holds them) gives the skill; a soft prompt and the template's token rows,
    with every base weight frozen, teach the model to use it when asked in the chat format."""
    from pydoc_data.topics import topics

    (tmp_path / "docs.txt").write_text("\n\n".join(t for _, t in sorted(topics.items()))[:400_000])
    worked = [r for r in synth.generate_task("lookup", 4000, seed=5) if not synth.reserved(r["instruction"])]
    (tmp_path / "lookup.txt").write_text("".join(f"{r['instruction']}\n{r['solution']}\n\n" for r in worked))
    split = synth.write_synth("lookup", 600, tmp_path / "tasks", seed=0)  # held-out: reserved, never pretrained on
    (tmp_path / "shape.yaml").write_text("model:\n  dim: 96\n  n_layers: 3\n  n_heads: 4\n  n_kv_heads: 2\n"
                                         "  hidden_dim: 256\n")
    base = tmp_path / "base"
    assert main(["pretrain", "--config", str(tmp_path / "shape.yaml"), "--source", f"docs={tmp_path / 'docs.txt'}",
                 "--source", f"tasks={tmp_path / 'lookup.txt'}", "--vocab-size", "1024", "--out", str(base),
                 "--max-steps", "1200", "--batch-size", "16", "--seq-len", "128", "--lr", "5e-3",
                 "--eval-every", "0", "--save-every", "0", "--no-progress"]) == 0
    capsys.readouterr()
    rc = main(["finetune", str(base / "final"), "--data", str(split["train"]), "--method", "prompt",
               "--virtual-tokens", "8", "--lr", "3e-2", "--max-steps", "400", "--batch-size", "16",
               "--warmup-steps", "10", "--eval-tasks", str(split["heldout"]), "--save-every", "0",
               "--out", str(tmp_path / "prompt"), "--dtype", "fp32", "--no-progress", "--seq-len", "96"])
    assert rc == 0
    text = capsys.readouterr().out
    m = re.search(r"Task accuracy ([\d.]+)% \(\d+/60\) -> ([\d.]+)% \((\d+)/60\)", text)
    assert m, text
    before, after = float(m.group(1)), float(m.group(2))
    # About a thousand trained numbers, every base weight frozen; measured: 0% -> 32%, which is what the base
    # itself answers when asked in plain text ("question\n").
    assert after >= before + 15.0, text


def test_overwrite_starts_afresh_but_never_deletes_an_input(task, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--data", str(task / "train.jsonl"), "--max-steps", "2", "--batch-size", "8", "--save-every", "1",
              "--out", str(out), *COMMON]
    assert main(["finetune", str(task / "model"), "--method", "prompt", "--virtual-tokens", "2", *common]) == 0
    assert (out / "adapter").is_dir()
    capsys.readouterr()
    # continuing the adapter into the folder that holds it: --overwrite would delete the input first
    assert main(["finetune", str(task / "model"), "--method", "prompt", "--adapter", str(out / "adapter"),
                 "--overwrite", *common]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--adapter" in err[0] and "inside the run folder" in err[0]
    assert (out / "adapter" / "adapter_config.json").exists() and any((out / "checkpoints").iterdir())
    assert main(["finetune", str(task / "model"), "--resume", "--overwrite", *common]) == 1
    assert "pass one" in capsys.readouterr().err
    # an evaluation file of unreserved synthetic questions: a note with the results, never beside an error
    assert main(["finetune", str(task / "model"), "--method", "prompt", "--eval-tasks", str(task / "train.jsonl"),
                 *common]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a run" in err[0]
    # a fresh full run in its place: the old adapter goes with the old checkpoints
    assert main(["finetune", str(task / "model"), "--method", "full", "--overwrite", *common]) == 0
    assert (out / "final" / "model.safetensors").exists() and not (out / "adapter").exists()


@pytest.mark.parametrize("extra,expect", [
    (("--data", "GOOD", "--method", "prompt", "--train-tokens", "<|nope|>"),
     "--train-tokens: '<|nope|>' is not a token of this tokenizer"),
    (("--data", "nope.jsonl"), "nope.jsonl: no such data file"),
    (("--data", "BAD"), "bad.jsonl:2: not valid JSON"),
    (("--data", "GOOD", "--method", "qlora"), "unknown --method 'qlora'"),
])
def test_cli_bad_input_is_one_line_exit_1(task, tmp_path, capsys, extra, expect):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "solution": "b"}\n{oops\n')
    extra = [str(bad) if e == "BAD" else str(task / "train.jsonl") if e == "GOOD" else e for e in extra]
    rc = main(["finetune", str(task / "model"), *extra, "--out", str(tmp_path / "o"), *COMMON])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and expect in err and len(err.splitlines()) == 1, err


def test_time_budget_counts_the_real_validation_batches(task, tmp_path, monkeypatch):
    """--time fits the step count around the evaluations it will run: the loop must be told how many
    validation batches there are (a placeholder count made a 5-minute budget fit 21 steps)."""
    import lmsmith.train as train_mod

    seen, real_train = {}, train_mod.train

    def spy(model, batches, objective, config, **k):
        seen["config"] = config
        return real_train(model, batches, objective, config, **k)

    monkeypatch.setattr(train_mod, "train", spy)
    rc = main(["finetune", str(task / "model"), "--data", str(task / "train.jsonl"), "--max-steps", "2",
               "--batch-size", "8", "--val-fraction", "0.1", "--save-every", "0", "--out", str(tmp_path / "o"),
               *COMMON])
    assert rc == 0
    assert seen["config"].eval_batches == 8  # 60 validation examples (10% of 600) in batches of 8
