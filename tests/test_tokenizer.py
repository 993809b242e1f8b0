"""Tokenizer: training, exact round trip, save/load, transformers parity, chat templates, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from lmsmith.cli import main
from lmsmith.errors import LmsmithError
from lmsmith.tokenizer import (
    CHATML_TEMPLATE,
    DEFAULT_SPECIAL_TOKENS,
    LLAMA3_PRETOKENIZE_REGEX,
    QWEN2_PRETOKENIZE_REGEX,
    Tokenizer,
)

# Text that breaks naive tokenizers: accents (composed and decomposed), CJK, emoji with ZWJ,
# tabs, whitespace runs, \r\n, control characters, digits, a special token's spelling.
VARIED = [
    "",
    " ",
    "Hello, world!",
    "Café naïve résumé — Ünïcödé",
    "Cafe\u0301 (decomposed e + combining acute)",
    "日本語のテキストと中文文本",
    "emoji 🎉 family 👩\u200d👩\u200d👧 flag 🇫🇷",
    "def f(x):\n\treturn x  +  1\r\n\r\n",
    "    four spaces\n\n\n\ttab\t\tdouble tab   trailing   ",
    "\x00\x01\x02\x07\x1b[0m\x7f control",
    "12345 + 67890 = 80235; 3.14159",
    "line one\rline two\r\nline three\n",
    "x" * 300,
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 astral plane 🜁",
]

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3?\nShow work."},
]


def _corpus() -> list[str]:
    import pydoc_data.topics

    # ~0.5 MB of real English from every Python install, plus a little of everything in VARIED.
    return list(pydoc_data.topics.topics.values()) + VARIED * 3


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(_corpus(), 1500, show_progress=False)


@pytest.fixture(scope="module")
def saved(tok, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    tok.save(d)
    return d


@pytest.fixture(scope="module")
def hf(saved):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(saved))


# ---------------------------------------------------------------------- training


@pytest.mark.parametrize("text", VARIED, ids=range(len(VARIED)))
def test_round_trip_is_exact(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_compresses_and_batch_matches_single(tok):
    text = "The return statement leaves the current function call with the expression list."
    ids = tok.encode(text)
    assert len(ids) < len(text.encode()) / 2.5  # BPE merged something: not byte-per-token
    assert tok.encode_batch(VARIED) == [tok.encode(t) for t in VARIED]
    assert tok.encode_batch(VARIED, add_bos=True, add_eos=True) == [
        tok.encode(t, add_bos=True, add_eos=True) for t in VARIED
    ]


@pytest.mark.parametrize("size", [300, 2000])
def test_train_gives_exact_vocab_size_with_specials_first(size):
    t = Tokenizer.train(_corpus(), size, show_progress=False)
    assert t.vocab_size == size
    assert len(t.backend.get_vocab(with_added_tokens=True)) == size
    assert [t.id_to_token(i) for i in range(5)] == DEFAULT_SPECIAL_TOKENS
    assert (t.eos_id, t.bos_id, t.pad_id) == (0, 1, 2)
    assert not t.add_bos
    # every byte is a token, so nothing is ever unknown
    assert all(t.token_to_id(c) is not None for c in pre_tokenizers.ByteLevel.alphabet())


def test_qwen2_pre_tokenizer_digits_one_by_one(tok):
    pieces = [tok.id_to_token(i) for i in tok.encode("year 20240 ok")]
    digits = [p for p in pieces if any(c.isdigit() for c in p)]
    assert digits == ["2", "0", "2", "4", "0"]
    spec = json.loads(tok.backend.to_str())
    split, byte_level = spec["pre_tokenizer"]["pretokenizers"]
    assert split["pattern"]["Regex"] == QWEN2_PRETOKENIZE_REGEX
    assert split["behavior"] == "Isolated"
    assert byte_level["type"] == "ByteLevel" and byte_level["use_regex"] is False
    assert byte_level["add_prefix_space"] is False
    assert spec["post_processor"] is None and spec["normalizer"] is None
    assert tok.pre_tokenizer_name == "qwen2"


def test_train_from_files_paths_and_strings(tmp_path):
    import random

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(2, 7))) for _ in range(300)]
    a, b = tmp_path / "a.txt", tmp_path / "b.md"
    a.write_bytes(" ".join(rng.choice(words) for _ in range(3000)).encode() + b" alpha\r\n" * 50)
    b.write_text("delta epsilon zeta 123\n" * 200, encoding="utf-8")
    t1 = Tokenizer.train([a, b], 400, show_progress=False)
    t2 = Tokenizer.train([str(a), str(b)], 400, show_progress=False)
    t4 = Tokenizer.train((p for p in [a, b]), 400, show_progress=False)  # a generator of paths
    t3 = Tokenizer.train([a.read_bytes().decode(), b.read_text()], 400, show_progress=False)
    assert t1.vocab_size == t2.vocab_size == 400
    assert t1.hash == t2.hash == t3.hash == t4.hash  # files are read exactly as their text would be passed
    # the file's text was learnt: a frequent word from it is one token
    assert len(t1.encode(" epsilon")) == 1
    assert t1.decode(t1.encode("alpha\r\n")) == "alpha\r\n"


def test_custom_special_tokens_and_small_corpus_warns():
    with pytest.warns(UserWarning, match="fewer than"):
        t = Tokenizer.train(["ab ab ab"], 1000, special_tokens=["</s>", "<s>"], show_progress=False)
    assert t.vocab_size < 1000
    assert (t.eos_id, t.bos_id, t.pad_id) == (0, 1, None)


def test_train_bad_input():
    with pytest.raises(LmsmithError, match="too small"):
        Tokenizer.train(["hello"], 260, show_progress=False)
    with pytest.raises(LmsmithError, match="does not exist"):
        Tokenizer.train([Path("/no/such/file.txt")], 1000, show_progress=False)
    with pytest.raises(LmsmithError, match="not a str"):
        Tokenizer.train(["ok", 3], 1000, show_progress=False)


# ---------------------------------------------------------------------- encoding details


def test_bos_eos_added_only_on_request(tok):
    plain = tok.encode("hi there")
    assert tok.bos_id not in plain and tok.eos_id not in plain
    assert tok.encode("hi there", add_bos=True) == [tok.bos_id, *plain]
    assert tok.encode("hi there", add_bos=True, add_eos=True) == [tok.bos_id, *plain, tok.eos_id]
    assert tok.encode("", add_eos=True) == [tok.eos_id]


def test_special_spelling_in_text_is_matched_and_decode_can_skip(tok):
    # Documented tokenizers/transformers behaviour: a special token's spelling in text becomes its id.
    ids = tok.encode("a<|im_end|>b")
    assert tok.token_to_id("<|im_end|>") in ids
    assert tok.decode(ids) == "a<|im_end|>b"
    assert tok.decode(ids, skip_special_tokens=True) == "ab"


def test_eos_ids_include_end_of_turn(tok):
    assert tok.eos_ids[0] == tok.eos_id
    assert tok.token_to_id("<|im_end|>") in tok.eos_ids
    assert tok.token_to_id("<|im_start|>") not in tok.eos_ids
    assert len(tok.eos_ids) == len(set(tok.eos_ids))


def test_decode_accepts_tensors(tok):
    torch = pytest.importorskip("torch")
    ids = tok.encode("tensor ids")
    assert tok.decode(torch.tensor(ids)) == "tensor ids"


# ---------------------------------------------------------------------- save / load


def test_save_load_round_trip(tok, saved):
    config = json.loads((saved / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == (
        "<|bos|>",
        "<|endoftext|>",
        "<|pad|>",
    )
    assert config["chat_template"] == CHATML_TEMPLATE
    assert config["clean_up_tokenization_spaces"] is False
    back = Tokenizer.load(saved)
    also = Tokenizer.load(saved / "tokenizer.json")
    assert [back.encode(t) for t in VARIED] == [tok.encode(t) for t in VARIED]
    assert back.hash == tok.hash == also.hash
    assert (back.bos_id, back.eos_id, back.pad_id, back.eos_ids) == (
        tok.bos_id,
        tok.eos_id,
        tok.pad_id,
        tok.eos_ids,
    )
    assert back.vocab_size == tok.vocab_size
    assert back.pre_tokenizer_name == "qwen2"
    assert back.apply_chat_template(CHAT, True) == tok.apply_chat_template(CHAT, True)


def test_hash_is_content_sensitive(tok):
    other = Tokenizer.train(_corpus(), 1400, show_progress=False)
    assert len(tok.hash) == 64 and other.hash != tok.hash


def test_load_bad_input(tmp_path):
    with pytest.raises(LmsmithError, match="no tokenizer.json"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(LmsmithError, match="tokenizer.json is not a valid") as e:
        Tokenizer.load(tmp_path)
    assert "\n" not in str(e.value) and str(tmp_path) in str(e.value)


def test_load_bad_config(tok, tmp_path):
    tok.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{oops", encoding="utf-8")
    with pytest.raises(LmsmithError, match="tokenizer_config.json is not valid JSON"):
        Tokenizer.load(tmp_path)


# ---------------------------------------------------------------------- transformers parity


def test_transformers_gives_same_ids_and_text(tok, hf):
    for text in VARIED:
        assert hf(text)["input_ids"] == tok.encode(text), text  # default add_special_tokens=True adds nothing
        assert hf.decode(tok.encode(text)) == text
    assert hf.bos_token_id == tok.bos_id and hf.eos_token_id == tok.eos_id and hf.pad_token_id == tok.pad_id
    assert len(hf) == tok.vocab_size


@pytest.mark.parametrize("gen", [False, True])
def test_transformers_renders_same_chat(tok, hf, gen):
    ours = tok.apply_chat_template(CHAT, add_generation_prompt=gen)
    assert hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=gen) == ours
    expected = (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4.<|im_end|>\n<|im_start|>user\nAnd 3+3?\nShow work.<|im_end|>\n"
    ) + ("<|im_start|>assistant\n" if gen else "")
    assert ours == expected
    assert hf.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=gen, return_dict=False) == tok.encode(ours)


# A template that exercises what transformers' environment provides: bos_token, raise_exception,
# loop.first, trim_blocks/lstrip_blocks (the indented block tags must leave no whitespace behind).
CUSTOM_TEMPLATE = """{{ bos_token }}
{% for message in messages %}
    {% if message['role'] not in ['user', 'assistant', 'system'] %}
        {{ raise_exception('unknown role ' + message['role']) }}
    {% endif %}
    {% if loop.first and message['role'] == 'system' %}
