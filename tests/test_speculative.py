"""Speculative decoding in the slot engine: greedy output identical to the target alone (draft models that
agree, disagree, prompt lookup, several gammas, batched slots), the sampled distribution equal to the
target's (a chi-square test over many seeds on a small vocabulary), caches rolled back to exactly a
fresh prefill of the accepted text, and the CLI."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from lmsmith.config import ModelConfig
from lmsmith.decoding import GenerationConfig, sampling
from lmsmith.decoding.engine import Engine, Request, generate_ids
from lmsmith.model import build_model


def _model(vocab=64, dim=64, layers=2, seed=0, std=0.3, context=128):
    cfg = ModelConfig(vocab_size=vocab, dim=dim, n_layers=layers, n_heads=4, n_kv_heads=2, hidden_dim=2 * dim,
                      max_seq_len=context)
    m = build_model(cfg, seed=seed).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # large weights: varied, confident outputs (a default init repeats one token)
        for p in m.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return m


@pytest.fixture(scope="module")
def target():
    return _model()


PROMPTS = [[1, 2, 3, 4, 5, 6, 1, 2, 3], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 9, 10]]


@pytest.mark.parametrize("gamma", [None, 1, 3, 7])
def test_greedy_output_is_the_targets_for_every_kind_of_draft(target, gamma):
    """The target itself (every draft accepted), an unrelated model (almost none), prompt lookup (some);
    and with penalties, which the target and the draft apply to their own scores."""
    other = _model(dim=32, layers=1, seed=5)
    for config in (GenerationConfig(max_new_tokens=30),
                   GenerationConfig(max_new_tokens=30, repetition_penalty=1.3, no_repeat_ngram_size=3)):
        want = [c.ids for c in generate_ids(target, PROMPTS, config)]
        for draft in (target, other, "prompt-lookup"):
            stats = {}
            got = [c.ids for c in generate_ids(target, PROMPTS, config, draft=draft, draft_tokens=gamma, stats=stats)]
            assert got == want, (draft if isinstance(draft, str) else "model", gamma)
            assert stats["draft_tokens"] > 0
            if draft is target:  # it agrees with itself: every draft accepted, several tokens per forward
                assert stats["draft_accepted"] == stats["draft_tokens"]
                if gamma != 1:
                    assert stats["generated_tokens"] >= 2.5 * stats["decode_steps"]


def test_each_slot_accepts_its_own_number_and_greedy_requests_match_their_solo_runs(target):
    """A greedy, a sampling and a stop-string request decode together with a draft; the greedy one
    equals its solo run without a draft, and requests that finish early free their slots."""
    draft = _model(dim=32, layers=1, seed=5)
    solo = generate_ids(target, [PROMPTS[2]], GenerationConfig(max_new_tokens=25))[0].ids
    engine = Engine(target, max_batch=3, draft=draft, decode=lambda ids: " ".join(map(str, ids)))
    rg = engine.submit(Request(PROMPTS[2], GenerationConfig(max_new_tokens=25)))
    engine.submit(Request(PROMPTS[0], GenerationConfig(strategy="sample", temperature=0.9, seed=3,
                                                       max_new_tokens=40)))
    engine.submit(Request(PROMPTS[1], GenerationConfig(max_new_tokens=40, stop=[" 47"])))
    out, reasons = {}, {}
    while engine.busy:
        for ev in engine.step():
            if ev.token is not None:
                out.setdefault(ev.row, []).append(ev.token)
            if ev.finish_reason:
                reasons[ev.row] = ev.finish_reason
    assert out[rg] == solo
    assert len(reasons) == 3 and engine.stats["draft_tokens"] > 0


def test_rollback_leaves_both_caches_equal_to_a_fresh_prefill(target):
    draft = _model(dim=32, layers=1, seed=5)
    engine = Engine(target, max_batch=2, draft=draft)
    engine.submit(Request(PROMPTS[0], GenerationConfig(max_new_tokens=60)))
    engine.submit(Request(PROMPTS[1], GenerationConfig(strategy="sample", seed=1, max_new_tokens=60)))
    for _ in range(6):
        engine.step()
    assert engine.stats["draft_tokens"] > engine.stats["draft_accepted"] > 0  # rejections happened
    for s in engine.active:
        for model, cache, n in ((target, engine.cache, s.cached), (draft, engine.drafter.cache, s.draft_cached)):
            assert cache.tokens(s.row) == n
            fresh = model.make_cache(1, 128)
            with torch.no_grad():
                model(torch.tensor([s.tokens[:n]]), cache=fresh)
            torch.testing.assert_close(cache.k[:, s.row, :, :n], fresh.k[:, 0, :, :n], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(cache.v[:, s.row, :, :n], fresh.v[:, 0, :, :n], rtol=1e-4, atol=1e-5)


def _chi2_threshold(df: int, z: float = 3.29) -> float:
    """The chi-square quantile at p = 1 - 5e-4 (Wilson-Hilferty)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("config", [GenerationConfig(strategy="sample", temperature=1.0, max_new_tokens=3),
                                    GenerationConfig(strategy="top_k", top_k=3, temperature=0.7, max_new_tokens=3)],
                         ids=["plain", "top-k+temperature"])
