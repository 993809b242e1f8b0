"""Generation: strategies, the engine (batching, stopping, streaming), and the CLI verbs."""

from __future__ import annotations

import io
import math

import pytest
import torch

from lmsmith.config import ModelConfig
from lmsmith.decoding import (
    GenerationConfig,
    distribution,
    generate,
    generate_ids,
    generate_stream,
    sampling,
    stream_ids,
)
from lmsmith.errors import LmsmithError
from lmsmith.model import build_model


def _model(max_seq_len=128, seed=0, scale=30.0):
    cfg = ModelConfig(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128,
                      max_seq_len=max_seq_len, tie_embeddings=False)
    m = build_model(cfg, seed=seed)
    with torch.no_grad():
        m.lm_head.weight.mul_(scale)  # peaky: greedy falls into loops, as small models do
    return m.eval()


@pytest.fixture(scope="module")
def model():
    return _model()


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 128, (n,), generator=g).tolist() for n in lengths]


def _decode(ids):  # a toy detokenizer: one letter per token, multi-char for some
    return "".join(chr(97 + t % 26) * (1 + (t % 3 == 0)) for t in ids)


# ------------------------------------------------------------------ distribution()

def test_distribution_temperature_is_softmax_of_scaled_logits():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    for t in (0.5, 1.0, 2.0):
        got = distribution(logits, GenerationConfig(strategy="sample", temperature=t))
        torch.testing.assert_close(got, torch.softmax(logits / t, -1))
    one_hot = distribution(logits, GenerationConfig(strategy="sample", temperature=0))
    assert torch.equal(one_hot.argmax(-1), logits.argmax(-1)) and torch.equal(one_hot.sum(-1), torch.ones(3))


def test_top_k_leaves_exactly_k():
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(1))
    for k in (1, 5, 40):
        p = distribution(logits, GenerationConfig(strategy="top_k", top_k=k))
        assert ((p > 0).sum(-1) == k).all()
        kept = p > 0
        assert torch.equal(kept, logits >= logits.topk(k, -1).values[:, -1:])
        torch.testing.assert_close(p.sum(-1), torch.ones(4))


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(2)) * 2
    base = torch.softmax(logits, -1)
    for top_p in (0.1, 0.5, 0.9, 1.0):
        p = distribution(logits, GenerationConfig(strategy="top_p", top_p=top_p))
        for b in range(4):
            srt = base[b].sort(descending=True).values
            need = int((srt.cumsum(0) < top_p - 1e-6).sum()) + 1  # smallest n with mass >= p
            need = min(need, 100)
            kept = int((p[b] > 0).sum())
            assert kept == need
            assert base[b][p[b] > 0].sum() >= top_p - 1e-5
            torch.testing.assert_close(p[b][p[b] > 0], base[b][p[b] > 0] / base[b][p[b] > 0].sum())


def test_min_p_threshold():
    logits = torch.randn(2, 60, generator=torch.Generator().manual_seed(3)) * 2
    base = torch.softmax(logits, -1)
    p = distribution(logits, GenerationConfig(strategy="min_p", min_p=0.1))
    assert torch.equal(p > 0, base >= 0.1 * base.amax(-1, keepdim=True))


def test_penalties_follow_hf_and_openai_rules():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    seen = torch.tensor([[True, True, False, False]])
    out = sampling.apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.5]]
    counts = torch.tensor([[0, 3, 1, 0]])
    out = sampling.apply_frequency_presence_penalty(logits, counts, 0.5, 1.0)
    assert out.tolist() == [[2.0, -2.0 - 1.5 - 1.0, 1.0 - 0.5 - 1.0, 0.5]]
    assert sorted(sampling.banned_ngram_tokens([1, 2, 3, 1, 2], 3)) == [3]
    bans = sampling.NgramBans([1, 2, 3, 1, 2], 3)
    assert bans.banned() == [3]


