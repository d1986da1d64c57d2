"""docs/architecture.md's `imports` list is the real import graph of snapshotter/, without cycles.

The list draws one arrow per pair of packages / top-level modules (`fs -> index`) that some
import connects. The graph here is computed with `ast` from every import statement of every
module: at module top, inside functions (the lazy imports the CLI and the daemon use) and under
TYPE_CHECKING. The tests fail on (a) an import cycle between modules or between packages, (b)
an arrow in the code the doc does not draw, (c) an arrow the doc draws that the code lacks; each
message names the importing modules and the doc line to change. A second block,
`repository-imports`, draws the same way how snapshotter, harness, bench and tests use each other.
"""

from __future__ import annotations

import ast
import itertools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "snapshotter"
DOC = REPO / "docs" / "architecture.md"
FENCE_OPEN = "```imports"  # snapshotter's packages and top-level modules
REPOSITORY_FENCE = "```repository-imports"  # the repository's top-level packages
REPOSITORY_PACKAGES = ("bench", "harness", "snapshotter", "tests")
FENCE_CLOSE = "```"
ARROW = re.compile(r"^(?P<source>[\w.]+)\s*->\s*(?P<targets>.*)$")

# Cycles allowed by name (none: issue 13 removed the last two). An entry whose cycle is gone
# fails, so the list cannot outlive what it excuses.
KNOWN_MODULE_CYCLES: frozenset[frozenset[str]] = frozenset()
KNOWN_PACKAGE_CYCLES: frozenset[frozenset[str]] = frozenset()


@dataclass(frozen=True)
class Import:
    """One import statement's edge: `importer` (a module) imports `imported` (a module)."""

    importer: str
    imported: str
    path: Path
    line: int

    def where(self, root: Path) -> str:
        return f"{self.path.relative_to(root)}:{self.line} imports {self.imported}"


