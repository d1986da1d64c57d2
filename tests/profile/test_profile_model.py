"""The startup profile blob: deterministic bytes, hostile input refused with the field named."""

from __future__ import annotations

import pytest

from snapshotter.profile.model import (
    ProfileEntry,
    ProfileError,
    StartupProfile,
    decode_profile,
    encode_profile,
)

LAYER = "sha256:" + "ab" * 32


def test_profile_blob_round_trips_and_is_deterministic() -> None:
    profile = StartupProfile(
        (ProfileEntry(LAYER, "usr/bin/python3"), ProfileEntry(LAYER, "caf\u00e9/x")), "python3"
    )
    data = encode_profile(profile)
    assert decode_profile(data) == profile
    assert encode_profile(decode_profile(data)) == data


@pytest.mark.parametrize(
    ("data", "named"),
    [
        (b"\xff", "not JSON"),
        (b"[]", "not a JSON object"),
        (b'{"version":3,"entries":[]}', "version 3"),
        (b'{"version":1}', "entries"),
        (b'{"version":1,"entries":[],"extra":1}', "unknown keys"),
        (b'{"version":1,"entries":[["sha256:00","a"]]}', "entries[0]"),
        (b'{"version":1,"entries":[["' + LAYER.encode() + b'","../etc/passwd"]]}', "entries[0]"),
        (b'{"version":1,"entries":[["' + LAYER.encode() + b'","/abs"]]}', "entries[0]"),
        (b'{"version":1,"entries":[["' + LAYER.encode() + b'"]]}', "entries[0]"),
    ],
)
def test_hostile_profiles_are_refused_naming_the_field(data: bytes, named: str) -> None:
    with pytest.raises(ProfileError, match=named.replace("[", r"\[").replace("]", r"\]")):
        decode_profile(data, "profile sha256:x")
