"""The skeleton of a JSON document of any size, read incrementally in bounded memory (sans-IO).

A meter needs a few small values of an answer (its usage, its model), wherever they are in it,
and none of its big ones (embeddings, images, generated text). ``Skeleton`` is fed the document's
bytes however the network split them and builds, as they pass, a smaller document of the same
shape that keeps every small value where it was:

- the document and the containers in it down to ``DEPTH`` levels (the document is level 1) are
  taken apart member by member and element by element;
- every other value (a string, a number, a literal, or a deeper container) is copied as it is
  when its text is at most ``VALUE_MAX`` bytes, else replaced by ``null`` (a key by ``""``);
- an array taken apart keeps its first element and its latest ones: when the skeleton has grown
  past ``BUDGET`` bytes, each new element replaces all of them but the first (the usage of a
  Gemini JSON-array stream is in its last element, its model in the first);
- whitespace between tokens is left out.

So ``{"data": [<33 MB of embeddings>], "model": "m", "usage": {...}}`` becomes
``{"data":[{...},{...}],"model":"m","usage":{...}}``, and a document shorter than ``BUDGET``
whose values are all under ``VALUE_MAX`` is kept whole. What is held is the skeleton (at most
``HARD`` bytes) and the state of one unfinished token; the input is scanned with regular
expressions (C speed: bytes inside strings and deep containers are never looked at one by one
in Python). A document that is not JSON, too deep to take apart, past ``HARD`` or past
``MAX_STEPS`` tokens at the levels taken apart (a hostile shape: millions of tiny values) gives
no skeleton: ``result`` is then None, and the caller keeps a bounded tail instead.
"""

from __future__ import annotations

import re

VALUE_MAX = 64 * 1024  # bytes of one value copied as it is (usage objects are well under 1 KiB)
BUDGET = 256 * 1024  # past this, arrays taken apart keep only their first and latest elements
HARD = 1024 * 1024  # past this the document has no skeleton
DEPTH = 3  # levels taken apart: the document, its members, and theirs (response.usage, ...)
MAX_STEPS = 1 << 20  # tokens looked at one by one (about half a second of CPU): hostile past that

_NONWS = re.compile(rb"[^ \t\r\n]")
_DEEP_TOKEN = re.compile(rb'[\[\]{}"]')
_SCALAR_END = re.compile(rb"[ \t\r\n,\]}:]")
_SCALAR_START = frozenset(b"-0123456789tfn")

# modes
_VALUE, _KEY, _COLON, _AFTER, _OPAQUE, _DONE, _FAIL = range(7)
# kinds of an opaque value
_STR, _SCALAR, _CONTAINER = range(3)


class _Frame:
    """A container being taken apart."""

    __slots__ = ("obj", "count", "second")

    def __init__(self, obj: bool) -> None:
        self.obj = obj
        self.count = 0  # members or elements begun
        self.second = 0  # offset in the skeleton where the second element begins (arrays)


