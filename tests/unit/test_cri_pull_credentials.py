"""What the CRI proxy keeps of a PullImage (service/cri_proxy.py) and for how long
(remote/session_credentials.py): the request's bytes as kubelet encodes them."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import pytest

from snapshotter._proto.cri.runtime.v1 import pull_pb2
from snapshotter.remote.session_credentials import PullAuth, SessionCredentials
from snapshotter.service.cri_proxy import pull_credentials
from tests.unit.spine_helpers import serve_command


def request(image: str, **auth: str) -> bytes:
    message = pull_pb2.PullImageRequest(image=pull_pb2.ImageSpec(image=image))
    if auth:
        message.auth.CopyFrom(pull_pb2.AuthConfig(**auth))
    return message.SerializeToString()


def test_each_kind_of_auth_is_kept_for_the_image_s_host_and_repository() -> None:
    token = base64.b64encode(b"ann:pw:with:colons").decode()
    found = pull_credentials(request("registry.example:5000/team/app:v1", auth=token))
    assert found is not None
    kept, auth = found
    assert (kept.host, kept.repository) == ("registry.example:5000", "team/app")
    assert (auth.username, auth.password) == ("ann", "pw:with:colons")
    _, identity = pull_credentials(request("busybox", identity_token="rt")) or (None, None)
    assert identity == PullAuth(identity_token="rt")
    kept_hub, _ = pull_credentials(request("busybox", registry_token="bt")) or (None, None)
    assert kept_hub is not None and (kept_hub.host, kept_hub.repository) == (
        "docker.io",
        "library/busybox",
    )


@pytest.mark.parametrize(
    "raw",
    [
        request("r.example/app"),  # no auth at all
        request("r.example/app", username="ann"),  # a user without a password
        request("r.example/app", username="a", password="p", server_address="other.example"),
        request("r.example/app", auth="not base64!"),
        request("UPPER/case:tag", username="a", password="p"),  # not a reference
        b"\xff\xff not protobuf",
    ],
)
def test_nothing_is_kept_from_what_cannot_be_used(raw: bytes) -> None:
    assert pull_credentials(raw) is None


def test_a_matching_server_address_is_fine() -> None:
    raw = request("r.example/app", username="a", password="p", server_address="https://r.example")
    assert pull_credentials(raw) is not None


def test_credentials_expire_and_the_store_is_bounded() -> None:
    now = [0.0]
    store = SessionCredentials(10.0, max_scopes=2, clock=lambda: now[0])
    store.put("r", "a", PullAuth("u", "p"))
    now[0] = 9.9
    assert store.get("r", "a") == PullAuth("u", "p")
    assert store.get("r", "b") is None and store.get("other", "a") is None
    now[0] = 10.0
    assert store.get("r", "a") is None
    for name in ("x", "y", "z"):
        store.put("r", name, PullAuth("u", "p"))
    assert store.get("r", "x") is None and store.get("r", "z") is not None


def test_no_secret_in_repr() -> None:
    text = repr(PullAuth("ann", "hunter2", "idtok", "regtok"))
    assert "ann" in text and not any(s in text for s in ("hunter2", "idtok", "regtok"))


def test_a_cri_socket_that_cannot_be_bound_stops_the_daemon_naming_the_key(
    daemon_dir: Path,
) -> None:
    config = daemon_dir / "cri.toml"
    config.write_text(
        '[remote]\nenable = false\n[cri]\nimage_service_socket = "/proc/self/none/cri.sock"\n'
    )
    result = subprocess.run(
        [*serve_command(daemon_dir / "r", daemon_dir / "s.sock"), "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1, result.stderr
    assert "cri.image_service_socket" in result.stderr and "Traceback" not in result.stderr
    assert not (daemon_dir / "s.sock").exists()  # containerd is not left a half-started daemon
