"""JSON mode: constrained decoding for the OpenAI API's `response_format: {"type": "json_object"}`.

`JsonPrefix` tracks, character by character, whether the text generated so far is still a valid
prefix of one JSON document whose root is an object (the same language as llama.cpp's json grammar,
`root ::= object`). The server keeps one per row: before it accepts a sampled token it asks
`accepts(token_text)` (trying the next candidates when the answer is no), then `feed(token_text)`.
When the token budget runs low it forces `closing()`, the shortest text that completes the document,
and `complete` says when the document is finished (so an end token may be allowed).

Pure Python with no dependencies (in particular no torch), so it can be tested and used on its own.
"""

from __future__ import annotations

import re

__all__ = ["JsonPrefix"]

# Modes: where in the grammar the next character lands. Small ints keep the hot loop a chain of int
# comparisons; the names say what the automaton is waiting for.
_START = 0        # before the root '{' (whitespace allowed)
_OBJ_FIRST = 1    # just after '{': a key or '}'
_OBJ_KEY = 2      # after ',' in an object: a key (no '}', so no trailing comma)
_COLON = 3        # after a key: ':'
_VALUE = 4        # after ':' or after ',' in an array: a value
_ARR_FIRST = 5    # just after '[': a value or ']'
_AFTER = 6        # after a value inside a container: ',' or the container's closer
_STR = 7          # inside a string (key or value, see JsonPrefix._key)
_ESC = 8          # after a backslash in a string
_HEX0 = 9         # after '\u': modes 9..12 have read 0..3 of the 4 hex digits
_HEX3 = 12
_MINUS = 13       # number: '-' read, a digit must follow
_ZERO = 14        # number: integer part is '0' (complete; no more integer digits)
_INT = 15         # number: integer part [1-9][0-9]* (complete)
_DOT = 16         # number: '.' read, a digit must follow
_FRAC = 17        # number: fraction digits (complete)
_EXP_MARK = 18    # number: 'e'/'E' read, a sign or digit must follow
_EXP_SIGN = 19    # number: exponent sign read, a digit must follow
_EXP = 20         # number: exponent digits (complete)
_LIT = 21         # inside true/false/null (JsonPrefix._lit holds the characters still due)
_DONE = 22        # the root object has closed: only whitespace

_WS = frozenset(" \t\n\r")
_DIGITS = frozenset("0123456789")
_HEX = frozenset("0123456789abcdefABCDEF")
_ESCAPES = frozenset('"\\/bfnrt')
_LITERALS = {"t": "rue", "f": "alse", "n": "ull"}
# Groups of modes that share a branch (frozensets of ints: one hash lookup, no tuple built per character).
_WANTS_VALUE = frozenset((_VALUE, _ARR_FIRST))
_WANTS_KEY = frozenset((_OBJ_FIRST, _OBJ_KEY))
_INTEGER = frozenset((_ZERO, _INT))                # a '.' may follow
_MANTISSA = frozenset((_ZERO, _INT, _FRAC))        # an 'e'/'E' may follow
_WANTS_EXP_DIGIT = frozenset((_EXP_MARK, _EXP_SIGN))
# Number modes in which the number may already be finished: any other character ends it there.
_NUM_COMPLETE = frozenset((_ZERO, _INT, _FRAC, _EXP))
# What each number mode still needs to become a valid number (the complete ones need nothing).
_NUM_CLOSING = {_MINUS: "0", _ZERO: "", _INT: "", _DOT: "0", _FRAC: "", _EXP_MARK: "0", _EXP_SIGN: "0", _EXP: ""}

# Most of a token's characters inside a string are ordinary; skipping a run of them in one C-level
# match keeps long string tokens cheap. Compiled once here, never per call.
_string_run = re.compile(r'[^"\\\x00-\x1f]+').match


