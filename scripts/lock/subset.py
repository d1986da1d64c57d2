"""Print the part of requirements.lock one kind of install needs, hashes and markers kept, for
`pip install --require-hashes -r`:

    subset.py runtime LOCK PYPROJECT [EXTRA...]
                                       pyproject.toml's [project] dependencies, and those of
                                       each optional-dependencies EXTRA named (`postgres`), and
                                       everything they need (what a node runs:
                                       scripts/install-node.sh)
    subset.py build LOCK BUILD_IN      scripts/lock/build.in (setuptools, wheel) and what they
                                       need (enough to build lazysnap's wheel)

pip cannot install part of a hashed lock by itself, and the lock also pins the test tools. The
lock's `# via` comments name, for every package, the locked packages that require it; so a
package belongs to the subset when it is a root or one of its `via` names does. (`lazysnap
(pyproject.toml)` in a `via` is no evidence: the test extra says it too.) pip's own check then
fails the install if a requirement were missing. Standard library only: it runs under the node's
python3 before any venv exists.
"""

from __future__ import annotations

import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==")
NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
VIA_FIRST = re.compile(r"^\s+# via(?:\s+(.*))?$")
VIA_MORE = re.compile(r"^\s+#\s{3}(.*)$")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class LockEntry:
    """One pinned requirement (a name may have several, under different markers)."""

    name: str
    text: str  # its lines as written: pin, marker, hashes, via comments
    required_by: frozenset[str]  # the locked packages that need it (its `via` names)


def _via_name(text: str) -> str | None:
    """`grpcio` -> grpcio; `-r scripts/lock/build.in` -> None (a file, not a package)."""
    match = NAME.match(text)
    return normalize(match.group(1)) if match else None


def parse_lock(text: str) -> list[LockEntry]:
    entries: list[LockEntry] = []
    name: str | None = None
    lines: list[str] = []
    via: set[str] = set()
    in_via = False

    def close() -> None:
        if name is not None:
            entries.append(LockEntry(name, "\n".join(lines) + "\n", frozenset(via)))

    for line in text.splitlines():
        pin = PIN.match(line)
        if pin:
            close()
            name, lines, via, in_via = normalize(pin.group(1)), [line], set(), False
            continue
        if name is None:
            continue  # the header
        lines.append(line)
        first = VIA_FIRST.match(line)
        more = VIA_MORE.match(line)
        if first:
            in_via = True
            parent = _via_name(first.group(1) or "")
        elif more and in_via:
            parent = _via_name(more.group(1))
        else:
            continue
        if parent is not None:
            via.add(parent)
    close()
    return entries


def closure(entries: list[LockEntry], roots: set[str]) -> list[LockEntry]:
    """The entries of roots and of every package a chosen entry's package requires."""
    locked = {entry.name for entry in entries}
    unknown = sorted(roots - locked)
    if unknown:
        raise SystemExit(
            f"requirements.lock pins no {', '.join(unknown)}: run scripts/lock.sh "
            "(pyproject.toml and the lock disagree)"
        )
    chosen = set(roots)
    grew = True
    while grew:
        grew = False
        for entry in entries:
            if entry.name not in chosen and entry.required_by & chosen:
                chosen.add(entry.name)
                grew = True
    return [entry for entry in entries if entry.name in chosen]


def requirement_names(requirements: list[str]) -> set[str]:
    names = set()
    for requirement in requirements:
        match = NAME.match(requirement)
        if match is None:
            raise SystemExit(f"cannot read a package name in requirement {requirement!r}")
        names.add(normalize(match.group(1)))
    return names


def runtime_roots(pyproject: Path, extras: tuple[str, ...] = ()) -> set[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [extra for extra in extras if extra not in optional]
    if unknown:
        raise SystemExit(
            f"{pyproject.name} has no extra {', '.join(unknown)} "
            f"(its extras: {', '.join(sorted(optional)) or 'none'})"
        )
    requirements = list(project.get("dependencies", []))
    for extra in extras:
        requirements.extend(optional[extra])
    return requirement_names(requirements)


def build_roots(build_in: Path) -> set[str]:
    lines = [line.split("#", 1)[0].strip() for line in build_in.read_text().splitlines()]
    return requirement_names([line for line in lines if line])


def subset(kind: str, lock: Path, roots_file: Path, extras: tuple[str, ...] = ()) -> str:
    roots = runtime_roots(roots_file, extras) if kind == "runtime" else build_roots(roots_file)
    chosen = closure(parse_lock(lock.read_text()), roots)
    with_extras = f" with {', '.join(extras)}" if extras else ""
    header = (
        f"# {kind} subset of {lock.name} ({roots_file.name}{with_extras}), "
        "by scripts/lock/subset.py\n"
    )
    return header + "".join(entry.text for entry in chosen)


def main(argv: list[str]) -> int:
    kind = argv[0] if argv else ""
    if len(argv) < 3 or kind not in ("runtime", "build") or (kind == "build" and len(argv) > 3):
        print(
            "usage: subset.py runtime LOCK PYPROJECT [EXTRA...] | build LOCK BUILD_IN",
            file=sys.stderr,
        )
        return 2
    sys.stdout.write(subset(kind, Path(argv[1]), Path(argv[2]), tuple(argv[3:])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
