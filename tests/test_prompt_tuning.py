"""Prompt tuning: frozen base under the real training loop, init from text, encoder, save/load,
generation through the engine (batched, beam), peft interop, `--adapter` on the CLI."""

from __future__ import annotations

import pytest
import torch

from lmsmith import checkpoint, loader
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
    m2, _ = loader.load(tmp_path / "base")
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


# ---- trainable token rows (train_tokens) --------------------------------------------------------

TOKENS = (5, 17, 90)


def _token_batches():
    # The target is a token the frozen base can barely emit: only its trained head row can make it likely.
    g = torch.Generator().manual_seed(3)
    seq = torch.randint(20, CFG["vocab_size"], (17,), generator=g)
    seq[8], seq[16] = 17, 17
    while True:
        yield {"input_ids": seq[:-1].repeat(4, 1), "labels": seq[1:].repeat(4, 1)}


@pytest.mark.parametrize("tied", [True, False])
def test_token_rows_train_and_the_base_stays_bit_identical(tmp_path, tied):
    m = _model(scale=1.0, init_std=0.1, tie_embeddings=tied)
    base = {k: v.clone() for k, v in m.state_dict().items()}
    w = apply_prompt_tuning(m, PromptTuningConfig(n_virtual_tokens=4, train_tokens=TOKENS))
    params = trainable_parameters(w)
    assert {id(p) for p in params} == {id(p) for p in w.prompt_parameters()}
    assert len(params) == (2 if tied else 3) and (w.token_head is None) == tied
    rows_before = w.token_embeddings.detach().clone()
    cfg = TrainConfig(lr=LR, warmup_steps=0, max_steps=15, save_every=0, log_every=1, dtype="fp32",
                      progress=False, peak_flops=1e12, weight_decay=0.0, schedule="constant")
    res = train(w, _token_batches(), causal_lm_objective, cfg, out_dir=tmp_path / "run", trainable_params=params)
    losses = list(res.losses.values())
    assert losses[-1] < losses[0] - 0.5, losses
    assert not torch.equal(w.token_embeddings, rows_before)
    for k, v in m.state_dict().items():
        assert torch.equal(v, base[k]), k  # the base's own rows for those tokens are untouched


def test_token_rows_are_used_for_inputs_and_outputs():
    w = apply_prompt_tuning(_model(tie_embeddings=False), PromptTuningConfig(n_virtual_tokens=3,
                                                                             train_tokens=TOKENS))
    with torch.no_grad():
        w.token_embeddings.normal_()
        w.token_head.normal_()
    ids = torch.tensor([[1, 5, 2, 90, 17]])
    x = w.embed(ids)
    assert torch.equal(x[0, 1], w.token_embeddings[0]) and torch.equal(x[0, 3], w.token_embeddings[2])
    assert torch.equal(x[0, 0], w.model.embed_tokens.weight[1])  # other tokens keep the base rows
    h = w.hidden_states(ids)
    logits = w(ids)
    torch.testing.assert_close(logits[..., list(TOKENS)], h @ w.token_head.t())
    torch.testing.assert_close(logits, h @ w.output_weight().t())  # what the fused SFT loss sees
    other = [i for i in range(CFG["vocab_size"]) if i not in TOKENS]
    torch.testing.assert_close(logits[..., other], (h @ w.lm_head.weight.t())[..., other])


def test_token_rows_save_load_and_peft_ignores_them(tmp_path):
    m = _model()
    checkpoint.save(m, None, tmp_path / "base")
    w = apply_prompt_tuning(m, PromptTuningConfig(n_virtual_tokens=5, train_tokens=TOKENS))
    _perturb(w)
    save_prompt_tuning(w, tmp_path / "pt")
    w2 = load_adapter(_model(), tmp_path / "pt")
    assert w2.prompt_config.train_tokens == TOKENS
    ids = torch.tensor([[3, 5, 8, 17, 2, 90]])
    assert torch.equal(w2(ids), w(ids))
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager")
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "pt").eval()  # loads the soft prompt, skips our rows
    plain = apply_prompt_tuning(_model(), PromptTuningConfig(n_virtual_tokens=5))
    with torch.no_grad():
        plain.prompt_embeddings.weight.copy_(w.prompt_embeddings.weight)
        theirs = pm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        torch.testing.assert_close(theirs[:, 5:], plain(ids), atol=1e-5, rtol=1e-5)


def test_train_tokens_validation_and_template_tokens():
    with pytest.raises(LmsmithError, match="non-negative token ids"):
        PromptTuningConfig(train_tokens=(-1,))
    with pytest.raises(LmsmithError, match="vocabulary has 128"):
        apply_prompt_tuning(_model(), PromptTuningConfig(train_tokens=(128,)))
    tok = _tokenizer()
    names = {tok.id_to_token(i) for i in tok.template_token_ids()}
    assert {"<|im_start|>", "<|im_end|>"} <= names  # ChatML's markers (and the eos ids)
    assert all(tok.backend.get_added_tokens_decoder()[i].special for i in tok.template_token_ids())


# ---- deep prompts (prefix tuning) ------------------------------------------------------------------


