"""Give every manifest and index in an OCI layout an explicit mediaType, then tag it.

umoci 0.4.7 writes image manifests without `mediaType`; docker-registry accepts that, but
stricter registries (peryx) reject it, so the cached layout is normalized once at build time.
Usage: python3 normalize_oci.py LAYOUT_DIR SOURCE_TAG DEST_TAG
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
REF_NAME = "org.opencontainers.image.ref.name"


def _write_blob(layout: Path, data: bytes) -> tuple[str, int]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = layout / "blobs" / "sha256" / digest.split(":", 1)[1]
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.rename(path)
    return digest, len(data)


def normalize(layout: Path, source_tag: str, dest_tag: str) -> None:
    index_path = layout / "index.json"
    index = json.loads(index_path.read_text())
    source = next(
        (m for m in index["manifests"] if m.get("annotations", {}).get(REF_NAME) == source_tag),
        None,
    )
    if source is None:
        raise SystemExit(f"{layout}: no manifest tagged {source_tag!r} in index.json")
    blob = layout / "blobs" / "sha256" / source["digest"].split(":", 1)[1]
    manifest = json.loads(blob.read_bytes())
    manifest = {"schemaVersion": 2, "mediaType": MANIFEST, **manifest}
    manifest["mediaType"] = MANIFEST
    digest, size = _write_blob(layout, json.dumps(manifest, separators=(",", ":")).encode())
    kept = [m for m in index["manifests"] if m.get("annotations", {}).get(REF_NAME) != dest_tag]
    kept.append(
        {"mediaType": MANIFEST, "digest": digest, "size": size, "annotations": {REF_NAME: dest_tag}}
    )
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", **index}
    index["manifests"] = kept
    tmp = index_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(index, indent=1))
    tmp.rename(index_path)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit("usage: normalize_oci.py LAYOUT_DIR SOURCE_TAG DEST_TAG")
    normalize(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
