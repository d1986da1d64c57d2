import io
import tarfile

import pytest

from snapshotter.index.build import build_layer_index
from snapshotter.index.errors import InvalidLayer


def test_a_pax_gnu_sparse_entry_refuses_the_layer_naming_the_entry() -> None:
    # GNU tar --sparse --format=pax stores a packed map + data under a placeholder name; read
    # as a plain file it would serve wrong bytes, so the layer must be pulled whole instead.
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as archive:
        info = tarfile.TarInfo("d/GNUSparseFile.0/sparse")
        info.size = 5
        info.pax_headers = {
            "GNU.sparse.major": "1",
            "GNU.sparse.minor": "0",
            "GNU.sparse.name": "d/sparse",
            "GNU.sparse.realsize": "3145728",
        }
        archive.addfile(info, io.BytesIO(b"hello"))
    with pytest.raises(InvalidLayer, match=r"GNUSparseFile.0/sparse.*GNU sparse"):
        build_layer_index(
            io.BytesIO(buf.getvalue()), media_type="application/vnd.oci.image.layer.v1.tar"
        )
