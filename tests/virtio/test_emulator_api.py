"""What an emulator author uses: interrupt and level callbacks (and their order under concurrent
completions and acknowledgements), the driver hooking in beside them, polling drivers, poll
delivery with its eventfd, counters, saved device state, strict register checks and the
argument checks that name what is wrong."""

from __future__ import annotations

import json
import logging
import mmap
import select
import threading

import pytest

from tests.virtio.virtio_helpers import EIO, FakeImage, Stack
from vblock.errors import GuestError
from vblock.virtio import VIRTIO_MMIO_WINDOW, GuestMemory, VirtioBlk, VirtioMmio
from vblock.virtio import spec as S
from vblock.virtio.driver import Driver

IN, OUT, FLUSH = S.VIRTIO_BLK_T_IN, S.VIRTIO_BLK_T_OUT, S.VIRTIO_BLK_T_FLUSH
ISR, ACK = S.VIRTIO_MMIO_INTERRUPT_STATUS, S.VIRTIO_MMIO_INTERRUPT_ACK
VRING, CONFIG = S.VIRTIO_MMIO_INT_VRING, S.VIRTIO_MMIO_INT_CONFIG


def _readable(fd):
    return bool(select.select([fd], [], [], 0)[0])


# -- interrupts -----------------------------------------------------------------------------------
def test_level_goes_high_on_the_first_interrupt_and_low_inside_the_ack():
    calls = []
    st = Stack(
        FakeImage(),
        interrupts=False,
        event_idx=False,
        interrupt=lambda: calls.append("edge"),
        irq_level=lambda level: calls.append(level),
    )
    st.drv.submit(OUT, 0, data=b"a" * 512)
    st.drv.submit(OUT, 8, data=b"b" * 512)
    assert calls == [True, "edge", "edge"]  # high once; each interrupt is still an edge
    st.mmio.write(ACK, 4, VRING)
    assert calls[-1] is False and st.mmio.read(ISR, 4) == 0


def test_level_stays_high_until_every_cause_is_acknowledged():
    levels = []
    st = Stack(FakeImage(), interrupts=False, irq_level=levels.append)
    st.drv.submit(OUT, 0, data=b"a" * 512)
    st.dev.update_capacity()  # a config-change interrupt on top
    st.mmio.write(ACK, 4, VRING)
    assert levels == [True] and st.mmio.read(ISR, 4) == CONFIG
    st.mmio.write(ACK, 4, CONFIG)
    assert levels == [True, False]


def test_device_reset_drops_the_level():
    levels = []
    st = Stack(FakeImage(), interrupts=False, irq_level=levels.append)
    st.drv.submit(OUT, 0, data=b"a" * 512)
    st.mmio.write(S.VIRTIO_MMIO_STATUS, 4, 0)
    assert levels == [True, False] and st.mmio.read(ISR, 4) == 0


