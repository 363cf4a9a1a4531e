/* vbio_file.c: the shim's files and memory: open and probe files, synchronous I/O (the thread
 * engine's workers run their ops through op_run_sync), aligned buffers, and the version string.
 * See vbio.h for the contract of each function. */
#include "vbio_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

/* vbio.h is also the cffi cdef, which cannot include the kernel's headers: it restates the
 * kernel's numbers that cross it, and the build proves each one equal to the header's. */
_Static_assert(VBIO_FALLOC_KEEP_SIZE == FALLOC_FL_KEEP_SIZE,
               "VBIO_FALLOC_KEEP_SIZE is not the kernel's");
_Static_assert(VBIO_FALLOC_PUNCH_HOLE == FALLOC_FL_PUNCH_HOLE,
               "VBIO_FALLOC_PUNCH_HOLE is not the kernel's");
_Static_assert(VBIO_FALLOC_ZERO_RANGE == FALLOC_FL_ZERO_RANGE,
               "VBIO_FALLOC_ZERO_RANGE is not the kernel's");
_Static_assert(VBIO_SEEK_DATA == SEEK_DATA,
               "VBIO_SEEK_DATA is not the kernel's");
_Static_assert(VBIO_SEEK_HOLE == SEEK_HOLE,
               "VBIO_SEEK_HOLE is not the kernel's");

#define VBIO_STR2(x) #x
#define VBIO_STR(x) VBIO_STR2(x)

const char *vbio_version(void) { return VBIO_STR(VBIO_VERSION); }

/* -- memory ------------------------------------------------------------------------------------ */

void *vbio_alloc(size_t size, size_t align)
{
    void *p = NULL;
    if (align < sizeof(void *))
        align = sizeof(void *);
    if (size == 0)
        size = 1;
    if (posix_memalign(&p, align, size) != 0)
        return NULL;
    memset(p, 0, size);
    return p;
}

void vbio_free(void *p) { free(p); }

/* -- files ------------------------------------------------------------------------------------- */

int vbio_open(const char *path, int flags, int *fd_out)
{
    int oflags = O_CLOEXEC;
    oflags |= (flags & VBIO_O_RDONLY) ? O_RDONLY : O_RDWR;
    if (flags & VBIO_O_DIRECT)
        oflags |= O_DIRECT;
    if (flags & VBIO_O_CREATE)
        oflags |= O_CREAT;
    int fd;
    do {
        fd = open(path, oflags, 0644);
    } while (fd < 0 && errno == EINTR);
    if (fd < 0)
        return -errno;
    *fd_out = fd;
    return 0;
}

int vbio_close(int fd) { return close(fd) < 0 ? -errno : 0; }

static int vbio_statx(int fd, unsigned int mask, struct statx *stx)
{
    memset(stx, 0, sizeof *stx);
    long r = syscall(SYS_statx, fd, "", AT_EMPTY_PATH, mask, stx);
    return r < 0 ? -errno : 0;
}

int vbio_is_blockdev(int fd)
{
    struct statx stx;
    int r = vbio_statx(fd, STATX_TYPE, &stx);
    if (r < 0)
        return r;
    return S_ISBLK(stx.stx_mode);
}

int vbio_dio_align(int fd, uint32_t *offset_align, uint32_t *mem_align)
{
    struct statx stx;
    int r = vbio_statx(fd, STATX_TYPE | STATX_DIOALIGN, &stx);
    if (r == 0 && (stx.stx_mask & STATX_DIOALIGN) && stx.stx_dio_offset_align) {
        *offset_align = stx.stx_dio_offset_align;
        *mem_align = stx.stx_dio_mem_align ? stx.stx_dio_mem_align : stx.stx_dio_offset_align;
        return 0;
    }
    if (r == 0 && S_ISBLK(stx.stx_mode)) {
        int ssz = 0;
        if (ioctl(fd, BLKSSZGET, &ssz) == 0 && ssz > 0) {
            *offset_align = (uint32_t)ssz;
            *mem_align = (uint32_t)ssz;
            return 0;
        }
    }
    *offset_align = 4096;
    *mem_align = 4096;
    return 0;
}

int vbio_size(int fd, int64_t *size)
{
    struct statx stx;
    int r = vbio_statx(fd, STATX_TYPE | STATX_SIZE, &stx);
    if (r < 0)
        return r;
    if (S_ISBLK(stx.stx_mode)) {
        uint64_t bytes = 0;
        if (ioctl(fd, BLKGETSIZE64, &bytes) < 0)
            return -errno;
        *size = (int64_t)bytes;
    } else {
        *size = (int64_t)stx.stx_size;
    }
    return 0;
}

