"""Only indexes signed by a key the node trusts are mounted lazily (docs/trust.md), through the
real stack on docker-registry 2.8 (signatures found through the referrers tag schema).

The session daemon trusts the session key (tests/conftest.py), which `index build` signs with
by default ($LAZYSNAP_SIGN_KEY). Each way an index can fail to be trusted makes its layer fall
back to a full pull that still runs, with the reason in the daemon's fallback line; a module
stack of its own shows `mode = "permissive"` using an unsigned index. Images are one layer of
random bytes each, so no other test has mounted that layer lazily."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.containerd import Containerd, start_containerd
from harness.daemon import DaemonSettings, LazysnapDaemon, lazysnap_command, start_lazysnap
from harness.images import PushedImage
from harness.procs import unmount_all_under
from harness.registry import Registry
from harness.trust import make_keys
from snapshotter.indexer.artifact import artifact_manifest
from snapshotter.indexer.command import SIGN_KEY_ENV
from snapshotter.remote.client import RegistryClient
from snapshotter.remote.credentials import CredentialStore
from snapshotter.remote.hosts import HostsConfig
from snapshotter.remote.manifest import OCI_INDEX, OCI_MANIFEST, Descriptor, build_index
from snapshotter.remote.reference import Reference, Repository
from snapshotter.remote.referrers import fallback_tag, find_referrers, push_referrer
from snapshotter.remote.signatures import (
    COSIGN_SIGNATURE_ARTIFACT_TYPE,
    SIGNATURE_ANNOTATION,
    push_signature,
)
from snapshotter.trust import simplesign
from snapshotter.vocabulary.artifact import ARTIFACT_TYPE, IndexedLayer, indexed_layers
from tests.lazy.conftest import remove_namespace_content
from tests.lazy.lazy_helpers import (
    REPO_ROOT,
    DataImage,
    LazyStack,
    build_data_image,
    unique_name,
)

pytestmark = pytest.mark.stack

FILES = {"hello": 1000, "big": 300_000}
UNTRUSTED = "index not signed by a trusted key"


@contextlib.contextmanager
def registry_client(stack: LazyStack) -> Iterator[RegistryClient]:
    hosts = HostsConfig(None, plain_http=[stack.registry.host])
    with RegistryClient(hosts, CredentialStore.anonymous()) as client:
        yield client


def pushed_image(stack: LazyStack, name: str) -> tuple[DataImage, PushedImage]:
    image = build_data_image(stack.workdir / name, FILES, one_layer=True)
    return image, stack.push(image.built, unique_name(f"test/trust-{name}"))


def index_build(stack: LazyStack, reference: str, sign_key: Path | None) -> str:
    """`lazysnap index build`, signing with sign_key (None: unsigned); the artifact digest."""
    env = {k: v for k, v in os.environ.items() if k != SIGN_KEY_ENV}
    env["PYTHONPATH"] = str(REPO_ROOT)
    if sign_key is not None:
        env[SIGN_KEY_ENV] = str(sign_key)
    result = subprocess.run(
        [*lazysnap_command(), "index", "build", "--plain-http", "--min-layer-size", "0", reference],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert ("signed by key" in result.stdout) == (sign_key is not None), result.stdout
    return result.stdout.split("pushed ", 1)[1].split()[0]


def pull_and_run(stack: LazyStack, image: DataImage, reference: str) -> tuple[int, int]:
    """Pull, run (the files are right); (lazy, pulled) layer counts."""
    pulled = stack.pull(reference)
    output = stack.run_ok(reference, "sh", "-c", "sha256sum /data/hello /data/big")
    for path, data in image.files.items():
        assert f"{hashlib.sha256(data).hexdigest()}  /{path}" in output, output
    return pulled.lazy, pulled.pulled


def fallback_line(stack: LazyStack, image: DataImage, reference: str) -> str:
    offset = stack.daemon_log_offset()
    assert pull_and_run(stack, image, reference) == (0, 1)
    [line] = stack.fallback_lines(offset, image.data_layer)
    assert UNTRUSTED in line, line
    return line


def test_a_signed_index_is_mounted_lazily(stack: LazyStack) -> None:
    image, pushed = pushed_image(stack, "signed")
    stack.index_build(pushed.reference)  # the session key, as the daemon trusts
    assert pull_and_run(stack, image, pushed.reference) == (1, 0)
    stack.lazy_mount(image.data_layer)


def test_an_unsigned_index_falls_back(stack: LazyStack) -> None:
    image, pushed = pushed_image(stack, "unsigned")
    artifact = index_build(stack, pushed.reference, None)
    line = fallback_line(stack, image, pushed.reference)
    assert f"artifact {artifact}: no signature" in line, line


def test_a_signature_by_a_key_the_node_does_not_trust_falls_back(stack: LazyStack) -> None:
    image, pushed = pushed_image(stack, "stranger")
    stranger = make_keys(stack.workdir / "stranger-keys")
    artifact = index_build(stack, pushed.reference, stranger.private)
    line = fallback_line(stack, image, pushed.reference)
    assert f"artifact {artifact}: signature by an untrusted key" in line, line


def test_a_stripped_signature_falls_back(stack: LazyStack) -> None:
    image, pushed = pushed_image(stack, "stripped")
    artifact = index_build(stack, pushed.reference, stack_key())
    repository = Reference.parse(pushed.reference).repository
    with registry_client(stack) as client:
        # docker-registry lists referrers in the tag schema: empty the artifact's list.
        client.push_manifest(repository, fallback_tag(artifact), build_index([]), OCI_INDEX)
    line = fallback_line(stack, image, pushed.reference)
    assert f"artifact {artifact}: no signature" in line, line


def test_a_corrupt_signature_falls_back(stack: LazyStack) -> None:
    image, pushed = pushed_image(stack, "corrupt")
    artifact = index_build(stack, pushed.reference, None)
    repository = Reference.parse(pushed.reference).repository
    with registry_client(stack) as client:
        subject = _manifest_descriptor(client, repository, artifact)
        payload = simplesign.payload(str(repository), artifact)
        push_signature(client, repository, subject, payload, "MEUCIQDnot-a-signature==")
    line = fallback_line(stack, image, pushed.reference)
    assert f"artifact {artifact}: corrupt signature" in line, line


def test_a_signature_moved_to_another_artifact_falls_back(stack: LazyStack) -> None:
    """A valid signature manifest (the trusted key's, over artifact A) copied to name artifact B
    as its subject: the signature verifies, but over another digest."""
    _, signed_push = pushed_image(stack, "sig-source")
    signed_artifact = index_build(stack, signed_push.reference, stack_key())
    image, pushed = pushed_image(stack, "sig-moved")
    artifact = index_build(stack, pushed.reference, None)
    source_repo = Reference.parse(signed_push.reference).repository
    repository = Reference.parse(pushed.reference).repository
    with registry_client(stack) as client:
        [signature] = find_referrers(
            client, source_repo, signed_artifact, COSIGN_SIGNATURE_ARTIFACT_TYPE
        ).descriptors
        original = client.get_manifest(
            Reference.parse(signed_push.reference).with_digest(signature.digest)
        )
        [layer] = original.layers
        payload = client.get_blob(source_repo, layer.digest)
        push_signature(
            client,
            repository,
            _manifest_descriptor(client, repository, artifact),
            payload,
            layer.annotations[SIGNATURE_ANNOTATION],
        )
    line = fallback_line(stack, image, pushed.reference)
    assert f"artifact {artifact}: signature over a different artifact" in line, line
    assert signed_artifact in line, line


def test_a_newer_unsigned_artifact_does_not_hide_the_signed_one(stack: LazyStack) -> None:
    """After the signed index, someone pushes another artifact for the image: its index blob
    is another layer's (were it used, the mount would fail). The signed one is still used."""
    image, pushed = pushed_image(stack, "newer")
    decoy, decoy_push = pushed_image(stack, "newer-decoy")
    index_build(stack, pushed.reference, stack_key())
    index_build(stack, decoy_push.reference, stack_key())
    reference = Reference.parse(pushed.reference)
    with registry_client(stack) as client:
        decoy_ref = Reference.parse(decoy_push.reference)
        [decoy_artifact] = find_referrers(
            client, decoy_ref.repository, decoy.built.manifest_digest, ARTIFACT_TYPE
        ).descriptors
        [decoy_index] = indexed_layers(
            client.get_manifest(decoy_ref.with_digest(decoy_artifact.digest))
        )
        client.push_blob(
            reference.repository,
            client.get_blob(decoy_ref.repository, decoy_index.index_digest),
            decoy_index.index_digest,
        )
        subject = _manifest_descriptor(client, reference.repository, image.built.manifest_digest)
        forged = IndexedLayer(image.data_layer, decoy_index.index_digest, decoy_index.index_size)
        push_referrer(client, reference.repository, artifact_manifest(subject, [forged]))
        listed = find_referrers(
            client, reference.repository, image.built.manifest_digest, ARTIFACT_TYPE
        ).descriptors
        assert len(listed) == 2  # the signed artifact, then the newer unsigned one
    assert pull_and_run(stack, image, pushed.reference) == (1, 0)
    stack.lazy_mount(image.data_layer)


def stack_key() -> Path:
    return Path(os.environ[SIGN_KEY_ENV])


def _manifest_descriptor(client: RegistryClient, repository: Repository, digest: str) -> Descriptor:
    manifest = client.get_manifest(Reference(repository.registry, repository.name, digest=digest))
    return Descriptor(manifest.media_type or OCI_MANIFEST, digest, len(manifest.data))


# -- mode = "permissive": a node of its own ------------------------------------------------------


@pytest.fixture(scope="module")
def permissive_stack(registry: Registry) -> Iterator[tuple[Containerd, LazysnapDaemon]]:
    base = Path(tempfile.mkdtemp(prefix="lzs-perm-", dir="/tmp"))  # short: unix socket paths
    containerd = start_containerd(
        base / "ctd",
        proxy_socket=base / "lazysnap" / "lazysnap.sock",
        registry_hosts=[registry.host],
    )
    try:
        settings = DaemonSettings(
            hosts_dir=containerd.hosts_dir,
            plain_http=(registry.host,),
            background_fetch=False,
            trust_mode="permissive",
        )
        daemon = start_lazysnap(base / "lazysnap", settings=settings)
    except BaseException:
        containerd.stop()
        shutil.rmtree(base, ignore_errors=True)
        raise
    yield containerd, daemon
    containerd.stop()
    daemon.stop()
    unmount_all_under(base)
    shutil.rmtree(base, ignore_errors=True)


def test_permissive_mode_mounts_an_unsigned_index_lazily(
    registry: Registry, permissive_stack: tuple[Containerd, LazysnapDaemon]
) -> None:
    containerd, daemon = permissive_stack
    workdir = Path(tempfile.mkdtemp(prefix="lzs-perm-work-"))
    stack = LazyStack(containerd, registry, daemon, unique_name("lzs-perm"), workdir)
    try:
        image, pushed = pushed_image(stack, "permissive")
        index_build(stack, pushed.reference, None)
        assert pull_and_run(stack, image, pushed.reference) == (1, 0)
        stack.lazy_mount(image.data_layer)
        assert "index trust: permissive" in stack.daemon_log_since(0)
    finally:
        remove_namespace_content(containerd, stack.namespace)
        shutil.rmtree(workdir, ignore_errors=True)
