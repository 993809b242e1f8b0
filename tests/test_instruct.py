"""Instruction data: formats, response-only loss masking, packing, truncation, errors, resumable batches."""

import json

import pytest

from lmsmith.data import instruct
from lmsmith.data.instruct import IGNORE_INDEX, InstructBatches, encode_preference, encode_sft, pack, read_examples
from lmsmith.errors import LmsmithError
from lmsmith.tokenizer import Tokenizer

END = "<|im_end|>"


@pytest.fixture(scope="module")
def tok():
    texts = ["What is 2 + 3? 5. Reverse the words: cat dog sun. sun dog cat. Hello there, how are you?"] * 20
    return Tokenizer.train(texts, vocab_size=300, show_progress=False)


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _runs(tok, labels):
    """Decoded text of each run of consecutive labelled positions."""
    runs, cur = [], []
    for t in labels:
        if t == IGNORE_INDEX:
            if cur:
                runs.append(tok.decode(cur))
                cur = []
        else:
            cur.append(t)
    if cur:
        runs.append(tok.decode(cur))
    return runs


@pytest.mark.parametrize("record,response", [
    ({"instruction": "What is 2 + 3?", "solution": "5"}, "5"),
    ({"instruction": "Reverse the words:", "input": "cat dog", "output": "dog cat"}, "dog cat"),
    ({"prompt": "Hello", "completion": "there, how are you?"}, "there, how are you?"),
    ({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                   {"role": "assistant", "content": "Hello there"}]}, "Hello there"),
])
def test_labels_cover_exactly_the_response_and_end_of_turn(tmp_path, tok, record, response):
    examples, stats = read_examples(_write(tmp_path / "d.jsonl", [record]))
    items, enc = encode_sft(examples, tok, 256)
    item = items[0]
    assert _runs(tok, item["labels"]) == [response + END]
    # Shifted: labels[t] is the token after input_ids[t]; the inputs are the rendering minus its last token.
    rendered = tok.apply_chat_template(examples[0]["messages"])
    assert len(item["input_ids"]) == len(tok.encode(rendered)) - 1
    assert rendered.startswith(tok.decode(item["input_ids"]))
    assert enc.target_tokens == sum(t != IGNORE_INDEX for t in item["labels"])


def test_multi_turn_chat_every_assistant_turn_is_a_response(tmp_path, tok):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]
    examples, _ = read_examples(_write(tmp_path / "c.jsonl", [{"messages": msgs}]))
    items, _ = encode_sft(examples, tok, 256)
    assert _runs(tok, items[0]["labels"]) == ["Hello" + END, "5" + END]


def test_preference_labels_are_each_response(tmp_path, tok):
    rec = {"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "6"}
    examples, stats = read_examples(_write(tmp_path / "p.jsonl", [rec]))
    assert stats.format == "preference"
    items, _ = encode_preference(examples, tok, 256)
    assert _runs(tok, items[0]["chosen_labels"]) == ["5" + END]
    assert _runs(tok, items[0]["rejected_labels"]) == ["6" + END]


def test_packing_never_lets_labels_cross_examples(tmp_path, tok):
    recs = [{"instruction": f"What is {i} + 3?", "solution": str(i + 3)} for i in range(12)]
    examples, _ = read_examples(_write(tmp_path / "d.jsonl", recs))
    items, _ = encode_sft(examples, tok, 64)
    rows = pack(items, 64)
    assert len(rows) < len(items) and all(len(r["input_ids"]) <= 64 for r in rows)
    assert sum(len(r["input_ids"]) for r in rows) == sum(len(i["input_ids"]) for i in items)
    start = tok.encode("<|im_start|>")[0]
    for r in rows:
        assert start not in r["labels"]  # the next example's first token is never a target
        assert len(r["labels"]) == len(r["input_ids"])
    runs = [x for r in rows for x in _runs(tok, r["labels"])]
    assert runs == [str(i + 3) + END for i in range(12)]


def test_truncation_is_counted_and_responses_lost_to_it_are_dropped(tmp_path, tok):
    recs = [{"instruction": "What is 2 + 3?", "solution": "5 " * 30},  # response cut: truncated, kept
            {"instruction": "Hello " * 80, "solution": "5"}]  # whole response cut away: dropped
    examples, _ = read_examples(_write(tmp_path / "d.jsonl", recs))
    items, stats = encode_sft(examples, tok, 40)
    assert (stats.truncated, stats.dropped, stats.examples) == (2, 1, 1)
    assert len(items[0]["input_ids"]) == 40


def test_malformed_line_names_file_and_line_or_is_skipped(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "solution": "b"}\n{not json\n{"instruction": "c"}\n'
                    '{"instruction": "d", "solution": "e"}\n')
    with pytest.raises(LmsmithError, match=rf"{path}:2: not valid JSON"):
        read_examples(path)
    examples, stats = read_examples(path, skip_bad=True)
    assert len(examples) == 2 and stats.bad_lines == 2 and f"{path}:2" in stats.first_bad


def test_format_detection_and_override(tmp_path):
    path = _write(tmp_path / "d.jsonl", [{"instruction": "a", "input": "", "output": "b"}])
    assert read_examples(path)[1].format == "alpaca"
    arr = tmp_path / "d.json"
    chat = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    arr.write_text(json.dumps([{"messages": chat}]))
    assert read_examples(arr)[1].format == "chat"
    sol = _write(tmp_path / "s.jsonl", [{"instruction": "a", "solution": "b"}])
    with pytest.raises(LmsmithError, match=r"s.jsonl:1: format 'alpaca' needs keys.*looks like format 'solution'"):
        read_examples(sol, format="alpaca")
    with pytest.raises(LmsmithError, match="unknown data format 'nope'"):
        read_examples(sol, format="nope")
    odd = _write(tmp_path / "o.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(LmsmithError, match=r"o.jsonl:1: cannot tell the format"):
        read_examples(odd)


def test_batches_are_padded_deterministic_and_resume_exactly():
    items = [{"input_ids": list(range(1, 2 + i % 5)), "labels": [7] * (1 + i % 5)} for i in range(10)]
    a = InstructBatches(items, 3, seed=1, pad_id=0)
    first = next(a)
    assert first["input_ids"].shape == first["labels"].shape
    assert (first["labels"][first["input_ids"] == 0] == IGNORE_INDEX).all()  # padding carries no loss
    seq = [first] + [next(a) for _ in range(5)]  # crosses into epoch 1
    b = InstructBatches(items, 3, seed=1, pad_id=0)
    for x in seq:
        y = next(b)
        assert all((x[k] == y[k]).all() for k in x)
    state = b.state_dict()
    assert state["epoch"] == 1
    c = InstructBatches(items, 3, seed=1, pad_id=0)
    c.load_state_dict(json.loads(json.dumps(state)))
    for _ in range(4):
        x, y = next(b), next(c)
        assert all((x[k] == y[k]).all() for k in x)
    assert instruct.epoch_order(10, 1, 0) != instruct.epoch_order(10, 1, 1)
    with pytest.raises(LmsmithError, match="same data"):
        InstructBatches(items[:5], 3).load_state_dict(state)
