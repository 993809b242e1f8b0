"""The slot engine: per-row cache lengths, continuous batching, prompt caching, chunked prefill,
per-request settings and seeds, cancellation, JSON mode."""

from __future__ import annotations

import json

import pytest
import torch

from lmsmith.config import ModelConfig
from lmsmith.decoding import GenerationConfig, generate_ids
from lmsmith.decoding.engine import Engine, Request
from lmsmith.kvcache import KVCache
from lmsmith.model import build_model

V = 128


def _model(window=None, scale=3.0):
    cfg = ModelConfig(vocab_size=V, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, max_seq_len=96,
                      **({"arch": "mistral", "sliding_window": window} if window else {}))
    m = build_model(cfg, seed=0)
    with torch.no_grad():
        m.model.embed_tokens.weight.mul_(scale)  # a peaked, but not one-hot, next-token distribution
    return m.eval()


@pytest.fixture(scope="module")
def model():
    return _model()


def _prompt(n, seed):
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _run(engine: Engine, reqs: list[Request], arrive: list[int] | None = None) -> dict[int, list]:
    """Run requests, submitting request i at step arrive[i]; return rid -> its events."""
    arrive = arrive or [0] * len(reqs)
    out: dict[int, list] = {}
    step, todo = 0, list(range(len(reqs)))
    while todo or engine.busy:
        for i in [i for i in todo if arrive[i] <= step]:
            out[engine.submit(reqs[i])] = []
            todo.remove(i)
        for ev in engine.step():
            out[ev.row].append(ev)
        step += 1
    return out


def _tokens(events) -> list[int]:
    return [e.token for e in events if e.token is not None]


# ---- the cache ---------------------------------------------------------------------------------

@pytest.mark.parametrize("window", [None, 5])
@torch.no_grad()
def test_ragged_rows_decode_as_their_full_forward(window):
    """Rows of different lengths in one cache: each new token's logits equal that row's full forward."""
    m = _model(window)
    lengths = [9, 3, 6]
    rows = [_prompt(n, i) for i, n in enumerate(lengths)]
    cache = KVCache(m.config, 3, 32)
    for b, p in enumerate(rows):  # prefill each row alone, as the engine does
        m(torch.tensor([p]), cache=cache.rows(b, b + 1))
    assert cache.lengths.tolist() == lengths
    nxt = [[_prompt(1, 10 + b)[0] for b in range(3)] for _ in range(4)]
    for step in range(4):
        out = m(torch.tensor(nxt[step])[:, None], cache=cache)[:, -1]
        for b in range(3):
            full = m(torch.tensor([rows[b] + [nxt[s][b] for s in range(step + 1)]]))[0, -1]
            torch.testing.assert_close(out[b], full, atol=1e-5, rtol=0)


@torch.no_grad()
def test_truncated_row_reuses_its_prefix_exactly(model):
    """Keeping a row's first k tokens and feeding the rest gives the logits of recomputing it all."""
    p = _prompt(20, 1)
    cache = KVCache(model.config, 2, 48)
    model(torch.tensor([p]), cache=cache.rows(0, 1))
    q = p[:12] + _prompt(6, 2)
    cache.truncate(0, 12)
    reused = model(torch.tensor([q[12:]]), cache=cache.rows(0, 1))[0]
    torch.testing.assert_close(reused, model(torch.tensor([q]))[0, 12:], atol=1e-5, rtol=0)


