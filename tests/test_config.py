"""Config: defaults, the example file, interpolation, and one exact error per bad key."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from yarl import URL

from proxy.config import (
    Config,
    Listen,
    PriceOverride,
    Secret,
    load_config,
    parse_config,
    parse_listen,
)
from proxy.errors import ConfigError

EXAMPLE = Path(__file__).parent.parent / "config.example.toml"


def problems(data: dict[str, object], env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, env or {})
    return info.value.problems


def test_embedded_defaults() -> None:
    cfg = load_config(None, env={})
    assert cfg.server.listen == Listen("127.0.0.1", 8787)
    assert cfg.server.max_body_bytes == 33554432
    assert cfg.atlasburn.api_base == "" and not cfg.atlasburn.api_key
    assert cfg.atlasburn.org_id == "org_local"
    assert cfg.telemetry.flush_interval_ms == 1000 and cfg.telemetry.batch_max_events == 500
    loop = cfg.guardrails.dumb_loop_detector
    assert (loop.enabled, loop.threshold, loop.window_seconds, loop.ttl_seconds) == (
        True,
        4,
        60.0,
        7200.0,
    )
    agent = cfg.guardrails.agent_loop_detector
    assert (agent.enabled, agent.threshold, agent.lookback, agent.scope, agent.ttl_seconds) == (
        True,
        4,
        20,
        "conversation",
        7200.0,
    )
    assert agent.exempt_tools == frozenset()
    assert {n: (p.kind, str(p.base_url)) for n, p in cfg.providers.items()} == {
        "openai": ("openai", "https://api.openai.com"),
        "anthropic": ("anthropic", "https://api.anthropic.com"),
        "gemini": ("gemini", "https://generativelanguage.googleapis.com"),
    }


def test_example_file_documents_exactly_the_defaults() -> None:
    """config.example.toml loads, and every value in it is the default."""
    example = load_config(EXAMPLE, env={})
    defaults = Config()
    sections = ("server", "upstream", "logging", "atlasburn", "telemetry", "guardrails")
    for section in (*sections, "attribution", "price_data"):
        assert getattr(example, section) == getattr(defaults, section), section
    assert example.providers == defaults.providers
    assert example.storage == defaults.storage


def test_example_file_names_every_key() -> None:
    """Every key the loader knows appears in the example (a key missing there is undocumented)."""
    doc = tomllib.loads(EXAMPLE.read_text())
    cfg = Config()
    sections = ("server", "upstream", "logging", "storage", "atlasburn", "telemetry")
    for section in (*sections, "attribution", "price_data"):
        assert set(doc[section]) == set(type(getattr(cfg, section)).__slots__), section
    assert set(doc["guardrails"]["dumb_loop_detector"]) == set(
        type(cfg.guardrails.dumb_loop_detector).__slots__
    )
    assert set(doc["guardrails"]["agent_loop_detector"]) == set(
        type(cfg.guardrails.agent_loop_detector).__slots__
    )
    assert set(doc["guardrails"]["spend_cap"]) == set(type(cfg.guardrails.spend_cap).__slots__)
    assert set(doc["providers"]["openai"]) == {
        "kind",
        "base_url",
        "enabled",
        "inject_stream_usage",
        "price_as",
    }
    assert doc["pricing"] == {}


def test_errors_name_the_dotted_key_and_all_are_reported() -> None:
    got = problems(
        {
            "server": {"listen": "8787", "max_body_bytes": "big", "bogus": 1},
            "upstream": {"read_timeout_seconds": 0},
            "logging": {"level": "loud"},
            "atlasburn": {"api_base": "api.atlasburn.com", "api_key": "sk-123"},
            "guardrails": {"dumb_loop_detector": {"threshold": 1, "enabled": "yes"}},
            "providers": {
                "openai": {"base_url": "api.openai.com"},
                "mistral": {"base_url": "https://api.mistral.ai"},
                "local": {"kind": "llama", "base_url": "http://127.0.0.1:11434"},
            },
            "extra": {},
        }
    )
    assert got == [
        "server.listen: expected HOST:PORT (e.g. '127.0.0.1:8787' or '[::1]:8787'), got '8787'",
        "server.max_body_bytes: expected an integer, got str 'big'",
        "server.bogus: unknown key",
        "upstream.read_timeout_seconds: must be between 0.001 and 86400, got 0.0",
        "logging.level: must be one of debug, info, warning, error; got 'loud'",
        "atlasburn.api_base: expected an http(s) URL, got 'api.atlasburn.com'",
        "atlasburn.api_key: an AtlasBurn API key starts with 'abn_'",
        "guardrails.dumb_loop_detector.enabled: expected true or false, got str 'yes'",
        "guardrails.dumb_loop_detector.threshold: must be between 2 and 1000000, got 1",
        "providers.openai.base_url: expected an http(s) URL, got 'api.openai.com'",
        "providers.mistral.kind: required for a new provider; "
        "one of openai, anthropic, gemini, azure",
        "providers.local.kind: unknown kind 'llama'; known kinds: openai, anthropic, gemini, azure",
        "extra: unknown key",
    ]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {"server": {"max_body_bytes": True}},
            "server.max_body_bytes: expected an integer, got boolean true",
        ),
        ({"server": "x"}, "server: expected a table, got str 'x'"),
        ({"server": {"listen": "[::1:80"}}, "server.listen: unbalanced brackets in '[::1:80'"),
        (
            {"server": {"listen": "::1:80"}},
            "server.listen: put an IPv6 address in brackets, e.g. '[::1]:8787', got '::1:80'",
        ),
        (
            {"server": {"listen": "127.0.0.1:99999"}},
            "server.listen: port must be a number from 0 to 65535, got '99999'",
        ),
        (
            {"providers": {"api": {"kind": "openai", "base_url": "http://x"}}},
            "providers.api: 'api' is a route the daemon serves itself; pick another name",
        ),
        (
            {"providers": {"My Host": {"kind": "openai", "base_url": "http://x"}}},
            "providers.My Host: a provider name is lowercase letters, digits, '_' and '-'",
        ),
        (
            {"providers": {"x": {"kind": "openai", "base_url": "https://u:p@h"}}},
            "providers.x.base_url: credentials do not belong in the URL; providers' keys come "
            "from the client",
        ),
        (
            {"providers": {"x": {"kind": "openai", "base_url": "https://h/v1?key=1"}}},
            "providers.x.base_url: a base URL has no query or fragment, got 'https://h/v1?key=1'",
        ),
        (
            {"providers": {"x": {"kind": "openai"}}},
            "providers.x.base_url: required for a new provider",
        ),
        (
            {"atlasburn": {"api_base": "https://api.atlasburn.com"}},
            "atlasburn.api_key: required when atlasburn.api_base is set (an 'abn_...' key)",
        ),
        (
            {"atlasburn": {"org_id": "has space"}},
            "atlasburn.org_id: must be 1-128 characters of letters, digits and _ . : -, "
            "got 'has space'",
        ),
        (
            # Matched whole: "$" let a final newline through.
            {"atlasburn": {"org_id": "acme\n"}},
            "atlasburn.org_id: must be 1-128 characters of letters, digits and _ . : -, "
            "got 'acme\\n'",
        ),
        (
            {"server": {"allowed_hosts": ["atlasburn-proxy:8787"]}},
            "server.allowed_hosts: expected a host name without port (e.g. 'atlasburn-proxy', "
            "'.svc.cluster.local' or '*'), got 'atlasburn-proxy:8787'",
        ),
        (
            {"server": {"allowed_origins": ["localhost:3000"]}},
            "server.allowed_origins: expected an origin like 'http://localhost:3000' (scheme, "
            "host, port), got 'localhost:3000'",
        ),
        (
            {"server": {"allowed_origins": ["http://localhost:3000/app"]}},
            "server.allowed_origins: expected an origin like 'http://localhost:3000' (scheme, "
            "host, port), got 'http://localhost:3000/app'",
        ),
        (
            {"server": {"header_timeout_seconds": 0}},
            "server.header_timeout_seconds: must be between 0.1 and 3600, got 0.0",
        ),
        (
            {"server": {"max_client_connections": -1}},
            "server.max_client_connections: must be between 0 and 1000000, got -1",
        ),
        (
            {"upstream": {"pool_timeout_seconds": 0}},
            "upstream.pool_timeout_seconds: must be between 0.001 and 3600, got 0.0",
        ),
    ],
)
def test_single_errors(data: dict[str, object], expected: str) -> None:
    assert problems(data) == [expected]


def test_pricing_overrides() -> None:
    cfg = parse_config(
        {
            "pricing": {
                "my-model": {"input": 0.3, "output": 1, "cache_write": 0.5},
                "other": {"input": 1, "output": 2, "provider": "anthropic"},
            }
        },
        {},
    )
    assert cfg.pricing["my-model"] == PriceOverride("my-model", 0.3, 1.0, 0.3, 0.5, 0.5, "")
    assert cfg.pricing["other"].provider == "anthropic"
    assert problems({"pricing": {"m": {"input": -1, "outptu": 2, "provider": "nope"}}}) == [
        "pricing.m.input: must be between 0 and 1000000, got -1.0",
        "pricing.m.output: required: USD per million tokens",
        "pricing.m.provider: no provider 'nope' is configured",
        "pricing.m.outptu: unknown key; did you mean `output`?",
    ]
    assert problems({"providers": {"openai": {"price_as": "Open AI"}}}) == [
        "providers.openai.price_as: expected a genai-prices provider id (e.g. 'openai') or "
        "'none', got 'Open AI'"
    ]


def test_providers_merge_add_and_disable() -> None:
    cfg = parse_config(
        {
            "providers": {
                "openai": {"base_url": "https://gateway.example/openai/"},
                "gemini": {"enabled": False},
                "groq": {"kind": "openai", "base_url": "https://api.groq.com"},
            }
        },
        {},
    )
    assert list(cfg.providers) == ["openai", "anthropic", "groq"]
    assert cfg.providers["openai"].base_url == URL("https://gateway.example/openai")
    assert cfg.providers["openai"].kind == "openai"
    assert cfg.providers["groq"].kind == "openai"


def test_env_interpolation() -> None:
    env = {"ABN_KEY": "abn_test_123", "PORT": "9000"}
    cfg = parse_config(
        {
            "server": {"listen": "127.0.0.1:${PORT}"},
            "atlasburn": {
                "api_base": "${API_BASE:-https://api.atlasburn.example}",
                "api_key": "${ABN_KEY}",
            },
            "storage": {"path": "/var/lib/a$$b/${MISSING:-spool}.db"},
        },
        env,
    )
    assert cfg.server.listen.port == 9000
    assert cfg.atlasburn.api_base == "https://api.atlasburn.example"
    assert cfg.atlasburn.api_key.reveal() == "abn_test_123"
    assert cfg.storage.path == Path("/var/lib/a$b/spool.db")


def test_unset_variable_is_empty_with_a_warning() -> None:
    cfg = parse_config({"atlasburn": {"api_key": "${NOT_SET_ANYWHERE}"}}, {})
    assert not cfg.atlasburn.api_key
    assert cfg.warnings == (
        "atlasburn.api_key: environment variable NOT_SET_ANYWHERE is not set; using an empty value",
    )


def test_relative_storage_path_is_named_with_the_path_it_resolved_to(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative storage.path depends on the working directory (a shell's is not systemd's)."""
    monkeypatch.chdir(tmp_path)
    cfg = parse_config({"storage": {"path": "state/spool.db"}}, {})
    assert cfg.storage.path == Path("state/spool.db")
    assert cfg.warnings == (
        f"storage.path: 'state/spool.db' is relative to the working directory; it resolved to "
        f"{tmp_path}/state/spool.db (use an absolute path)",
    )
    for absolute in ("/var/lib/atlasburn-proxy/spool.db", "~/spool.db", ""):
        assert parse_config({"storage": {"path": absolute}}, {}).warnings == ()


