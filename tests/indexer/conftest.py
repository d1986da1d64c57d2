"""Fixtures for `lazysnap index` tests: a peryx registry (native referrers API) beside the
session's docker-registry (tag fallback), a docker config for the CLI's credentials, and a
runner for the `index` command line."""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from indexer_helpers import CliResult, Target, unique

from harness.peryx import Peryx, start_peryx
from harness.procs import HarnessError
from harness.registry import Registry
from snapshotter.indexer import command


@pytest.fixture(scope="session")
def peryx(stack_base: Path) -> Iterator[Peryx]:
    try:
        server = start_peryx(stack_base / "peryx-indexer")
    except HarnessError as exc:
        pytest.fail(f"peryx unavailable: {exc}", pytrace=False)
    yield server
    server.stop()


@pytest.fixture
def docker_config(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Target], None]]:
    """Point DOCKER_CONFIG at a temp config.json holding the target's credentials, the way a
    user logs in for the CLI."""
    directory = Path(tempfile.mkdtemp(prefix="lzs-dockercfg-"))
    monkeypatch.setenv("DOCKER_CONFIG", str(directory))

    def write(target: Target) -> None:
        auths = {}
        if target.credentials is not None:
            auths[target.host] = {
                "username": target.credentials.username,
                "password": target.credentials.password,
            }
        (directory / "config.json").write_text(json.dumps({"auths": auths}))

    yield write
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def lazysnap_index(capsys: pytest.CaptureFixture[str]) -> Callable[..., CliResult]:
    """Run `lazysnap index ARGS...` in-process through the command's own argument parser."""

    def invoke(*args: str) -> CliResult:
        parser = argparse.ArgumentParser(prog="lazysnap index")
        command.add_arguments(parser)
        capsys.readouterr()
        code = command.run(parser.parse_args(list(args)))
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return invoke


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="lzs-indexer-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def dist(registry: Registry, docker_config: Callable[[Target], None]) -> Target:
    """A namespace of its own on the session's docker-registry (tag fallback)."""
    target = Target(registry.host, unique("ix"), None)
    docker_config(target)
    return target
