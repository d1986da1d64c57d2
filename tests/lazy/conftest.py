"""Fixtures of the lazy-pull acceptance tests: one containerd namespace and scratch dir per test,
on the session's registry, containerd and lazysnap daemon (tests/conftest.py)."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.containerd import Containerd
from harness.daemon import LazysnapDaemon
from harness.procs import HarnessError
from harness.registry import Registry
from tests.lazy.lazy_helpers import LazyStack, unique_name


@pytest.fixture
def stack(
    stack_base: Path, registry: Registry, containerd: Containerd, lazysnap: LazysnapDaemon
) -> Iterator[LazyStack]:
    """A fresh namespace (its containers and images removed afterwards, so containerd's GC
    releases the snapshots and lazysnap unmounts their layers) and a scratch dir."""
    workdir = Path(tempfile.mkdtemp(prefix="lazy-", dir=stack_base))
    lazy = LazyStack(containerd, registry, lazysnap, unique_name("lzs-lazy"), workdir)
    yield lazy
    remove_namespace_content(containerd, lazy.namespace)
    shutil.rmtree(workdir, ignore_errors=True)


def remove_namespace_content(containerd: Containerd, namespace: str) -> None:
    for kind in ("tasks", "containers"):
        listed = containerd.ctr(kind, "ls", "-q", namespace=namespace, check=False, timeout=30)
        for name in listed.stdout.split():
            if kind == "tasks":
                containerd.ctr(
                    "tasks", "kill", "-s", "SIGKILL", name, namespace=namespace, check=False
                )
                containerd.ctr("tasks", "delete", "-f", name, namespace=namespace, check=False)
            else:
                containerd.ctr("containers", "rm", name, namespace=namespace, check=False)
    images = containerd.ctr("images", "ls", "-q", namespace=namespace, check=False, timeout=30)
    for image in images.stdout.split():
        with contextlib.suppress(HarnessError):
            containerd.ctr("images", "rm", "--sync", image, namespace=namespace, check=False)
    containerd.ctr("namespaces", "rm", namespace, namespace=namespace, check=False, timeout=30)