@dataclass
class ImportGraph:
    """The modules of some packages and every import between them, grouped into units: the
    subpackages and top-level modules of one package (depth 1), or whole packages (depth 0)."""

    scope: str  # what the units are parts of, as messages name it: "snapshotter/" (or "")
    root: Path  # the directory holding the packages (error messages show paths from here)
    modules: dict[str, Path]
    imports: list[Import]
    depth: int = 1

    def unit(self, module: str) -> str | None:
        """The unit a module belongs to (None: the package's own __init__ at depth 1)."""
        parts = module.split(".")
        return parts[self.depth] if len(parts) > self.depth else None

    @property
    def unit_kind(self) -> str:
        if self.depth:
            return f"package or top-level module of {self.scope}"
        return f"package checked here ({', '.join(sorted(self.units()))})"

    def units(self) -> set[str]:
        return {unit for unit in map(self.unit, self.modules) if unit is not None}

    def module_edges(self) -> dict[str, set[str]]:
        edges: dict[str, set[str]] = {}
        for edge in self.imports:
            if edge.importer != edge.imported:
                edges.setdefault(edge.importer, set()).add(edge.imported)
        return edges

    def unit_imports(self) -> dict[tuple[str, str], list[Import]]:
        """(importing unit, imported unit) -> the imports that make that arrow."""
        arrows: dict[tuple[str, str], list[Import]] = {}
        for edge in self.imports:
            source, target = self.unit(edge.importer), self.unit(edge.imported)
            # importing the package itself (only __version__) draws no arrow: every import of
            # a submodule runs it anyway
            if source is None or target is None or source == target:
                continue
            arrows.setdefault((source, target), []).append(edge)
        return arrows

    def unit_edges(self) -> dict[str, set[str]]:
        edges: dict[str, set[str]] = {}
        for source, target in self.unit_imports():
            edges.setdefault(source, set()).add(target)
        return edges


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(name: str, modules: Mapping[str, Path]) -> str | None:
    """The module an imported dotted name is, or the deepest known module it lies in."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imported_names(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool) -> list[str]:
    """The dotted names one import statement names (relative ones made absolute)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: from the importer's package, up level - 1
        anchor = importer.split(".") if is_package else importer.split(".")[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join([*anchor, base] if base else anchor)
    # `from pkg import module` imports the module, `from module import name` the module
    return [f"{base}.{alias.name}" for alias in node.names]


def import_graph(package_dir: Path, *more: Path, depth: int = 1) -> ImportGraph:
    """The graph of one package's modules (units: its subpackages and top-level modules), or
    with `more` and depth 0, of several packages beside it (units: the packages)."""
    root = package_dir.parent
    packages = tuple(directory.name for directory in (package_dir, *more))
    modules = {
        module_name(path, root): path
        for directory in (package_dir, *more)
        for path in sorted(directory.rglob("*.py"))
    }
    imports: dict[Import, None] = {}  # ordered set: `from m import a, b` is one edge
    for importer, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            for name in imported_names(node, importer, path.name == "__init__.py"):
                if name.partition(".")[0] not in packages:
                    continue
                target = resolve(name, modules)
                if target is not None:
                    imports[Import(importer, target, path, node.lineno)] = None
    scope = f"{package_dir.name}/" if depth else ""
    return ImportGraph(scope, root, modules, list(imports), depth)


@dataclass
class DocArrows:
    """The `imports` block of the architecture doc: unit -> drawn targets, with line numbers."""

    path: Path
    name: str  # as error messages show it
    fence: str
    targets: dict[str, set[str]] = field(default_factory=dict)
    lines: dict[str, int] = field(default_factory=dict)  # unit -> line of its arrow list
    problems: list[str] = field(default_factory=list)

    def line_of(self, unit: str) -> str:
        line = self.lines.get(unit)
        if line is None:
            return f"{self.name} (no `{unit} ->` line: add one to the {self.fence[3:]} block)"
        return f"{self.name} line {line} (`{unit} -> ...`)"


def parse_doc(path: Path, name: str | None = None, fence: str = FENCE_OPEN) -> DocArrows:
    doc = DocArrows(path, name or path.name, fence)
    lines = path.read_text().splitlines()
    try:
        start = next(n for n, text in enumerate(lines) if text.strip() == fence)
    except StopIteration:
        doc.problems.append(f"{doc.name} has no {fence} block")
        return doc
    for number, text in enumerate(lines[start + 1 :], start=start + 2):
        text = text.split("#", 1)[0].strip()
        if text == FENCE_CLOSE:
            return doc
        if not text:
            continue
        match = ARROW.match(text)
        if match is None:
            doc.problems.append(f"{doc.name} line {number}: {text!r} is not `unit -> unit, ...`")
            continue
        source = match["source"]
        if source in doc.lines:
            doc.problems.append(
                f"{doc.name} line {number}: `{source} ->` again (first on line "
                f"{doc.lines[source]}): one line per package or module"
            )
            continue
        doc.lines[source] = number
        doc.targets[source] = {t.strip() for t in match["targets"].split(",") if t.strip()}
    doc.problems.append(f"{doc.name}: the {fence} block is not closed")
    return doc


def strongly_connected(edges: Mapping[str, Iterable[str]]) -> list[set[str]]:
    """Every set of two or more nodes that reach each other (Tarjan, iterative)."""
    nodes = sorted(set(edges) | {t for targets in edges.values() for t in targets})
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(sorted(edges.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            advanced = False
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(edges.get(successor, ())))))
                    advanced = True
                    break
                if successor in on_stack:
                    low[node] = min(low[node], index[successor])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component: set[str] = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(component)
    return found


