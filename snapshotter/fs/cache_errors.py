"""The error of the span cache and its disk reserve (below both, so neither imports the other
for it)."""


class CacheError(ValueError):
    """Bad cache configuration or key; the message names it."""
