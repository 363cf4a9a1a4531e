"""The null driver: reads zeros, drops writes (for benchmarks)."""

from vblock.drivers.null.driver import NullDriver

DRIVER = NullDriver
