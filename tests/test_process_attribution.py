"""Process attribution (``proxy.attribution.process``): real client processes on loopback, the
server's per-connection hook, and the parsers on recorded /proc/net/tcp{,6} and cgroup files."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from proxy.attribution import Process
from proxy.attribution.process import (
    ProcessFinder,
    SocketRow,
    find_socket,
    parse_row,
    unit_from_cgroup,
)
from proxy.config import ServerConfig
from proxy.metrics import Metrics
from proxy.server import Runner

EXE = os.path.basename(os.path.realpath(sys.executable))  # e.g. python3.11

# A client that connects to argv[1]:argv[2], says "ok" on stdout and waits for stdin to close.
CLIENT = (
    "import socket, sys\n"
    "s = socket.create_connection((sys.argv[1], int(sys.argv[2])))\n"
    "print('ok', flush=True)\n"
    "sys.stdin.read()\n"
)


class Client:
    """A client process (``code``, argv: host and port) connected to ``listener`` (at ``host``
    if given); ``conn`` is the server side, ``peer`` and ``local`` its addresses."""

    def __init__(
        self,
        listener: socket.socket,
        wrap: list[str] | None = None,
        host: str | None = None,
        code: str = CLIENT,
    ) -> None:
        address, port = listener.getsockname()[:2]
        self.proc = subprocess.Popen(
            [*(wrap or []), sys.executable, "-c", code, host or address, str(port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline() == b"ok\n"
        self.conn, self.peer = listener.accept()
        self.local = self.conn.getsockname()

    def stop(self) -> None:
        """Close the server side first (its TIME_WAIT stays on the server's side), then the
        client's stdin; wait for it to exit."""
        self.conn.close()
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as s:
        yield s


@pytest.fixture(params=[True, False], ids=["netlink", "proc-net-tcp"])
async def finder(request: pytest.FixtureRequest) -> AsyncIterator[ProcessFinder]:
    f = ProcessFinder(netlink=request.param)
    yield f
    f.close()


async def test_an_ipv4_client_is_its_process(
    listener: socket.socket, finder: ProcessFinder
) -> None:
    client = Client(listener)
    try:
        found = await finder.lookup(client.peer, client.local)
        assert found is not None
        assert (found.pid, found.exe) == (client.proc.pid, EXE)
        assert (finder.lookups, finder.found, finder.not_found, finder.hits) == (1, 1, 0, 0)
    finally:
        client.stop()


async def test_an_ipv6_client_is_its_process(finder: ProcessFinder) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    with socket.create_server(("::1", 0), family=socket.AF_INET6) as listener:
        client = Client(listener)
        try:
            assert client.peer[0] == "::1"
            found = await finder.lookup(client.peer, client.local)
            assert found is not None
            assert (found.pid, found.exe) == (client.proc.pid, EXE)
        finally:
            client.stop()


async def test_an_ipv4_client_of_a_dual_stack_listener(finder: ProcessFinder) -> None:
    # The server sees ::ffff:127.0.0.1; the client's own socket is in /proc/net/tcp as IPv4.
    if not socket.has_dualstack_ipv6():
        pytest.skip("no dual-stack IPv6 on this machine")
    with socket.create_server(("::", 0), family=socket.AF_INET6, dualstack_ipv6=True) as s:
        client = Client(s, host="127.0.0.1")
        try:
            assert client.peer[0] == "::ffff:127.0.0.1"
            found = await finder.lookup(client.peer, client.local)
            assert found is not None
            assert (found.pid, found.exe) == (client.proc.pid, EXE)
        finally:
            client.stop()


async def test_the_same_connection_is_looked_up_once(
    listener: socket.socket, finder: ProcessFinder
) -> None:
    client = Client(listener)
    try:
        first = await finder.lookup(client.peer, client.local)
        second = await finder.lookup(client.peer, client.local)
        assert first == second == Process(client.proc.pid, EXE, first.unit if first else None)
        assert (finder.lookups, finder.found, finder.hits) == (2, 1, 1)
    finally:
        client.stop()


async def test_a_client_that_exited_is_nobody(
    listener: socket.socket, finder: ProcessFinder
) -> None:
    client = Client(listener)
    assert client.proc.stdin is not None
    client.proc.stdin.close()  # it exits, closing its socket
    client.proc.wait(10)
    try:
        assert await finder.lookup(client.peer, client.local) is None
        assert (finder.lookups, finder.found, finder.not_found) == (1, 0, 1)
    finally:
        client.stop()


async def test_a_connection_from_this_process(
    listener: socket.socket, finder: ProcessFinder
) -> None:
    with socket.create_connection(listener.getsockname()) as mine:
        conn, peer = listener.accept()
        with conn:
            assert peer == mine.getsockname()
            found = await finder.lookup(peer, conn.getsockname())
            assert found is not None
            assert (found.pid, found.exe) == (os.getpid(), EXE)


async def test_a_reused_port_is_looked_up_again(
    listener: socket.socket, finder: ProcessFinder
) -> None:
    # Two clients, one after the other, from the same port to the same port: the second one's
    # socket is a new inode, so the first one's cached answer must not be given for it.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = (
        "import socket, sys\n"
        "s = socket.socket()\n"
        "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        f"s.bind(('127.0.0.1', {port}))\n"
        "s.connect((sys.argv[1], int(sys.argv[2])))\n"
        "print('ok', flush=True)\n"
        "s.recv(1)\n"  # the server closes first: the TIME_WAIT is on its side
    )
    found = []
    for _ in range(2):
        client = Client(listener, code=code)
        try:
            assert client.peer[1] == port
            answer = await finder.lookup(client.peer, client.local)
            assert answer is not None
            found.append((answer.pid, client.proc.pid))
        finally:
            client.stop()
    assert [pid for pid, _ in found] == [pid for _, pid in found]
    assert (finder.lookups, finder.found, finder.hits) == (2, 2, 0)


