"""Issue 11's acceptance, with the default trust policy (signed indexes only) of the session
daemon: a forged index (harness/forge.py: every field check passes, span digests agree
with the real blob) pushed by someone who can push to a repository changes nothing any
container on the node sees.

- pushed as the newest referrer of the image itself, beside the genuine signed index: a pull
  by tag and a pull by digest both mount the layer lazily from the signed index, and the
  container sees the image's real tree;
- pushed on an attacker's copy of the image (the only index there): the pull falls back to a
  full pull and says why (`untrusted_index`), and afterwards the genuine image and a plain
  `ctr images pull` of a third copy, which reuse the layer's snapshot by chain ID, see the
  real tree too.

The same forgeries served on purpose (permissive trust) are caught by the completion check:
tests/lazy/test_completion_lazy.py."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator

import pytest

from harness import forge
from harness.images import PushedImage, busybox_layer_tar, file, layer_tar, write_oci_layout
from snapshotter.remote.client import RegistryClient
from snapshotter.remote.credentials import CredentialStore
from snapshotter.remote.hosts import HostsConfig
from snapshotter.remote.reference import Reference
from tests.lazy.conftest import remove_namespace_content
from tests.lazy.lazy_helpers import LazyStack, _concatenated, unique_name
from tests.lazy.test_completion_lazy import FORGERIES, SECRET, TEXT

pytestmark = pytest.mark.stack

# What the image really holds, as a container prints it: the secret's mode, owner and bytes,
# the text's bytes, and none of the paths a forgery adds.
REAL_TREE = (
    f"600 0\n{hashlib.sha256(SECRET).hexdigest()}\n{hashlib.sha256(TEXT).hexdigest()}\n"
    "absent absent absent\n"
)
SHOW_TREE = (
    "stat -c '%a %u' /data/secret; "
    "sha256sum /data/secret | cut -d' ' -f1; sha256sum /data/text | cut -d' ' -f1; "
    "for p in /etc/anything /usr/bin/forged-suid /dev/forged-tty; do "
    "test -e $p && printf 'present ' || printf 'absent '; done | sed 's/ $//'; echo"
)


@dataclasses.dataclass(frozen=True)
class Victim:
    image: PushedImage  # the genuine image, with its genuine index signed by the trusted key
    layer_digest: str
    layer_blob: bytes
    genuine: forge.IndexBlobs


def _client(stack: LazyStack) -> RegistryClient:
    hosts = HostsConfig(None, plain_http=(stack.registry.host,))
    return RegistryClient(hosts, CredentialStore.anonymous())


def _victim(stack: LazyStack, kind: str) -> Victim:
    tar = _concatenated(
        busybox_layer_tar(stack.workdir),
        layer_tar([file("data/text", TEXT), file("data/secret", SECRET, 0o600)]),
    )
    built = write_oci_layout(stack.workdir / "layout", "latest", [tar])
    image = stack.push(built, unique_name(f"test/victim-{kind}"))
    [layer] = built.layers
    blob = (built.layout / "blobs" / "sha256" / layer.digest.split(":")[1]).read_bytes()
    stack.index_build(image.reference, "--span-size", str(64 << 10))  # signed: session key
    with _client(stack) as client:
        genuine = forge.genuine_index(client, image.reference, layer.digest)
    return Victim(image, layer.digest, blob, genuine)


def _by_digest(reference: str, manifest_digest: str) -> str:
    return str(Reference.parse(reference).with_digest(manifest_digest))


@pytest.fixture
def other_namespace(stack: LazyStack) -> Iterator[LazyStack]:
    """The same stack seen from a second containerd namespace: its snapshots are Prepared
    anew (containerd shares snapshots by chain ID only within a namespace)."""
    other = dataclasses.replace(stack, namespace=unique_name("lzs-forged"))
    yield other
    remove_namespace_content(other.containerd, other.namespace)


@pytest.mark.parametrize("kind", sorted(FORGERIES))
def test_a_forged_newest_referrer_changes_nothing_by_tag_or_by_digest(
    stack: LazyStack, other_namespace: LazyStack, kind: str
) -> None:
    victim = _victim(stack, kind)
    forged = FORGERIES[kind].forge(victim.genuine, victim.layer_blob)
    with _client(stack) as client:
        forge.push_forged(client, victim.image.reference, victim.layer_digest, forged)

    log_from = stack.daemon_log_offset()
    by_tag = stack.pull(victim.image.reference)
    assert (by_tag.lazy, by_tag.pulled) == (1, 0), by_tag.stdout  # the signed index, lazily
    assert stack.run_ok(victim.image.reference, "sh", "-c", SHOW_TREE) == REAL_TREE

    pinned = _by_digest(victim.image.reference, victim.image.built.manifest_digest)
    by_digest = other_namespace.pull(pinned)
    assert (by_digest.lazy, by_digest.pulled) == (1, 0), by_digest.stdout
    assert other_namespace.run_ok(pinned, "sh", "-c", SHOW_TREE) == REAL_TREE
    # The daemon said which artifact it left out, and why (once: the lookup is cached).
    log = stack.daemon_log_since(log_from)
    assert "not using lazysnap index artifact" in log and "no signature" in log, log[-2000:]


@pytest.mark.parametrize("kind", sorted(FORGERIES))
def test_a_forged_copy_poisons_no_other_image_sharing_the_layer(
    stack: LazyStack, kind: str
) -> None:
    victim = _victim(stack, kind)
    # The attacker copies the image into a repository they can push to and attaches the
    # forged index there: the only index that copy has.
    copy = stack.push(victim.image.built, unique_name(f"evil/copy-{kind}"))
    forged = FORGERIES[kind].forge(victim.genuine, victim.layer_blob)
    with _client(stack) as client:
        forge.push_forged(client, copy.reference, victim.layer_digest, forged)

    log_from = stack.daemon_log_offset()
    pulled = stack.pull(copy.reference)  # first on the node: its snapshot is the shared one
    assert (pulled.lazy, pulled.pulled) == (0, 1), pulled.stdout
    assert "untrusted_index" in pulled.stdout, pulled.stdout  # the pull says why
    [fallback] = stack.fallback_lines(log_from, victim.layer_digest)
    assert "untrusted_index" in fallback, fallback
    assert stack.run_ok(copy.reference, "sh", "-c", SHOW_TREE) == REAL_TREE

    # The genuine image and a third copy without any index reuse that snapshot (same chain
    # ID): both see the real tree.
    genuine = stack.pull(victim.image.reference)
    assert genuine.lazy + genuine.pulled <= 1, genuine.stdout  # "already present" counts neither
    assert stack.run_ok(victim.image.reference, "sh", "-c", SHOW_TREE) == REAL_TREE
    third = stack.push(victim.image.built, unique_name(f"test/third-{kind}"))
    stack.ctr_pull(third.reference, snapshotter="lazysnap")
    assert stack.run_ok(third.reference, "sh", "-c", SHOW_TREE) == REAL_TREE
