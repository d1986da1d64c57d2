"""Behaviour no real registry here offers, from a tiny misbehaving registry in the test:
Range ignored, wrong digests, truncated bodies, 5xx then OK, redirects to another host (where
Authorization must not follow), an unfiltered paged referrers API, the legacy ORAS API,
tag lists whose pages never end, and plain blob URLs (the "url" blob kind)."""

from __future__ import annotations

import base64
import hashlib
import json
import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from harness.registry_calls import MAX_TAG_PAGES, list_tags
from harness.url_blob import UrlBlobSource
from snapshotter.remote.blob import BlobReader
from snapshotter.remote.client import RegistryClient
from snapshotter.remote.credentials import Credentials, CredentialStore
from snapshotter.remote.errors import (
    BlobFetchError,
    DigestMismatch,
    RegistryUnavailable,
    UnexpectedResponse,
)
from snapshotter.remote.hosts import HostsConfig
from snapshotter.remote.manifest import OCI_INDEX, OCI_MANIFEST
from snapshotter.remote.reference import Reference, Repository
from snapshotter.remote.referrers import find_referrers
from snapshotter.remote.transport import MAX_REDIRECTS

DATA = random.Random(11).randbytes(300_000)
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()
USER, PASSWORD = "fakeuser", "fake-Pass-123"
BASIC = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()

Handler = Callable[[BaseHTTPRequestHandler], bool]


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class FakeServer:
    routes: dict[str, Handler] = field(default_factory=dict)  # path prefix -> handler
    seen: list[Seen] = field(default_factory=list)
    require_auth: bool = False
    server: ThreadingHTTPServer | None = None

    @property
    def host(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> FakeServer:
        fake = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body in one segment: written apart, Nagle + delayed ACK cost ~40 ms
            # per request, which a test making a thousand requests notices.
            wbufsize = 1 << 16

            def do_any(self) -> None:
                fake.seen.append(
                    Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()})
                )
                if fake.require_auth and self.headers.get("Authorization") != BASIC:
                    send(
                        self,
                        401,
                        b'{"errors":[{"code":"UNAUTHORIZED"}]}',
                        {"WWW-Authenticate": 'Basic realm="fake"'},
                    )
                    return
                for prefix, handler in fake.routes.items():
                    if self.path.startswith(prefix) and handler(self):
                        return
                send(self, 404, b"404 page not found\n", {"Content-Type": "text/plain"})

            do_GET = do_HEAD = do_PUT = do_POST = do_any

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


def send(
    h: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict[str, str] | None = None
) -> bool:
    h.send_response(status)
    for k, v in (headers or {}).items():
        h.send_header(k, v)
    if "Content-Length" not in (headers or {}):
        h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    if h.command != "HEAD":
        h.wfile.write(body)
    return True


def parse_range(h: BaseHTTPRequestHandler) -> tuple[int, int]:
    spec = h.headers["Range"].split("=", 1)[1]
    start, _, end = spec.partition("-")
    return int(start), (int(end) if end else len(DATA) - 1)


def ranged(h: BaseHTTPRequestHandler) -> bool:
    start, end = parse_range(h)
    send(h, 206, DATA[start : end + 1], {"Content-Range": f"bytes {start}-{end}/{len(DATA)}"})
    return True


@pytest.fixture
def fakes() -> Iterator[Callable[[], FakeServer]]:
    started: list[FakeServer] = []

    def make() -> FakeServer:
        server = FakeServer().start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


def client_for(*servers: FakeServer, creds: bool = False) -> RegistryClient:
    store = (
        CredentialStore({s.host: Credentials(USER, PASSWORD) for s in servers}) if creds else None
    )
    return RegistryClient(
        HostsConfig(plain_http=[s.host for s in servers]), store, retries=3, backoff=0.01, timeout=5
    )


def test_range_ignored_is_detected_verified_and_served_locally(
    fakes: Callable[[], FakeServer],
) -> None:
    fake = fakes()
    fake.routes["/v2/r/blobs/"] = lambda h: send(h, 200, DATA)
    repo = Repository(fake.host, "r")
    with client_for(fake) as client, BlobReader(client, repo, DIGEST, len(DATA)) as reader:
        assert reader.read(100, 50) == DATA[100:150]
        assert reader.ranges_ignored
        assert [reader.read(0, 10), reader.read(299_990, 10)] == [DATA[:10], DATA[-10:]]
    assert len(fake.seen) == 1  # the whole blob was fetched once


