#!/usr/bin/env bash
# Update requirements.lock on purpose: every Python package the daemon, the CLI, the tests and
# the build install, pinned with sha256 hashes, resolved from pyproject.toml
# ([project] dependencies + the `test` extra) and scripts/lock/build.in.
#
#   scripts/lock.sh                 re-resolve within the current pins where possible (uv keeps
#                                   what still satisfies pyproject.toml)
#   scripts/lock.sh --upgrade       take the newest release of everything
#   scripts/lock.sh --upgrade-package NAME   move one package
#
# Why uv: one static binary from PyPI, resolves and hashes the whole set in seconds, writes the
# plain pip requirements format, so installing needs nothing but pip (`--require-hashes`); the
# resolution is universal (markers for every platform, hashes of every wheel), so an arm64 node
# installs from the same file. uv itself is pinned here and lives in a throw-away venv.
# Then run the tests (scripts/test.sh), and commit pyproject.toml + requirements.lock together.
set -euo pipefail

UV_VERSION=0.13.9
REPO=$(cd "$(dirname "$0")/.." && pwd)
TOOLS=$(mktemp -d /tmp/lazysnap-lock.XXXXXX)
trap 'rm -rf "$TOOLS"' EXIT

python3 -m venv "$TOOLS/venv"
"$TOOLS/venv/bin/python" -m pip install -q --disable-pip-version-check "uv==$UV_VERSION"

cd "$REPO"
args=()
case "${1:-}" in
    --upgrade) args=(--upgrade) ;;
    --upgrade-package) args=(--upgrade-package "${2:?package name}") ;;
    "") args=() ;;
    *) echo "usage: $0 [--upgrade | --upgrade-package NAME]" >&2; exit 2 ;;
esac
[[ -f requirements.lock ]] || touch requirements.lock

# The header records what it was resolved from: tests/unit/test_lock.py fails when
# pyproject.toml's requirements change without a new lock.
inputs_sha=$("$TOOLS/venv/bin/python" scripts/lock/inputs_digest.py)
"$TOOLS/venv/bin/uv" pip compile pyproject.toml scripts/lock/build.in --extra test \
    --universal --python-version 3.11 --generate-hashes --no-header --quiet \
    --output-file requirements.lock.new "${args[@]}"
{
    echo "# lazysnap's pinned Python packages. Do not edit: scripts/lock.sh writes it."
    echo "# inputs-sha256: $inputs_sha"
    cat requirements.lock.new
} >requirements.lock
rm -f requirements.lock.new
echo "requirements.lock: $(grep -c '^[a-z0-9]' requirements.lock) packages"
