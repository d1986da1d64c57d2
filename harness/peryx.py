"""peryx (PyPI; a Rust registry with a native OCI 1.1 referrers API) on a free loopback port.

Repositories live under the index route: `127.0.0.1:PORT/test/<name>`. Reads are anonymous;
writes need Basic auth with the index access token (any user name). Quirks measured here
(docs: /work/shared/notes/environment.md §3): manifests must carry `mediaType`; `GET /v2/`
answers 200 even when writes need credentials, so clients must answer per-request challenges.
"""

from __future__ import annotations

import functools
import shutil
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from harness.procs import HarnessError, Service, free_port, spawn

ROUTE = "test"
TOKEN = "local-test-token-0123456789"


def peryx_binary() -> str | None:
    beside_python = Path(sys.executable).parent / "peryx"
    return str(beside_python) if beside_python.exists() else shutil.which("peryx")


@dataclass
class Peryx:
    base: Path
    port: int
    service: Service = field(repr=False)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def route(self) -> str:
        return ROUTE

    @property
    def token(self) -> str:
        return TOKEN

    def stop(self) -> None:
        self.service.stop()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/v2/", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def start_peryx(base: Path) -> Peryx:
    binary = peryx_binary()
    if binary is None:
        raise HarnessError("peryx not found (pip install peryx)")
    base.mkdir(parents=True, exist_ok=True)
    for _attempt in range(3):
        port = free_port()
        config = base / "peryx.toml"
        config.write_text(
            f'host = "127.0.0.1"\nport = {port}\n'
            f'[[index]]\nname = "{ROUTE}"\nroute = "{ROUTE}"\necosystem = "oci"\nhosted = true\n'
            f'[[index.access_token]]\nname = "upload"\nsecret = "{TOKEN}"\n'
            'actions = ["read", "write", "delete"]\n'
        )
        service = spawn(
            "peryx",
            [binary, "serve", "--config", str(config), "--data-dir", str(base / "data")],
            base / "peryx.log",
        )
        server = Peryx(base, port, service)
        url = server.url
        try:
            service.wait_until(functools.partial(_answers, url), "GET /v2/ answers", 60)
        except HarnessError as exc:
            service.stop()
            if "in use" in str(exc):
                continue
            raise
        return server
    raise HarnessError("peryx: no free port after 3 attempts")
