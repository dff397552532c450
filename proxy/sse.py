"""An incremental Server-Sent Events parser (sans-IO), per the WHATWG event-stream format.

Bytes go in however the network split them (inside events, lines, or multi-byte characters);
complete events come out as ``(event, data)`` byte pairs. Lines end in LF, CRLF or a lone CR;
``data:`` lines of one event are joined with LF; comments and ``id:``/``retry:`` fields are ignored
because nothing here needs them; an event the stream ends without terminating is never returned,
as the spec says. The pieces of a long line are kept as they came and joined once, when the line
ends (joining them at every piece would cost time quadratic in the line's length).

Memory stays flat whatever the upstream sends: at most ``MAX_HELD`` bytes of an event are held.
The data of a larger one (a Responses terminal event that carries its images, a Gemini chunk with
an inline image: real, and tens of MB) is read as it passes into its JSON skeleton
(``proxy.skeleton``: its small values, the usage among them, wherever they are), and the event
comes out with that skeleton as its data (an event whose data is not JSON is then dropped). A
longer line that is not a data line (a broken or hostile stream) is skipped up to the next blank
line, its event with it.
"""

from __future__ import annotations

import re

from .skeleton import BUDGET, Skeleton

Event = tuple[bytes, bytes]

MAX_HELD = BUDGET  # bytes of an event held as they came; a larger one is read into its skeleton
_LINE_END = re.compile(rb"[\r\n]")


class SSEParser:
    __slots__ = (
        "_buf",
        "_held",
        "_held_size",
        "_event",
        "_data",
        "_size",
        "_skipping",
        "_skeleton",
        "_streaming",
    )

    def __init__(self) -> None:
        self._buf = b""
        self._held: list[bytes] = []  # pieces of the unfinished line after _buf: no line end
        self._held_size = 0
        self._event = b""
        self._data: list[bytes] = []
        self._size = 0  # bytes in _data
        self._skipping = False  # an oversized line or event: ignored up to the next blank line
        # The current event's data past MAX_HELD, and whether the current line is a data line
        # whose bytes go straight into it.
        self._skeleton: Skeleton | None = None
        self._streaming = False

    def feed(self, chunk: bytes) -> list[Event]:
        if self._streaming:
            assert self._skeleton is not None
            m = _LINE_END.search(chunk)
            if m is None:
                self._skeleton.feed(chunk)
                return []
            self._skeleton.feed(chunk[: m.start()])
            self._streaming = False
            # The line's end is read as the end of an empty data line: one more LF in the
            # skeleton's input, whitespace to JSON.
            self._buf = b"data:"
            chunk = chunk[m.start() :]
        if b"\n" not in chunk and b"\r" not in chunk and not self._buf.endswith(b"\r"):
            # The chunk only continues the current line: hold it (or, inside a skipped line,
            # only its last byte: the line is not blank, and no more of it matters).
            if self._skipping:
                if chunk:
                    self._buf, self._held, self._held_size = chunk[-1:], [], 0
                return []
            self._held.append(chunk)
            self._held_size += len(chunk)
            if len(self._buf) + self._held_size > MAX_HELD:
                line = self._buf + b"".join(self._held)
                self._held, self._held_size = [], 0
                if line.startswith(b"data:"):
                    self._to_skeleton(line)
                    self._buf, self._streaming = b"", True
                else:
                    self._buf = chunk[-1:]
                    self._skip()
            return []
        if self._held:
            self._buf += b"".join(self._held)
            self._held, self._held_size = [], 0
        buf = self._buf + chunk if self._buf else chunk
        if b"\r" in buf:
            # A CR at the very end may be the first half of a CRLF: wait for the next byte.
            held = b"\r" if buf.endswith(b"\r") else b""
            if held:
                buf = buf[:-1]
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        else:
            held = b""
        lines = buf.split(b"\n")
        last = lines.pop()
        rest = last + held
        self._buf = rest
        events: list[Event] = []
        for line in lines:
            if not line:
                if not self._skipping:
                    if self._skeleton is not None:
                        data = self._skeleton.result()
                        if data is not None:
                            events.append((self._event, data))
                    elif self._data:
                        events.append((self._event, b"\n".join(self._data)))
                self._event = b""
                self._data = []
                self._size = 0
                self._skipping = False
                self._skeleton = None
                continue
            if self._skipping:
                continue
            name, colon, value = line.partition(b":")
            if not name:
                continue  # a comment line
            if value[:1] == b" ":
                value = value[1:]
            if name == b"data":
                self._size += len(value)
                if self._skeleton is not None or self._size > MAX_HELD:
                    self._to_skeleton(line)
                    continue
                self._data.append(value)
            elif name == b"event":
                self._event = value
        if len(rest) > MAX_HELD and not self._skipping:
            if last.startswith(b"data:"):
                # Read on into the skeleton; a CR held back ends the line after all (or its LF
                # follows): the end of an empty data line, as in feed.
                self._to_skeleton(last)
                self._buf = b"data:" + held if held else b""
                self._streaming = not held
            else:
                self._buf = last[:1] + held  # (not blank: its bytes no longer matter)
                self._skip()
        return events

    def _skip(self) -> None:
        self._data = []
        self._skeleton = None
        self._skipping = True

    def _to_skeleton(self, line: bytes) -> None:
        """A data line (``data:...``, all of it or its beginning) of an event too large to hold:
        its value goes into the event's skeleton (with the event's earlier data first)."""
        value = line[5:]
        if value[:1] == b" ":
            value = value[1:]
        skeleton = self._skeleton
        if skeleton is None:
            skeleton = self._skeleton = Skeleton()
            if self._data:
                skeleton.feed(b"\n".join(self._data))
                skeleton.feed(b"\n")
                self._data = []
        else:
            skeleton.feed(b"\n")
        skeleton.feed(value)

    def idle(self) -> bool:
        """True between events: nothing of an unfinished line or event is held."""
        return (
            not self._buf
            and not self._held
            and not self._data
            and not self._event
            and not self._skipping
            and self._skeleton is None
        )

    def end(self) -> list[Event]:
        """End of stream: a CR held back as a possible half of CRLF was a line end after all."""
        return self.feed(b"\n") if self._buf.endswith(b"\r") else []