def test_range_ignored_while_streaming_a_whole_blob_arrives_in_bounded_pieces(
    fakes: Callable[[], FakeServer],
) -> None:
    # `index build` streams each layer in one Range GET: a registry answering with the whole
    # blob is spooled and verified, then handed on piece by piece, never all in memory.
    fake = fakes()
    fake.routes["/v2/r/blobs/"] = lambda h: send(h, 200, DATA)
    pieces: list[bytes] = []
    with (
        client_for(fake) as client,
        BlobReader(client, Repository(fake.host, "r"), DIGEST, len(DATA)) as reader,
    ):
        reader.stream(0, len(DATA), pieces.append)
        assert reader.ranges_ignored
    assert b"".join(pieces) == DATA
    assert len(pieces) > 1 and max(map(len, pieces)) <= 256 << 10


def test_range_ignored_with_wrong_content_is_an_error(fakes: Callable[[], FakeServer]) -> None:
    fake = fakes()
    fake.routes["/v2/r/blobs/"] = lambda h: send(h, 200, DATA[:-1] + b"X")
    with (
        client_for(fake) as client,
        BlobReader(client, Repository(fake.host, "r"), DIGEST, len(DATA)) as reader,
    ):
        with pytest.raises(
            BlobFetchError, match=f"r@{DIGEST} bytes 0-9: registry ignored Range.*hashing to"
        ):
            reader.read(0, 10)
        assert not reader.ranges_ignored


def test_truncated_range_body_is_retried_then_reported(fakes: Callable[[], FakeServer]) -> None:
    fake = fakes()

    def truncated(h: BaseHTTPRequestHandler) -> bool:
        start, end = parse_range(h)
        h.send_response(206)
        h.send_header("Content-Range", f"bytes {start}-{end}/{len(DATA)}")
        h.send_header("Content-Length", str(end - start + 1))
        h.end_headers()
        h.wfile.write(DATA[start : start + (end - start + 1) // 2])
        h.close_connection = True
        return True

    fake.routes["/v2/r/blobs/"] = truncated
    with (
        client_for(fake) as client,
        BlobReader(client, Repository(fake.host, "r"), DIGEST, len(DATA)) as reader,
        pytest.raises(BlobFetchError) as info,
    ):
        reader.read(1000, 2000)
    assert "bytes 1000-2999" in str(info.value) and (
        "broke off" in str(info.value) or "short" in str(info.value)
    )
    assert len(fake.seen) == 4  # first try + 3 retries


def test_5xx_then_ok_is_retried(fakes: Callable[[], FakeServer]) -> None:
    fake = fakes()
    failures = {"blob": 2, "manifest": 2}
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []}).encode()

    def flaky(kind: str, ok: Handler) -> Handler:
        def handler(h: BaseHTTPRequestHandler) -> bool:
            if failures[kind] > 0:
                failures[kind] -= 1
                send(h, 503 if kind == "blob" else 429, b"busy", {"Retry-After": "0"})
                return True
            return ok(h)

        return handler

    fake.routes["/v2/r/blobs/"] = flaky("blob", ranged)
    fake.routes["/v2/r/manifests/"] = flaky(
        "manifest", lambda h: send(h, 200, manifest, {"Content-Type": OCI_MANIFEST})
    )
    with client_for(fake) as client:
        with BlobReader(client, Repository(fake.host, "r"), DIGEST, len(DATA)) as reader:
            assert reader.read(10, 10) == DATA[10:20]
        assert client.get_manifest(Reference.parse(f"{fake.host}/r:v1")).data == manifest
    assert failures == {"blob": 0, "manifest": 0}


def test_400_is_not_retried(fakes: Callable[[], FakeServer]) -> None:
    fake = fakes()
    fake.routes["/v2/r/manifests/"] = lambda h: send(
        h, 400, b'{"errors":[{"code":"NAME_INVALID","message":"bad"}]}'
    )
    with client_for(fake) as client, pytest.raises(Exception, match=r"HTTP 400.*NAME_INVALID: bad"):
        client.get_manifest(Reference.parse(f"{fake.host}/r:v1"))
    assert len(fake.seen) == 1


