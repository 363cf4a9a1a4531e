"""The memory driver: a RAM disk held in a ``bytearray`` (for tests and emulators)."""

from vblock.drivers.memory.driver import MemoryDriver

DRIVER = MemoryDriver