class Skeleton:
    __slots__ = (
        "_out",
        "_stack",
        "_mode",
        "_kind",
        "_key",
        "_depth",
        "_in_str",
        "_esc",
        "_start",
        "_size",
        "_keep",
        "_steps",
    )

    def __init__(self) -> None:
        self._out = bytearray()
        self._stack: list[_Frame] = []
        self._mode = _VALUE
        # The opaque value being read: its kind, whether it is a key, its container depth,
        # whether the scan is inside one of its strings, an escape cut by the chunk's end, its
        # offset in the skeleton, bytes read, and whether it is still copied.
        self._kind = _STR
        self._key = False
        self._depth = 0
        self._in_str = False
        self._esc = False
        self._start = 0
        self._size = 0
        self._keep = True
        self._steps = 0

    @property
    def failed(self) -> bool:
        return self._mode == _FAIL

    def feed(self, data: bytes) -> None:
        if self._mode == _FAIL:
            return
        self._run(data)
        if len(self._out) > HARD or self._steps > MAX_STEPS:
            self._fail()

    def result(self) -> bytes | None:
        """The skeleton of a complete document, else None."""
        if self._mode == _OPAQUE and self._kind == _SCALAR and not self._stack:
            self._end_opaque()  # a document that is one number ends with its bytes
        return bytes(self._out) if self._mode == _DONE else None

    def _fail(self) -> None:
        self._mode = _FAIL
        self._out = bytearray()
        self._stack = []

    def _run(self, data: bytes) -> None:
        n = len(data)
        i = 0
        while i < n:
            mode = self._mode
            if mode == _OPAQUE:
                i = self._opaque(data, i)
                continue
            m = _NONWS.search(data, i)
            if m is None:
                return
            i = m.start()
            self._steps += 1
            c = data[i]
            if mode == _VALUE:
                stack = self._stack
                if stack and not stack[-1].obj:
                    if c == 93 and stack[-1].count == 0:  # "]": an empty array
                        self._close(c)
                        i += 1
                        continue
                    self._item(stack[-1])
                if c in b"{[" and len(stack) < DEPTH:
                    self._out.append(c)
                    stack.append(_Frame(c == 123))
                    self._mode = _KEY if c == 123 else _VALUE
                    i += 1
                elif c == 34 or c in b"{[" or c in _SCALAR_START:
                    i = self._begin(data, i, key=False)
                else:
                    self._fail()
                    return
            elif mode == _KEY:
                if c == 34:
                    self._item(self._stack[-1])
                    i = self._begin(data, i, key=True)
                elif c == 125 and self._stack[-1].count == 0:  # "}": an empty object
                    self._close(c)
                    i += 1
                else:
                    self._fail()
                    return
            elif mode == _COLON:
                if c != 58:
                    self._fail()
                    return
                self._out.append(c)
                self._mode = _VALUE
                i += 1
            elif mode == _AFTER:
                top = self._stack[-1]
                if c == 44:  # ","
                    self._mode = _KEY if top.obj else _VALUE
                    i += 1
                elif c == (125 if top.obj else 93):
                    self._close(c)
                    i += 1
                else:
                    self._fail()
                    return
            else:  # _DONE (only whitespace may follow) or _FAIL
                self._fail()
                return

    def _item(self, frame: _Frame) -> None:
        """A member or element begins in ``frame``: its comma, or room made for it."""
        out = self._out
        if frame.count:
            if not frame.obj and frame.count >= 2 and len(out) > BUDGET:
                del out[frame.second :]  # [first, <- the new element comes here
            else:
                out.append(44)
                if frame.count == 1:
                    frame.second = len(out)
        frame.count += 1

    def _close(self, c: int) -> None:
        self._out.append(c)
        self._stack.pop()
        self._mode = _AFTER if self._stack else _DONE

    def _begin(self, data: bytes, i: int, key: bool) -> int:
        c = data[i]
        self._mode = _OPAQUE
        self._key = key
        self._start = len(self._out)
        self._size = 0
        self._keep = True
        self._esc = False
        if c == 34:
            self._kind, self._in_str = _STR, True
            return self._copy(data, i, i + 1)
        if c in b"{[":
            self._kind, self._depth, self._in_str = _CONTAINER, 1, False
            return self._copy(data, i, i + 1)
        self._kind = _SCALAR
        return i

    def _copy(self, data: bytes, start: int, end: int) -> int:
        """Bytes ``data[start:end]`` of the opaque value: copied while it stays small."""
        if self._keep:
            self._size += end - start
            if self._size > VALUE_MAX:
                self._keep = False
                del self._out[self._start :]
            else:
                self._out += data[start:end]
        return end

    def _end_opaque(self) -> None:
        if not self._keep:
            self._out += b'""' if self._key else b"null"
        if self._key:
            self._mode = _COLON
        else:
            self._mode = _AFTER if self._stack else _DONE

    def _opaque(self, data: bytes, i: int) -> int:
        """Read on in the opaque value from ``i``; the offset reached."""
        n = len(data)
        if self._kind == _SCALAR:
            m = _SCALAR_END.search(data, i)
            if m is None:
                return self._copy(data, i, n)
            self._copy(data, i, m.start())
            self._end_opaque()
            return m.start()
        while i < n:
            if self._in_str:
                j = i
                if self._esc:
                    j += 1
                    self._esc = False
                    if j >= n:  # (the escaped byte was the chunk's last)
                        return self._copy(data, i, n)
                end = _string_end(data, j)
                if end < 0:  # the string goes on in the next chunk
                    self._esc = _escapes(data, n, j) % 2 == 1
                    return self._copy(data, i, n)
                i = self._copy(data, i, end)
                self._in_str = False
                if self._kind == _STR:
                    self._end_opaque()
                    return i
                continue
            m = _DEEP_TOKEN.search(data, i)
            if m is None:
                return self._copy(data, i, n)
            self._steps += 1
            j = m.end()
            c = data[j - 1]
            if c == 34:
                self._in_str = True
                i = self._copy(data, i, j)
            elif c in b"{[":
                self._depth += 1
                i = self._copy(data, i, j)
            else:
                self._depth -= 1
                i = self._copy(data, i, j)
                if self._depth == 0:
                    self._end_opaque()
                    return i
        return i


def _escapes(data: bytes, end: int, start: int) -> int:
    """How many backslashes come right before ``end`` (not before ``start``)."""
    k = end
    while k > start and data[k - 1] == 92:
        k -= 1
    return end - k


def _string_end(data: bytes, i: int) -> int:
    """The offset after the quote that closes the string ``data[i:]`` is in, or -1 when it
    goes on past the chunk. A quote is found in C (``bytes.find``); one after an odd run of
    backslashes is escaped (the run is counted from ``i``: a backslash before ``i`` escaped
    what came before it)."""
    while True:
        q = data.find(b'"', i)
        if q < 0:
            return -1
        if _escapes(data, q, i) % 2 == 0:
            return q + 1
        i = q + 1