def test_wrong_manifest_digests_are_refused(fakes: Callable[[], FakeServer]) -> None:
    fake = fakes()
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []}).encode()
    other = "sha256:" + "1" * 64
    fake.routes["/v2/r/manifests/"] = lambda h: send(
        h, 200, body, {"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": other}
    )
    fake.routes["/v2/r/blobs/"] = lambda h: send(h, 200, DATA[:100])
    with client_for(fake) as client:
        with pytest.raises(DigestMismatch, match=f"r@{other}: content hashes to sha256:"):
            client.get_manifest(Reference.parse(f"{fake.host}/r@{other}"))
        with pytest.raises(DigestMismatch, match=f"r:v1: registry says {other}"):
            client.get_manifest(Reference.parse(f"{fake.host}/r:v1"))
        with pytest.raises(DigestMismatch, match=f"{DIGEST}: content hashes to"):
            client.get_blob(Repository(fake.host, "r"), DIGEST)


def test_redirect_to_another_host_drops_authorization(fakes: Callable[[], FakeServer]) -> None:
    registry, storage = fakes(), fakes()
    registry.require_auth = True
    registry.routes["/v2/r/blobs/"] = lambda h: send(
        h, 307, b"", {"Location": f"http://{storage.host}/bucket/blob?sig=secret-signature"}
    )

    def serve_storage(h: BaseHTTPRequestHandler) -> bool:
        return ranged(h) if "Range" in h.headers else send(h, 200, DATA)

    storage.routes["/bucket/"] = serve_storage
    repo = Repository(registry.host, "r")
    with client_for(registry, creds=True) as client:
        assert client.get_blob(repo, DIGEST) == DATA
        with BlobReader(client, repo, DIGEST, len(DATA)) as reader:
            assert reader.read(5, 5) == DATA[5:10]
    assert [s.headers.get("authorization") for s in registry.seen] == [None, BASIC, BASIC]
    assert len(storage.seen) == 2
    assert all("authorization" not in s.headers for s in storage.seen)


# The same transport policy (remote/transport.py) drives both HTTP libraries: each case below
# runs once through the httpx control plane and once through the urllib3 Range reader.
PLANES = ("control-plane", "range-reader")


def fetch_through(plane: str, client: RegistryClient, repo: Repository) -> bytes:
    if plane == "control-plane":
        return client.get_blob(repo, DIGEST)[5:10]
    with BlobReader(client, repo, DIGEST, len(DATA)) as reader:
        return reader.read(5, 5)


@pytest.mark.parametrize("plane", PLANES)
def test_redirect_policy_is_the_same_on_both_planes(
    fakes: Callable[[], FakeServer], plane: str
) -> None:
    registry, storage = fakes(), fakes()
    registry.require_auth = True
    registry.routes["/v2/r/blobs/"] = lambda h: send(
        h, 307, b"", {"Location": f"http://{storage.host}/bucket/blob"}
    )
    storage.routes["/bucket/"] = lambda h: ranged(h) if "Range" in h.headers else send(h, 200, DATA)
    with client_for(registry, creds=True) as client:
        assert fetch_through(plane, client, Repository(registry.host, "r")) == DATA[5:10]
    # 401 -> Basic challenge answered -> one retry with credentials, then the redirect
    assert [s.headers.get("authorization") for s in registry.seen] == [None, BASIC]
    assert [s.headers.get("authorization") for s in storage.seen] == [None]


@pytest.mark.parametrize("plane", PLANES)
def test_redirect_loop_ends_after_the_limit_on_both_planes(
    fakes: Callable[[], FakeServer], plane: str
) -> None:
    fake = fakes()
    fake.routes["/v2/r/blobs/"] = lambda h: send(h, 302, b"", {"Location": h.path})
    with (
        client_for(fake) as client,
        pytest.raises((UnexpectedResponse, BlobFetchError), match="more than 5 redirects"),
    ):
        fetch_through(plane, client, Repository(fake.host, "r"))
    assert len(fake.seen) == MAX_REDIRECTS + 1


