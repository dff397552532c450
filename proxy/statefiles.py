"""Private state files: the state directory (the parent of ``storage.path``) and what the daemon
keeps in it (the SQLite spool and its ``-wal``/``-shm``/``-journal``, ``local-api-key``).

The state directory may sit where another user can reach it (a shared /tmp, a volume, a
mistyped path). What such a user must never do is plant a file the daemon trusts (a
``local-api-key`` they know), point a name at a file of ours so that we truncate or chmod it (a
symlink), or read what we write. So, as OpenSSH's StrictModes does for ``~/.ssh``:

- The directory is checked component by component from ``/``. Every directory on the way (an
  ancestor) belongs to root or to us and is not writable by group or others unless it is sticky
  (``/tmp`` is fine: nobody else can rename what is ours in it); otherwise another user could move
  the state directory away and put theirs in its place. A symbolic link on the way is followed only
  if it belongs to root or to us (systemd's ``DynamicUser=`` makes ``/var/lib/<name>`` a root-owned
  link to ``private/<name>``). The state directory itself is a directory that belongs to us (or
  root) and is writable by nobody else. A missing one is created with mode 0700, and so is every
  missing directory on the way.
- Once the directory is private, names in it can only change under us by our own hand: files are
  then opened with ``O_NOFOLLOW`` and judged by ``fstat`` on the open descriptor (never by path):
  a regular file, ours (or root's), with no access for group or others. Files are created with
  ``O_CREAT | O_EXCL | O_NOFOLLOW`` and mode 0600, never truncated, never chmod-ed by path.

Everything refused raises ``StateFileError`` (``errors.py``) with a message that starts with
``storage.path:`` and says what is wrong, whose the file is, and how to fix it; ``run`` logs it
and exits 2 before binding.

Operator commands (``status``, ``suspend``, ``resume``) read the daemon's key with the same checks
(``StateDir.check(..., create=False)``), except that the state directory may belong to another
user (the daemon's, e.g. root reading a ``DynamicUser=`` service's key): a file in it is then
trusted if it belongs to that directory's owner, to us or to root.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import pwd
import secrets
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from .errors import StateFileError

log = logging.getLogger(__name__)
T = TypeVar("T")

PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700
# SQLite's companions of a database file: each inherits the database file's mode when SQLite
# creates it, and is opened by name, so each existing one is checked like the database itself.
SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")

_MAX_LINKS = 40  # as the kernel's limit on symlinks in one lookup
_MAX_READ = 65536  # bytes read from a private file (the key is about 60)
_OPEN_EXISTING = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _user(uid: int) -> str:
    """``nobody (uid 65534)``; ``uid 1234`` when it has no name."""
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _mode(st: os.stat_result) -> str:
    return f"mode {stat.S_IMODE(st.st_mode):04o}"


def _writers(st: os.stat_result) -> str:
    """Who besides the owner may write to it: 'other users' or 'its group'."""
    return "other users" if st.st_mode & stat.S_IWOTH else "its group"


def _others(st: os.stat_result) -> str:
    """Who besides the owner has any access to it: 'other users' or 'its group'."""
    return "other users" if st.st_mode & 0o007 else "its group"


def _kind(st: os.stat_result) -> str:
    for test, name in (
        (stat.S_ISREG, "a file"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISFIFO, "a named pipe"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(st.st_mode):
            return name
    return "a special file"


@dataclass(frozen=True, slots=True)
class StateDir:
    """A checked state directory. ``given`` is the path as configured (named in messages),
    ``real`` the same directory with every symlink resolved (where files are opened),
    ``owners`` the uids whose files in it are trusted."""

    given: Path
    real: Path
    owners: frozenset[int]

    # ------------------------------------------------------------------ the directory

    @classmethod
    def check(cls, directory: Path, *, create: bool) -> StateDir | None:
        """Check ``directory`` and every directory and link on the way to it (module docstring).

        ``create=True`` (the daemon): missing directories are created (mode 0700) and the state
        directory must belong to us or to root. ``create=False`` (a reader: the operator
        commands): a missing directory gives None, and the directory may belong to another user,
        whose files in it are then trusted too.

        Raises ``StateFileError`` on anything unsafe, or when a directory cannot be read or made.
        """
        euid = os.geteuid()
        path = directory if directory.is_absolute() else Path.cwd() / directory
        current, here = Path("/"), _lstat(Path("/"))  # a real directory on the way, its stat
        todo = list(reversed(path.parts[1:]))  # a stack of the names still to walk
        links = 0
        while todo:
            _check_ancestor(current, here, directory, euid)
            name = todo.pop()
            if name == "..":
                current = current.parent
                here = _lstat(current)
                continue
            candidate = current / name
            try:
                st = os.lstat(candidate)
            except FileNotFoundError:
                if not create:
                    return None
                _mkdir(candidate)
                st = _lstat(candidate)
            except OSError as exc:
                raise _cannot("read", candidate, exc) from None
            if stat.S_ISLNK(st.st_mode):
                # The directory holding the link passed the ancestor check: nobody else can
                # replace the link. Who made it is what is left to trust.
                if st.st_uid not in (euid, 0):
                    raise StateFileError(
                        f"storage.path: {candidate} is a symbolic link that belongs to another "
                        f"user: {_user(st.st_uid)}; a link on the way to the state directory must "
                        "belong to you or root: remove it, or use another storage.path"
                    )
                links += 1
                if links > _MAX_LINKS:
                    raise StateFileError(
                        f"storage.path: too many symbolic links on the way to {directory}"
                    )
                target = Path(os.readlink(candidate))
                if target.is_absolute():
                    current, here = Path("/"), _lstat(Path("/"))
                    todo.extend(reversed(target.parts[1:]))
                else:
                    todo.extend(reversed(target.parts))
                continue
            if not stat.S_ISDIR(st.st_mode):
                raise StateFileError(
                    f"storage.path: {candidate} is {_kind(st)}, not a directory; "
                    "use another storage.path"
                )
            current, here = candidate, st
        st = here
        if create and st.st_uid not in (euid, 0):
            raise StateFileError(
                f"storage.path: directory {directory} belongs to another user: "
                f"{_user(st.st_uid)}; use a directory owned by {_user(euid)} (chown it), "
                "or another storage.path"
            )
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise StateFileError(
                f"storage.path: directory {directory} is writable by {_writers(st)} "
                f"({_mode(st)}); use a private directory (chmod 700) or another storage.path"
            )
        return cls(directory, current, frozenset({euid, 0, st.st_uid}))

    # ------------------------------------------------------------------ files in it

    def read(self, name: str) -> bytes | None:
        """The content of the private file ``name`` (at most 64 KiB), or None if it does not
        exist. Raises ``StateFileError`` if it is a link, not a regular file, another user's,
        or open to group or others (a planted or exposed file is never used)."""
        fd = self._open_existing(name)
        if fd is None:
            return None
        try:
            st = os.fstat(fd)
            self._judge(name, st, self.owners)
            if st.st_mode & 0o077:
                raise StateFileError(
                    f"storage.path: {self.given / name} is open to {_others(st)} ({_mode(st)}); "
                    "it may have been read or replaced: remove it (a new one is made at the "
                    "next start), or chmod 600 it if you know it is yours"
                )
            return os.read(fd, _MAX_READ)
        finally:
            os.close(fd)

    def create(self, name: str, data: bytes) -> None:
        """Create the private file ``name`` (mode 0600) holding ``data``, on disk (fsync) when
        this returns. Never overwrites: raises ``FileExistsError`` if anything (a file, a link,
        dangling or not) already has the name; ``StateFileError`` if it cannot be written."""
        path = self.real / name
        try:
            fd = os.open(path, _CREATE, PRIVATE_FILE)
        except FileExistsError:
            raise
        except OSError as exc:
            raise _cannot("create", self.given / name, exc) from None
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise _cannot("write", self.given / name, exc) from None
        os.close(fd)
        self._sync()

    def replace(self, name: str, data: bytes) -> None:
        """Put a new private file ``name`` holding ``data`` in place of the old one at once
        (a new file, then a rename over the old name: the old file is never opened)."""
        temp = f".{name}.{secrets.token_hex(8)}.tmp"
        self.create(temp, data)
        try:
            os.replace(self.real / temp, self.real / name)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(self.real / temp)
            raise _cannot("replace", self.given / name, exc) from None
        self._sync()

    def make_private(self, name: str) -> bool:
        """If ``name`` exists, make sure it is a regular file of ours and private, fixing a mode
        that is too open (an older version's 0644) with ``fchmod`` on a descriptor opened
        without following links, logged once. False if it does not exist. Raises
        ``StateFileError`` for a link, another kind of file, or another user's file."""
        fd = self._open_existing(name)
        if fd is None:
            return False
        try:
            st = os.fstat(fd)
            self._judge(name, st, frozenset({os.geteuid()}))
            if st.st_mode & 0o077:
                private = stat.S_IMODE(st.st_mode) & PRIVATE_FILE
                os.fchmod(fd, private)
                log.warning(
                    "storage.path: %s was open to %s (%s); it is now private (%04o)",
                    self.given / name,
                    _others(st),
                    _mode(st),
                    private,
                )
        except OSError as exc:
            raise _cannot("make private", self.given / name, exc) from None
        finally:
            os.close(fd)
        return True

    def prepare_database(self, name: str) -> None:
        """Before SQLite opens ``name``: check the database file and its companions
        (``-wal``, ``-shm``, ``-journal``) that exist, and create a missing database file empty
        with mode 0600, since SQLite gives the companions it creates the database file's mode."""
        for suffix in SQLITE_COMPANIONS:
            self.make_private(name + suffix)
        try:
            self.create(name, b"")
        except FileExistsError:
            self.make_private(name)

    # ------------------------------------------------------------------ helpers

    def _judge(self, name: str, st: os.stat_result, owners: frozenset[int]) -> None:
        if not stat.S_ISREG(st.st_mode):
            raise StateFileError(
                f"storage.path: {self.given / name} is {_kind(st)}, not a regular file; remove it"
            )
        if st.st_uid not in owners:
            raise StateFileError(
                f"storage.path: {self.given / name} belongs to another user: "
                f"{_user(st.st_uid)}, {_mode(st)}; a file planted in the state directory is "
                "never trusted: remove it"
            )

    def _open_existing(self, name: str) -> int | None:
        """A read-only descriptor of ``name`` opened without following a link, or None if it
        does not exist; ``StateFileError`` when it cannot be opened (a link: ELOOP)."""
        try:
            return os.open(self.real / name, os.O_RDONLY | _OPEN_EXISTING)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._refuse_open(name, exc) from None

    def _refuse_open(self, name: str, exc: OSError) -> StateFileError:
        path = self.real / name
        if exc.errno == errno.ELOOP:
            try:
                target = os.readlink(path)
            except OSError:
                pass
            else:
                return StateFileError(
                    f"storage.path: {self.given / name} is a symbolic link (to {target}); "
                    "the daemon never follows links in its state directory: remove it"
                )
        return _cannot("open", self.given / name, exc)

    def _sync(self) -> None:
        """fsync the directory, so a new name survives a power loss. Best effort: some file
        systems refuse to fsync a directory (EINVAL), and the file itself is on disk already."""
        try:
            fd = os.open(self.real, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)


def _check_ancestor(path: Path, st: os.stat_result, state: Path, euid: int) -> None:
    """A directory on the way to the state directory: whoever can rename entries in it can put
    another directory in the state directory's place."""
    if st.st_uid not in (euid, 0):
        raise StateFileError(
            f"storage.path: {path} (on the way to the state directory {state}) belongs to "
            f"another user: {_user(st.st_uid)}, who could replace the state directory; "
            "use another storage.path"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        raise StateFileError(
            f"storage.path: {path} (on the way to the state directory {state}) is writable by "
            f"{_writers(st)} and not sticky ({_mode(st)}), so the state directory could be "
            "replaced; chmod go-w it, or use another storage.path"
        )


def _lstat(path: Path) -> os.stat_result:
    try:
        return os.lstat(path)
    except OSError as exc:
        raise _cannot("read", path, exc) from None


def _mkdir(path: Path) -> None:
    try:
        os.mkdir(path, PRIVATE_DIR)
    except FileExistsError:
        return  # made meanwhile by someone else: checked like any other
    except OSError as exc:
        raise _cannot("create the directory", path, exc) from None
    log.info("storage.path: created %s (mode 0700)", path)


def _cannot(what: str, path: Path, exc: OSError) -> StateFileError:
    return StateFileError(f"storage.path: cannot {what} {path}: {exc.strerror or exc}")


def read_or_create(
    directory: Path,
    name: str,
    parse: Callable[[bytes], T | None],
    make: Callable[[], bytes],
    *,
    create: bool,
) -> tuple[T | None, str]:
    """A private value kept in the file ``name`` of the state directory (the local API key,
    the key-id secret), and how it was had: ``"read"``, ``"created"`` or ``"replaced"`` (a
    file of ours that held no value: an interrupted first start), or ``"none"`` (no state
    directory). ``parse`` gives the value of the file's bytes (None: none in them); ``make``
    the bytes of a new one. ``create=False`` only reads. Never written over another
    process's: twice at most, a value another daemon on the same directory wrote between our
    read and our create is read. Raises ``StateFileError`` for a file or directory refused
    (``StateDir``), or one that keeps changing."""
    state = StateDir.check(directory, create=create)
    if state is None:
        return None, "none"
    for _ in range(2):
        data = state.read(name)
        value = parse(data) if data is not None else None
        if value is not None or not create:
            return value, "read"
        fresh = make()
        if data is not None:
            state.replace(name, fresh)
            return parse(fresh), "replaced"
        try:
            state.create(name, fresh)
        except FileExistsError:
            continue
        return parse(fresh), "created"
    raise StateFileError(
        f"storage.path: {directory / name} keeps changing while it is read; is another "
        "daemon using the same storage.path?"
    )
