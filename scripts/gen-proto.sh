#!/usr/bin/env bash
# Regenerate snapshotter/_proto from proto/ (grpcio-tools). Generated code is committed so the
# daemon needs only the protobuf/grpcio runtimes; imports are rewritten to live in the package.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
out="$here/snapshotter/_proto"
rm -rf "$out/containerd"
mkdir -p "$out"
cd "$here/proto"
mapfile -t protos < <(find containerd -name '*.proto' | sort)
"$py" -m grpc_tools.protoc -I. --python_out="$out" --grpc_python_out="$out" --pyi_out="$out" "${protos[@]}"
# protoc emits top-level imports ("from containerd.types import ..."); make them package-relative.
find "$out/containerd" -name '*.py' -o -name '*.pyi' | while read -r f; do
  sed -i -e 's/^from containerd\./from snapshotter._proto.containerd./' \
         -e 's/^import containerd\./import snapshotter._proto.containerd./' "$f"
done
find "$out/containerd" -type d -exec touch {}/__init__.py \;
echo "generated $(find "$out/containerd" -name '*_pb2*.py' | wc -l) modules into snapshotter/_proto"
