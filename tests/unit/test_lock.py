"""requirements.lock is what every install uses (scripts/install-deps.sh, so CI): it must be
resolved from today's pyproject.toml, pin every package with hashes, and satisfy every
specifier pyproject.toml states."""

from __future__ import annotations

import importlib.util
import re
import tomllib
from collections.abc import Callable
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
LOCK = REPO / "requirements.lock"


def _inputs_digest() -> Callable[[Path], str]:
    """scripts/lock/inputs_digest.py's function: the same digest scripts/lock.sh writes."""
    spec = importlib.util.spec_from_file_location(
        "inputs_digest", REPO / "scripts" / "lock" / "inputs_digest.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    digest: Callable[[Path], str] = module.inputs_digest
    return digest


PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^ ;\\]+)")


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in LOCK.read_text().splitlines():
        match = PIN.match(line)
        if match:
            pins[_normalize(match.group(1))] = Version(match.group(2))
    return pins


def test_the_lock_was_resolved_from_todays_pyproject() -> None:
    header = re.search(r"^# inputs-sha256: ([0-9a-f]{64})$", LOCK.read_text(), re.M)
    assert header is not None, "requirements.lock has no inputs-sha256 header: run scripts/lock.sh"
    assert header.group(1) == _inputs_digest()(REPO), (
        "pyproject.toml (or scripts/lock/build.in) changed since requirements.lock was made: "
        "run scripts/lock.sh and commit both"
    )


def test_every_requirement_is_pinned_within_its_specifier() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    wanted = [
        *project["project"]["dependencies"],
        *project["project"]["optional-dependencies"]["test"],
        *project["build-system"]["requires"],
    ]
    pins = _pins()
    for text in wanted:
        requirement = Requirement(text)
        name = _normalize(requirement.name)
        assert name in pins, f"{requirement.name} is not in requirements.lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {requirement.name}=={pins[name]}, outside {text!r}"
        )


def test_every_pin_carries_a_hash() -> None:
    text = LOCK.read_text()
    starts = [match.start() for match in re.finditer(PIN.pattern, text, re.M)]
    assert len(starts) >= len(_pins()) > 40  # a package may be pinned per Python version
    for start, end in zip(starts, [*starts[1:], len(text)], strict=True):
        block = text[start:end]
        assert "--hash=sha256:" in block, f"no hash for {block.splitlines()[0]}"
