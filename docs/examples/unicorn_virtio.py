"""A real CPU emulator driving a vblock virtio-blk device: Unicorn runs a bare-metal x86-64 guest.

    python docs/examples/unicorn_virtio.py IMAGE [--format raw|qed] [--deliver callback|poll]

The guest program (assembled below with keystone-engine) does what a driver does, with nothing
but loads and stores: it finds the device in its virtio-mmio window, brings it up (reset,
ACKNOWLEDGE, DRIVER, features, FEATURES_OK, one split queue, DRIVER_OK), lays a descriptor table
and the available and used rings out in its own RAM, and then writes sector 0, flushes, reads the
sector back and compares, and asks for the device ID. Between requests it waits for the
interrupt with ``int 0x80`` (this emulator's "wait for interrupt"), then reads InterruptStatus and
acknowledges it. ``int 0x81`` ends the program.

The emulator side is what any Python emulator needs:

* guest RAM is an ``mmap`` the emulator owns, mapped into the CPU with ``mem_map_ptr`` and handed
  to the device as ``GuestMemory([(RAM_BASE, ram)])``: both see the same bytes, no copies;
* the register block is ``VirtioMmio.read`` / ``write`` behind ``mmio_map`` (Unicorn maps whole
  pages; the device answers the first ``VIRTIO_MMIO_WINDOW`` bytes, and ``strict=True`` turns a
  stray access into an exception while bringing a guest up);
* the interrupt line is ``irq_level``: high while InterruptStatus is non-zero. With
  ``--deliver callback`` it rises on a backend completion thread; with ``--deliver poll`` the
  emulator's own loop waits on ``dev.fileno()`` and calls ``dev.poll()``, so it rises on the
  CPU's thread.

A Linux guest finds the same device from its kernel command line:
``virtio_mmio.device=512@0x0a000000:48`` (window size, base address, interrupt number).

Prints one line per step and exits 0 when every status was OK and the data read back matched.
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import select
import sys
import threading

from keystone import KS_ARCH_X86, KS_MODE_64, Ks
from unicorn import UC_ARCH_X86, UC_HOOK_INTR, UC_MODE_64, UC_PROT_ALL, Uc
from unicorn.x86_const import UC_X86_REG_RSP

import vblock
from vblock.virtio import VIRTIO_MMIO_WINDOW, GuestMemory, VirtioBlk, VirtioMmio

RAM_BASE, RAM_SIZE = 0x100000, 0x100000  # 1 MiB of guest RAM at 1 MiB
MMIO_BASE = 0x0A000000  # the device's window (a page for Unicorn; the device uses 0x200 of it)
CODE = RAM_BASE  # the program
DESC, AVAIL, USED = RAM_BASE + 0x10000, RAM_BASE + 0x10100, RAM_BASE + 0x11000  # queue of 8
HDR, STATUS = RAM_BASE + 0x12000, RAM_BASE + 0x12010  # request header (16 bytes), status byte
WBUF, RBUF, IDBUF = RAM_BASE + 0x13000, RAM_BASE + 0x13200, RAM_BASE + 0x14000
RESULT = RAM_BASE + 0x15000  # statuses of write, flush, read, get_id; then compare (0 = equal)
STACK_TOP = RAM_BASE + RAM_SIZE - 0x100
QUEUE_SIZE = 8
SERIAL = "vblock-unicorn"

# One request: header at HDR, then a data descriptor (unless there is none), then the status
# byte; published at avail.ring[n], avail.idx = n + 1; wait until used.idx = n + 1.
GUEST = f"""
    mov rbx, {MMIO_BASE}
    cmp dword ptr [rbx + 0x000], 0x74726976   # MagicValue "virt"
    jne fail
    cmp dword ptr [rbx + 0x004], 2            # Version 2
    jne fail
    cmp dword ptr [rbx + 0x008], 2            # DeviceID 2: block
    jne fail
    mov dword ptr [rbx + 0x070], 0            # reset
    mov dword ptr [rbx + 0x070], 1            # ACKNOWLEDGE
    mov dword ptr [rbx + 0x070], 3            # DRIVER
    mov dword ptr [rbx + 0x014], 1            # DeviceFeaturesSel = 1
    test dword ptr [rbx + 0x010], 1           # VIRTIO_F_VERSION_1 (bit 32)
    jz fail
    mov dword ptr [rbx + 0x024], 1            # DriverFeaturesSel = 1
    mov dword ptr [rbx + 0x020], 1            # VERSION_1
    mov dword ptr [rbx + 0x024], 0
    mov dword ptr [rbx + 0x020], 0x200        # VIRTIO_BLK_F_FLUSH (bit 9)
    mov dword ptr [rbx + 0x070], 11           # FEATURES_OK
    test dword ptr [rbx + 0x070], 8           # kept?
    jz fail
    mov dword ptr [rbx + 0x030], 0            # QueueSel 0
    cmp dword ptr [rbx + 0x034], {QUEUE_SIZE} # QueueNumMax
    jb fail
    mov dword ptr [rbx + 0x038], {QUEUE_SIZE}
    mov dword ptr [rbx + 0x080], {DESC}
    mov dword ptr [rbx + 0x084], 0
    mov dword ptr [rbx + 0x090], {AVAIL}
    mov dword ptr [rbx + 0x094], 0
    mov dword ptr [rbx + 0x0a0], {USED}
    mov dword ptr [rbx + 0x0a4], 0
    mov dword ptr [rbx + 0x044], 1            # QueueReady
    mov dword ptr [rbx + 0x070], 15           # DRIVER_OK

    mov rdi, {WBUF}                           # the data: byte i = i xor 0x5a
    xor ecx, ecx