@pytest.mark.parametrize("plane", PLANES)
def test_5xx_is_retried_then_reported_on_both_planes(
    fakes: Callable[[], FakeServer], plane: str
) -> None:
    fake = fakes()
    fake.routes["/v2/r/blobs/"] = lambda h: send(h, 503, b"busy")
    with (
        client_for(fake) as client,
        pytest.raises((RegistryUnavailable, BlobFetchError), match="503"),
    ):
        fetch_through(plane, client, Repository(fake.host, "r"))
    assert len(fake.seen) == 1 + 3  # client_for: retries=3


def test_unfiltered_paged_referrers_api_is_filtered_here(fakes: Callable[[], FakeServer]) -> None:
    fake = fakes()
    subject = "sha256:" + "2" * 64

    def desc(n: int, kind: str) -> dict[str, Any]:
        return {
            "mediaType": OCI_MANIFEST,
            "digest": "sha256:" + f"{n}" * 64,
            "size": 10,
            "artifactType": kind,
        }

    pages = {
        "1": (
            [desc(3, "want"), desc(4, "other")],
            f'</v2/r/referrers/{subject}?page=2>; rel="next"',
        ),
        "2": ([desc(5, "want")], None),
    }

    def referrers(h: BaseHTTPRequestHandler) -> bool:
        page = "2" if "page=2" in h.path else "1"
        items, link = pages[page]
        headers = {"Content-Type": OCI_INDEX}
        if link:
            headers["Link"] = link
        send(
            h,
            200,
            json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": items}).encode(),
            headers,
        )
        return True

    fake.routes["/v2/r/referrers/"] = referrers
    with client_for(fake) as client:
        found = find_referrers(client, Repository(fake.host, "r"), subject, "want")
    assert found.source == "referrers-api"
    assert [d.digest[-1] for d in found.descriptors] == ["3", "5"]


def test_legacy_oras_endpoint_is_read(fakes: Callable[[], FakeServer]) -> None:
    fake = fakes()
    subject = "sha256:" + "6" * 64
    ref = {
        "mediaType": "application/vnd.cncf.oras.artifact.manifest.v1+json",
        "size": 9,
        "artifactType": "want",
    }

    def oras(h: BaseHTTPRequestHandler) -> bool:
        body: dict[str, object]
        if "nextpage" in h.path:
            body = {"references": [{**ref, "digest": "sha256:" + "8" * 64}]}
        else:
            body = {
                "references": [
                    {**ref, "digest": "sha256:" + "7" * 64},
                    {**ref, "digest": "sha256:" + "9" * 64, "artifactType": "x"},
                ],
                "@nextLink": f"/oras/artifacts/v1/r/manifests/{subject}/referrers?nextpage=1",
            }
        send(h, 200, json.dumps(body).encode(), {"Content-Type": "application/json"})
        return True

    fake.routes["/oras/artifacts/v1/r/"] = oras
    with client_for(fake) as client:
        found = find_referrers(client, Repository(fake.host, "r"), subject, "want")
    assert found.source == "oras"
    assert [d.digest[-1] for d in found.descriptors] == ["7", "8"]
    paths = [s.path.split("?")[0] for s in fake.seen]
    # the referrers API and the tag fallback are asked together, then the ORAS endpoint
    assert sorted(paths[:2]) == [f"/v2/r/manifests/sha256-{'6' * 64}", f"/v2/r/referrers/{subject}"]
    assert paths[2].startswith("/oras/artifacts/v1/r/")


def test_the_tag_fallback_is_asked_while_the_referrers_api_is_still_answering(
    fakes: Callable[[], FakeServer],
) -> None:
    # A registry without the API answers its probe with 404; the fallback must not wait for
    # that answer (one round trip saved on every image's first Prepare over a slow link).
    fake = fakes()
    subject = "sha256:" + "5" * 64
    tag_asked = threading.Event()
    overlapped: list[bool] = []

    def referrers(h: BaseHTTPRequestHandler) -> bool:
        overlapped.append(tag_asked.wait(5))  # answer only once the fallback was asked
        return send(h, 404, b"404 page not found\n", {"Content-Type": "text/plain"})

    def fallback_tag(h: BaseHTTPRequestHandler) -> bool:
        tag_asked.set()
        return send(h, 404, b'{"errors":[{"code":"MANIFEST_UNKNOWN"}]}')

    fake.routes["/v2/r/referrers/"] = referrers
    fake.routes[f"/v2/r/manifests/sha256-{'5' * 64}"] = fallback_tag
    with client_for(fake) as client:
        found = find_referrers(client, Repository(fake.host, "r"), subject, "want")
    assert found.descriptors == ()
    assert overlapped == [True]


