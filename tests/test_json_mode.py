"""JSON mode's prefix automaton (lmsmith/decoding/json_mode.py), checked against Python's json module.

Pure Python: the module is loaded from its file, because importing `lmsmith.decoding` would pull in
torch through the package's __init__, and these checks must stay fast and dependency-free.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "lmsmith" / "decoding" / "json_mode.py"
_spec = importlib.util.spec_from_file_location("_lmsmith_json_mode", _PATH)
json_mode = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(json_mode)
JsonPrefix = json_mode.JsonPrefix


def _reject_constant(name):
    raise ValueError(f"{name} is not JSON")


def _loads_object(text: str) -> dict:
    """Strict oracle: RFC JSON (no NaN/Infinity) whose root is an object."""
    value = json.loads(text, parse_constant=_reject_constant)
    assert isinstance(value, dict), text
    return value


def _is_object(text: str) -> bool:
    try:
        _loads_object(text)
    except (ValueError, AssertionError):
        return False
    return True


def _fed(text: str) -> JsonPrefix:
    state = JsonPrefix()
    assert state.feed(text), text
    return state


def _first_rejected(text: str) -> int | None:
    """Index of the first character feed() refuses when fed one at a time (None if all are accepted)."""
    state = JsonPrefix()
    for i, c in enumerate(text):
        if not state.feed(c):
            return i
    return None


# ---------------------------------------------------------------- random documents

_STRING_CHARS = ['a', 'b', 'Z', ' ', '"', '\\', '/', '\b', '\f', '\n', '\r', '\t', '\x00', '\x1f', '\x7f',
                 'é', 'ß', '中', '\u2028', '\U0001f600', '\ud800', '{', '}', '[', ']', ',', ':', '0', 'e', '-']


def _random_string(rng: random.Random) -> str:
    return "".join(rng.choice(_STRING_CHARS) for _ in range(rng.randint(0, 8)))


def _random_number(rng: random.Random):
    kind = rng.randrange(5)
    if kind == 0:
        return rng.randint(-10, 10)
    if kind == 1:
        return rng.randint(-10**20, 10**20)
    if kind == 2:
        return rng.uniform(-1000, 1000)
    if kind == 3:
        return rng.choice([0.0, -0.0, 1e-7, -2.5e-300, 1.5e300, 1e16, 123456789.0, 0.5])
    return rng.random() * 10 ** rng.randint(-30, 30) * rng.choice([1, -1])


def _random_value(rng: random.Random, depth: int):
    kind = rng.randrange(8 if depth < 4 else 5)
    if kind == 0:
        return _random_string(rng)
    if kind == 1:
        return _random_number(rng)
    if kind == 2:
        return rng.choice([True, False])
    if kind == 3:
        return None
    if kind == 4:
        return _random_number(rng)
    if kind == 5:
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return _random_object(rng, depth + 1)


def _random_object(rng: random.Random, depth: int = 0) -> dict:
    return {_random_string(rng): _random_value(rng, depth) for _ in range(rng.randint(0, 4))}


def _ws(rng: random.Random) -> str:
    return "".join(rng.choice(" \t\n\r") for _ in range(rng.choice([0, 0, 0, 1, 2])))


def _spelled_number(rng: random.Random) -> str:
    """Number spellings json.dumps never writes: 'E', explicit '+', leading '-0', long fractions."""
    text = rng.choice(["", "-"]) + rng.choice(["0", str(rng.randint(1, 10**6))])
    if rng.random() < 0.5:
        text += "." + str(rng.randint(0, 10**4)).zfill(rng.randint(1, 5))
    if rng.random() < 0.5:
        text += rng.choice("eE") + rng.choice(["", "+", "-"]) + str(rng.randint(0, 400)).zfill(rng.randint(1, 3))
    return text


def _spelled_string(rng: random.Random, s: str) -> str:
    """`s` as a JSON string, each character written raw or with any escape that means it."""
    out = ['"']
    for c in s:
        short = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
        choices = []
        if c in short:
            choices.append(short[c])
        elif c >= " ":
            choices.append(c)
        if c == "/":
            choices.append("\\/")
        if ord(c) <= 0xFFFF:
            hexa = f"{ord(c):04x}"
            choices += ["\\u" + hexa, "\\u" + hexa.upper()]
        else:  # a surrogate pair
            v = ord(c) - 0x10000
            choices.append(f"\\u{0xD800 + (v >> 10):04X}\\u{0xDC00 + (v & 0x3FF):04x}")
        out.append(rng.choice(choices))
    out.append('"')
    return "".join(out)


def _spelled(rng: random.Random, value) -> str:
    """A hand-rolled serializer with random whitespace between every token and varied spellings."""
    if isinstance(value, dict):
        if not value:
            return "{" + _ws(rng) + "}"
        items = [_ws(rng) + _spelled_string(rng, k) + _ws(rng) + ":" + _ws(rng) + _spelled(rng, v) + _ws(rng)
                 for k, v in value.items()]
        return "{" + ",".join(items) + "}"
    if isinstance(value, list):
        if not value:
            return "[" + _ws(rng) + "]"
        return "[" + ",".join(_ws(rng) + _spelled(rng, v) + _ws(rng) for v in value) + "]"
    if isinstance(value, str):
        return _spelled_string(rng, value)
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return _spelled_number(rng) if rng.random() < 0.5 else json.dumps(value)


def _random_documents(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for i in range(count):
        obj = _random_object(rng)
        if i % 2:
            doc = _spelled(rng, obj)
        else:
            indent = rng.choice([None, None, 0, 1, 2, "\t"])
            separators = rng.choice([None, (",", ":"), (", ", ": "), (" ,", " : ")])
            doc = json.dumps(obj, indent=indent, separators=separators, ensure_ascii=rng.random() < 0.5)
        doc = _ws(rng) + doc + _ws(rng)
        _loads_object(doc)  # the generator itself must only write valid documents
        docs.append(doc)
    return docs


DOCS = _random_documents(seed=1234, count=300)


def _root_closed_at(doc: str) -> int:
    """Length of the shortest prefix of `doc` that is a complete object: up to its last '}'."""
    return doc.rindex("}") + 1


def test_every_prefix_char_by_char_with_valid_closing():
    for doc in DOCS:
        state = JsonPrefix()
        end = _root_closed_at(doc)
        for i, c in enumerate(doc):
            prefix = doc[:i]
            closing = state.closing()
            assert state.complete == (i >= end), (doc, prefix)
            assert (closing == "") == state.complete, (doc, prefix)
            assert isinstance(_loads_object(prefix + closing), dict), (doc, prefix, closing)
            assert state.accepts(c), (doc, prefix, c)
            assert state.feed(c), (doc, prefix, c)
        assert state.complete, doc
        assert state.closing() == ""
        assert _loads_object(doc) == json.loads(doc)


def test_every_prefix_in_random_chunks():
    rng = random.Random(99)
    for doc in DOCS:
        state = JsonPrefix()
        i = 0
        while i < len(doc):
            j = min(len(doc), i + rng.choice([1, 2, 3, 5, 8, 13]))
            assert state.accepts(doc[i:j]), (doc, doc[:i], doc[i:j])
            assert state.feed(doc[i:j]), (doc, doc[:i], doc[i:j])
            i = j
            assert state.complete == (i >= _root_closed_at(doc)), (doc, doc[:i])
            _loads_object(doc[:i] + state.closing())
        assert state.complete
        # The whole document as one token, too.
        whole = JsonPrefix()
        assert whole.feed(doc) and whole.complete


def test_mutated_documents_agree_with_json_module():
    """Single-character edits of valid documents: whatever the automaton accepts must still be completable, and
    every edit that is itself a valid object must be accepted as complete."""
    rng = random.Random(7)
    alphabet = '{}[]":,0123456789-+.eEtrufalsn \\xu\t'
    checked_valid = 0
    for doc in DOCS[:150]:
        for _ in range(6):
            k = rng.randrange(len(doc))
            edit = rng.randrange(3)
            if edit == 0:
                mutated = doc[:k] + doc[k + 1:]
            elif edit == 1:
                mutated = doc[:k] + rng.choice(alphabet) + doc[k:]
            else:
                mutated = doc[:k] + rng.choice(alphabet) + doc[k + 1:]
            bad = _first_rejected(mutated)
            accepted = mutated if bad is None else mutated[:bad]
            state = _fed(accepted)
            _loads_object(accepted + state.closing())
            if _is_object(mutated):
                checked_valid += 1
                assert bad is None and state.complete, mutated
            elif bad is None:
                assert not state.complete, mutated
            # One feed of the whole text agrees with char-by-char feeding.
            assert JsonPrefix().feed(mutated) == (bad is None), mutated
    assert checked_valid > 20  # the edits did produce valid documents to check completeness on


# ---------------------------------------------------------------- rejections

@pytest.mark.parametrize("text, bad", [
    ("[1]", "["),
    ('{"a" 1}', "1"),
    ('{"a":01}', "1"),
    ('{"a":1.}', "}"),
    ('{"a":tru}', "}"),
    ("{,}", ","),
    ('{"a":1,}', "}"),
    ('{"a":"\x01"}', "\x01"),
    ('{"a":"\\q"}', "q"),
    ("{a:1}", "a"),
    ('{"a":1}x', "x"),
    ('{"a":--1}', "-@6"),
    ('{"a":1e}', "}"),
    # more of the grammar
    ('{"a":1}}', "}@7"),
    ('{"a":1} {', "{@8"),
    ('{"a":[1,]}', "]"),
    ('{"a":[,1]}', ","),
    ('{"a":}', "}"),
    ('{"a"::1}', ":@5"),
    ('{"a":1 2}', "2"),
    ('{"a":1,,"b":2}', ",@7"),
    ('{"a":"x"1}', "1"),
    ('{"a":[1}', "}"),
    ('{"a":{]}', "]"),
    ('{"a":[1]]}', "]@8"),
    ('{1:2}', "1"),
    ('{"a":.5}', "."),
    ('{"a":+1}', "+"),
    ('{"a":1.e5}', "e"),
    ('{"a":1e+}', "}"),
    ('{"a":1E-+2}', "+"),
    ('{"a":-01}', "1"),
    ('{"a":00}', "0@6"),
    ('{"a":1.2.3}', ".@8"),
    ('{"a":1e2.5}', "."),
    ('{"a":0x1}', "x"),
    ('{"a":-}', "}"),
    ('{"a":nul l}', " "),
    ('{"a":True}', "T"),
    ('{"a":nulll}', "l@9"),
    ('{"a":NaN}', "N"),
    ('{"a":Infinity}', "I"),
    ('{"a":-Infinity}', "I"),
    ('{"a":"\t"}', "\t"),
    ('{"a":"\n"}', "\n"),
    ('{"a\x1f":1}', "\x1f"),
    ('{"a":"\\u12g4"}', "g"),
    ('{"a":"\\U0041"}', "U"),
    ('{"a":"\\x41"}', "x"),
    ('{"a":\'b\'}', "'"),
    ('\ufeff{}', "\ufeff"),
    ('\f{}', "\f"),
    ('{\u00a0}', "\u00a0"),
    ('"a"', '"'),
    ("1", "1"),
    ("{}{}", "{@2"),
])
def test_rejected_at_the_first_bad_character(text, bad):
    char, _, at = bad.partition("@")
    index = int(at) if at else text.index(char)
    assert text[index] == char
    assert not _is_object(text)  # the case itself is invalid JSON (or not an object)
    assert _first_rejected(text) == index
    # The accepted part is a valid prefix, and the same verdict comes from one call on the whole text.
    state = _fed(text[:index])
    _loads_object(text[:index] + state.closing())
    assert not state.accepts(text[index:])
    assert not JsonPrefix().accepts(text) and not JsonPrefix().feed(text)


# ---------------------------------------------------------------- state handling

_PROBES = ['1', '}', ']', ',', ':', '"', '"k"', '0}', ' ', '[', '{', 'e', '.', 'u', '0000', 'rue', '\\', 'x', '-']


def _same_state(a: JsonPrefix, b: JsonPrefix) -> bool:
    return (a.complete == b.complete and a.closing() == b.closing()
            and all(a.accepts(p) == b.accepts(p) for p in _PROBES))


def test_rejected_feed_leaves_state_unchanged():
    for prefix, rejected, then in [
        ('{"a":', "1}x", "1}"),
        ('{"a":', "[[1]]]", "[2]}"),          # pushes and pops before the bad char must all be undone
        ('{"a":[', "{}]]]", "{}]}"),
        ('{"a":"x', '"}}', '"}'),
        ('{"a":tr', "uex", "ue}"),
        ('{"a":1', ".}", "}"),
        ('{"a":"\\u0', "0g", "041\"}"),
        ("", "[", "{}"),
        ('{"a":1}', " x", " "),
    ]:
        state = _fed(prefix)
        before = state.copy()
        assert not state.feed(rejected)
        assert _same_state(state, before)
        assert state.feed(then), (prefix, then)
        assert _loads_object(prefix + then + state.closing()) is not None
        assert state.complete == _is_object(prefix + then)


def test_accepts_never_changes_state():
    state = _fed('{"a": [1, {"b": "c')
    before = state.copy()
    for probe in _PROBES + ['"}]}', '"}', '", "d": 2}], "e": 1}', 'x', '\x00']:
        state.accepts(probe)
        assert _same_state(state, before), probe
    assert state.closing() == '"}]}'
    assert not state.complete


def test_copy_is_independent():
    a = _fed('{"a": [')
    b = a.copy()
    assert b.feed("1]}") and b.complete
    assert not a.complete and a.closing() == "]}"
    assert a.feed('"s", {"t": null}]') and a.closing() == "}"
    assert b.complete and b.closing() == ""
    c = a.copy()
    assert a.feed("}") and not c.complete and c.feed(', "z": false}')


# ---------------------------------------------------------------- whitespace, completion, closing

def test_whitespace_around_the_root():
    state = JsonPrefix()
    assert state.feed(" \t\r\n ")
    assert not state.complete and state.closing() == "{}"
    assert state.feed('{ "a" :\n1 ,\t"b"\r:[ ] }')
    assert state.complete and state.closing() == ""
    assert state.feed(" \n\t\r") and state.complete and state.closing() == ""
    for after in ["x", "{", "}", ",", "1", "\f", "\u00a0"]:
        assert not state.accepts(after), after
    assert state.accepts("")


def test_empty_text():
    state = JsonPrefix()
    assert state.accepts("") and state.feed("")
    assert not state.complete and state.closing() == "{}"


@pytest.mark.parametrize("prefix, closing", [
    ("", "{}"),
    ("  ", "{}"),
    ("{", "}"),
    ('{"a": [1, "x', '"]}'),
    ('{"a"', ":0}"),
    ('{"a', '":0}'),
    ('{"a":', "0}"),
    ('{"a": 1.', "0}"),
    ('{"a": 1.5', "}"),
    ('{"a": tr', "ue}"),
    ('{"a": f', "alse}"),
    ('{"a": n', "ull}"),
    ('{"a": "\\u00', '00"}'),
    ('{"a\\u0', '000":0}'),
    ('{"a": -', "0}"),
    ('{"a":1e', "0}"),
    ('{"a":1e+', "0}"),
    ('{"a":12', "}"),
    ('{"a": [', "]}"),
    ('{"a": [1,', "0]}"),
    ('{"a": 1,', '"":0}'),
    ('{"a": {', "}}"),
    ('{"a": {"b": [[{"c": null', "}]]}}"),
])
def test_closing_examples(prefix, closing):
    state = _fed(prefix)
    assert state.closing() == closing
    _loads_object(prefix + closing)
    assert state.feed(closing) and state.complete


@pytest.mark.parametrize("prefix", [
    "", "{", '{"', '{"a', '{"a"', '{"a":', '{"a":-', '{"a":1.', '{"a":1e', '{"a":1e-', '{"a":t', '{"a":"',
    '{"a":"\\', '{"a":"\\u', '{"a":"\\u0', '{"a":[', '{"a":[1,', '{"a":1,', '{"a":{"b":[', '{"a":{"', '{"a":1',
])
def test_closing_is_shortest(prefix):
    """No shorter text completes the document: every shorter tail over the characters closings are made of
    fails (exhaustively up to 4 characters, which keeps the search at 10**4 tails per prefix)."""
    closing = _fed(prefix).closing()
    alphabet = '{}[]":,0n\\'
    for length in range(min(len(closing), 5)):
        for tail in itertools.product(alphabet, repeat=length):
            assert not _is_object(prefix + "".join(tail)), (prefix, tail, closing)


def test_module_is_pure_python():
    """The server imports this on its request path; it must not drag in torch or anything heavy."""
    code = (f"import importlib.util, sys; s = importlib.util.spec_from_file_location('m', {str(_PATH)!r}); "
            "m = importlib.util.module_from_spec(s); s.loader.exec_module(m); "
            "print(sorted(k for k in sys.modules if k.split('.')[0] in {'torch', 'numpy', 'lmsmith'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
