"""The raw driver: the guest disk byte for byte in a host file or block device."""

from vblock.drivers.raw.driver import RawDriver

DRIVER = RawDriver