def test_sampled_histogram_matches_distribution(model):
    prompt = _prompts((6,), 4)[0]
    config = GenerationConfig(strategy="top_k", top_k=6, temperature=3.0, max_new_tokens=1, seed=0)
    n = 3000
    comps = generate_ids(model, [prompt] * n, config)
    with torch.no_grad():
        logits = model(torch.tensor([prompt]), last_only=True)[0, -1]
    expect = distribution(logits, config)
    counts = torch.bincount(torch.tensor([c.ids[0] for c in comps]), minlength=128).float()
    assert counts[expect == 0].sum() == 0  # nothing outside the top-k
    support = expect > 0
    exp = expect[support] * n
    chi2 = float(((counts[support] - exp) ** 2 / exp).sum())
    df = int(support.sum()) - 1
    assert chi2 < df + 4 * math.sqrt(2 * df) + 6, (chi2, df)  # far beyond the 99.9% quantile for these df


# ------------------------------------------------------------------ the engine

def test_batched_equals_one_by_one(model):
    prompts = _prompts((5, 11, 2, 8), 0)
    cfg = GenerationConfig(max_new_tokens=20, eos_ids=[7])
    batched = generate_ids(model, prompts, cfg)
    for p, b in zip(prompts, batched):
        (single,) = generate_ids(model, [p], cfg)
        assert (single.ids, single.finish_reason) == (b.ids, b.finish_reason)
    beam = GenerationConfig(strategy="beam", num_beams=3, max_new_tokens=10, eos_ids=[7])
    batched = generate_ids(model, prompts, beam)
    for p, b in zip(prompts, batched):
        assert generate_ids(model, [p], beam)[0].ids == b.ids


def test_seed_reproducible(model):
    prompt = _prompts((5,), 1)
    cfg = GenerationConfig(strategy="sample", temperature=1.5, max_new_tokens=24)
    a = generate_ids(model, prompt, cfg.replace(seed=1))[0].ids
    assert generate_ids(model, prompt, cfg.replace(seed=1))[0].ids == a
    assert generate_ids(model, prompt, cfg.replace(seed=2))[0].ids != a


def test_eos_stops_exactly(model):
    prompt = _prompts((6,), 2)
    free = generate_ids(model, prompt, GenerationConfig(max_new_tokens=30))[0].ids
    k = 7
    eos = free[k]
    first = free.index(eos)
    c = generate_ids(model, prompt, GenerationConfig(max_new_tokens=30, eos_ids=[999, eos]))[0]
    assert c.ids == free[:first] and c.finish_reason == "eos"
    c = generate_ids(model, prompt, GenerationConfig(max_new_tokens=5))[0]
    assert len(c.ids) == 5 and c.finish_reason == "length"


def test_stop_strings_cut_exactly(model):
    prompt = _prompts((6,), 2)
    full = generate_ids(model, prompt, GenerationConfig(max_new_tokens=30), decode=_decode)[0]
    assert full.text == _decode(full.ids)
    stop = full.text[10:13]
    cut = full.text.index(stop)
    c = generate_ids(model, prompt, GenerationConfig(max_new_tokens=30, stop=["zzzzz", stop]), decode=_decode)[0]
    assert c.text == full.text[:cut] and c.finish_reason == "stop"
    assert len(_decode(c.ids)) >= cut + len(stop) > len(_decode(c.ids[:-1]))  # stopped at the completing token
    pieces = [e.text for e in stream_ids(model, prompt, GenerationConfig(max_new_tokens=30, stop=[stop]),
                                         decode=_decode)]
    assert "".join(pieces) == full.text[:cut]  # the stop string is never streamed, not even its start