def test_level_follows_status_under_concurrent_completions_and_acks():
    """Completions on four threads raise interrupts while a fifth acknowledges: every level call
    matches the status at that moment, calls alternate, and the line ends as the status does."""
    img = FakeImage(defer=True)
    seen = []
    st = Stack(img, interrupts=False, event_idx=False, queue_size=256)
    st.mmio.irq_level = lambda level: seen.append((level, st.mmio.interrupt_status))
    reqs = [st.drv.submit(OUT, i, data=b"c" * 512, kick=False) for i in range(80)]
    st.drv.kick()
    pending = list(img.pending)
    img.pending = []
    stop = threading.Event()

    def complete(part):
        for fut, action, _ in part:
            fut.set_result(action())

    def acknowledge():
        while not stop.is_set():
            isr = st.mmio.read(ISR, 4)
            if isr:
                st.mmio.write(ACK, 4, isr)
            st.drv.reap()

    acker = threading.Thread(target=acknowledge)
    acker.start()
    workers = [threading.Thread(target=complete, args=(pending[i::4],)) for i in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    stop.set()
    acker.join()
    assert seen[-1][0] == bool(st.mmio.read(ISR, 4))  # the line is where the status is
    st.mmio.write(ACK, 4, st.mmio.read(ISR, 4))  # the guest's last acknowledgement
    st.drv.reap()
    assert all(r.done and r.status == 0 for r in reqs)
    assert all(level == bool(status) for level, status in seen)
    assert [level for level, _ in seen] == [i % 2 == 0 for i in range(len(seen))]
    assert seen[-1] == (False, 0)


def test_driver_hooks_in_beside_the_emulator_callbacks():
    edges, levels = [], []
    st = Stack(FakeImage(), interrupt=lambda: edges.append(1), irq_level=levels.append)
    assert st.drv.write(0, b"d" * 512) == 0
    assert st.mmio.interrupt is not None and st.mmio.irq_level is not None
    assert edges == [1] and st.drv.interrupts == 1
    assert levels == [True, False]  # the driver, as the guest, acknowledged


def test_polling_driver_reaps_without_interrupts():
    st = Stack(FakeImage(), interrupts=False)
    assert st.drv.write(0, b"e" * 1024) == 0
    assert st.drv.read(0, 1024) == (0, b"e" * 1024)
    assert st.drv.interrupts == 0 and st.mmio.read(ISR, 4) == VRING  # raised, never acknowledged


# -- poll delivery --------------------------------------------------------------------------------
def test_poll_mode_writes_no_used_entry_before_poll():
    """GET_ID and an error finish at once, a write later: none of them reaches the used ring
    (guard bytes over the used index and entries) until poll() publishes all three."""
    img = FakeImage(defer=True)
    st = Stack(img, deliver="poll", interrupts=False)
    dq = st.drv.queues[0]
    used = st.mem.view(dq.used_addr + 2, 2 + 8 * dq.size)  # used idx and ring[]
    used[:] = b"\xa5" * len(used)
    dq.last_used = 0xA5A5  # the guard stands in for used idx
    irqs = []
    st.mmio.interrupt = lambda: irqs.append(1)
    get_id = st.drv.submit(S.VIRTIO_BLK_T_GET_ID, 0, read_len=20, kick=False)
    bad = st.drv.submit(IN, 1 << 40, read_len=512, kick=False)  # beyond capacity: IOERR at once
    write = st.drv.submit(OUT, 0, data=b"f" * 512, kick=False)
    st.drv.kick()
    img.complete()
    assert bytes(used) == b"\xa5" * len(used) and irqs == []
    assert _readable(st.dev.fileno())
    assert st.dev.poll() == 3
    assert not _readable(st.dev.fileno())
    assert irqs == [1]
    st.drv.reap()
    assert (get_id.status, bad.status, write.status) == (0, S.VIRTIO_BLK_S_IOERR, 0)
    assert st.dev.poll() == 0


def test_poll_publishes_on_the_calling_thread():
    img = FakeImage(defer=True)
    st = Stack(img, deliver="poll", interrupts=False)
    threads = []
    st.mmio.interrupt = lambda: threads.append(threading.get_ident())
    st.drv.submit(OUT, 0, data=b"g" * 512)
    done = threading.Thread(target=img.complete)
    done.start()
    done.join()
    assert threads == []
    assert st.dev.poll() == 1 and threads == [threading.get_ident()]


def test_polling_driver_over_a_poll_mode_device_runs_a_workload():
    st = Stack(FakeImage(), deliver="poll", interrupts=False)
    for i in range(16):
        assert st.drv.write(8 * i, bytes([i]) * 4096) == 0
    assert all(st.drv.read(8 * i, 4096) == (0, bytes([i]) * 4096) for i in range(16))


def test_fileno_needs_poll_delivery():
    with pytest.raises(ValueError, match="deliver='poll'"):
        Stack(FakeImage()).dev.fileno()
    assert Stack(FakeImage()).dev.poll() == 0


# -- counters -------------------------------------------------------------------------------------
def test_stats_count_a_known_workload_exactly():
    st = Stack(FakeImage())
    drv = st.drv
    for i in range(5):
        assert drv.write(8 * i, b"h" * 4096) == 0
    for i in range(3):
        assert drv.read(8 * i, 1024)[0] == 0
    assert drv.flush() == 0 and drv.flush() == 0
    assert drv.get_id()[0] == 0
    assert drv.discard([(0, 8, 0), (64, 16, 0)]) == 0
    assert drv.write_zeroes([(128, 8, 1)]) == 0
    st.img.fail["write"] = EIO
    assert drv.write(0, b"i" * 512) == S.VIRTIO_BLK_S_IOERR
    assert drv.read(1 << 40, 512)[0] == S.VIRTIO_BLK_S_IOERR
    assert drv._run(99, 0).status == S.VIRTIO_BLK_S_UNSUPP
    stats = st.dev.stats()
    counts = {k: (v["ops"], v["bytes"], v["errors"]) for k, v in stats.items() if k != "queues"}
    assert counts == {
        "read": (4, 3 * 1024, 1),  # failed requests moved no data
        "write": (6, 5 * 4096, 1),
        "flush": (2, 0, 0),
        "discard": (1, 24 * 512, 0),
        "write_zeroes": (1, 8 * 512, 0),
        "get_id": (1, 0, 0),
        "unsupported": (1, 0, 1),
    }
    for entry in (v for k, v in stats.items() if k != "queues"):
        assert set(entry) == {"ops", "bytes", "errors", "p50", "p99", "max"}
        assert 0 < entry["p50"] <= entry["p99"] <= entry["max"] * 1.25 + 0.1
    assert stats["queues"][0]["write"]["ops"] == 6 and len(stats["queues"]) == 1
    json.dumps(stats)


def test_stats_are_per_queue_and_survive_reset():
    st = Stack(FakeImage(), num_queues=2)
    st.drv.write(0, b"j" * 512, queue=0)
    st.drv.write(8, b"k" * 512, queue=1)
    st.drv.write(16, b"l" * 512, queue=1)
    st.drv.reset()
    st.drv.start()
    st.drv.read(0, 512, queue=0)
    stats = st.dev.stats()
    assert [q["write"]["ops"] for q in stats["queues"]] == [1, 2]
    assert stats["write"]["ops"] == 3 and stats["read"]["ops"] == 1


def test_stats_off_counts_nothing():
    img = FakeImage()
    mem = GuestMemory.anonymous(8 << 20)
    dev = VirtioBlk(img, mem, stats=False)
    drv = Driver(VirtioMmio(dev), mem).start()
    assert drv.write(0, b"m" * 512) == 0
    zero = {"ops": 0, "bytes": 0, "errors": 0, "p50": 0.0, "p99": 0.0, "max": 0.0}
    assert dev.stats()["write"] == zero


# -- snapshots ------------------------------------------------------------------------------------
@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_saved_device_continues_where_it_stopped(packed):
    img = FakeImage()
    mem = GuestMemory.anonymous(8 << 20)
    dev = VirtioBlk(img, mem, queue_size_max=16)
    drv = Driver(VirtioMmio(dev), mem, packed=packed, queue_size=16).start()
    for i in range(20):  # past the ring's size: indices wrap
        assert drv.write(8 * i, bytes([i + 1]) * 512) == 0
    saved = json.loads(json.dumps(dev.save_state()))
    dev2 = VirtioBlk(img, mem, queue_size_max=16, state=saved)
    mmio2 = VirtioMmio(dev2)
    drv.mmio = mmio2  # the guest keeps running against the rebuilt device
    mmio2.add_interrupt_listener(drv._on_interrupt)
    for i in range(20):
        assert drv.read(8 * i, 512) == (0, bytes([i + 1]) * 512)
    assert drv.write(0, b"z" * 512) == 0
    assert dev2.save_state()["queues"][0]["next_avail"] != saved["queues"][0]["next_avail"]
    assert bytes(img.data[:512]) == b"z" * 512


def test_save_state_refuses_while_requests_are_in_flight():
    img = FakeImage(defer=True)
    st = Stack(img)
    st.drv.submit(OUT, 0, data=b"n" * 512)
    with pytest.raises(RuntimeError, match="1 requests in flight.*wait_idle"):
        st.dev.save_state()
    img.complete()
    assert st.dev.save_state()["status"] & S.DRIVER_OK


def test_restore_refuses_a_state_of_another_shape():
    st = Stack(FakeImage())
    saved = st.dev.save_state()
    with pytest.raises(ValueError, match="num_queues"):
        VirtioBlk(FakeImage(), st.mem, num_queues=2, state=saved)
    with pytest.raises(ValueError, match="not a dict from save_state"):
        VirtioBlk(FakeImage(), st.mem, state={"version": 1})


# -- strict registers -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "access",
    [
        ("read", 0x0FF, 4),  # no register there
        ("read", S.VIRTIO_MMIO_MAGIC_VALUE, 2),  # bad width
        ("read", S.VIRTIO_MMIO_QUEUE_NOTIFY, 4),  # write-only
        ("read", S.VIRTIO_MMIO_CONFIG + 0x60, 4),  # past the config space
        ("write", S.VIRTIO_MMIO_MAGIC_VALUE, 4, 1),  # read-only
        ("write", S.VIRTIO_MMIO_STATUS, 2, 1),  # bad width
        ("write", S.VIRTIO_MMIO_STATUS, 4, S.DRIVER_OK),  # a status step the spec forbids
        ("write", S.VIRTIO_MMIO_QUEUE_NOTIFY, 4, 7),  # no such queue
    ],
    ids=[
        "offset",
        "read-width",
        "write-only",
        "config-end",
        "read-only",
        "write-width",
        "status",
        "notify",
    ],
)
def test_strict_raises_what_lax_logs_and_ignores(access, caplog):
    lax = Stack(FakeImage(), start=False)
    strict = Stack(FakeImage(), start=False, strict=True)
    kind, offset, size, *value = access
    with caplog.at_level(logging.INFO, logger="vblock.virtio.mmio"):
        got = getattr(lax.mmio, kind)(offset, size, *value)
    assert got == 0 if kind == "read" else got is None
    if kind == "read" or offset != S.VIRTIO_MMIO_QUEUE_NOTIFY:
        assert "virtio-mmio" in caplog.text
    with pytest.raises(GuestError, match="virtio-mmio"):
        getattr(strict.mmio, kind)(offset, size, *value)