@torch.no_grad()
def test_chunked_prefill_equals_one_shot(model):
    p = _prompt(23, 3)
    one = KVCache(model.config, 1, 32)
    want = model(torch.tensor([p]), cache=one)[0, -1]
    chunked = KVCache(model.config, 1, 32)
    for s in range(0, 23, 5):
        got = model(torch.tensor([p[s:s + 5]]), cache=chunked)[0, -1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(chunked.k[:, :, :, :23], one.k[:, :, :, :23], atol=1e-5, rtol=0)


@pytest.mark.parametrize("window", [None, 4])
@torch.no_grad()
def test_packed_step_equals_separate_forwards(window):
    """Decode rows and prompt chunks packed into one sequence give each row's own logits and cache."""
    from lmsmith.kvcache import PackedStep

    m = _model(window)
    a, b, c = _prompt(7, 1), _prompt(3, 2), _prompt(9, 3)
    packed, plain = KVCache(m.config, 3, 32), KVCache(m.config, 3, 32)
    for cache in (packed, plain):
        m(torch.tensor([a]), cache=cache.rows(0, 1))
        m(torch.tensor([c[:4]]), cache=cache.rows(2, 3))
    nxt = _prompt(1, 4)
    step = PackedStep(packed, [(0, 1), (1, 3), (2, 5)])  # a decodes, b prefills, c's second chunk
    out = m(torch.tensor([nxt + b + c[4:]]), cache=step, last_only=True)[0]
    want = [m(torch.tensor([nxt]), cache=plain.rows(0, 1))[0, -1], m(torch.tensor([b]), cache=plain.rows(1, 2))[0, -1],
            m(torch.tensor([c[4:]]), cache=plain.rows(2, 3))[0, -1]]
    torch.testing.assert_close(out, torch.stack(want), atol=1e-5, rtol=0)
    assert packed.lengths.tolist() == plain.lengths.tolist() == [8, 3, 9]
    torch.testing.assert_close(packed.k[:, :, :, :9], plain.k[:, :, :, :9], atol=1e-5, rtol=0)


def test_swap_rows_moves_keys_and_lengths(model):
    cache = KVCache(model.config, 3, 16)
    with torch.no_grad():
        model(torch.tensor([_prompt(5, 0)]), cache=cache.rows(0, 1))
        model(torch.tensor([_prompt(2, 1)]), cache=cache.rows(2, 3))
    k0, k2 = cache.k[:, 0, :, :5].clone(), cache.k[:, 2, :, :2].clone()
    cache.swap_rows(0, 2)
    assert cache.lengths.tolist() == [2, 0, 5]
    assert torch.equal(cache.k[:, 2, :, :5], k0) and torch.equal(cache.k[:, 0, :, :2], k2)


# ---- the engine --------------------------------------------------------------------------------

def _greedy(n=12):
    return GenerationConfig(max_new_tokens=n)


def _solo(model, prompt, config, **kw):
    engine = Engine(model, max_batch=1)
    return _tokens(next(iter(_run(engine, [Request(prompt, config, **kw)]).values())))


def test_greedy_is_the_same_alone_or_batched_with_late_arrivals(model):
    """Requests of different lengths arriving at different steps each get their solo greedy tokens."""
    prompts = [_prompt(n, 20 + i) for i, n in enumerate([4, 17, 9, 30, 2, 11])]
    budgets = [12, 5, 20, 8, 15, 3]
    reqs = [Request(p, _greedy(b)) for p, b in zip(prompts, budgets)]
    engine = Engine(model, max_batch=3, prefill_chunk=8)
    got = _run(engine, reqs, arrive=[0, 0, 1, 2, 6, 7])
    for rid, (p, b) in enumerate(zip(prompts, budgets)):
        assert _tokens(got[rid]) == _solo(model, p, _greedy(b)), rid
        assert got[rid][-1].finish_reason == "length"
    want = generate_ids(model, prompts[:2], _greedy(10))  # the batch API runs on the same engine
    assert [c.ids for c in want] == [_solo(model, p, _greedy(10)) for p in prompts[:2]]


def test_per_request_settings_and_seeds_in_one_batch(model):
    """Greedy, plain sampling, top-k, top-p and min-p with penalties, decoded together: each row equals
    its solo run, and a seeded request is reproducible."""
    configs = [GenerationConfig(max_new_tokens=10),
               GenerationConfig(strategy="sample", temperature=1.5, seed=1, max_new_tokens=10),
               GenerationConfig(strategy="top_k", top_k=5, seed=2, max_new_tokens=10, repetition_penalty=1.3),
               GenerationConfig(strategy="top_p", top_p=0.8, seed=3, max_new_tokens=10, frequency_penalty=0.5,
                                presence_penalty=0.3),
               GenerationConfig(strategy="min_p", min_p=0.1, temperature=2.0, seed=4, max_new_tokens=10,
                                no_repeat_ngram_size=2)]
    prompts = [_prompt(3 + 2 * i, 40 + i) for i in range(len(configs))]
    engine = Engine(model, max_batch=8)
    got = _run(engine, [Request(p, c) for p, c in zip(prompts, configs)], arrive=[0, 1, 1, 3, 4])
    for rid, (p, c) in enumerate(zip(prompts, configs)):
        assert _tokens(got[rid]) == _solo(model, p, c), rid
    other_seed = _solo(model, prompts[1], configs[1].replace(seed=99))
    assert other_seed != _tokens(got[1])  # the seed matters (a 10-token sample at T=1.5)


def test_prompt_cache_reuses_the_previous_turn(model):
    """A second request that extends the first's prompt + output reuses those keys/values, and gets
    the tokens a fresh engine gives."""
    engine = Engine(model, max_batch=2)
    first = _prompt(15, 7)
    out1 = _tokens(next(iter(_run(engine, [Request(first, _greedy(6))]).values())))
    second = first + out1 + _prompt(5, 8)
    before = engine.stats["cached_prompt_tokens"]
    out2 = _tokens(next(iter(_run(engine, [Request(second, _greedy(6))]).values())))
    # everything but the last generated token (chosen, never fed back) was cached
    assert engine.stats["cached_prompt_tokens"] - before == len(first) + len(out1) - 1
    assert out2 == _solo(model, second, _greedy(6))


def test_logprobs_and_prompt_logprobs_are_the_model_distribution(model):
    p = _prompt(8, 9)
    engine = Engine(model, max_batch=2, prefill_chunk=3)  # prompt logprobs prefill whole, ignoring the chunk
    events = next(iter(_run(engine, [Request(p, _greedy(3), logprobs=3, prompt_logprobs=True)]).values()))
    toks = _tokens(events)
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([p + toks]))[0].float(), dim=-1)
    prompt_ev = next(e for e in events if e.prompt_logprobs is not None)
    assert prompt_ev.prompt_logprobs[0] is None
    for i in range(1, len(p)):
        assert prompt_ev.prompt_logprobs[i] == pytest.approx(float(lp[i - 1, p[i]]), abs=1e-4)
        assert prompt_ev.prompt_top_logprobs[i][0][0] == int(lp[i - 1].argmax())
    for j, e in enumerate(e for e in events if e.token is not None):
        row = lp[len(p) - 1 + j]
        assert e.logprob == pytest.approx(float(row[e.token]), abs=1e-4)
        assert [t for t, _ in e.top_logprobs] == torch.topk(row, 3).indices.tolist()