fill:
    mov eax, ecx
    xor eax, 0x5a
    mov byte ptr [rdi + rcx], al
    inc ecx
    cmp ecx, 512
    jb fill

    mov r8d, 1                                # write sector 0
    mov r9, {WBUF}
    mov r10d, 512
    mov r11d, 0                               # data descriptor flags: device reads
    mov r12d, 0                               # request number
    call request
    mov r8d, 4                                # flush
    xor r10d, r10d
    mov r12d, 1
    call request
    mov r8d, 0                                # read sector 0 back
    mov r9, {RBUF}
    mov r10d, 512
    mov r11d, 2                               # WRITE: device writes
    mov r12d, 2
    call request
    mov r8d, 8                                # GET_ID
    mov r9, {IDBUF}
    mov r10d, 20
    mov r12d, 3
    call request

    mov rsi, {WBUF}                           # compare what was written with what came back
    mov rdi, {RBUF}
    mov ecx, 512
    repe cmpsb
    setne al
    mov byte ptr [{RESULT} + 4], al
    int 0x81                                  # done

fail:
    mov byte ptr [{RESULT} + 5], 1
    int 0x81

# r8d type, r9 data address, r10d data length (0: none), r11d data flags, r12d request number
request:
    mov dword ptr [{HDR}], r8d                # header: type, reserved, sector 0
    mov dword ptr [{HDR} + 4], 0
    mov qword ptr [{HDR} + 8], 0
    mov byte ptr [{STATUS}], 0xff
    mov rax, {HDR}                            # desc 0: header, readable, NEXT
    mov qword ptr [{DESC}], rax
    mov dword ptr [{DESC} + 8], 16
    mov word ptr [{DESC} + 12], 1
    test r10d, r10d
    jz no_data
    mov word ptr [{DESC} + 14], 1             # -> desc 1: data
    mov qword ptr [{DESC} + 16], r9
    mov dword ptr [{DESC} + 24], r10d
    mov eax, r11d
    or eax, 1                                 # NEXT
    mov word ptr [{DESC} + 28], ax
    mov word ptr [{DESC} + 30], 2
    jmp status_desc
no_data:
    mov word ptr [{DESC} + 14], 2             # -> desc 2: status
status_desc:
    mov rax, {STATUS}                         # desc 2: status byte, device-writable
    mov qword ptr [{DESC} + 32], rax
    mov dword ptr [{DESC} + 40], 1
    mov word ptr [{DESC} + 44], 2
    mov word ptr [{DESC} + 46], 0
    mov eax, r12d                             # avail.ring[n % size] = head 0
    and eax, {QUEUE_SIZE - 1}
    mov word ptr [{AVAIL} + 4 + rax * 2], 0
    lea eax, [r12d + 1]
    mov word ptr [{AVAIL} + 2], ax            # avail.idx = n + 1: published
    mov dword ptr [rbx + 0x050], 0            # QueueNotify 0
