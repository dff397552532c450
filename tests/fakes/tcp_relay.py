"""A TCP relay on loopback that makes a healthy server look slow or unreachable.

Put it between the daemons and Redis (``redis://127.0.0.1:<relay.port>``) to inject what a
network does to a connection that stays open:

- ``delay``: seconds each chunk waits before it is passed on, in both directions (order kept:
  a slow link, not a reordering one);
- ``blackhole()``: nothing is passed on any more, in either direction, and nothing is closed.
  Bytes sent meanwhile are lost, as packets are on a link that went dark; a connection made
  meanwhile is accepted (the kernel does that) but hears nothing. The peer only finds out by a
  timeout, which is the point. ``restore()`` passes bytes again (on new connections: one that
  lost bytes is out of step for good, as it would be after a real outage).

Every connection it ever relayed is counted in ``accepted``; ``close()`` ends them all.
"""

from __future__ import annotations

import asyncio
import contextlib


class TcpRelay:
    """Relay 127.0.0.1:``port`` (chosen at ``start``) to ``target_host``:``target_port``."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1", delay: float = 0.0):
        self.target_host = target_host
        self.target_port = target_port
        self.delay = delay
        self.port = 0
        self.accepted = 0
        self.dropped_bytes = 0
        self._open = asyncio.Event()
        self._open.set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Future[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def blackholed(self) -> bool:
        return not self._open.is_set()

    def blackhole(self) -> None:
        """Stop passing bytes on (dropping them), closing nothing."""
        self._open.clear()

    def restore(self) -> None:
        self._open.set()

    async def start(self, port: int = 0) -> TcpRelay:
        """Listen on ``port`` (a free one when 0): until then, connecting to it is refused,
        exactly as to a server that is down."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._writers.add(client_w)
        try:
            server_r, server_w = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            client_w.close()  # the target refuses: so does the relay
            self._writers.discard(client_w)
            return
        self._writers.add(server_w)
        pumps = [
            asyncio.ensure_future(self._pump(client_r, server_w, to_client=False)),
            asyncio.ensure_future(self._pump(server_r, client_w, to_client=True)),
        ]
        self._tasks.update(pumps)
        try:
            # One side closing ends the other once its bytes are passed on (or dropped).
            await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            self._tasks.difference_update(pumps)
            for writer in (client_w, server_w):
                writer.close()
                self._writers.discard(writer)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, to_client: bool
    ) -> None:
        try:
            while chunk := await reader.read(65536):
                if self.delay:
                    await asyncio.sleep(self.delay)
                if self.blackholed:
                    self.dropped_bytes += len(chunk)
                    continue
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            # The end of the stream is passed on too, except to the client while blackholed:
            # it must learn of nothing but by its own timeout. (Its own close still reaches
            # the server, which then closes its side: nothing stays open for long.)
            if not (to_client and self.blackholed):
                with contextlib.suppress(ConnectionError, OSError, RuntimeError):
                    if writer.can_write_eof():
                        writer.write_eof()