def test_cancel_frees_the_slot_for_the_next_request(model):
    engine = Engine(model, max_batch=1)
    a = engine.submit(Request(_prompt(5, 1), _greedy(80)))
    b = engine.submit(Request(_prompt(5, 2), _greedy(2)))
    for _ in range(3):
        engine.step()
    assert [s.rid for s in engine.active] == [a] and engine.waiting == 1
    engine.cancel(a)
    events = engine.step()
    assert any(e.row == a and e.finish_reason == "cancelled" for e in events)
    assert [s.rid for s in engine.active] == [b]  # admitted in the same step


def test_finished_slots_take_waiting_requests_at_once(model):
    """Continuous batching: with 2 slots, a third request starts the step after a short one ends."""
    engine = Engine(model, max_batch=2)
    short, long_, third = (engine.submit(Request(_prompt(4, i), _greedy(n))) for i, n in enumerate([2, 30, 5]))
    seen_third = None
    for step in range(40):
        for e in engine.step():
            if e.row == third and e.token is not None and seen_third is None:
                seen_third = step
        if not engine.busy:
            break
    assert seen_third is not None and seen_third <= 3  # not after the 30-token request


def test_long_prompt_prefill_does_not_stall_running_requests(model):
    """While a long prompt prefills in chunks, a running request gets a token every step."""
    engine = Engine(model, max_batch=2, prefill_chunk=8)
    running = engine.submit(Request(_prompt(3, 1), _greedy(20)))
    engine.step()
    engine.submit(Request(_prompt(80, 2), _greedy(3)))
    for _ in range(6):  # 80 prompt tokens at 8 per step: ten steps of prefill
        assert any(e.row == running and e.token is not None for e in engine.step())


def test_stop_strings_eos_and_context_limit(model):
    decode = lambda ids: "".join(chr(97 + t % 26) for t in ids)  # noqa: E731
    p = _prompt(5, 3)
    free = _solo(model, p, _greedy(20))
    text = decode(free)
    stop = text[4:6]
    engine = Engine(model, max_batch=2, decode=decode)
    events = next(iter(_run(engine, [Request(p, GenerationConfig(max_new_tokens=20, stop=[stop]))]).values()))
    assert events[-1].finish_reason == "stop"
    assert "".join(e.text for e in events) == text[:text.index(stop)]
    eos = GenerationConfig(max_new_tokens=20, eos_ids=[free[3]])
    events = next(iter(_run(Engine(model, max_batch=1), [Request(p, eos)]).values()))
    assert _tokens(events) == free[:free.index(free[3])] and events[-1].finish_reason == "eos"
    long = _prompt(90, 4)  # 96-token context: 6 tokens of room
    events = next(iter(_run(Engine(model, max_batch=1), [Request(long, _greedy(50))]).values()))
    assert len(_tokens(events)) == 6 and events[-1].finish_reason == "length"
    with pytest.raises(Exception, match="context"):
        Engine(model, max_batch=1).submit(Request(_prompt(97, 5), _greedy()))


