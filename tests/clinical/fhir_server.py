"""A FHIR server started in the test process on 127.0.0.1, playing the EHR's `fhirServer`.

Not HAPI FHIR: Maven Central, where HAPI is published, cannot be reached from this machine or
CI (only PyPI, npm and Debian are), so no Java FHIR server can be fetched. This one answers the
service's reads and searches the way HAPI's plain server does, from fixture resources:
searchset Bundles with `total`, `fullUrl`, `search.mode` and `self`/`next` links, pages of at
most `page_size` results whatever `_count` asks (HAPI's `_getpages`/`_getpagesoffset` paging),
and a 401 OperationOutcome for a token it does not know. Search rules: `fhir_ehr.matching`.

Its base path picks a behaviour: /fhir answers correctly; /slow after 1 s; /huge declares a
body over the test limit; /endless streams a Bundle of 256 MiB; /redirect sends a 302 to
`elsewhere`; /astray gives `next` links to `elsewhere`; /broken serves an invalid Observation;
/unsorted ignores `_sort` (oldest first) and leaves it out of its `self` link, as HAPI does;
/nostatus ignores `status` (results of any status) and leaves it out likewise.
`elsewhere` is a second server (another port: another origin) that records what reaches it.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from fhir_ehr import PID, matching

GOOD = "token-of-the-day"
READ_PATIENT_ONLY = "token-for-the-patient-only"  # the server refuses its searches (403)
ENDLESS = 256 * 1024 * 1024


class FhirServer:
    def __init__(self, page_size: int = 10) -> None:
        self.store: list[dict[str, Any]] = []
        self.requests: list[str] = []
        self.page_size = page_size
        self.pages: dict[str, list[dict[str, Any]]] = {}
        self.url = ""  # http://127.0.0.1:<port>
        self.elsewhere = ""  # the other server's URL
        self.streamed: list[int] = []  # per /endless answer: bytes written before the hang-up

    def reset(self, store: list[dict[str, Any]]) -> None:
        self.store, self.requests, self.pages = store, [], {}
        self.streamed = []

    def bundle(
        self, base: str, found: list[dict[str, Any]], offset: int, count: int, used: str = ""
    ) -> Any:
        """A page of a search as HAPI gives it, with a `next` link while results are left and a
        `self` link that lists the parameters `used` (what the server did not ignore)."""
        size = min(count, self.page_size)
        page = found[offset : offset + size]
        out: dict[str, Any] = {
            "resourceType": "Bundle",
            "id": str(uuid.uuid4()),
            "type": "searchset",
            "total": len(found),
            "link": [{"relation": "self", "url": f"{self.url}{base}{used}"}],
            "entry": [
                {
                    "fullUrl": f"{self.url}{base}/{r['resourceType']}/{r['id']}",
                    "resource": r,
                    "search": {"mode": "match"},
                }
                for r in page
            ],
        }
        if offset + size < len(found):
            pages = str(uuid.uuid4())
            self.pages[pages] = found
            host = self.elsewhere if base == "/astray" else self.url
            args = {"_getpages": pages, "_getpagesoffset": offset + size, "_count": size}
            out["link"].append({"relation": "next", "url": f"{host}{base}?{urlencode(args)}"})
        return out


class Handler(BaseHTTPRequestHandler):
    srv: FhirServer

    def do_GET(self) -> None:
        srv = self.srv
        srv.requests.append(self.path)
        parts = urlsplit(self.path)
        flavour, _, rest = parts.path.strip("/").partition("/")
        base = f"/{flavour}"
        args = dict(parse_qsl(parts.query))
        token = self.headers.get("Authorization", "").removeprefix("Bearer ")
        if token not in (GOOD, READ_PATIENT_ONLY):
            return self.answer(401, outcome("login", "Token expired"))
        if token == READ_PATIENT_ONLY and not rest.startswith("Patient/"):
            return self.answer(403, outcome("forbidden", "Access denied by scope"))
        if flavour == "slow":
            time.sleep(1.0)
        if flavour == "redirect":
            return self.answer(302, None, {"Location": f"{srv.elsewhere}/fhir/{rest}"})
        if flavour == "endless":
            return self.endless()
        if rest == f"Patient/{PID}":
            return self.answer(200, next(r for r in srv.store if r["resourceType"] == "Patient"))
        if not rest and "_getpages" in args:
            found = srv.pages[args["_getpages"]]
            offset, count = int(args["_getpagesoffset"]), int(args["_count"])
        elif rest == "Observation":
            searched = {k: v for k, v in args.items() if k != "status" or flavour != "nostatus"}
            found, offset, count = matching(searched, srv.store), 0, int(args["_count"])
        else:
            return self.answer(404, outcome("not-found", f"Unknown resource: {rest}"))
        used = f"/{rest}?{parts.query}" if rest else ""
        if flavour == "unsorted" and rest:  # ignores _sort (oldest first) and says so
            found = found[::-1]
            used = f"/{rest}?{urlencode({k: v for k, v in args.items() if k != '_sort'})}"
        if flavour == "nostatus" and rest:  # ignores status and says so
            used = f"/{rest}?{urlencode({k: v for k, v in args.items() if k != 'status'})}"
        page = srv.bundle(base, found, offset, count, used)
        if flavour == "broken" and page["entry"]:
            bad = json.loads(json.dumps(page["entry"][0]["resource"]))
            bad["valueQuantity"]["value"] = "high"
            page["entry"][0]["resource"] = bad
        if flavour == "huge":
            return self.answer(200, page, {"Content-Length": str(50 * 1024 * 1024)})
        self.answer(200, page)

    def endless(self) -> None:
        """A Bundle of 256 MiB, written as long as the client reads (no Content-Length)."""
        srv = self.srv
        entry = json.dumps({"resource": srv.store[-1]}).encode() + b","
        chunk = entry * (65536 // len(entry))
        written = 0
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/fhir+json")
            self.end_headers()
            self.wfile.write(b'{"resourceType": "Bundle", "type": "searchset", "entry": [')
            while written < ENDLESS:
                self.wfile.write(chunk)
                written += len(chunk)
        except OSError:
            pass  # the client stopped reading and hung up
        finally:
            srv.streamed.append(written)

    def answer(self, status: int, res: Any, headers: dict[str, str] | None = None) -> None:
        body = b"" if res is None else json.dumps(res).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/fhir+json")
            headers = {"Content-Length": str(len(body))} | (headers or {})
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            pass  # the client gave up (the slow and huge servers)

    def log_message(self, *args: Any) -> None:
        pass


def outcome(code: str, diagnostics: str) -> dict[str, Any]:
    issue = {"severity": "error", "code": code, "diagnostics": diagnostics}
    return {"resourceType": "OperationOutcome", "issue": [issue]}


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64  # the service's searches come together: 5 would drop SYNs (1 s)


@contextmanager
def serving(srv: FhirServer) -> Iterator[str]:
    """Serve `srv` on 127.0.0.1 (a free port) until the block ends; yields its URL."""
    handler = type("Bound", (Handler,), {"srv": srv})
    server = Server(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    srv.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield srv.url
    finally:
        server.shutdown()
        server.server_close()
