/* vbio: the native shim under vblock.hostio.
 *
 * This file is both the C header of the shim's C files (vbio_*.c; what they share besides is in
 * vbio_internal.h) and the cffi cdef (native/build_vbio.py reads it), so it holds declarations
 * only: no includes, no guards, no macros other than integer constants. Where a constant restates
 * a kernel number, vbio_file.c proves it equal to the kernel header's at build time.
 * `struct iovec` comes from <sys/uio.h> in C and is declared for cffi by the build script.
 *
 * Conventions: every vbio_* function that can fail returns a count or 0 on success, and -errno on
 * failure (the io_uring and QEMU convention; the global errno is never the answer). Every call that
 * can block is made with the GIL released (cffi API mode does that for every call).
 * Offsets and lengths are in bytes.
 */

#define VBIO_VERSION 14

/* Operation codes of struct vbio_op. */
#define VBIO_OP_READV 1
#define VBIO_OP_WRITEV 2
#define VBIO_OP_FDATASYNC 3
#define VBIO_OP_FALLOCATE 4
#define VBIO_OP_NOP 5

/* fallocate modes: the kernel's FALLOC_FL_* values (vbio_file.c proves them equal). */
#define VBIO_FALLOC_KEEP_SIZE 1
#define VBIO_FALLOC_PUNCH_HOLE 2
#define VBIO_FALLOC_ZERO_RANGE 16

/* lseek whence values of vbio_seek: the kernel's SEEK_DATA and SEEK_HOLE. */
#define VBIO_SEEK_DATA 3
#define VBIO_SEEK_HOLE 4

/* Misalignment codes of vbio_op_prep1, vbio_op_prepv and vbio_misaligned (positive, never an errno). */
#define VBIO_MISALIGNED_OFFSET 1
#define VBIO_MISALIGNED_LENGTH 2
#define VBIO_MISALIGNED_ADDRESS 3

/* Engine kinds. */
#define VBIO_ENGINE_URING 1
#define VBIO_ENGINE_THREADS 2

/* Open flags for vbio_open. */
#define VBIO_O_RDONLY 1
#define VBIO_O_DIRECT 2
#define VBIO_O_CREATE 4

/* One I/O operation. The caller owns the struct and the iovec array it points to, and keeps both
 * alive and unmoved from vbio_engine_submit until vbio_engine_reap hands the op back. The engine
 * may rewrite `iov`/`iovcnt` contents while resubmitting a short transfer. */
struct vbio_op {
    uint64_t token;      /* caller's tag, returned untouched */
    int32_t opcode;      /* VBIO_OP_* */
    int32_t fd;
    uint64_t offset;     /* bytes into the file */
    uint64_t length;     /* bytes: fallocate length; for readv/writev set by the engine to the iov total */
    int32_t mode;        /* fallocate mode (VBIO_FALLOC_*) */
    int32_t iovcnt;
    struct iovec *iov;
    int64_t result;      /* out: bytes moved (readv: short only at end of file), 0, or -errno */
    /* engine-private below */
    int64_t done;        /* bytes moved so far */
    int32_t iov_first;   /* index of the first iovec not yet fully moved */
    int32_t _pad;
    struct vbio_op *next;
};

struct vbio_engine;

/* Engines: submit a batch of ops with one call, get a batch of finished ops back with one call.
 * Submission is thread-safe. The io_uring engine hands finished ops to one reaping thread at a time
 * (vbio_engine_reap*, vbio_engine_submit_reap); the thread engine's workers are the caller's
 * threads, each calling vbio_engine_work, and they hand finished ops back themselves.
 * poll_depth (io_uring only; 0 = never): while more than this many ops are in flight, new ops go
 * through a second ring polled by a kernel thread (SQPOLL, shared by the whole process), so that
 * submission runs on another CPU than the reaping thread; at lower depths the submitting thread
 * enters the kernel itself (lower latency). Quietly absent where the kernel refuses SQPOLL.
 * spin_max_ns (io_uring only; 0 = never): with ops in flight and none finished, the reaping thread
 * busy-waits on the completion rings before it sleeps in the kernel, for an adaptive time of at most
 * this long (as QEMU's AioContext polling): doubled from 4 us after a sleep shorter than the maximum,
 * halved (down to 0) after a longer one, kept while spinning catches completions. */
int vbio_engine_open(int kind, uint32_t entries, uint32_t poll_depth, int64_t spin_max_ns, struct vbio_engine **out);
int vbio_engine_submit(struct vbio_engine *eng, struct vbio_op **ops, int n);
/* Wait up to timeout_ns (<0: forever, 0: poll) for finished ops; fills out[0..max) and returns how
 * many, 0 on timeout or after vbio_engine_wake. Short transfers, EINTR and EAGAIN are retried inside
 * and never surface here. */
int vbio_engine_reap(struct vbio_engine *eng, struct vbio_op **out, int max, int64_t timeout_ns);
/* The same, handing back each finished op's token and result instead of the op (cheaper to read
 * from Python: two integer arrays). max is at most 256. */
