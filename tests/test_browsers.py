"""The Host and Origin checks (``proxy.browsers``): what a browser's request may carry."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from proxy.browsers import BrowserGuard
from proxy.config import parse_config

EXAMPLE = Path(__file__).parent.parent / "config.example.toml"


def guard(**server: object) -> BrowserGuard:
    return BrowserGuard(parse_config({"server": server}, env={}).server)


@pytest.mark.parametrize(
    ("host", "served"),
    [
        ("127.0.0.1:8787", True),
        ("127.0.0.1", True),
        ("[::1]:8787", True),
        ("10.1.2.3:8787", True),  # an address is never an attacker's name
        ("localhost:8787", True),
        ("LOCALHOST.:8787", True),
        ("app.localhost:8787", True),
        ("evil.example:8787", False),
        ("rebind.127.0.0.1.nip.io:8787", False),
        ("x", False),  # single-label names resolve through search domains and LLMNR
        ("localhost.evil.example", False),
        ("[::1", False),
        ("[::1]junk", False),
        ("127.0.0.1:http", False),
    ],
)
def test_hosts_served_by_default(host: str, served: bool) -> None:
    assert (guard().refusal({"Host": host}) is None) is served


def test_configured_hosts() -> None:
    g = guard(allowed_hosts=["atlasburn-proxy", ".svc.cluster.local"])
    assert g.refusal({"Host": "atlasburn-proxy:8787"}) is None
    assert g.refusal({"Host": "proxy.ns.svc.cluster.local:8787"}) is None
    assert g.refusal({"Host": "svc.cluster.local"}) is None
    assert g.refusal({"Host": "evil-svc.cluster.local"}) is not None
    assert guard(allowed_hosts=["*"]).refusal({"Host": "anything.example"}) is None


def commented_example(key: str) -> str:
    """The commented-out ``key = [...]`` example of config.example.toml, uncommented."""
    lines = EXAMPLE.read_text().splitlines()
    start = lines.index(next(line for line in lines if line.startswith(f"# {key} = [")))
    end = next(i for i in range(start, len(lines)) if lines[i].endswith("]"))
    return "\n".join(line.removeprefix("#") for line in lines[start : end + 1])


def test_the_example_allowed_hosts_serve_every_name_of_a_kubernetes_service() -> None:
    """config.example.toml's example covers each name a pod reaches a Service by."""
    g = guard(**tomllib.loads(commented_example("allowed_hosts")))
    for name in (
        "atlasburn-proxy",
        "atlasburn-proxy.default",
        "atlasburn-proxy.default.svc",
        "atlasburn-proxy.default.svc.cluster.local",
        "atlasburn-proxy.default.svc.cluster.local.",
    ):
        assert g.refusal({"Host": f"{name}:8787"}) is None, name
    for name in ("evil.example", "other.default.svc", "atlasburn-proxy.evil.example"):
        assert g.refusal({"Host": f"{name}:8787"}) is not None, name


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, None),  # SDKs, curl: neither header
        (
            {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"},
            "cross_origin_request",
        ),
        ({"Origin": "null"}, "cross_origin_request"),  # sandboxed frames, file: pages
        ({"Origin": "http://127.0.0.1:9999"}, "cross_origin_request"),  # another local port
        ({"Origin": "https://127.0.0.1:8787"}, "cross_origin_request"),  # another scheme
        ({"Sec-Fetch-Site": "cross-site"}, "cross_site_request"),  # <img>, <script>
        ({"Sec-Fetch-Site": "same-site"}, "cross_site_request"),
        ({"Origin": "http://127.0.0.1:8787", "Sec-Fetch-Site": "same-origin"}, None),
        ({"Sec-Fetch-Site": "none"}, None),  # typed into the address bar
        ({"Sec-Fetch-Site": "same-origin"}, None),
        ({"Origin": "http://localhost:3000", "Sec-Fetch-Site": "same-site"}, None),
    ],
)
def test_origins(headers: dict[str, str], code: str | None) -> None:
    g = guard(allowed_origins=["http://localhost:3000"])
    refused = g.refusal({"Host": "127.0.0.1:8787", **headers})
    assert (refused[0] if refused else None) == code


def test_the_host_is_checked_before_the_origin() -> None:
    refused = guard().refusal({"Host": "evil.example:8787", "Origin": "http://evil.example:8787"})
    assert refused is not None and refused[0] == "forbidden_host"