def a_cycle(component: set[str], edges: Mapping[str, Iterable[str]]) -> list[str]:
    """One concrete cycle through the component, as a path that ends where it starts."""
    start = min(component)
    paths: dict[str, list[str]] = {start: [start]}
    frontier = [start]
    while frontier:  # breadth first: the shortest way back to start
        following: list[str] = []
        for node in frontier:
            for successor in sorted(edges.get(node, ())):
                if successor == start:
                    return [*paths[node], start]
                if successor in component and successor not in paths:
                    paths[successor] = [*paths[node], successor]
                    following.append(successor)
        frontier = following
    raise AssertionError(f"no cycle through {start} in {sorted(component)}")


def cycle_problems(
    edges: Mapping[str, Iterable[str]],
    known: frozenset[frozenset[str]],
    known_name: str,
    kind: str,
    evidence: Mapping[tuple[str, str], list[Import]],
    root: Path,
    doc: DocArrows | None = None,
) -> list[str]:
    problems: list[str] = []
    components = strongly_connected(edges)
    for component in components:
        if frozenset(component) in known:
            continue
        cycle = a_cycle(component, edges)
        steps = [
            f"  {source} -> {target}: {evidence[(source, target)][0].where(root)}"
            + ("" if doc is None else f" (the arrow on {doc.line_of(source)})")
            for source, target in itertools.pairwise(cycle)
        ]
        problems.append(
            f"import cycle between {kind}: {' -> '.join(cycle)}\n"
            + "\n".join(steps)
            + "\n  break one of these imports (and drop its arrow from the doc): imports point"
            " one way"
        )
    present = {frozenset(component) for component in components}
    for gone in sorted(known - present, key=sorted):
        problems.append(
            f"the known cycle between {kind} {' <-> '.join(sorted(gone))} is gone: remove it "
            f"from {known_name} in tests/unit/test_architecture.py"
        )
    return problems


def module_cycle_problems(
    graph: ImportGraph, known: frozenset[frozenset[str]] = KNOWN_MODULE_CYCLES
) -> list[str]:
    evidence: dict[tuple[str, str], list[Import]] = {}
    for edge in graph.imports:
        evidence.setdefault((edge.importer, edge.imported), []).append(edge)
    return cycle_problems(
        graph.module_edges(), known, "KNOWN_MODULE_CYCLES", "modules", evidence, graph.root
    )


def package_cycle_problems(
    graph: ImportGraph,
    known: frozenset[frozenset[str]] = KNOWN_PACKAGE_CYCLES,
    doc: DocArrows | None = None,
) -> list[str]:
    return cycle_problems(
        graph.unit_edges(),
        known,
        "KNOWN_PACKAGE_CYCLES",
        "packages",
        graph.unit_imports(),
        graph.root,
        doc,
    )


def undrawn_arrow_problems(graph: ImportGraph, doc: DocArrows) -> list[str]:
    problems = []
    for (source, target), edges in sorted(graph.unit_imports().items()):
        if target in doc.targets.get(source, set()):
            continue
        shown = "\n".join(f"  {edge.where(graph.root)}" for edge in edges[:5])
        more = f"\n  (and {len(edges) - 5} more)" if len(edges) > 5 else ""
        problems.append(
            f"{source} -> {target} is in the code but not in the doc: add `{target}` to "
            f"{doc.line_of(source)}, or remove the import(s):\n{shown}{more}"
        )
    return problems


def unused_arrow_problems(graph: ImportGraph, doc: DocArrows) -> list[str]:
    arrows = graph.unit_imports()
    return [
        f"{doc.line_of(source)} draws {source} -> {target}, but no module of {source} "
        f"imports {target}: remove `{target}` from that line"
        for source, targets in sorted(doc.targets.items())
        for target in sorted(targets)
        if (source, target) not in arrows
    ]


