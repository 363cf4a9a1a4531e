"""PEP 517 backend: setuptools, with the build hook kept in native/ instead of a top-level setup.py.

The project's top level holds only pyproject.toml and the package folders, so the few lines that
setuptools cannot read from pyproject.toml (the cffi extension, and drivers/ shipped as
vblock.drivers) live in native/setup_hook.py. Everything else is plain setuptools.build_meta.
"""
import os

from setuptools import build_meta as _meta

_HOOK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "setup_hook.py")


class _Backend(_meta._BuildMetaBackend):
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
