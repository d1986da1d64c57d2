#!/usr/bin/env bash
# Fuzz campaign over the parsers of untrusted bytes (tests/index/test_fuzz.py) for a while:
# rounds of fresh random seeds until DURATION seconds have passed; stops at the first failure
# (hypothesis prints the shrunk input). The test command runs the same tests for a few seconds.
#
#   scripts/fuzz.sh [DURATION_SECONDS=600] [EXAMPLES_PER_ROUND=2000] [-k EXPR ...pytest args]
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV=${LAZYSNAP_VENV:-/opt/lazysnap-venv}
DURATION=${1:-600}
EXAMPLES=${2:-2000}
shift $(($# > 2 ? 2 : $#))
cd "$REPO" || exit 1
end=$((SECONDS + DURATION))
round=0
while ((SECONDS < end)); do
    round=$((round + 1))
    echo "== round $round (${EXAMPLES} examples per test, $((end - SECONDS)) s left)"
    if ! PYTHONPATH=$REPO LAZYSNAP_FUZZ_FRESH=1 LAZYSNAP_FUZZ_EXAMPLES=$EXAMPLES \
        "$VENV/bin/python" -m pytest -q -x -p no:cacheprovider --hypothesis-show-statistics \
        tests/index/test_fuzz.py "$@"; then
        echo "fuzz: failure in round $round (see above); add the input to test_fuzz.py" >&2
        exit 1
    fi
done
echo "fuzz: $round rounds, no failure"
