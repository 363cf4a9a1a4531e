"""Block format drivers, installed as ``vblock.drivers``: one package per format.

Each package ``drivers/<name>/`` exposes ``DRIVER = TheDriverClass`` (a
``vblock.block.interface.BlockDriver`` subclass with ``format_name = "<name>"``); the registry in
``vblock.block.registry`` finds it by that name. Third-party drivers plug in through the
entry-point group ``vblock.drivers``. ``available()`` lists every format name.
"""


def available() -> list:
    """Sorted names of every registered image format (built-in and third-party)."""
    from vblock.block.registry import available as _available

    return _available()
