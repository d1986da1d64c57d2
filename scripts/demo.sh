#!/usr/bin/env bash
# Set up and demo lazysnap on a fresh Debian 12 machine (as root):
#   install deps, start a private stack under a temp dir (registry + lazysnap + containerd),
#   push an image (the cached big Python image, else a small busybox one), build its lazysnap
#   index signed with a fresh key the node trusts (`lazysnap trust keygen`, `lazysnap index
#   build --sign-key`), pull it lazily (`lazysnap pull`: layers mounted over FUSE,
#   not downloaded) and run a container that reads from the lazy layers.
# Everything is stopped and removed on exit. KEEP=1 leaves the stack up for poking around
# (stop it later with: python -m harness down BASE).
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
        echo "stack left running under $BASE; stop it with: $PY -m harness down $BASE"
        return
    fi
    say "cleaning up"
    if [[ -f $BASE/stack.json ]]; then "$PY" -m harness down "$BASE" || true; fi
    rm -rf "$BASE"
}
trap cleanup EXIT

LAZYSNAP=$VENV/bin/lazysnap
say "making the key pair that signs lazysnap indexes (the node uses only signed ones)"
"$LAZYSNAP" trust keygen --out "$BASE/keys"

say "starting registry + lazysnap + containerd under $BASE (trusting $BASE/keys/index.pub)"
eval "$("$PY" -m harness up "$BASE" --trust-key "$BASE/keys/index.pub")"
echo "registry $REGISTRY, containerd $CONTAINERD_ADDRESS (namespace $CONTAINERD_NAMESPACE)"
echo "lazysnap $LAZYSNAP_SOCKET (log $BASE/lazysnap/lazysnap.log)"

# The demo image: the big Python image if scripts/build-test-images.sh has cached it (laziness
# shows best there), else busybox with a few MB of data so there is something to be lazy about.
PYBIG=${LAZYSNAP_TEST_IMAGES:-/var/cache/lazysnap-test-images}/pybig
if [[ -f $PYBIG/index.json && -f $PYBIG/.complete ]]; then
    say "pushing the cached big image ($PYBIG) to $REGISTRY/demo/pybig:latest"
    IMAGE=$REGISTRY/demo/pybig:latest
    skopeo copy --quiet --dest-tls-verify=false --preserve-digests "oci:$PYBIG:latest" "docker://$IMAGE"
    COMMAND=(python3 -c 'import sys, numpy; print("hello from", sys.version.split()[0], "numpy", numpy.__version__, numpy.arange(3).sum())')
else
    say "building a busybox image with 8 MB of data and pushing it to $REGISTRY/demo/busybox:latest"
    IMAGE=$("$PY" - "$BASE" "$REGISTRY" <<'PYEOF'
import os
import sys
from pathlib import Path

from harness.images import busybox_layer_tar, directory, file, layer_tar, push, write_oci_layout

base, registry = Path(sys.argv[1]), sys.argv[2]
layout = base / "images" / "busybox"
layout.mkdir(parents=True, exist_ok=True)
data = layer_tar([directory("data"), *(file(f"data/blob{i}", os.urandom(1 << 20)) for i in range(8))])
built = write_oci_layout(layout, "latest", [busybox_layer_tar(base / "images"), data])
print(push(built, registry, "demo/busybox", "latest").reference)
PYEOF
)
    COMMAND=(sh -c 'echo "hello from a container on lazysnap: $(uname -sr)"; wc -c /data/blob0')
fi
# Blob bytes the registry sent (its access log) after log offset $1.
blob_bytes_since() {
    tail -c +$(($1 + 1)) "$BASE/registry/registry.log" |
        awk '/"GET \/v2\/.*\/blobs\/sha256:[0-9a-f]+ HTTP[^"]*" 20[06] [0-9]+/ {
            for (i = 1; i <= NF; i++) if ($i ~ /^20[06]$/) { n += $(i + 1); break } }
            END { print n + 0 }'
}

say "indexing $IMAGE: one lazysnap index per layer, pushed to the registry as a referrer, signed"
"$LAZYSNAP" index build --plain-http --min-layer-size 0 --sign-key "$BASE/keys/index.key" "$IMAGE"
"$LAZYSNAP" index show --plain-http "$IMAGE"

say "pulling $IMAGE with lazysnap pull: indexed layers are mounted, not downloaded"
LOG_START=$(stat -c %s "$BASE/registry/registry.log")
"$LAZYSNAP" pull --daemon-address "$LAZYSNAP_SOCKET" \
    --address "$CONTAINERD_ADDRESS" --namespace "$CONTAINERD_NAMESPACE" \
    --hosts-dir "$CONTAINERD_HOSTS_DIR" "$IMAGE"
sleep 0.5  # the registry logs a request after answering it
PULL_BYTES=$(blob_bytes_since "$LOG_START")
echo "the pull fetched $PULL_BYTES blob bytes from the registry (config + indexes)"
echo "lazy layers mounted over FUSE:"
grep -c "$BASE/lazysnap/root/snapshots/.*/fs fuse" /proc/mounts || true

say "running a container on lazysnap (file data is fetched as it is read)"
$CTR run --rm --snapshotter lazysnap "$IMAGE" "demo-$$" "${COMMAND[@]}"
echo "blob bytes the registry sent since the pull began: $(blob_bytes_since "$LOG_START")"

say "demo finished"