def test_context_limit(model):
    small = _model(max_seq_len=32)
    c = generate_ids(small, [list(range(4, 34))], GenerationConfig(max_new_tokens=10))[0]
    assert len(c.ids) == 2 and c.finish_reason == "length"
    c = generate_ids(small, [list(range(4, 36))], GenerationConfig(max_new_tokens=10))[0]
    assert c.ids == [] and c.finish_reason == "length"
    # rows of a batch hit the limit at their own lengths
    cs = generate_ids(small, [list(range(4, 34)), [5, 6]], GenerationConfig(max_new_tokens=10))
    assert [len(c.ids) for c in cs] == [2, 10]
    with pytest.raises(LmsmithError, match="longer than the model's context of 32"):
        generate_ids(small, [list(range(40))], GenerationConfig())


def test_repetition_controls_reduce_repeats(model):
    from lmsmith.recipes.generate import ngram_stats

    prompt = _prompts((6,), 0)
    base = GenerationConfig(max_new_tokens=60)
    rep = {}
    for name, kw in [("greedy", {}), ("no_repeat", dict(no_repeat_ngram_size=3)),
                     ("rep_pen", dict(repetition_penalty=1.8)), ("freq", dict(frequency_penalty=2.0)),
                     ("presence", dict(presence_penalty=3.0))]:
        ids = generate_ids(model, prompt, base.replace(**kw))[0].ids
        rep[name] = ngram_stats(ids)["rep-3"]
    assert rep["greedy"] > 0.4, rep  # the fixture loops under greedy
    assert rep["no_repeat"] == 0.0
    for name in ("rep_pen", "freq", "presence"):
        assert rep[name] < rep["greedy"] / 2, rep


def test_precision_policy_runs(model):
    prompt = _prompts((6,), 0)
    c = generate_ids(model, prompt, GenerationConfig(max_new_tokens=8), precision="bf16")[0]
    assert len(c.ids) == 8


@pytest.mark.parametrize("kw, match", [
    (dict(strategy="nucleus"), "unknown decoding strategy 'nucleus'; choose one of: greedy, beam"),
    (dict(strategy="top_p", top_p=1.5), "top_p 1.5 must be in"),
    (dict(strategy="top_p", top_p=0.0), "top_p 0.0 must be in"),
    (dict(strategy="beam", num_beams=0), "num_beams 0"),
    (dict(strategy="sample", temperature=-1), "temperature -1 must be >= 0"),
    (dict(strategy="top_k", top_k=0), "top_k 0"),
    (dict(strategy="beam", top_k=5), "only apply to sampling"),
    (dict(strategy="beam", num_beams=2, num_return_sequences=3), "exceeds num_beams"),
])
def test_bad_config(kw, match):
    with pytest.raises(LmsmithError, match=match):
        GenerationConfig(**kw)


# ------------------------------------------------------------------ text API and CLI on a real tokenizer

def _corpus() -> str:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return "\n".join(topics[k] for k in sorted(topics))[:40_000]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    checkpoint = pytest.importorskip("lmsmith.checkpoint")
    from lmsmith.tokenizer import Tokenizer

    tok = Tokenizer.train([_corpus()], vocab_size=400, show_progress=False)
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128,
                      max_seq_len=96, tie_embeddings=True)
    m = build_model(cfg, seed=0)
    with torch.no_grad():
        m.model.embed_tokens.weight.mul_(20)
    path = tmp_path_factory.mktemp("gen") / "tiny"
    checkpoint.save(m, tok, path)
    return path


def test_text_api_streaming_equals_generate(model_dir):
    from lmsmith.loader import load

    m, tok = load(model_dir)
    for cfg in (GenerationConfig(max_new_tokens=20), GenerationConfig(strategy="top_p", seed=3, max_new_tokens=20),
                GenerationConfig(max_new_tokens=20, stop=["e"])):
        text = generate(m, tok, "The cat sat on the", cfg)
        assert isinstance(text, str)
        assert "".join(generate_stream(m, tok, "The cat sat on the", cfg)) == text
    many = generate(m, tok, ["a", "The quick brown", "x"], max_new_tokens=5)
    assert len(many) == 3 and all(isinstance(t, str) for t in many)
    samples = generate(m, tok, "a", strategy="sample", num_return_sequences=3, max_new_tokens=5, seed=0)
    assert len(samples) == 3
    from lmsmith.decoding import next_token_probs

    table = next_token_probs(m, tok, "The cat sat on the", k=5)
    assert len(table) == 5 and all(isinstance(t, str) for t, _ in table)
    assert all(a[1] >= b[1] for a, b in zip(table, table[1:])) and 0 < sum(p for _, p in table) <= 1


