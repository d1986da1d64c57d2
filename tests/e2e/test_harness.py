"""The harness's own promises that other tests build on: the registry's fetch accounting,
basic auth, and `python -m harness up/down` leaving nothing behind."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from harness.containerd import RUNC_STATE, start_containerd
from harness.images import PushedImage, build_busybox, push
from harness.procs import HarnessError, mounts_under, pid_alive
from harness.registry import BlobFetches, Registry, TokenAuth, start_registry

pytestmark = pytest.mark.stack
REPO_ROOT = Path(__file__).resolve().parents[2]


def _get(url: str, headers: dict[str, str] | None = None, method: str = "GET") -> bytes:
    request = urllib.request.Request(url, headers=headers or {}, method=method)
    with urllib.request.urlopen(request, timeout=10) as response:
        body: bytes = response.read()
        return body


def test_blob_fetches_counts_range_bytes_not_heads(
    registry: Registry, busybox_image: PushedImage
) -> None:
    layer = busybox_image.layers[0]
    url = f"{registry.url}/v2/{busybox_image.repository}/blobs/{layer.digest}"
    offset = registry.log_offset()
    _get(url, method="HEAD")
    assert len(_get(url, {"Range": "bytes=100-199"})) == 100
    assert len(_get(url, {"Range": "bytes=0-49"})) == 50
    assert registry.blob_fetches(since=offset) == {layer.digest: BlobFetches(2, 150)}
    _get(url)
    assert registry.blob_fetches(since=offset)[layer.digest] == BlobFetches(3, 150 + layer.size)


def test_basic_auth_registry_refuses_anonymous_push(tmp_path: Path) -> None:
    secured = start_registry(tmp_path / "registry", basic_auth={"alice": "s3cret"})
    try:
        with pytest.raises(urllib.error.HTTPError) as refused:
            _get(f"{secured.url}/v2/")
        assert refused.value.code == 401
        image = build_busybox(tmp_path / "busybox")
        with pytest.raises(HarnessError, match="push"):
            push(image, secured.host, "test/busybox")
        pushed = push(image, secured.host, "test/busybox", credentials=("alice", "s3cret"))
        assert pushed.reference == f"{secured.host}/test/busybox:latest"
    finally:
        secured.stop()
    assert not secured.service.alive()


def test_cli_up_then_down_leaves_no_process_or_mount(tmp_path: Path) -> None:
    base = tmp_path / "stack"
    harness = [sys.executable, "-m", "harness"]
    up = subprocess.run(
        [*harness, "up", str(base), "--no-lazysnap"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert up.returncode == 0, up.stderr
    assert "export REGISTRY=127.0.0.1:" in up.stdout
    record = json.loads((base / "stack.json").read_text())
    pids = [record["registry_pid"], record["containerd_pid"]]
    try:
        assert all(pid_alive(pid) for pid in pids)
    finally:
        down = subprocess.run(
            [*harness, "down", str(base)],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert down.returncode == 0, down.stderr
    assert not any(pid_alive(pid) for pid in pids)
    assert mounts_under(base) == []
    assert not (base / "stack.json").exists()


def test_token_auth_registry_sends_clients_to_the_realm(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl to make the token-signing certificate")
    cert = tmp_path / "issuer.crt"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            str(tmp_path / "issuer.key"),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=lazysnap-test-issuer",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    realm = "http://127.0.0.1:9/token"  # never contacted here: the registry only names it
    secured = start_registry(
        tmp_path / "registry",
        token_auth=TokenAuth(realm, "test-registry", "lazysnap-test-issuer", cert),
    )
    try:
        with pytest.raises(urllib.error.HTTPError) as refused:
            _get(f"{secured.url}/v2/test/busybox/manifests/latest")
        assert refused.value.code == 401
        challenge = refused.value.headers["WWW-Authenticate"]
        assert challenge.startswith(f'Bearer realm="{realm}",service="test-registry"')
        assert 'scope="repository:test/busybox:pull"' in challenge
    finally:
        secured.stop()


def test_containerd_stop_kills_running_containers_and_unmounts(
    registry: Registry, busybox_image: PushedImage
) -> None:
    base = Path(tempfile.mkdtemp(prefix="lzs-stop-", dir="/tmp"))  # short: unix socket paths
    try:
        instance = start_containerd(base, proxy_socket=None, registry_hosts=[registry.host])
        try:
            instance.pull(busybox_image.reference, snapshotter="overlayfs")
            instance.ctr(
                "run",
                "-d",
                "--snapshotter",
                "overlayfs",
                busybox_image.reference,
                "left-running",
                "sleep",
                "600",
            )
            task_pid = int(instance.ctr("tasks", "ls").stdout.split()[-2])
            assert pid_alive(task_pid)
            assert mounts_under(base) != []  # the container's rootfs overlay
        finally:
            instance.stop()
        assert not pid_alive(task_pid)
        assert not instance.service.alive()
        assert mounts_under(base) == []
        assert not (RUNC_STATE / instance.namespace).exists()
    finally:
        shutil.rmtree(base, ignore_errors=True)
