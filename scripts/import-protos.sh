#!/usr/bin/env bash
# Copy containerd's API protos from Debian's golang-github-containerd-containerd-dev into proto/,
# with the gogoproto annotations stripped (they only steer Go code generation) and imports
# shortened to proto/-relative paths. Run once when moving to a new containerd API version;
# scripts/gen-proto.sh then regenerates the Python code.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
src=${CONTAINERD_SRC:-/usr/share/gocode/src/github.com/containerd/containerd}
[ -d "$src/api" ] || { echo "error: $src/api not found; apt-get install golang-github-containerd-containerd-dev" >&2; exit 1; }
files=(types/mount.proto types/descriptor.proto services/snapshots/v1/snapshots.proto
       services/content/v1/content.proto services/images/v1/images.proto
       services/leases/v1/leases.proto services/diff/v1/diff.proto)
for f in "${files[@]}"; do
  out="$here/proto/containerd/$f"
  mkdir -p "$(dirname "$out")"
  sed -e '/import weak "gogoproto\/gogo.proto";/d' \
      -e '/option (gogoproto\./d' \
      -e 's/[[:space:]]*\[(gogoproto[^]]*\]//g' \
      -e 's#import "github.com/containerd/containerd/api/#import "containerd/#' \
      "$src/api/$f" > "$out"
done
echo "imported ${#files[@]} protos from $src into proto/containerd"
