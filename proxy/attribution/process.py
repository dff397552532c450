"""The process on this host that owns a client's connection (Linux), found from /proc.

A client on loopback connected from a socket that some process holds. Three reads name it:

1. ``/proc/net/tcp`` (IPv4) and ``/proc/net/tcp6`` (IPv6, and IPv4-mapped ``::ffff:a.b.c.d``)
   list every TCP socket of this network namespace, one row each::

     sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid timeout inode
      7: 0100007F:89EC 0100007F:EB81 01 00000000:00000000 00:00000000 00000000     0       0 1701153

   Addresses are the kernel's 32-bit words printed in hex in host byte order (``0100007F`` is
   127.0.0.1 on a little-endian machine; IPv6 is four such words), ports big-endian hex. The
   client's socket is the row whose local address is our peer and whose remote address is our
   own address; it gives the socket's ``inode`` and the ``uid`` that created it. A row in
   TIME_WAIT, or one whose inode is 0 (no process holds it any more), names nobody.
2. ``/proc/<pid>/fd/*`` are links, ``socket:[<inode>]`` for a socket: the process whose fd
   directory holds ``socket:[inode]`` owns the connection. Only processes whose ``/proc/<pid>``
   belongs to the socket's uid are read; processes found recently are read first (a client
   opens many connections); this daemon's own directory (thousands of client sockets) last.
   A lookup reads at most ``MAX_DIRS`` fd directories and stops at its deadline.
3. ``/proc/<pid>/exe`` (its file name: ``python3.11``, not the 15-character ``comm``) and
   ``/proc/<pid>/cgroup`` (``unit_from_cgroup``: the container, else the innermost systemd
   ``.service`` or ``.scope``). The fd link is read again afterwards: a pid that exited and was
   reused meanwhile names nobody.

What cannot be found is None, never a guess: a client in another network namespace (no row: a
container with its own network, a remote client), a process this daemon may not read (another
user's, without CAP_SYS_PTRACE / root), one that exited, a lookup over its bounds.

``ProcessFinder`` runs lookups off the event loop, in one dedicated thread, once per connection;
it caches answers by (peer port, local port, inode), so a reused port (a new socket, a new
inode) is looked up again, and bounds the lookups waiting: past ``max_pending`` a lookup is
skipped (None) and counted. Off Linux, or without /proc, every lookup is None.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import re
import socket
import struct
import sys
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..logs import Throttle
from . import Process
from .request import bounded

log = logging.getLogger(__name__)

PROC = "/proc"
# One lookup gives up (None) after this long, or after reading this many fd directories.
DEADLINE = 0.2
MAX_DIRS = 4096
# Pids found recently, whose fd directories are read first.
RECENT_PIDS = 16
# Answers kept, and for how long (seconds): a connection is looked up once, but a process
# that opens many connections gets the same answer for each.
CACHE_SIZE = 1024
CACHE_TTL = 300.0
# Lookups waiting for the thread at most; more at once are skipped (None).
MAX_PENDING = 256

TIME_WAIT = 0x06
_DELETED = " (deleted)"

Address = tuple[Any, ...]  # (host, port) or (host, port, flowinfo, scope_id): a socket address


@dataclass(frozen=True, slots=True)
class SocketRow:
    """One row of /proc/net/tcp{,6}: the addresses (IPv4-mapped IPv6 shown as IPv4), the state
    (``0x01`` established, ``0x06`` TIME_WAIT, ...), the creator's uid, the inode (0: no fd)."""

    local: tuple[str, int]
    remote: tuple[str, int]
    state: int
    uid: int
    inode: int


def _ip(hexed: str) -> str:
    raw = bytes.fromhex(hexed)
    # Each 32-bit word was printed in host byte order.
    packed = b"".join(
        int.from_bytes(raw[i : i + 4], "big").to_bytes(4, sys.byteorder)
        for i in range(0, len(raw), 4)
    )
    addr = ipaddress.ip_address(packed)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def _hex_ip(packed: bytes) -> str:
    return "".join(
        f"{int.from_bytes(packed[i : i + 4], sys.byteorder):08X}" for i in range(0, len(packed), 4)
    )


