"""What scripts/install-node.sh installs from, checked without installing: the runtime part of
requirements.lock (scripts/lock/subset.py) holds exactly what lazysnap needs to run, and the
example config it copies to /etc/lazysnap/config.toml states the daemon's true defaults."""

from __future__ import annotations

import importlib.util
import re
import sys
import tomllib
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

from packaging.requirements import Requirement

from snapshotter.config import load_config

REPO = Path(__file__).resolve().parents[2]
LOCK = REPO / "requirements.lock"
EXAMPLE_CONFIG = REPO / "docs" / "example-config.toml"
# A setting shown commented out: `# [section]` or `# key = value`.
COMMENTED_SETTING = re.compile(r"^# (\[\w+\]|\w+ = .*)$")


def _subset_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("subset", REPO / "scripts/lock/subset.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _applies(requirement: Requirement, extra: str = "") -> bool:
    if requirement.marker is None:
        return True
    return requirement.marker.evaluate({"extra": extra})  # on top of this machine's values


def _pinned_here(subset_text: str) -> set[str]:
    """Names of the subset's pins whose markers hold on this machine."""
    names = set()
    for line in subset_text.splitlines():
        if re.match(r"^[A-Za-z0-9]", line):
            requirement = Requirement(line.rstrip(" \\"))
            if _applies(requirement):
                names.add(_normalize(requirement.name))
    return names


def _runtime_closure(*extras: str) -> set[str]:
    """pyproject's [project] dependencies (and those of its optional extras named) and, through
    the installed distributions' metadata (the dev venv holds the whole lock), everything they
    require here."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    texts = [*project["dependencies"]]
    for extra in extras:
        texts.extend(project["optional-dependencies"][extra])
    # markers are evaluated where a requirement is found: a child's `extra == "binary"` holds
    # for its parent's extras, not for the child itself
    todo = [requirement for requirement in map(Requirement, texts) if _applies(requirement)]
    seen: set[str] = set()
    while todo:
        requirement = todo.pop()
        name = _normalize(requirement.name)
        if name in seen:
            continue
        seen.add(name)
        wanted = requirement.extras or {""}
        for text in metadata.requires(requirement.name) or []:
            child = Requirement(text)
            if any(_applies(child, extra) for extra in wanted):
                todo.append(child)
    return seen


def test_the_runtime_subset_is_what_lazysnap_needs_to_run() -> None:
    subset = _subset_module()
    text = subset.subset("runtime", LOCK, REPO / "pyproject.toml")
    assert _pinned_here(text) == _runtime_closure()
    # Test tools stay out of a node's venv.
    assert not {"pytest", "mypy", "ruff", "matplotlib", "peryx"} & _pinned_here(text)
    # Every pin keeps its hashes: pip's --require-hashes accepts nothing less.
    pins = [line for line in text.splitlines() if re.match(r"^[A-Za-z0-9]", line)]
    assert pins and all(line.endswith("\\") for line in pins)
    assert text.count("--hash=sha256:") >= len(pins)


def test_the_postgres_extra_adds_the_job_store_driver_and_what_it_needs() -> None:
    subset = _subset_module()
    plain = _pinned_here(subset.subset("runtime", LOCK, REPO / "pyproject.toml"))
    text = subset.subset("runtime", LOCK, REPO / "pyproject.toml", ("postgres",))
    with_postgres = _pinned_here(text)
    # The lock pins tzdata without the `sys_platform == "win32"` marker psycopg puts on it
    # (python-dateutil, which matplotlib needs, requires it everywhere): the subset carries it.
    assert with_postgres - _runtime_closure("postgres") <= {"tzdata"}
    assert _runtime_closure("postgres") <= with_postgres
    assert {"psycopg", "psycopg-binary"} <= with_postgres - plain
    assert not {"pytest", "mypy", "ruff", "matplotlib", "peryx"} & with_postgres


def test_an_extra_pyproject_does_not_have_is_named() -> None:
    subset = _subset_module()
    try:
        subset.subset("runtime", LOCK, REPO / "pyproject.toml", ("postgress",))
    except SystemExit as exit_:
        assert "no extra postgress" in str(exit_.code) and "postgres" in str(exit_.code)
    else:
        raise AssertionError("an extra pyproject.toml does not define was accepted")


def test_the_build_subset_builds_a_wheel() -> None:
    subset = _subset_module()
    names = _pinned_here(subset.subset("build", LOCK, REPO / "scripts/lock/build.in"))
    assert {"setuptools", "wheel"} <= names
    for name in ("setuptools", "wheel"):  # and what they require, from their metadata
        for text in metadata.requires(name) or []:
            requirement = Requirement(text)
            if _applies(requirement):
                assert _normalize(requirement.name) in names, (name, text)


def test_a_dependency_missing_from_the_lock_is_named(tmp_path: Path) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nname = "x"\ndependencies = ["grpcio>=1", "no-such-pkg"]\n')
    subset = _subset_module()
    try:
        subset.subset("runtime", LOCK, pyproject)
    except SystemExit as exit_:
        assert "no-such-pkg" in str(exit_.code) and "scripts/lock.sh" in str(exit_.code)
    else:
        raise AssertionError("a dependency the lock does not pin was accepted")


def test_the_example_config_states_the_defaults(tmp_path: Path) -> None:
    defaults = load_config(None)
    assert load_config(str(EXAMPLE_CONFIG)) == defaults
    # Uncommenting every commented-out setting changes nothing either: they show the defaults.
    lines = EXAMPLE_CONFIG.read_text().splitlines()
    uncommented = [line[2:] if COMMENTED_SETTING.match(line) else line for line in lines]
    assert uncommented != lines
    every_key = tmp_path / "config.toml"
    every_key.write_text("\n".join(uncommented) + "\n")
    assert load_config(str(every_key)) == defaults
    # and it shows every key there is.
    assert _keys(tomllib.loads(every_key.read_text())) == _keys(asdict(defaults))


def _keys(table: dict[str, Any], prefix: str = "") -> set[str]:
    keys = set()
    for key, value in table.items():
        if isinstance(value, dict):
            keys |= _keys(value, f"{prefix}{key}.")
        else:
            keys.add(prefix + key)
    return keys
