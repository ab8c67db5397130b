"""Compressed request bodies (service/api/common/encoding.py): gzip and deflate are read as the
body they compress, other codings and broken or oversized data are refused with the fix."""

from __future__ import annotations

import gzip
import itertools
import zlib

import httpx
import orjson
import pytest

URL = "/v1/models/clf:predict"
V2 = "/v2/models/clf/infer"
BODY = orjson.dumps({"instances": [[0.1, -0.2, 0.3, 0.4]], "parameters": {"seed": 3}})
V2_BODY = orjson.dumps(
    {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4],
                    "data": [0.1, -0.2, 0.3, 0.4]}],
        "parameters": {"seed": 3},
    }
)  # fmt: skip
JSON = {"content-type": "application/json"}


def _raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(wbits=-15)
    return c.compress(data) + c.flush()


@pytest.mark.parametrize(
    ("coding", "compress"),
    [("gzip", gzip.compress), ("deflate", zlib.compress), ("deflate", _raw_deflate)],
    ids=["gzip", "deflate-zlib", "deflate-raw"],
)
@pytest.mark.parametrize(("url", "body"), [(URL, BODY), (V2, V2_BODY)], ids=["v1", "v2"])
async def test_a_compressed_body_is_the_body_it_compresses(
    client: httpx.AsyncClient, url: str, body: bytes, coding: str, compress: object
) -> None:
    plain = await client.post(url, content=body, headers=JSON)
    assert plain.status_code == 200, plain.text
    packed = compress(body)  # type: ignore[operator]
    r = await client.post(url, content=packed, headers=JSON | {"content-encoding": coding})
    assert r.status_code == 200, r.text
    assert (
        r.json()["predictions" if url == URL else "outputs"]
        == (plain.json()["predictions" if url == URL else "outputs"])
    )


async def test_other_codings_are_415(client: httpx.AsyncClient) -> None:
    r = await client.post(URL, content=BODY, headers=JSON | {"content-encoding": "br"})
    assert r.status_code == 415
    assert r.json()["error"] == (
        "Content-Encoding 'br' is not read here; send the body uncompressed, or compressed with "
        "gzip or deflate"
    )


@pytest.mark.parametrize(
    "body", [BODY, gzip.compress(BODY)[:-9]], ids=["declared-but-plain", "truncated"]
)
async def test_data_that_is_not_what_it_says_is_refused(
    client: httpx.AsyncClient, body: bytes
) -> None:
    r = await client.post(URL, content=body, headers=JSON | {"content-encoding": "gzip"})
    assert r.status_code == 422
    assert r.json()["error"] == (
        "the body is not complete gzip data (Content-Encoding: gzip); compress the whole body "
        "with it, or send it uncompressed without the header"
    )
    r = await client.post(V2, content=body, headers=JSON | {"content-encoding": "gzip"})
    assert r.status_code == 400 and "not complete gzip data" in r.json()["error"]


async def test_what_a_body_decompresses_to_is_limited(client: httpx.AsyncClient) -> None:
    bomb = gzip.compress(b" " * 10_000_000)  # 10 MB of spaces in about 10 kB; the limit is 64 kB
    assert len(bomb) < 64_000
    r = await client.post(URL, content=bomb, headers=JSON | {"content-encoding": "gzip"})
    assert r.status_code == 413
    assert r.json()["error"] == (
        "the body decompresses to over 64000 bytes (setting max_body_bytes); "
        "send fewer instances per request, or ask the operator to raise MCSERVE_MAX_BODY_BYTES"
    )


def _count(metrics: str, labels: str) -> float:
    for line in metrics.splitlines():
        if line.startswith("mcserve_requests_total{") and labels in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_a_compressed_request_is_counted_under_its_route_and_model(
    client: httpx.AsyncClient,
) -> None:
    """The layer once handed the app a copy of the request's scope, where the routes wrote their
    route and model: compressed requests were counted as "(unmatched)"."""
    labels = 'model="clf",route="/v1/models/{name}:predict",status="200"'
    before = _count((await client.get("/metrics")).text, labels)
    r = await client.post(
        URL, content=gzip.compress(BODY), headers=JSON | {"content-encoding": "gzip"}
    )
    assert r.status_code == 200
    assert _count((await client.get("/metrics")).text, labels) == before + 1


async def test_several_gzip_members_are_one_body_and_a_get_is_not_read(
    client: httpx.AsyncClient,
) -> None:
    two = gzip.compress(BODY[:20]) + gzip.compress(BODY[20:])  # RFC 1952 allows members in a row
    r = await client.post(URL, content=two, headers=JSON | {"content-encoding": "gzip"})
    assert r.status_code == 200, r.text
    r = await client.get("/healthz", headers={"content-encoding": "gzip"})
    assert r.status_code == 200


async def test_a_body_of_many_gzip_members_is_refused_quickly(client: httpx.AsyncClient) -> None:
    """400,000 empty members in 8 MB took 30 s on the event loop (each member's end copied the
    rest of the body), every other request waiting: more than MAX_MEMBERS is a 422 now."""
    from service.api.common.encoding import MAX_MEMBERS

    cut = [len(BODY) * k // MAX_MEMBERS for k in range(MAX_MEMBERS + 1)]
    members = b"".join(gzip.compress(BODY[a:b]) for a, b in itertools.pairwise(cut))
    r = await client.post(URL, content=members, headers=JSON | {"content-encoding": "gzip"})
    assert r.status_code == 200, r.text  # MAX_MEMBERS members: read
    bomb = members + gzip.compress(b"") * 2000
    r = await client.post(URL, content=bomb, headers=JSON | {"content-encoding": "gzip"})
    assert r.status_code == 422 and f"more than {MAX_MEMBERS} gzip members" in r.text


@pytest.mark.parametrize(("url", "body"), [(URL, BODY), (V2, V2_BODY)], ids=["v1", "v2"])
async def test_a_byte_order_mark_before_the_json_is_ignored(
    client: httpx.AsyncClient, url: str, body: bytes
) -> None:
    """RFC 8259 lets a parser ignore it; it was "expected value at line 1 column 1"."""
    r = await client.post(url, content=b"\xef\xbb\xbf" + body, headers=JSON)
    assert r.status_code == 200, r.text
