"""Signed index builds against both registry kinds: docker-registry 2.8 (signatures found
through the referrers tag schema) and peryx (native OCI 1.1 referrers API). A node's discovery
uses a signed index, refuses it under a key it does not trust; a signing build reuses only
layer cache entries its own key signed.

Every `index build` here signs with the session key (harness/trust.py sets
$LAZYSNAP_SIGN_KEY), as a CI builder with --sign-key would."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from indexer_helpers import CliResult, Target, build_image, push_image, random_layer, unique

from harness.peryx import Peryx
from harness.registry import Registry
from harness.trust import (
    SigningKeys,
    make_keys,
    session_signing_key,
    session_trust_policy,
)
from snapshotter.core.layers import FallbackReason, RemoteLayerUnavailable
from snapshotter.indexer.cache_entry import VariantKey
from snapshotter.indexer.command import SIGN_KEY_ENV
from snapshotter.indexer.layer_cache import cache_tag, publish
from snapshotter.remote.access import RegistryAccess
from snapshotter.remote.credentials import Credentials
from snapshotter.remote.manifest import OCI_MANIFEST
from snapshotter.remote.reference import Reference, Repository
from snapshotter.remote.signatures import (
    SIGNATURE_ANNOTATION,
    SIMPLESIGNING_MEDIA_TYPE,
    find_signatures,
    signature_tag,
)
from snapshotter.source.discover import IndexDiscovery
from snapshotter.source.labels import LayerRequest
from snapshotter.trust import simplesign
from snapshotter.trust.keys import generate_signing_key
from snapshotter.trust.policy import TrustMode, TrustPolicy
from snapshotter.vocabulary.artifact import IndexedLayer

pytestmark = pytest.mark.stack

Index = Callable[..., CliResult]
LAYER = 400 << 10
BUILD_FLAGS = ("--plain-http", "--min-layer-size", "0", "--span-size", "65536")


@pytest.fixture
def native(peryx: Peryx, docker_config: Callable[[Target], None]) -> Target:
    """A namespace on peryx (native referrers API), with the CLI's credentials for it."""
    target = Target(peryx.host, peryx.route, Credentials("lazysnap", peryx.token))
    docker_config(target)
    return target


@pytest.fixture(params=["dist", "native"])
def target(request: pytest.FixtureRequest) -> Target:
    found: Target = request.getfixturevalue(request.param)
    return found


def _discovery(target: Target, trust: TrustPolicy) -> IndexDiscovery:
    return IndexDiscovery(target.client(), RegistryAccess(plain_http=(target.host,)), trust=trust)


def test_a_signed_index_is_used_and_refused_under_another_key(
    lazysnap_index: Index, target: Target, workdir: Path, index_signing_keys: SigningKeys
) -> None:
    image = build_image(workdir, "v1", [random_layer("app", LAYER)])
    repo = f"{target.namespace}/{unique('signed')}"
    with target.client() as client:
        push_image(client, image, target.host, repo, "v1")
    ref = f"{target.host}/{repo}:v1"
    built = lazysnap_index("build", ref, *BUILD_FLAGS)
    assert built.code == 0, built.err
    key_id = session_signing_key().public.key_id
    assert f"signed by key {key_id}" in built.out, built.out
    artifact_digest = built.out.split("pushed ", 1)[1].split()[0]

    with target.client() as client:
        [signature] = find_signatures(client, Reference.parse(ref).repository, artifact_digest)
    # The signature lives where cosign's OCI 1.1 mode puts it: a referrer of the artifact.
    assert signature.where.startswith("referrer ")

    layer = image.layers[0].digest
    request = LayerRequest("chain", ref, image.manifest_digest, layer, (layer,))
    spec = _discovery(target, session_trust_policy()).resolve(request)
    assert spec.blob.digest == layer

    stranger = TrustPolicy(TrustMode.SIGNED, (generate_signing_key().public,))
    with pytest.raises(RemoteLayerUnavailable) as refused:
        _discovery(target, stranger).resolve(request)
    assert refused.value.reason is FallbackReason.UNTRUSTED_INDEX
    message = str(refused.value)
    assert "index not signed by a trusted key" in message
    assert artifact_digest in message and "signature by an untrusted key" in message

    # `index show --key` says what a node trusting that key would decide, and why.
    shown = lazysnap_index("show", ref, "--plain-http", "--key", str(index_signing_keys.public))
    assert shown.code == 0 and f"trusted: signed by key {key_id}" in shown.out, shown.out
    stranger_keys = make_keys(workdir / "stranger")
    shown = lazysnap_index(
        "show", ref, "--plain-http", "--json", "--key", str(stranger_keys.public)
    )
    [platform] = json.loads(shown.out)["platforms"]
    assert platform["artifact"]["trusted"] is False
    assert platform["artifact"]["trust"].startswith("signature by an untrusted key")

    # Building again finds the artifact and its signature by this key: nothing is pushed.
    again = lazysnap_index("build", ref, *BUILD_FLAGS)
    assert again.code == 0, again.err
    assert f"already indexed by {artifact_digest}" in again.out
    assert f"already signed by key {key_id}" in again.out
    with target.client() as client:
        assert len(find_signatures(client, Reference.parse(ref).repository, artifact_digest)) == 1


