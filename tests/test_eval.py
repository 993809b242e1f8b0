"""Perplexity / bits per byte: windows cover every token once, values match a direct computation."""

import math

import pytest
import torch
import torch.nn.functional as F

from lmsmith import ModelConfig, build_model
from lmsmith.eval import perplexity, sliding_windows


class ByteTokenizer:
    """ids = UTF-8 bytes + 2; 0 is eos, 1 is bos: enough for perplexity()."""

    eos_id, bos_id, add_bos = 0, 1, False

    def encode(self, text):
        return [b + 2 for b in text.encode("utf-8")]


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(vocab_size=258, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=64)
    return build_model(cfg, seed=0).eval()


@pytest.mark.parametrize("n,seq_len,stride", [(2, 8, 4), (10, 8, 4), (50, 8, 3), (50, 8, 8), (9, 8, 8), (100, 16, 1)])
def test_windows_score_every_target_once_with_enough_context(n, seq_len, stride):
    scored = []
    for begin, end, first in sliding_windows(n, seq_len, stride):
        assert end - begin <= seq_len
        for j in range(max(first, begin + 1), end + 1):
            scored.append(j)
            if j > seq_len:  # past the first window, each target sees >= seq_len - stride tokens
                assert j - begin >= seq_len - stride
    assert scored == list(range(1, n))


def direct_nll(model, ids):
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(x[:, :-1])
    return F.cross_entropy(logits[0], x[0, 1:], reduction="sum").item()


def test_perplexity_equals_direct_computation_short_texts(model):
    tok = ByteTokenizer()
    texts = ["hello world", "the cat sat on the mat", "é ü 猫"]
    res = perplexity(model, tok, texts, batch_size=2)
    nll = sum(direct_nll(model, [tok.eos_id] + tok.encode(t)) for t in texts)
    n = sum(len(tok.encode(t)) for t in texts)
    assert res.tokens == n
    assert res.loss == pytest.approx(nll / n, rel=1e-5)
    assert res.perplexity == pytest.approx(math.exp(nll / n), rel=1e-5)
    nbytes = sum(len(t.encode()) for t in texts)
    assert res.bits_per_byte == pytest.approx(nll / math.log(2) / nbytes, rel=1e-5)


def test_long_text_with_disjoint_windows_equals_chunked_direct(model):
    tok = ByteTokenizer()
    text = "abcdefghij" * 13  # 130 bytes, longer than the 64-token context
    ids = [tok.eos_id] + tok.encode(text)
    res = perplexity(model, tok, [text], seq_len=32, stride=32)
    nll = 0.0
    for b in range(0, len(ids) - 1, 32):
        nll += direct_nll(model, ids[b : b + 33])
    assert res.tokens == len(ids) - 1
    assert res.loss == pytest.approx(nll / (len(ids) - 1), rel=1e-5)


def test_overlapping_windows_give_more_context(model):
    tok = ByteTokenizer()
    text = "the quick brown fox jumps over the lazy dog " * 6
    a = perplexity(model, tok, [text], seq_len=32, stride=32)
    b = perplexity(model, tok, [text], seq_len=32, stride=8)
    assert a.tokens == b.tokens
    assert a.loss != b.loss  # a random model still depends on context


def test_bad_stride_and_empty(model):
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, tok, ["abc"], seq_len=16, stride=17)
    with pytest.raises(ValueError, match="empty"):
        perplexity(model, tok, [], seq_len=16)
