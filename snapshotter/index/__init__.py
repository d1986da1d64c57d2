"""The lazysnap layer index: data model, encoding, building from a byte stream. No I/O here:
bytes in, objects out (the builder reads from a file-like object the caller supplies)."""
