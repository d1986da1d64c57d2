"""Private images on Kubernetes: kubelet's pull secret reaches lazysnap through its CRI
image-service proxy (`[cri] image_service_socket`), in memory only.

A stack of its own: registries behind token auth (anonymous refused) on one token service,
containerd with its CRI plugin, and a `lazysnap serve` whose node has no registry credentials
(an empty docker config) and whose proxy forwards to that containerd."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from harness.containerd import CRI_NAMESPACE, Containerd, start_containerd
from harness.daemon import DaemonSettings, LazysnapDaemon, start_lazysnap, write_config
from harness.images import PushedImage, push
from harness.procs import HarnessError
from harness.registry import Registry, TokenAuth, start_registry
from harness.token_issuer import TokenIssuer
from harness.trust import SigningKeys
from snapshotter._proto.cri.runtime.v1 import pull_pb2
from tests.lazy.lazy_helpers import REPO_ROOT, DataImage, build_data_image, unique_name

pytestmark = pytest.mark.stack

USER = "puller"
IMAGE_SERVICE = "/runtime.v1.ImageService/"
AUTH_REFUSED = "registry refused the credentials we have"


@dataclass
class PrivateStack:
    base: Path
    issuer: TokenIssuer
    registry: Registry
    other_registry: Registry
    containerd: Containerd
    daemon: LazysnapDaemon
    secret: str  # USER's password: must never show up anywhere lazysnap writes
    builder_env: dict[str, str]  # DOCKER_CONFIG with the secret, for index build and push

    @property
    def cri_socket(self) -> Path:
        return self.base / "cri.sock"

    def private_image(self, registry: Registry, repository: str) -> tuple[DataImage, PushedImage]:
        """An indexed one-layer image of its own in repository (pushed and indexed with the
        secret, which only this test process and its builder config know)."""
        (self.base / "images").mkdir(exist_ok=True)
        image = build_data_image(
            self.base / "images" / unique_name("img"), {"payload": 2 << 20}, one_layer=True
        )
        pushed = push(
            image.built,
            registry.host,
            repository,
            unique_name("v"),
            credentials=(USER, self.secret),
        )
        # No static start-up profile: its prefetch at mount would fetch from the layer blob,
        # and the tests here check that the pull itself reads none of it.
        self.lazysnap(
            "index",
            "build",
            "--min-layer-size",
            "0",
            "--plain-http",
            "--no-static-profile",
            pushed.reference,
        )
        return image, pushed

    def lazysnap(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        from harness.daemon import lazysnap_command

        result = subprocess.run(
            [*lazysnap_command(), *args],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, **self.builder_env, "PYTHONPATH": str(REPO_ROOT)},
            stdin=subprocess.DEVNULL,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"lazysnap {' '.join(args)}: {result.stderr}{result.stdout}")
        return result

    def log_offset(self) -> int:
        return self.daemon.log_path.stat().st_size

    def log_since(self, offset: int) -> str:
        with open(self.daemon.log_path, "rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")


def cri_call(
    socket: Path,
    method: str,
    request: bytes,
    timeout: float | None = 300.0,
    service: str = IMAGE_SERVICE,
) -> bytes:
    with grpc.insecure_channel(f"unix://{socket}") as channel:
        call = channel.unary_unary(
            service + method, request_serializer=None, response_deserializer=None
        )
        response: bytes = call(request, timeout=timeout)
    return response


def pull_request(image: str, auth: pull_pb2.AuthConfig | None = None) -> bytes:
    request = pull_pb2.PullImageRequest(image=pull_pb2.ImageSpec(image=image))
    if auth is not None:
        request.auth.CopyFrom(auth)
    return request.SerializeToString()


def image_request(image: str) -> bytes:
    """ImageStatusRequest / RemoveImageRequest: field 1 is the ImageSpec, as in PullImage."""
    return pull_request(image)


def cri_error(socket: Path, method: str, request: bytes) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as raised:
        cri_call(socket, method, request, timeout=60)
    error: grpc.Call = raised.value  # type: ignore[assignment]
    return error.code(), error.details() or ""


@pytest.fixture(scope="module")
def private(stack_base: Path, index_signing_keys: SigningKeys) -> Iterator[PrivateStack]:
    base = Path(tempfile.mkdtemp(prefix="cri-", dir=stack_base))
    secret = "sEcReT-" + secrets.token_hex(12)
    issuer = TokenIssuer(base / "issuer", users={USER: secret}).start()
    auth = TokenAuth(issuer.realm, issuer.service, issuer.issuer, issuer.cert_path)
    started: list[Registry] = []
    containerd: Containerd | None = None
    daemon: LazysnapDaemon | None = None
    try:
        registry = start_registry(base / "registry", token_auth=auth)
        started.append(registry)
        other = start_registry(base / "other", token_auth=auth)
        started.append(other)
        # The daemon first: containerd dials its snapshotter socket on the first pull.
        hosts_dir = base / "containerd" / "certs.d"  # start_containerd writes it there
        node_config = base / "node-docker-config.json"
        node_config.write_text("{}")  # the node has no registry credentials at all
        config = write_config(
            base / "lazysnap" / "config.toml",
            base / "lazysnap" / "root",
            base / "lazysnap" / "lazysnap.sock",
            DaemonSettings(
                hosts_dir=hosts_dir,
                plain_http=(registry.host, other.host),
                background_fetch=False,
                trust_public_keys=(index_signing_keys.public,),
            ),
        )
        text = config.read_text().replace(
            "[remote]\n", f'[remote]\ndocker_config = "{node_config}"\n', 1
        )
        config.write_text(
            text + "[cri]\n"
            f'image_service_socket = "{base / "cri.sock"}"\n'
            f'containerd_cri_socket = "{base / "containerd" / "containerd.sock"}"\n'
            '[metrics]\naddress = "127.0.0.1:0"\n'
        )
        daemon = start_lazysnap(base / "lazysnap", config=config)
        containerd = start_containerd(
            base / "containerd",
            proxy_socket=base / "lazysnap" / "lazysnap.sock",
            registry_hosts=[registry.host, other.host],
            cri=True,
        )
        assert containerd.address == base / "containerd" / "containerd.sock"
        builder = base / "builder"
        builder.mkdir()
        token = base64.b64encode(f"{USER}:{secret}".encode()).decode()
        (builder / "config.json").write_text(
            json.dumps({"auths": {h: {"auth": token} for h in (registry.host, other.host)}})
        )
        yield PrivateStack(
            base, issuer, registry, other, containerd, daemon, secret,
            {"DOCKER_CONFIG": str(builder)},
        )  # fmt: skip
    except HarnessError as exc:
        pytest.fail(str(exc), pytrace=False)
    finally:
        if containerd is not None:
            containerd.stop()
        if daemon is not None:
            daemon.stop()
        for instance in started:
            instance.stop()
        issuer.stop()
        shutil.rmtree(base, ignore_errors=True)


def password_auth(stack: PrivateStack) -> pull_pb2.AuthConfig:
    return pull_pb2.AuthConfig(username=USER, password=stack.secret)


def test_calls_through_the_proxy_get_containerd_s_answers(private: PrivateStack) -> None:
    _, pushed = private.private_image(private.registry, "team/answers")
    cri_call(
        private.cri_socket, "PullImage", pull_request(pushed.reference, password_auth(private))
    )
    for method, request in (
        ("ImageStatus", image_request(pushed.reference)),
        ("ListImages", b""),
        ("ImageStatus", image_request(f"{private.registry.host}/team/never:pushed")),
    ):
        through = cri_call(private.cri_socket, method, request, timeout=60)
        direct = cri_call(private.containerd.address, method, request, timeout=60)
        assert through == direct, method
    assert pushed.reference.encode() in cri_call(
        private.cri_socket, "ImageStatus", image_request(pushed.reference)
    )
    # kubelet's older API version is served the same way.
    old = "/runtime.v1alpha2.ImageService/"
    request = image_request(pushed.reference)
    assert cri_call(private.cri_socket, "ImageStatus", request, 60, old) == cri_call(
        private.containerd.address, "ImageStatus", request, 60, old
    )
    # A call without a deadline is forwarded without one.
    assert cri_call(private.cri_socket, "ListImages", b"", timeout=None) == cri_call(
        private.containerd.address, "ListImages", b"", timeout=None
    )
    # ImageFsInfo carries the time it was measured: the same filesystem, the same shape.
    through = cri_call(private.cri_socket, "ImageFsInfo", b"", timeout=60)
    direct = cri_call(private.containerd.address, "ImageFsInfo", b"", timeout=60)
    assert str(private.containerd.root).encode() in through
    assert len(through) == len(direct)
    # An error keeps its code and details: a pull of a tag that does not exist.
    missing = pull_request(f"{private.registry.host}/team/answers:absent", password_auth(private))
    assert cri_error(private.cri_socket, "PullImage", missing) == cri_error(
        private.containerd.address, "PullImage", missing
    )
    # RemoveImage: removed through the proxy, gone for containerd too.
    cri_call(private.cri_socket, "RemoveImage", image_request(pushed.reference), timeout=60)
    status = cri_call(private.containerd.address, "ImageStatus", image_request(pushed.reference))
    assert pushed.reference.encode() not in status
    # Only the image service is served: kubelet's runtime endpoint stays containerd's.
    with grpc.insecure_channel(f"unix://{private.cri_socket}") as channel:
        call = channel.unary_unary(
            "/runtime.v1.RuntimeService/Version",
            request_serializer=None,
            response_deserializer=None,
        )
        with pytest.raises(grpc.RpcError) as raised:
            call(b"", timeout=10)
    assert raised.value.code() is grpc.StatusCode.UNIMPLEMENTED


def lazily_mounted(log: str, layer: str) -> bool:
    return f"layer {layer} is mounted lazily" in log


def fallback_line(log: str, layer: str) -> str:
    lines = [line for line in log.splitlines() if f"layer {layer} falls back" in line]
    assert lines, f"no fallback line for {layer} in:\n{log[-3000:]}"
    return lines[-1]


def test_a_private_image_pulled_through_the_proxy_is_lazy_runs_and_leaks_nothing(
    private: PrivateStack,
) -> None:
    image, pushed = private.private_image(private.registry, "team/app")
    offset = private.log_offset()
    fetches_from = private.registry.log_offset()
    image_id = cri_pull(private, private.cri_socket, pushed, password_auth(private))
    assert image_id == image.built.config_digest
    log = private.log_since(offset)
    assert lazily_mounted(log, image.data_layer), log[-3000:]
    fetched = private.registry.blob_fetches(since=fetches_from)
    assert image.data_layer not in fetched, f"the CRI pull fetched the layer blob: {fetched}"
    # The container reads the payload: the mount process fetches it with the pull secret.
    result = private.containerd.ctr(
        "run", "--rm", "--snapshotter", "lazysnap", pushed.reference, unique_name("lzs-cri"),
        "sha256sum", "/data/payload",
        namespace=CRI_NAMESPACE, timeout=120,
    )  # fmt: skip
    assert result.stdout.startswith(hashlib.sha256(image.files["data/payload"]).hexdigest())
    assert_secret_nowhere(private)


def cri_pull(
    stack: PrivateStack, socket: Path, pushed: PushedImage, auth: pull_pb2.AuthConfig
) -> str:
    response = pull_pb2.ImageSpec.FromString(
        cri_call(socket, "PullImage", pull_request(pushed.reference, auth))
    )  # PullImageResponse{image_ref = 1}: the same wire shape as ImageSpec{image = 1}
    return response.image


def mount_process_pids(root: Path) -> list[int]:
    pids = []
    for state in root.glob("snapshots/*/fs.lazysnap.json"):
        pid = json.loads(state.read_text()).get("pid")
        if isinstance(pid, int) and Path(f"/proc/{pid}").exists():
            pids.append(pid)
    return pids


def assert_secret_nowhere(stack: PrivateStack) -> None:
    """The secret is in no file under the daemon's directory (root: state, sidecars, metadata,
    the span cache; the daemon's and mount processes' logs) and in no argv or environment of
    the daemon, its zygote or the mount processes."""
    needles = [stack.secret.encode(), base64.b64encode(f"{USER}:{stack.secret}".encode())]
    daemon_dir = stack.daemon.root.parent
    searched = 0
    for path in daemon_dir.rglob("*"):
        if path.is_file() and not path.is_socket():
            data = path.read_bytes()
            searched += 1
            for needle in needles:
                assert needle not in data, f"the pull secret is in {path}"
    assert searched > 5, f"only {searched} files under {daemon_dir}"
    for args in (("status",), ("status", "--json")):
        shown = stack.lazysnap(*args, "--root", str(stack.daemon.root)).stdout
        assert stack.secret not in shown, f"the pull secret is in lazysnap {' '.join(args)}"
    pids = mount_process_pids(stack.daemon.root)
    assert pids, "no live mount process to look at"
    daemon_pid = stack.daemon.pid
    assert daemon_pid is not None
    children = Path(f"/proc/{daemon_pid}/task/{daemon_pid}/children").read_text().split()
    for pid in [daemon_pid, *pids, *map(int, children)]:
        for name in ("cmdline", "environ"):
            data = Path(f"/proc/{pid}/{name}").read_bytes()
            for needle in needles:
                assert needle not in data, f"the pull secret is in /proc/{pid}/{name}"


def test_straight_to_containerd_the_private_image_falls_back_with_the_reason(
    private: PrivateStack,
) -> None:
    image, pushed = private.private_image(private.registry, "team/direct")
    offset = private.log_offset()
    cri_pull(private, private.containerd.address, pushed, password_auth(private))
    line = fallback_line(private.log_since(offset), image.data_layer)
    assert AUTH_REFUSED in line and "anonymous access" in line, line
    status = private.lazysnap("status", "--root", str(private.daemon.root)).stdout
    assert f"auth: layer {image.data_layer}: {AUTH_REFUSED}" in status, status
    metrics = scrape_metrics(private)
    assert re.search(r'lazysnap_prepares_total\{outcome="fallback",reason="auth"\} [1-9]', metrics)
    assert private.secret not in metrics


def scrape_metrics(stack: PrivateStack) -> str:
    ports = re.findall(r"serving metrics on http://127\.0\.0\.1:(\d+)/", stack.daemon.log())
    assert ports, "the daemon logged no metrics address"
    with urllib.request.urlopen(f"http://127.0.0.1:{ports[-1]}/metrics", timeout=10) as response:
        text: str = response.read().decode()
    return text


def lazysnap_pull(stack: PrivateStack, reference: str) -> str:
    """`lazysnap pull` in its own process, with the builder's credentials for the pull itself:
    lazy layers are still the daemon's, with only what it was given."""
    return stack.lazysnap(
        "pull", "--no-daemon", "--daemon-config", str(stack.daemon.config),
        "--address", str(stack.containerd.address), "--namespace", unique_name("lzs-cri"),
        "--hosts-dir", str(stack.containerd.hosts_dir), "--snapshotter", "lazysnap", reference,
    ).stdout  # fmt: skip


