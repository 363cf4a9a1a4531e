"""cffi API-mode build of vblock._vbio from vbio.h (declarations, also the cdef) and vbio.c.

Run by setuptools through native/setup_hook.py; `python native/build_vbio.py` compiles in place for
quick experiments.
"""
import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))

# System types the shim's declarations use; in C they come from the system headers.
SYSTEM_CDEF = """
struct iovec { void *iov_base; size_t iov_len; };
"""

ffibuilder = FFI()
with open(os.path.join(HERE, "vbio.h")) as f:
    ffibuilder.cdef(SYSTEM_CDEF + f.read())

ffibuilder.set_source(
    "vblock._vbio",
    '#include <stdint.h>\n#include <sys/uio.h>\n#include "vbio.h"\n',
    sources=[os.path.relpath(os.path.join(HERE, "vbio.c"))],
    include_dirs=[os.path.relpath(HERE)],
    extra_compile_args=["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
