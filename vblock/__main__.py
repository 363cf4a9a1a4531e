"""``python -m vblock``: the same as the ``vblock`` command."""

from vblock.cli.main import command

command()
