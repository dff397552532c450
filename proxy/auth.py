"""The local API's key check: ``AtlasBurn-API-Key``, an ``abn_`` key, compared in constant time.

Only an HMAC-SHA-256 digest of the key (under a per-process random salt) is kept by the checker,
and a presented key is compared by its digest with ``hmac.compare_digest``, so neither timing nor a
memory dump of the checker reveals the key.

The key is the configured ``atlasburn.api_key``; in local-only mode without one, the daemon
generates a key on first start and keeps it in ``local-api-key`` (mode 0600) in the state
directory, where the operator CLI finds it. The local API is never open.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path

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
    """The configured key, else the state directory's generated key (created when asked)."""
    if configured:
        return configured
    path = key_file(state_dir)
    try:
        key = path.read_text().strip()
        if key.startswith("abn_"):
            return key
    except FileNotFoundError:
        pass
    if not create:
        return None
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = "abn_local_" + secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    os.chmod(path, 0o600)
    log.warning("no atlasburn.api_key configured: generated a key for the local API in %s", path)
    return key