def test_credentials_serve_only_the_repository_they_came_with(private: PrivateStack) -> None:
    _, app = private.private_image(private.registry, "team/scoped")
    cri_pull(private, private.cri_socket, app, password_auth(private))
    # Same registry, other repository; other registry, same repository name.
    for registry, repository in ((private.registry, "team/neighbour"), (private.other_registry,
                                                                       "team/scoped")):  # fmt: skip
        image, pushed = private.private_image(registry, repository)
        output = lazysnap_pull(private, pushed.reference)
        assert re.search(r"\(0 lazy, \d+ pulled", output), output
        assert f"{AUTH_REFUSED}" in output, output
        assert image.data_layer in output, output


def test_a_restart_forgets_them_and_wrong_node_credentials_fall_back(
    private: PrivateStack,
) -> None:
    repository = "team/forgotten"
    first, pushed = private.private_image(private.registry, repository)
    offset = private.log_offset()
    cri_pull(private, private.cri_socket, pushed, password_auth(private))
    assert lazily_mounted(private.log_since(offset), first.data_layer)
    # While the daemon runs, another image of that repository is lazy with them...
    _, second = private.private_image(private.registry, repository)
    output = lazysnap_pull(private, second.reference)
    assert re.search(r"\(1 lazy, 0 pulled", output), output
    # ... and after a restart nothing remembers them, not even with wrong credentials on the
    # node to fall back to: those are refused, and the reason says whose they were.
    node_config = private.base / "node-docker-config.json"
    wrong = base64.b64encode(f"{USER}:not-the-password".encode()).decode()
    node_config.write_text(json.dumps({"auths": {private.registry.host: {"auth": wrong}}}))
    try:
        private.daemon.restart()
        third, pushed_third = private.private_image(private.registry, repository)
        output = lazysnap_pull(private, pushed_third.reference)
    finally:
        node_config.write_text("{}")
        private.daemon.restart()
    assert re.search(r"\(0 lazy, \d+ pulled", output), output
    assert AUTH_REFUSED in output and third.data_layer in output, output
    assert f"credentials of user {USER!r} (HTTP 401)" in output, output
    status = private.lazysnap("status", "--root", str(private.daemon.root)).stdout
    assert f"auth: layer {third.data_layer}: {AUTH_REFUSED}" in status, status


