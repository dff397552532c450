"""Strings that clients and providers choose, made safe to label, log, store, ship and print.

A ``model`` is whatever a request body (or a provider's answer) says it is: 2 MiB of text, a
newline that forges a second log line, an ``ESC [`` that moves an operator's cursor, a bidi
override that shows ``gpt-4o`` while meaning something else. ``inert`` is the one bound every such
string passes before it becomes a Prometheus label, a log field, a stored or shipped event field, or
a line on a terminal:

- at most ``limit`` characters (256 unless told), the cut marked by a trailing ``…`` that counts
  toward the limit;
- every character that ``str.isprintable`` rejects is written as a Python-style escape: C0 and C1
  controls (``ESC`` -> ``\\x1b``, ``U+009B`` -> ``\\x9b``), ``DEL`` (``\\x7f``), format characters
  such as bidi overrides and zero-width joiners (``\\u202e``, ``\\u200d``), line and paragraph
  separators (``\\u2028``), lone surrogates, private-use and unassigned code points
  (``\\U000e0001`` above the BMP). An ordinary space stays; any other whitespace is escaped.

The escapes are for reading, not for decoding: a backslash the client sent is kept as it is, so
``\\x1b`` in the output may have been those four characters. An escape is never split by the cut.
A name that is printable and short enough (every real model name) is returned unchanged, and that
check is one ``len`` and one ``str.isprintable``: cheap enough for the hot path.
"""

from __future__ import annotations

LIMIT = 256
CUT = "…"  # U+2026: one character, so a cut value is at most ``limit`` characters too


def inert(value: str, limit: int = LIMIT) -> str:
    """``value`` bounded to ``limit`` characters and with every non-printable character escaped
    (see the module docstring). Raises ValueError for a ``limit`` below 1."""
    if len(value) <= limit and value.isprintable():
        return value
    if limit < 1:
        raise ValueError(f"limit: expected at least 1, got {limit}")
    # Every character gives at least one character of output: what follows the first
    # limit + 1 characters can only be cut off.
    head = value[: limit + 1]
    if head.isprintable():
        return head[: limit - 1] + CUT
    pieces: list[str] = []
    size = 0
    for ch in head:
        piece = ch if ch.isprintable() else escape(ch)
        if size + len(piece) > limit:
            break
        pieces.append(piece)
        size += len(piece)
    else:
        return "".join(pieces)  # all of it fits (head is then the whole value)
    while pieces and size + len(CUT) > limit:
        size -= len(pieces.pop())
    return "".join(pieces) + CUT


def escape(ch: str) -> str:
    """One character as ``\\xNN``, ``\\uNNNN`` or ``\\UNNNNNNNN``."""
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"