[SYS]{{ message['content'] | trim }}[/SYS]
    {% else %}
<{{ message['role'] }}>{{ message['content'] }}{{ eos_token }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}<assistant>{% endif %}"""


@pytest.mark.parametrize("form", ["string", "list"])
def test_custom_template_from_config(tok, tmp_path, form):
    tok.save(tmp_path)
    cfg_path = tmp_path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = (
        CUSTOM_TEMPLATE
        if form == "string"
        else [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": CUSTOM_TEMPLATE}]
    )
    cfg_path.write_text(json.dumps(cfg), encoding="utf-8")
    loaded = Tokenizer.load(tmp_path)
    assert loaded.chat_template == CUSTOM_TEMPLATE
    out = loaded.apply_chat_template(CHAT, add_generation_prompt=True)
    assert out == (
        "<|bos|>\n[SYS]You are terse.[/SYS]\n<user>What is 2+2?<|endoftext|>\n<assistant>4.<|endoftext|>\n"
        "<user>And 3+3?\nShow work.<|endoftext|>\n<assistant>"
    )
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == out
    with pytest.raises(LmsmithError, match="unknown role tool"):
        loaded.apply_chat_template([{"role": "tool", "content": "x"}])
    # saving again keeps the custom template (as a plain string transformers reads)
    loaded.save(tmp_path / "again")
    assert Tokenizer.load(tmp_path / "again").chat_template == CUSTOM_TEMPLATE


def test_template_syntax_error_is_user_error(tok):
    t = Tokenizer(tok.backend, chat_template="{% for m in messages %}")
    with pytest.raises(LmsmithError, match="syntax error"):
        t.apply_chat_template(CHAT)


# ---------------------------------------------------------------------- real-model-style tokenizer.json


def _llama3_style(tmp_path: Path) -> Path:
    specials = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ]
    b = HFTokenizer(models.BPE())
    b.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    b.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    b.train_from_iterator(_corpus()[:200], trainer)
    # Llama-3's tokenizer.json adds <|begin_of_text|> in the post-processor; our encode must not.
    b.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", 0)],
    )
    d = tmp_path / "llama3"
    d.mkdir()
    b.save(str(d / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": {"__type": "AddedToken", "content": "<|begin_of_text|>", "special": True},
        "eos_token": "<|eot_id|>",
        "model_max_length": 131072,
        "chat_template": "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
        "<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}",
    }
    (d / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 4]}), encoding="utf-8")
    return d


def test_load_llama3_style(tmp_path):
    d = _llama3_style(tmp_path)
    t = Tokenizer.load(d)
    assert (t.bos_id, t.eos_id, t.pad_id) == (0, 4, None)
    assert t.eos_ids == [4, 1]
    assert t.pre_tokenizer_name == "llama-bpe"
    assert t.model_max_length == 131072
    plain = t.encode("Hello 12345")
    assert 0 not in plain  # the post-processor's bos is not added behind our back
    assert t.add_bos  # ...but we know the model expects it
    assert t.encode("Hello 12345", add_bos=True) == [0, *plain]
    assert t.decode(plain) == "Hello 12345"
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(d))
    assert hf("Hello 12345", add_special_tokens=False)["input_ids"] == plain
    assert hf.apply_chat_template(CHAT, tokenize=False) == t.apply_chat_template(CHAT)
    # save keeps what transformers needs to behave the same (post-processor and all)
    t.save(tmp_path / "resaved")
    hf2 = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "resaved"))
    assert hf2("Hello 12345")["input_ids"] == hf("Hello 12345")["input_ids"]


def test_load_sentencepiece_style(tmp_path):
    # The shape of a SentencePiece-converted Llama-2 tokenizer.json: Prepend/Replace normalizer, no
    # pre-tokenizer, byte fallback, Replace/ByteFallback/Fuse/Strip decoder; tokens named <s> </s> <unk>.
    b = HFTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    b.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    b.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=700, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens], show_progress=False
    )
    b.train_from_iterator(_corpus()[:200], trainer)
    d = tmp_path / "spm"
    d.mkdir()
    b.save(str(d / "tokenizer.json"))
    cfg = {
        "bos_token": {"content": "<s>", "lstrip": False},
        "eos_token": {"content": "</s>"},
        "unk_token": "<unk>",
    }
    (d / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    t = Tokenizer.load(d)
    assert (t.bos_id, t.eos_id) == (1, 2)
    assert t.eos_ids == [2]
    assert t.pre_tokenizer_name == "default"
    assert not t.add_bos
    ids = t.encode("Hello world, 日本")
    assert ids[0] != 1
    assert t.decode(ids) == "Hello world, 日本"  # the CJK went through byte fallback
    assert t.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|im_start|>user\nhi<|im_end|>\n"


# ---------------------------------------------------------------------- CLI


def _corpus_dir(root: Path) -> Path:
    import pydoc_data.topics

    d = root / "corpus"
    (d / "sub" / "deeper").mkdir(parents=True)
    (d / ".git").mkdir()
    topics = list(pydoc_data.topics.topics.values())
    (d / "a.txt").write_text("\n".join(topics[:40]), encoding="utf-8")
    (d / "sub" / "b.md").write_text("\n".join(topics[40:80]), encoding="utf-8")
    (d / "sub" / "deeper" / "c.py").write_bytes(b"def f():\r\n    return 42\r\n" * 50)
    (d / "blob.bin").write_bytes(bytes(range(256)) * 10)  # binary: skipped
    (d / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 100)  # not UTF-8: skipped
    (d / ".git" / "HEAD").write_text("ref: refs/heads/main\n" * 1000)  # hidden folder: never read
    return d


def test_cli_train_end_to_end(tmp_path, capsys):
    d = _corpus_dir(tmp_path)
    out = tmp_path / "tok"
    rc = main(["tokenizer", "train", "--input", str(d), "--vocab-size", "700", "--out", str(out), "--no-progress"])
    assert rc == 0
    summary = capsys.readouterr().out
    assert "700 tokens" in summary and "3 file(s)" in summary and "2 binary/non-UTF-8" in summary
    assert "bytes per token" in summary and str(out) in summary
    t = Tokenizer.load(out)
    assert t.vocab_size == 700 and t.pre_tokenizer_name == "qwen2"
    assert t.decode(t.encode("return 42\r\n")) == "return 42\r\n"
    # the .git folder was not read: its only word is not a learnt token
    assert len(t.encode("refs")) > 1


def test_cli_bad_input_is_one_line_exit_1(tmp_path, capsys):
    d = _corpus_dir(tmp_path)
    cases = [
        (["--input", str(tmp_path / "missing"), "--vocab-size", "700"], "does not exist"),
        (["--input", str(d), "--vocab-size", "100"], "too small"),
        (["--input", str(d / "blob.bin"), "--vocab-size", "700"], "no text files"),
    ]
    for args, message in cases:
        rc = main(["tokenizer", "train", *args, "--out", str(tmp_path / "o"), "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 1, args
        assert err.startswith("lmsmith: error:") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()  # nothing half-written on failure


def test_chat_template_jinja_file_and_none_values(tok, tmp_path):
    # Newer transformers save the template as chat_template.jinja, which wins over the config's.
    tok.save(tmp_path)
    template = "{% for m in messages %}[{{ m.get('name', 'anon') }}] {{ m['content'] }}\n{% endfor %}"
    (tmp_path / "chat_template.jinja").write_text(template, encoding="utf-8")
    loaded = Tokenizer.load(tmp_path)
    assert loaded.chat_template == template
    # None-valued keys are dropped before rendering, as transformers does (else this renders "[None]").
    msgs = [{"role": "user", "content": "hi", "name": None}, {"role": "user", "content": "yo", "name": "bo"}]
    assert loaded.apply_chat_template(msgs) == "[anon] hi\n[bo] yo\n"
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf.apply_chat_template(msgs, tokenize=False) == "[anon] hi\n[bo] yo\n"
    # saving over the directory puts the template in tokenizer_config.json and drops the stale file
    loaded.chat_template = CHATML_TEMPLATE
    loaded.save(tmp_path)
    assert not (tmp_path / "chat_template.jinja").exists()
    assert Tokenizer.load(tmp_path).chat_template == CHATML_TEMPLATE
