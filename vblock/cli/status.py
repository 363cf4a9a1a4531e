"""Exit codes of the ``vblock`` command, named once.

Every verb returns one of these (or a result object whose ``exit_status`` derives one); the error
boundary in ``main.py`` maps failures to ``ERROR`` and Ctrl-C to ``INTERRUPTED``.

``check`` follows ``qemu-img check``: 0 clean, 2 corruptions, 3 leaks only, 1 the check itself
failed, 63 the format has nothing to check (raw). ``compare`` answers 0 when the images read the
same and 2 (``DIFFERENT``) when they do not, because 1 is every verb's "something went wrong"
(``qemu-img compare`` uses 1 for a difference and 2 for an error). ``stress`` answers 2
(``MISMATCH``) when a read returned data the model says is impossible or a request failed, and the
check's code when the image check at the end is not clean.

::

    $ vblock check disk.qed; echo $?
    No errors were found on the image.
    0
"""

from __future__ import annotations

import enum

__all__ = ["DIFFERENT", "MISMATCH", "ExitStatus", "check_status"]


class ExitStatus(enum.IntEnum):
    SUCCESS = 0
    ERROR = 1  # bad arguments, bad path, unknown format, corrupt image, host error
    CORRUPTIONS = 2  # check: corruptions found (also: compare DIFFERENT, stress MISMATCH)
    LEAKS = 3  # check: leaked clusters only
    NOT_SUPPORTED = 63  # check: the format has no check (qemu-img's code)
    INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)


DIFFERENT = ExitStatus.CORRUPTIONS  # compare: the images differ
MISMATCH = ExitStatus.CORRUPTIONS  # stress: a read returned impossible data, or a request failed


def check_status(result: dict) -> ExitStatus:
    """The ``qemu-img check`` exit code for a check result dict (what remains after any repair)."""
    if result.get("check-errors"):
        return ExitStatus.ERROR
    if result.get("corruptions"):
        return ExitStatus.CORRUPTIONS
    if result.get("leaks"):
        return ExitStatus.LEAKS
    return ExitStatus.SUCCESS
