"""The one gatekeeper of the virtio accelerator: only this module imports ``vblock.virtio._vring``.

It checks at import that the accelerator is there and was built from the same sources as this
package (a missing or stale build fails here, with what to do, not mysteriously later), and it is
where ``vblock.virtio`` gets what it needs from native code besides the descriptor walker
(``lib.vring_blk_frame``, contract in ``native/vring.h``):

- ``fence_acquire`` / ``fence_release`` / ``fence_full``: CPU memory fences (C11
  ``atomic_thread_fence``) for rings shared with a driver that runs concurrently, installed at the
  split and packed queues' ordering points by :func:`vblock.virtio.queue.use_native_fences`;
- :func:`buffer_address`: the address of a buffer, for the pointers the walker is given.

Nothing here holds state; every name may be used from any thread.
"""

from __future__ import annotations

try:
    from vblock.virtio._vring import ffi, lib
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        f"the virtio accelerator vblock.virtio._vring cannot be imported ({exc}): "
        "install vblock with its native parts (pip install -e .)"
    ) from exc

#: The accelerator version this package expects (native/vring.h VRING_VERSION).
EXPECTED_VERSION = "2"

_built = ffi.string(lib.vring_version()).decode()
if _built != EXPECTED_VERSION:  # pragma: no cover - only with a stale build
    raise ImportError(
        f"vblock.virtio._vring was built from accelerator version {_built}, this package needs "
        f"{EXPECTED_VERSION}: reinstall vblock (pip install -e .)"
    )

__all__ = [
    "ffi",
    "lib",
    "EXPECTED_VERSION",
    "buffer_address",
    "fence_acquire",
    "fence_release",
    "fence_full",
]

fence_acquire = lib.vring_fence_acquire
fence_release = lib.vring_fence_release
fence_full = lib.vring_fence_full

_from_buffer = ffi.from_buffer
_cast = ffi.cast
_CHAR_ARRAY = ffi.typeof("char[]")  # ctype objects: no type parsing per call
_UINTPTR = ffi.typeof("uintptr_t")


def buffer_address(view):
    """The address of the first byte of a contiguous buffer (read-only buffers included), as an
    int. The address is valid while ``view`` (or what it exports) lives and is not resized: the
    caller keeps it so."""
    return int(_cast(_UINTPTR, _from_buffer(_CHAR_ARRAY, view, False)))