def test_secret_never_shows() -> None:
    cfg = parse_config({"atlasburn": {"api_key": "abn_test_secretvalue"}}, {})
    assert "abn_test_secretvalue" not in repr(cfg)
    assert "abn_test_secretvalue" not in str(Secret("abn_test_secretvalue"))


def test_listen_override_and_ipv6() -> None:
    cfg = load_config(EXAMPLE, listen="[::1]:0", env={})
    assert cfg.server.listen == Listen("::1", 0)
    assert str(cfg.server.listen) == "[::1]:0"
    assert parse_listen("0.0.0.0:8787") == Listen("0.0.0.0", 8787)


def test_allowed_hosts_and_origins_are_normalised_and_come_from_the_environment() -> None:
    cfg = parse_config(
        {
            "server": {
                "allowed_hosts": ["Atlasburn-Proxy.", ".svc.cluster.local"],
                "allowed_origins": ["HTTP://LocalHost:3000", "https://app.example:443"],
            }
        },
        env={},
    )
    assert cfg.server.allowed_hosts == ("atlasburn-proxy", ".svc.cluster.local")
    assert cfg.server.allowed_origins == ("http://localhost:3000", "https://app.example")
    env = {"ATLASBURN_PROXY_ALLOWED_HOSTS": "atlasburn-proxy, proxy.internal"}
    assert load_config(None, env=env).server.allowed_hosts == ("atlasburn-proxy", "proxy.internal")


