"""The synthetic instruction tasks: answers are right, splits are disjoint, held-out questions stay
out of the built-in pretraining corpus."""

import json
import re
from pathlib import Path

import pytest

from lmsmith.cli import main
from lmsmith.data import synth
from lmsmith.errors import LmsmithError


def _check_answer(task: str, q: str, a: str) -> bool:
    """Recompute the answer from the question text alone."""
    if task == "arithmetic":
        x, op, y = re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?", q).groups()
        return int(a) == (int(x) + int(y) if op == "+" else int(x) - int(y)) >= 0
    if task == "reverse":
        return a.split() == q.split(": ", 1)[1].split()[::-1]
    if task == "sort":
        return a.split() == sorted(q.split(": ", 1)[1].split())
    if task == "convert":
        n, src, dst = re.fullmatch(r"Convert (\d+) (\w+) to (\w+)\.", q).groups()
        for f, t, k in synth.CONVERSIONS:
            if (src, dst) == (f, t):
                return int(a) == int(n) * k
            if (src, dst) == (t, f):
                return int(n) % k == 0 and int(a) == int(n) // k
        return False
    if task == "lookup":
        facts = dict(kv.split(": ") for kv in re.match(r"Capitals: (.*)\. What", q).group(1).split("; "))
        return a == facts[re.search(r"capital of (\w+)\?", q).group(1)]
    raise AssertionError(task)


def test_every_task_answers_correctly_and_mix_is_balanced():
    rows = synth.generate_task("mix", 500, seed=3)
    assert len(rows) == 500 and len({r["instruction"] for r in rows}) == 500
    counts = {t: sum(r["task"] == t for r in rows) for t in synth.TASKS}
    # round-robin: about 100 each (a repeated question, common for "convert", is replaced by the next task's)
    assert all(85 <= c <= 115 for c in counts.values()), counts
    for r in rows:
        assert _check_answer(r["task"], r["instruction"], r["solution"]), r
        assert r["rejected"] != r["solution"]
    assert synth.generate_task("mix", 50, seed=3) == rows[:50]  # deterministic


def test_lookup_pairs_countries_and_cities_afresh_so_only_reading_answers_it():
    rows = synth.generate_task("lookup", 400, seed=0)
    capitals: dict[str, set[str]] = {}
    for r in rows:
        for country, city in (kv.split(": ") for kv in r["instruction"][10:].split(". What")[0].split("; ")):
            capitals.setdefault(country, set()).add(city)
    assert len(capitals) == len(synth.COUNTRIES) and all(len(c) > 5 for c in capitals.values())


def test_small_question_spaces_are_used_up_before_giving_up():
    rows = synth.generate_task("convert", 10_000, seed=0)
    assert 300 <= len(rows) <= 320  # 8 conversions x 20 amounts x 2 directions = 320 distinct questions
    assert len(synth.generate_task("arithmetic", 5000, seed=0)) == 5000


@pytest.mark.parametrize("a,b", [
    ("What is 37 + 45?", "What is 45 + 37?"),
    ("Reverse the words: cat dog sun", "Reverse the words: sun dog cat"),
    ("Sort these words alphabetically: pear fig apple", "Sort these words alphabetically: apple pear fig"),
    ("Convert 3 km to m.", "Convert 3000 m to km."),
    ("Convert 5 days to hours.", "Convert 120 hours to days."),
])
def test_questions_sharing_an_answer_fall_on_the_same_side_of_the_partition(a, b):
    assert synth._canonical(a) == synth._canonical(b)
    assert synth.reserved(a) == synth.reserved(b)


def test_the_reserved_fifth_is_a_fifth_of_every_task():
    rows = synth.generate_task("mix", 5000, seed=9)
    for task in synth.TASKS:
        qs = [r["instruction"] for r in rows if r["task"] == task]
        share = sum(map(synth.reserved, qs)) / len(qs)
        assert 0.1 < share < 0.3, (task, share)


def test_unknown_task_and_bad_counts_are_clear_errors():
    with pytest.raises(LmsmithError, match="unknown synthetic task 'poetry'.*arithmetic"):
        synth.generate_task("poetry", 10)
    with pytest.raises(LmsmithError, match="--n 0"):
        synth.generate_task("mix", 0)


def test_write_synth_holds_out_reserved_questions_disjoint_from_train(tmp_path):
    r = synth.write_synth("mix", 1000, tmp_path, seed=1)
    train, held, pref = ([json.loads(line) for line in Path(r[k]).read_text().splitlines()]
                         for k in ("train", "heldout", "preference"))
    assert (len(train), len(held), r["heldout_in_corpus"]) == (900, 100, 0)
    assert not {x["instruction"] for x in train} & {x["instruction"] for x in held}
    assert all(synth.reserved(x["instruction"]) for x in held)
    # the reserved questions not needed for held-out are still trained on
    assert 0 < sum(synth.reserved(x["instruction"]) for x in train) < len(train)
    assert [p["prompt"] for p in pref] == [x["instruction"] for x in train]
    assert all(p["chosen"] != p["rejected"] for p in pref)
    # asking for more held-out questions than the reserved fifth holds: counted, not hidden
    r = synth.write_synth("mix", 200, tmp_path / "big", seed=1, heldout_fraction=0.5)
    assert r["n_heldout"] == 100 and r["heldout_in_corpus"] > 0


def test_corpus_documents_are_plain_worked_examples_without_reserved_questions():
    docs = synth.corpus_documents(n=2000, per_document=10)
    examples = [block for _, text in docs for block in text.split("\n\n") if block]
    assert len(docs) == -(-len(examples) // 10) and len(examples) > 1000
    pairs = [block.split("\n") for block in examples]
    assert all(len(p) == 2 for p in pairs)  # question line, answer line: the answer starts a line
    assert not any(synth.reserved(q) for q, _ in pairs)
    # nor any question whose answer a reserved (held-out) question shares
    held = [r for r in synth.generate_task("mix", 3000, seed=77) if synth.reserved(r["instruction"])]
    canon = {synth._canonical(q) for q, _ in pairs}
    assert held and not [r for r in held if synth._canonical(r["instruction"]) in canon]
    assert not any("<|" in q or "<|" in a for q, a in pairs)  # no chat template
    rows = {r["instruction"]: r for r in synth.generate_task("mix", 2000, seed=20_24)}
    assert all(rows[q]["solution"] == a for q, a in pairs)
    assert {rows[q]["task"] for q, _ in pairs} == set(synth.TASKS)
    assert sum(synth.reserved(q) for q in rows) > 300  # a fifth of the questions is kept out


def test_data_synth_cli_reports_the_split(tmp_path, capsys):
    assert main(["data", "synth", "--task", "reverse", "--n", "50", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "45 in" in out and "5 held out" in out and "note:" not in out
    assert len((tmp_path / "heldout.jsonl").read_text().splitlines()) == 5


def test_an_evaluation_file_with_unreserved_questions_gets_a_note(tmp_path):
    from lmsmith.data.instruct import read_examples

    r = synth.write_synth("mix", 200, tmp_path, seed=0)
    held, _ = read_examples(r["heldout"])
    assert synth.heldout_warning(held, r["heldout"]) is None
    train, _ = read_examples(r["train"])  # mostly questions the built-in corpus may contain
    note = synth.heldout_warning(train, r["train"])
    assert note and note.startswith(f"note: {r['train']}: ") and "of 180 synthetic questions" in note
    user = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    assert synth.heldout_warning(user, "mine.jsonl") is None  # not our tasks: nothing to say
