"""LoRA: exactness at init, frozen base, merge, disable, peft interop both ways, summary, `lmsmith merge`."""

from __future__ import annotations

import json

import pytest
import torch

from lmsmith import checkpoint, loader
from lmsmith.adapters import (
    LoraConfig,
    apply_lora,
    load_adapter,
    load_lora,
    lora_disabled,
    lora_modules,
    lora_parameters,
    lora_stats,
    lora_summary,
    merge_lora,
    save_lora,
)
from lmsmith.config import ModelConfig
from lmsmith.errors import LmsmithError
from lmsmith.model import build_model

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

CFG = dict(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, max_seq_len=64,
           tie_embeddings=False)


def _model(seed=0, **kw) -> torch.nn.Module:
    return build_model(ModelConfig(**{**CFG, **kw}), seed=seed).eval()


def _ids(B=2, T=12, seed=0):
    return torch.randint(0, CFG["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed))


def _randomise_b(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.05)


def test_identity_at_init_and_only_adapters_train():
    m = _model()
    ids = _ids()
    ref = m(ids)
    base = {k: v.clone() for k, v in m.state_dict().items()}
    params = apply_lora(m, LoraConfig(r=4))
    assert torch.equal(m(ids), ref)  # B = 0
    assert len(params) == 2 * 4 * 2 and {id(p) for p in params} == {id(p) for p in lora_parameters(m)}
    assert [p for p in m.parameters() if p.requires_grad] == params
    before = [p.clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-2)
    m.train()
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(m(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(not torch.equal(a, b) for a, b in zip(before, params))
    after = m.state_dict()
    for k, v in base.items():
        key = k.replace(".weight", ".base_layer.weight") if k not in after else k
        assert torch.equal(after[key], v), k  # bit-identical base


def test_merge_equals_unmerged_and_disable_gives_base():
    m = _model()
    ids = _ids()
    ref = m(ids)
    apply_lora(m, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    _randomise_b(m)
    out = m(ids)
    assert (out - ref).abs().max() > 1e-3
    with lora_disabled(m):
        assert torch.equal(m(ids), ref)
    assert torch.equal(m(ids), out)  # re-enabled
    stats = {}
    merge_lora(m, stats=stats)
    assert not lora_modules(m) and stats["layers"] == 14 and stats["max_abs_delta"] > 0
    assert type(m.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    torch.testing.assert_close(m(ids), out, atol=1e-5, rtol=0)


def test_summary_numbers():
    m = _model()
    cfg = LoraConfig(r=4, target_modules="all-linear")
    s = lora_stats(m, cfg)  # before applying: a plan
    pt = s["per_type"]
    assert pt["q_proj"]["lora"] == 4 * (64 + 64) and pt["q_proj"]["full"] == 64 * 64
    assert pt["k_proj"]["lora"] == 4 * (64 + 32) and pt["k_proj"]["full"] == 64 * 32  # GQA: 2 kv heads
    assert pt["down_proj"]["lora"] == 4 * (96 + 64) and pt["down_proj"]["count"] == 2
    base = m.num_params()
    apply_lora(m, cfg)
    s2 = lora_stats(m, cfg)
    n = sum(p.numel() for p in lora_parameters(m))
    assert s2["trainable"] == s["trainable"] == n and s2["base"] == base and s2["total"] == base + n
    assert s2["percent"] == pytest.approx(100 * n / (base + n))
    text = lora_summary(m, cfg)
    assert f"{n:,}" in text and f"{100 * n / (base + n):.4f}%" in text and "q_proj" in text


def _hf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


@pytest.mark.parametrize("targets,rslora", [(["q_proj", "k_proj", "v_proj", "o_proj"], False),
                                            ("all-linear", False), (["q_proj", "v_proj"], True)])
def test_peft_interop_both_ways(tmp_path, targets, rslora):
    m = _model()
    checkpoint.save(m, None, tmp_path / "base")
    ids = _ids()
    # ours -> peft
    cfg = LoraConfig(r=4, alpha=8, target_modules=targets, use_rslora=rslora)
    apply_lora(m, cfg)
    _randomise_b(m)
    save_lora(m, cfg, tmp_path / "ours", base_model_name_or_path=str(tmp_path / "base"))
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert written["peft_type"] == "LORA" and written["r"] == 4
    pm = peft.PeftModel.from_pretrained(_hf(tmp_path / "base"), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(ids).logits, m(ids), atol=1e-5, rtol=1e-5)
    # peft -> ours
    hf = _hf(tmp_path / "base")
    pcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_rslora=rslora, task_type="CAUSAL_LM")
    pm2 = peft.get_peft_model(hf, pcfg)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in pm2.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    pm2.eval().save_pretrained(tmp_path / "peft")
    ours, _ = loader.load(tmp_path / "base")
    got = load_lora(ours, tmp_path / "peft")
    assert got.use_rslora == rslora and got.r == 4
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(ids), pm2(ids).logits, atol=1e-5, rtol=1e-5)


def test_adapter_name_in_keys_is_accepted(tmp_path):
    m = _model()
    cfg = LoraConfig(r=2, target_modules=["q_proj"])
    apply_lora(m, cfg)
    _randomise_b(m)
    save_lora(m, cfg, tmp_path / "a")
    from safetensors.torch import load_file, save_file

    f = tmp_path / "a" / "adapter_model.safetensors"
    sd = load_file(str(f))
    save_file({k.replace(".weight", ".default.weight"): v for k, v in sd.items()}, str(f))
    m2 = _model()
    assert load_adapter(m2, tmp_path / "a") is m2
    ids = _ids()
    torch.testing.assert_close(m2(ids), m(ids), atol=0, rtol=0)


def _tokenizer():
    from lmsmith.tokenizer import Tokenizer

    text = "the cat sat on the mat. a dog ran in the park. def f(x): return x + 1\n" * 20
    return Tokenizer.train([text], vocab_size=280, show_progress=False)


def test_cli_merge_end_to_end(tmp_path, capsys):
    from lmsmith.cli import main

    tok = _tokenizer()
    m = _model(vocab_size=tok.vocab_size)
    checkpoint.save(m, tok, tmp_path / "base")
    cfg = LoraConfig(r=4, alpha=8, target_modules="all-linear")
    apply_lora(m, cfg)
    _randomise_b(m)
    save_lora(m, cfg, tmp_path / "adapter")
    ids = _ids()
    want = m(ids)
    rc = main(["merge", str(tmp_path / "base"), str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")])
    out = capsys.readouterr().out
    assert rc == 0 and "14 linear layers" in out and "max |ΔW|" in out and str(tmp_path / "merged") in out
    assert (tmp_path / "merged" / "tokenizer.json").exists()
    with torch.no_grad():
        torch.testing.assert_close(_hf(tmp_path / "merged")(ids).logits, want, atol=1e-5, rtol=1e-5)
    merged, tok2 = loader.load(tmp_path / "merged")
    torch.testing.assert_close(merged(ids), want, atol=1e-5, rtol=1e-5)
    assert tok2 is not None


def test_bad_input(tmp_path, capsys):
    from lmsmith.cli import main

    m = _model()
    checkpoint.save(m, None, tmp_path / "base")
    (tmp_path / "empty").mkdir()
    rc = main(["merge", str(tmp_path / "base"), str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 1 and "adapter_config.json" in err and err.count("\n") == 1
    with pytest.raises(LmsmithError, match="adapter_config.json"):
        load_adapter(_model(), tmp_path / "empty")

    cfg = LoraConfig(r=2)
    apply_lora(m, cfg)
    save_lora(m, cfg, tmp_path / "a")
    conf = tmp_path / "a" / "adapter_config.json"
    good = json.loads(conf.read_text())
    conf.write_text(json.dumps({**good, "use_dora": True}))
    with pytest.raises(LmsmithError, match="DoRA"):
        load_lora(_model(), tmp_path / "a")
    conf.write_text(json.dumps({**good, "peft_type": "IA3"}))
    with pytest.raises(LmsmithError, match="LORA, PROMPT_TUNING, PREFIX_TUNING"):
        load_adapter(_model(), tmp_path / "a")
    conf.write_text(json.dumps(good))
    with pytest.raises(LmsmithError, match="different model shape"):
        load_lora(_model(dim=32, n_heads=2, n_kv_heads=2), tmp_path / "a")
    with pytest.raises(LmsmithError, match="does not have"):
        load_lora(_model(n_layers=1), tmp_path / "a")
    with pytest.raises(LmsmithError, match="rank"):
        LoraConfig(r=0)
    with pytest.raises(LmsmithError, match="match no linear"):
        apply_lora(_model(), LoraConfig(target_modules=["nope"]))