def test_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\nlisten = 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert info.value.problems[0].startswith(f"{bad}: not valid TOML: ")
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "missing.toml")
    assert info.value.problems == [
        f"{tmp_path / 'missing.toml'}: cannot read: No such file or directory"
    ]


def test_state_dir_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path))
    assert Config().storage.path == tmp_path / "atlasburn-proxy.sqlite3"
    cfg = parse_config({"storage": {"path": "~/spool.db"}}, {})
    assert cfg.storage.path == Path.home() / "spool.db"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {"guardrails": {"dumb_loop_detector": {"scope": "team"}}},
            "guardrails.dumb_loop_detector.scope: must be one of org, fingerprint; got 'team'",
        ),
        (
            {"guardrails": {"dumb_loop_detector": {"allow_fingerprints": ["abc"]}}},
            "guardrails.dumb_loop_detector.allow_fingerprints: expected fingerprints like "
            "'sha256:<64 hex digits>', got 'abc'",
        ),
        (
            {"guardrails": {"dumb_loop_detector": {"allow_fingerprints": "sha256:x"}}},
            "guardrails.dumb_loop_detector.allow_fingerprints: expected an array, got str "
            "'sha256:x'",
        ),
        (
            {"guardrails": {"dumb_loop_detector": {"exempt_header": "X Sample"}}},
            "guardrails.dumb_loop_detector.exempt_header: not a header name: 'X Sample'",
        ),
        (
            {"guardrails": {"agent_loop_detector": {"threshold": 1}}},
            "guardrails.agent_loop_detector.threshold: must be between 2 and 1000, got 1",
        ),
        (
            {"guardrails": {"agent_loop_detector": {"threshold": 6, "lookback": 5}}},
            "guardrails.agent_loop_detector.lookback: must be at least threshold (6), got 5: a"
            " tool call cannot repeat more often than the calls looked at",
        ),
        (
            {"guardrails": {"agent_loop_detector": {"scope": "fleet"}}},
            "guardrails.agent_loop_detector.scope: must be one of conversation, org; got 'fleet'",
        ),
        (
            {"guardrails": {"agent_loop_detector": {"exempt_tools": ["poll", ""]}}},
            "guardrails.agent_loop_detector.exempt_tools: expected tool names (non-empty"
            " strings), got ''",
        ),
        (
            {"guardrails": {"agent_loop_detector": {"exempt_tools": "poll"}}},
            "guardrails.agent_loop_detector.exempt_tools: expected an array, got str 'poll'",
        ),
        (
            {"guardrails": {"agent_loop_detector": {"lookbak": 30}}},
            "guardrails.agent_loop_detector.lookbak: unknown key; did you mean `lookback`?",
        ),
        (
            {"guardrails": {"spend_cap": {"enabled": True}}},
            "guardrails.spend_cap.enabled: set max_usd_per_hour and/or max_usd_per_day (above 0)",
        ),
        (
            {"guardrails": {"spend_cap": {"max_usd_per_day": -5}}},
            "guardrails.spend_cap.max_usd_per_day: must be between 0 and 1000000000.0, got -5.0",
        ),
    ],
)
def test_guardrail_errors(data: dict[str, object], expected: str) -> None:
    assert problems(data) == [expected]


