"""scripts/install-node.sh as a node operator runs it, into a scratch root (--prefix): what it
installs passes `systemd-analyze verify`, the installed daemon started as its unit starts it
tells systemd it is ready, containerd pulls and runs an image lazily through it, a re-run
upgrades in place without touching the config, --postgres adds the driver the accel service's
PostgreSQL job store needs (and a later re-run keeps it), and --uninstall [--purge] removes it
all."""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import socket
import subprocess
import tempfile
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

from harness.containerd import start_containerd
from harness.daemon import LazysnapDaemon
from harness.images import busybox_layer_tar, file, layer_tar, push, write_oci_layout
from harness.postgres import postgres_bin_dir, start_postgres
from harness.procs import HarnessError, free_port, log_tail, mounts_under, spawn, unmount_all_under
from harness.registry import Registry

pytestmark = [pytest.mark.stack, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
INSTALLER = REPO / "scripts" / "install-node.sh"
UNITS = ("lazysnap.service", "lazysnap-accel.service")
GREETING = "installed on a node\n"


@dataclass(frozen=True)
class Installed:
    """Where install-node.sh puts things under prefix (the script's header lists them)."""

    prefix: Path

    @property
    def venv(self) -> Path:
        return self.prefix / "opt/lazysnap"

    @property
    def command(self) -> Path:
        return self.prefix / "usr/local/bin/lazysnap"

    @property
    def config(self) -> Path:
        return self.prefix / "etc/lazysnap/config.toml"

    @property
    def unit_dir(self) -> Path:
        return self.prefix / "usr/local/lib/systemd/system"

    @property
    def doc_dir(self) -> Path:
        return self.prefix / "usr/local/share/doc/lazysnap"

    @property
    def state(self) -> Path:
        return self.prefix / "var/lib/lazysnap"

    @property
    def socket(self) -> Path:
        return self.prefix / "run/lazysnap/lazysnap.sock"


def _clean_env() -> dict[str, str]:
    """The caller's environment without PYTHONPATH: the installed program must run on its own,
    not on a checkout the test runner points at."""
    return {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}


def install_node(prefix: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(INSTALLER), "--prefix", str(prefix), *args],
        capture_output=True,
        text=True,
        timeout=900,
        env=_clean_env(),
        stdin=subprocess.DEVNULL,
    )


def run_installed(
    installed: Installed, *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(installed.command), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=_clean_env(),
        cwd="/",
        stdin=subprocess.DEVNULL,
    )
    if check:
        assert result.returncode == 0, f"lazysnap {' '.join(args)}:\n{result.stderr}{result.stdout}"
    return result


def venv_has(installed: Installed, module: str) -> bool:
    imported = subprocess.run(
        [str(installed.venv / "bin/python"), "-c", f"import {module}"],
        capture_output=True,
        env=_clean_env(),
        cwd="/",
    )
    return imported.returncode == 0


def unit_setting(unit: Path, key: str) -> list[str]:
    """Every value of key= in unit, continuation lines joined."""
    joined = unit.read_text().replace("\\\n", " ")
    return [
        line.split("=", 1)[1].strip() for line in joined.splitlines() if line.startswith(f"{key}=")
    ]


