"""The setuptools call: package layout, the cffi extensions, and what the sdist must carry besides.
Metadata lives in pyproject.toml.

Run from the project root by native/backend.py (paths below are relative to it).
"""

import glob

from setuptools import find_packages, setup
from setuptools.command.sdist import sdist as _sdist

# drivers/ ships as the subpackage vblock.drivers, in regular and editable installs.
packages = find_packages(include=["vblock", "vblock.*"])
packages += ["vblock.drivers"] + ["vblock.drivers." + p for p in find_packages("drivers")]

# The build itself: no package or extension lists these, and a wheel built from the sdist needs
# them (pyproject.toml names native/backend.py as the backend). C sources and headers come in
# through the extensions' sources and depends; generated files (named _*) stay out.
BUILD_FILES = sorted(p for p in glob.glob("native/*.py") if not p.startswith("native/_"))


class sdist(_sdist):
    """setuptools' sdist, plus native/'s build scripts (BUILD_FILES)."""

    def make_distribution(self):
        self.filelist.extend(BUILD_FILES)
        self.filelist.sort()
        self.filelist.remove_duplicates()
        super().make_distribution()


setup(
    packages=packages,
    package_dir={"vblock": "vblock", "vblock.drivers": "drivers"},
    cffi_modules=["native/build_vbio.py:ffibuilder", "native/build_vring.py:ffibuilder"],
    cmdclass={"sdist": sdist},
)
