"""cffi API-mode build of vblock._vbio from vbio.h (declarations, also the cdef) and the vbio_*.c
files (one subsystem each; vbio_internal.h is what they share).

Run by setuptools through native/setup_hook.py; `python native/build_vbio.py` compiles in place for
quick experiments.
"""

import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))

#: The shim's C files, one subsystem each (see vbio_internal.h).
SOURCES = ["vbio_file.c", "vbio_uring.c", "vbio_threads.c", "vbio_engine.c", "vbio_zero.c"]

# System types the shim's declarations use; in C they come from the system headers.
SYSTEM_CDEF = """
struct iovec { void *iov_base; size_t iov_len; };
"""

# The kernel's own values of the numbers vbio.h restates, exported as lib.FALLOC_FL_* and so on:
# cffi's `...` has the C compiler read each from the kernel's headers, so tests can hold vbio.h's
# copies to them (the C build itself checks them with _Static_assert in vbio_file.c).
KERNEL_CDEF = """
#define FALLOC_FL_KEEP_SIZE ...
#define FALLOC_FL_PUNCH_HOLE ...
#define FALLOC_FL_ZERO_RANGE ...
#define SEEK_DATA ...
#define SEEK_HOLE ...
"""

ffibuilder = FFI()
with open(os.path.join(HERE, "vbio.h")) as f:
    ffibuilder.cdef(SYSTEM_CDEF + KERNEL_CDEF + f.read())

ffibuilder.set_source(
    "vblock._vbio",
    "#include <stdint.h>\n#include <sys/uio.h>\n#include <unistd.h>\n#include <linux/falloc.h>\n"
    '#include "vbio.h"\n',
    sources=[os.path.relpath(os.path.join(HERE, name)) for name in SOURCES],
    depends=[os.path.relpath(os.path.join(HERE, name)) for name in ("vbio.h", "vbio_internal.h")],
    include_dirs=[os.path.relpath(HERE)],
    extra_compile_args=["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
