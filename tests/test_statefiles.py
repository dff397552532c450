"""Private state files (``proxy/statefiles.py``) on real files and directories.

The tests run as root; "another user" is uid 65534 (nobody), made the owner with ``os.chown``.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.auth import local_key
from proxy.config import StorageConfig
from proxy.errors import StateFileError
from proxy.statefiles import StateDir
from proxy.store import Store

NOBODY = 65534


def mode(path: Path) -> int:
    return os.lstat(path).st_mode & 0o7777


def check(directory: Path, create: bool = True) -> StateDir:
    state = StateDir.check(directory, create=create)
    assert state is not None
    return state


def refused(directory: Path, create: bool = True) -> str:
    with pytest.raises(StateFileError) as caught:
        StateDir.check(directory, create=create)
    return str(caught.value)


# ---------------------------------------------------------------------------- the directory


def test_a_missing_state_directory_is_created_private_with_its_parents(tmp_path: Path) -> None:
    assert os.umask(os.umask(0o022)) == 0o022  # the test process's, not the daemon's 077
    state = check(tmp_path / "a" / "b" / "state")
    assert state.real == tmp_path / "a" / "b" / "state"
    assert [mode(tmp_path / p) for p in ("a", "a/b", "a/b/state")] == [0o700, 0o700, 0o700]


def test_a_reader_creates_nothing(tmp_path: Path) -> None:
    assert StateDir.check(tmp_path / "a" / "state", create=False) is None
    assert not (tmp_path / "a").exists()
    assert local_key("", tmp_path / "a" / "state", create=False) is None
    assert not (tmp_path / "a").exists()


def test_a_world_writable_state_directory_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o777)
    assert refused(state) == (
        f"storage.path: directory {state} is writable by other users (mode 0777); "
        "use a private directory (chmod 700) or another storage.path"
    )


def test_a_sticky_world_writable_state_directory_is_refused_too(tmp_path: Path) -> None:
    # Sticky protects what is ours from being renamed, not the names we have yet to create.
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o1777)
    assert refused(state) == (
        f"storage.path: directory {state} is writable by other users (mode 1777); "
        "use a private directory (chmod 700) or another storage.path"
    )


def test_a_group_writable_state_directory_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o770)
    assert refused(state) == (
        f"storage.path: directory {state} is writable by its group (mode 0770); "
        "use a private directory (chmod 700) or another storage.path"
    )


def test_a_readable_state_directory_is_fine(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o755)  # e.g. systemd's default StateDirectoryMode
    assert check(state).real == state


def test_a_state_directory_of_another_user_is_refused_to_the_daemon(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.chown(state, NOBODY, NOBODY)
    assert refused(state) == (
        f"storage.path: directory {state} belongs to another user: nobody (uid 65534); "
        "use a directory owned by root (uid 0) (chown it), or another storage.path"
    )


def test_a_reader_trusts_the_files_of_the_state_directorys_owner_only(tmp_path: Path) -> None:
    # root running `atlasburn-proxy status` against a daemon that runs as its own user.
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    key = state / "local-api-key"
    key.write_text("abn_test_daemon_key\n")
    key.chmod(0o600)
    os.chown(key, NOBODY, NOBODY)
    os.chown(state, NOBODY, NOBODY)
    assert local_key("", state, create=False) == "abn_test_daemon_key"
    os.chown(key, NOBODY - 1, NOBODY - 1)  # not the directory's owner
    with pytest.raises(StateFileError) as caught:
        local_key("", state, create=False)
    assert str(caught.value) == (
        f"storage.path: {key} belongs to another user: uid 65533, mode 0600; a file planted "
        "in the state directory is never trusted: remove it"
    )


def test_a_sticky_world_writable_ancestor_is_fine(tmp_path: Path) -> None:
    shared = tmp_path / "tmp"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp
    state = check(shared / "state")
    assert mode(state.real) == 0o700


def test_a_world_writable_ancestor_without_the_sticky_bit_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    (shared / "state").mkdir(mode=0o700)
    assert refused(shared / "state") == (
        f"storage.path: {shared} (on the way to the state directory {shared / 'state'}) is "
        "writable by other users and not sticky (mode 0777), so the state directory could be "
        "replaced; chmod go-w it, or use another storage.path"
    )
    # Nothing is created under it either.
    assert refused(shared / "new").startswith(f"storage.path: {shared} (on the way")
    assert not (shared / "new").exists()


def test_an_ancestor_of_another_user_is_refused(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    os.chown(home, NOBODY, NOBODY)
    assert refused(home / "state") == (
        f"storage.path: {home} (on the way to the state directory {home / 'state'}) belongs "
        "to another user: nobody (uid 65534), who could replace the state directory; "
        "use another storage.path"
    )


def test_a_link_of_ours_to_the_state_directory_is_followed(tmp_path: Path) -> None:
    # systemd's DynamicUser=: /var/lib/<name> -> private/<name>, owned by root.
    (tmp_path / "private" / "state").mkdir(parents=True, mode=0o700)
    (tmp_path / "state").symlink_to("private/state")
    state = check(tmp_path / "state")
    assert (state.given, state.real) == (tmp_path / "state", tmp_path / "private" / "state")


def test_a_link_of_another_user_on_the_way_is_refused(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    link = tmp_path / "state"
    link.symlink_to(tmp_path / "elsewhere")
    os.lchown(link, NOBODY, NOBODY)
    assert refused(link) == (
        f"storage.path: {link} is a symbolic link that belongs to another user: nobody "
        "(uid 65534); a link on the way to the state directory must belong to you or root: "
        "remove it, or use another storage.path"
    )


def test_dot_dot_after_a_link_is_the_parent_of_its_target(tmp_path: Path) -> None:
    (tmp_path / "x" / "y").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "x" / "y")
    state = check(tmp_path / "link" / ".." / "state")
    assert state.real == tmp_path / "x" / "state"
    assert (tmp_path / "x" / "state").is_dir() and not (tmp_path / "state").exists()


def test_a_relative_path_is_walked_from_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert check(Path("state")).real == tmp_path / "state"


def test_a_file_where_a_directory_should_be_is_refused(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("")
    assert refused(tmp_path / "state" / "sub") == (
        f"storage.path: {tmp_path / 'state'} is a file, not a directory; use another storage.path"
    )


# ---------------------------------------------------------------------------- reading a file


@pytest.fixture
def state(tmp_path: Path) -> StateDir:
    return check(tmp_path / "state")


def test_a_private_file_of_ours_is_read(state: StateDir) -> None:
    state.create("f", b"abn_test_x\n")
    assert mode(state.real / "f") == 0o600
    assert state.read("f") == b"abn_test_x\n"
    assert state.read("missing") is None


def test_a_planted_symlink_is_refused_and_its_target_untouched(
    state: StateDir, tmp_path: Path
) -> None:
    victim = tmp_path / "victim"
    victim.write_text("abn_test_victim\n")
    victim.chmod(0o600)
    (state.real / "local-api-key").symlink_to(victim)
    with pytest.raises(StateFileError) as caught:
        state.read("local-api-key")
    assert str(caught.value) == (
        f"storage.path: {state.real / 'local-api-key'} is a symbolic link (to {victim}); the "
        "daemon never follows links in its state directory: remove it"
    )
    with pytest.raises(StateFileError):
        local_key("", state.given, create=True)
    assert (victim.read_text(), mode(victim)) == ("abn_test_victim\n", 0o600)


def test_a_file_of_another_user_is_refused(state: StateDir) -> None:
    planted = state.real / "local-api-key"
    planted.write_text("abn_test_planted\n")
    planted.chmod(0o600)
    os.chown(planted, NOBODY, NOBODY)
    message = (
        f"storage.path: {planted} belongs to another user: nobody (uid 65534), mode 0600; a "
        "file planted in the state directory is never trusted: remove it"
    )
    with pytest.raises(StateFileError) as caught:
        state.read("local-api-key")
    assert str(caught.value) == message
    with pytest.raises(StateFileError) as caught:
        local_key("", state.given, create=True)
    assert str(caught.value) == message
    assert planted.read_text() == "abn_test_planted\n"


@pytest.mark.parametrize(
    ("bits", "who"),
    [(0o640, "its group"), (0o604, "other users"), (0o660, "its group"), (0o610, "its group")]
    + [(0o606, "other users"), (0o644, "other users")],
    ids=lambda v: f"{v:04o}" if isinstance(v, int) else v.replace(" ", "-"),
)
def test_a_file_open_to_group_or_others_is_refused(state: StateDir, bits: int, who: str) -> None:
    key = state.real / "local-api-key"
    key.write_text("abn_test_exposed\n")
    key.chmod(bits)
    with pytest.raises(StateFileError) as caught:
        local_key("", state.given, create=True)
    assert str(caught.value) == (
        f"storage.path: {key} is open to {who} (mode {bits:04o}); it may have been read "
        "or replaced: remove it (a new one is made at the next start), or chmod 600 it if you "
        "know it is yours"
    )
    assert (key.read_text(), mode(key)) == ("abn_test_exposed\n", bits)


def test_a_named_pipe_is_refused_without_blocking(state: StateDir) -> None:
    os.mkfifo(state.real / "local-api-key", 0o600)
    with pytest.raises(StateFileError) as caught:
        state.read("local-api-key")
    assert str(caught.value) == (
        f"storage.path: {state.real / 'local-api-key'} is a named pipe, not a regular file; "
        "remove it"
    )


# ---------------------------------------------------------------------------- creating a file


def test_create_never_overwrites_a_file_that_appeared_meanwhile(state: StateDir) -> None:
    # The O_EXCL race: the name was free when checked, then someone made it.
    (state.real / "f").write_text("theirs\n")
    with pytest.raises(FileExistsError):
        state.create("f", b"ours\n")
    assert (state.real / "f").read_text() == "theirs\n"


def test_create_never_follows_a_dangling_link(state: StateDir, tmp_path: Path) -> None:
    target = tmp_path / "would-be-created"
    (state.real / "f").symlink_to(target)
    with pytest.raises(FileExistsError):
        state.create("f", b"ours\n")
    assert not target.exists()


def test_a_key_file_of_ours_without_a_key_is_replaced(state: StateDir) -> None:
    # An interrupted first start (power lost before the key reached the disk).
    (state.real / "local-api-key").write_bytes(b"")
    (state.real / "local-api-key").chmod(0o600)
    key = local_key("", state.given, create=True)
    assert key is not None and key.startswith("abn_local_")
    assert (state.real / "local-api-key").read_text() == key + "\n"
    assert mode(state.real / "local-api-key") == 0o600
    assert sorted(p.name for p in state.real.iterdir()) == ["local-api-key"]
    assert local_key("", state.given, create=True) == key


# ---------------------------------------------------------------------------- the database


def storage(path: Path) -> StorageConfig:
    return StorageConfig(path=path, commit_interval_ms=20)


async def open_refused(path: Path) -> str:
    """The message Store.open refuses with (a store that opens is closed, then fails the test:
    an open store's SQLite thread would keep the test process alive)."""
    try:
        store = await Store.open(storage(path), ship=False)
    except StateFileError as exc:
        return str(exc)
    await store.close()
    raise AssertionError(f"the store at {path} opened")


async def test_a_new_store_and_sqlites_companions_are_private(tmp_path: Path) -> None:
    assert os.umask(os.umask(0o022)) == 0o022  # the test process's: not the daemon's 077
    path = tmp_path / "state" / "spool.sqlite3"
    store = await Store.open(storage(path), ship=False)
    try:
        modes = {p.name: mode(p) for p in path.parent.iterdir()}
        assert modes == {
            "spool.sqlite3": 0o600,
            "spool.sqlite3-wal": 0o600,
            "spool.sqlite3-shm": 0o600,
        }
        assert mode(path.parent) == 0o700
    finally:
        await store.close()


async def test_an_older_versions_open_spool_is_made_private_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state" / "spool.sqlite3"
    store = await Store.open(storage(path), ship=False)
    await store.close()
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="proxy.statefiles"):
        store = await Store.open(storage(path), ship=False)
    try:
        assert mode(path) == 0o600
        assert [r.getMessage() for r in caplog.records] == [
            f"storage.path: {path} was open to other users (mode 0644); it is now private (0600)"
        ]
    finally:
        await store.close()


