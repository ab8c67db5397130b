"""CDS client keys that rotate: JWKS fetched from an issuer's allow-listed `jku` URLs.

An issuer may list JWKS URLs (`CdsIssuer.jku`); a token's `jku` header must be one of them
(checked by `trust.TokenVerifier`), and its keys are fetched from there. Each URL's key set is
cached for its `Cache-Control: max-age` (clamped to [`min_refresh_s`, `max_ttl_s`]; no header:
`default_ttl_s`). A token naming a `kid` the cached set lacks triggers a refetch, at most once
per `min_refresh_s` per URL (so a stream of made-up kids cannot turn into a stream of requests);
a failed fetch keeps the last good set. Fetches never follow redirects, time out after
`timeout_s` and read at most `max_bytes`.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from service.clinical.trust import Key, TrustConfigError, load_keys

log = logging.getLogger("mcserve.cds.trust")
MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*(\d+)", re.IGNORECASE)


class FetchError(Exception):
    pass


@dataclass
class Entry:
    keys: list[Key]
    fetched: float  # monotonic time of the last try, good or not
    expires: float


class JwksFetcher:
    def __init__(
        self,
        *,
        timeout_s: float = 5.0,
        max_bytes: int = 64 * 1024,
        min_refresh_s: float = 30.0,
        default_ttl_s: float = 300.0,
        max_ttl_s: float = 86_400.0,
        clock: Callable[[], float] = time.monotonic,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.min_refresh_s = min_refresh_s
        self.default_ttl_s = default_ttl_s
        self.max_ttl_s = max_ttl_s
        self.clock = clock
        self.transport = transport
        self.fetches = 0  # HTTP requests made (for tests and logs)
        self._cache: dict[str, Entry] = {}

    async def keys(self, iss: str, url: str, kid: str | None) -> list[Key]:
        """The keys published at `url` (cached; refetched when expired or `kid` is unknown)."""
        now = self.clock()
        entry = self._cache.get(url)
        if entry is not None:
            known = any(k.kid == kid for k in entry.keys)
            if now < entry.expires and known:
                return entry.keys
            if now - entry.fetched < self.min_refresh_s:
                return entry.keys  # rate-limited: an unknown kid does not refetch every time
        try:
            keys, ttl = await self._fetch(iss, url)
        except FetchError as exc:
            log.warning("JWKS fetch failed", extra={"iss": iss, "url": url, "reason": str(exc)})
            stale = entry.keys if entry is not None else []
            self._cache[url] = Entry(stale, now, now)  # keep the last good set; retry later
            return stale
        self._cache[url] = Entry(keys, now, now + ttl)
        log.info("JWKS fetched", extra={"iss": iss, "url": url, "keys": len(keys)})
        return keys

    async def _fetch(self, iss: str, url: str) -> tuple[list[Key], float]:
        self.fetches += 1
        body = bytearray()
        try:
            async with (
                httpx.AsyncClient(
                    timeout=self.timeout_s, follow_redirects=False, transport=self.transport
                ) as client,
                client.stream("GET", url, headers={"Accept": "application/json"}) as r,
            ):
                if r.status_code != 200:
                    raise FetchError(f"HTTP {r.status_code} (redirects are not followed)")
                async for chunk in r.aiter_bytes():
                    body += chunk
                    if len(body) > self.max_bytes:
                        raise FetchError(f"the key set is over {self.max_bytes} bytes")
                cache_control = r.headers.get("cache-control", "")
        except httpx.HTTPError as exc:
            raise FetchError(f"{type(exc).__name__}: {exc}") from None
        try:
            keys = load_keys(iss, json.loads(body), None)
        except (ValueError, TrustConfigError) as exc:  # JSONDecodeError is a ValueError
            raise FetchError(str(exc)) from None
        return keys, self._ttl(cache_control)

    def _ttl(self, cache_control: str) -> float:
        if "no-store" in cache_control or "no-cache" in cache_control:
            return self.min_refresh_s
        m = MAX_AGE.search(cache_control)
        ttl = float(m.group(1)) if m else self.default_ttl_s
        return min(max(ttl, self.min_refresh_s), self.max_ttl_s)
