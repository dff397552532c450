"""``atlasburn-proxy ui``: a one-time login URL for the running daemon's status page.

The command asks the daemon (``POST /api/ui/login-tokens``, with the local API key, like
``status``) for a login token and prints the URL that redeems it; where a browser can be shown
(a terminal on a desktop: ``DISPLAY`` or ``WAYLAND_DISPLAY`` set, or macOS) it also opens it.
The URL works once, within two minutes (``sessions.TOKEN_SECONDS``).
"""

from __future__ import annotations

import os
import sys
import webbrowser

from ..config import Config
from ..control import OperatorError, ask, base_url

_MAX_ANSWER = 1 << 16  # bytes read of the daemon's answer (a token and a path)


def login_url(config: Config) -> str:
    """The login URL from the daemon of ``config``; OperatorError with what went wrong."""
    base = base_url(config)
    answer = ask(config, "POST", "/api/ui/login-tokens", b"", limit=_MAX_ANSWER)
    path = answer.get("path") if isinstance(answer, dict) else None
    if not isinstance(path, str) or not path.startswith("/ui/login?token="):
        raise OperatorError(f"the daemon at {base} gave no login URL (an older version?)")
    return base + path


def can_open_browser() -> bool:
    """Whether a browser window would be seen: an interactive terminal on a desktop."""
    if not sys.stdout.isatty():
        return False
    return sys.platform == "darwin" or bool(
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    )


def open_browser(url: str) -> bool:
    try:
        return webbrowser.open(url)
    except webbrowser.Error:
        return False