def _next_message(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    try:
        return sock.recv(4096)
    except TimeoutError:
        return b""


def healthz_answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


def check_accel_command(argv: list[str], workdir: Path) -> None:
    """Run the accel unit's ExecStart as systemd would (credentials in $CREDENTIALS_DIRECTORY,
    here on a free port) until it answers /healthz, then stop it: it must exit 0."""
    credentials = workdir / "credentials"
    credentials.mkdir(parents=True)
    (credentials / "token").write_text("install-test-token\n")
    (credentials / "config.json").write_text('{"auths": {}}\n')
    port = free_port()
    state = workdir / "state"  # the unit's StateDirectory= (the job store)
    argv = [
        arg.replace("${CREDENTIALS_DIRECTORY}", str(credentials)).replace(
            "${STATE_DIRECTORY}", str(state)
        )
        for arg in argv
    ]
    argv[argv.index("--listen") + 1] = f"127.0.0.1:{port}"
    env = {**_clean_env(), "CREDENTIALS_DIRECTORY": str(credentials)}
    env["DOCKER_CONFIG"] = str(credentials)
    env["STATE_DIRECTORY"] = str(state)
    service = spawn("lazysnap accel serve", argv, workdir / "accel.log", env=env, cwd=Path("/"))
    try:
        service.wait_until(lambda: healthz_answers(port), f"/healthz on port {port}", 60)
    finally:
        returncode = service.stop(timeout=30)
    assert returncode == 0, log_tail(workdir / "accel.log")


def files_under(root: Path) -> list[Path]:
    return sorted(path for path in root.rglob("*") if not path.is_dir())


@pytest.fixture
def prefix() -> Iterator[Path]:
    """A short scratch root: the daemon's socket ends up under it (108-byte sun_path)."""
    path = Path(tempfile.mkdtemp(prefix="lzi-", dir="/tmp"))
    yield path
    unmount_all_under(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def workdir() -> Iterator[Path]:
    """The test's own files (logs, notify socket, containerd), outside the prefix."""
    path = Path(tempfile.mkdtemp(prefix="lzw-", dir="/tmp"))
    yield path
    unmount_all_under(path)
    shutil.rmtree(path, ignore_errors=True)


def test_install_serve_pull_upgrade_uninstall(
    prefix: Path, workdir: Path, registry: Registry, skip_or_fail: Callable[[str], NoReturn]
) -> None:
    if shutil.which("systemd-analyze") is None:
        skip_or_fail("no systemd-analyze (scripts/install-deps.sh installs Debian's systemd)")
    try:
        postgres_bin_dir()
    except HarnessError as exc:
        skip_or_fail(str(exc))
    installed = Installed(prefix)

    # -- install ------------------------------------------------------------------------------
    first = install_node(prefix)
    assert first.returncode == 0, first.stderr + first.stdout
    assert installed.command.resolve() == installed.venv / "bin" / "lazysnap"
    # The containerd snippet it prints names the daemon's socket and the CRI settings.
    assert f'address = "{installed.socket}"' in first.stdout
    assert "[proxy_plugins.lazysnap]" in first.stdout
    assert "disable_snapshot_annotations = false" in first.stdout
    # The venv holds lazysnap and its runtime packages, no test tools.
    listed = subprocess.run(
        [str(installed.venv / "bin/python"), "-m", "pip", "list", "--format", "json"],
        capture_output=True,
        text=True,
        check=True,
        env=_clean_env(),
    )
    packages = {entry["name"].lower() for entry in json.loads(listed.stdout)}
    assert {"lazysnap", "grpcio", "mfusepy", "httpx"} <= packages
    assert not {"pytest", "mypy", "ruff", "matplotlib", "setuptools", "psycopg"} & packages
    # Without --postgres, a PostgreSQL job store is refused with what to install.
    refused = run_installed(
        installed, "accel", "tasks", "--store", "postgresql://127.0.0.1:1/none", check=False
    )
    assert refused.returncode != 0 and "`postgres` extra" in refused.stderr, refused.stderr

    # -- the units ----------------------------------------------------------------------------
    for name in UNITS:
        unit = installed.unit_dir / name
        verify = subprocess.run(
            ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
        )
        assert verify.returncode == 0 and verify.stderr == "", f"{name}: {verify.stderr}"
        (exec_start,) = unit_setting(unit, "ExecStart")
        assert shlex.split(exec_start)[0] == str(installed.command)
        for doc in unit_setting(unit, "Documentation"):
            assert doc.startswith("file://") and Path(doc.removeprefix("file://")).is_file(), doc
    serve_unit = installed.unit_dir / "lazysnap.service"
    assert unit_setting(serve_unit, "Type") == ["notify"]
    exec_start_argv = shlex.split(unit_setting(serve_unit, "ExecStart")[0])
    assert exec_start_argv == [str(installed.command), "serve", "--config", str(installed.config)]

    # -- the accel unit's command runs on the installed venv -----------------------------------
    accel_argv = shlex.split(
        unit_setting(installed.unit_dir / "lazysnap-accel.service", "ExecStart")[0]
    )
    check_accel_command(accel_argv, workdir / "accel")

    # -- serve, as the unit runs it, with the config adapted to the test registry -------------
    containerd = start_containerd(
        workdir / "containerd", proxy_socket=installed.socket, registry_hosts=[registry.host]
    )
    # The operator's trust set-up: a key pair from the installed command, the node trusting
    # its public key (the default policy uses signed indexes only).
    keys = workdir / "keys"
    run_installed(installed, "trust", "keygen", "--out", str(keys))
    example = installed.config.read_text()
    adapted = example + (
        "\n# test registry (tests/install)\n"
        f'[remote]\nhosts_dir = "{containerd.hosts_dir}"\nplain_http = ["{registry.host}"]\n'
        "min_layer_size = 0\n[fetch]\nbackground = false\n"
        f'[trust]\npublic_keys = ["{keys / "index.pub"}"]\n'
    )
    installed.config.write_text(adapted)
    notify_path = workdir / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(60)
    daemon = LazysnapDaemon(
        root=installed.state,
        socket=installed.socket,
        log_path=workdir / "lazysnap.log",
        config=installed.config,
        program=exec_start_argv[:1],
        env={**_clean_env(), "NOTIFY_SOCKET": str(notify_path)},
    )
    try:
        daemon.start()
        assert notify.recv(4096) == b"READY=1"
        # The daemon and its mount processes run the installed code, not this checkout's.
        assert str(installed.venv) in Path(f"/proc/{daemon.pid}/cmdline").read_text()

        layout = workdir / "image"
        built = write_oci_layout(
            layout, "latest", [busybox_layer_tar(workdir), layer_tar([file("hi.txt", GREETING)])]
        )
        image = push(built, registry.host, f"test/install-{secrets.token_hex(3)}", "latest")
        run_installed(
            installed,
            "index",
            "build",
            "--plain-http",
            "--min-layer-size",
            "0",
            "--sign-key",
            str(keys / "index.key"),
            image.reference,
        )
        pulled = run_installed(
            installed,
            "pull",
            "--daemon-address",
            str(installed.socket),
            "--address",
            str(containerd.address),
            "--namespace",
            containerd.namespace,
            "--hosts-dir",
            str(containerd.hosts_dir),
            image.reference,
        )
        assert "(2 lazy, 0 pulled" in pulled.stdout, pulled.stdout
        ran = containerd.ctr(
            "run", "--rm", "--snapshotter", "lazysnap", image.reference, "install-1", "cat",
            "/hi.txt",
        )  # fmt: skip
        assert ran.stdout == GREETING
        status = json.loads(
            run_installed(installed, "status", "--config", str(installed.config), "--json").stdout
        )
        assert status["root"] == str(installed.state)
        assert status["daemon"]["running"] and status["daemon"]["pid"] == daemon.pid
        assert {layer["layer_digest"] for layer in status["layers"]} == {
            layer.digest for layer in image.layers
        }
    finally:
        containerd.stop()  # before the daemon: it holds mounts on the daemon's layers
        returncode = daemon.stop()
        stopping = _next_message(notify, timeout=5)
        notify.close()
    assert returncode == 0, daemon.log()
    assert stopping == b"STOPPING=1"

    # -- a re-run upgrades in place and keeps the config; --postgres adds the store's driver ---
    again = install_node(prefix, "--postgres")
    assert again.returncode == 0, again.stderr + again.stdout
    assert installed.config.read_text() == adapted
    assert f"kept {installed.config}" in again.stdout
    assert "runtime packages with postgres" in again.stdout
    run_installed(installed, "--version")
    postgres = start_postgres(workdir / "postgres")
    try:
        store = postgres.create_database("lazysnap_accel")
        check_accel_command([*accel_argv, "--store", store], workdir / "accel-postgres")
    finally:
        postgres.stop()
    # A later upgrade without the flag keeps the driver the accel replicas need.
    kept = install_node(prefix)
    assert kept.returncode == 0, kept.stderr + kept.stdout
    assert "keeping the postgres extra" in kept.stdout and venv_has(installed, "psycopg")

    # -- uninstall: config and state stay; --purge refuses while layers are mounted -----------
    removed = install_node(prefix, "--uninstall")
    assert removed.returncode == 0, removed.stderr
    left = files_under(prefix)
    assert installed.config in left
    kept_dirs = (installed.state, installed.socket.parent)
    assert all(
        path == installed.config or any(kept in path.parents for kept in kept_dirs) for path in left
    ), left
    assert not installed.command.is_symlink() and not installed.venv.exists()
    assert mounts_under(installed.state), "the lazy layers stay mounted after the daemon stops"
    refused = install_node(prefix, "--uninstall", "--purge")
    assert refused.returncode != 0 and "still mounted" in refused.stderr
    assert installed.state.is_dir()
    unmount_all_under(installed.state)
    purged = install_node(prefix, "--uninstall", "--purge")
    assert purged.returncode == 0, purged.stderr
    assert files_under(prefix) == []