def test_strict_device_runs_a_clean_driver():
    st = Stack(FakeImage(), strict=True)
    assert st.drv.write(0, b"o" * 512) == 0 and st.drv.read(0, 512) == (0, b"o" * 512)


# -- argument checks ------------------------------------------------------------------------------
def test_virtio_blk_names_a_bad_argument():
    mem = GuestMemory.anonymous(1 << 16)
    with pytest.raises(TypeError, match=r"img must be an open image \(vblock.open_image\), not st"):
        VirtioBlk("m.qed", mem)
    with pytest.raises(TypeError, match="mem must be a vblock.virtio.GuestMemory, not mmap"):
        VirtioBlk(FakeImage(), mmap.mmap(-1, 4096))
    with pytest.raises(ValueError, match="deliver must be 'callback' or 'poll', not 'irq'"):
        VirtioBlk(FakeImage(), mem, deliver="irq")
    with pytest.raises(TypeError, match="num_queues must be an int"):
        VirtioBlk(FakeImage(), mem, num_queues="2")
    with pytest.raises(ValueError, match="queue_size_max 100 is not a power of 2"):
        VirtioBlk(FakeImage(), mem, queue_size_max=100)
    with pytest.raises(TypeError, match="serial must be str or bytes"):
        VirtioBlk(FakeImage(), mem, serial=5)


