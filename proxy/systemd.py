"""sd_notify without libsystemd: a datagram to ``$NOTIFY_SOCKET``.

``notify("READY=1")`` after the listener is bound and the store is open, ``notify("STOPPING=1")``
when draining starts, and ``watchdog()`` — a task that sends ``WATCHDOG=1`` from the event loop
every half ``WatchdogSec`` — so systemd kills and restarts a daemon whose loop has frozen. Outside
systemd (no ``NOTIFY_SOCKET``) all of it does nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(message: str) -> bool:
    """Send one notification; False when not under systemd or the socket refuses it."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.warning("sd_notify %r failed: %s", message, exc)
        return False
    return True


def watchdog_interval() -> float | None:
    """Half of systemd's WatchdogSec for this process, or None when there is no watchdog."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    return int(usec) / 1e6 / 2


async def watchdog(interval: float) -> None:
    """Ping systemd from the event loop: if the loop freezes, the pings stop."""
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)