def parse_row(line: str) -> SocketRow:
    """One row of /proc/net/tcp or /proc/net/tcp6 (not the heading). ValueError when it is
    not one."""
    fields = line.split()
    if len(fields) < 10 or not fields[0].endswith(":"):
        raise ValueError(f"not a /proc/net/tcp row: {line!r}")
    local_ip, local_port = fields[1].split(":")
    remote_ip, remote_port = fields[2].split(":")
    return SocketRow(
        local=(_ip(local_ip), int(local_port, 16)),
        remote=(_ip(remote_ip), int(remote_port, 16)),
        state=int(fields[3], 16),
        uid=int(fields[7]),
        inode=int(fields[9]),
    )


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or ::ffff:127.x.y.z."""
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def _needles(peer: tuple[str, int], local: tuple[str, int]) -> list[tuple[str, str]]:
    """(table, the text that starts the client socket's row after its ``sl:``) for each table
    the client's socket may be in: an IPv4 client in tcp, or in tcp6 when it used an IPv6
    socket to reach an IPv4-mapped address; an IPv6 client in tcp6."""
    a = ipaddress.ip_address(peer[0].split("%", 1)[0])
    b = ipaddress.ip_address(local[0].split("%", 1)[0])
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        a = a.ipv4_mapped
    if isinstance(b, ipaddress.IPv6Address) and b.ipv4_mapped is not None:
        b = b.ipv4_mapped
    ports = f":{peer[1]:04X} ", f":{local[1]:04X} "
    if isinstance(a, ipaddress.IPv4Address) and isinstance(b, ipaddress.IPv4Address):
        mapped_a = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + a.packed)
        mapped_b = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + b.packed)
        return [
            ("tcp", _hex_ip(a.packed) + ports[0] + _hex_ip(b.packed) + ports[1]),
            ("tcp6", _hex_ip(mapped_a.packed) + ports[0] + _hex_ip(mapped_b.packed) + ports[1]),
        ]
    if isinstance(a, ipaddress.IPv6Address) and isinstance(b, ipaddress.IPv6Address):
        return [("tcp6", _hex_ip(a.packed) + ports[0] + _hex_ip(b.packed) + ports[1])]
    return []


def find_socket(
    tables: dict[str, str], peer: tuple[str, int], local: tuple[str, int]
) -> SocketRow | None:
    """The client's socket: the row of ``tables`` (``{"tcp": text, "tcp6": text}``, the files'
    contents) whose local address is ``peer`` and remote address ``local``, held by a process
    (inode not 0, not TIME_WAIT); None when there is none."""
    for table, needle in _needles(peer, local):
        text = tables.get(table, "")
        at = text.find(needle)
        while at >= 0:
            # Only at the start of the local_address column: "<sl>: <needle>".
            if text[at - 2 : at] == ": ":
                end = text.find("\n", at)
                start = text.rfind("\n", 0, at) + 1
                row = parse_row(text[start : end if end >= 0 else len(text)])
                if row.inode and row.state != TIME_WAIT:
                    return row
            at = text.find(needle, at + 1)
    return None


NETLINK_SOCK_DIAG = 4  # linux/netlink.h
SOCK_DIAG_BY_FAMILY = 20  # linux/sock_diag.h
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_NO_COOKIE = struct.pack("=II", 0xFFFFFFFF, 0xFFFFFFFF)  # INET_DIAG_NOCOOKIE


class SockDiag:
    """The client's socket from the kernel by its exact 4-tuple: netlink ``SOCK_DIAG_BY_FAMILY``
    with an ``inet_diag_req_v2`` (what ``ss`` uses), one request and one answer
    (``inet_diag_msg``: state, uid, inode) or ``NLMSG_ERROR`` (no such socket). It costs tens of
    µs whatever the number of sockets; reading /proc/net/tcp costs milliseconds once there are
    hundreds (bench/RESULTS.md, "Process attribution"). Raises OSError when netlink is not
    allowed (a seccomp filter, an emulated kernel); used from one thread at a time."""

    def __init__(self) -> None:
        self.sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG
        )
        self.sock.settimeout(1.0)
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def find(self, peer: tuple[str, int], local: tuple[str, int]) -> SocketRow | None:
        """Like ``find_socket``, asking the kernel (IPv4, then IPv4-mapped IPv6)."""
        a, b = _plain(peer[0]), _plain(local[0])
        if a.version != b.version:
            return None
        if isinstance(a, ipaddress.IPv4Address):
            found = self._query(socket.AF_INET, a.packed, b.packed, peer[1], local[1])
            if found is not None:
                return found
            a, b = _mapped(a), _mapped(b)
        return self._query(socket.AF_INET6, a.packed, b.packed, peer[1], local[1])

    def _query(
        self, family: int, src: bytes, dst: bytes, sport: int, dport: int
    ) -> SocketRow | None:
        req = (
            struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF)  # every state
            + struct.pack("!HH", sport, dport)
            + src.ljust(16, b"\0")
            + dst.ljust(16, b"\0")
            + struct.pack("=I", 0)  # any interface
            + _NO_COOKIE
        )
        self.seq = seq = (self.seq + 1) & 0xFFFFFFFF
        self.sock.send(
            _NLMSGHDR.pack(_NLMSGHDR.size + len(req), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, seq, 0)
            + req
        )
        while True:
            answer = self.sock.recv(8192)
            _, kind, _, got, _ = _NLMSGHDR.unpack_from(answer)
            if got == seq:
                break
        if kind == NLMSG_ERROR or len(answer) < _NLMSGHDR.size + 72:
            return None
        # inet_diag_msg: family, state, timer, retrans (u8 each), the 48-byte sockid, expires,
        # rqueue, wqueue, uid, inode (u32 each)
        state = answer[_NLMSGHDR.size + 1]
        uid, inode = struct.unpack_from("=II", answer, _NLMSGHDR.size + 64)
        if not inode or state == TIME_WAIT:
            return None
        addr = ipaddress.ip_address(src)
        to = ipaddress.ip_address(dst)
        return SocketRow((_shown(addr), sport), (_shown(to), dport), state, uid, inode)


def _plain(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    addr = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _mapped(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + addr.packed)


def _shown(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


# -- cgroups

_HEX64 = r"([0-9a-f]{64})"
_CONTAINERS = [
    (re.compile(rf"docker-{_HEX64}\.scope"), "docker"),
    (re.compile(rf"cri-containerd-{_HEX64}\.scope"), "containerd"),
    (re.compile(rf"crio-{_HEX64}\.scope"), "crio"),
    (re.compile(rf"libpod-{_HEX64}\.scope"), "podman"),
    (re.compile(rf"libpod-{_HEX64}"), "podman"),  # v1: /libpod_parent/libpod-<id>
]
_UNIT = re.compile(r".+\.(service|scope)")
_NOT_UNITS = frozenset({"init.scope", "-.slice"})


def _container(path: str) -> str | None:
    segments = [s for s in path.split("/") if s]
    for i in range(len(segments) - 1, -1, -1):
        seg = segments[i]
        for pattern, runtime in _CONTAINERS:
            if m := pattern.fullmatch(seg):
                return f"{runtime}:{m.group(1)[:12]}"
        if re.fullmatch(_HEX64, seg) and i > 0:
            parent = segments[i - 1]
            if parent == "docker":  # v1 (cgroupfs driver): /docker/<id>
                return f"docker:{seg[:12]}"
            if parent.startswith("pod") and any(s.startswith("kubepods") for s in segments[:i]):
                # kubepods with the cgroupfs driver: /kubepods/<qos>/pod<uid>/<id>
                return f"containerd:{seg[:12]}"
    return None


def _unit(path: str) -> str | None:
    for seg in reversed([s for s in path.split("/") if s]):
        if _UNIT.fullmatch(seg):
            return None if seg in _NOT_UNITS else seg
    return None


def unit_from_cgroup(text: str) -> str | None:
    """The unit of a process from its ``/proc/<pid>/cgroup`` (lines ``id:controllers:path``;
    cgroup v2 is the one line ``0::/path``): a container first (``docker:<12 hex>``,
    ``containerd:``, ``crio:``, ``podman:``), found in any line; else the innermost ``.service``
    or ``.scope`` of the v2 path, else of the v1 ``name=systemd`` path, else of any v1 path.
    ``init.scope`` (PID 1), a path of slices only, or nothing at all: None."""
    v2: list[str] = []
    named: list[str] = []
    other: list[str] = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and not controllers:
            v2.append(path)
        elif controllers == "name=systemd":
            named.append(path)
        else:
            other.append(path)
    paths = v2 + named + other
    for path in paths:
        if found := _container(path):
            return found
    for path in paths:
        if found := _unit(path):
            return found
    return None


# -- the lookup


class _Finder:
    """The blocking lookup (one thread at a time): the client socket's row, then its owner."""

    def __init__(
        self,
        proc: str = PROC,
        deadline: float = DEADLINE,
        max_dirs: int = MAX_DIRS,
        netlink: bool = True,
    ) -> None:
        self.proc = proc
        # The kernel's answer is about our own namespace: /proc's, unless another is given.
        self.netlink = netlink and proc == PROC
        self.diag: SockDiag | None = None  # made in the lookup thread, on first use
        self.deadline = deadline
        self.max_dirs = max_dirs
        self.recent: OrderedDict[int, None] = OrderedDict()
        self.cache: OrderedDict[tuple[int, int, int], tuple[float, Process | None]] = OrderedDict()
        self.hits = 0
        self.found = 0
        self.not_found = 0
        self.own = os.getpid()

    def tables(self) -> dict[str, str]:
        out = {}
        for table in ("tcp", "tcp6"):
            try:
                with open(f"{self.proc}/net/{table}", encoding="ascii") as f:
                    out[table] = f.read()
            except OSError:
                out[table] = ""
        return out

    def socket(self, peer: tuple[str, int], local: tuple[str, int]) -> SocketRow | None:
        """The client's socket: from netlink where it works, else from /proc/net/tcp{,6}."""
        if self.netlink:
            try:
                if self.diag is None:
                    self.diag = SockDiag()
                return self.diag.find(peer, local)
            except OSError:  # netlink not allowed here, or not answering: /proc from now on
                self.netlink = False
                self.close()
        return find_socket(self.tables(), peer, local)

    def close(self) -> None:
        if self.diag is not None:
            self.diag.close()
            self.diag = None

    def find(self, peer: tuple[str, int], local: tuple[str, int]) -> Process | None:
        started = time.monotonic()
        row = self.socket(peer, local)
        if row is None:
            self.not_found += 1
            return None
        key = (peer[1], local[1], row.inode)
        cached = self.cache.get(key)
        if cached is not None and started - cached[0] < CACHE_TTL:
            self.cache.move_to_end(key)
            self.hits += 1
            return cached[1]
        found = self._owner(row, started + self.deadline)
        self.cache[key] = (started, found)
        if len(self.cache) > CACHE_SIZE:
            self.cache.popitem(last=False)
        if found is None:
            self.not_found += 1
        else:
            self.found += 1
        return found

    def _owner(self, row: SocketRow, deadline: float) -> Process | None:
        target = f"socket:[{row.inode}]"
        proc = self.proc
        tried: set[int] = set()
        dirs = 0
        for pid in self._candidates():
            if pid in tried:
                continue
            tried.add(pid)
            try:
                if os.stat(f"{proc}/{pid}").st_uid != row.uid:
                    continue
                fds = os.scandir(f"{proc}/{pid}/fd")
            except OSError:  # exited, or not ours to read
                continue
            dirs += 1
            with fds:
                for n, entry in enumerate(fds):
                    try:
                        if os.readlink(entry.path) == target:
                            return self._describe(pid, entry.path, target)
                    except OSError:
                        continue
                    if n & 31 == 31:
                        _yield()
                        if time.monotonic() > deadline:
                            return None
            _yield()
            if dirs >= self.max_dirs or time.monotonic() > deadline:
                return None
        return None

    def _candidates(self) -> list[int]:
        """Recent pids (most recent first), then every pid newest first, this process last."""
        try:
            pids = sorted((int(n) for n in os.listdir(self.proc) if n.isdigit()), reverse=True)
        except OSError:
            return []
        first = [p for p in reversed(self.recent) if p != self.own]
        return first + [p for p in pids if p != self.own] + [self.own]

    def _describe(self, pid: int, fd: str, target: str) -> Process | None:
        proc = self.proc
        try:
            exe: str | None = os.path.basename(os.readlink(f"{proc}/{pid}/exe"))
        except OSError:
            exe = None
        if exe is not None and exe.endswith(_DELETED):  # replaced on disk since it started
            exe = exe[: -len(_DELETED)]
        try:
            with open(f"{proc}/{pid}/cgroup", encoding="utf-8", errors="replace") as f:
                unit = unit_from_cgroup(f.read())
        except OSError:
            unit = None
        try:  # still the same process (a pid that exited may have been reused)
            if os.readlink(fd) != target:
                return None
        except OSError:
            return None
        self.recent[pid] = None
        self.recent.move_to_end(pid)
        if len(self.recent) > RECENT_PIDS:
            self.recent.popitem(last=False)
        return Process(
            pid=pid,
            exe=bounded(exe) if exe else None,
            unit=bounded(unit) if unit else None,
        )