class JsonPrefix:
    """A character-level pushdown automaton over prefixes of one JSON object (RFC 8259).

    Leading whitespace is allowed before the root '{'; after the root object closes, only whitespace
    is accepted (and `complete` is True).

    The state is a mode (a small int), whether the current string is an object key, the rest of a
    literal being spelled, and the stack of open containers as a str of '{' and '['. An immutable
    stack makes `copy()` O(1) and lets `feed` / `accepts` try a text without undoing anything when
    it is rejected; pushes and pops copy it, but they are rare and the depth is small.

        state = JsonPrefix()
        state.feed('{"a": [1, "x')   # True
        state.accepts('"}')           # False: the array must close before the object
        state.closing()               # '"]}'
    """

    __slots__ = ("_mode", "_key", "_lit", "_stack")

    def __init__(self) -> None:
        self._mode = _START
        self._key = False
        self._lit = ""
        self._stack = ""

    def copy(self) -> JsonPrefix:
        """An independent automaton in the same state (O(1): every field is immutable)."""
        other = JsonPrefix.__new__(JsonPrefix)
        other._mode, other._key, other._lit, other._stack = self._mode, self._key, self._lit, self._stack
        return other

    def accepts(self, text: str) -> bool:
        """Whether the output followed by `text` would still be a valid prefix. The state is unchanged."""
        return self._run(text) is not None

    def feed(self, text: str) -> bool:
        """Advance by `text` and return True if it keeps a valid prefix; otherwise return False and leave
        the state as it was (a token is taken whole or not at all)."""
        state = self._run(text)
        if state is None:
            return False
        self._mode, self._key, self._lit, self._stack = state
        return True

    @property
    def complete(self) -> bool:
        """The root object has been closed: the output is a complete JSON object (plus whitespace)."""
        return self._mode == _DONE

    def closing(self) -> str:
        """The shortest text that, appended, makes the whole output one complete JSON object ("" when complete).

        Open strings are closed, half-written escapes, numbers and literals are finished with the fewest
        characters ('0', a hex digit, the rest of the literal), a key without a value gets ':0', a
        dangling ',' in an object gets '"":0', and then every open container is closed innermost first.
        """
        mode = self._mode
        if mode == _DONE:
            return ""
        if mode == _START:
            return "{}"
        if mode == _STR:
            head = '":0' if self._key else '"'
        elif mode == _ESC:
            head = 'n":0' if self._key else 'n"'  # '\n' is as short as any escape
        elif _HEX0 <= mode <= _HEX3:
            head = "0" * (_HEX3 + 1 - mode) + ('":0' if self._key else '"')
        elif mode == _COLON:
            head = ":0"
        elif mode == _VALUE:
            head = "0"
        elif mode == _OBJ_KEY:
            head = '"":0'
        elif mode == _LIT:
            head = self._lit
        elif mode in _NUM_CLOSING:
            head = _NUM_CLOSING[mode]
        else:  # _OBJ_FIRST, _ARR_FIRST, _AFTER: the innermost container can close right away
            head = ""
        return head + "".join("}" if c == "{" else "]" for c in reversed(self._stack))

    def __repr__(self) -> str:
        return f"JsonPrefix(mode={self._mode}, key={self._key}, lit={self._lit!r}, stack={self._stack!r})"

    def _run(self, text: str) -> tuple[int, bool, str, str] | None:
        """The state after `text`, or None at the first character that cannot continue a valid prefix.

        Works on locals only, so a rejected text leaves `self` untouched. The branches are ordered by
        how often a generated token hits them (strings first, then the structure between values).
        """
        mode, key, lit, stack = self._mode, self._key, self._lit, self._stack
        i, n = 0, len(text)
        while i < n:
            c = text[i]
            if mode == _STR:
                if c == '"':
                    mode = _COLON if key else _AFTER
                elif c == "\\":
                    mode = _ESC
                elif c < " ":  # RFC 8259: U+0000..U+001F must be escaped inside strings
                    return None
                else:
                    i = _string_run(text, i).end()
                    continue
            elif mode == _AFTER:
                if c == ",":
                    mode = _OBJ_KEY if stack[-1] == "{" else _VALUE
                elif c == "}" or c == "]":
                    if stack[-1] != ("{" if c == "}" else "["):
                        return None
                    stack = stack[:-1]
                    mode = _AFTER if stack else _DONE
                elif c not in _WS:
                    return None
            elif mode in _WANTS_VALUE:
                if c in _WS:
                    pass
                elif c == '"':
                    mode, key = _STR, False
                elif c in _DIGITS:
                    mode = _ZERO if c == "0" else _INT
                elif c == "-":
                    mode = _MINUS
                elif c == "{":
                    stack += "{"
                    mode = _OBJ_FIRST
                elif c == "[":
                    stack += "["
                    mode = _ARR_FIRST
                elif c in _LITERALS:
                    mode, lit = _LIT, _LITERALS[c]
                elif c == "]" and mode == _ARR_FIRST:
                    stack = stack[:-1]
                    mode = _AFTER  # the root is an object, so an array is never the last container
                else:
                    return None
            elif mode >= _MINUS and mode <= _EXP:
                # A number has no terminator of its own: it ends at the first character that cannot extend
                # it, which is then handled as if it came after the value.
                if c in _DIGITS:
                    if mode == _MINUS:
                        mode = _ZERO if c == "0" else _INT
                    elif mode == _ZERO:
                        return None  # no leading zeros: '01'
                    elif mode == _DOT:
                        mode = _FRAC
                    elif mode in _WANTS_EXP_DIGIT:
                        mode = _EXP
                    # _INT, _FRAC, _EXP: more digits of the same part
                elif c == "." and mode in _INTEGER:
                    mode = _DOT
                elif (c == "e" or c == "E") and mode in _MANTISSA:
                    mode = _EXP_MARK
                elif (c == "+" or c == "-") and mode == _EXP_MARK:
                    mode = _EXP_SIGN
                elif mode in _NUM_COMPLETE:
                    mode = _AFTER
                    continue  # reread c after the number
                else:
                    return None  # '-', '1.', '1e' and '1e+' need a digit
            elif mode == _COLON:
                if c == ":":
                    mode = _VALUE
                elif c not in _WS:
                    return None
            elif mode in _WANTS_KEY:
                if c == '"':
                    mode, key = _STR, True
                elif c == "}" and mode == _OBJ_FIRST:
                    stack = stack[:-1]
                    mode = _AFTER if stack else _DONE
                elif c not in _WS:
                    return None  # keys are strings; no '{,' and no trailing ','
            elif mode == _ESC:
                if c == "u":
                    mode = _HEX0
                elif c in _ESCAPES:
                    mode = _STR
                else:
                    return None
            elif mode <= _HEX3 and mode >= _HEX0:
                if c not in _HEX:
                    return None
                mode = _STR if mode == _HEX3 else mode + 1
            elif mode == _LIT:
                if c != lit[0]:
                    return None
                lit = lit[1:]
                if not lit:
                    mode = _AFTER
            elif mode == _START:
                if c == "{":
                    stack = "{"
                    mode = _OBJ_FIRST
                elif c not in _WS:
                    return None  # the root must be an object
            else:  # _DONE
                if c not in _WS:
                    return None
            i += 1
        return mode, key, lit, stack
