"""Files in tests: one digest to prove a file was left unchanged (or came out equal)."""

from __future__ import annotations

import hashlib


def digest(path) -> str:
    """SHA-256 of the whole file at ``path`` (str or path-like), read in 1 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
