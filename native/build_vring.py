"""cffi API-mode build of vblock.virtio._vring from vring.h (declarations, also the cdef) and vring.c.

Run by setuptools through native/setup_hook.py; `python native/build_vring.py` compiles in place.
"""
import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))

ffibuilder = FFI()
with open(os.path.join(HERE, "vring.h")) as f:
    ffibuilder.cdef(f.read())

ffibuilder.set_source(
    "vblock.virtio._vring",
    '#include <stdint.h>\n#include "vring.h"\n',
    sources=[os.path.relpath(os.path.join(HERE, "vring.c"))],
    include_dirs=[os.path.relpath(HERE)],
    extra_compile_args=["-std=gnu11", "-O2", "-Wall", "-Wextra"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
