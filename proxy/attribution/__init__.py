"""Attribution: who is spending (DESIGN "Attribution: who is spending").

Every event may say which application, user, session, provider key and host process it came from.
This package finds those and nothing else:

- ``Attributes`` and ``Process`` (here): what an event carries in its optional ``attributes``
  object, and the dimensions reports and budgets group and match by.
- ``request``: the ``AtlasBurn-App`` / ``-User`` / ``-Session`` / ``-Tag-<Name>`` headers and the
  ``/@<app>/`` path prefix, read (bounded) and removed before the request goes upstream.
- ``keys``: ``key_id``, a keyed hash (HMAC-SHA-256 under a secret kept beside the store) of the
  provider credential a request carries; never the key, nor a part of it.
- ``process``: the calling process of a client on this host (Linux), found once per connection
  from /proc, off the request's path.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

KEY_ID = r"key_[0-9a-f]{16}"  # what ``keys.KeyIds.key_id`` gives
MAX_TAGS = 10  # per request; more are cut, never a 4xx
MAX_BYTES = 128  # per name and per value, in UTF-8 bytes; longer ones are cut
# A tag's name as ``tag:<Name>`` gives it (report --by, budgets): what a header name may hold
# (an RFC 9110 token), none of which ends a quoted JSON path key.
TAG_NAME = rf"[!#$%&'*+.^_`|~0-9A-Za-z-]{{1,{MAX_BYTES}}}"


@dataclass(frozen=True, slots=True)
class Process:
    """The process that owns a client's connection: ``pid``; ``exe`` the file name of
    ``/proc/<pid>/exe``; ``unit`` its systemd unit (``ci-runner.service``) or container
    (``docker:0123456789ab``) from its cgroup. A member that cannot be found is None."""

    pid: int
    exe: str | None = None
    unit: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"pid": self.pid}
        if self.exe is not None:
            out["exe"] = self.exe
        if self.unit is not None:
            out["unit"] = self.unit
        return out


# Not frozen (a frozen dataclass sets each field through object.__setattr__: a microsecond per
# request), but hashable by value: treat it as immutable all the same.
@dataclass(slots=True, unsafe_hash=True)
class Attributes:
    """What one event says about who sent it; None (or no tags) for what is not known.
    Strings are at most ``MAX_BYTES`` UTF-8 bytes and inert (``proxy.text``)."""

    app: str | None = None
    user: str | None = None
    session: str | None = None
    tags: tuple[tuple[str, str], ...] = ()  # (name, value), at most MAX_TAGS, names unique
    key_id: str | None = None
    key_name: str | None = None
    process: Process | None = None

    def __bool__(self) -> bool:
        return bool(
            self.app
            or self.user
            or self.session
            or self.tags
            or self.key_id
            or self.key_name
            or self.process
        )

    def to_json(self) -> dict[str, Any] | None:
        """The event's ``attributes`` object, absent members omitted; None when empty."""
        out: dict[str, Any] = {}
        if self.app is not None:
            out["app"] = self.app
        if self.user is not None:
            out["user"] = self.user
        if self.session is not None:
            out["session"] = self.session
        if self.tags:
            out["tags"] = dict(self.tags)
        if self.key_id is not None:
            out["key_id"] = self.key_id
        if self.key_name is not None:
            out["key_name"] = self.key_name
        if self.process is not None:
            out["process"] = self.process.to_json()
        return out or None

    def dimension(self, name: str) -> str | None:
        """The value of one dimension (a member's name: ``app``, ``user``, ``session``,
        ``key_id``, ``key_name``; the process's ``unit``, ``exe``, ``pid``; or
        ``tag:<Name>``), None when unknown."""
        if name.startswith("tag:"):
            tag = name[4:]
            for key, value in self.tags:
                if key == tag:
                    return value
            return None
        if name in ("unit", "exe", "pid"):
            if self.process is None:
                return None
            found = getattr(self.process, name)
            return None if found is None else str(found)
        own = getattr(self, name, None)
        return own if isinstance(own, str) else None


NO_ATTRIBUTES = Attributes()


def connection_process(connection: Any) -> Process | None:
    """The calling process of a client connection (the server's per-connection handler keeps
    its lookup, a future, as ``process``) if the lookup has finished; None otherwise."""
    lookup = getattr(connection, "process", None)
    if lookup is None or not lookup.done() or lookup.cancelled():
        return None
    found = lookup.result()
    return found if isinstance(found, Process) else None


def with_process(attributes: Attributes | None, connection: Any) -> Attributes | None:
    """``attributes`` with the connection's process where its lookup has finished since the
    request began (a new connection's first request: the lookup runs while it is relayed)."""
    if attributes is None or attributes.process is not None:
        return attributes
    found = connection_process(connection)
    return attributes if found is None else replace(attributes, process=found)
