"""Prompt tuning: frozen base under the real training loop, init from text, encoder, save/load,
generation through the engine (batched, beam), peft interop, `--adapter` on the CLI."""

from __future__ import annotations

import pytest
import torch

from lmsmith import checkpoint
from lmsmith.adapters import (
    PromptTunedModel,
    PromptTuningConfig,
    apply_prompt_tuning,
    load_adapter,
    load_prompt_tuning,
    save_prompt_tuning,
    trainable_parameters,
)
from lmsmith.config import ModelConfig
from lmsmith.decoding import GenerationConfig, generate_ids
from lmsmith.errors import LmsmithError
from lmsmith.model import build_model
from lmsmith.train import TrainConfig, causal_lm_objective, train

CFG = dict(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, max_seq_len=48,
           tie_embeddings=True)


def _model(seed=0, scale=25.0, **kw):
    m = build_model(ModelConfig(**{**CFG, **kw}), seed=seed)
    with torch.no_grad():
        m.model.embed_tokens.weight.mul_(scale)  # varied, confident greedy output from a random model
    return m.eval()


def _tokenizer():
    from lmsmith.tokenizer import Tokenizer

    text = "the cat sat on the mat. a dog ran in the park. def f(x): return x + 1\n" * 20
    return Tokenizer.train([text], vocab_size=280, show_progress=False)


def _batches(seed=0):
    # A tiny task: every sequence is the same 16 tokens, so a soft prompt can learn it.
    seq = torch.randint(0, CFG["vocab_size"], (17,), generator=torch.Generator().manual_seed(seed))
    while True:
        yield {"input_ids": seq[:-1].repeat(4, 1), "labels": seq[1:].repeat(4, 1)}


LR = 0.05


def _train(model, params, tmp_path, steps=12):
    cfg = TrainConfig(lr=LR, warmup_steps=0, max_steps=steps, save_every=0, log_every=1, dtype="fp32",
                      progress=False, peak_flops=1e12, weight_decay=0.0, schedule="constant")
    return train(model, _batches(), causal_lm_objective, cfg, out_dir=tmp_path / "run", trainable_params=params)


@pytest.mark.parametrize("encoder", [None, 32])
def test_training_moves_only_the_prompt(tmp_path, encoder):
    m = _model(scale=1.0, init_std=0.1)  # weights large enough for a prompt to steer
    base = {k: v.clone() for k, v in m.state_dict().items()}
    w = apply_prompt_tuning(m, PromptTuningConfig(n_virtual_tokens=4, encoder_hidden=encoder))
    params = trainable_parameters(w)
    assert {id(p) for p in params} == {id(p) for p in w.prompt_parameters()}
    assert len(params) == (1 if encoder is None else 5)
    before = [p.detach().clone() for p in params]
    res = _train(w, params, tmp_path)
    losses = list(res.losses.values())
    assert losses[-1] < losses[0] - 0.5, losses
    assert all(not torch.equal(a, b) for a, b in zip(before, params))
    for k, v in m.state_dict().items():
        assert torch.equal(v, base[k]), k  # bit-identical base
    assert m.config.max_seq_len == CFG["max_seq_len"] and w.config.max_seq_len == CFG["max_seq_len"] - 4


def test_init_from_text_copies_embeddings():
    tok = _tokenizer()
    m = _model(vocab_size=tok.vocab_size)
    ids = tok.encode("the cat sat")
    w = apply_prompt_tuning(m, PromptTuningConfig(n_virtual_tokens=len(ids) + 2, init_text="the cat sat"), tok)
    want = m.model.embed_tokens.weight[torch.tensor(ids + ids[:2])]
    assert torch.equal(w.prompt_embeddings.weight, want)
    with pytest.raises(LmsmithError, match="tokenizer"):
        apply_prompt_tuning(_model(), PromptTuningConfig(init_text="x"))
    # With an encoder the virtual tokens still start at the text's embeddings (zero last layer).
    w2 = apply_prompt_tuning(_model(vocab_size=tok.vocab_size),
                             PromptTuningConfig(n_virtual_tokens=3, init_text="the cat sat", encoder_hidden=8), tok)
    assert torch.equal(w2.virtual_embeddings(), w2.prompt_embeddings.weight)