def test_virtio_mmio_names_a_bad_argument():
    dev = VirtioBlk(FakeImage(), GuestMemory.anonymous(1 << 16))
    with pytest.raises(TypeError, match="dev must be a VirtioBlk, not str"):
        VirtioMmio("dev")
    with pytest.raises(TypeError, match="interrupt must be callable or None, not int"):
        VirtioMmio(dev, interrupt=1)
    with pytest.raises(TypeError, match="irq_level must be callable or None"):
        VirtioMmio(dev, irq_level="high")
    with pytest.raises(TypeError, match="strict must be a bool"):
        VirtioMmio(dev, strict="yes")


def test_guest_memory_says_what_it_accepts():
    accepts = r"GuestMemory takes a list of \(guest_phys_base, buffer\) pairs of writable buffers"
    with pytest.raises(TypeError, match=accepts + ".*got mmap"):
        GuestMemory(mmap.mmap(-1, 4096))
    with pytest.raises(TypeError, match=accepts + ".*region 0 buffer \\(bytes\\) is read-only"):
        GuestMemory([(0, b"ram")])
    with pytest.raises(TypeError, match=accepts + ".*region 0 base is str"):
        GuestMemory([("0", bytearray(16))])
    with pytest.raises(TypeError, match=accepts + ".*region 1 is int, not a pair"):
        GuestMemory([(0, bytearray(16)), 5])
    assert GuestMemory([(0x4000_0000, bytearray(4096))]).size == 4096


def test_driver_names_a_bad_argument():
    mem = GuestMemory.anonymous(1 << 16)
    mmio = VirtioMmio(VirtioBlk(FakeImage(), mem))
    with pytest.raises(TypeError, match="mmio must be a VirtioMmio, not VirtioBlk"):
        Driver(mmio.device, mem)
    with pytest.raises(TypeError, match="mem must be a vblock.virtio.GuestMemory"):
        Driver(mmio, bytearray(16))
    with pytest.raises(TypeError, match="interrupts must be a bool"):
        Driver(mmio, mem, interrupts=None)
    with pytest.raises(ValueError, match="num_queues must be an int"):
        Driver(mmio, mem, num_queues=0)


def test_mmio_window_is_exported():
    assert VIRTIO_MMIO_WINDOW == 0x200
    config = VirtioBlk(FakeImage(), GuestMemory.anonymous(4096)).config_bytes()
    assert S.VIRTIO_MMIO_CONFIG + len(config) <= VIRTIO_MMIO_WINDOW


def test_closed_poll_device_ignores_late_completions():
    img = FakeImage(defer=True)
    st = Stack(img, deliver="poll", interrupts=False)
    st.drv.submit(OUT, 0, data=b"p" * 512)
    st.dev.close()
    img.complete()  # the completion must not write to a closed (maybe reused) descriptor number
    assert st.dev.poll() == 1