@pytest.mark.parametrize("kind", ["model", "prompt-lookup"])
def test_sampled_sequences_follow_the_targets_distribution(config, kind):
    """The three sampled tokens of 4,000 seeded requests against the target's exact joint distribution
    p(t1) p(t2 | t1) p(t3 | t1, t2) under the same processors (t1 comes from the prefill; t2 is a draft
    accepted, with t3 the bonus token, or a draft rejected and t2 drawn from the residual). A draft model
    that disagrees with the target, or prompt lookup (a one-hot proposal), must not move it."""
    V = 6
    target = _model(vocab=V, dim=32, layers=1, seed=0, std=0.5, context=16)
    draft = _model(vocab=V, dim=32, layers=1, seed=3, std=0.8, context=16) if kind == "model" else "prompt-lookup"
    prompt = [1, 2, 1, 2, 3, 1, 2]

    def probs(ids):
        with torch.no_grad():
            logits = target(torch.tensor([ids]))[:, -1].float()
        return sampling.warp(logits, config).softmax(-1)[0]

    p1 = probs(prompt)
    p2 = {a: probs(prompt + [a]) for a in range(V)}
    exact = {(a, b, c): float(p1[a] * p2[a][b]) * float(probs(prompt + [a, b])[c]) if p1[a] * p2[a][b] > 0 else 0.0
             for a, b, c in itertools.product(range(V), repeat=3)}
    n = 4000
    stats = {}
    comps = generate_ids(target, [prompt], config.replace(num_return_sequences=n, seed=0, eos_ids=None),
                         draft=draft, draft_tokens=2, stats=stats)
    assert stats["draft_tokens"] > stats["draft_accepted"]  # rejections (and, below, acceptances) happened
    # (prompt lookup's copied token is rarely in this target's top 3)
    assert stats["draft_accepted"] > 0 or (kind, config.strategy) == ("prompt-lookup", "top_k")
    seqs = [tuple(c.ids) for c in comps]
    assert set(seqs) <= {k for k, v in exact.items() if v > 0}  # never a token the filters removed
    pairs = {}
    for (a, b, _), v in exact.items():
        pairs[(a, b)] = pairs.get((a, b), 0.0) + v
    for observed, expected in (([t[:2] for t in seqs], pairs), (seqs, exact)):  # pairs: more power per cell
        chi2, df = _chi2(observed, expected)
        assert chi2 < _chi2_threshold(df), (chi2, df)


def _chi2(observed: list[tuple], expected: dict[tuple, float]) -> tuple[float, int]:
    """Pearson's statistic over the cells expecting >= 5 counts (the others pooled) and its degrees of freedom."""
    n = len(observed)
    counts = {}
    for k in observed:
        counts[k] = counts.get(k, 0) + 1
    cells = [k for k, v in expected.items() if v * n >= 5]
    rest = 1 - sum(expected[k] for k in cells)
    chi2 = sum((counts.get(k, 0) - n * expected[k]) ** 2 / (n * expected[k]) for k in cells)
    if rest * n >= 5:
        chi2 += (n - sum(counts.get(k, 0) for k in cells) - n * rest) ** 2 / (n * rest)
        return chi2, len(cells)
    return chi2, len(cells) - 1


def test_a_draft_with_another_vocabulary_is_refused(target):
    from lmsmith.errors import LmsmithError

    with pytest.raises(LmsmithError, match="vocabulary"):
        Engine(target, draft=_model(vocab=32))
    with pytest.raises(LmsmithError, match="beam"):
        generate_ids(target, PROMPTS[:1], GenerationConfig(strategy="beam"), draft="prompt-lookup")


# ---- CLI ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """A tiny target with a real tokenizer and an unrelated draft that shares it."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_serve import make_model_dir

    from lmsmith import checkpoint
    from lmsmith.loader import load

    root = tmp_path_factory.mktemp("spec")
    target_dir = make_model_dir(root / "target")
    model, tok = load(target_dir)
    cfg = model.config
    small = build_model(ModelConfig(vocab_size=cfg.vocab_size, dim=32, n_layers=1, n_heads=2, n_kv_heads=1,
                                    hidden_dim=64, max_seq_len=cfg.max_seq_len, tie_embeddings=True), seed=1)
    checkpoint.save(small, tok, root / "draft")
    return target_dir, root / "draft"


