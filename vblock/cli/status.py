"""Exit codes of the ``vblock`` command, named once.

Every verb returns one of these (or a result object whose ``exit_status`` derives one); the error
boundary in ``main.py`` maps failures to ``ERROR`` and Ctrl-C to ``INTERRUPTED``.

``check`` follows ``qemu-img check``: 0 clean, 2 corruptions, 3 leaks only, 1 the check itself
failed, 63 the format has nothing to check (raw). ``compare`` follows ``qemu-img compare``
(``CompareStatus``): 0 the images read the same, 1 (``DIFFERENT``) they do not, and 2 and up for
errors: 2 opening an image (and bad arguments), 3 asking for block status, 4 reading data. A
verb with error codes of its own names its default in ``ERROR_STATUS``, and an exception carrying
an ``exit_status`` attribute gets that code at the boundary. ``stress`` answers 2
(``MISMATCH``) when a read returned data the model says is impossible or a request failed, and the
check's code when the image check at the end is not clean.

::

    $ vblock check disk.qed; echo $?
    No errors were found on the image.
    0
"""

from __future__ import annotations

import enum

__all__ = ["DIFFERENT", "MISMATCH", "CompareStatus", "ExitStatus", "check_status"]


class ExitStatus(enum.IntEnum):
    SUCCESS = 0
    ERROR = 1  # bad arguments, bad path, unknown format, corrupt image, host error
    CORRUPTIONS = 2  # check: corruptions found (also: compare DIFFERENT, stress MISMATCH)
    LEAKS = 3  # check: leaked clusters only
    NOT_SUPPORTED = 63  # check: the format has no check (qemu-img's code)
    INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)


class CompareStatus(enum.IntEnum):
    """``compare``'s codes, as ``qemu-img compare``'s."""

    IDENTICAL = 0
    DIFFERENT = 1
    OPEN_ERROR = 2  # an image could not be opened (also: bad arguments)
    STATUS_ERROR = 3  # block status (allocation) could not be read
    READ_ERROR = 4  # data could not be read


DIFFERENT = CompareStatus.DIFFERENT  # compare: the images differ
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
