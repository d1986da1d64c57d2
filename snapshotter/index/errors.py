"""Errors of the index package. All derive from IndexFormatError so callers can catch one type."""

from __future__ import annotations


class IndexFormatError(Exception):
    """Base class: something about a layer, an index or a span is not acceptable."""


class InvalidLayer(IndexFormatError):
    """The layer blob cannot be indexed (corrupt, hostile, or not randomly accessible)."""


class InvalidIndex(IndexFormatError):
    """Index bytes are malformed or describe something impossible; never trust them then."""


class SpanVerificationError(IndexFormatError):
    """Fetched span bytes do not match the digests recorded in the index."""
