"""PEP 517 backend: setuptools.build_meta, running native/setup_hook.py instead of a top-level
setup.py.

The project's top level holds only pyproject.toml and the package folders, so what setuptools
cannot read from pyproject.toml lives in native/setup_hook.py: the cffi extensions (cffi writes
their C source at build time, through the `cffi_modules` setup keyword, which pyproject.toml
cannot set) and drivers/ shipped as vblock.drivers with whatever subpackages it has (pyproject.toml
can map the folder, but its package finder cannot rename what it finds, so every subpackage
would have to be listed by hand).

build_meta's public hooks always run ./setup.py. The one way to point them at another script is to
subclass the class behind them, `_BuildMetaBackend`, and override `run_setup`: a private class.
So pyproject.toml's [build-system] bounds setuptools to the releases this route was tested with
(wheel, sdist and editable builds, at both ends of the range); a new major release is admitted
only after the same test with it. A missing class fails here, naming the cause.

Everything else is plain build_meta.
"""

import os

from setuptools import build_meta as _meta

_HOOK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "setup_hook.py")

try:
    _Base = _meta._BuildMetaBackend
except AttributeError as exc:  # pragma: no cover - only with a setuptools outside the tested range
    raise ImportError(
        "setuptools.build_meta has no _BuildMetaBackend: this setuptools is outside the range "
        "native/backend.py was tested with (pyproject.toml [build-system] requires)"
    ) from exc


class _Backend(_Base):
    def run_setup(self, setup_script="setup.py"):
        super().run_setup(setup_script=_HOOK)


_BACKEND = _Backend()
get_requires_for_build_wheel = _BACKEND.get_requires_for_build_wheel
get_requires_for_build_sdist = _BACKEND.get_requires_for_build_sdist
prepare_metadata_for_build_wheel = _BACKEND.prepare_metadata_for_build_wheel
build_wheel = _BACKEND.build_wheel
build_sdist = _BACKEND.build_sdist
get_requires_for_build_editable = _BACKEND.get_requires_for_build_editable
prepare_metadata_for_build_editable = _BACKEND.prepare_metadata_for_build_editable
build_editable = _BACKEND.build_editable
