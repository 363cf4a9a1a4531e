"""``python -m vblock``: the same as the ``vblock`` command."""

import sys

from vblock.cli.main import main

sys.exit(main())
