"""Small OCI images built in-process (tarfile + gzip/zstd), written as OCI layouts and pushed
to a registry with skopeo. Deterministic: the same entries give the same digests."""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from harness.procs import HarnessError, run

Compression = Literal["gzip", "zstd", "none"]

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPES: dict[Compression, str] = {
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    "none": "application/vnd.oci.image.layer.v1.tar",
}
REF_NAME = "org.opencontainers.image.ref.name"
FIXED_MTIME = 1_700_000_000  # fixed so rebuilding a fixture gives byte-identical blobs
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class TarEntry:
    """One member of a layer tar. kind: file | dir | symlink | hardlink | whiteout."""

    path: str
    kind: str = "file"
    data: bytes = b""
    mode: int = 0o644
    target: str = ""  # symlink / hardlink target
    uid: int = 0
    gid: int = 0


def file(path: str, data: bytes | str, mode: int = 0o644) -> TarEntry:
    return TarEntry(path, "file", data.encode() if isinstance(data, str) else data, mode)


def directory(path: str, mode: int = 0o755) -> TarEntry:
    return TarEntry(path, "dir", mode=mode)


def symlink(path: str, target: str) -> TarEntry:
    return TarEntry(path, "symlink", mode=0o777, target=target)


def whiteout(path: str) -> TarEntry:
    """An OCI whiteout: deletes path from the layers below."""
    parent, _, name = path.rstrip("/").rpartition("/")
    return TarEntry(f"{parent}/.wh.{name}" if parent else f".wh.{name}", "file")


