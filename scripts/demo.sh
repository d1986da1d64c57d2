#!/usr/bin/env bash
# Set up and demo lazysnap on a fresh Debian 12 machine (as root):
#   install deps, start a private stack under a temp dir (registry + lazysnap + containerd),
#   build and push a busybox image, pull it with the lazysnap snapshotter, run a container.
# Everything is stopped and removed on exit. KEEP=1 leaves the stack up for poking around
# (stop it later with: python -m tests.harness down BASE).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV=${LAZYSNAP_VENV:-/opt/lazysnap-venv}
PY=$VENV/bin/python
cd "$REPO"

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

[[ $(id -u) == 0 ]] || { echo "demo: run as root (sudo scripts/demo.sh)" >&2; exit 1; }

say "installing dependencies (quiet if already there)"
bash scripts/install-deps.sh

BASE=$(mktemp -d /tmp/lazysnap-demo-XXXXXX)
cleanup() {
    if [[ ${KEEP:-0} == 1 ]]; then
        echo "stack left running under $BASE; stop it with: $PY -m tests.harness down $BASE"
        return
    fi
    say "cleaning up"
    if [[ -f $BASE/stack.json ]]; then "$PY" -m tests.harness down "$BASE" || true; fi
    rm -rf "$BASE"
}
trap cleanup EXIT

say "starting registry + lazysnap + containerd under $BASE"
eval "$("$PY" -m tests.harness up "$BASE")"
echo "registry $REGISTRY, containerd $CONTAINERD_ADDRESS (namespace $CONTAINERD_NAMESPACE)"
echo "lazysnap $LAZYSNAP_SOCKET (log $BASE/lazysnap/lazysnap.log)"

say "building the busybox image and pushing it to $REGISTRY/demo/busybox:latest"
IMAGE=$("$PY" - "$BASE" "$REGISTRY" <<'PYEOF'
import sys
from pathlib import Path

from tests.harness.images import build_busybox, push

base, registry = Path(sys.argv[1]), sys.argv[2]
print(push(build_busybox(base / "images" / "busybox"), registry, "demo/busybox", "latest").reference)
PYEOF
)

say "pulling $IMAGE with --snapshotter lazysnap"
$CTR images pull --hosts-dir "$CONTAINERD_HOSTS_DIR" --snapshotter lazysnap "$IMAGE"
$CTR snapshots --snapshotter lazysnap ls

say "running a container on lazysnap"
$CTR run --rm --snapshotter lazysnap "$IMAGE" demo-$$ \
    sh -c 'echo "hello from a container on lazysnap: $(uname -sr), $(ls /bin | wc -l) files in /bin"'

say "demo finished"
