"""`lazysnap index build --profile CMD` against docker-registry: the profile is recorded over
lazy mounts served by the registry, attached to the image's index artifact, and handed by
discovery to each layer's mount, which then fetches those files before they are read."""

from __future__ import annotations

import argparse
import secrets
from pathlib import Path

import pytest

from harness.images import directory, file, layer_tar, push, symlink, write_oci_layout
from harness.registry import Registry
from harness.trust import session_trust_policy
from snapshotter.indexer import command
from snapshotter.profile.attach import newest_index_artifact
from snapshotter.profile.model import decode_profile
from snapshotter.remote.access import RegistryAccess
from snapshotter.remote.client import RegistryClient
from snapshotter.remote.credentials import CredentialStore
from snapshotter.remote.hosts import HostsConfig
from snapshotter.remote.reference import Reference
from snapshotter.source.discover import IndexDiscovery
from snapshotter.source.labels import LayerRequest
from snapshotter.vocabulary.artifact import (
    LAYER_DIGEST_ANNOTATION,
    PROFILE_MEDIA_TYPE,
    WINDOWS_BLOB_MEDIA_TYPE,
)
from tests.profile.profile_helpers import mounted_without_background, wait_for_prefetch

pytestmark = pytest.mark.stack
BUSYBOX = Path("/bin/busybox")


def _index(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="lazysnap index")
    command.add_arguments(parser)
    capsys.readouterr()
    code = command.run(parser.parse_args(list(args)))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def image(registry: Registry, tmp_path: Path) -> tuple[Reference, str, list[str]]:
    """(reference, manifest digest, layer digests bottom first): busybox below, data on top."""
    base = layer_tar(
        [
            directory("bin"),
            file("bin/busybox", BUSYBOX.read_bytes(), 0o755),
            symlink("bin/sh", "busybox"),
            symlink("bin/cat", "busybox"),
            file("data/a", b"a" * 300_000),
        ]
    )
    top = layer_tar([file("data/b", b"b" * 200_000), file("data/unread", b"u" * 100_000)])
    built = write_oci_layout(tmp_path / "layout", "v1", [base, top])
    repo = f"profile/app{secrets.token_hex(4)}"
    push(built, registry.host, repo, "v1")
    ref = Reference.parse(f"{registry.host}/{repo}:v1")
    return ref, built.manifest_digest, [layer.digest for layer in built.layers]


def test_a_recorded_profile_reaches_the_mount_and_is_prefetched(
    image: tuple[Reference, str, list[str]],
    registry: Registry,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ref, manifest_digest, (base, top) = image
    code, out, err = _index(
        "build",
        str(ref),
        "--plain-http",
        "--min-layer-size",
        "100k",  # the data layer stays unindexed: recorded from a local copy
        "--span-size",
        "64k",
        "--profile",
        "/bin/sh -c 'cat /data/b /data/a > /dev/null'",
        "--no-pack",  # the profile's prefetch from spans (with a pack: test_pack_stack.py)
        capsys=capsys,
    )
    assert code == 0, err
    assert "profile sha256:" in out and "command exited 0" in out

    client = RegistryClient(HostsConfig(plain_http=[registry.host]), CredentialStore.anonymous())
    found = newest_index_artifact(client, ref, manifest_digest)
    assert found is not None
    artifact, indexed = found
    assert [i.layer_digest for i in indexed] == [base]  # the data layer is under 100k
    [profile_blob] = [d for d in artifact.layers if d.media_type == PROFILE_MEDIA_TYPE]
    # Attaching the profile re-pushed the artifact: the gzip layer's windows blob is still in it.
    windows = [d for d in artifact.layers if d.media_type == WINDOWS_BLOB_MEDIA_TYPE]
    assert [d.annotations.get(LAYER_DIGEST_ANNOTATION) for d in windows] == [base]
    assert indexed[0].windows_digest == windows[0].digest
    profile = decode_profile(client.get_blob(ref.repository, profile_blob.digest))
    assert profile.names_for(base)[0] == "bin/busybox"
    assert "data/a" in profile.names_for(base)
    assert profile.names_for(top) == ("data/b",)

    discovery = IndexDiscovery(
        client, RegistryAccess(plain_http=(registry.host,)), trust=session_trust_policy()
    )
    spec = discovery.resolve(LayerRequest("chain", str(ref), manifest_digest, base, (base,)))
    assert spec.prefetch_names == profile.names_for(base)

    # The mount fetches the profile's files before anyone reads them.
    with mounted_without_background(spec, tmp_path) as mnt:
        assert wait_for_prefetch(mnt) > 0
        since = registry.log_offset()
        assert (mnt / "data/a").read_bytes() == b"a" * 300_000
        registry.wait_log_quiet()
        assert base not in registry.blob_fetches(since)  # already local


def test_profile_needs_a_command_and_a_positive_timeout(
    capsys: pytest.CaptureFixture[str],
) -> None:
    parser = argparse.ArgumentParser(prog="lazysnap index")
    command.add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["build", "reg/x:1", "--profile", "true", "--profile-timeout", "0"])
    assert "--profile-timeout must be > 0" in capsys.readouterr().err
    code, _, err = _index("build", "reg/x:1", "--profile", "  ", capsys=capsys)
    assert code == 2 and "--profile: empty command" in err
    code, _, err = _index("build", "reg/x:1", "--profile", "sh -c 'unclosed", capsys=capsys)
    assert code == 2 and "No closing quotation" in err
