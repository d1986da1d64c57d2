import pytest

from snapshotter.source.labels import LabelError, parse_layer_request

LAYER = "sha256:" + "a" * 64
NEXT = "sha256:" + "b" * 64


def test_cri_labels_name_the_layer() -> None:
    req = parse_layer_request(
        {
            "containerd.io/snapshot.ref": "sha256:chain",
            "containerd.io/snapshot/cri.image-ref": "127.0.0.1:5000/test/bb:latest",
            "containerd.io/snapshot/cri.manifest-digest": "sha256:" + "c" * 64,
            "containerd.io/snapshot/cri.layer-digest": LAYER,
            "containerd.io/snapshot/cri.image-layers": f"{LAYER},{NEXT}",
        }
    )
    assert req.target == "sha256:chain"
    assert req.image_ref == "127.0.0.1:5000/test/bb:latest"
    assert req.manifest_digest == "sha256:" + "c" * 64
    assert req.following_layers == (LAYER, NEXT)


def test_stargz_labels_are_accepted_too() -> None:
    req = parse_layer_request(
        {
            "containerd.io/snapshot.ref": "sha256:chain",
            "containerd.io/snapshot/remote/stargz.reference": "example.com/app:1",
            "containerd.io/snapshot/remote/stargz.digest": LAYER,
        }
    )
    assert (req.image_ref, req.layer_digest, req.manifest_digest) == (
        "example.com/app:1",
        LAYER,
        "",
    )


@pytest.mark.parametrize(
    "labels, message",
    [
        ({}, "snapshot.ref"),
        ({"containerd.io/snapshot.ref": "x"}, "disable_snapshot_annotations"),
        (
            {
                "containerd.io/snapshot.ref": "x",
                "containerd.io/snapshot/cri.image-ref": "r",
                "containerd.io/snapshot/cri.layer-digest": "md5:abc",
            },
            "not a sha256",
        ),
    ],
)
def test_labels_without_a_layer_say_why(labels: dict[str, str], message: str) -> None:
    with pytest.raises(LabelError, match=message):
        parse_layer_request(labels)


def test_layer_size_from_lazysnap_pull_is_read_and_a_bad_one_ignored() -> None:
    base = {
        "containerd.io/snapshot.ref": "sha256:chain",
        "containerd.io/snapshot/cri.image-ref": "example.com/app:1",
        "containerd.io/snapshot/cri.layer-digest": LAYER,
    }
    sized = {**base, "containerd.io/snapshot/remote/lazysnap.layer-size": "1048576"}
    assert parse_layer_request(sized).layer_size == 1048576
    for bad in ("", "-5", "12k", "1e9"):
        labels = {**base, "containerd.io/snapshot/remote/lazysnap.layer-size": bad}
        assert parse_layer_request(labels).layer_size is None
    assert parse_layer_request(base).layer_size is None