wait:
    movzx eax, word ptr [{USED} + 2]
    lea ecx, [r12d + 1]
    cmp eax, ecx
    je done
    int 0x80                                  # wait for the interrupt
    mov eax, dword ptr [rbx + 0x060]          # InterruptStatus
    mov dword ptr [rbx + 0x064], eax          # InterruptACK
    jmp wait
done:
    mov al, byte ptr [{STATUS}]
    mov byte ptr [{RESULT} + r12], al
    ret
"""


class Line:
    """The device's interrupt line as an interrupt controller input: ``irq_level`` sets it (from
    whichever thread raises or clears it), the CPU's wait-for-interrupt blocks on it."""

    def __init__(self):
        self.high = False
        self.cond = threading.Condition()

    def set(self, level):
        with self.cond:
            self.high = level
            self.cond.notify_all()

    def wait_high(self, timeout=30.0):
        with self.cond:
            if not self.cond.wait_for(lambda: self.high, timeout):
                raise TimeoutError("no interrupt from the device")


def run(image_path, fmt=None, deliver="callback"):
    """Run the guest against ``image_path``; returns the guest's results as a dict."""
    code, _ = Ks(KS_ARCH_X86, KS_MODE_64).asm(GUEST, CODE)
    ram = mmap.mmap(-1, RAM_SIZE)  # the emulator's RAM; the CPU and the device share it
    ram[: len(code)] = bytes(code)
    mem = GuestMemory([(RAM_BASE, ram)])
    img = vblock.open_image(image_path, format=fmt, cache="writeback")
    try:
        line = Line()
        dev = VirtioBlk(img, mem, serial=SERIAL, deliver=deliver)
        mmio = VirtioMmio(dev, irq_level=line.set, strict=True)

        uc = Uc(UC_ARCH_X86, UC_MODE_64)
        ram_ptr = ctypes.addressof(ctypes.c_char.from_buffer(ram))
        uc.mem_map_ptr(RAM_BASE, RAM_SIZE, UC_PROT_ALL, ram_ptr)
        uc.mmio_map(
            MMIO_BASE,
            0x1000,
            lambda _uc, offset, size, _ud: mmio.read(offset, size),
            None,
            lambda _uc, offset, size, value, _ud: mmio.write(offset, size, value),
            None,
        )
        assert VIRTIO_MMIO_WINDOW <= 0x1000

        def on_interrupt(uc, intno, _ud):
            if intno == 0x81:
                uc.emu_stop()
                return
            if deliver == "poll":  # the emulator's event loop: wait for completions, publish them
                while not line.high:
                    if not dev.poll():
                        select.select([dev.fileno()], [], [], 30.0)
            else:
                line.wait_high()

        uc.hook_add(UC_HOOK_INTR, on_interrupt)
        uc.reg_write(UC_X86_REG_RSP, STACK_TOP)
        uc.emu_start(CODE, RAM_BASE + RAM_SIZE)
        status = bytes(ram[RESULT - RAM_BASE : RESULT - RAM_BASE + 6])
        serial = bytes(ram[IDBUF - RAM_BASE : IDBUF - RAM_BASE + 20]).rstrip(b"\0").decode()
        stats = dev.stats()
        dev.close()
    finally:
        img.close()
    return {
        "write": status[0],
        "flush": status[1],
        "read": status[2],
        "get_id": status[3],
        "matched": status[4] == 0,
        "bring_up_failed": bool(status[5]),
        "serial": serial,
        "requests": {k: v["ops"] for k, v in stats.items() if k != "queues" and v["ops"]},
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("image", help="image file to write sector 0 of (created as raw if missing)")
    ap.add_argument("--format", default=None, help="image format (probed when omitted)")
    ap.add_argument("--deliver", choices=("callback", "poll"), default="callback")
    args = ap.parse_args(argv)
    try:
        open(args.image, "rb").close()
    except FileNotFoundError:
        vblock.create_image(args.image, args.format or "raw", 1 << 20).close()
    r = run(args.image, args.format, args.deliver)
    if r["bring_up_failed"]:
        print("guest: device bring-up failed")
        return 1
    for step in ("write", "flush", "read", "get_id"):
        print(f"guest: {step}: status {r[step]}")
    print(f"guest: read-back {'matches' if r['matched'] else 'DIFFERS'}; device id {r['serial']!r}")
    print(f"device: requests {r['requests']}")
    ok = r["matched"] and not any(r[s] for s in ("write", "flush", "read", "get_id"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
