"""Reference parsing as users type references (docker defaults, ports, tags, digests)."""

from __future__ import annotations

import pytest

from snapshotter.remote.errors import InvalidReference
from snapshotter.remote.reference import Reference, Repository

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "registry", "name", "tag", "digest", "canonical"),
    [
        (
            "busybox",
            "docker.io",
            "library/busybox",
            "latest",
            None,
            "docker.io/library/busybox:latest",
        ),
        ("user/app:1.2", "docker.io", "user/app", "1.2", None, "docker.io/user/app:1.2"),
        (
            "index.docker.io/busybox",
            "docker.io",
            "library/busybox",
            "latest",
            None,
            "docker.io/library/busybox:latest",
        ),
        (
            "127.0.0.1:5000/test/busybox",
            "127.0.0.1:5000",
            "test/busybox",
            "latest",
            None,
            "127.0.0.1:5000/test/busybox:latest",
        ),
        ("localhost/x:v1", "localhost", "x", "v1", None, "localhost/x:v1"),
        (f"ghcr.io/o/r@{D}", "ghcr.io", "o/r", None, D, f"ghcr.io/o/r@{D}"),
        (f"ghcr.io/o/r:v2@{D}", "ghcr.io", "o/r", "v2", D, f"ghcr.io/o/r:v2@{D}"),
        ("[::1]:5000/a/b:t", "[::1]:5000", "a/b", "t", None, "[::1]:5000/a/b:t"),
    ],
)
def test_parse_and_print(
    text: str, registry: str, name: str, tag: str | None, digest: str | None, canonical: str
) -> None:
    ref = Reference.parse(text)
    assert (ref.registry, ref.name, ref.tag, ref.digest) == (registry, name, tag, digest)
    assert str(ref) == canonical
    assert Reference.parse(str(ref)) == ref


def test_docker_hub_endpoint_and_object() -> None:
    ref = Reference.parse("busybox")
    assert ref.endpoint == "registry-1.docker.io"
    assert ref.object == "latest"
    assert Reference.parse(f"busybox:1@{D}").object == D
    assert str(Repository.parse("127.0.0.1:5000/test/x")) == "127.0.0.1:5000/test/x"


@pytest.mark.parametrize(
    "text",
    [
        "",
        " busybox",
        "Busybox",
        "busybox:",
        "busybox@sha256:abc",
        "a//b",
        "busybox:bad tag",
        "host:5000/",
        "127.0.0.1:5000/UPPER/x",
        "busybox@sha256:" + "G" * 64,
    ],
)
def test_bad_references_name_the_input(text: str) -> None:
    with pytest.raises(InvalidReference) as info:
        Reference.parse(text)
    assert repr(text) in str(info.value) or text.strip() in str(info.value)


def test_repository_rejects_tag() -> None:
    with pytest.raises(InvalidReference, match="must not carry a tag"):
        Repository.parse("127.0.0.1:5000/a/b:v1")