def test_generate_cli_with_a_draft_prints_the_same_text_and_the_acceptance(model_dirs, tmp_path, capsys):
    from lmsmith.cli import main

    target_dir, draft_dir = model_dirs
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The cat sat on the\ndef main():\n")
    # fp32: in half precision a multi-token verify forward rounds differently from one-token steps
    base = ["generate", str(target_dir), "--prompts-file", str(prompts), "--max-new-tokens", "20", "--dtype", "fp32"]
    assert main(base) == 0
    want = capsys.readouterr().out
    for draft in (str(draft_dir), "prompt-lookup"):
        out = tmp_path / "gen.jsonl"
        assert main([*base, "--draft", draft, "--out", str(out)]) == 0
        got = capsys.readouterr()
        assert got.out == want
        assert "accepted" in got.err and "tokens per target forward" in got.err
        rows = [__import__("json").loads(x) for x in out.read_text().splitlines()]
        assert [r["prompt"] for r in rows] == ["The cat sat on the", "def main():"]
    assert main(["generate", str(target_dir), "--prompt", "x", "--draft", str(tmp_path / "nope")]) == 1
    assert "no such model" in capsys.readouterr().err


def test_chat_with_a_draft_replies_as_without(model_dirs, capsys, monkeypatch):
    import io

    from lmsmith.cli import main

    target_dir, draft_dir = model_dirs
    replies = []
    for extra in ([], ["--draft", str(draft_dir)], ["--draft", "prompt-lookup", "--draft-tokens", "3"]):
        monkeypatch.setattr("sys.stdin", io.StringIO("hello\nand then?\n/exit\n"))
        assert main(["chat", str(target_dir), "--max-new-tokens", "12", "--dtype", "fp32", *extra]) == 0
        out = capsys.readouterr()
        replies.append(out.out)
        assert ("accepted" in out.err) == bool(extra)
    assert replies[0] == replies[1] == replies[2]


def test_serve_with_a_draft_answers_as_without(model_dirs):
    pytest.importorskip("openai")
    from test_serve import Server

    from lmsmith.decoding import generate
    from lmsmith.decoding.layout import use_decode_layout
    from lmsmith.loader import load

    target_dir, draft_dir = model_dirs
    model, tok = load(target_dir)
    model = use_decode_layout(model)
    s = Server(target_dir, "--draft", str(draft_dir), "--max-batch", "4")
    try:
        c = s.client()
        for prompt in ("The cat sat on the", "def"):
            r = c.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
            assert r.choices[0].text == generate(model, tok, prompt, max_new_tokens=12)
        from test_serve import KEY, _http

        status, _, body = _http("GET", f"{s.url}/metrics", key=KEY)
        counters = dict(line.split() for line in body.decode().splitlines() if line.startswith("lmsmith_draft"))
        assert status == 200 and int(counters["lmsmith_draft_tokens_total"]) > 0
    finally:
        code, err = s.stop()
    assert "Traceback" not in err


def test_prompt_lookup_copies_what_followed_the_last_ngram():
    from lmsmith.decoding.speculative import PromptLookup

    look = PromptLookup(max_ngram=3)
    assert look.propose([5, 6, 7, 8, 9, 1, 5, 6, 7], 3) == [8, 9, 1]  # the 3-gram 5 6 7 seen before
    assert look.propose([4, 4, 4, 4, 4], 3) == [4, 4]  # a run: the occurrence with the most after it
    assert look.propose([1, 2, 3], 4) == []  # nothing repeats
    assert look.propose([1, 2, 9, 2, 7, 2], 2) == [7, 2]  # the latest occurrence that has k tokens after


def test_the_adaptive_schedule_grows_shrinks_and_pauses_a_failing_draft(target):
    from lmsmith.decoding.speculative import MAX_GAMMA, PAUSE_STEPS, next_gamma

    assert next_gamma(4, 4, 4) == 6 and next_gamma(MAX_GAMMA, MAX_GAMMA, MAX_GAMMA) == MAX_GAMMA
    assert next_gamma(4, 4, 2) == 3 and next_gamma(2, 2, 0) == 1 and next_gamma(1, 1, 0) == -PAUSE_STEPS
    assert next_gamma(3, 0, 0) == 3  # nothing proposed: unchanged
    # An unrelated draft is nearly always rejected: it ends up drafting on few steps, and the text is unchanged.
    config = GenerationConfig(max_new_tokens=60)
    want = generate_ids(target, PROMPTS[:1], config)[0].ids
    stats = {}
    got = generate_ids(target, PROMPTS[:1], config, draft=_model(dim=32, layers=1, seed=5), stats=stats)[0].ids
    assert got == want
    assert stats["draft_tokens"] < 0.5 * stats["decode_steps"], stats