def test_deep_prompt_starts_equal_to_the_shallow_one_and_trains_only_its_keys_values(tmp_path):
    m = _model(scale=1.0, init_std=0.1)
    base = {k: v.clone() for k, v in m.state_dict().items()}
    torch.manual_seed(0)
    shallow = apply_prompt_tuning(m, PromptTuningConfig(n_virtual_tokens=4))
    torch.manual_seed(0)
    deep = apply_prompt_tuning(m, PromptTuningConfig(n_virtual_tokens=4, deep=True))
    assert deep.prefix_kv.shape == (2, 2, 2, 4, 16)  # (layers, k/v, kv heads, tokens, head dim)
    ids = torch.randint(0, 128, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0
    with torch.no_grad():
        torch.testing.assert_close(deep(ids), shallow(ids), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(deep(ids, attention_mask=mask)[1], shallow(ids, attention_mask=mask)[1],
                                   atol=1e-5, rtol=1e-5)
    params = trainable_parameters(deep)
    assert [id(p) for p in params] == [id(deep.prefix_kv)]
    res = _train(deep, params, tmp_path)
    losses = list(res.losses.values())
    assert losses[-1] < losses[0] - 0.5, losses
    for k, v in m.state_dict().items():
        assert torch.equal(v, base[k]), k


def test_deep_prompt_generation_cached_equals_full_forward():
    w = apply_prompt_tuning(_model(), PromptTuningConfig(n_virtual_tokens=5, deep=True))
    with torch.no_grad():
        w.prefix_kv.add_(torch.randn(w.prefix_kv.shape, generator=torch.Generator().manual_seed(2)))
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (7, 3, 5)]
    cfg = GenerationConfig(max_new_tokens=8)
    batched = [c.ids for c in generate_ids(w, prompts, cfg)]
    single = [generate_ids(w, [p], cfg)[0].ids for p in prompts]
    assert batched == single
    p, out = prompts[0], single[0]
    assert w(torch.tensor([p + out]))[0, len(p) - 1:-1].argmax(-1).tolist() == out
    beam = GenerationConfig(strategy="beam", num_beams=3, max_new_tokens=6)
    assert [c.ids for c in generate_ids(w, prompts, beam)] == [generate_ids(w, [q], beam)[0].ids for q in prompts]


def test_deep_prompt_round_trip_and_peft_prefix_tuning(tmp_path):
    m = _model()
    checkpoint.save(m, None, tmp_path / "base")
    w = apply_prompt_tuning(m, PromptTuningConfig(n_virtual_tokens=5, deep=True, train_tokens=TOKENS))
    with torch.no_grad():
        w.prefix_kv.add_(torch.randn(w.prefix_kv.shape, generator=torch.Generator().manual_seed(2)))
    save_prompt_tuning(w, tmp_path / "pt")
    w2 = load_adapter(_model(), tmp_path / "pt")
    assert w2.prompt_config.deep and w2.prompt_config.train_tokens == TOKENS
    ids = torch.tensor([[3, 5, 8, 17, 2, 90, 44]])
    assert torch.equal(w2(ids), w(ids))
    with pytest.raises(LmsmithError, match="prefix for this model"):
        load_prompt_tuning(_model(n_layers=3), tmp_path / "pt")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    # peft reads our file as PREFIX_TUNING; without our token rows the logits equal a rows-free copy.
    plain = apply_prompt_tuning(_model(), PromptTuningConfig(n_virtual_tokens=5, deep=True))
    with torch.no_grad():
        plain.prefix_kv.copy_(w.prefix_kv)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager")
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "pt").eval()
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        theirs = pm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        torch.testing.assert_close(theirs, plain(ids), atol=1e-5, rtol=1e-5)
    # And a prefix peft trained loads in lmsmith with the same logits.
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager")
    pcfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6)
    pm2 = peft.get_peft_model(hf2, pcfg)
    with torch.no_grad():
        for p in pm2.prompt_encoder.parameters():
            p.normal_()
    pm2.save_pretrained(tmp_path / "peft-prefix")
    ours = load_adapter(_model(), tmp_path / "peft-prefix")
    pm2.eval()
    with torch.no_grad():
        theirs = pm2(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        torch.testing.assert_close(ours(ids), theirs, atol=1e-5, rtol=1e-5)


def test_prefix_run_resumes_exactly_from_its_small_checkpoint(tmp_path):
    def run(out, steps, resume=False):
        torch.manual_seed(0)
        w = apply_prompt_tuning(_model(scale=1.0, init_std=0.1),
                                PromptTuningConfig(n_virtual_tokens=4, deep=True, train_tokens=TOKENS))
        cfg = TrainConfig(lr=LR, warmup_steps=0, max_steps=steps, save_every=0, log_every=1, dtype="fp32",
                          progress=False, peak_flops=1e12, weight_decay=0.0, schedule="constant")
        res = train(w, _token_batches(), causal_lm_objective, cfg, out_dir=out, trainable_params=w.prompt_parameters(),
                    resume=resume)
        return w, res

    whole, _ = run(tmp_path / "a", 8)
    _, first = run(tmp_path / "b", 4)
    assert first.final_dir is None  # adapters are saved in their own format, not as a whole model
    files = sorted(p.name for p in first.checkpoint.iterdir())
    assert files == ["train_state", "trainable.safetensors"]
    resumed, _ = run(tmp_path / "b", 8, resume=True)
    assert torch.equal(resumed.prefix_kv, whole.prefix_kv)
    assert torch.equal(resumed.token_embeddings, whole.token_embeddings)
