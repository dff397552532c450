"""Operator commands on the host: ``status``, ``suspend``, ``resume``.

They talk to the running daemon's local API (``server.listen``; a wildcard address is reached on
loopback) with the configured ``atlasburn.api_key``, or the key the daemon generated in its state
directory when none is configured.
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from .auth import HEADER, local_key
from .config import Config
from .text import inert

TIMEOUT = 10.0
_MAX_ANSWER = 1 << 20  # bytes read of an answer (the daemon's are a few hundred)


class OperatorError(Exception):
    """A failure to tell the operator in one line."""


def base_url(config: Config) -> str:
    host = config.server.listen.host
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{config.server.listen.port}"


def operator_key(config: Config) -> str:
    """The local API key an operator command sends: the configured one, else the one the
    daemon of ``config`` wrote beside its store. OperatorError when there is none."""
    key = local_key(config.atlasburn.api_key.reveal(), config.storage.path.parent, create=False)
    if key is None:
        raise OperatorError(
            "no key for the local API: set atlasburn.api_key, or start the daemon once "
            f"(it writes one to {config.storage.path.parent / 'local-api-key'})"
        )
    return key


def _refused(exc: urllib.error.HTTPError, config: Config) -> OperatorError:
    """The daemon's error answer, in one line. A 401 says which key this command sent: the
    usual cause is a command run without the daemon's config (another state directory)."""
    try:
        detail = inert(str(json.loads(exc.read(_MAX_ANSWER))["error"]["message"]))
    except (ValueError, KeyError, TypeError):
        detail = inert(str(exc.reason))
    message = f"the daemon at {base_url(config)} answered {exc.code}: {detail}"
    if exc.code == 401:
        sent = (
            "the configured atlasburn.api_key"
            if config.atlasburn.api_key
            else f"the key in {config.storage.path.parent / 'local-api-key'}"
        )
        message += (
            f" (this command sent {sent}; if the daemon runs with a config file, give this"
            " command the same one: --config FILE, or ATLASBURN_PROXY_CONFIG)"
        )
    return OperatorError(message)


def call(config: Config, method: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """``/api/guardrails/enforce`` of the daemon of ``config`` for its org: GET reads the flag,
    POST (``body``: the suspension) suspends, DELETE resumes. The daemon's JSON answer."""
    path = "/api/guardrails/enforce"
    data = None
    if method == "GET":
        path += "?org_id=" + urllib.parse.quote(config.atlasburn.org_id)
    else:
        data = json.dumps({"org_id": config.atlasburn.org_id, **(body or {})}).encode()
    answer = ask(config, method, path, data, {"Content-Type": "application/json"})
    if not isinstance(answer, dict) or answer.get("state") not in ("ok", "suspended"):
        raise OperatorError(
            f"{base_url(config)} gave no guardrail state (is an atlasburn-proxy daemon there?)"
        )
    return answer


def ask(
    config: Config,
    method: str,
    path: str,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
    limit: int = _MAX_ANSWER,
) -> Any:
    """One request to the local API of the daemon of ``config``, with the operator's key
    (``operator_key``): the JSON it answers (at most ``limit`` bytes read). OperatorError, in
    one line, when the daemon refuses (its message; a 401 says which key was sent), cannot
    be reached or answers no JSON (another server on that port)."""
    request = urllib.request.Request(
        base_url(config) + path,
        data=data,
        method=method,
        headers={HEADER: operator_key(config), **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:  # noqa: S310
            text = response.read(limit)
    except urllib.error.HTTPError as exc:
        raise _refused(exc, config) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise OperatorError(
            f"cannot reach the daemon at {base_url(config)}: {inert(str(reason))}"
        ) from None
    try:
        return json.loads(text)
    except ValueError:
        raise OperatorError(
            f"{base_url(config)} answered {path.split('?')[0]} with no JSON"
            " (is an atlasburn-proxy daemon there?)"
        ) from None


def describe(config: Config, answer: dict[str, Any]) -> str:
    """One line for the terminal. What the daemon answers is shown inert (``proxy.text``): a
    reason stored by an older version may hold escape sequences or megabytes."""
    org = config.atlasburn.org_id
    if answer.get("state") != "suspended":
        return f"org {org}: ok ({_shown(answer.get('kv_key'))})"
    until = _shown(answer.get("expires_at") or "the AtlasBurn API resumes it")
    text = f"org {org}: SUSPENDED until {until}"
    if answer.get("layer"):
        text += f" by {_shown(answer['layer'])}"
    if answer.get("reason"):
        text += f": {_shown(answer['reason'])}"
    return text


def _shown(value: object) -> str:
    return inert(str(value))
