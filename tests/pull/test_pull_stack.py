"""`lazysnap pull` and the CRI pull path against the real registry, containerd and runc.

Each test pulls into its own containerd namespace (k8s.io for CRI) and its own repositories, so
it neither sees nor disturbs the other tests sharing the session's containerd.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.containerd import CRI_NAMESPACE, Containerd, start_containerd
from harness.daemon import LazysnapDaemon
from harness.images import (
    PushedImage,
    busybox_layer_tar,
    file,
    layer_tar,
    push,
    write_oci_layout,
)
from harness.registry import Registry
from snapshotter.pull.plan import chain_ids
from snapshotter.remote.client import RegistryClient
from snapshotter.remote.hosts import HostsConfig
from snapshotter.remote.manifest import OCI_INDEX, Descriptor, Platform, build_index
from snapshotter.remote.reference import Reference
from tests.pull.cri import cri_pull_image
from tests.pull.lazy_fake import LazyFake, serve_lazy_fake

pytestmark = pytest.mark.stack

REPO_ROOT = Path(__file__).resolve().parents[2]
GREETING = "hello from the top layer\n"


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_layer_image(stack_base: Path, registry: Registry) -> PushedImage:
    """busybox + a layer adding /greeting.txt: two chain IDs, the second on a parent."""
    layout = stack_base / "images" / "pull-two-layer"
    layout.mkdir(parents=True, exist_ok=True)
    built = write_oci_layout(
        layout,
        "latest",
        [busybox_layer_tar(layout.parent), layer_tar([file("greeting.txt", GREETING)])],
    )
    return push(built, registry.host, f"test/pull-two-{secrets.token_hex(3)}", "latest")


@pytest.fixture
def namespace(containerd: Containerd) -> Iterator[str]:
    """A fresh namespace; its images are removed afterwards so GC reclaims the rest."""
    name = f"lzs-pull-{secrets.token_hex(4)}"
    yield name
    _remove_images(containerd, name)


def _remove_images(containerd: Containerd, namespace: str) -> None:
    listed = containerd.ctr("images", "ls", "-q", namespace=namespace, check=False)
    for image in listed.stdout.split():
        containerd.ctr("images", "rm", "--sync", image, namespace=namespace, check=False)


def lazysnap_pull(
    containerd: Containerd,
    image: str,
    namespace: str,
    *extra: str,
    snapshotter: str = "lazysnap",
    address: str | None = None,
) -> subprocess.CompletedProcess[str]:
    argv = [
        sys.executable,
        "-m",
        "snapshotter.pull",
        image,
        "--no-daemon",  # these tests cover the pull in the CLI's own process
        "--address",
        address or str(containerd.address),
        "--namespace",
        namespace,
        "--hosts-dir",
        str(containerd.hosts_dir),
        "--snapshotter",
        snapshotter,
        *extra,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=300, env=env, stdin=subprocess.DEVNULL
    )


def ctr_run(
    containerd: Containerd, namespace: str, image: str, snapshotter: str, *command: str
) -> str:
    result = containerd.ctr(
        "run",
        "--rm",
        "--snapshotter",
        snapshotter,
        image,
        f"lzs-pull-{secrets.token_hex(4)}",
        *command,
        namespace=namespace,
        timeout=120,
    )
    return result.stdout


def snapshot_keys(containerd: Containerd, namespace: str, snapshotter: str) -> list[str]:
    out = containerd.ctr("snapshots", "--snapshotter", snapshotter, "ls", namespace=namespace)
    return [line.split()[0] for line in out.stdout.splitlines()[1:] if line.strip()]


def leases(containerd: Containerd, namespace: str) -> list[str]:
    out = containerd.ctr("leases", "ls", "-q", namespace=namespace)
    return out.stdout.split()


def layer_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("layer ")]


# -- ordinary (non-lazy) pull ----------------------------------------------------------------


def test_pull_unpacks_every_layer_and_ctr_runs_the_image(
    containerd: Containerd, two_layer_image: PushedImage, namespace: str
) -> None:
    # overlayfs: the client's containerd side, independent of the lazysnap daemon
    result = lazysnap_pull(
        containerd, two_layer_image.reference, namespace, snapshotter="overlayfs"
    )
    assert result.returncode == 0, result.stderr
    lines = layer_lines(result.stdout)
    assert len(lines) == 2 and all(": pulled " in line for line in lines), result.stdout
    assert "0 lazy, 2 pulled" in result.stdout
    out = ctr_run(
        containerd, namespace, two_layer_image.reference, "overlayfs", "cat", "/greeting.txt"
    )
    assert out == GREETING
    # The image record points at the manifest, and the lease is gone once the pull is done.
    image = containerd.ctr("images", "ls", namespace=namespace).stdout
    assert two_layer_image.built.manifest_digest in image
    assert leases(containerd, namespace) == []


def test_second_pull_is_a_noop(
    containerd: Containerd, registry: Registry, two_layer_image: PushedImage, namespace: str
) -> None:
    first = lazysnap_pull(containerd, two_layer_image.reference, namespace, snapshotter="overlayfs")
    assert first.returncode == 0, first.stderr
    before = snapshot_keys(containerd, namespace, "overlayfs")
    offset = registry.log_offset()
    second = lazysnap_pull(
        containerd, two_layer_image.reference, namespace, snapshotter="overlayfs"
    )
    assert second.returncode == 0, second.stderr
    assert "2 already present" in second.stdout and "0 pulled" in second.stdout
    fetched = registry.blob_fetches(since=offset)
    assert not {layer.digest for layer in two_layer_image.layers} & set(fetched), fetched
    assert snapshot_keys(containerd, namespace, "overlayfs") == before


def test_pull_of_unindexed_image_on_lazysnap_runs(
    lazysnap: LazysnapDaemon,
    containerd: Containerd,
    two_layer_image: PushedImage,
    namespace: str,
) -> None:
    result = lazysnap_pull(containerd, two_layer_image.reference, namespace)
    assert result.returncode == 0, result.stderr
    # No lazysnap index exists for this image: every layer goes through our client.
    assert "0 lazy, 2 pulled" in result.stdout, result.stdout
    out = ctr_run(
        containerd,
        namespace,
        two_layer_image.reference,
        "lazysnap",
        "sh",
        "-c",
        "cat /greeting.txt; echo ok",
    )
    assert out == GREETING + "ok\n"


def test_pull_through_an_index_picks_this_machines_platform(
    containerd: Containerd, registry: Registry, two_layer_image: PushedImage, namespace: str
) -> None:
    here = Platform.host()
    manifest = Descriptor(
        "application/vnd.oci.image.manifest.v1+json",
        two_layer_image.built.manifest_digest,
        len(_manifest_bytes(two_layer_image)),
        platform=here,
    )
    # A second entry for another platform, pointing at the same manifest (it must exist).
    other = Descriptor(
        manifest.media_type, manifest.digest, manifest.size, platform=Platform("linux", "s390x")
    )
    index = build_index([other, manifest])
    with RegistryClient(HostsConfig(plain_http=[registry.host])) as client:
        client.push_manifest(
            Reference.parse(two_layer_image.reference).repository, "multi", index, OCI_INDEX
        )
    reference = two_layer_image.reference.rsplit(":", 1)[0] + ":multi"

    result = lazysnap_pull(containerd, reference, namespace, snapshotter="overlayfs")
    assert result.returncode == 0, result.stderr
    images = containerd.ctr("images", "ls", namespace=namespace).stdout
    assert OCI_INDEX in images  # the record targets the index, like ctr pull does
    out = ctr_run(containerd, namespace, reference, "overlayfs", "cat", "/greeting.txt")
    assert out == GREETING

    missing = lazysnap_pull(
        containerd, reference, namespace, "--platform", "linux/riscv64", snapshotter="overlayfs"
    )
    assert missing.returncode == 1
    assert "linux/riscv64" in missing.stderr and "Traceback" not in missing.stderr


def _manifest_bytes(image: PushedImage) -> bytes:
    hexdigest = image.built.manifest_digest.split(":", 1)[1]
    return (image.built.layout / "blobs" / "sha256" / hexdigest).read_bytes()


# -- errors ---------------------------------------------------------------------------------


def test_bad_reference_is_a_clear_error(containerd: Containerd, namespace: str) -> None:
    result = lazysnap_pull(containerd, "Not A Ref::", namespace)
    assert result.returncode == 1
    assert "'Not A Ref::'" in result.stderr
    assert result.stderr.count("Not A Ref::") == 1, result.stderr  # named once
    assert "Traceback" not in result.stderr


def test_missing_containerd_names_the_socket(
    containerd: Containerd, two_layer_image: PushedImage, tmp_path: Path
) -> None:
    socket = tmp_path / "no-containerd.sock"
    result = lazysnap_pull(containerd, two_layer_image.reference, "default", address=str(socket))
    assert result.returncode == 1
    assert f"cannot reach containerd at {socket}" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_containerd_is_reported_at_once_while_the_registry_hangs(
    containerd: Containerd, tmp_path: Path
) -> None:
    # The manifest request runs beside the containerd connection: a registry that never
    # answers must not hold back the error the user can act on.
    silent = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    try:
        host = f"127.0.0.1:{silent.getsockname()[1]}"
        missing = tmp_path / "no-containerd.sock"
        started = time.monotonic()
        result = lazysnap_pull(
            containerd, f"{host}/app:1", "default", "--plain-http", address=str(missing)
        )
        took = time.monotonic() - started
    finally:
        silent.close()
    assert result.returncode == 1
    assert f"cannot reach containerd at {missing}" in result.stderr
    assert "Traceback" not in result.stderr
    assert took < 20  # the registry client's own timeout is 30 s, with retries


def test_unknown_image_names_it_and_leaves_nothing_behind(
    containerd: Containerd, registry: Registry, namespace: str
) -> None:
    reference = f"{registry.host}/test/does-not-exist:1"
    result = lazysnap_pull(containerd, reference, namespace, snapshotter="overlayfs")
    assert result.returncode == 1
    assert reference in result.stderr and "Traceback" not in result.stderr
    assert containerd.ctr("images", "ls", "-q", namespace=namespace).stdout.strip() == ""
    assert leases(containerd, namespace) == []


def test_layer_missing_from_registry_leaves_no_extraction_snapshot(
    containerd: Containerd, stack_base: Path, registry: Registry, namespace: str
) -> None:
    # A layer no other image shares, so deleting its blob from the registry's storage only
    # breaks this image: the manifest resolves, the blob fetch fails mid-pull.
    layout = stack_base / "images" / f"pull-broken-{secrets.token_hex(3)}"
    built = write_oci_layout(
        layout, "latest", [layer_tar([file("unique.txt", secrets.token_hex(32))])]
    )
    pushed = push(built, registry.host, f"test/pull-broken-{secrets.token_hex(3)}", "latest")
    hexdigest = built.layers[0].digest.split(":", 1)[1]
    blob_dir = registry.base / "data" / "docker" / "registry" / "v2" / "blobs" / "sha256"
    (blob_dir / hexdigest[:2] / hexdigest / "data").unlink()

    result = lazysnap_pull(containerd, pushed.reference, namespace, snapshotter="overlayfs")
    assert result.returncode == 1
    assert built.layers[0].digest in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    keys = snapshot_keys(containerd, namespace, "overlayfs")
    assert not [k for k in keys if k.startswith("extract-")], keys
    assert leases(containerd, namespace) == []
    assert containerd.ctr("images", "ls", "-q", namespace=namespace).stdout.strip() == ""


# -- CRI ------------------------------------------------------------------------------------


def test_cri_pull_image_then_ctr_runs_it_on_lazysnap(
    lazysnap: LazysnapDaemon, containerd: Containerd, busybox_image: PushedImage
) -> None:
    if not containerd.cri:
        pytest.skip("the session containerd runs without the CRI plugin")
    image_id = cri_pull_image(str(containerd.address), busybox_image.reference)
    assert image_id == busybox_image.built.config_digest
    # CRI unpacked into lazysnap: its chain ID snapshot exists there, in k8s.io.
    listed = containerd.ctr("images", "ls", "-q", namespace=CRI_NAMESPACE).stdout.split()
    assert busybox_image.reference in listed
    out = ctr_run(containerd, CRI_NAMESPACE, busybox_image.reference, "lazysnap", "echo", "cri-ok")
    assert out == "cri-ok\n"
    info = containerd.ctr(
        "snapshots",
        "--snapshotter",
        "lazysnap",
        "info",
        busybox_image.layers[0].diff_id,
        namespace=CRI_NAMESPACE,
    ).stdout
    labels = json.loads(info)["Labels"]
    # CRI passed the labels lazysnap needs (disable_snapshot_annotations = false).
    assert labels["containerd.io/snapshot/cri.layer-digest"] == busybox_image.layers[0].digest


# -- lazy path ------------------------------------------------------------------------------


@pytest.fixture
def containerd_on_lazy_fake(
    tmp_path_factory: pytest.TempPathFactory, registry: Registry
) -> Iterator[tuple[Containerd, LazyFake]]:
    """A second containerd whose `lazysnap` proxy plugin is the lazy fake (see lazy_fake.py)."""
    base = Path(tempfile.mkdtemp(prefix="lzs-lf-", dir="/tmp"))  # short: unix socket paths
    server, fake = serve_lazy_fake(base / "fake.sock")
    try:
        instance = start_containerd(
            base / "ctd", proxy_socket=base / "fake.sock", registry_hosts=[registry.host]
        )
    except BaseException:
        server.stop(grace=None)
        shutil.rmtree(base, ignore_errors=True)
        raise
    yield instance, fake
    instance.stop()
    server.stop(grace=None).wait()
    shutil.rmtree(base, ignore_errors=True)


def test_layers_the_snapshotter_mounts_lazily_are_never_downloaded(
    containerd_on_lazy_fake: tuple[Containerd, LazyFake],
    registry: Registry,
    two_layer_image: PushedImage,
) -> None:
    ctd, fake = containerd_on_lazy_fake
    namespace = ctd.namespace
    offset = registry.log_offset()
    result = lazysnap_pull(ctd, two_layer_image.reference, namespace)
    assert result.returncode == 0, result.stderr
    lines = layer_lines(result.stdout)
    assert len(lines) == 2 and all(": lazy " in line for line in lines), result.stdout
    assert "2 lazy, 0 pulled" in result.stdout
    # Prepare came with each layer's chain ID, bottom first, and no layer blob was fetched.
    chains = chain_ids([layer.diff_id for layer in two_layer_image.layers])
    assert fake.prepared_targets == chains
    fetched = registry.blob_fetches(since=offset)
    assert not {layer.digest for layer in two_layer_image.layers} & set(fetched), fetched
    content = ctd.ctr("content", "ls", "-q", namespace=namespace).stdout.split()
    assert not {layer.digest for layer in two_layer_image.layers} & set(content)
    # containerd recorded the lazily committed chain, and the image record exists.
    keys = snapshot_keys(ctd, namespace, "lazysnap")
    assert set(chains) <= set(keys), keys
    assert two_layer_image.reference in ctd.ctr("images", "ls", "-q", namespace=namespace).stdout
    # The config holds the top of the chain for GC, as containerd's unpacker leaves it.
    config_labels = ctd.ctr("content", "ls", namespace=namespace).stdout
    assert f"containerd.io/gc.ref.snapshot.lazysnap={chains[1]}" in config_labels

    again = lazysnap_pull(ctd, two_layer_image.reference, namespace)
    assert again.returncode == 0 and "2 already present" in again.stdout, again.stdout
    assert len(fake.prepared_targets) == 2  # nothing Prepared the second time
