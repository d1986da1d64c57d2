"""hosts.toml TLS settings reach both planes (httpx control, urllib3 data): a registry with a
self-signed certificate is refused by default, trusted with `ca`, reachable with skip_verify."""

from __future__ import annotations

import hashlib
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from harness.procs import run
from snapshotter.remote.blob import BlobReader
from snapshotter.remote.client import RegistryClient
from snapshotter.remote.errors import BlobFetchError, RegistryUnavailable
from snapshotter.remote.hosts import HostsConfig
from snapshotter.remote.reference import Repository

DATA = os.urandom(10_000)
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()
SYSTEM_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"  # OpenSSL's default CA file on Debian


@pytest.fixture(scope="module")
def tls_registry() -> Iterator[tuple[str, Path]]:
    base = Path(tempfile.mkdtemp(prefix="lzs-remote-tls-", dir="/tmp"))
    cert, key = base / "cert.pem", base / "key.pem"
    run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        "test TLS certificate",
    )  # fmt: skip

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            body = DATA
            status = 200
            if "Range" in self.headers:
                start, end = (int(x) for x in self.headers["Range"].split("=")[1].split("-"))
                body, status = DATA[start : end + 1], 206
            self.send_response(status)
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(DATA)}")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), H)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}", cert
    server.shutdown()
    server.server_close()
    shutil.rmtree(base, ignore_errors=True)


def hosts(tmp_path: Path, host: str, extra: str) -> HostsConfig:
    path = tmp_path / host / "hosts.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'server = "https://{host}"\n{extra}')
    return HostsConfig(tmp_path)


def read_both_planes(config: HostsConfig, host: str) -> None:
    repo = Repository(host, "r")
    with RegistryClient(config, retries=0, timeout=5) as client:
        assert client.get_blob(repo, DIGEST) == DATA
        with BlobReader(client, repo, DIGEST, len(DATA)) as reader:
            assert reader.read(10, 10) == DATA[10:20]


def test_ca_from_hosts_toml_is_trusted(tls_registry: tuple[str, Path], tmp_path: Path) -> None:
    host, cert = tls_registry
    read_both_planes(hosts(tmp_path, host, f'ca = "{cert}"\n'), host)


def test_skip_verify(tls_registry: tuple[str, Path], tmp_path: Path) -> None:
    host, _ = tls_registry
    read_both_planes(hosts(tmp_path, host, "skip_verify = true\n"), host)


def test_unknown_certificate_is_refused(tls_registry: tuple[str, Path], tmp_path: Path) -> None:
    host, _ = tls_registry
    repo = Repository(host, "r")
    with RegistryClient(hosts(tmp_path, host, ""), retries=0, timeout=5) as client:
        with pytest.raises(
            RegistryUnavailable,
            match=f"https://{host}/v2/r/blobs/{DIGEST}.*CERTIFICATE_VERIFY_FAILED",
        ):
            client.get_blob(repo, DIGEST)
        with (
            BlobReader(client, repo, DIGEST, len(DATA)) as reader,
            pytest.raises(BlobFetchError, match="CERTIFICATE_VERIFY_FAILED"),
        ):
            reader.read(0, 10)


@pytest.mark.skipif(os.geteuid() != 0, reason="bind-mounts over the system CA bundle")
def test_system_trust_store_is_trusted(tls_registry: tuple[str, Path], tmp_path: Path) -> None:
    """A CA in the system's store (update-ca-certificates' bundle; here bind-mounted over it in
    a private mount namespace) is trusted by both planes without a `ca` line, as containerd
    trusts it: not certifi's bundle, which knows nothing of a site's own CA."""
    host, cert = tls_registry
    hosts(tmp_path, host, "")
    script = (
        "import hashlib, sys\n"
        "from pathlib import Path\n"
        "from snapshotter.remote.blob import BlobReader\n"
        "from snapshotter.remote.client import RegistryClient\n"
        "from snapshotter.remote.hosts import HostsConfig\n"
        "from snapshotter.remote.reference import Repository\n"
        "_, hosts_dir, host, digest, size = sys.argv\n"
        "repo = Repository(host, 'r')\n"
        "with RegistryClient(HostsConfig(Path(hosts_dir)), retries=0, timeout=5) as client:\n"
        "    print(hashlib.sha256(client.get_blob(repo, digest)).hexdigest())\n"
        "    with BlobReader(client, repo, digest, int(size)) as reader:\n"
        "        print(reader.read(10, 10).hex())\n"
    )
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         f'mount --bind "$0" {SYSTEM_BUNDLE} && exec "$@"', str(cert),
         sys.executable, "-c", script, str(tmp_path), host, DIGEST, str(len(DATA))],
        env={k: v for k, v in os.environ.items() if not k.startswith("SSL_CERT_")},
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == [DIGEST.removeprefix("sha256:"), DATA[10:20].hex()]
