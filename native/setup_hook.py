"""The setuptools call: package layout and the cffi extension. Metadata lives in pyproject.toml.

Run from the project root by native/backend.py (paths below are relative to it).
"""
from setuptools import find_packages, setup

# drivers/ ships as the subpackage vblock.drivers, in regular and editable installs.
packages = find_packages(include=["vblock", "vblock.*"])
packages += ["vblock.drivers"] + ["vblock.drivers." + p for p in find_packages("drivers")]

setup(
    packages=packages,
    package_dir={"vblock": "vblock", "vblock.drivers": "drivers"},
    cffi_modules=["native/build_vbio.py:ffibuilder", "native/build_vring.py:ffibuilder"],
)
