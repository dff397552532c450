"""The local API's key check: ``AtlasBurn-API-Key``, an ``abn_`` key, compared in constant time.

Only an HMAC-SHA-256 digest of the key (under a per-process random salt) is kept by the checker,
and a presented key is compared by its digest with ``hmac.compare_digest``, so neither timing nor a
memory dump of the checker reveals the key.

The key is the configured ``atlasburn.api_key``; in local-only mode without one, the daemon
generates a key on first start and keeps it in ``local-api-key`` (mode 0600) in the state
directory, where the operator CLI finds it. The local API is never open. The key file is read and
written through ``statefiles``: a key planted by another user, or a link in its place, is refused
(``StateFileError``), never trusted or written through.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path

from .statefiles import read_or_create

log = logging.getLogger(__name__)

HEADER = "AtlasBurn-API-Key"
KEY_FILE = "local-api-key"


class KeyChecker:
    def __init__(self, key: str) -> None:
        if not key.startswith("abn_"):
            raise ValueError("an AtlasBurn API key starts with 'abn_'")
        self._salt = os.urandom(32)
        self._digest = self._hash(key)
        # Who made a change, for the audit trail: a short digest that cannot give the key back.
        self.who = "key:" + hashlib.sha256(key.encode()).hexdigest()[:12]

    def _hash(self, key: str) -> bytes:
        return hmac.new(self._salt, key.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()

    def check(self, presented: str | None) -> bool:
        if not presented or not presented.startswith("abn_"):
            return False
        return hmac.compare_digest(self._hash(presented), self._digest)


def key_file(state_dir: Path) -> Path:
    return state_dir / KEY_FILE


def local_key(configured: str, state_dir: Path, *, create: bool) -> str | None:
    """The configured key, else the state directory's generated key; None if there is none.

    ``create=True`` (the daemon): a missing key is generated and written (mode 0600, never over
    an existing name); a file of ours that holds no key (an interrupted first start) is replaced.
    ``create=False`` (operator commands): only read. Either way the directory and the file are
    checked first (``statefiles``): a key file that is a link, another user's, or readable by
    others raises ``StateFileError`` and is never used.
    """
    if configured:
        return configured
    key, how = read_or_create(
        state_dir,
        KEY_FILE,
        _parse,
        lambda: ("abn_local_" + secrets.token_urlsafe(32) + "\n").encode(),
        create=create,
    )
    path = key_file(state_dir)
    if how == "replaced":
        log.warning("%s held no key: generated a new key for the local API", path)
    elif how == "created":
        log.warning(
            "no atlasburn.api_key configured: generated a key for the local API in %s", path
        )
    return key


def _parse(data: bytes) -> str | None:
    key = data.decode("utf-8", "replace").strip()
    return key if key.startswith("abn_") else None
