"""The pure part of a pull: chain IDs, GC labels and the snapshot labels lazysnap reads."""

from __future__ import annotations

import hashlib
import json

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.message import Message

from snapshotter.pull.plan import (
    LABEL_MAX,
    ImageFormatError,
    chain_ids,
    child_gc_labels,
    distribution_source_label,
    image_layers,
    image_layers_label,
    layer_steps,
    parse_diff_ids,
)
from snapshotter.remote.manifest import Descriptor, Manifest
from snapshotter.source.labels import parse_layer_request
from snapshotter.vocabulary.labels import CRI_IMAGE_LAYERS
from tests.pull.cri import parse_pull_image_response, pull_image_request

GZ = "application/vnd.oci.image.layer.v1.tar+gzip"
CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def digest(n: int) -> str:
    return "sha256:" + hashlib.sha256(str(n).encode()).hexdigest()


def test_chain_ids_follow_image_spec_identity() -> None:
    d0, d1, d2 = digest(0), digest(1), digest(2)
    c1 = "sha256:" + hashlib.sha256(f"{d0} {d1}".encode()).hexdigest()
    c2 = "sha256:" + hashlib.sha256(f"{c1} {d2}".encode()).hexdigest()
    assert chain_ids([d0, d1, d2]) == [d0, c1, c2]


def test_image_layers_label_keeps_as_many_digests_as_fit_the_label_limit() -> None:
    digests = [digest(i) for i in range(100)]  # 100 * 72 bytes: far over 4096
    value = image_layers_label(digests)
    kept = value.split(",")
    assert kept == digests[: len(kept)]
    assert len(CRI_IMAGE_LAYERS) + len(value) <= LABEL_MAX
    # one more digest would not have fitted
    assert len(CRI_IMAGE_LAYERS) + len(value) + 1 + len(digests[len(kept)]) > LABEL_MAX


def test_gc_labels_number_each_kind_separately_like_containerd() -> None:
    children = [
        Descriptor(CONFIG, digest(0), 1),
        Descriptor(GZ, digest(1), 1),
        Descriptor(GZ, digest(2), 1),
    ]
    assert child_gc_labels(children) == {
        "containerd.io/gc.ref.content.config": digest(0),
        "containerd.io/gc.ref.content.l.0": digest(1),
        "containerd.io/gc.ref.content.l.1": digest(2),
    }
    manifests = [Descriptor(OCI_MANIFEST, digest(i), 1) for i in range(2)]
    assert child_gc_labels(manifests) == {
        "containerd.io/gc.ref.content.m.0": digest(0),
        "containerd.io/gc.ref.content.m.1": digest(1),
    }


def test_layer_steps_carry_labels_the_snapshotter_parses_back() -> None:
    layers = [
        Descriptor(GZ, digest(10), 5, {"containerd.io/snapshot/x": "kept", "other": "dropped"}),
        Descriptor(GZ, digest(11), 6),
    ]
    diff_ids = [digest(20), digest(21)]
    steps = layer_steps("reg/img:1", digest(30), digest(31), layers, diff_ids)
    chains = chain_ids(diff_ids)
    assert [s.chain_id for s in steps] == chains
    assert [s.parent for s in steps] == ["", chains[0]]
    assert steps[0].labels["containerd.io/snapshot/x"] == "kept"
    assert "other" not in steps[0].labels
    request = parse_layer_request(steps[1].labels)
    assert request.target == chains[1]
    assert request.image_ref == "reg/img:1"
    assert request.manifest_digest == digest(30)
    assert request.layer_digest == digest(11)
    assert request.following_layers == (digest(11),)
    assert request.layer_size == 6
    assert parse_layer_request(steps[0].labels).following_layers == (digest(10), digest(11))


def test_layer_count_mismatch_names_manifest_and_config() -> None:
    with pytest.raises(ImageFormatError, match=r"manifest sha256:.* 1 layers.* 2 diff_ids"):
        layer_steps("r/i", digest(1), digest(2), [Descriptor(GZ, digest(3), 1)], [digest(4)] * 2)


def test_bad_config_and_foreign_layer_are_clear_errors() -> None:
    with pytest.raises(ImageFormatError, match="config sha256:abc is not valid JSON"):
        parse_diff_ids(b"{nope", "config sha256:abc")
    with pytest.raises(ImageFormatError, match=r"no rootfs\.diff_ids"):
        parse_diff_ids(json.dumps({"rootfs": {}}).encode(), "config X")
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": CONFIG, "digest": digest(1), "size": 2},
        "layers": [
            {"mediaType": "application/vnd.lazysnap.index.layer.v1", "digest": digest(2), "size": 3}
        ],
    }
    manifest = Manifest(json.dumps(doc).encode(), digest(9), OCI_MANIFEST)
    with pytest.raises(ImageFormatError, match=f"layer {digest(2)} has media type"):
        image_layers(manifest)


def test_distribution_source_merges_repositories() -> None:
    first = distribution_source_label("reg:5000", "a/b")
    assert first == {"containerd.io/distribution.source.reg:5000": "a/b"}
    again = distribution_source_label("reg:5000", "a/b", first)
    assert again == first
    assert distribution_source_label("reg:5000", "c", first) == {
        "containerd.io/distribution.source.reg:5000": "a/b,c"
    }


def _cri_messages() -> tuple[type[Message], type[Message]]:
    """PullImageRequest/ImageSpec built from a descriptor by protobuf itself, to check our
    hand encoding against the real library."""
    fdp = descriptor_pb2.FileDescriptorProto(name="cri_test.proto", package="runtime.v1")
    spec = fdp.message_type.add(name="ImageSpec")
    spec.field.add(name="image", number=1, type=9, label=1)  # TYPE_STRING, LABEL_OPTIONAL
    req = fdp.message_type.add(name="PullImageRequest")
    req.field.add(name="image", number=1, type=11, label=1, type_name=".runtime.v1.ImageSpec")
    resp = fdp.message_type.add(name="PullImageResponse")
    resp.field.add(name="image_ref", number=1, type=9, label=1)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return (
        message_factory.GetMessageClass(pool.FindMessageTypeByName("runtime.v1.PullImageRequest")),
        message_factory.GetMessageClass(pool.FindMessageTypeByName("runtime.v1.PullImageResponse")),
    )


def test_cri_pull_request_encoding_matches_protobuf() -> None:
    request_cls, response_cls = _cri_messages()
    image = "127.0.0.1:5000/" + "x" * 200 + ":latest"  # > 127 bytes: multi-byte varint length
    parsed = request_cls.FromString(pull_image_request(image))
    assert parsed.image.image == image  # type: ignore[attr-defined]
    # ParseDict, not the keyword constructor: types-protobuf's Message stubs changed what
    # __init__ accepts (7.35.1.20261122 takes no field keywords); this types under both.
    response = json_format.ParseDict({"imageRef": "sha256:" + "ab" * 32 + "é" * 70}, response_cls())
    answer = response.SerializeToString()
    assert parse_pull_image_response(answer) == "sha256:" + "ab" * 32 + "é" * 70
