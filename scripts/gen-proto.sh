#!/usr/bin/env bash
# Regenerate snapshotter/_proto from proto/ (grpcio-tools). Generated code is committed so the
# daemon needs only the protobuf/grpcio runtimes; imports are rewritten to live in the package.
# Each top directory of proto/ is a root (containerd: vendored API; cri: the CRI subset the
# image-service proxy decodes) generated into snapshotter/_proto/<root>.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
out="$here/snapshotter/_proto"
roots=(containerd cri)
mkdir -p "$out"
cd "$here/proto"
for root in "${roots[@]}"; do
  rm -rf "${out:?}/$root"
  mapfile -t protos < <(find "$root" -name '*.proto' | sort)
  "$py" -m grpc_tools.protoc -I. --python_out="$out" --grpc_python_out="$out" --pyi_out="$out" \
    "${protos[@]}"
  # protoc emits top-level imports ("from containerd.types import ..."); make them
  # package-relative.
  find "$out/$root" -name '*.py' -o -name '*.pyi' | while read -r f; do
    sed -i -e "s/^from $root\\./from snapshotter._proto.$root./" \
           -e "s/^import $root\\./import snapshotter._proto.$root./" "$f"
  done
  find "$out/$root" -type d -exec touch {}/__init__.py \;
done
echo "generated $(find "$out" -name '*_pb2*.py' | wc -l) modules into snapshotter/_proto"