class _Biased(torch.nn.Module):
    """A model whose logits get a fixed bias (to steer a random model's choices in a test)."""

    def __init__(self, base, bias):
        super().__init__()
        self.base, self.config, self.bias = base, base.config, bias

    def make_cache(self, *args, **kwargs):
        return self.base.make_cache(*args, **kwargs)

    def forward(self, ids, **kwargs):
        return self.base(ids, **kwargs) + self.bias


def test_json_mode_output_is_one_json_object():
    """JSON mode on a character-level 'tokenizer', with a model steered away from '}' and spaces so it
    must write members: greedy and sampled outputs parse, and each budget is met exactly by closing in time."""
    chars = list('{}[]",:0123456789 abcdetrufalsn\\')
    bias = torch.zeros(V)
    bias[chars.index("}")], bias[chars.index(" ")] = -4.0, -8.0
    m = _Biased(_model(scale=1.0), bias)
    decode = lambda ids: "".join(chars[t] if t < len(chars) else "\ufffd" for t in ids)  # noqa: E731
    for draft in (None, "prompt-lookup"):  # a speculative engine leaves JSON requests undrafted
        texts = []
        for config in (GenerationConfig(max_new_tokens=40), GenerationConfig(strategy="sample", seed=5,
                                                                               max_new_tokens=30),
                       GenerationConfig(max_new_tokens=9)):
            engine = Engine(m, max_batch=2, decode=decode, draft=draft)
            events = next(iter(_run(engine, [Request(_prompt(4, 1), config, json_object=True)]).values()))
            text = decode(_tokens(events))
            assert isinstance(json.loads(text), dict) and json.loads(text), text  # an object with members
            assert events[-1].finish_reason == "stop" and len(_tokens(events)) <= config.max_new_tokens
            texts.append(text)
        assert len(set(texts)) == 3


def test_a_request_that_fails_fails_alone(model):
    """A request whose own work raises (here its text cannot be decoded) ends with "error"; the request
    batched with it gets its solo tokens, and the engine keeps serving."""
    a, b = _prompt(6, 11), _prompt(9, 12)
    bad = _solo(model, a, _greedy(8))[2]

    def decode(ids):
        if len(ids) >= 3 and ids[2] == bad:
            raise ValueError("cannot decode")
        return "x" * len(ids)

    engine = Engine(model, max_batch=2, decode=decode)
    got = _run(engine, [Request(a, _greedy(8)), Request(b, _greedy(8))])
    assert got[0][-1].finish_reason == "error" and "cannot decode" in got[0][-1].text
    assert _solo(model, b, _greedy(8))[2] != bad  # (so b itself decodes fine)
    assert _tokens(got[1]) == _solo(model, b, _greedy(8))
    assert _tokens(next(iter(_run(engine, [Request(b, _greedy(4))]).values()))) == _solo(model, b, _greedy(4))


def test_a_forward_in_bf16_reads_an_fp32_cache():
    """FSDP2 gathers bf16 weights into a model whose cache was made from its fp32 parameters: attention
    runs in the forward's dtype, for the batched and the packed path, and matches an all-bf16 cache."""
    from lmsmith.kvcache import PackedStep

    m = _model().to(torch.bfloat16)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        same = m(ids, cache=m.make_cache(1, 16))[:, -1].float()
        for cache in (m.make_cache(1, 16, dtype=torch.float32), m.make_cache(1, 16, dtype=torch.float32)):
            got = m(ids, cache=cache)[:, -1].float()
            torch.testing.assert_close(got, same, rtol=0.05, atol=0.05)
        packed = m(torch.tensor([[6]]), cache=PackedStep(cache, [(0, 1)]), last_only=True)
    assert packed.dtype == torch.bfloat16 and torch.isfinite(packed.float()).all()


def test_bf16_autocast_decodes_ragged_rows_of_an_fp32_model():
    """`lmsmith rl` samples from fp32 LoRA weights under bf16 autocast: rows of different lengths decode with
    one indexed write per layer into the fp32 cache, and give the tokens each row gives alone."""
    from lmsmith.decoding import GenerationConfig, generate_ids

    m = _model()
    cfg = GenerationConfig(strategy="greedy", max_new_tokens=6)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8, 9]]
    both = generate_ids(m, prompts, cfg, precision="bf16")
    alone = [generate_ids(m, [p], cfg, precision="bf16")[0] for p in prompts]
    assert [c.ids for c in both] == [c.ids for c in alone] and all(len(c.ids) == 6 for c in both)
