"""The big realistic image (Debian + python3 + numpy/pandas..., 3 gzip layers, ~18k files)
through lazysnap with an ordinary (non-lazy) `ctr images pull`: the fallback path must unpack
and run a real-sized image, not just busybox."""

from __future__ import annotations

import secrets

import pytest

from harness.containerd import Containerd
from harness.daemon import LazysnapDaemon
from harness.images import PushedImage

pytestmark = [pytest.mark.stack, pytest.mark.slow]


def test_pybig_pulls_and_imports_numpy_on_lazysnap(
    lazysnap: LazysnapDaemon, containerd: Containerd, pybig_image: PushedImage
) -> None:
    assert len(pybig_image.layers) == 3
    assert pybig_image.built.blob_bytes >= 150_000_000
    containerd.pull(pybig_image.reference, snapshotter="lazysnap")
    output = containerd.run_container(
        pybig_image.reference,
        "python3",
        "-c",
        "import numpy, json; print(numpy.arange(4).sum(), json.dumps([1]))",
        snapshotter="lazysnap",
        container_id=f"pybig-{secrets.token_hex(4)}",
    )
    assert output == "6 [1]\n"
