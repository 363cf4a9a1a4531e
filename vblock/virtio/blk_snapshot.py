"""Snapshots of a virtio-blk device: the plain-value state ``VirtioBlk.save_state()`` returns,
and how ``VirtioBlk(..., state=saved)`` continues from it.

Contract. :func:`save` captures the negotiated state (features, status, config generation,
write-cache mode) and every queue's ring addresses, size, indices, enabled flag and event-index
state as JSON-serialisable ints and bools; guest memory (the rings themselves, the buffers) is the
emulator's to save, and transport registers are not part of it. It runs on any thread, takes the
device's drain lock without waiting, and raises ``RuntimeError`` instead of saving while a queue
is being drained or a request is in flight. :func:`restore` runs once, from ``VirtioBlk.__init__``
on a fresh device over the same guest memory, and raises ``ValueError`` (naming the field) for a
state that is not from ``save_state()``, does not match this device, or does not fit its memory.

These functions belong to ``VirtioBlk``: they read and set its private state (status, features,
write-cache mode, queues, drain lock) as its own methods would.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vblock.errors import GuestError
from vblock.virtio.spec import FEATURES_OK

if TYPE_CHECKING:
    from vblock.virtio.blk import VirtioBlk

__all__ = ["save", "restore"]

_SAVED_STATE_VERSION = 1

# What save keeps of each ring; the first five are its configuration, the rest its indices and
# event-index state.
_RING_CONFIG = ("size", "desc_addr", "driver_addr", "device_addr", "ready")
_SPLIT_FIELDS = (*_RING_CONFIG, "event_idx", "next_avail", "next_used", "signalled_used")
_PACKED_FIELDS = (
    *_RING_CONFIG,
    "event_idx",
    "next_avail",
    "avail_wrap",
    "avail_pos",
    "next_used",
    "used_wrap",
    "used_pos",
    "signalled_pos",
)


def save(dev: VirtioBlk) -> dict[str, Any]:
    """``dev.save_state()`` (documented there)."""
    if not dev._drain_lock.acquire(False):
        raise RuntimeError("cannot save the device state during a queue drain: quiesce first")
    try:
        busy = sum(dq.popped - dq.published for dq in dev._queues if not dq.dead)
        if busy:
            raise RuntimeError(
                f"cannot save the device state with {busy} requests in flight: stop the vCPUs,"
                " then wait_idle() (callback delivery) or poll() until idle (poll delivery)"
            )
        queues = []
        for dq in dev._queues:
            q = dq.ring
            fields = _PACKED_FIELDS if q.packed else _SPLIT_FIELDS
            queues.append({"packed": q.packed, **{name: getattr(q, name) for name in fields}})
        return {
            "version": _SAVED_STATE_VERSION,
            "num_queues": dev.num_queues,
            "queue_size_max": dev.queue_size_max,
            "device_features": dev.device_features,
            "driver_features": dev.driver_features,
            "status": dev._status,
            "config_generation": dev.config_generation,
            "writeback": dev._writeback,
            "queues": queues,
        }
    finally:
        dev._drain_lock.release()


def restore(dev: VirtioBlk, state: dict) -> None:
    """Continue from ``save_state()``'s dict (a fresh device, over the same guest memory)."""
    try:
        if state["version"] != _SAVED_STATE_VERSION:
            raise ValueError(f"state version {state['version']!r} is not 1")
        for name in ("num_queues", "queue_size_max", "device_features"):
            if state[name] != getattr(dev, name):
                mine = getattr(dev, name)
                raise ValueError(f"state has {name} {state[name]:#x}, this device {mine:#x}")
        if len(state["queues"]) != dev.num_queues:
            raise ValueError(f"state has {len(state['queues'])} queues, not {dev.num_queues}")
        status = state["status"]
        dev.driver_features = state["driver_features"]
        if status & FEATURES_OK and not dev._accept_features():
            raise ValueError(f"state's driver features {dev.driver_features:#x} are refused")
        dev._status = status
        dev.config_generation = state["config_generation"]
        dev._writeback = bool(state["writeback"])
        for index, saved in enumerate(state["queues"]):
            q = dev._queues[index].ring
            if bool(saved["packed"]) != q.packed:
                raise ValueError(f"state's queue {index} ring type does not match its features")
            q.size = saved["size"]
            q.desc_addr, q.driver_addr, q.device_addr = (
                saved["desc_addr"],
                saved["driver_addr"],
                saved["device_addr"],
            )
            if saved["ready"]:
                dev.set_queue_ready(index, True)  # RingError if the rings are not in memory
                for name in _PACKED_FIELDS if q.packed else _SPLIT_FIELDS:
                    if name not in _RING_CONFIG:
                        setattr(q, name, saved[name])
    except (KeyError, TypeError) as exc:
        raise ValueError(f"state is not a dict from save_state(): {exc!r}") from None
    except GuestError as exc:
        raise ValueError(f"state does not fit this guest memory: {exc}") from None
