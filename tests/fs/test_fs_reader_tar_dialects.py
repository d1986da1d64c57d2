"""Tar dialects real layers can contain, read lazily: a file must read back under the name and with
the bytes that extraction (containerd's archive/tar; here Python's tarfile, which agrees) gives,
or the layer must be refused when it is indexed (it is then pulled whole). Anything else serves
wrong bytes."""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from snapshotter.fs.blob_source import FileBlobSource
from snapshotter.fs.cache import SpanCache
from snapshotter.fs.reader import LayerReader
from snapshotter.index.build import build_layer_index
from snapshotter.index.errors import InvalidLayer
from snapshotter.index.model import EntryType

TAR_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar"


def _gnu_tar(tmp_path: Path, *options: str) -> bytes:
    tar = shutil.which("tar")
    if (
        tar is None
        or b"GNU tar" not in subprocess.run([tar, "--version"], capture_output=True).stdout
    ):
        pytest.skip("needs GNU tar")
    tree = tmp_path / "tree"
    (tree / "d").mkdir(parents=True)
    with open(tree / "d" / "sparse", "wb") as f:  # 3 MiB with two small islands of data
        f.truncate(3 << 20)
        f.seek(1 << 20)
        f.write(b"hello")
        f.seek(3_000_000)
        f.write(b"tail")
    (tree / "d" / "plain").write_bytes(b"plain file\n" * 100)
    out = tmp_path / "layer.tar"
    subprocess.run([tar, *options, "-cf", str(out), "-C", str(tree), "d"], check=True)
    return out.read_bytes()


def _assert_served_as_extracted(tar: bytes, tmp_path: Path) -> None:
    try:
        index = build_layer_index(io.BytesIO(tar), media_type=TAR_MEDIA_TYPE, span_size=1 << 20)
    except InvalidLayer:
        return  # refused: the layer is pulled whole and extracted by containerd
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        extracted = {
            m.name: archive.extractfile(m).read()  # type: ignore[union-attr]
            for m in archive
            if m.isreg()
        }
    blob = tmp_path / "blob"
    blob.write_bytes(tar)
    reader = LayerReader(index, FileBlobSource(str(blob)), SpanCache(tmp_path / "cache", 1 << 30))
    try:
        served = {
            e.name: reader.read(e, 0, e.size) for e in index.entries if e.type is EntryType.REG
        }
    finally:
        reader.close()
    assert sorted(served) == sorted(extracted)
    for name, data in extracted.items():
        assert served[name] == data, name


@pytest.mark.parametrize("pax_format", ["posix", "pax"])
def test_a_gnu_sparse_file_is_served_as_extracted_or_the_layer_is_refused(
    pax_format: str, tmp_path: Path
) -> None:
    _assert_served_as_extracted(_gnu_tar(tmp_path, "--sparse", f"--format={pax_format}"), tmp_path)


def test_an_old_gnu_sparse_file_is_served_as_extracted_or_the_layer_is_refused(
    tmp_path: Path,
) -> None:
    _assert_served_as_extracted(_gnu_tar(tmp_path, "--sparse", "--format=gnu"), tmp_path)


def test_gnu_long_names_are_served_as_extracted(tmp_path: Path) -> None:
    tree = tmp_path / "long"
    deep = tree / ("n" * 120) / ("m" * 120)
    deep.mkdir(parents=True)
    (deep / ("f" * 150)).write_bytes(b"long name\n")
    (tree / "link").symlink_to(deep / ("f" * 150))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as archive:
        archive.add(tree, arcname="long")
    _assert_served_as_extracted(buf.getvalue(), tmp_path)
