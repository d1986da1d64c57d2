"""BlobReader Range reads against a real docker-registry 2.8."""

from __future__ import annotations

import concurrent.futures
import os
import random
import time
import uuid

import pytest

from harness.registry import Registry
from snapshotter.remote.blob import BlobReader
from snapshotter.remote.client import RegistryClient
from snapshotter.remote.errors import BlobFetchError
from snapshotter.remote.reference import Repository

pytestmark = pytest.mark.stack

SIZE = 1 << 20


@pytest.fixture(scope="module")
def blob(registry: Registry) -> tuple[Repository, str, bytes]:
    data = random.Random(7).randbytes(SIZE)
    repo = Repository(registry.host, f"test/blob-{uuid.uuid4().hex[:8]}")
    with RegistryClient(hostsconfig(registry)) as client:
        digest = client.push_blob(repo, data)
    return repo, digest, data


def hostsconfig(registry: Registry):  # type: ignore[no-untyped-def]
    from snapshotter.remote.hosts import HostsConfig

    return HostsConfig(plain_http=[registry.host])


def test_ranges_match_the_blob(client: RegistryClient, blob: tuple[Repository, str, bytes]) -> None:
    repo, digest, data = blob
    with BlobReader(client, repo, digest, SIZE) as reader:
        assert reader.read(0, 10) == data[:10]
        assert reader.read(SIZE - 7, 7) == data[-7:]
        assert reader.read(123_456, 300_000) == data[123_456:423_456]
        assert reader.read(5, 0) == b""
        assert reader.read(SIZE - 100_000, 100_000) == data[-100_000:]
        assert not reader.ranges_ignored


def test_out_of_range_input_is_refused_without_a_request(
    client: RegistryClient, blob: tuple[Repository, str, bytes]
) -> None:
    repo, digest, _ = blob
    with BlobReader(client, repo, digest, SIZE) as reader:
        with pytest.raises(
            BlobFetchError, match=rf"{digest} bytes {SIZE - 1}-{SIZE}.*outside the blob"
        ):
            reader.read(SIZE - 1, 2)
        with pytest.raises(BlobFetchError, match="outside the blob"):
            reader.read(-1, 5)
        assert reader.requests == 0


def test_416_is_an_error_and_does_not_hang(
    client: RegistryClient, blob: tuple[Repository, str, bytes]
) -> None:
    """A reader told the wrong (larger) size asks past the end: distribution answers 416 with a
    Content-Length it never sends; reading that body would block until the timeout."""
    repo, digest, data = blob
    with BlobReader(client, repo, digest, 2 * SIZE, timeout=20.0) as reader:
        started = time.monotonic()
        with pytest.raises(BlobFetchError) as info:
            reader.read(SIZE + 10, 100)
        assert time.monotonic() - started < 5
        message = str(info.value)
        assert "416" in message and f"bytes */{SIZE}" in message and repo.name in message
        # A 206 reveals the real size too: the wrong size is reported, not served.
        with pytest.raises(BlobFetchError, match=f"blob size is {SIZE} on the registry"):
            reader.read(0, 16)
    with BlobReader(client, repo, digest, SIZE) as reader:
        assert reader.read(0, 16) == data[:16]  # the shared pool is still usable


def test_concurrent_reads_from_many_threads(
    client: RegistryClient, blob: tuple[Repository, str, bytes]
) -> None:
    repo, digest, data = blob
    rng = random.Random(3)
    ranges = [
        (o, rng.randrange(1, 65536)) for o in (rng.randrange(0, SIZE - 65536) for _ in range(64))
    ]
    with (
        BlobReader(client, repo, digest, SIZE) as reader,
        concurrent.futures.ThreadPoolExecutor(8) as pool,
    ):
        results = list(pool.map(lambda r: reader.read(*r), ranges))
    assert results == [data[o : o + n] for o, n in ranges]


def test_missing_blob_names_registry_repo_digest_and_range(
    registry: Registry, client: RegistryClient
) -> None:
    digest = "sha256:" + os.urandom(32).hex()
    repo = Repository(registry.host, "test/nothing-here")
    with BlobReader(client, repo, digest, 100) as reader, pytest.raises(BlobFetchError) as info:
        reader.read(0, 10)
    assert str(info.value) == (
        f"reading {registry.host}/test/nothing-here@{digest} bytes 0-9: "
        f"HTTP 404 blob not found on http://{registry.host}"
    )


def test_a_streamed_range_arrives_in_pieces_in_one_request(
    client: RegistryClient, blob: tuple[Repository, str, bytes]
) -> None:
    repo, digest, data = blob
    with BlobReader(client, repo, digest, SIZE) as reader:
        pieces: list[bytes] = []
        reader.stream(1000, SIZE - 2000, pieces.append)
        assert b"".join(pieces) == data[1000 : SIZE - 1000]
        assert len(pieces) > 1 and reader.requests == 1  # handed on as it came, one GET

        class Enough(Exception):
            pass

        def stop(piece: bytes) -> None:
            raise Enough  # what the sink raises ends the request and reaches the caller

        with pytest.raises(Enough):
            reader.stream(0, SIZE, stop)
        assert reader.read(0, 10) == data[:10]  # the reader still works
