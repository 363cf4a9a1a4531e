"""Byte streams made of several buffers (a request's iovecs): slicing and zero-filling them, for
the drivers (a driver receives a request's buffers as a list of memoryviews).

Sans-I/O, no locks, callable from any thread. A slice is a ``memoryview`` of the caller's
buffer, never a copy of its bytes.
"""

from __future__ import annotations

_ZEROS = memoryview(bytes(1 << 20))  # sliced without copying


def zero_fill(views):
    """Fill every buffer of ``views`` with zeros."""
    for v in views:
        n = len(v)
        pos = 0
        while pos < n:
            k = min(n - pos, len(_ZEROS))
            v[pos : pos + k] = _ZEROS[:k]
            pos += k


def slice_views(views, skip, length):
    """The part [skip, skip+length) of the byte stream formed by ``views``."""
    if len(views) == 1:
        return [views[0][skip : skip + length]]
    out = []
    for v in views:
        n = len(v)
        if skip >= n:
            skip -= n
            continue
        take = min(n - skip, length)
        out.append(v[skip : skip + take])
        length -= take
        skip = 0
        if not length:
            break
    return out