def coverage_problems(graph: ImportGraph, doc: DocArrows) -> list[str]:
    units = graph.units()
    problems = list(doc.problems)
    for unit in sorted(units - set(doc.lines)):
        problems.append(
            f"{graph.scope}{unit} has no line in {doc.name}'s {doc.fence[3:]} block: add "
            f"`{unit} -> ...` (its arrows, or nothing after the arrow)"
        )
    for source, number in sorted(doc.lines.items()):
        for name in sorted(({source} | doc.targets[source]) - units):
            problems.append(
                f"{doc.name} line {number} names `{name}`, which is no {graph.unit_kind}: "
                "fix or remove it"
            )
    return problems


@pytest.fixture(scope="module")
def graph() -> ImportGraph:
    return import_graph(PACKAGE)


@pytest.fixture(scope="module")
def doc() -> DocArrows:
    return parse_doc(DOC, "docs/architecture.md")


def test_the_doc_has_one_line_per_package_and_top_level_module(
    graph: ImportGraph, doc: DocArrows
) -> None:
    problems = coverage_problems(graph, doc)
    assert not problems, "\n".join(problems)


def listed_entries(path: Path) -> set[str]:
    """The packages and top-level modules the doc's first block (the map of snapshotter/) names
    at its top indent: `  name/` or `  name.py`."""
    text = path.read_text()
    start = text.index("```\nsnapshotter/\n")
    block = text[start : text.index("\n```", start + 3)]
    entry = re.compile(r"^  (?P<name>\w+)(?P<kind>/|\.py)(?:\s|$)")
    return {m.group("name") for line in block.splitlines() if (m := entry.match(line)) is not None}


def test_the_map_names_every_package_and_top_level_module_and_nothing_else(
    graph: ImportGraph,
) -> None:
    listed = listed_entries(DOC)
    units = graph.units()
    assert not units - listed, f"docs/architecture.md's map lacks: {sorted(units - listed)}"
    assert not listed - units, (
        f"docs/architecture.md's map names what is gone: {sorted(listed - units)}"
    )


def test_every_import_between_packages_is_drawn_in_the_doc(
    graph: ImportGraph, doc: DocArrows
) -> None:
    problems = undrawn_arrow_problems(graph, doc)
    assert not problems, "\n".join(problems)


def test_every_arrow_the_doc_draws_is_an_import_in_the_code(
    graph: ImportGraph, doc: DocArrows
) -> None:
    problems = unused_arrow_problems(graph, doc)
    assert not problems, "\n".join(problems)


def test_no_import_cycle_between_modules(graph: ImportGraph) -> None:
    problems = module_cycle_problems(graph)
    assert not problems, "\n".join(problems)


def test_no_import_cycle_between_packages(graph: ImportGraph, doc: DocArrows) -> None:
    problems = package_cycle_problems(graph, doc=doc)
    assert not problems, "\n".join(problems)


def test_the_repository_packages_import_each_other_as_the_doc_draws() -> None:
    """snapshotter imports none of the rest; harness (the real stack) neither the tests nor the
    benchmarks, so both can use it."""
    graph = import_graph(*(REPO / name for name in REPOSITORY_PACKAGES), depth=0)
    doc = parse_doc(DOC, "docs/architecture.md", REPOSITORY_FENCE)
    problems = [
        *coverage_problems(graph, doc),
        *undrawn_arrow_problems(graph, doc),
        *unused_arrow_problems(graph, doc),
        *package_cycle_problems(graph, frozenset(), doc),
    ]
    assert not problems, "\n".join(problems)


# The checker itself, on a small package written here: what it reports when the code moves.