async def test_other_than_loopback_or_without_proc_is_nobody(tmp_path: Path) -> None:
    finder = ProcessFinder()
    try:
        assert await finder.lookup(("192.0.2.7", 40000), ("127.0.0.1", 8787)) is None
        assert await finder.lookup(("127.0.0.1", 40000), ("10.1.2.3", 8787)) is None
        assert await finder.lookup(("/run/sock", 0), ("127.0.0.1", 8787)) is None
        assert finder.lookups == 0
    finally:
        finder.close()
    nothing = ProcessFinder(proc=str(tmp_path))
    assert nothing.available is False
    assert await nothing.lookup(("127.0.0.1", 40000), ("127.0.0.1", 8787)) is None
    assert nothing.lookups == 0


async def test_lookups_past_the_bound_are_skipped(listener: socket.socket) -> None:
    finder = ProcessFinder(max_pending=1)
    client = Client(listener)
    try:
        first = finder.lookup(client.peer, client.local)
        second = finder.lookup(client.peer, client.local)  # the first still waits for the loop
        assert second.done() and second.result() is None
        assert (finder.pending, finder.skipped) == (1, 1)
        found = await first
        assert found is not None and found.pid == client.proc.pid
        assert finder.pending == 0
    finally:
        finder.close()
        client.stop()


# -- a unit from the cgroup a real client runs in


def _cgroup2_root() -> Path | None:
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if fields[2] == "cgroup2":
                return Path(fields[1])
    return None


async def test_a_client_in_a_scope_has_its_unit(listener: socket.socket) -> None:
    """systemd-run --scope where systemd runs; else (as root) a cgroup v2 scope made by hand,
    shaped as systemd makes them (``<name>.slice/<name>.scope``)."""
    name = f"atlasburn-test-{uuid.uuid4().hex[:8]}"
    scope = f"{name}.scope"
    made: Path | None = None
    wrap = _scope_runner()
    if wrap is not None:
        client = Client(listener, [*wrap, f"--unit={name}", "--quiet"])
    else:
        root = _cgroup2_root()
        if root is None or os.geteuid() != 0 or not os.access(root, os.W_OK):
            pytest.skip("neither systemd-run --scope nor a writable cgroup v2 tree (as root)")
        client = Client(listener)
        made = root / f"{name}.slice" / scope
        made.mkdir(parents=True)
        (made / "cgroup.procs").write_text(str(client.proc.pid))
    finder = ProcessFinder()
    try:
        found = await finder.lookup(client.peer, client.local)
        assert found is not None
        assert found.pid in (client.proc.pid, *_children(client.proc.pid))
        assert found.unit == scope
    finally:
        finder.close()
        client.stop()
        if made is not None:
            made.rmdir()
            made.parent.rmdir()


def _scope_runner() -> list[str] | None:
    """``systemd-run --user --scope`` or ``systemd-run --scope``, whichever runs here."""
    run = shutil.which("systemd-run")
    for argv in (["--user", "--scope"], ["--scope"]):
        if run and subprocess.run([run, *argv, "true"], capture_output=True).returncode == 0:
            return [run, *argv]
    return None


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


# -- the server's hook: one lookup per connection, kept on the handler


async def test_the_server_looks_up_each_connection_once() -> None:
    async def who(request: web.Request) -> web.Response:
        process = request.protocol.process  # type: ignore[attr-defined]
        found = await process
        return web.json_response(found.to_json() if found else None)

    app = web.Application()
    app.router.add_get("/who", who)
    runner = Runner(app, ServerConfig(), Metrics())
    finder = ProcessFinder()
    runner.limits.finder = finder
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession() as session:  # one keep-alive connection
            answers = []
            for _ in range(3):
                async with session.get(f"http://127.0.0.1:{port}/who") as resp:
                    answers.append(await resp.json())
        assert answers == [{"pid": os.getpid(), "exe": EXE}] * 3
        assert (finder.lookups, finder.found, finder.hits) == (1, 1, 0)
    finally:
        await runner.cleanup()
        finder.close()


