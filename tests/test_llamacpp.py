"""Our GGUF files in the real llama.cpp (through llama-cpp-python): same greedy tokens, same tokenization."""

from __future__ import annotations

import pytest
import torch
from test_gguf import make_model  # noqa: I001  (tests dir is on sys.path)

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")

from lmsmith.quant.gguf import export_gguf  # noqa: E402

PROMPTS = [
    "The object type",
    "def __init__(self",
    "Comparisons\n***********\n\nUnlike C, all",
    "import os\nimport sys\n\n",
]
N_NEW = 12


@pytest.fixture(scope="module")
def trained():
    # trained a little so greedy continuations are not one repeated token
    return make_model(train_steps=250, seed=5)


def lmsmith_greedy(model, ids, n):
    """Greedy tokens and, per step, the top-1/top-2 logit margin."""
    ids = list(ids)
    out, margins = [], []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]))[0, -1]
            top = logits.topk(2).values
            margins.append((top[0] - top[1]).item())
            nxt = int(logits.argmax())
            out.append(nxt)
            ids.append(nxt)
    return out, margins


def llamacpp_greedy(llm, ids, n):
    llm.reset()
    out = []
    for t in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        out.append(int(t))
        if len(out) == n:
            break
    return out


@pytest.mark.parametrize("scheme", ["f16", "q8_0"])
def test_llamacpp_greedy_matches(tmp_path, trained, scheme):
    from lmsmith.loader import load as load_gguf

    model, tok = trained
    path = tmp_path / f"m-{scheme}.gguf"
    export_gguf(model, tok, path, scheme, progress=False)
    # lmsmith's reference is the same file read back (same rounding llama.cpp sees)
    qmodel, _ = load_gguf(path)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=False, verbose=False, seed=0)
    # llama.cpp rounds activations too (f16 for F16 weights, q8 blocks for Q8_0), so a step whose
    # top-2 logits are nearly tied may flip; any disagreement must be at such a step.
    tie = {"f16": 0.05, "q8_0": 0.15}[scheme]
    matched = 0
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        ours, margins = lmsmith_greedy(qmodel, ids, N_NEW)
        assert len(set(ours)) > 2, f"degenerate continuation for {prompt!r}: {ours}"
        theirs = llamacpp_greedy(llm, ids, N_NEW)
        k = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), N_NEW)
        if k < N_NEW:
            assert margins[k] < tie, (prompt, k, margins[k], tok.decode(ours), tok.decode(theirs))
        matched += k
    assert matched >= 0.75 * N_NEW * len(PROMPTS)


def test_llamacpp_tokenizes_like_us(tmp_path, trained):
    model, tok = trained
    path = tmp_path / "t.gguf"
    export_gguf(model, tok, path, "q8_0", progress=False)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, vocab_only=True, verbose=False)
    texts = [*PROMPTS, "x = 12345 + 3.14  # don't", "héllo wörld ✓", "<|im_start|>user\nhi<|im_end|>\n",
             "  spaces\n\n\ttabs"]
    for t in texts:
        assert llm.tokenize(t.encode("utf-8"), add_bos=False, special=True) == tok.encode(t), t
        assert llm.detokenize(tok.encode(t), special=True).decode("utf-8") == t
    assert llm.token_eos() == tok.eos_id and llm.token_bos() == tok.bos_id