def _write(root: Path, files: Mapping[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def _doc(tmp_path: Path, *arrows: str) -> DocArrows:
    path = tmp_path / "architecture.md"
    path.write_text("# map\n\n" + "\n".join([FENCE_OPEN, "# comment", *arrows, FENCE_CLOSE]) + "\n")
    return parse_doc(path)


def test_a_lazy_import_inside_a_function_closes_a_module_cycle(tmp_path: Path) -> None:
    _write(
        tmp_path / "pkg",
        {
            "__init__.py": "",
            "core/__init__.py": "",
            "core/a.py": "from pkg.core import b\n",
            "core/b.py": "def later() -> None:\n    from pkg.core.a import thing\n",
        },
    )
    problems = module_cycle_problems(import_graph(tmp_path / "pkg"), frozenset())
    assert len(problems) == 1
    assert problems[0].startswith(
        "import cycle between modules: pkg.core.a -> pkg.core.b -> pkg.core.a\n"
    )
    assert "pkg/core/b.py:2 imports pkg.core.a" in problems[0]
    # allowed by name, it passes; once it is gone, the allowance itself is reported
    allowed = frozenset({frozenset({"pkg.core.a", "pkg.core.b"})})
    assert module_cycle_problems(import_graph(tmp_path / "pkg"), allowed) == []
    (tmp_path / "pkg/core/b.py").write_text("")
    [stale] = module_cycle_problems(import_graph(tmp_path / "pkg"), allowed)
    assert "pkg.core.a <-> pkg.core.b is gone: remove it from KNOWN_MODULE_CYCLES" in stale


def test_arrows_are_checked_both_ways_and_name_the_doc_line(tmp_path: Path) -> None:
    _write(
        tmp_path / "pkg",
        {
            "__init__.py": "__version__ = '1'\n",
            "cli.py": "from pkg import __version__\nimport pkg.fs.reader\n",
            "fs/__init__.py": "",
            "fs/reader.py": "from . import cache\nfrom ..index.codec import decode\n",
            "fs/cache.py": "",
            "index/__init__.py": "",
            "index/codec.py": "import json\n",
        },
    )
    graph = import_graph(tmp_path / "pkg")
    doc = _doc(tmp_path, "cli -> fs, index", "fs ->", "index ->")
    assert coverage_problems(graph, doc) == []
    [undrawn] = undrawn_arrow_problems(graph, doc)  # relative imports count too
    assert undrawn.startswith(
        "fs -> index is in the code but not in the doc: add `index` to architecture.md line 6"
    )
    assert "pkg/fs/reader.py:2 imports pkg.index.codec" in undrawn
    assert unused_arrow_problems(graph, doc) == [
        "architecture.md line 5 (`cli -> ...`) draws cli -> index, but no module of cli imports "
        "index: remove `index` from that line"
    ]
    assert package_cycle_problems(graph, frozenset()) == []


def test_a_package_cycle_and_a_doc_that_misses_or_invents_a_package(tmp_path: Path) -> None:
    _write(
        tmp_path / "pkg",
        {
            "__init__.py": "",
            "fs/__init__.py": "",
            "fs/mount.py": "from pkg.index.spans import inflate\n",
            "index/__init__.py": "",
            "index/spans.py": "",
            "index/build.py": "from pkg.fs import mount\n",
        },
    )
    graph = import_graph(tmp_path / "pkg")
    [cycle] = package_cycle_problems(graph, frozenset(), _doc(tmp_path, "fs -> index"))
    assert cycle.startswith("import cycle between packages: fs -> index -> fs\n")
    assert (
        "  fs -> index: pkg/fs/mount.py:1 imports pkg.index.spans (the arrow on architecture.md "
        "line 5 (`fs -> ...`))\n"
        "  index -> fs: pkg/index/build.py:1 imports pkg.fs.mount (the arrow on architecture.md "
        "(no `index ->` line: add one to the imports block))"
    ) in cycle
    assert module_cycle_problems(graph, frozenset()) == []  # no module cycle, still a package one
    doc = _doc(tmp_path, "fs -> index, remote", "fs -> index")
    assert coverage_problems(graph, doc) == [
        "architecture.md line 6: `fs ->` again (first on line 5): one line per package or module",
        "pkg/index has no line in architecture.md's imports block: add `index -> ...` (its "
        "arrows, or nothing after the arrow)",
        "architecture.md line 5 names `remote`, which is no package or top-level module of "
        "pkg/: fix or remove it",
    ]
