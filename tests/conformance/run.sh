#!/usr/bin/env bash
# Build containerd 1.6's snapshotter conformance suite (Debian's Go sources, GOPATH mode, no
# module proxy) into a cache dir outside the clone, then run it against `lazysnap serve`.
#
#   tests/conformance/run.sh [go test flags...]     e.g. -test.run 'TestLazysnapConformance/Basic'
#   LAZYSNAP_CONFORMANCE_CACHE=dir   build cache (default /var/cache/lazysnap-conformance)
#   LAZYSNAP_SERVE="cmd serve"       how to start the daemon (default: the venv's `lazysnap serve`)
#   LAZYSNAP_CONFORMANCE_LOGS=dir    where each subtest's daemon log is kept (default a new dir under $CACHE/logs)
#
# Output is `go test -v` output: one `--- PASS|FAIL|SKIP: TestLazysnapConformance/<name>` per subtest.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE=${LAZYSNAP_CONFORMANCE_CACHE:-/var/cache/lazysnap-conformance}
PKG=lazysnap.local/conformance
BIN=$CACHE/conformance.test

die() { echo "conformance: ERROR: $*" >&2; exit 1; }
command -v go >/dev/null || die "go not found (apt-get install golang-go)"
[[ -d /usr/share/gocode/src/github.com/containerd/containerd/snapshots/testsuite ]] \
    || die "containerd Go sources missing (apt-get install golang-github-containerd-containerd-dev)"

# Rebuild only when the test source changed: the binary is keyed by the source's hash.
# flock: engineers run this concurrently and share the cache.
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9
SRC_HASH=$(sha256sum "$HERE/conformance_test.go" | cut -c1-16)
if [[ ! -x $BIN || $(cat "$CACHE/conformance.hash" 2>/dev/null) != "$SRC_HASH" ]]; then
    mkdir -p "$CACHE/gopath/src/$PKG" "$CACHE/gocache"
    cp "$HERE/conformance_test.go" "$CACHE/gopath/src/$PKG/"
    echo "conformance: building the test binary (about 20 s warm, longer cold)" >&2
    (cd "$CACHE/gopath/src/$PKG" && GO111MODULE=off GOFLAGS= GOPATH="$CACHE/gopath:/usr/share/gocode" \
        GOCACHE="$CACHE/gocache" go test -c -o "$BIN.tmp" .) || die "go test -c failed"
    mv "$BIN.tmp" "$BIN"
    echo "$SRC_HASH" >"$CACHE/conformance.hash"
fi
flock -u 9

if [[ -z ${LAZYSNAP_SERVE:-} ]]; then
    VENV_BIN=${LAZYSNAP_VENV:-/opt/lazysnap-venv}/bin
    if [[ -x $VENV_BIN/lazysnap ]]; then
        LAZYSNAP_SERVE="$VENV_BIN/lazysnap serve"
    else
        LAZYSNAP_SERVE="$(command -v python3) -m snapshotter.cli serve"
    fi
fi
export LAZYSNAP_SERVE
# Each subtest's daemon log survives the suite's cleanup here (replaced on every run).
if [[ -z ${LAZYSNAP_CONFORMANCE_LOGS:-} ]]; then
    mkdir -p "$CACHE/logs"
    find "$CACHE/logs" -mindepth 1 -maxdepth 1 -mmin +1440 -exec rm -rf {} +  # a day is plenty
    LAZYSNAP_CONFORMANCE_LOGS=$(mktemp -d "$CACHE/logs/$(date +%Y%m%d-%H%M%S)-XXXX")
fi
export LAZYSNAP_CONFORMANCE_LOGS
echo "conformance: daemon logs in $LAZYSNAP_CONFORMANCE_LOGS/<suite temp dir>.log" >&2
cd "$REPO"   # so `python -m snapshotter.cli` finds the package if it is not installed
exec "$BIN" -test.v -test.timeout 10m "$@"
