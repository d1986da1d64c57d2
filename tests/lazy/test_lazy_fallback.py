"""Layers that cannot be served lazily fall back to an ordinary full pull, through the real
stack: the image still pulls and runs, its layer is downloaded, and the daemon logs exactly one
"falls back to a full pull" line naming the layer and why.

The images are one layer each (busybox and the data together, random bytes so no other test has
that layer): a lazily committed layer is shared across containerd namespaces, so a layer some
other test mounted lazily could otherwise be "already there" instead of falling back."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.images import MANIFEST_TYPE, PushedImage
from harness.procs import free_port
from harness.trust import sign_pushed
from snapshotter.indexer.artifact import artifact_manifest
from snapshotter.remote.client import RegistryClient
from snapshotter.remote.credentials import CredentialStore
from snapshotter.remote.hosts import HostsConfig
from snapshotter.remote.manifest import EMPTY_JSON, Descriptor
from snapshotter.remote.reference import Reference
from snapshotter.remote.referrers import find_referrers, push_referrer
from snapshotter.vocabulary.artifact import ARTIFACT_TYPE, IndexedLayer, indexed_layers
from tests.lazy.lazy_helpers import DataImage, LazyStack, build_data_image, unique_name

pytestmark = pytest.mark.stack

FILES = {"hello": 1000, "big": 300_000}


@contextlib.contextmanager
def registry_client(stack: LazyStack) -> Iterator[RegistryClient]:
    hosts = HostsConfig(None, plain_http=[stack.registry.host])
    with RegistryClient(hosts, CredentialStore.anonymous()) as client:
        yield client


def data_image(stack: LazyStack, name: str) -> DataImage:
    return build_data_image(stack.workdir / name, FILES, one_layer=True)


def assert_full_pull_runs(
    stack: LazyStack,
    image: DataImage,
    reference: str,
    log_offset: int,
    hosts_dir: Path | None = None,
) -> str:
    """Pull (the layer downloaded), run (the files are right) and return the fallback line."""
    pulled = stack.pull(reference, hosts_dir=hosts_dir)
    assert (pulled.lazy, pulled.pulled) == (0, 1), pulled.stdout
    output = stack.run_ok(reference, "sh", "-c", "sha256sum /data/hello /data/big")
    for path, data in image.files.items():
        assert f"{hashlib.sha256(data).hexdigest()}  /{path}" in output, output
    found = stack.fallback_lines(log_offset, image.data_layer)
    assert len(found) == 1, f"want one fallback line for {image.data_layer}, got {found}"
    return found[0]


def test_image_without_index_falls_back_and_runs(stack: LazyStack) -> None:
    image = data_image(stack, "noindex")
    pushed = stack.push(image.built, unique_name("test/lazy-noindex"))
    offset = stack.daemon_log_offset()
    line = assert_full_pull_runs(stack, image, pushed.reference, offset)
    assert (
        f"falls back to a full pull: no_index: no lazysnap index for layer {image.data_layer}"
        in (line)
    ), line


def _pull_line(stdout: str, layer_digest: str) -> str:
    short = layer_digest.split(":", 1)[1][:12]
    [line] = [line for line in stdout.splitlines() if line.startswith("layer ") and short in line]
    return line


@pytest.mark.parametrize("through_daemon", [True, False], ids=["daemon", "own-process"])
def test_pull_and_status_say_why_a_layer_was_not_lazy(
    stack: LazyStack, through_daemon: bool
) -> None:
    """The reason the daemon recorded reaches the pull's layer line, whether the daemon ran the
    pull or the CLI did (reading it from the daemon's root), and `lazysnap status` lists it."""
    image = data_image(stack, "why")
    pushed = stack.push(image.built, unique_name("test/lazy-why"))
    pulled = stack.pull(pushed.reference, through_daemon=through_daemon)
    assert (pulled.lazy, pulled.pulled) == (0, 1), pulled.stdout
    line = _pull_line(pulled.stdout, image.data_layer)
    assert "pulled" in line and "(not lazy: no_index: no lazysnap index for layer" in line, line
    assert pushed.reference.split("/", 1)[1].split(":")[0] in line, line  # names the image

    status = stack.lazysnap("status", "--root", str(stack.daemon.root)).stdout
    short = image.data_layer.split(":", 1)[1][:12]
    [listed] = [row for row in status.splitlines() if short in row and "no_index" in row]
    assert "no lazysnap index for layer" in listed, status
    as_json = json.loads(
        stack.lazysnap("status", "--root", str(stack.daemon.root), "--json").stdout
    )
    reasons = {e["layer_digest"]: e["reason"] for e in as_json["not_lazy"]}
    assert reasons.get(image.data_layer) == "no_index", as_json["not_lazy"]


def _index_blob(client: RegistryClient, image: PushedImage, layer_digest: str) -> bytes:
    """The index blob `lazysnap index build` pushed for layer_digest of image."""
    reference = Reference.parse(image.reference)
    repository = reference.repository
    found = find_referrers(client, repository, image.built.manifest_digest, ARTIFACT_TYPE)
    for descriptor in found.descriptors:
        artifact = client.get_manifest(reference.with_digest(descriptor.digest))
        for indexed in indexed_layers(artifact):
            if indexed.layer_digest == layer_digest:
                return client.get_blob(repository, indexed.index_digest)
    raise AssertionError(f"no index of {layer_digest} found for {image.reference}")


def _push_index_artifact(
    client: RegistryClient, image: PushedImage, layer_digest: str, index_blob: bytes
) -> str:
    """Push index_blob as the lazysnap index of layer_digest of image (a referrer of its
    manifest, as `index build` would), whatever the bytes are, signed with the key the daemon
    trusts: what a compromised signing key could push, which the index checks must still
    catch. Returns the blob's digest."""
    repository = Reference.parse(image.reference).repository
    digest = client.push_blob(repository, index_blob)
    client.push_blob(repository, EMPTY_JSON)
    manifest_path = image.built.layout / "blobs" / "sha256" / image.built.manifest_digest[7:]
    subject = Descriptor(MANIFEST_TYPE, image.built.manifest_digest, manifest_path.stat().st_size)
    artifact = artifact_manifest(subject, [IndexedLayer(layer_digest, digest, len(index_blob))])
    push_referrer(client, repository, artifact)
    sign_pushed(client, repository, artifact)
    return digest


@pytest.mark.parametrize("tampering", ["other-layers-index", "truncated", "bytes-not-digest"])
def test_tampered_index_falls_back_and_runs(stack: LazyStack, tampering: str) -> None:
    """The layer's index in the registry is one a real index build made, tampered with: the
    index of another image's layer presented as this layer's; the right index cut in half
    (descriptor digest and size match the cut bytes); or the right index whose stored bytes
    were altered in the registry after upload, so they no longer match their digest."""
    image = data_image(stack, tampering)
    other = data_image(stack, f"{tampering}-other")
    # Build real indexes in repositories of their own, then copy one, tampered, to the
    # repository the test pulls from (referrers are per repository).
    source = stack.push(image.built, unique_name("test/lazy-tamper-src"))
    other_source = stack.push(other.built, unique_name("test/lazy-tamper-other"))
    stack.index_build(source.reference)
    stack.index_build(other_source.reference)
    target = stack.push(image.built, unique_name("test/lazy-tamper"))
    with registry_client(stack) as client:
        genuine = _index_blob(client, source, image.data_layer)
        if tampering == "other-layers-index":
            blob = _index_blob(client, other_source, other.data_layer)
        elif tampering == "truncated":
            blob = genuine[: len(genuine) // 2]
        else:
            blob = genuine
        digest = _push_index_artifact(client, target, image.data_layer, blob)
    restore: bytes | None = None
    stored = stack.registry.blob_path(digest)
    if tampering == "bytes-not-digest":
        # The data layer is this test's own (random bytes), so no one else uses its index blob.
        restore = stored.read_bytes()
        altered = bytearray(restore)
        altered[len(altered) // 2] ^= 0xFF
        stored.write_bytes(bytes(altered))
    try:
        offset = stack.daemon_log_offset()
        line = assert_full_pull_runs(stack, image, target.reference, offset)
    finally:
        if restore is not None:
            stored.write_bytes(restore)
    print(f"\n{tampering}: {line}")
    expected_reason = {
        "other-layers-index": f"index is for {other.data_layer}",
        "truncated": "invalid layer index",
        "bytes-not-digest": f"{digest}: content hashes to sha256:",
    }[tampering]
    assert expected_reason in line, line


def test_registry_unreachable_at_prepare_falls_back_and_runs(stack: LazyStack) -> None:
    """The registry is gone when the snapshotter looks for the index (Prepare), yet containerd's
    side of the pull can still download the layers.

    That happens when the registry goes down between containerd resolving the image and the
    snapshotter's lookup, or when the puller reaches the registry by a route the snapshotter's
    hosts config does not know. We make it deterministic with the second shape: the image is
    named by an address where nothing listens (the registry that is gone); the puller's own
    hosts dir sends that name to the live session registry (`server = ...`), which holds the
    image and its index, while the daemon - with containerd's hosts dir, which has no entry for
    it - gets "connection refused" from its index lookup."""
    gone = f"127.0.0.1:{free_port()}"
    mirror_hosts = stack.workdir / "mirror-hosts"
    (mirror_hosts / gone).mkdir(parents=True)
    (mirror_hosts / gone / "hosts.toml").write_text(f'server = "http://{stack.registry.host}"\n')
    image = data_image(stack, "gone")
    repository = unique_name("test/lazy-gone")
    stack.push(image.built, repository)
    reference = f"{gone}/{repository}:latest"
    built = stack.index_build(reference, "--hosts-dir", str(mirror_hosts))
    assert ": pushed sha256:" in built, built  # the index exists: only the route is missing

    offset = stack.daemon_log_offset()
    line = assert_full_pull_runs(stack, image, reference, offset, hosts_dir=mirror_hosts)
    assert gone in line and "Connection refused" in line, line
    assert not os.path.exists(Path(stack.containerd.hosts_dir) / gone)