def test_index_sign_signs_an_existing_unsigned_index(
    lazysnap_index: Index,
    dist: Target,
    workdir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    image = build_image(workdir, "v1", [random_layer("old", LAYER)])
    repo = f"{dist.namespace}/{unique('migrate')}"
    with dist.client() as client:
        push_image(client, image, dist.host, repo, "v1")
    ref = f"{dist.host}/{repo}:v1"
    key_path, trusted = os.environ[SIGN_KEY_ENV], session_trust_policy()
    monkeypatch.delenv(SIGN_KEY_ENV)  # an old build, from before signing
    built = lazysnap_index("build", ref, *BUILD_FLAGS)
    assert built.code == 0 and "signed" not in built.out, built.out
    layer = image.layers[0].digest
    request = LayerRequest("chain", ref, image.manifest_digest, layer, (layer,))
    with pytest.raises(RemoteLayerUnavailable, match="no signature"):
        _discovery(dist, trusted).resolve(request)

    signed = lazysnap_index("sign", ref, "--plain-http", "--sign-key", key_path)
    assert signed.code == 0, signed.err
    assert "signed by key" in signed.out, signed.out
    assert _discovery(dist, trusted).resolve(request).blob.digest == layer
    again = lazysnap_index("sign", ref, "--plain-http", "--sign-key", key_path)
    assert again.code == 0 and "already signed" in again.out, again.out


def test_a_signing_build_does_not_adopt_a_cache_entry_its_key_did_not_sign(
    lazysnap_index: Index, dist: Target, registry: Registry, workdir: Path
) -> None:
    """Whoever can push to the cache repository stores an index under a layer's tag (here: the
    index of another layer, unsigned); a signing build must index the layer from its bytes."""
    decoy = build_image(workdir, "decoy", [random_layer("decoy", LAYER)])
    victim = build_image(workdir, "victim", [random_layer("victim", LAYER)])
    decoy_repo = f"{dist.namespace}/{unique('decoy')}"
    victim_repo = f"{dist.namespace}/{unique('victim')}"
    with dist.client() as client:
        push_image(client, decoy, dist.host, decoy_repo, "v1")
        push_image(client, victim, dist.host, victim_repo, "v1")
    assert lazysnap_index("build", f"{dist.host}/{decoy_repo}:v1", *BUILD_FLAGS).code == 0
    cache = Repository(dist.host, f"{dist.namespace}/lazysnap-index-cache")
    with dist.client() as client:
        decoy_entry = client.get_manifest(
            Reference(cache.registry, cache.name, tag=cache_tag(decoy.layers[0].digest))
        )
        index_blob = decoy_entry.layers[0]
        data = client.get_blob(cache, index_blob.digest)
        # A well-formed entry under the victim layer's tag, stored without the key.
        forged = IndexedLayer(victim.layers[0].digest, index_blob.digest, index_blob.size)
        publish(client, [cache], forged, VariantKey(65536, 2), data)

    offset = registry.log_offset()
    result = lazysnap_index("build", f"{dist.host}/{victim_repo}:v1", *BUILD_FLAGS)
    assert result.code == 0, result.err
    assert "1 layer indexed, 0 reused" in result.out
    assert registry.blob_fetches(since=offset)[victim.layers[0].digest].bytes > 0
    # The entry is stored again, signed: the next image with that layer reuses it.
    other = f"{dist.namespace}/{unique('again')}"
    with dist.client() as client:
        push_image(client, victim, dist.host, other, "v1")
    reused = lazysnap_index("build", f"{dist.host}/{other}:v1", *BUILD_FLAGS)
    assert reused.code == 0 and "0 layers indexed, 1 reused" in reused.out, reused.out


def test_a_signature_in_cosigns_tag_mode_is_found(
    lazysnap_index: Index, dist: Target, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`cosign sign --key` in its default mode: a manifest tagged sha256-<hex>.sig whose layers
    are simple signing payloads with the signature annotation (made here the way cosign lays it
    out: an image config, no subject)."""
    image = build_image(workdir, "v1", [random_layer("tagmode", LAYER)])
    repo = f"{dist.namespace}/{unique('tagmode')}"
    with dist.client() as client:
        push_image(client, image, dist.host, repo, "v1")
    ref = f"{dist.host}/{repo}:v1"
    trusted, key = session_trust_policy(), session_signing_key()
    monkeypatch.delenv(SIGN_KEY_ENV)
    built = lazysnap_index("build", ref, *BUILD_FLAGS)
    assert built.code == 0, built.err
    artifact = built.out.split("pushed ", 1)[1].split()[0]
    repository = Reference.parse(ref).repository
    with dist.client() as client:
        payload = simplesign.payload(str(repository), artifact)
        config = json.dumps({"architecture": "", "os": "", "rootfs": {"type": "layers"}}).encode()
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": client.push_blob(repository, config),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": SIMPLESIGNING_MEDIA_TYPE,
                    "digest": client.push_blob(repository, payload),
                    "size": len(payload),
                    "annotations": {SIGNATURE_ANNOTATION: simplesign.sign(key, payload)},
                }
            ],
        }
        client.push_manifest(
            repository, signature_tag(artifact), json.dumps(manifest).encode(), OCI_MANIFEST
        )
        [found] = find_signatures(client, repository, artifact)
        assert found.where == f"tag {signature_tag(artifact)}"
    layer = image.layers[0].digest
    request = LayerRequest("chain", ref, image.manifest_digest, layer, (layer,))
    assert _discovery(dist, trusted).resolve(request).blob.digest == layer
