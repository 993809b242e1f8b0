"""The stories grammar: exact next-word distributions, their match with samples, reproducibility, the CLI,
and a tiny model that learns them."""

from __future__ import annotations

import json
import math
import random
from collections import Counter

import pytest
import torch

from lmsmith.data.stories import END, GRAMMAR, generate_stories, split_words, true_next_word

LECTURE = ["The cat sat on the", "The cat sat on the floor", "The cat sat on the floor,",
           "The cat sat on the floor, and"]


def test_distributions_sum_to_one_and_cover_what_is_generated():
    for p in LECTURE + [""]:
        d = true_next_word(p)
        assert math.isclose(sum(d.values()), 1.0, abs_tol=1e-9) and list(d.values()) == sorted(d.values())[::-1]
    assert true_next_word("The cat sat on the")["floor"] == pytest.approx(0.19)
    assert set(true_next_word("The cat sat on the floor,")) == {"and", "but", "so"}
    for story in generate_stories(30, seed=4):  # every word that follows has positive probability
        words = split_words(story)
        for i in range(0, len(words), 3):
            assert true_next_word(" ".join(words[:i])).get(words[i], 0) > 0, (story, i)
        assert true_next_word(story).get(END, 0) > 0
    with pytest.raises(ValueError, match="never writes 'moon'"):
        true_next_word("The cat sat on the moon")


def test_samples_match_the_true_distribution():
    """Chi-square of the word after each lecture prefix, counted wherever a sentence starts with it
    (a story's sentences are drawn independently, so the next word after it is the same there)."""
    stories = [split_words(s) for s in generate_stories(15_000, seed=1)]
    starts = [(w, i) for w in stories for i in range(len(w)) if i == 0 or w[i - 1] == "."]
    for prefix in LECTURE:
        pw = split_words(prefix)
        counts = Counter(w[i + len(pw)] for w, i in starts if w[i:i + len(pw)] == pw)
        n = sum(counts.values())
        assert n > 150, prefix  # every expected count >= 30
        true = true_next_word(prefix)
        assert set(counts) <= set(true)
        chi2 = sum((counts.get(w, 0) - n * p) ** 2 / (n * p) for w, p in true.items())
        df = len(true) - 1
        assert chi2 < df + 5 * math.sqrt(2 * df) + 10, (prefix, chi2, df)


def test_stories_are_reproducible_from_a_seed():
    assert generate_stories(20, seed=3) == generate_stories(20, seed=3)
    assert generate_stories(20, seed=3) != generate_stories(20, seed=4)
    assert all(s[0].isupper() and s.endswith(".") for s in generate_stories(50, seed=0))
    assert all(math.isclose(sum(w for w, _ in rules), 1.0) for rules in GRAMMAR.values())


def test_cli_writes_stories_jsonl(tmp_path):
    from lmsmith.cli import main

    assert main(["data", "synth", "--task", "stories", "--n", "25", "--seed", "2", "--out", str(tmp_path)]) == 0
    lines = (tmp_path / "stories.jsonl").read_text().splitlines()
    assert [json.loads(line)["text"] for line in lines] == generate_stories(25, seed=2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained for 250 steps on 3,000 stories, saved as an HF directory."""
    from lmsmith import checkpoint
    from lmsmith.config import ModelConfig
    from lmsmith.model import build_model
    from lmsmith.tokenizer import Tokenizer

    torch.manual_seed(0)
    text = generate_stories(3000, seed=0)
    tok = Tokenizer.train(text, vocab_size=320, show_progress=False)
    data = torch.tensor([i for s in text for i in tok.encode(s) + [tok.eos_id]])
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128,
                      max_seq_len=64, tie_embeddings=True)
    model = build_model(cfg, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(0)
    for _ in range(250):
        starts = [rng.randrange(0, len(data) - 65) for _ in range(16)]
        batch = torch.stack([data[s:s + 65] for s in starts])
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    path = tmp_path_factory.mktemp("stories") / "model"
    checkpoint.save(model, tok, path)
    return model, tok, path


def test_a_tiny_model_trained_on_stories_learns_what_follows_the_cat_sat_on_the(trained):
    from lmsmith.decoding import next_token_probs
    from lmsmith.eval.truth import compare_with_truth

    model, tok, _ = trained
    table = dict(next_token_probs(model, tok, "The cat sat on the", k=tok.vocab_size))
    assert table.get(" floor", 0) > 10 * table.get(" moon", 0)  # "moon" never follows "sat on the"
    assert table.get(" floor", 0) > 0.05
    rows, kl, mass = compare_with_truth(model, tok, "The cat sat on the")
    assert [w for w, _, _ in rows][:3] == ["floor", "bed", "couch"] and mass > 0.5
    assert rows[0][2] == pytest.approx(table[" floor"], rel=1e-4)  # a one-token word: the table's row
    untrained = compare_with_truth(_random_like(model), tok, "The cat sat on the")[1]
    assert kl < untrained  # training brought the model closer to the grammar


def _random_like(model):
    from lmsmith.model import build_model

    return build_model(model.config, seed=1).eval()


def test_cli_compare_truth(trained, capsys, tmp_path):
    from lmsmith.cli import main

    _, _, path = trained
    png = tmp_path / "bars.png"
    assert main(["probs", str(path), "--prompt", "The cat sat on the floor,", "--top", "3", "--compare-truth",
                 "--steps", "2", "--temperature", "0.5", "--plot", str(png)]) == 0
    assert png.stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "'and'" in out and "50.00%" in out and "KL(true || model) =" in out
    assert main(["probs", str(path), "--prompt", "The moon", "--compare-truth"]) == 0
    assert "never writes 'moon' after 'The'" in capsys.readouterr().out


def test_cli_shows_truth_by_default_for_a_grammar_prompt(trained, capsys):
    """The issue's command has no flag: a prompt the grammar can produce gets the true table and the KL."""
    from lmsmith.cli import main

    _, _, path = trained
    assert main(["probs", str(path), "--prompt", "The cat sat on the", "--top", "5", "--steps", "4"]) == 0
    out = capsys.readouterr().out
    assert out.count("KL(true || model) =") >= 1 and "'floor'" in out and "19.00%" in out
    assert main(["probs", str(path), "--prompt", "The cat sat on the", "--no-compare-truth"]) == 0
    assert "KL(true" not in capsys.readouterr().out
    assert main(["probs", str(path), "--prompt", "def f(x):"]) == 0  # code: no truth, no complaint
    out = capsys.readouterr().out
    assert "KL(true" not in out and "no true distribution" not in out
