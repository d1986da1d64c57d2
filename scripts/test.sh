#!/usr/bin/env bash
# The one test command (CI runs it as root on a fresh clone via .ci/run):
#   1. install dependencies (scripts/install-deps.sh: apt packages + venv)
#   2. make sure the big test image is built and cached (scripts/build-test-images.sh)
#   3. ruff check, ruff format --check, mypy --strict, then the whole pytest suite
# Exits non-zero if any step fails; every step still runs so one report shows everything.
#
#   LAZYSNAP_VENV=/path   venv (default /opt/lazysnap-venv)
#   PYTEST_ARGS="..."     extra pytest arguments, e.g. PYTEST_ARGS="-k containerd -x"
set -uo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV=${LAZYSNAP_VENV:-/opt/lazysnap-venv}
BIN=$VENV/bin
cd "$REPO" || exit 1

START=$SECONDS
failed=()
step() { printf '\n==== %s  [%ds]\n' "$1" $((SECONDS - START)); }
check() {  # check NAME COMMAND...: run, record failure, keep going
    local name=$1
    shift
    step "$name"
    if "$@"; then
        echo "---- $name: ok"
    else
        echo "---- $name: FAILED (rc=$?)"
        failed+=("$name")
    fi
}

step "install dependencies"
bash scripts/install-deps.sh || { echo "install-deps failed: nothing else can run" >&2; exit 1; }

step "big test image (cached outside the clone)"
bash scripts/build-test-images.sh || { echo "build-test-images failed" >&2; exit 1; }

check "ruff check" "$BIN/ruff" check .
check "ruff format --check" "$BIN/ruff" format --check .
# tests/ has no __init__.py: map it to module names from the repo root.
check "mypy --strict (snapshotter)" "$BIN/mypy" --strict
check "mypy --strict (tests)" env MYPYPATH="$REPO" "$BIN/mypy" --strict \
    --explicit-package-bases tests/conftest.py tests/e2e tests/lazy tests/pull \
    tests/remote tests/index tests/stress tests/fs tests/unit tests/profile tests/source \
    tests/status tests/install tests/trust tests/bench scripts/images scripts/lock
# These directories import their helpers as sibling modules (pytest's rootdir insertion).
for dir in tests/accel tests/indexer; do
    check "mypy --strict ($dir)" env MYPYPATH="$REPO:$REPO/$dir" "$BIN/mypy" --strict \
        --explicit-package-bases "$dir"
done
# The stack harness (tests and benchmarks use it) and the benchmarks (python -m bench.NAME).
check "mypy --strict (harness, bench)" env MYPYPATH="$REPO" "$BIN/mypy" --strict \
    --explicit-package-bases harness bench

# LAZYSNAP_REQUIRE_STACK=1: a stack test that cannot run is an error, not a silent skip.
# shellcheck disable=SC2086  # PYTEST_ARGS is a list of words
check "pytest" env LAZYSNAP_REQUIRE_STACK=1 "$BIN/python" -m pytest -ra --durations=15 \
    --continue-on-collection-errors \
    ${PYTEST_ARGS:-}

printf '\n==== summary after %dm%02ds\n' $(((SECONDS - START) / 60)) $(((SECONDS - START) % 60))
if ((${#failed[@]})); then
    printf 'FAILED: %s\n' "${failed[@]}"
    exit 1
fi
echo "all checks passed"