def test_a_changed_fleet_url_is_named_for_a_restart() -> None:
    """A fresh user's trial: SIGHUP with a new [fleet] redis_url said "no change"."""
    from proxy.app import LIVE_KEYS, changed_keys

    old = parse_config({})
    new = parse_config({"fleet": {"redis_url": "redis://127.0.0.1:6380/2"}})
    assert changed_keys(old, new) == ["fleet.redis_url"]
    assert not "fleet.redis_url".startswith(LIVE_KEYS)  # applied at the next start


def test_a_changed_attribution_section_is_named_as_applied() -> None:
    """SIGHUP after naming a key in [attribution.key_names] applied the name but logged
    "reload: applied nothing (no change)"."""
    from proxy.app import LIVE_KEYS, changed_keys

    old = parse_config({"attribution": {"process": True}})
    new = parse_config(
        {
            "attribution": {
                "process": False,
                "key_names": {"key_0123456789abcdef": "team-search"},
            }
        }
    )
    assert changed_keys(old, new) == ["attribution.process", "attribution.key_names"]
    assert all(k.startswith(LIVE_KEYS) for k in changed_keys(old, new))


def test_a_provider_key_given_for_a_key_id_is_refused_and_never_shown() -> None:
    """Naming a key by pasting the key itself (as a key_names entry, or a budget's key_id)
    echoed it whole in the config error, which `run` writes to the journal; a short one made a
    budget that could never match."""
    key = "sk-test-fake-" + "A1b2" * 40  # as long as a real project key, obviously fake
    short = "sk-test-fake-short"
    got = problems(
        {
            "attribution": {"key_names": {"key_0123456789abcdef": "ok", key: "team"}},
            "guardrails": {
                "budgets": [
                    {"name": "a", "match": {"key_id": key}, "max_usd_per_hour": 1},
                    {"name": "b", "match": {"key_id": short}, "max_usd_per_hour": 1},
                    {"name": "c", "match": {"key_id": "key_0123*"}, "max_usd_per_hour": 1},
                    {"name": "d", "match": {"key_id": "key_01234"}, "max_usd_per_hour": 1},
                ]
            },
        }
    )
    wrong = (
        "expected a key id like 'key_0123456789abcdef' or a shell glob of key ids"
        " (atlasburn-proxy key-id prints a key's id), got "
    )
    required = ': required: a table of what the budget covers, e.g. match = { app = "ci-bot" }'
    assert got == [
        f"guardrails.budgets[0].match.key_id: {wrong}(not shown)",
        f"guardrails.budgets[0].match{required}",
        f"guardrails.budgets[1].match.key_id: {wrong}(not shown)",
        f"guardrails.budgets[1].match{required}",
        f"guardrails.budgets[3].match.key_id: {wrong}'key_01234'",
        f"guardrails.budgets[3].match{required}",
        "attribution.key_names.(not shown): expected a key id like 'key_0123456789abcdef'"
        " (atlasburn-proxy key-id prints one)",
    ]