def layer_tar(entries: Iterable[TarEntry]) -> bytes:
    """An uncompressed layer tar (PAX) of the entries, in the given order."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            info = tarfile.TarInfo(entry.path.lstrip("/"))
            info.mode, info.uid, info.gid = entry.mode, entry.uid, entry.gid
            info.mtime = FIXED_MTIME
            payload: bytes | None = None
            if entry.kind in ("file", "whiteout"):
                info.type, info.size, payload = tarfile.REGTYPE, len(entry.data), entry.data
            elif entry.kind == "dir":
                info.type = tarfile.DIRTYPE
            elif entry.kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, entry.target
            elif entry.kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, entry.target.lstrip("/")
            else:
                raise HarnessError(f"layer entry {entry.path}: unknown kind {entry.kind!r}")
            tar.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return buffer.getvalue()


def compress(tar_bytes: bytes, compression: Compression) -> bytes:
    if compression == "gzip":
        return gzip.compress(tar_bytes, compresslevel=6, mtime=0)
    if compression == "zstd":
        try:
            import zstandard  # type: ignore[import-untyped,unused-ignore]
        except ImportError as exc:
            raise HarnessError("zstd layers need the zstandard package") from exc
        compressed: bytes = zstandard.ZstdCompressor(level=3).compress(tar_bytes)
        return compressed
    if compression == "none":
        return tar_bytes
    raise HarnessError(f"unknown layer compression {compression!r}")


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class LayerInfo:
    digest: str  # of the compressed blob, as in the manifest
    size: int
    diff_id: str  # of the uncompressed tar, as in the config
    media_type: str


@dataclass(frozen=True)
class BuiltImage:
    """An image in an OCI layout directory under `tag`."""

    layout: Path
    tag: str
    manifest_digest: str
    config_digest: str
    layers: tuple[LayerInfo, ...]

    @property
    def blob_bytes(self) -> int:
        return sum(layer.size for layer in self.layers)


@dataclass(frozen=True)
class PushedImage:
    built: BuiltImage
    registry_host: str
    repository: str
    tag: str

    @property
    def reference(self) -> str:
        return f"{self.registry_host}/{self.repository}:{self.tag}"

    @property
    def layers(self) -> tuple[LayerInfo, ...]:
        return self.built.layers


@dataclass
class _Layout:
    path: Path
    written: set[str] = field(default_factory=set)

    def put(self, data: bytes) -> tuple[str, int]:
        digest = sha256_digest(data)
        blob = self.path / "blobs" / "sha256" / digest.split(":", 1)[1]
        if not blob.exists():
            blob.parent.mkdir(parents=True, exist_ok=True)
            tmp = blob.with_name(blob.name + ".tmp")
            tmp.write_bytes(data)
            tmp.rename(blob)
        return digest, len(data)


def _canonical(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


def write_oci_layout(
    layout: Path,
    tag: str,
    layer_tars: Sequence[bytes],
    *,
    compression: Compression = "gzip",
    cmd: Sequence[str] = ("/bin/sh",),
    env: Sequence[str] = (DEFAULT_PATH,),
    layer_annotations: Sequence[dict[str, str]] | None = None,
) -> BuiltImage:
    """Write an image of the given uncompressed layer tars (bottom first) into an OCI layout,
    tagged `tag` (other tags in the layout are kept)."""
    store = _Layout(layout)
    layout.mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    layers: list[LayerInfo] = []
    descriptors: list[dict[str, object]] = []
    for position, tar_bytes in enumerate(layer_tars):
        digest, size = store.put(compress(tar_bytes, compression))
        info = LayerInfo(digest, size, sha256_digest(tar_bytes), LAYER_TYPES[compression])
        layers.append(info)
        descriptor: dict[str, object] = {
            "mediaType": info.media_type,
            "digest": digest,
            "size": size,
        }
        if layer_annotations is not None and layer_annotations[position]:
            descriptor["annotations"] = dict(layer_annotations[position])
        descriptors.append(descriptor)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": "2023-11-14T22:13:20Z",
        "config": {"Env": list(env), "Cmd": list(cmd)},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [
            {"created": "2023-11-14T22:13:20Z", "created_by": "lazysnap tests"} for _ in layers
        ],
    }
    config_digest, config_size = store.put(_canonical(config))
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,  # stricter registries reject manifests without it
        "config": {"mediaType": CONFIG_TYPE, "digest": config_digest, "size": config_size},
        "layers": descriptors,
    }
    manifest_digest, manifest_size = store.put(_canonical(manifest))
    _set_tag(layout, tag, manifest_digest, manifest_size)
    return BuiltImage(layout, tag, manifest_digest, config_digest, tuple(layers))


def _set_tag(layout: Path, tag: str, digest: str, size: int) -> None:
    index_path = layout / "index.json"
    index: dict[str, object] = {"schemaVersion": 2, "mediaType": INDEX_TYPE, "manifests": []}
    if index_path.exists():
        index = json.loads(index_path.read_text())
    kept = [
        m
        for m in index.get("manifests", [])  # type: ignore[attr-defined]
        if m.get("annotations", {}).get(REF_NAME) != tag
    ]
    kept.append(
        {"mediaType": MANIFEST_TYPE, "digest": digest, "size": size, "annotations": {REF_NAME: tag}}
    )
    index["manifests"] = kept
    index.setdefault("mediaType", INDEX_TYPE)
    tmp = index_path.with_name("index.json.tmp")
    tmp.write_text(json.dumps(index, indent=1))
    tmp.rename(index_path)


def read_layout(layout: Path, tag: str) -> BuiltImage:
    """Describe the image tagged `tag` in an existing OCI layout (e.g. the cached pybig)."""
    try:
        index = json.loads((layout / "index.json").read_text())
    except (OSError, ValueError) as exc:
        raise HarnessError(f"{layout}: not an OCI layout ({exc})") from exc
    entry = next(
        (m for m in index.get("manifests", []) if m.get("annotations", {}).get(REF_NAME) == tag),
        None,
    )
    if entry is None:
        raise HarnessError(f"{layout}: no image tagged {tag!r}")
    blobs = layout / "blobs" / "sha256"
    manifest = json.loads((blobs / entry["digest"].split(":", 1)[1]).read_bytes())
    config = json.loads((blobs / manifest["config"]["digest"].split(":", 1)[1]).read_bytes())
    diff_ids = config["rootfs"]["diff_ids"]
    layers = tuple(
        LayerInfo(layer["digest"], layer["size"], diff_id, layer["mediaType"])
        for layer, diff_id in zip(manifest["layers"], diff_ids, strict=True)
    )
    return BuiltImage(layout, tag, entry["digest"], manifest["config"]["digest"], layers)


def push(
    image: BuiltImage,
    registry_host: str,
    repository: str,
    tag: str | None = None,
    *,
    credentials: tuple[str, str] | None = None,
) -> PushedImage:
    """skopeo copy the layout's image to registry_host/repository:tag over plain http,
    keeping digests (blobs and manifest byte-identical)."""
    pushed = PushedImage(image, registry_host, repository, tag or image.tag)
    argv = ["skopeo", "copy", "--quiet", "--dest-tls-verify=false", "--preserve-digests"]
    if credentials is not None:
        argv += ["--dest-creds", f"{credentials[0]}:{credentials[1]}"]
    argv += [f"oci:{image.layout}:{image.tag}", f"docker://{pushed.reference}"]
    run(argv, f"push {pushed.reference}", timeout=600)
    return pushed


# --- busybox -------------------------------------------------------------------------------

_PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
_GROUP = "root:x:0:\nnogroup:x:65534:\n"


def _busybox_deb(download_dir: Path) -> Path:
    """The busybox-static .deb from apt's cache, else downloaded with `apt-get download`."""
    cached = sorted(glob.glob("/var/cache/apt/archives/busybox-static_*.deb"))
    if cached:
        return Path(cached[-1])
    result = subprocess.run(
        ["apt-get", "download", "busybox-static"],
        cwd=download_dir,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise HarnessError(f"apt-get download busybox-static failed: {result.stderr.strip()}")
    downloaded = sorted(download_dir.glob("busybox-static_*.deb"))
    if not downloaded:
        raise HarnessError(f"apt-get download busybox-static left no .deb in {download_dir}")
    return downloaded[-1]


def busybox_layer_tar(workdir: Path | None = None) -> bytes:
    """A root filesystem tar: static busybox, one symlink per applet, /etc/passwd and group."""
    with tempfile.TemporaryDirectory(prefix="lzs-busybox-", dir=workdir) as tmp:
        scratch = Path(tmp)
        deb = _busybox_deb(scratch)
        run(["dpkg-deb", "-x", str(deb), str(scratch / "x")], f"dpkg-deb -x {deb}")
        binary = scratch / "x" / "bin" / "busybox"
        applets = subprocess.run(
            [str(binary), "--list-full"], capture_output=True, text=True, check=False
        )
        if applets.returncode != 0 or not applets.stdout.strip():
            raise HarnessError(f"{binary} --list-full failed: {applets.stderr.strip()}")
        busybox = binary.read_bytes()
    entries = [
        directory(d)
        for d in (
            "bin",
            "sbin",
            "usr",
            "usr/bin",
            "usr/sbin",
            "etc",
            "root",
            "proc",
            "sys",
            "dev",
            "var",
        )
    ]
    entries += [
        TarEntry("tmp", "dir", mode=0o1777),
        file("bin/busybox", busybox, 0o755),
        file("etc/passwd", _PASSWD),
        file("etc/group", _GROUP),
    ]
    for applet in sorted(set(applets.stdout.split())):
        if applet != "bin/busybox":
            entries.append(symlink(applet, "/bin/busybox"))
    return layer_tar(entries)


def build_busybox(
    layout: Path, tag: str = "latest", compression: Compression = "gzip"
) -> BuiltImage:
    layout.mkdir(parents=True, exist_ok=True)
    return write_oci_layout(
        layout, tag, [busybox_layer_tar(layout.parent)], compression=compression, cmd=("/bin/sh",)
    )
