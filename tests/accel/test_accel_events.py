"""Webhook bodies -> pushed images: docker distribution envelopes (shapes captured from
docker-registry 2.8 here), Harbor's default and CloudEvents payloads, and what is skipped."""

from __future__ import annotations

import json
from typing import Any

import pytest

from snapshotter.accel.events import PayloadError, PushedImage, parse_delivery

DIGEST = "sha256:" + "ab" * 32
BLOB = "sha256:" + "cd" * 32
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def dist_event(
    *,
    action: str = "push",
    media_type: str = OCI_MANIFEST,
    repository: str = "team/app",
    digest: str = DIGEST,
    tag: str | None = "v1",
    host: str = "127.0.0.1:5000",
    kind: str = "manifests",
) -> dict[str, Any]:
    """One event as docker-registry 2.8 sends it (fields as captured on this machine)."""
    target: dict[str, Any] = {
        "mediaType": media_type,
        "size": 401,
        "digest": digest,
        "length": 401,
        "repository": repository,
        "url": f"http://{host}/v2/{repository}/{kind}/{digest}",
    }
    if tag is not None:
        target["tag"] = tag
    return {
        "id": "e4fcdf85-f8c3-4dcc-99df-ca7847f724f9",
        "timestamp": "2026-11-22T20:51:14.574859847Z",
        "action": action,
        "target": target,
        "request": {"id": "x", "addr": "127.0.0.1:33082", "host": host, "method": "PUT"},
        "actor": {},
        "source": {"addr": "vm:5000", "instanceID": "e643ec6d"},
    }


def envelope(*events: Any) -> bytes:
    return json.dumps({"events": list(events)}).encode()


def test_distribution_manifest_push_becomes_one_image() -> None:
    delivery = parse_delivery(envelope(dist_event()))
    assert delivery.images == (
        PushedImage("127.0.0.1:5000", "team/app", DIGEST, "v1", OCI_MANIFEST, "distribution"),
    )
    assert delivery.images[0].reference == f"127.0.0.1:5000/team/app@{DIGEST}"
    assert str(delivery.images[0]) == f"127.0.0.1:5000/team/app:v1@{DIGEST}"


def test_blob_pushes_pulls_and_deletes_are_skipped() -> None:
    delivery = parse_delivery(
        envelope(
            dist_event(media_type="application/octet-stream", digest=BLOB, kind="blobs"),
            dist_event(action="pull"),
            dist_event(action="delete"),
            dist_event(media_type="application/vnd.oci.image.index.v1+json", tag=None),
        )
    )
    [image] = delivery.images
    assert image.tag is None and image.media_type == "application/vnd.oci.image.index.v1+json"
    reasons = [skip.reason for skip in delivery.skipped]
    assert "not an image manifest" in reasons[0]
    assert "'pull', not a push" in reasons[1]
    assert "'delete', not a push" in reasons[2]
    assert not any(skip.own or skip.malformed for skip in delivery.skipped)


@pytest.mark.parametrize(
    ("repository", "tag", "why"),
    [
        ("team/lazysnap-index-cache", "layer-sha256-" + "ef" * 32, "cache repository"),
        ("lazysnap-index-cache", None, "cache repository"),
        ("team/app", "sha256-" + "ef" * 32, "referrers tag-schema index"),
        ("team/app", "layer-sha256-" + "ef" * 32, "cache entry"),
        ("team/my-cache", "v1", "cache repository"),  # the --cache-repo given
    ],
)
def test_lazysnaps_own_pushes_are_skipped(repository: str, tag: str | None, why: str) -> None:
    delivery = parse_delivery(
        envelope(dist_event(repository=repository, tag=tag)), cache_repos=["team/my-cache"]
    )
    assert delivery.images == ()
    [skip] = delivery.skipped
    assert skip.own and why in skip.reason


def test_registry_host_comes_from_the_url_and_never_keeps_user_info() -> None:
    event = dist_event()
    event["target"]["url"] = f"https://user:pw@reg.example.com:8443/v2/team/app/manifests/{DIGEST}"
    [image] = parse_delivery(envelope(event)).images
    assert image.registry == "reg.example.com:8443"
    del event["target"]["url"]
    [image] = parse_delivery(envelope(event)).images
    assert image.registry == "127.0.0.1:5000"  # request.host


def test_a_malformed_event_is_skipped_and_the_rest_still_counts() -> None:
    bad_digest = dist_event(digest="sha256:nothex")
    no_repo = dist_event()
    del no_repo["target"]["repository"]
    delivery = parse_delivery(
        envelope(bad_digest, "not an object", no_repo, dist_event(repository="team/ok"))
    )
    assert [image.repository for image in delivery.images] == ["team/ok"]
    malformed = [skip for skip in delivery.skipped if skip.malformed]
    assert len(malformed) == 3
    assert "events[0].target.digest" in malformed[0].reason
    assert "events[1] is not an object" in malformed[1].reason
    assert "events[2].target.repository is missing" in malformed[2].reason


def test_a_hostile_repository_name_is_refused_by_name() -> None:
    delivery = parse_delivery(envelope(dist_event(repository="../../etc")))
    [skip] = delivery.skipped
    assert skip.malformed and "repository" in skip.reason


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"\xff\xfe", "not JSON"),
        (b"[]", "not a JSON object"),
        (b'{"hello": 1}', "neither 'events'"),
        (b'{"events": {}}', "'events' is not a list"),
        (json.dumps({"events": [{}] * 1001}).encode(), "limit"),
    ],
)
def test_bodies_that_are_no_notification_are_refused(body: bytes, message: str) -> None:
    with pytest.raises(PayloadError, match=message):
        parse_delivery(body)


def harbor(kind: str = "PUSH_ARTIFACT", key: str = "event_data", **resource: str) -> bytes:
    res = {
        "digest": DIGEST,
        "tag": "latest",
        "resource_url": "harbor.example.com/library/nginx:latest",
        **resource,
    }
    data = {
        "resources": [res],
        "repository": {"name": "nginx", "namespace": "library", "repo_full_name": "library/nginx"},
    }
    return json.dumps(
        {"type": kind, "occur_at": 1700000000, "operator": "admin", key: data}
    ).encode()


def test_harbor_push_artifact() -> None:
    [image] = parse_delivery(harbor()).images
    assert image == PushedImage(
        "harbor.example.com", "library/nginx", DIGEST, "latest", None, "harbor"
    )


def test_harbor_cloudevents_push() -> None:
    [image] = parse_delivery(harbor("harbor.artifact.pushed", "data")).images
    assert image.repository == "library/nginx" and image.digest == DIGEST


def test_harbor_digest_may_come_from_the_resource_url() -> None:
    body = harbor(digest="", tag="", resource_url=f"harbor.example.com/library/nginx@{DIGEST}")
    [image] = parse_delivery(body).images
    assert image.digest == DIGEST and image.tag is None


def test_harbor_other_events_and_own_pushes_are_skipped() -> None:
    assert parse_delivery(harbor("PULL_ARTIFACT")).images == ()
    own = harbor(resource_url="harbor.example.com/library/lazysnap-index-cache:x")
    delivery = parse_delivery(own)
    assert delivery.images == () and delivery.skipped[0].own


def test_an_acceld_style_request_names_only_a_tag_and_is_resolved_later() -> None:
    [image] = parse_delivery(harbor(digest="", tag="")).images
    assert image.unresolved and image.tag == "latest" and image.repository == "library/nginx"
    untagged = harbor(digest="", tag="", resource_url="harbor.example.com/library/nginx")
    delivery = parse_delivery(untagged)
    assert delivery.images == () and delivery.skipped[0].malformed
