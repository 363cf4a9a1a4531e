"""vblock: a block-layer emulator with virtio-blk devices over raw and QED images."""

from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:  # what __getattr__ provides, for type checkers (the package ships py.typed)
    from vblock.block import create_image, open_image


def __getattr__(name):
    # The front door (open_image, create_image) lives in vblock.block; import lazily so that
    # `import vblock.hostio` does not pull in the whole block layer.
    if name in ("open_image", "create_image"):
        from vblock import block

        return getattr(block, name)
    raise AttributeError(f"module 'vblock' has no attribute {name!r}")
