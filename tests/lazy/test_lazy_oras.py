"""An index published as an ORAS artifact manifest (`blobs` instead of `layers`), found through
the legacy ORAS referrers endpoint, is read like an OCI artifact: `index show` lists its
layers as indexed and a pull mounts them lazily.

docker-registry 2.8 has neither that endpoint nor the ORAS manifest type, and no installable
registry here offers them, so a small proxy in front of the real session registry answers
those two requests (the referrers list and the ORAS manifest) and forwards everything else:
the image, the index blobs and every layer read come from the real registry."""

from __future__ import annotations

import hashlib
import json
from http.server import BaseHTTPRequestHandler

import pytest

from harness.images import MANIFEST_TYPE
from harness.trust import sign_pushed
from snapshotter.remote.client import RegistryClient
from snapshotter.remote.hosts import HostsConfig
from snapshotter.remote.manifest import ORAS_ARTIFACT_MANIFEST, sha256_digest
from snapshotter.remote.reference import Reference
from snapshotter.remote.referrers import find_referrers
from snapshotter.vocabulary.artifact import ARTIFACT_TYPE
from tests.lazy.lazy_helpers import LazyStack, build_data_image, unique_name
from tests.source.gated_proxy import GatedProxy

pytestmark = pytest.mark.stack


class OrasProxy(GatedProxy):
    """The real registry, plus the ORAS referrers endpoint and manifest for one subject."""

    def __init__(self, upstream: str, repository: str, subject: str, manifest: bytes) -> None:
        super().__init__(upstream)
        self.oras_digest = sha256_digest(manifest)
        self.canned = {
            f"/oras/artifacts/v1/{repository}/manifests/{subject}/referrers": json.dumps(
                {
                    "references": [
                        {
                            "mediaType": ORAS_ARTIFACT_MANIFEST,
                            "digest": self.oras_digest,
                            "size": len(manifest),
                            "artifactType": ARTIFACT_TYPE,
                        }
                    ]
                }
            ).encode(),
            f"/v2/{repository}/manifests/{self.oras_digest}": manifest,
        }

    def _forward(
        self, handler: BaseHTTPRequestHandler
    ) -> tuple[int, list[tuple[str, str]], bytes, int]:
        body = self.canned.get(handler.path.split("?", 1)[0])
        if body is None:
            return super()._forward(handler)
        kind = (
            ORAS_ARTIFACT_MANIFEST if "/manifests/sha256:" in handler.path else "application/json"
        )
        headers = [("Content-Type", kind), ("Docker-Content-Digest", sha256_digest(body))]
        return 200, headers, body, len(body)


def test_an_index_in_an_oras_artifact_manifest_is_used(stack: LazyStack) -> None:
    image = build_data_image(
        stack.workdir / "oras", {"hello": 1000, "big": 200_000}, one_layer=True
    )
    source = stack.push(image.built, unique_name("test/oras-src"))
    stack.index_build(source.reference)
    target = stack.push(image.built, unique_name("test/oras"))  # no OCI index artifact here
    manifest_digest = image.built.manifest_digest
    with RegistryClient(HostsConfig(plain_http=[stack.registry.host])) as client:
        src = Reference.parse(source.reference)
        [artifact] = find_referrers(
            client, src.repository, manifest_digest, ARTIFACT_TYPE
        ).descriptors
        blobs = client.get_manifest(src.with_digest(artifact.digest)).json()["layers"]
        for blob in blobs:  # the index (and windows) blobs, beside the image in its repository
            client.push_blob(
                Reference.parse(target.reference).repository,
                client.get_blob(src.repository, blob["digest"]),
            )
    manifest_path = image.built.layout / "blobs" / "sha256" / manifest_digest.split(":")[1]
    oras_manifest = json.dumps(
        {
            "mediaType": ORAS_ARTIFACT_MANIFEST,
            "artifactType": ARTIFACT_TYPE,
            "blobs": blobs,
            "subject": {
                "mediaType": MANIFEST_TYPE,
                "digest": manifest_digest,
                "size": manifest_path.stat().st_size,
            },
        }
    ).encode()
    with RegistryClient(HostsConfig(plain_http=[stack.registry.host])) as client:
        # Signed by the key the daemon trusts, as `index sign` would: a signature is a referrer
        # of the artifact's digest, whatever kind of manifest the artifact is.
        sign_pushed(client, Reference.parse(target.reference).repository, oras_manifest)
    repository = Reference.parse(target.reference).repository.name
    proxy = OrasProxy(stack.registry.host, repository, manifest_digest, oras_manifest).start()
    hosts = stack.containerd.hosts_dir / proxy.host
    try:
        reference = f"{proxy.host}/{repository}:latest"
        shown = stack.lazysnap("index", "show", "--plain-http", reference).stdout
        assert "found by oras" in shown, shown
        [row] = [line for line in shown.splitlines() if image.data_layer in line]
        assert "not indexed" not in row and "unreadable" not in row, shown
        assert "warning" not in shown, shown

        hosts.mkdir()  # the daemon reads containerd's hosts dir (and sees a new file at once)
        (hosts / "hosts.toml").write_text(f'server = "http://{proxy.host}"\n')
        pulled = stack.pull(reference)
        assert (pulled.lazy, pulled.pulled) == (1, 0), pulled.stdout
        output = stack.run_ok(reference, "sha256sum", "/data/hello", "/data/big")
        for path, data in image.files.items():
            assert f"{hashlib.sha256(data).hexdigest()}  /{path}" in output, output
    finally:
        if hosts.exists():
            (hosts / "hosts.toml").unlink()
            hosts.rmdir()
        proxy.stop()