int vbio_engine_reap_tokens(struct vbio_engine *eng, int64_t *tokens, int64_t *results, int max, int64_t timeout_ns);
/* Submit ops (may be 0) and reap finished ones in one call: with io_uring one io_uring_enter both
 * submits and waits when nothing has completed yet. For the completion thread's resubmissions. */
int vbio_engine_submit_reap(struct vbio_engine *eng, struct vbio_op **ops, int nops, int64_t *tokens,
                            int64_t *results, int max, int64_t timeout_ns);
/* Thread engine, worker side (-EINVAL for io_uring). Submits ops (may be 0; the first runs on this
 * thread), releases the completer role if `holding`, then runs queued ops until this thread takes
 * the completer role with finished ops to hand back: returns their count (tokens/results filled, at
 * most max, which must be 1 to 256, else -EINVAL) and the caller holds the role until its next
 * call, which it must make with holding=1. Returns 0 after vbio_engine_wake once nothing is
 * queued, running or being completed: the worker should then exit. */
int vbio_engine_work(struct vbio_engine *eng, struct vbio_op **ops, int nops, int holding, int64_t *tokens,
                     int64_t *results, int max);
/* Fill a one-buffer readv/writev op whose `iov` already points at room for one iovec. Checks the
 * O_DIRECT alignment first: returns 0, or VBIO_MISALIGNED_OFFSET / _LENGTH / _ADDRESS. */
int vbio_op_prep1(struct vbio_op *op, int opcode, int fd, uint64_t offset, void *base, size_t len,
                  uint32_t align, uint32_t mem_align);
/* 0 if offset and every lens[i] are multiples of align and every bases[i] of mem_align, else the
 * VBIO_MISALIGNED_* code of the first fault (offset, then the buffers in order). */
int vbio_misaligned(uint64_t offset, void *bases[], size_t lens[], int n, uint32_t align, uint32_t mem_align);
/* The same for n buffers (bases[i], lens[i]): `iov` must point at room for n iovecs. */
int vbio_op_prepv(struct vbio_op *op, int opcode, int fd, uint64_t offset, void *bases[], size_t lens[], int n,
                  uint32_t align, uint32_t mem_align);
/* io_uring: make one blocked (or the next) vbio_engine_reap return. Threads: stop the workers
 * once every op is delivered (vbio_engine_work returns 0). */
int vbio_engine_wake(struct vbio_engine *eng);
/* Ops submitted and not yet reaped. */
int64_t vbio_engine_inflight(struct vbio_engine *eng);
/* io_uring, diagnostics: how often a submission had to wake the completion thread waiting on the
 * engine's other ring (each costs a NOP through that ring). */
int64_t vbio_engine_cross_wakes(struct vbio_engine *eng);
/* Free the engine; the caller must have reaped every op first. */
void vbio_engine_close(struct vbio_engine *eng);

/* 0 if an io_uring can be set up here, else -errno (ENOSYS, EPERM from io_uring_disabled or
 * seccomp, ...). */
int vbio_uring_probe(void);
/* Testing hook: make every later io_uring_setup fail with -err (0 restores the real call). */
void vbio_debug_fail_uring_setup(int err);

/* Files. */
int vbio_open(const char *path, int flags, int *fd_out);
int vbio_close(int fd);
/* Required alignment for O_DIRECT: statx(STATX_DIOALIGN) where the kernel answers, BLKSSZGET for
 * block devices, else 4096. */
int vbio_dio_align(int fd, uint32_t *offset_align, uint32_t *mem_align);
int vbio_size(int fd, int64_t *size);
int vbio_is_blockdev(int fd);
int64_t vbio_preadv(int fd, struct iovec *iov, int iovcnt, uint64_t offset);
int64_t vbio_pwritev(int fd, struct iovec *iov, int iovcnt, uint64_t offset);
int vbio_fdatasync(int fd);
int vbio_fallocate(int fd, int mode, uint64_t offset, uint64_t length);
int vbio_ftruncate(int fd, uint64_t size);
/* Start writing the dirty page-cache pages of [offset, offset+nbytes) to the device without waiting
 * for them (sync_file_range SYNC_FILE_RANGE_WRITE; nbytes 0 = to the end of the file). Durability
 * still needs vbio_fdatasync; this only leaves it less to do. */
int vbio_start_writeback(int fd, uint64_t offset, uint64_t nbytes);
/* lseek with whence VBIO_SEEK_DATA or VBIO_SEEK_HOLE: the offset, or -errno (-ENXIO past data). */
int64_t vbio_seek(int fd, int64_t offset, int whence);

/* Zero detection: out[i] = 1 if granule i of buf[0..len) (granule bytes each, the last one maybe
 * shorter) holds only zero bytes, else 0. Returns 0, -EINVAL for granule 0, or -EFAULT if reading
 * buf raised SIGBUS: buf may be a mapping of a file that shrank meanwhile, and the fault ends the
 * scan instead of the process (a guard on this thread only; other SIGBUS go to the handler that
 * was installed before). */
int vbio_zero_granules(const void *buf, size_t len, size_t granule, uint8_t *out);

/* Aligned memory, zero-filled. */
void *vbio_alloc(size_t size, size_t align);
void vbio_free(void *p);

/* The shim's version string, compared with the Python package at import. */
const char *vbio_version(void);