@pytest.mark.parametrize("suffix", ["", "-wal", "-shm", "-journal"])
async def test_a_linked_database_file_is_refused(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / "state" / "spool.sqlite3"
    path.parent.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    victim.chmod(0o644)
    os.symlink(victim, f"{path}{suffix}")
    assert await open_refused(path) == (
        f"storage.path: {path}{suffix} is a symbolic link (to {victim}); the daemon never "
        "follows links in its state directory: remove it"
    )
    assert (victim.read_bytes(), mode(victim)) == (b"precious", 0o644)


@pytest.mark.parametrize("suffix", ["", "-wal"])
async def test_a_database_file_of_another_user_is_refused(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / "state" / "spool.sqlite3"
    path.parent.mkdir(mode=0o700)
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE t (x)")
    db.close()
    planted = f"{path}{suffix}"
    os.close(os.open(planted, os.O_WRONLY | os.O_CREAT, 0o644))
    os.chmod(planted, 0o644)
    os.chown(planted, NOBODY, NOBODY)
    assert await open_refused(path) == (
        f"storage.path: {planted} belongs to another user: nobody (uid 65534), mode 0644; a "
        "file planted in the state directory is never trusted: remove it"
    )
    assert mode(Path(planted)) == 0o644


# ---------------------------------------------------------------------------- the operator CLI


def test_operator_commands_refuse_a_planted_key(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    planted = state / "local-api-key"
    planted.write_text("abn_test_planted\n")
    planted.chmod(0o600)
    os.chown(planted, NOBODY, NOBODY)
    config = tmp_path / "c.toml"
    config.write_text(f'[storage]\npath = "{state / "spool.sqlite3"}"\n[atlasburn]\napi_key = ""\n')
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "status", "--config", str(config)],
        capture_output=True,
        text=True,
        env={**os.environ, "ATLASBURN_API_KEY": ""},
        timeout=30,
    )
    assert (done.returncode, done.stdout, done.stderr) == (
        2,
        "",
        "status: daemon http://127.0.0.1:8787\n"
        f"storage.path: {planted} belongs to another user: nobody (uid 65534), mode 0600; a "
        "file planted in the state directory is never trusted: remove it\n",
    )
