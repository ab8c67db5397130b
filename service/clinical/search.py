"""A FHIR search client for the EHR's FHIR server: reads and paged searches, bounded and checked.

Why our own client on httpx rather than a FHIR client library (checked December 2026):
- fhirpy 2.3.1 (async on aiohttp, sync on requests) reads each answer whole (`await r.text()`),
  follows `next` links without bounds and lets an absolute link through when the base URL is a
  substring of it (`https://elsewhere.example/?https://ehr.example/fhir` passes), sending the
  patient's token there; it opens its own aiohttp session per request, so no transport of ours
  could bound it;
- fhirclient 4.4.0 (SMART) is synchronous (requests), sets no timeout, follows redirects, reads
  answers whole and follows `next` links to any host (its sanitiser checks only the scheme);
- fhir-kindling 1.0.3 (httpx) needs pydantic 1 and fhir.resources 6; fhir-query needs pandas.
What a library would add (URL building, paging, parsing) is small, and the limits are the point.

Rules:
- every request goes to the allow-listed base URL (same scheme, host and port, path under the
  base); a redirect is never followed, and a `next` link elsewhere is refused, so the token
  never leaves that server;
- an answer is read while streaming and cut off past `max_bytes` (a declared Content-Length
  over it is refused before reading); it must be FHIR JSON;
- a search follows `next` links until it holds the `_count` results asked for, at most
  `max_pages` pages and `max_entries` results; the pages become one searchset Bundle; a server
  whose `self` link shows it ignored `_sort` (Observations newest first) is asked again for all
  results (`_count` = `max_entries`) and read to the end, since its first `_count` results need
  not hold the latest; past `max_entries` that is a failure, not a silent choice;
- every resource is validated with `fhir.resources` (R4B, else R5: an EHR may serve either), must
  be the resource searched for and about the call's patient; one bad resource refuses the answer;
- errors carry the FHIR issue code that says what would help (`login`: a new token), and the
  server's OperationOutcome diagnostics when it sends one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit

import httpx

from service.clinical.answers import (
    SearchFailed,
    name_of,
    next_link,
    parse,
    refusal,
    used,
    validate,
)
from service.clinical.records import refers_to

Json = dict[str, Any]
DEFAULT_PORTS = {"http": 80, "https": 443}
QUOTABLE = (  # httpx errors whose text cannot hold the request's headers
    httpx.ConnectError,
    httpx.TimeoutException,
    httpx.ReadError,
    httpx.RemoteProtocolError,
)


# Search parameters a server may ignore (saying so in its self link, as HAPI does) that decide
# whether the first _count results hold the latest final result.
WATCHED = ("_sort", "status")
_SAID = {
    "_sort": "_sort=-date (it did not sort by date)",
    "status": "status (it sent results of any status)",
}


def _ignored(names: Sequence[str]) -> str:
    return " and ".join(_SAID.get(n, n) for n in names) or "a search parameter"


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 2 * 1024 * 1024  # per answer (one page)
    max_pages: int = 5  # per search
    max_entries: int = 500  # per search, all pages together


def _origin(url: str) -> tuple[str, str, int | None]:
    p = urlsplit(url)
    return p.scheme, (p.hostname or "").lower(), p.port or DEFAULT_PORTS.get(p.scheme)


class FhirSearch:
    """Reads and searches on one FHIR server (`base`) for one patient, with `client`'s headers."""

    def __init__(
        self, client: httpx.AsyncClient, base: str, patient_id: str, limits: Limits
    ) -> None:
        self.client = client
        self.base = base.rstrip("/")
        self.patient_id = patient_id
        self.limits = limits

    def owns(self, url: str) -> bool:
        """Whether `url` is on this server, under its base path."""
        base_path = urlsplit(self.base).path.rstrip("/")
        path = urlsplit(url).path
        under = path == base_path or path.startswith(base_path + "/")
        return _origin(url) == _origin(self.base) and under

    async def run(self, query: str) -> Json:
        """A template's query: `Type/id` is a read, `Type?params` a search."""
        kind, _, params = query.partition("?")
        if not params and kind.count("/") == 1:
            return await self.read(kind)
        return await self.search(kind, params)

    async def read(self, path: str) -> Json:
        kind, _, rid = path.partition("/")
        res = await self._get(f"{self.base}/{path}")
        if res.get("resourceType") != kind or res.get("id") != rid:
            raise SearchFailed(f"reading {path} gave {name_of(res)}", "processing")
        self._check(res, kind)
        return res

    async def search(self, kind: str, params: str) -> Json:
        pairs = parse_qsl(params, keep_blank_values=True)
        query = dict(pairs)
        asked = query.get("_count", "")
        lim = self.limits
        wanted = min(int(asked), lim.max_entries) if asked.isdigit() else lim.max_entries
        # Parameters that, ignored, leave the first _count results without the one wanted: the
        # newest (_sort), or a final one (status: a server that dropped it sent a newer
        # preliminary result and the final one behind it was never read).
        watch = tuple(p for p in WATCHED if p in query)
        entries, first, more = await self._pages(kind, params, wanted, every=False, watch=watch)
        ignored = [p for p in watch if not used(first, p)]
        if ignored:
            # Asked again for every result, as many a page as it gives (page by page at
            # _count=1 the page bound ran out at 5 results), the reader picks the latest final
            # one by its own dates and statuses. Only _count changes (a repeated parameter,
            # date=ge..&date=lt.., stays).
            if more:
                again = [(k, v) for k, v in pairs if k != "_count"]
                again.append(("_count", str(lim.max_entries)))
                entries, _, _ = await self._pages(
                    kind, urlencode(again), lim.max_entries, every=True, ignored=ignored
                )
            wanted = len(entries)
        out: Json = {"resourceType": "Bundle", "type": "searchset"}
        if isinstance(first.get("total"), int):
            out["total"] = first["total"]
        return out | {"entry": entries[:wanted]}

    async def _pages(
        self,
        kind: str,
        params: str,
        wanted: int,
        every: bool,
        watch: tuple[str, ...] = (),
        ignored: Sequence[str] = (),
    ) -> tuple[list[Json], Json, bool]:
        """Following `next` links until `wanted` results are held (`every`: all results, which
        must be at most `wanted`, read because the server ignored the parameters `ignored`;
        `watch`: stop after the first page if the server says it ignored one of these):
        (the match entries, the first page, whether a next link was left)."""
        lim = self.limits
        url = f"{self.base}/{kind}?{params}"
        entries: list[Json] = []
        first: Json = {}
        for page in range(1, lim.max_pages + 1):
            bundle = await self._get(url)
            if bundle.get("resourceType") != "Bundle" or bundle.get("type") != "searchset":
                raise SearchFailed(f"the answer is {name_of(bundle)}, not a searchset Bundle")
            entries_here = bundle.get("entry") or []
            if isinstance(entries_here, list) and len(entries_here) > lim.max_entries:
                # refused before the costly checks
                raise SearchFailed(f"a page holds over {lim.max_entries} entries", "too-costly")
            self._check(bundle, kind)
            first = first or bundle
            for e in bundle.get("entry") or []:
                if (e.get("search") or {}).get("mode", "match") == "match":
                    entries.append(e)
            nxt = next_link(bundle)
            if every and len(entries) > wanted:
                raise SearchFailed(
                    f"the server ignored {_ignored(ignored)} and holds over {wanted} results: "
                    "the latest final one cannot be told from the first ones",
                    "too-costly",
                )
            dropped = page == 1 and any(not used(bundle, p) for p in watch)
            if nxt is None or dropped or (not every and len(entries) >= wanted):
                return entries, first, nxt is not None
            url = urljoin(url, nxt)
            if not self.owns(url):
                raise SearchFailed(
                    f"page {page}'s next link leads to {_where(url)}, another server: not "
                    "followed (the access token goes to the allow-listed fhirServer only)",
                    "security",
                )
        why = f" (the server ignored {_ignored(ignored)}, so all are read)" if every else ""
        raise SearchFailed(
            f"the search needs more than {lim.max_pages} pages for {wanted} results{why} "
            f"(it gave {len(entries)}; CDS_FHIR_MAX_PAGES)",
            "too-costly",
        )

    async def _get(self, url: str) -> Json:
        """One GET: FHIR JSON, read up to `max_bytes`; failures as SearchFailed."""
        limit = self.limits.max_bytes
        try:
            async with self.client.stream("GET", url) as r:
                if r.is_redirect:
                    raise _redirect(r, url, self.owns)
                body = await _read(r, limit)
        except httpx.HTTPError as exc:
            # Only errors about the connection or the answer are quoted (e.g. "[Errno 111]
            # Connection refused"): one raised while sending may quote the request's headers,
            # the access token included (h11's "Illegal header value b'Bearer ...'").
            why = f": {exc}" if isinstance(exc, QUOTABLE) and str(exc) else ""
            raise SearchFailed(
                f"{type(exc).__name__} from the FHIR server {self.base}{why}"
            ) from None
        media = r.headers.get("content-type", "")
        if r.status_code != 200:
            try:
                said = parse(body, media)
            except SearchFailed:
                said = {}  # an error page: the status says enough
            raise refusal(r.status_code, said)
        res = parse(body, media)
        if res.get("resourceType") == "OperationOutcome":
            raise refusal(200, res)
        return res

    def _check(self, res: Json, kind: str) -> None:
        """Valid FHIR, of the kind searched for, about this patient (else SearchFailed)."""
        entries = res.get("entry") or []
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise SearchFailed(f"{name_of(res)}: entry is not an array of objects", "structure")
        inner = [e.get("resource") for e in entries]
        shell = res
        if inner:
            shell = res | {
                "entry": [{k: v for k, v in e.items() if k != "resource"} for e in entries]
            }
        validate(shell, name_of(res))
        for e, r in zip(entries, inner, strict=True):
            if r is None:
                continue
            if not isinstance(r, dict):
                raise SearchFailed("a Bundle entry's resource is not a JSON object", "structure")
            validate(r, name_of(r))
            mode = (e.get("search") or {}).get("mode", "match")
            if mode == "match" and r.get("resourceType") != kind:
                raise SearchFailed(f"a search for {kind} gave {name_of(r)}", "processing")
            if not refers_to(r.get("subject"), self.patient_id):
                raise SearchFailed(f"{name_of(r)} is about another patient", "processing")


async def _read(r: httpx.Response, limit: int) -> bytes:
    declared = r.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise SearchFailed(
            f"the answer is {int(declared)} bytes, over the limit of {limit} (CDS_FHIR_MAX_BYTES)",
            "too-costly",
        )
    body = bytearray()
    async for chunk in r.aiter_bytes():
        body += chunk
        if len(body) > limit:  # stop reading: a huge Bundle is never held whole
            raise SearchFailed(
                f"the answer is over {limit} bytes (CDS_FHIR_MAX_BYTES); reading stopped",
                "too-costly",
            )
    return bytes(body)


def _redirect(r: httpx.Response, url: str, owns: Callable[[str], bool]) -> SearchFailed:
    target = urljoin(url, r.headers.get("location", ""))
    where = "within the same server" if owns(target) else f"to {_where(target)}, another server"
    return SearchFailed(
        f"HTTP {r.status_code} redirect {where}: not followed (the access token goes to the "
        "allow-listed fhirServer only; list the server's own base URL)",
        "security",
    )


def _where(url: str) -> str:
    p = urlsplit(url)
    return p.netloc or "nowhere"