def _perturb(w, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in w.prompt_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.mark.parametrize("encoder", [None, 16])
def test_save_load_round_trip(tmp_path, encoder):
    w = apply_prompt_tuning(_model(), PromptTuningConfig(n_virtual_tokens=5, encoder_hidden=encoder))
    _perturb(w)
    save_prompt_tuning(w, tmp_path / "pt")
    w2 = load_adapter(_model(), tmp_path / "pt")
    assert isinstance(w2, PromptTunedModel) and w2.prompt_config.encoder_hidden == encoder
    ids = torch.randint(0, 128, (2, 9))
    assert torch.equal(w2(ids), w(ids))
    if encoder:
        assert torch.equal(w2.prompt_embeddings.weight, w.prompt_embeddings.weight)  # resumable
    with pytest.raises(LmsmithError, match="width"):
        load_prompt_tuning(_model(dim=32, n_heads=2, n_kv_heads=2), tmp_path / "pt")


def test_generation_through_the_engine():
    w = apply_prompt_tuning(_model(), PromptTuningConfig(n_virtual_tokens=6))
    _perturb(w)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (7, 3, 5)]
    cfg = GenerationConfig(max_new_tokens=8)
    batched = [c.ids for c in generate_ids(w, prompts, cfg)]
    single = [generate_ids(w, [p], cfg)[0].ids for p in prompts]
    assert batched == single and len(set(map(tuple, batched))) > 1
    # The cached greedy path agrees with a full forward without cache.
    p, out = prompts[0], single[0]
    full = w(torch.tensor([p + out]))[0, len(p) - 1:-1].argmax(-1).tolist()
    assert full == out
    beam = GenerationConfig(strategy="beam", num_beams=3, max_new_tokens=6)
    assert [c.ids for c in generate_ids(w, prompts, beam)] == [generate_ids(w, [q], beam)[0].ids for q in prompts]
    # The context left is the base's minus the virtual tokens.
    with pytest.raises(LmsmithError, match="context of 42"):
        generate_ids(w, [[1] * 43], cfg)


def test_peft_loads_our_prompt(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    m = _model()
    checkpoint.save(m, None, tmp_path / "base")
    w = apply_prompt_tuning(m, PromptTuningConfig(n_virtual_tokens=5, encoder_hidden=8))
    _perturb(w)
    save_prompt_tuning(w, tmp_path / "pt")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager")
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "pt").eval()
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        theirs = pm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    # peft returns logits for the virtual positions too; the real tokens' rows match ours
    # (no padding: both number the virtual tokens 0..n-1 and real token i as n + i).
    assert theirs.shape[1] == 15
    torch.testing.assert_close(theirs[:, 5:], w(ids), atol=1e-5, rtol=1e-5)


def test_cli_adapter_option(tmp_path, capsys):
    from lmsmith.adapters import LoraConfig, apply_lora, save_lora
    from lmsmith.cli import main

    tok = _tokenizer()
    text = "the cat sat on the mat. a dog ran in the park.\n" * 4
    (tmp_path / "eval.txt").write_text(text)
    m = _model(vocab_size=tok.vocab_size)
    checkpoint.save(m, tok, tmp_path / "base")
    w = apply_prompt_tuning(m, PromptTuningConfig(n_virtual_tokens=4, init_text="the dog"), tok)
    save_prompt_tuning(w, tmp_path / "pt")
    m2, _ = checkpoint.load(tmp_path / "base")
    lc = LoraConfig(r=2)
    apply_lora(m2, lc)
    save_lora(m2, lc, tmp_path / "lora")
    base = str(tmp_path / "base")
    for adapter in ("pt", "lora"):
        a = ["--adapter", str(tmp_path / adapter)]
        assert main(["generate", base, "--prompt", "the cat", "--max-new-tokens", "5", *a]) == 0
        assert capsys.readouterr().out.startswith("the cat")
        assert main(["probs", base, "--prompt", "the cat", "--top", "3", *a]) == 0
        assert capsys.readouterr().out.count("%") >= 3
        assert main(["eval", base, "--data", str(tmp_path / "eval.txt"), "--seq-len", "32", "--json", *a]) == 0
        assert "perplexity" in capsys.readouterr().out
    assert main(["merge", base, str(tmp_path / "pt"), "--out", str(tmp_path / "x")]) == 1
    assert "no weight update to merge" in capsys.readouterr().err
