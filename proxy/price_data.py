"""Newer genai-prices data for a running daemon, without a restart (issue 16.8.3).

With ``[price_data] refresh_url`` set, a background task fetches that data file (genai-prices
publishes its own at ``genai_prices.update_prices.DEFAULT_UPDATE_URL``, the JSON array of
providers its ``UpdatePrices`` fetches) at start-up and every ``refresh_interval_seconds``, in the
background: start-up and requests never wait for it. A file is taken only when it is whole
(within ``timeout_seconds`` and ``max_bytes``), is JSON, passes genai-prices' own schema, and
still names the providers the daemon prices by default (openai, anthropic, google); then the
pricer's catalog and resolved rates are swapped in one step (``Pricer.use``). Anything else
keeps the data in use (the packaged snapshot until a fetch succeeds), and is logged once per
kind of failure until a fetch succeeds again. ``proxy/price_corrections.toml`` and ``[pricing]``
still apply over fetched data, as over the packaged one.

Off by default: a daemon that relays to the providers a user configured should not also call a
third party (GitHub) unless asked, and an air-gapped host would log a failure every hour.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson

from .config import PriceDataConfig
from .pricing import Catalog

log = logging.getLogger(__name__)

# A data file that lacks any of these is refused: it would leave common models unpriced.
REQUIRED_PROVIDERS = ("openai", "anthropic", "google")


class Refused(Exception):
    """A fetched file not taken; ``kind`` names the failure (logged once per kind)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


def build_catalog(body: bytes, data: str) -> Catalog:
    """A catalog over a genai-prices data file (CPU-bound, ~0.1-0.5 s for the real one: run it
    in a thread). Raises ``Refused`` when the file is not one."""
    from genai_prices.data_snapshot import DataSnapshot
    from genai_prices.types import _providers_from_raw  # what UpdatePrices.fetch uses

    try:
        raw: Any = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise Refused("not JSON", str(exc)) from None
    if not isinstance(raw, list):
        raise Refused("wrong schema", "expected a JSON array of providers")
    try:
        providers = _providers_from_raw(raw)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise Refused("wrong schema", str(exc).splitlines()[0]) from None
    missing = sorted(set(REQUIRED_PROVIDERS) - {p.id for p in providers})
    if missing:
        raise Refused("wrong schema", f"no provider {', '.join(missing)}")
    return Catalog(snapshot=DataSnapshot(providers, from_auto_update=True), data=data)


class PriceRefresher:
    """Fetches ``config.refresh_url`` and hands each new valid catalog to ``use``."""

    def __init__(self, config: PriceDataConfig, use: Callable[[Catalog], None]) -> None:
        self.config = config
        self._use = use
        self.catalog: Catalog | None = None  # the newest fetched data, for a reload's pricer
        self._digest = b""
        self._logged: set[str] = set()
        self.failures_total = 0

    async def run(self) -> None:
        """Refresh now and then every interval, until cancelled."""
        while True:
            await self.refresh()
            await asyncio.sleep(self.config.refresh_interval_seconds)

    async def refresh(self) -> bool:
        """One fetch; True when new data is now in use. Never raises but on cancellation."""
        url = self.config.refresh_url
        try:
            body = await self._fetch(url)
            digest = hashlib.sha256(body).digest()
            if digest == self._digest:
                return False  # unchanged: nothing to rebuild
            when = datetime.now(tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            data = f"data fetched {when} from {url}, sha256 {digest.hex()[:12]}"
            catalog = await asyncio.to_thread(build_catalog, body, data)
        except Refused as exc:
            self._failed(exc.kind, str(exc))
            return False
        self._digest = digest
        self._logged.clear()  # a later outage is logged again
        self.catalog = catalog
        self._use(catalog)
        log.info("pricing from genai-prices %s", data)
        return True

    async def _fetch(self, url: str) -> bytes:
        limit = self.config.max_bytes
        timeout = aiohttp.ClientTimeout(total=self.config.timeout_seconds)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.get(url) as response,
            ):
                if response.status != 200:
                    raise Refused(f"HTTP {response.status}", f"{url} answered {response.status}")
                if (response.content_length or 0) > limit:
                    raise Refused("too large", f"{response.content_length} bytes > {limit}")
                body = bytearray()
                async for chunk in response.content.iter_chunked(65536):
                    body += chunk
                    if len(body) > limit:
                        raise Refused("too large", f"more than {limit} bytes")
                return bytes(body)
        except TimeoutError:
            raise Refused(
                "timeout", f"no whole answer within {self.config.timeout_seconds} s"
            ) from None
        except aiohttp.ClientError as exc:
            raise Refused("unreachable", f"{type(exc).__name__}: {exc}") from None

    def _failed(self, kind: str, message: str) -> None:
        self.failures_total += 1
        if kind not in self._logged:
            self._logged.add(kind)
            using = self.catalog.data if self.catalog is not None else "packaged data"
            log.warning(
                "newer genai-prices data not taken from %s (%s); still pricing from %s",
                self.config.refresh_url,
                message,
                using,
            )