def _yield() -> None:
    """Let the event loop's thread have the GIL. The scan is many short system calls with
    Python between them: the scanning thread, back from each call before a waiting event loop
    has woken, takes the GIL again, and the event loop gets it only at the interpreter's switch
    interval (5 ms), several times over a scan. A burst of new connections then delayed the
    first bytes of streams already under way by tens of ms. A short sleep (not ``sleep(0)``,
    which comes back as fast) lets the event loop take it; a scan of 300 links takes ~2 ms
    longer, off the request's path."""
    time.sleep(YIELD_SECONDS)


YIELD_SECONDS = 0.0002


def supported(proc: str = PROC) -> bool:
    """Linux with /proc/net/tcp readable."""
    return sys.platform.startswith("linux") and os.access(f"{proc}/net/tcp", os.R_OK)


def _address(addr: Address) -> tuple[str, int] | None:
    if isinstance(addr, tuple) and len(addr) >= 2 and isinstance(addr[0], str):
        return addr[0], int(addr[1])
    return None


class ProcessFinder:
    """Finds the process behind a loopback connection, off the event loop.

    ``lookup(peer, local)`` takes the connection's peer and local socket addresses (as
    ``transport.get_extra_info("peername")`` / ``("sockname")`` give them) and returns a future
    of ``Process`` or None; it never raises, and the future never fails. Non-loopback
    addresses, a system without /proc, and lookups past ``max_pending`` waiting are None at
    once (the last ones counted in ``skipped``). ``close()`` stops the thread."""

    def __init__(
        self,
        *,
        proc: str = PROC,
        max_pending: int = MAX_PENDING,
        deadline: float = DEADLINE,
        max_dirs: int = MAX_DIRS,
        netlink: bool = True,
    ) -> None:
        self.available = supported(proc)
        self.max_pending = max_pending
        self.pending = 0
        self.lookups = 0  # started (in the thread)
        self.skipped = 0  # past max_pending
        self._finder = _Finder(proc, deadline, max_dirs, netlink)
        self._executor: ThreadPoolExecutor | None = None
        self._failed = Throttle(60.0)

    @property
    def hits(self) -> int:
        """Lookups answered from the cache."""
        return self._finder.hits

    @property
    def found(self) -> int:
        return self._finder.found

    @property
    def not_found(self) -> int:
        return self._finder.not_found

    def lookup(self, peer: Address, local: Address) -> asyncio.Future[Process | None]:
        loop = asyncio.get_running_loop()
        a, b = _address(peer), _address(local)
        if (
            not self.available
            or a is None
            or b is None
            or not (is_loopback(a[0]) and is_loopback(b[0]))
        ):
            return _done(loop, None)
        if self.pending >= self.max_pending:
            self.skipped += 1
            return _done(loop, None)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="atlasburn-process")
        self.pending += 1
        self.lookups += 1
        future = loop.run_in_executor(self._executor, self._find, a, b)
        future.add_done_callback(self._finished)
        return future

    def _find(self, peer: tuple[str, int], local: tuple[str, int]) -> Process | None:
        try:
            return self._finder.find(peer, local)
        except Exception:  # a /proc we did not expect: nobody, and say so (once a minute)
            allowed, held = self._failed.allow()
            if allowed:
                log.exception("process attribution: a lookup failed (%d more not logged)", held)
            return None

    def _finished(self, _: asyncio.Future[Process | None]) -> None:
        self.pending -= 1

    def close(self) -> None:
        if self._executor is not None:
            # Waits for the lookup under way, if any (at most its deadline).
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        self._finder.close()


def _done(loop: asyncio.AbstractEventLoop, value: Process | None) -> asyncio.Future[Process | None]:
    future: asyncio.Future[Process | None] = loop.create_future()
    future.set_result(value)
    return future