def _cli(argv, capsys, stdin=None, monkeypatch=None):
    from lmsmith.cli import main

    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_generate(model_dir, capsys, tmp_path):
    rc, out, err = _cli(["generate", str(model_dir), "--prompt", "The cat", "--max-new-tokens", "8"], capsys)
    assert rc == 0 and out.startswith("The cat") and "tokens/s" in err
    rc, out, _ = _cli(["generate", str(model_dir), "--prompt", "The cat", "--strategy", "top_k", "--seed", "1",
                       "--max-new-tokens", "6", "--num-samples", "2"], capsys)
    assert rc == 0 and "[1.1]" in out and "[1.2]" in out
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "def f"}\n{"prompt": "The"}\n')
    rc, out, _ = _cli(["generate", str(model_dir), "--prompts-file", str(f), "--max-new-tokens", "4"], capsys)
    assert rc == 0 and "[1] def f" in out and "[2] The" in out
    rc, out, _ = _cli(["generate", str(model_dir), "--prompt", "The cat", "--compare", "--max-new-tokens", "12"],
                      capsys)
    assert rc == 0
    for label in ("greedy", "beam 4", "sample T=1", "top_k 40", "top_p 0.9", "min_p 0.05", "distinct-2", "rep-3"):
        assert label in out


def test_cli_probs(model_dir, capsys, tmp_path):
    rc, out, _ = _cli(["probs", str(model_dir), "--prompt", "The cat sat on the", "--top", "5"], capsys)
    assert rc == 0 and out.count("%") >= 10
    png = tmp_path / "p.png"
    rc, out, _ = _cli(["probs", str(model_dir), "--prompt", "The cat", "--steps", "3", "--temperature", "0.5",
                       "--plot", str(png)], capsys)
    assert rc == 0 and "p(T=0.5)" in out and "step 3" in out and png.stat().st_size > 1000


def test_cli_chat(model_dir, capsys, monkeypatch):
    rc, out, _ = _cli(["chat", str(model_dir), "--max-new-tokens", "6", "--system", "Be brief."], capsys,
                      stdin="hello\n/reset\nhi again\n/exit\nnot read\n", monkeypatch=monkeypatch)
    assert rc == 0 and out.count("assistant> ") == 2
    rc, _, _ = _cli(["chat", str(model_dir), "--max-new-tokens", "4"], capsys, stdin="hello\n",
                    monkeypatch=monkeypatch)  # EOF ends cleanly
    assert rc == 0


@pytest.mark.parametrize("argv, match", [
    (["generate", "{m}", "--prompt", "x", "--strategy", "top_p", "--top-p", "1.5"], "top_p 1.5"),
    (["generate", "{m}", "--prompt", "x", "--temperature", "-1"], "temperature"),
    (["generate", "{m}", "--prompt", "x " * 200], "longer than the model's context"),
    (["generate", "{m}", "--prompt", "x", "--compare", "greedy,nucleus"], "unknown strategy 'nucleus'"),
    (["probs", "{m}", "--prompt", "x", "--top", "0"], "--top 0"),
    (["generate", "/nonexistent/model", "--prompt", "x"], "nonexistent"),
])
def test_cli_bad_input_is_one_line(model_dir, capsys, argv, match):
    rc, _, err = _cli([a.replace("{m}", str(model_dir)) for a in argv], capsys)
    assert rc == 1 and match in err and len(err.strip().splitlines()) == 1, err