def test_tag_list_whose_next_link_loops_back_ends_with_an_error(
    fakes: Callable[[], FakeServer],
) -> None:
    fake = fakes()

    def tags(h: BaseHTTPRequestHandler) -> bool:
        # The second page links back to the first: following Link would never end.
        second = "last=a" in h.path
        link = "/v2/r/tags/list" if second else "/v2/r/tags/list?last=a"
        body = json.dumps({"name": "r", "tags": ["b" if second else "a"]}).encode()
        headers = {"Content-Type": "application/json", "Link": f'<{link}>; rel="next"'}
        return send(h, 200, body, headers)

    fake.routes["/v2/r/tags/list"] = tags
    with client_for(fake) as client, pytest.raises(UnexpectedResponse) as info:
        list_tags(client, Repository(fake.host, "r"))
    assert f"tag list of {fake.host}/r" in str(info.value)
    assert "already read" in str(info.value)
    assert len(fake.seen) == 2


def test_tag_list_with_endless_pages_ends_with_an_error(fakes: Callable[[], FakeServer]) -> None:
    fake = fakes()

    def tags(h: BaseHTTPRequestHandler) -> bool:
        # Every page links to a new one, never the same URL twice.
        page = len(fake.seen)
        link = f'</v2/r/tags/list?last=t{page}>; rel="next"'
        body = json.dumps({"name": "r", "tags": [f"t{page}"]}).encode()
        return send(h, 200, body, {"Content-Type": "application/json", "Link": link})

    fake.routes["/v2/r/tags/list"] = tags
    with client_for(fake) as client, pytest.raises(UnexpectedResponse) as info:
        list_tags(client, Repository(fake.host, "r"))
    assert f"tag list of {fake.host}/r" in str(info.value)
    assert f"more than {MAX_TAG_PAGES} pages" in str(info.value)
    assert len(fake.seen) == MAX_TAG_PAGES


def test_tag_list_that_is_not_json_is_a_clear_error(fakes: Callable[[], FakeServer]) -> None:
    fake = fakes()
    fake.routes["/v2/r/tags/list"] = lambda h: send(h, 200, b"<html>portal</html>")
    with client_for(fake) as client, pytest.raises(UnexpectedResponse) as info:
        list_tags(client, Repository(fake.host, "r"))
    assert f"tag list of {fake.host}/r" in str(info.value) and "JSON" in str(info.value)


def test_url_blob_source_reads_ranges_and_refuses_a_server_ignoring_range(
    fakes: Callable[[], FakeServer],
) -> None:
    ranged_server, whole_server = fakes(), fakes()
    ranged_server.routes["/blob"] = ranged
    whole_server.routes["/blob"] = lambda h: send(h, 200, DATA)
    reader = UrlBlobSource(f"http://{ranged_server.host}/blob", timeout=5, digest=DIGEST)
    try:
        assert reader.read(1000, 300) == DATA[1000:1300]
    finally:
        reader.close()
    # A query can carry a signature: errors name host, path and digest only.
    reader = UrlBlobSource(f"http://{whole_server.host}/blob?sig=secret", timeout=5, digest=DIGEST)
    try:
        with pytest.raises(BlobFetchError) as info:
            reader.read(0, 10)
    finally:
        reader.close()
    assert str(info.value) == (
        f"reading {whole_server.host}/blob@{DIGEST} bytes 0-9: HTTP 200 (expected 206)"
    )


def test_url_blob_source_refuses_a_url_that_is_not_http() -> None:
    with pytest.raises(ValueError, match=r"'ftp://example\.com/blob' is not an http"):
        UrlBlobSource("ftp://user:pw@example.com/blob", timeout=5)
