"""Shared helpers for the block-layer tests: opening each kind of image the same way."""

from __future__ import annotations

import hashlib
import os

import vblock

#: (id, open keywords) of every configuration the generic tests run against.
CONFIGS = [
    ("raw-none", {"format": "raw", "cache": "none"}),
    ("raw-writeback", {"format": "raw", "cache": "writeback"}),
    ("memory", {"format": "memory"}),
]


def make_image(scratch, name: str, size: int, config: dict, content: bytes | None = None):
    """Open a fresh image of ``size`` bytes for ``config`` (a CONFIGS entry's keywords)."""
    if config["format"] == "memory":
        img = vblock.open_image(None, size=size, **config)
        if content:
            img.write(0, content)
        return img
    path = os.path.join(scratch, name)
    with open(path, "wb") as f:
        if content:
            f.write(content)
        f.truncate(size)
    return vblock.open_image(path, **config)


def digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()
