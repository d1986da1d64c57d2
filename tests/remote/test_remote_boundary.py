"""Only snapshotter/remote/ speaks HTTP to the outside (docs/architecture.md): retries, timeouts,
redaction of secrets in URLs and TLS settings live in one place, so no other package may import
an HTTP client library."""

from __future__ import annotations

import ast
from pathlib import Path

import snapshotter

HTTP_CLIENTS = ("httpx", "urllib3", "http.client", "urllib.request", "requests", "aiohttp")
PACKAGE = Path(snapshotter.__file__).resolve().parent


def _imported_modules(path: Path) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
    return modules


def _is_http_client(module: str) -> bool:
    return any(module == name or module.startswith(f"{name}.") for name in HTTP_CLIENTS)


def test_no_module_outside_remote_imports_an_http_client() -> None:
    offenders = {
        str(path.relative_to(PACKAGE.parent)): sorted(filter(_is_http_client, imported))
        for path in sorted(PACKAGE.rglob("*.py"))
        if "remote" not in path.relative_to(PACKAGE).parts[:1]
        and "_proto" not in path.relative_to(PACKAGE).parts[:1]
        for imported in [_imported_modules(path)]
        if any(map(_is_http_client, imported))
    }
    assert offenders == {}
    # The walk saw the package (a wrong root would pass vacuously).
    assert (PACKAGE / "fs" / "blob_source.py").is_file()
