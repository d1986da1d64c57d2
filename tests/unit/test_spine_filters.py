"""containerd's filter syntax, on a plain field table (the same cases containerd's filter_test.go
exercises: quoting, escapes, regexes, presence, OR of filters and AND within one)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from snapshotter.core.errors import InvalidArgument
from snapshotter.core.filters import parse_all

OBJECTS: dict[str, dict[str, str]] = {
    "alpine": {"name": "alpine", "labels.a": "1", "labels.b": "x y"},
    "busybox": {"name": "busybox", "labels.a": "2", "labels.odd/key": "v"},
    "debian": {"name": "debian", "labels.with.dots": "yes"},
    "empty": {"name": ""},
}


def matching(*filters: str) -> set[str]:
    matcher = parse_all(filters)

    def adaptor_for(fields: dict[str, str]):  # type: ignore[no-untyped-def]
        def lookup(path: Sequence[str]) -> tuple[str, bool]:
            key = ".".join(path)  # labels.<k> joins back the same way
            return fields.get(key, ""), key in fields

        return lookup

    return {name for name, fields in OBJECTS.items() if matcher.match(adaptor_for(fields))}


def test_no_filter_or_an_empty_one_matches_everything() -> None:
    assert matching() == set(OBJECTS)
    assert matching("") == set(OBJECTS)


def test_comma_is_and_repeated_filters_are_or() -> None:
    assert matching("labels.a==1,name==alpine") == {"alpine"}
    assert matching("labels.a==1,name==busybox") == set()
    assert matching("name==alpine", "name==debian") == {"alpine", "debian"}


def test_presence_and_inequality_of_absent_fields() -> None:
    assert matching("labels.a") == {"alpine", "busybox"}
    assert matching("labels.a!=1") == {"busybox", "debian", "empty"}  # absent counts as ""
    assert matching('name==""') == {"empty"}  # a quoted empty value
    assert matching("name!=alpine,name!=busybox,name!=debian") == {"empty"}


def test_quoted_fields_and_values() -> None:
    assert matching('labels."odd/key"==v') == {"busybox"}
    assert matching('labels.b=="x y"') == {"alpine"}
    assert matching('labels.b=="x\\x20y"') == {"alpine"}
    assert matching("labels.with.dots==yes") == {"debian"}  # dotted paths join back


def test_regex_values_with_alternative_quotes() -> None:
    assert matching("name~=^b") == {"busybox"}
    assert matching("name~=/ine$/") == {"alpine"}
    assert matching("name~=|^[ad]|") == {"alpine", "debian"}
    assert matching("name~=[") == set()  # a bad regex matches nothing, like Go's


@pytest.mark.parametrize(
    "bad",
    [
        "name==",
        "name=",
        "name<>x",
        "==x",
        "name==x,",
        "name==x ,name==y",
        "name==/x/",  # / quotes only after ~=
        'name=="unterminated',
        'name=="bad\\q escape"',
        "labels.odd/key==v",
        "na-me==x",
        "name==x\x00",
    ],
)
def test_malformed_filters_are_invalid_arguments(bad: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        parse_all([bad])
    assert repr(bad) in str(raised.value)