async def test_without_a_finder_the_server_looks_up_nothing() -> None:
    async def who(request: web.Request) -> web.Response:
        return web.json_response(request.protocol.process)  # type: ignore[attr-defined]

    app = web.Application()
    app.router.add_get("/who", who)
    runner = Runner(app, ServerConfig(), Metrics())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{runner.addresses[0][1]}/who") as resp:
                assert await resp.json() is None
    finally:
        await runner.cleanup()


# -- recorded /proc/net/tcp and /proc/net/tcp6 (little-endian x86-64)

HEAD4 = (
    "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout"
    " inode\n"
)
TCP4 = HEAD4 + (
    "   0: 0100007F:EB81 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0"
    " 1701150 1 000000004a2239c4 100 0 0 10 0\n"
    "   1: 0100007F:E876 0100007F:9CD3 06 00000000:00000000 03:0000163D 00000000     0        0"
    " 0 3 000000002e68d054\n"
    "   2: 0100007F:89EC 0100007F:EB81 01 00000000:00000000 00:00000000 00000000  1000        0"
    " 1701153 2 00000000082a40ef 20 0 0 10 -1\n"
    "   3: 0100007F:EB81 0100007F:89EC 01 00000000:00000000 00:00000000 00000000     0        0"
    " 1701152 1 0000000020410263 20 0 0 10 -1\n"
    "   4: 020200C0:AD70 507100CB:01BB 01 00000000:00000000 00:00000000 00000000     0        0"
    " 1699676 1 000000009353e4a7 20 4 31 64 -1\n"
)
HEAD6 = (
    "  sl  local_address                         remote_address                        st"
    " tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
)
TCP6 = HEAD6 + (
    "   0: 00000000000000000000000001000000:1F93 00000000000000000000000000000000:0000 0A"
    " 00000000:00000000 00:00000000 00000000     0        0 2201 1 0000000000000000 100 0 0 10 0\n"
    "   1: 00000000000000000000000001000000:A4F2 00000000000000000000000001000000:1F93 01"
    " 00000000:00000000 00:00000000 00000000  1000        0 2305 1 0000000000000000 20 4 30 10 -1\n"
    "   2: 0000000000000000FFFF00000100007F:C350 0000000000000000FFFF00000100007F:1F90 01"
    " 00000000:00000000 00:00000000 00000000   998        0 2410 1 0000000000000000 20 4 30 10 -1\n"
)


@pytest.mark.skipif(sys.byteorder != "little", reason="the recorded files are little-endian")
def test_proc_net_tcp_rows() -> None:
    rows = TCP4.splitlines()[1:]
    assert parse_row(rows[2]) == SocketRow(
        local=("127.0.0.1", 0x89EC), remote=("127.0.0.1", 0xEB81), state=1, uid=1000, inode=1701153
    )
    assert parse_row(rows[4]) == SocketRow(
        local=("192.0.2.2", 0xAD70), remote=("203.0.113.80", 443), state=1, uid=0, inode=1699676
    )
    rows6 = TCP6.splitlines()[1:]
    assert parse_row(rows6[1]) == SocketRow(
        local=("::1", 0xA4F2), remote=("::1", 8083), state=1, uid=1000, inode=2305
    )
    # IPv4-mapped addresses are given as IPv4
    assert parse_row(rows6[2]) == SocketRow(
        local=("127.0.0.1", 50000), remote=("127.0.0.1", 8080), state=1, uid=998, inode=2410
    )
    with pytest.raises(ValueError, match="not a /proc/net/tcp row"):
        parse_row(HEAD4)


