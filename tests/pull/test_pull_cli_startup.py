"""`lazysnap pull` starts without loading the other subcommands' modules (their imports cost
~50 ms of every pull), while `lazysnap --help` still lists every subcommand."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def _python(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, check=True
    )
    return result.stdout.strip()


def test_pull_parses_without_loading_other_commands() -> None:
    loaded = _python(
        "import sys\n"
        "from snapshotter.cli import build_parser\n"
        "argv = ['pull', 'registry.example/app:1', '--namespace', 'k8s.io']\n"
        "args = build_parser(argv).parse_args(argv)\n"
        "assert (args.image, args.namespace) == ('registry.example/app:1', 'k8s.io')\n"
        "others = ('snapshotter.status', 'snapshotter.indexer', 'snapshotter.accel')\n"
        "print(sorted(m for m in sys.modules if m.startswith(others)))\n"
    )
    assert loaded == "[]"


def test_help_lists_every_subcommand_and_each_has_its_options() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "snapshotter.cli", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        check=True,
    )
    for name in ("serve", "index", "pull", "accel", "status"):
        assert f"    {name} " in result.stdout, result.stdout
    pull_help = subprocess.run(
        [sys.executable, "-m", "snapshotter.cli", "pull", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        check=True,
    )
    assert "--hosts-dir" in pull_help.stdout and "--snapshotter" in pull_help.stdout


def test_a_pull_through_the_daemon_loads_neither_grpc_nor_httpx() -> None:
    # That is what makes it faster than a pull in the CLI's own process (snapshotter/pull/wire.py).
    loaded = _python(
        "import sys\n"
        "from snapshotter.cli import build_parser\n"
        "from snapshotter.pull import command, wire\n"
        "from snapshotter.pull.request import PullRequest\n"
        "from snapshotter.remote.docker_config import default_docker_config_path\n"
        "argv = ['pull', 'registry.example/app:1', '--daemon-address', '/nonexistent/x.sock']\n"
        "args = build_parser(argv).parse_args(argv)\n"
        "address = command._daemon_config(args).address\n"
        "assert wire.pull_socket_for(address) == '/nonexistent/x-pull.sock'\n"
        "PullRequest('i', 'a', 'n', 's', docker_config=default_docker_config_path())\n"
        "heavy = ('grpc', 'httpx', 'httpcore')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    assert loaded == "[]"
