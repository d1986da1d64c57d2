"""Kubernetes' path: containerd's CRI plugin (snapshotter lazysnap, snapshot annotations on)
pulls an indexed image lazily - no layer blob leaves the registry - and it runs."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

import pytest

from harness.containerd import CRI_NAMESPACE
from harness.images import PushedImage
from tests.lazy.lazy_helpers import LazyStack, build_data_image, unique_name
from tests.pull.cri import cri_pull_image

pytestmark = pytest.mark.stack


@contextlib.contextmanager
def removed_from_cri_namespace(
    stack: LazyStack, image: PushedImage, image_id: str
) -> Iterator[None]:
    """k8s.io is shared with every other CRI user of this containerd: remove only our image,
    under each name CRI gave it (tag, repo@digest, and the image ID), so GC drops its layers."""
    try:
        yield
    finally:
        listed = stack.containerd.ctr("images", "ls", "-q", namespace=CRI_NAMESPACE, check=False)
        repository = f"{image.registry_host}/{image.repository}"
        for name in listed.stdout.split():
            if name.startswith((f"{repository}:", f"{repository}@")) or name == image_id:
                stack.containerd.ctr(
                    "images", "rm", "--sync", name, namespace=CRI_NAMESPACE, check=False
                )


def test_cri_pull_of_an_indexed_image_is_lazy_and_runs(stack: LazyStack) -> None:
    if not stack.containerd.cri:
        pytest.skip("the session containerd runs without the CRI plugin")
    # One layer of its own: a layer another test mounted lazily would be "already there".
    image = build_data_image(stack.workdir / "cri", {"payload": 3 << 20}, one_layer=True)
    pushed = stack.push(image.built, unique_name("test/lazy-cri"))
    # No static start-up profile: its prefetch at mount would read the layer blob (checked below)
    stack.index_build(pushed.reference, "--no-static-profile")

    log_offset = stack.daemon_log_offset()
    registry_offset = stack.registry.log_offset()
    with removed_from_cri_namespace(stack, pushed, image.built.config_digest):
        image_id = cri_pull_image(str(stack.containerd.address), pushed.reference)
        assert image_id == image.built.config_digest
        fetched = stack.registry.blob_fetches(since=registry_offset)
        assert image.data_layer not in fetched, f"CRI pull fetched the layer blob: {fetched}"
        daemon_log = stack.daemon_log_since(log_offset)
        assert f"layer {image.data_layer} is mounted lazily" in daemon_log, daemon_log[-3000:]

        result = stack.containerd.ctr(
            "run",
            "--rm",
            "--snapshotter",
            "lazysnap",
            pushed.reference,
            unique_name("lzs-cri"),
            "sha256sum",
            "/data/payload",
            namespace=CRI_NAMESPACE,
            timeout=120,
        )
        assert result.stdout.startswith(hashlib.sha256(image.files["data/payload"]).hexdigest())
