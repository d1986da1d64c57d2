"""A layer of the tar features a lazy filesystem can get wrong, to stack on top of pybig: an
opaque directory, whiteouts of a file and of a whole directory, a file replacing a directory,
xattrs, setuid/sticky bits, odd owners, a hardlink pair, symlinks, a fifo and a device node.
pybig itself has no xattrs, devices or opaque dirs, so without this layer the rootfs comparison
would never see them."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

from harness.images import (
    FIXED_MTIME,
    LAYER_TYPES,
    MANIFEST_TYPE,
    BuiltImage,
    LayerInfo,
    read_layout,
    sha256_digest,
)

MOTD = b"replaced by the edge layer\n"
README = b"the only file left in /usr/share/doc (opaque directory)\n"


@dataclass(frozen=True)
class _Member:
    name: str
    type: bytes = tarfile.REGTYPE
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    link: str = ""
    xattrs: tuple[tuple[str, str], ...] = ()
    dev: tuple[int, int] = (0, 0)


MEMBERS = (
    # /usr/share/doc of the lower layers hidden, one new file instead.
    _Member("usr/share/doc", tarfile.DIRTYPE, mode=0o755),
    _Member("usr/share/doc/.wh..wh..opq"),
    _Member("usr/share/doc/README", data=README),
    # A file and a whole directory of the lower layers deleted.
    _Member("etc/.wh.issue.net"),
    _Member("usr/share/.wh.man"),
    # A lower file with new contents, a lower directory replaced by a file.
    _Member("etc/motd", data=MOTD),
    _Member("usr/share/lintian", data=b"a file where a directory was\n"),
    _Member("opt/edge", tarfile.DIRTYPE, mode=0o755, xattrs=(("user.kind", "dir"),)),
    _Member("opt/edge/xattrs", data=b"x\n", xattrs=(("user.a", "1"), ("user.lazysnap", "edge"))),
    _Member("opt/edge/setuid", data=b"#!/bin/sh\n", mode=0o4755),
    _Member("opt/edge/owned", data=b"mine\n", mode=0o640, uid=1234, gid=5678),
    _Member("opt/edge/empty"),
    _Member("opt/edge/sticky", tarfile.DIRTYPE, mode=0o1777),
    _Member("opt/edge/link-a", data=b"shared inode\n", mode=0o600),
    # Same mode as its target, as tar writers do: with a different one containerd chmods the
    # shared inode to the link entry's mode (last header wins) and lazysnap does not (reported).
    _Member("opt/edge/link-b", tarfile.LNKTYPE, mode=0o600, link="opt/edge/link-a"),
    _Member("opt/edge/relative", tarfile.SYMTYPE, mode=0o777, link="../../usr/bin/python3"),
    _Member("opt/edge/absolute", tarfile.SYMTYPE, mode=0o777, link="/etc/motd"),
    _Member("opt/edge/dangling", tarfile.SYMTYPE, mode=0o777, link="/nowhere"),
    # Modes other than 0777 in a symlink's header (Python's tarfile writes 0644): every unpack
    # shows 0777 (lrwxrwxrwx), and so must a lazy mount.
    _Member("opt/edge/link-0644", tarfile.SYMTYPE, mode=0o644, link="setuid"),
    _Member("opt/edge/link-0600", tarfile.SYMTYPE, mode=0o600, uid=1234, link="owned"),
    _Member("opt/edge/fifo", tarfile.FIFOTYPE, mode=0o600),
    _Member("opt/edge/null", tarfile.CHRTYPE, mode=0o666, dev=(1, 3)),
)


def edge_layer_tar() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for member in MEMBERS:
            info = tarfile.TarInfo(member.name)
            info.type, info.mode = member.type, member.mode
            info.uid, info.gid, info.mtime = member.uid, member.gid, FIXED_MTIME
            info.linkname = member.link
            info.devmajor, info.devminor = member.dev
            info.size = len(member.data)
            info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in member.xattrs}
            tar.addfile(info, io.BytesIO(member.data) if member.type == tarfile.REGTYPE else None)
    return buffer.getvalue()


def _link_or_copy(source: Path, target: Path) -> None:
    if target.exists():
        return
    try:
        os.link(source, target)
    except OSError:  # another filesystem
        shutil.copyfile(source, target)


def stack_layer(source: BuiltImage, layout: Path, layer_tar: bytes) -> BuiltImage:
    """source's image plus layer_tar (gzip) on top, as a new OCI layout tagged "latest"
    (source's blobs are hard-linked, not copied)."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    source_blobs = source.layout / "blobs" / "sha256"
    manifest = json.loads((source_blobs / source.manifest_digest[7:]).read_bytes())
    config = json.loads((source_blobs / source.config_digest[7:]).read_bytes())
    for layer in source.layers:
        _link_or_copy(source_blobs / layer.digest[7:], blobs / layer.digest[7:])

    compressed = gzip.compress(layer_tar, compresslevel=6, mtime=0)
    layer = LayerInfo(
        sha256_digest(compressed),
        len(compressed),
        "sha256:" + hashlib.sha256(layer_tar).hexdigest(),
        LAYER_TYPES["gzip"],
    )
    config["rootfs"]["diff_ids"].append(layer.diff_id)
    config.setdefault("history", []).append({"created_by": "lazysnap tests: edge layer"})
    config_bytes = json.dumps(config, separators=(",", ":"), sort_keys=True).encode()
    manifest["config"] = {**manifest["config"], "digest": sha256_digest(config_bytes)}
    manifest["config"]["size"] = len(config_bytes)
    manifest["layers"].append(
        {"mediaType": layer.media_type, "digest": layer.digest, "size": layer.size}
    )
    manifest_bytes = json.dumps(manifest, separators=(",", ":"), sort_keys=True).encode()
    for data in (compressed, config_bytes, manifest_bytes):
        (blobs / sha256_digest(data)[7:]).write_bytes(data)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": MANIFEST_TYPE,
                "digest": sha256_digest(manifest_bytes),
                "size": len(manifest_bytes),
                "annotations": {"org.opencontainers.image.ref.name": "latest"},
            }
        ],
    }
    (layout / "index.json").write_text(json.dumps(index))
    return read_layout(layout, "latest")