def live_mount_process(stack: PrivateStack, layer: str, not_pid: int = 0) -> int:
    """The pid of the live mount process serving layer (other than not_pid), waited for."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for state_file in stack.daemon.root.glob("snapshots/*/fs.lazysnap.json"):
            try:
                state = json.loads(state_file.read_text())
            except (OSError, ValueError):
                continue
            pid = state.get("pid")
            if (
                state.get("layer_digest") == layer
                and isinstance(pid, int)
                and pid != not_pid
                and Path(f"/proc/{pid}").exists()
                and os.path.ismount(str(state.get("mountpoint")))
            ):
                return pid
        time.sleep(0.1)
    raise AssertionError(f"no live mount process of {layer} (other than {not_pid})")


def test_a_mount_process_started_again_after_its_death_gets_the_credentials_again(
    private: PrivateStack,
) -> None:
    image, pushed = private.private_image(private.registry, "team/restarted")
    cri_pull(private, private.cri_socket, pushed, password_auth(private))
    first = live_mount_process(private, image.data_layer)
    os.kill(first, signal.SIGKILL)
    live_mount_process(private, image.data_layer, not_pid=first)
    # Nothing of the payload was read before: the new process fetches it with the secret.
    result = private.containerd.ctr(
        "run", "--rm", "--snapshotter", "lazysnap", pushed.reference, unique_name("lzs-cri"),
        "sha256sum", "/data/payload",
        namespace=CRI_NAMESPACE, timeout=120,
    )  # fmt: skip
    assert result.stdout.startswith(hashlib.sha256(image.files["data/payload"]).hexdigest())
