"""``key_id``: which provider key a request used, without keeping the key.

``key_id`` is ``key_`` + the first 16 hex digits of HMAC-SHA-256(secret, credential), where the
credential is what the request authenticates with (the key itself: ``Authorization: Bearer``'s
token without ``Bearer ``, ``x-api-key``, ``api-key``, ``x-goog-api-key``, or ``key=`` in the
query) and the secret is 32 random bytes generated once per installation and kept beside the
store in ``key-id-secret`` (mode 0600, read and written through ``statefiles``). Keyed, the id
cannot be reversed by hashing candidate keys without the secret, and it is never a prefix or a
suffix of the key. Two daemons that share a state directory give a key the same id; two
installations give it different ids (name keys per installation: ``[attribution.key_names]``).

``atlasburn-proxy key-id`` reads a key on stdin and prints its id with the same secret.
"""

from __future__ import annotations

import hmac
import logging
import secrets
from collections.abc import Mapping
from pathlib import Path

from ..statefiles import read_or_create

log = logging.getLogger(__name__)

SECRET_FILE = "key-id-secret"
_SECRET_BYTES = 32


class KeyIds:
    """``key_id`` of a credential, and the name ``[attribution.key_names]`` gives that id."""

    def __init__(self, secret: bytes, names: Mapping[str, str] | None = None) -> None:
        if len(secret) < 16:
            raise ValueError("a key-id secret has at least 16 bytes")
        self._secret = secret
        self.names: Mapping[str, str] = names or {}

    def __repr__(self) -> str:
        return f"KeyIds(<secret>, {len(self.names)} names)"

    def key_id(self, credential: bytes) -> str:
        """``key_`` + 16 lowercase hex digits for the credential's bytes (as sent)."""
        return "key_" + hmac.digest(self._secret, credential, "sha256")[:8].hex()


def key_secret(state_dir: Path, *, create: bool) -> bytes | None:
    """The installation's key-id secret from ``key-id-secret`` in the state directory.

    ``create=True``: a missing (or empty) file is generated (32 random bytes, hex, mode 0600,
    never written over another process's). ``create=False``: only read; None when there is
    none. Raises ``StateFileError`` for a file that is a link, another user's, or readable by
    others (``statefiles``): a planted secret would let its planter link ids to keys."""
    secret, how = read_or_create(
        state_dir,
        SECRET_FILE,
        _parse,
        lambda: (secrets.token_hex(_SECRET_BYTES) + "\n").encode(),
        create=create,
    )
    if how == "replaced":
        log.warning("%s held no secret: generated a new one", state_dir / SECRET_FILE)
    return secret


def _parse(data: bytes) -> bytes | None:
    text = data.decode("ascii", "replace").strip()
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        return None
    return secret if len(secret) >= 16 else None