void iov_advance(struct vbio_op *op, size_t n)
{
    while (n > 0 && op->iov_first < op->iovcnt) {
        struct iovec *v = &op->iov[op->iov_first];
        if (n >= v->iov_len) {
            n -= v->iov_len;
            v->iov_base = (char *)v->iov_base + v->iov_len;
            v->iov_len = 0;
            op->iov_first++;
        } else {
            v->iov_base = (char *)v->iov_base + n;
            v->iov_len -= n;
            n = 0;
        }
    }
}

static uint64_t iov_total(const struct iovec *iov, int n)
{
    uint64_t t = 0;
    for (int i = 0; i < n; i++)
        t += iov[i].iov_len;
    return t;
}

/* Synchronous readv/writev of a whole op: loops over short transfers, EINTR and EAGAIN. */
static int64_t op_rw_sync(struct vbio_op *op)
{
    int is_write = op->opcode == VBIO_OP_WRITEV;
    while ((uint64_t)op->done < op->length) {
        ssize_t n;
        struct iovec *v = op->iov + op->iov_first;
        int cnt = op->iovcnt - op->iov_first;
        if (cnt > IOV_MAX)
            cnt = IOV_MAX;
        if (is_write)
            n = pwritev(op->fd, v, cnt, (off_t)(op->offset + op->done));
        else
            n = preadv(op->fd, v, cnt, (off_t)(op->offset + op->done));
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            return -errno;
        }
        if (n == 0) {
            if (is_write)
                return -EIO; /* a write that moves nothing would loop forever */
            break;           /* end of file */
        }
        op->done += n;
        iov_advance(op, (size_t)n);
    }
    return op->done;
}

void op_start(struct vbio_op *op)
{
    op->done = 0;
    op->iov_first = 0;
    op->result = 0;
    if (op->opcode == VBIO_OP_READV || op->opcode == VBIO_OP_WRITEV)
        op->length = iov_total(op->iov, op->iovcnt);
}

int64_t vbio_preadv(int fd, struct iovec *iov, int iovcnt, uint64_t offset)
{
    struct vbio_op op = {.opcode = VBIO_OP_READV, .fd = fd, .offset = offset, .iov = iov, .iovcnt = iovcnt};
    op_start(&op);
    return op_rw_sync(&op);
}

int64_t vbio_pwritev(int fd, struct iovec *iov, int iovcnt, uint64_t offset)
{
    struct vbio_op op = {.opcode = VBIO_OP_WRITEV, .fd = fd, .offset = offset, .iov = iov, .iovcnt = iovcnt};
    op_start(&op);
    return op_rw_sync(&op);
}

int vbio_fdatasync(int fd)
{
    int r;
    do {
        r = fdatasync(fd);
    } while (r < 0 && errno == EINTR);
    return r < 0 ? -errno : 0;
}

int vbio_fallocate(int fd, int mode, uint64_t offset, uint64_t length)
{
    int r;
    do {
        r = fallocate(fd, mode, (off_t)offset, (off_t)length);
    } while (r < 0 && errno == EINTR);
    return r < 0 ? -errno : 0;
}

int vbio_ftruncate(int fd, uint64_t size)
{
    int r;
    do {
        r = ftruncate(fd, (off_t)size);
    } while (r < 0 && errno == EINTR);
    return r < 0 ? -errno : 0;
}

int vbio_start_writeback(int fd, uint64_t offset, uint64_t nbytes)
{
    int r;
    do {
        r = sync_file_range(fd, (off_t)offset, (off_t)nbytes, SYNC_FILE_RANGE_WRITE);
    } while (r < 0 && errno == EINTR);
    return r < 0 ? -errno : 0;
}

int64_t vbio_seek(int fd, int64_t offset, int whence)
{
    off_t r = lseek(fd, (off_t)offset, whence);
    return r < 0 ? -errno : (int64_t)r;
}

int64_t op_run_sync(struct vbio_op *op)
{
    switch (op->opcode) {
    case VBIO_OP_READV:
    case VBIO_OP_WRITEV:
        return op_rw_sync(op);
    case VBIO_OP_FDATASYNC:
        return vbio_fdatasync(op->fd);
    case VBIO_OP_FALLOCATE:
        return vbio_fallocate(op->fd, op->mode, op->offset, op->length);
    case VBIO_OP_NOP:
        return 0;
    default:
        return -EINVAL;
    }
}