@pytest.mark.skipif(sys.byteorder != "little", reason="the recorded files are little-endian")
def test_the_client_socket_is_found_by_its_exact_addresses() -> None:
    tables = {"tcp": TCP4, "tcp6": TCP6}
    # The client's row (local = our peer), not the server's accepted socket (row 3).
    assert find_socket(tables, ("127.0.0.1", 0x89EC), ("127.0.0.1", 0xEB81)) == SocketRow(
        ("127.0.0.1", 0x89EC), ("127.0.0.1", 0xEB81), 1, 1000, 1701153
    )
    # The server listening on :: sees IPv4-mapped addresses; the client's socket is in tcp.
    found = find_socket(tables, ("::ffff:127.0.0.1", 0x89EC), ("::ffff:127.0.0.1", 0xEB81))
    assert found is not None and found.inode == 1701153
    assert find_socket(tables, ("::1", 0xA4F2), ("::1", 8083)) == SocketRow(
        ("::1", 0xA4F2), ("::1", 8083), 1, 1000, 2305
    )
    # An IPv6 (dual-stack) client socket that reached an IPv4 address: in tcp6, mapped.
    found = find_socket(tables, ("127.0.0.1", 50000), ("127.0.0.1", 8080))
    assert found is not None and (found.inode, found.uid) == (2410, 998)
    # TIME_WAIT (inode 0) is nobody's; an unknown tuple is not there.
    assert find_socket(tables, ("127.0.0.1", 0xE876), ("127.0.0.1", 0x9CD3)) is None
    assert find_socket(tables, ("127.0.0.1", 0x89EC), ("127.0.0.1", 8080)) is None
    assert find_socket(tables, ("::1", 0x89EC), ("::1", 0xEB81)) is None


# -- recorded /proc/<pid>/cgroup

HEX = "3f4b1f0a9c2d7e8f1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7081"
V1_EMPTY = "".join(
    f"{n}:{c}:/\n"
    for n, c in [
        (12, "pids"),
        (11, "memory"),
        (5, "cpu,cpuacct"),
        (1, "name=systemd"),
    ]
)


def v1(path: str, systemd: str | None = None) -> str:
    """A cgroup v1 (or hybrid) file: every controller at ``path``; name=systemd at ``systemd``
    (default ``path``)."""
    return (
        f"12:pids:{path}\n11:memory:{path}\n5:cpu,cpuacct:{path}\n"
        f"1:name=systemd:{systemd or path}\n0::{systemd or path}\n"
    )


CGROUPS = {
    "v2 user scope": (
        "0::/user.slice/user-1000.slice/user@1000.service/app.slice/run-r1a2b.scope\n",
        "run-r1a2b.scope",
    ),
    "v2 system service": ("0::/system.slice/ci-runner.service\n", "ci-runner.service"),
    "v2 service sub-cgroup": ("0::/system.slice/ci-runner.service/payload\n", "ci-runner.service"),
    "v2 docker": (f"0::/system.slice/docker-{HEX}.scope\n", f"docker:{HEX[:12]}"),
    "v2 containerd (kubepods, systemd driver)": (
        "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod8a3c0e5d_1b2f_4c6d_9e"
        f"7f_0a1b2c3d4e5f.slice/cri-containerd-{HEX}.scope\n",
        f"containerd:{HEX[:12]}",
    ),
    "v2 cri-o": (
        f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1234.slice/crio-{HEX}"
        ".scope\n",
        f"crio:{HEX[:12]}",
    ),
    "v2 podman (rootless, split)": (
        f"0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{HEX}.scope/container\n",
        f"podman:{HEX[:12]}",
    ),
    "v2 init.scope": ("0::/init.scope\n", None),
    "v2 root": ("0::/\n", None),
    "v2 a slice only": ("0::/user.slice/user-1000.slice\n", None),
    "v1 docker": (v1(f"/docker/{HEX}"), f"docker:{HEX[:12]}"),
    "v1 kubepods (cgroupfs driver)": (
        v1(f"/kubepods/burstable/pod8a3c0e5d-1b2f-4c6d-9e7f-0a1b2c3d4e5f/{HEX}"),
        f"containerd:{HEX[:12]}",
    ),
    "v1 system service": (v1("/system.slice/nginx.service"), "nginx.service"),
    "v1 user scope (hybrid)": (
        v1("/user.slice", "/user.slice/user-1000.slice/session-3.scope"),
        "session-3.scope",
    ),
    "v1 podman": (v1(f"/machine.slice/libpod-{HEX}.scope"), f"podman:{HEX[:12]}"),
    "v1 all at root": (V1_EMPTY, None),
    "v1 init.scope": (v1("/init.scope"), None),
    "not a docker id (32 hex)": (
        "4:memory:/process_api/406e23cc373fcc02af5231a7d9bae298\n0::/\n",
        None,
    ),
    "empty": ("", None),
}


@pytest.mark.parametrize("text,unit", CGROUPS.values(), ids=CGROUPS.keys())
def test_unit_from_cgroup(text: str, unit: str | None) -> None:
    assert unit_from_cgroup(text) == unit


def test_a_container_wins_over_the_unit_around_it() -> None:
    text = f"0::/system.slice/containerd.service/kubepods/besteffort/pod1/{HEX}\n"
    assert unit_from_cgroup(text) == f"containerd:{HEX[:12]}"
    # docker's v1 id in a controller line, systemd's unit in name=systemd: the container
    text = f"4:memory:/docker/{HEX}\n1:name=systemd:/system.slice/docker.service\n"
    assert unit_from_cgroup(text) == f"docker:{HEX[:12]}"