def test_attribution_and_budget_errors_name_the_key() -> None:
    got = problems(
        {
            "attribution": {
                "process": "yes",
                "key_names": {"key_0123456789abcdef": "team-search", "key_bad": "x"},
            },
            "guardrails": {
                "budgets": [
                    {
                        "name": "ci",
                        "match": {"app": "ci-*", "tag:Team": "search", "bogus": "x"},
                        "max_usd_per_hour": 5,
                    },
                    {"name": "ci", "match": {}},
                    {"match": {"app": ""}, "max_usd_per_day": 1, "warn_at": 2},
                    "not a table",
                ]
            },
        }
    )
    assert got == [
        "guardrails.budgets[3]: expected a table, got str 'not a table'",
        "guardrails.budgets[0].match.bogus: unknown dimension; expected one of app, user,"
        " key_id, key_name, unit, model, provider or tag:<Name>",
        "guardrails.budgets[1].name: another budget is named 'ci'",
        "guardrails.budgets[1].match: required: a table of what the budget covers, e.g."
        ' match = { app = "ci-bot" }',
        "guardrails.budgets[1].max_usd_per_hour: set max_usd_per_hour and/or max_usd_per_day"
        " (above 0)",
        "guardrails.budgets[2].name: required: a budget's name shows in refusals, logs and"
        " reports",
        "guardrails.budgets[2].match.app: expected 1-128 bytes (a value or a shell glob), got ''",
        "guardrails.budgets[2].match: required: a table of what the budget covers, e.g."
        ' match = { app = "ci-bot" }',
        "guardrails.budgets[2].warn_at: must be between 0.01 and 1, got 2.0",
        "attribution.process: expected true or false, got str 'yes'",
        "attribution.key_names.key_bad: expected a key id like 'key_0123456789abcdef'"
        " (atlasburn-proxy key-id prints one)",
    ]


def test_budget_match_is_sorted_and_tags_lower_cased() -> None:
    cfg = parse_config(
        {
            "guardrails": {
                "budgets": [
                    {
                        "name": "search",
                        "match": {"tag:Team": "search", "app": "web-*"},
                        "max_usd_per_day": 20,
                    }
                ]
            }
        },
        env={},
    )
    [budget] = cfg.guardrails.budgets
    assert budget.match == (("app", "web-*"), ("tag:team", "search"))
    assert (budget.max_usd_per_hour, budget.max_usd_per_day, budget.warn_at) == (0.0, 20.0, 0.8)


def test_a_misspelt_provider_name_is_pointed_at_the_built_in_one() -> None:
    assert problems({"providers": {"opneai": {"base_url": "https://api.openai.com"}}}) == [
        "providers.opneai.kind: required for a new provider; one of openai, anthropic, gemini,"
        " azure (or did you mean [providers.openai]?)"
    ]
