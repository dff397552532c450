"""An incremental Server-Sent Events parser (sans-IO), per the WHATWG event-stream format.

Bytes go in however the network split them (inside events, lines, or multi-byte characters);
complete events come out as ``(event, data)`` byte pairs. Lines end in LF, CRLF or a lone CR;
``data:`` lines of one event are joined with LF; comments and ``id:``/``retry:`` fields are ignored
because nothing here needs them; an event the stream ends without terminating is never returned,
as the spec says. Only the bytes of the current unfinished line or event are held, and at most
``MAX_HELD`` of them: a longer line or event (a broken or hostile stream) is skipped up to the
next blank line, so memory stays bounded whatever the upstream sends. The pieces of a long line
are kept as they came and joined once, when the line ends (joining them at every piece would
cost time quadratic in the line's length).
"""

from __future__ import annotations

Event = tuple[bytes, bytes]

MAX_HELD = 16 * 1024 * 1024  # larger than any real event (a Responses terminal event with images)


class SSEParser:
    __slots__ = ("_buf", "_held", "_held_size", "_event", "_data", "_size", "_skipping")

    def __init__(self) -> None:
        self._buf = b""
        self._held: list[bytes] = []  # pieces of the unfinished line after _buf: no line end
        self._held_size = 0
        self._event = b""
        self._data: list[bytes] = []
        self._size = 0  # bytes in _data
        self._skipping = False  # an oversized line or event: ignored up to the next blank line

    def feed(self, chunk: bytes) -> list[Event]:
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
                self._buf, self._held, self._held_size = chunk[-1:], [], 0
                self._data = []
                self._skipping = True
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
        line = lines.pop()
        rest = line + held
        if len(rest) > MAX_HELD:
            rest = line[:1] + held  # (not blank: its bytes no longer matter)
            self._data = []
            self._skipping = True
        self._buf = rest
        events: list[Event] = []
        for line in lines:
            if not line:
                if self._data and not self._skipping:
                    events.append((self._event, b"\n".join(self._data)))
                self._event = b""
                self._data = []
                self._size = 0
                self._skipping = False
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
                if self._size > MAX_HELD:
                    self._data = []
                    self._skipping = True
                    continue
                self._data.append(value)
            elif name == b"event":
                self._event = value
        return events

    def idle(self) -> bool:
        """True between events: nothing of an unfinished line or event is held."""
        return (
            not self._buf
            and not self._held
            and not self._data
            and not self._event
            and not self._skipping
        )

    def end(self) -> list[Event]:
        """End of stream: a CR held back as a possible half of CRLF was a line end after all."""
        return self.feed(b"\n") if self._buf.endswith(b"\r") else []
