/* vbio: aligned host I/O for vblock. io_uring through raw syscalls (no liburing), with a pthread
 * engine for hosts where io_uring cannot be had. See vbio.h for the contract of each function. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/falloc.h>
#include <linux/futex.h>
#include <linux/fs.h>
#include <linux/io_uring.h>
#include <linux/stat.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "vbio.h"

#define VBIO_STR2(x) #x
#define VBIO_STR(x) VBIO_STR2(x)

const char *vbio_version(void) { return VBIO_STR(VBIO_VERSION); }

/* ---------------------------------------------------------------------------------------------
 * Memory and fences
 */

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

void vbio_fence_acquire(void) { atomic_thread_fence(memory_order_acquire); }
void vbio_fence_release(void) { atomic_thread_fence(memory_order_release); }
void vbio_fence_full(void) { atomic_thread_fence(memory_order_seq_cst); }

/* ---------------------------------------------------------------------------------------------
 * Files
 */

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
    return (stx.stx_mode & 0170000) == 0060000;
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
    if (r == 0 && (stx.stx_mode & 0170000) == 0060000) {
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
    if ((stx.stx_mode & 0170000) == 0060000) {
        uint64_t bytes = 0;
        if (ioctl(fd, BLKGETSIZE64, &bytes) < 0)
            return -errno;
        *size = (int64_t)bytes;
    } else {
        *size = (int64_t)stx.stx_size;
    }
    return 0;
}

/* Move the iovec window past `n` bytes already transferred: iov[first..] is rewritten in place. */
static void iov_advance(struct vbio_op *op, size_t n)
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

static void op_start(struct vbio_op *op)
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

static int64_t op_run_sync(struct vbio_op *op)
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

/* ---------------------------------------------------------------------------------------------
 * Engines
 */

struct uring {
    int fd;
    uint32_t sq_entries, cq_entries;
    void *sq_map, *cq_map;
    size_t sq_map_len, cq_map_len;
    struct io_uring_sqe *sqes;
    size_t sqes_len;
    _Atomic uint32_t *sq_head, *sq_tail, *cq_head, *cq_tail;
    uint32_t sq_mask, cq_mask;
    uint32_t *sq_array;
    struct io_uring_cqe *cqes;
    int ext_arg;
    _Atomic int64_t inflight; /* ops handed to this ring and not yet reaped */
    int sqpoll; /* a kernel thread consumes the SQ: enter only to wake it or to wait */
    _Atomic uint32_t *sq_flags;
    pthread_mutex_t sq_lock;
    struct vbio_op wake_op; /* a NOP whose completion only wakes the reaper */
    /* Ops the completion thread failed to resubmit or submit (result set): handed back by the
     * next reap. Touched only by the completion thread. */
    struct vbio_op *failed_head;
};

struct threadpool {
    pthread_mutex_t lock;   /* guards the work queue (held only to link or unlink an op) */
    struct vbio_op *work_head, *work_tail; /* submitted, not started */
    _Atomic int queued;     /* ops on the work queue, for looks without the lock */
    /* finished ops not yet taken by the completer: a stack, pushed without the lock by the worker
     * that ran the op, emptied in one exchange by the completer (so no ABA) */
    _Atomic(struct vbio_op *) done;
    struct vbio_op *backlog; /* finished ops taken off `done`, oldest first: the completer's own */
    _Atomic int completer;   /* a worker holds the completer role */
    _Atomic int spinning;    /* a worker is looking for work before it sleeps */
    _Atomic int idle;        /* workers asleep (or about to sleep) on `wake_seq` */
    _Atomic uint32_t wake_seq; /* futex word: bumped by every wake-up */
    _Atomic int stopping;    /* vbio_engine_wake: return 0 once nothing is left */
};

struct vbio_engine {
    int kind;
    _Atomic int64_t inflight;
    /* io_uring: the ordinary ring, whose submitting thread enters the kernel itself (the lowest
     * latency with few requests in flight), and, when poll_depth > 0 and the kernel allows it, a
     * ring polled by a kernel thread (SQPOLL), used while more than poll_depth requests are in
     * flight: the submission work then runs on another CPU, in parallel with the completion
     * thread's Python callbacks. Either ring's fd is -1 when absent. */
    struct uring ring, pring;
    int poll_depth;
    /* The ring the completion thread is blocked on, if any. A submitter that puts ops on the other
     * ring wakes it (both sides use sequentially consistent accesses: either the reaper sees the
     * new ops before it sleeps, or the submitter sees it asleep). */
    struct uring *_Atomic waiting;
    /* Adaptive busy-waiting of the reaping thread (see vbio_engine_open); only that thread uses
     * spin_ns. */
    int64_t spin_max_ns, spin_ns;
    _Atomic int64_t cross_wakes; /* submitters that woke the reaper waiting on the other ring */
    struct threadpool pool;
};

static _Atomic int fail_uring_setup;

void vbio_debug_fail_uring_setup(int err) { fail_uring_setup = err; }

static int sys_io_uring_setup(uint32_t entries, struct io_uring_params *p)
{
    int err = fail_uring_setup;
    if (err)
        return -err;
    long r = syscall(__NR_io_uring_setup, entries, p);
    return r < 0 ? -errno : (int)r;
}

static int sys_io_uring_enter(int fd, uint32_t to_submit, uint32_t min_complete, uint32_t flags,
                              void *arg, size_t argsz)
{
    long r = syscall(__NR_io_uring_enter, fd, to_submit, min_complete, flags, arg, argsz);
    return r < 0 ? -errno : (int)r;
}

/* Hand `to_submit` pushed SQEs to the kernel, waiting for `min_complete` completions when flags
 * has GETEVENTS. With SQPOLL the kernel thread takes them by itself: enter only to wake it (when it
 * has gone idle) or to wait. Returns the count submitted or -errno, as io_uring_enter. */
static int uring_enter(struct uring *r, uint32_t to_submit, uint32_t min_complete, uint32_t flags,
                       void *arg, size_t argsz)
{
    if (r->sqpoll) {
        atomic_thread_fence(memory_order_seq_cst); /* tail store before reading NEED_WAKEUP */
        if (atomic_load_explicit(r->sq_flags, memory_order_relaxed) & IORING_SQ_NEED_WAKEUP)
            flags |= IORING_ENTER_SQ_WAKEUP;
        else if (!(flags & (IORING_ENTER_GETEVENTS | IORING_ENTER_SQ_WAIT)))
            return (int)to_submit;
    }
    return sys_io_uring_enter(r->fd, to_submit, min_complete, flags, arg, argsz);
}

static void uring_unmap(struct uring *r)
{
    if (r->sqes && r->sqes != MAP_FAILED)
        munmap(r->sqes, r->sqes_len);
    if (r->cq_map && r->cq_map != MAP_FAILED && r->cq_map != r->sq_map)
        munmap(r->cq_map, r->cq_map_len);
    if (r->sq_map && r->sq_map != MAP_FAILED)
        munmap(r->sq_map, r->sq_map_len);
}

/* Set up ring r. sq_wq_fd: 0 for an ordinary ring, -1 for a ring with its own SQPOLL thread, or
 * the fd of a SQPOLL ring whose kernel thread this ring shares. */
#define SQPOLL_IDLE_MS 2 /* the polling kernel thread sleeps after this long without work */

static int uring_init(struct uring *r, uint32_t entries, int sq_wq_fd)
{
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    memset(r, 0, sizeof *r);
    p.flags = IORING_SETUP_CLAMP;
    if (sq_wq_fd != 0) {
        p.flags |= IORING_SETUP_SQPOLL;
        p.sq_thread_idle = SQPOLL_IDLE_MS;
        if (sq_wq_fd > 0) {
            p.flags |= IORING_SETUP_ATTACH_WQ;
            p.wq_fd = (uint32_t)sq_wq_fd;
        }
    }
    int fd = sys_io_uring_setup(entries, &p);
    if (fd < 0)
        return fd;
    r->fd = fd;
    r->sq_entries = p.sq_entries;
    r->cq_entries = p.cq_entries;
    r->ext_arg = (p.features & IORING_FEAT_EXT_ARG) != 0;

    r->sq_map_len = p.sq_off.array + p.sq_entries * sizeof(uint32_t);
    r->cq_map_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    int single = (p.features & IORING_FEAT_SINGLE_MMAP) != 0;
    if (single && r->cq_map_len > r->sq_map_len)
        r->sq_map_len = r->cq_map_len;
    r->sq_map = mmap(NULL, r->sq_map_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd,
                     IORING_OFF_SQ_RING);
    if (r->sq_map == MAP_FAILED)
        goto fail;
    if (single) {
        r->cq_map = r->sq_map;
    } else {
        r->cq_map = mmap(NULL, r->cq_map_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd,
                         IORING_OFF_CQ_RING);
        if (r->cq_map == MAP_FAILED)
            goto fail;
    }
    r->sqes_len = p.sq_entries * sizeof(struct io_uring_sqe);
    r->sqes = mmap(NULL, r->sqes_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQES);
    if (r->sqes == MAP_FAILED)
        goto fail;

    char *sq = r->sq_map, *cq = r->cq_map;
    r->sq_head = (_Atomic uint32_t *)(sq + p.sq_off.head);
    r->sq_tail = (_Atomic uint32_t *)(sq + p.sq_off.tail);
    r->sq_mask = *(uint32_t *)(sq + p.sq_off.ring_mask);
    r->sq_array = (uint32_t *)(sq + p.sq_off.array);
    r->sq_flags = (_Atomic uint32_t *)(sq + p.sq_off.flags);
    r->sqpoll = (p.flags & IORING_SETUP_SQPOLL) != 0;
    r->cq_head = (_Atomic uint32_t *)(cq + p.cq_off.head);
    r->cq_tail = (_Atomic uint32_t *)(cq + p.cq_off.tail);
    r->cq_mask = *(uint32_t *)(cq + p.cq_off.ring_mask);
    r->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
    pthread_mutex_init(&r->sq_lock, NULL);
    r->wake_op.opcode = VBIO_OP_NOP;
    return 0;
fail : {
    int err = -errno;
    uring_unmap(r);
    close(fd);
    return err;
}
}

static void uring_close(struct uring *r)
{
    uring_unmap(r);
    close(r->fd);
    pthread_mutex_destroy(&r->sq_lock);
}

int vbio_uring_probe(void)
{
    struct uring r;
    int err = uring_init(&r, 4, 0);
    if (err < 0)
        return err;
    uring_close(&r);
    return 0;
}

/* Fill the next SQE for op's remaining work. Caller holds sq_lock and has checked for room. */
static void uring_prep(struct uring *r, struct vbio_op *op)
{
    uint32_t tail = atomic_load_explicit(r->sq_tail, memory_order_relaxed);
    uint32_t idx = tail & r->sq_mask;
    struct io_uring_sqe *sqe = &r->sqes[idx];
    memset(sqe, 0, sizeof *sqe);
    sqe->user_data = (uint64_t)(uintptr_t)op;
    sqe->fd = op->fd;
    switch (op->opcode) {
    case VBIO_OP_READV:
    case VBIO_OP_WRITEV: {
        int cnt = op->iovcnt - op->iov_first;
        if (cnt > IOV_MAX)
            cnt = IOV_MAX;
        sqe->opcode = op->opcode == VBIO_OP_READV ? IORING_OP_READV : IORING_OP_WRITEV;
        sqe->addr = (uint64_t)(uintptr_t)(op->iov + op->iov_first);
        sqe->len = (uint32_t)cnt;
        sqe->off = op->offset + (uint64_t)op->done;
        break;
    }
    case VBIO_OP_FDATASYNC:
        sqe->opcode = IORING_OP_FSYNC;
        sqe->fsync_flags = IORING_FSYNC_DATASYNC;
        break;
    case VBIO_OP_FALLOCATE:
        /* io_uring's fallocate: mode in len, length in addr. */
        sqe->opcode = IORING_OP_FALLOCATE;
        sqe->off = op->offset;
        sqe->addr = op->length;
        sqe->len = (uint32_t)op->mode;
        break;
    default:
        sqe->opcode = IORING_OP_NOP;
        break;
    }
    r->sq_array[idx] = idx;
    atomic_store_explicit(r->sq_tail, tail + 1, memory_order_release);
}

/* Queue ops (already started) and enter the kernel; returns how many were submitted or -errno. */
static int uring_submit(struct uring *r, struct vbio_op **ops, int n)
{
    int done = 0;
    pthread_mutex_lock(&r->sq_lock);
    while (done < n) {
        uint32_t head = atomic_load_explicit(r->sq_head, memory_order_acquire);
        uint32_t tail = atomic_load_explicit(r->sq_tail, memory_order_relaxed);
        uint32_t room = r->sq_entries - (tail - head);
        if (room == 0 && r->sqpoll) {
            uring_enter(r, 0, 0, IORING_ENTER_SQ_WAIT, NULL, 0); /* the poller has not caught up */
            continue;
        }
        uint32_t batch = 0;
        while (batch < room && done + (int)batch < n) {
            uring_prep(r, ops[done + batch]);
            batch++;
        }
        uint32_t left = batch;
        while (left > 0) {
            int s = uring_enter(r, left, 0, 0, NULL, 0);
            if (s == -EINTR)
                continue;
            if (s == -EAGAIN || s == -EBUSY) {
                /* Completion backlog: let the kernel flush it, then try again. */
                uring_enter(r, 0, 0, IORING_ENTER_GETEVENTS, NULL, 0);
                continue;
            }
            if (s < 0) {
                /* Unsubmitted SQEs stay in the ring; they go with the next enter. Report the
                 * failure only if nothing at all went in. */
                pthread_mutex_unlock(&r->sq_lock);
                return done > 0 ? done : s;
            }
            left -= (uint32_t)s;
        }
        done += (int)batch;
    }
    pthread_mutex_unlock(&r->sq_lock);
    return done;
}

/* Decide what a CQE means for its op: 1 = finished (result set), 0 = resubmit. */
static int op_settle(struct vbio_op *op, int32_t res)
{
    if (res == -EINTR || res == -EAGAIN)
        return 0;
    if (res < 0) {
        op->result = res;
        return 1;
    }
    if (op->opcode == VBIO_OP_READV || op->opcode == VBIO_OP_WRITEV) {
        if (res == 0) {
            op->result = op->opcode == VBIO_OP_WRITEV && (uint64_t)op->done < op->length ? -EIO : op->done;
            return 1;
        }
        op->done += res;
        iov_advance(op, (size_t)res);
        if ((uint64_t)op->done < op->length)
            return 0; /* short transfer: go on from where it stopped */
        op->result = op->done;
        return 1;
    }
    op->result = res;
    return 1;
}

/* Queue an op that could not be (re)submitted for the next reap, with its error. Completion
 * thread only. */
static void uring_fail(struct uring *r, struct vbio_op *op, int err)
{
    op->result = err;
    op->next = r->failed_head;
    r->failed_head = op;
}

/* Hand the ring's finished ops to out (at most max); short transfers, EINTR and EAGAIN go back
 * to the same ring. Sets *woken when a wake-up NOP is among the completions. */
static int uring_collect(struct vbio_engine *eng, struct uring *r, struct vbio_op **out, int max, int *woken)
{
    int n = 0;
    while (r->failed_head && n < max) {
        out[n++] = r->failed_head;
        r->failed_head = r->failed_head->next;
    }
    for (;;) {
        uint32_t head = atomic_load_explicit(r->cq_head, memory_order_relaxed);
        uint32_t tail = atomic_load_explicit(r->cq_tail, memory_order_acquire);
        struct vbio_op *again[64];
        int nagain = 0;
        while (head != tail && n + nagain < max && nagain < 64) {
            struct io_uring_cqe *cqe = &r->cqes[head & r->cq_mask];
            struct vbio_op *op = (struct vbio_op *)(uintptr_t)cqe->user_data;
            int32_t res = cqe->res;
            head++;
            if (op == &r->wake_op) {
                *woken = 1;
                continue;
            }
            if (op_settle(op, res))
                out[n++] = op;
            else
                again[nagain++] = op;
        }
        atomic_store_explicit(r->cq_head, head, memory_order_release);
        if (!nagain)
            break;
        int s = uring_submit(r, again, nagain);
        for (int i = s < 0 ? 0 : s; i < nagain; i++)
            uring_fail(r, again[i], s < 0 ? s : -EIO);
    }
    atomic_fetch_sub(&r->inflight, n);
    atomic_fetch_sub(&eng->inflight, n);
    return n;
}

static int64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* Wait on ring r for a completion, up to timeout_ns (<0: no limit). 0, -ETIME or -errno. */
static int uring_wait(struct uring *r, int64_t timeout_ns)
{
    int e;
    if (timeout_ns >= 0 && r->ext_arg) {
        struct __kernel_timespec ts = {.tv_sec = timeout_ns / 1000000000, .tv_nsec = timeout_ns % 1000000000};
        struct io_uring_getevents_arg arg;
        memset(&arg, 0, sizeof arg);
        arg.ts = (uint64_t)(uintptr_t)&ts;
        e = uring_enter(r, 0, 1, IORING_ENTER_GETEVENTS | IORING_ENTER_EXT_ARG, &arg, sizeof arg);
    } else {
        e = uring_enter(r, 0, 1, IORING_ENTER_GETEVENTS, NULL, 0);
    }
    if (e == -EINTR || e == -EAGAIN || e == -EBUSY)
        return 0;
    return e < 0 ? e : 0;
}

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static int cq_pending(struct uring *r)
{
    return r->fd >= 0 && atomic_load_explicit(r->cq_tail, memory_order_acquire) !=
                             atomic_load_explicit(r->cq_head, memory_order_relaxed);
}

#define SPIN_MIN_NS 4000 /* the first busy-wait after sleeping; smaller ones go to 0 */

/* Busy-wait up to the engine's current spin time (bounded by deadline, 0 = none) for a completion
 * on either ring. Returns 1 if one came; 0 after the time ran out. */
static int uring_spin(struct vbio_engine *eng, int64_t start, int64_t deadline)
{
    int64_t until = start + eng->spin_ns;
    if (deadline && deadline < until)
        until = deadline;
    do {
        if (cq_pending(&eng->ring) || cq_pending(&eng->pring))
            return 1;
        cpu_relax();
    } while (now_ns() < until);
    return 0;
}

/* Adapt the spin time to a wait that spinning did not cover: it lasted waited_ns in all. */
static void spin_adapt(struct vbio_engine *eng, int64_t waited_ns)
{
    if (waited_ns > eng->spin_max_ns) {
        eng->spin_ns /= 2; /* completions take longer than we may spin: spin less */
        if (eng->spin_ns < SPIN_MIN_NS)
            eng->spin_ns = 0;
    } else {
        eng->spin_ns = eng->spin_ns ? eng->spin_ns * 2 : SPIN_MIN_NS; /* a longer spin would catch it */
        if (eng->spin_ns > eng->spin_max_ns)
            eng->spin_ns = eng->spin_max_ns;
    }
}

/* While both rings have ops in flight, the completion thread waits on the busier one in slices
 * this long and looks at the other between them. Only the switch between low and high queue
 * depths passes through that state, for at most one request's latency. */
#define MIXED_WAIT_NS 20000

static int uring_reap(struct vbio_engine *eng, struct vbio_op **out, int max, int64_t timeout_ns)
{
    struct uring *a = &eng->ring, *b = &eng->pring;
    int64_t deadline = timeout_ns > 0 ? now_ns() + timeout_ns : 0;
    int n = 0, woken = 0;
    int64_t start = 0; /* when this wait began, for the adaptive spin (0: not measured) */
    for (;;) {
        n += uring_collect(eng, a, out + n, max - n, &woken);
        if (b->fd >= 0 && n < max)
            n += uring_collect(eng, b, out + n, max - n, &woken);
        if (n > 0 || woken || timeout_ns == 0)
            return n;
        if (a->failed_head || b->failed_head)
            continue; /* a resubmission failed while collecting: hand it back before any wait */
        if (!start && eng->spin_max_ns > 0 && atomic_load(&eng->inflight) > 0) {
            start = now_ns();
            if (eng->spin_ns > 0 && uring_spin(eng, start, deadline))
                continue;
        }
        int64_t left = -1;
        if (timeout_ns > 0) {
            left = deadline - now_ns();
            if (left <= 0)
                return 0;
        }
        struct uring *w = a;
        if (b->fd >= 0) {
            /* the busier ring; the ordinary one on a tie (nothing in flight: the next op most
             * likely goes there, and waking a waiter on the polled ring costs a NOP through it,
             * which keeps its kernel thread spinning) */
            w = atomic_load(&b->inflight) > atomic_load(&a->inflight) ? b : a;
            atomic_store(&eng->waiting, w);
            struct uring *other = w == a ? b : a;
            if (atomic_load(&other->inflight) > 0 && (left < 0 || left > MIXED_WAIT_NS))
                left = MIXED_WAIT_NS;
        }
        int e = uring_wait(w, left);
        atomic_store(&eng->waiting, NULL);
        if (start && e == 0) {
            /* something finished (rarely only a wake-up NOP); a timed-out slice of a mixed wait
             * goes on measuring the same wait */
            spin_adapt(eng, now_ns() - start);
            start = 0;
        }
        if (e < 0 && e != -ETIME)
            return e;
        if (e == -ETIME && timeout_ns < 0)
            continue;
        if (!w->ext_arg && timeout_ns > 0)
            timeout_ns = 0; /* no timed wait on this kernel: one blocking wait, then report */
    }
}

/* -- thread engine ----------------------------------------------------------------------------
 *
 * The workers are the caller's own threads (Python threads, each in vbio_engine_work with the GIL
 * released), and they deliver completions themselves: no hand-off to a completion thread. At most
 * one worker at a time holds the completer role. A worker that finishes an op takes the role if it
 * is free and returns the finished ops to its caller, which completes them and passes the ops its
 * callbacks submitted to its next vbio_engine_work call; that call releases the role and runs the
 * first of those ops on the same thread. In a closed loop (every completion submits the next
 * request) a request therefore costs no thread wake-up at all, as with psync threads: the only
 * sleep is the one inside the system call.
 *
 * With sixteen workers on two CPUs, a lock that every op takes becomes a convoy: a holder is
 * preempted and the rest queue up in futex sleeps. So the per-op path takes none. A finished op
 * goes onto a lock-free stack, the role is an atomic flag, and idle workers sleep on a futex word
 * of their own rather than a condition variable (whose internal lock the wakers contend for). Only
 * the work queue keeps a mutex, held to link or unlink an op and looked at through an atomic count
 * first. Waking a worker is a system call, and the completer is the one thread every request
 * passes through, so it wakes at most one per call (two when it keeps the role and hands its own
 * op on); a woken worker wakes the next while work is left. (8 KiB random writes at 16 in flight:
 * futex calls a request 1.07 -> 0.3-0.6, context switches 1.52 -> 1.1-1.2, 0.62 -> 0.88 of fio
 * psync.)
 *
 * Sleeping without a lost wake-up: a worker counts itself idle, reads `wake_seq`, then checks for
 * work and for the stop condition, and sleeps only if `wake_seq` still has the value it read.
 * Whoever makes work or the stop condition visible then reads `idle` and, if anyone sleeps, bumps
 * `wake_seq` before the futex wake. (Sequentially consistent atomics on both sides: one of the two
 * always sees the other's write.)
 */

/* A worker with nothing to do looks again for this long before it sleeps (see vbio_engine_work). */
#define POOL_SPIN_NS 10000

static void pool_wake(struct threadpool *p, int n)
{
    atomic_fetch_add(&p->wake_seq, 1);
    syscall(SYS_futex, &p->wake_seq, FUTEX_WAKE_PRIVATE, n, NULL, NULL, 0);
}

/* Wake one sleeping worker for new work, unless one is spinning (it will find the work). */
static void pool_wake_one(struct threadpool *p)
{
    if (atomic_load(&p->idle) > 0 && !atomic_load(&p->spinning))
        pool_wake(p, 1);
}

/* Append ops to the work queue and wake one worker (each worker that takes an op wakes the next
 * while more are queued). */
static void pool_push(struct threadpool *p, struct vbio_op **ops, int n)
{
    pthread_mutex_lock(&p->lock);
    for (int i = 0; i < n; i++) {
        ops[i]->next = NULL;
        if (p->work_tail)
            p->work_tail->next = ops[i];
        else
            p->work_head = ops[i];
        p->work_tail = ops[i];
    }
    atomic_fetch_add(&p->queued, n);
    pthread_mutex_unlock(&p->lock);
    pool_wake_one(p);
}

/* Take the oldest queued op, or NULL; wakes one more worker if ops are left. */
static struct vbio_op *pool_pop(struct threadpool *p)
{
    if (atomic_load(&p->queued) == 0)
        return NULL;
    pthread_mutex_lock(&p->lock);
    struct vbio_op *op = p->work_head;
    int left = 0;
    if (op) {
        p->work_head = op->next;
        if (!p->work_head)
            p->work_tail = NULL;
        left = atomic_fetch_sub(&p->queued, 1) > 1;
    }
    pthread_mutex_unlock(&p->lock);
    if (left)
        pool_wake_one(p);
    return op;
}

static void done_push(struct threadpool *p, struct vbio_op *op)
{
    struct vbio_op *head = atomic_load(&p->done);
    do
        op->next = head;
    while (!atomic_compare_exchange_weak(&p->done, &head, op));
}

/* Finished ops wait for a completer. Any thread may ask: `backlog` is empty whenever the role is
 * free (it is released only with nothing left), so a thread without the role need not look at it. */
static int has_done(struct threadpool *p) { return atomic_load(&p->done) != NULL; }

static int role_take(struct threadpool *p)
{
    int free_ = 0;
    return atomic_load(&p->completer) == 0 && atomic_compare_exchange_strong(&p->completer, &free_, 1);
}

static void role_release(struct threadpool *p)
{
    atomic_store(&p->completer, 0);
    if (atomic_load(&p->stopping) && atomic_load(&p->idle) > 0)
        pool_wake(p, INT_MAX); /* the others re-check the stop condition */
}

/* Move up to max finished ops, oldest first, to tokens/results. Caller holds the completer role. */
static int pool_drain(struct vbio_engine *eng, int64_t *tokens, int64_t *results, int max)
{
    struct threadpool *p = &eng->pool;
    if (!p->backlog) {
        struct vbio_op *op = atomic_exchange(&p->done, NULL), *rev = NULL;
        while (op) { /* the stack is newest first */
            struct vbio_op *next = op->next;
            op->next = rev;
            rev = op;
            op = next;
        }
        p->backlog = rev;
    }
    int n = 0;
    while (p->backlog && n < max) {
        struct vbio_op *op = p->backlog;
        p->backlog = op->next;
        tokens[n] = (int64_t)op->token;
        results[n] = op->result;
        n++;
    }
    atomic_fetch_sub(&eng->inflight, n);
    return n;
}

/* Holding the role: drain finished ops for the caller to deliver, and hand this thread's own op
 * (if any) to the work queue, since delivering comes first. Returns the count (0: nothing was
 * left, and `mine` stays with the caller). */
static int pool_deliver(struct vbio_engine *eng, struct vbio_op *mine, int64_t *tokens, int64_t *results,
                        int max)
{
    int n = pool_drain(eng, tokens, results, max);
    if (n > 0 && mine)
        pool_push(&eng->pool, &mine, 1);
    return n;
}

static int pool_init(struct vbio_engine *eng)
{
    struct threadpool *p = &eng->pool;
    memset(p, 0, sizeof *p);
    pthread_mutex_init(&p->lock, NULL);
    return 0;
}

static int pool_submit(struct threadpool *p, struct vbio_op **ops, int n)
{
    pool_push(p, ops, n);
    return n;
}

/* Something for a worker to do: queued work, or finished ops that no completer is delivering. */
static int pool_ready(struct threadpool *p)
{
    return atomic_load(&p->queued) > 0 || (has_done(p) && !atomic_load(&p->completer));
}

/* Spin up to POOL_SPIN_NS until pool_ready. */
static void pool_spin(struct threadpool *p)
{
    int64_t t0 = now_ns();
    for (;;) {
        for (int i = 0; i < 32; i++) {
            if (pool_ready(p))
                return;
            cpu_relax();
        }
        if (now_ns() - t0 > POOL_SPIN_NS)
            return;
    }
}

int vbio_engine_work(struct vbio_engine *eng, struct vbio_op **ops, int nops, int holding, int64_t *tokens,
                     int64_t *results, int max)
{
    struct threadpool *p = &eng->pool;
    struct vbio_op *mine = NULL;
    int spun = 0;
    if (eng->kind != VBIO_ENGINE_THREADS || max < 1)
        return -EINVAL; /* max < 1 would release the role with finished ops left in `backlog` */
    if (max > 256)
        max = 256;
    for (int i = 0; i < nops; i++)
        op_start(ops[i]);
    atomic_fetch_add(&eng->inflight, nops);
    if (nops > 1)
        pool_push(p, ops + 1, nops - 1);
    if (nops > 0)
        mine = ops[0];
    if (holding) {
        /* More finished while this thread delivered: keep the role and deliver them first (no one
         * else drains while it is held, so there is at least one). */
        if (p->backlog || has_done(p))
            return pool_deliver(eng, mine, tokens, results, max);
        role_release(p);
    }
    for (;;) {
        /* Finished ops first, the role just released included: one a worker left because it saw
         * the role held would otherwise wait for the whole of the next op this thread runs. */
        if (has_done(p) && role_take(p)) {
            int n = pool_deliver(eng, mine, tokens, results, max);
            if (n > 0)
                return n;
            role_release(p); /* the previous holder took them first */
        }
        if (!mine)
            mine = pool_pop(p);
        if (mine) {
            mine->result = op_run_sync(mine);
            done_push(p, mine);
            mine = NULL;
            spun = 0;
            continue; /* look for finished ops (this one among them) first */
        }
        if (pool_ready(p))
            continue;
        int none = 0;
        if (!spun && atomic_compare_exchange_strong(&p->spinning, &none, 1)) {
            /* The completer is busy or nothing is queued: what it is delivering usually submits new
             * work within microseconds, so one worker looks again a little before sleeping (a
             * futex sleep and wake cost more than that, on a VM several times more). One only:
             * more would take CPU time from the completer itself. */
            pool_spin(p);
            atomic_store(&p->spinning, 0);
            spun = 1;
            continue; /* everything again: work may have come while the others saw a spinner */
        }
        spun = 0;
        atomic_fetch_add(&p->idle, 1);
        uint32_t seq = atomic_load(&p->wake_seq);
        /* inflight before completer: an op is counted until the holder that drained it gives the
         * role back, so reading them the other way round could see a drain's inflight == 0 while
         * missing that its callbacks are still running (and may submit more). */
        if (atomic_load(&p->stopping) && atomic_load(&eng->inflight) == 0 && !atomic_load(&p->completer) &&
            atomic_load(&p->queued) == 0) {
            atomic_fetch_sub(&p->idle, 1);
            break;
        }
        if (!pool_ready(p))
            syscall(SYS_futex, &p->wake_seq, FUTEX_WAIT_PRIVATE, seq, NULL, NULL, 0);
        atomic_fetch_sub(&p->idle, 1);
    }
    pool_wake(p, INT_MAX); /* the others re-check the stop condition */
    return 0;
}

/* -- the engine API --------------------------------------------------------------------------- */

/* The process's SQPOLL anchor: a minimal ring, never closed, whose kernel thread every engine's
 * polled ring shares (IORING_SETUP_ATTACH_WQ), so a process has one polling thread, not one per
 * open file. Its fd, or -errno if SQPOLL is unavailable here. */
static int sqpoll_anchor(void)
{
    static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
    static int fd = 0; /* 0: not tried yet */
    pthread_mutex_lock(&lock);
    if (fd == 0) {
        struct uring r;
        int e = uring_init(&r, 1, -1);
        fd = e < 0 ? e : r.fd; /* the mappings stay: the anchor lives as long as the process */
    }
    int ret = fd;
    pthread_mutex_unlock(&lock);
    return ret;
}

int vbio_engine_open(int kind, uint32_t entries, uint32_t poll_depth, int64_t spin_max_ns, struct vbio_engine **out)
{
    struct vbio_engine *eng = calloc(1, sizeof *eng);
    if (!eng)
        return -ENOMEM;
    eng->kind = kind;
    eng->spin_max_ns = kind == VBIO_ENGINE_URING && spin_max_ns > 0 ? spin_max_ns : 0;
    eng->ring.fd = eng->pring.fd = -1;
    int e;
    if (kind == VBIO_ENGINE_URING) {
        e = uring_init(&eng->ring, entries ? entries : 256, 0);
        if (e == 0 && poll_depth > 0 && eng->ring.ext_arg) {
            /* Optional: where SQPOLL is refused (old kernels, seccomp) the ordinary ring does all. */
            int anchor = sqpoll_anchor();
            if (anchor >= 0 && uring_init(&eng->pring, entries ? entries : 256, anchor) == 0)
                eng->poll_depth = (int)poll_depth;
            else
                eng->pring.fd = -1;
        }
    }
    else if (kind == VBIO_ENGINE_THREADS)
        e = pool_init(eng);
    else
        e = -EINVAL;
    if (e < 0) {
        free(eng);
        return e;
    }
    *out = eng;
    return 0;
}

/* Complete a NOP on ring r so that a reaper waiting there returns. */
static int uring_wake(struct uring *r)
{
    struct vbio_op *op = &r->wake_op;
    pthread_mutex_lock(&r->sq_lock);
    uint32_t head = atomic_load_explicit(r->sq_head, memory_order_acquire);
    uint32_t tail = atomic_load_explicit(r->sq_tail, memory_order_relaxed);
    int s = -EBUSY;
    if (tail - head < r->sq_entries) {
        uring_prep(r, op);
        do {
            s = uring_enter(r, 1, 0, 0, NULL, 0);
        } while (s == -EINTR || s == -EAGAIN);
    }
    pthread_mutex_unlock(&r->sq_lock);
    return s < 0 ? s : 0;
}

/* The ring for new ops: the polled one while more than poll_depth ops are in flight (the new ones
 * included, already counted). */
static struct uring *uring_route(struct vbio_engine *eng)
{
    if (eng->poll_depth > 0 && atomic_load(&eng->inflight) > eng->poll_depth)
        return &eng->pring;
    return &eng->ring;
}

int vbio_engine_submit(struct vbio_engine *eng, struct vbio_op **ops, int n)
{
    if (n <= 0)
        return 0;
    for (int i = 0; i < n; i++)
        op_start(ops[i]);
    atomic_fetch_add(&eng->inflight, n);
    int s;
    if (eng->kind == VBIO_ENGINE_URING) {
        struct uring *r = uring_route(eng);
        atomic_fetch_add(&r->inflight, n);
        s = uring_submit(r, ops, n);
        if (s < n)
            atomic_fetch_sub(&r->inflight, n - (s < 0 ? 0 : s));
        struct uring *w = atomic_load(&eng->waiting);
        if (w && w != r) {
            atomic_fetch_add(&eng->cross_wakes, 1);
            uring_wake(w); /* the completion thread sleeps on the other ring */
        }
    } else {
        s = pool_submit(&eng->pool, ops, n);
    }
    int accepted = s < 0 ? 0 : s;
    if (accepted < n)
        atomic_fetch_sub(&eng->inflight, n - accepted);
    return s;
}

int vbio_engine_reap(struct vbio_engine *eng, struct vbio_op **out, int max, int64_t timeout_ns)
{
    if (eng->kind != VBIO_ENGINE_URING)
        return -EINVAL; /* the thread engine's workers deliver: vbio_engine_work */
    return uring_reap(eng, out, max, timeout_ns);
}

/* Push ops and enter the kernel once to submit them and, when nothing has completed yet, to wait
 * for a completion as well: the completion thread's resubmissions cost no extra syscall. */
static void uring_submit_and_wait(struct vbio_engine *eng, struct vbio_op **ops, int n, int64_t timeout_ns)
{
    struct uring *r = uring_route(eng);
    struct uring *other = r == &eng->ring ? &eng->pring : &eng->ring;
    atomic_fetch_add(&r->inflight, n); /* what fails below is handed back by the next reap */
    pthread_mutex_lock(&r->sq_lock);
    uint32_t head = atomic_load_explicit(r->sq_head, memory_order_acquire);
    uint32_t tail = atomic_load_explicit(r->sq_tail, memory_order_relaxed);
    uint32_t room = r->sq_entries - (tail - head);
    int pushed = n < (int)room ? n : (int)room;
    for (int i = 0; i < pushed; i++)
        uring_prep(r, ops[i]);
    pthread_mutex_unlock(&r->sq_lock);
    if (pushed < n) {
        /* More than the ring holds at once: the ordinary path takes the rest; what it cannot
         * submit is handed back failed by the next reap. */
        int s = uring_submit(r, ops + pushed, n - pushed);
        for (int i = s < 0 ? 0 : s; i < n - pushed; i++)
            uring_fail(r, ops[pushed + i], s < 0 ? s : -EIO);
    }
    uint32_t cq_ready = atomic_load_explicit(r->cq_tail, memory_order_acquire) -
                        atomic_load_explicit(r->cq_head, memory_order_relaxed);
    /* Wait in the same call only if nothing can finish on the other ring meanwhile, and unless the
     * reaping path is to spin first (uring_reap). A wait here is timed for the adaptive spin too,
     * or a spin that fell to 0 would never grow again. */
    int wait = cq_ready == 0 && timeout_ns < 0 && eng->spin_ns == 0;
    if (wait && other->fd >= 0) {
        atomic_store(&eng->waiting, r);
        wait = atomic_load(&other->inflight) == 0;
    }
    int64_t t0 = wait && eng->spin_max_ns > 0 ? now_ns() : 0;
    uint32_t left = (uint32_t)pushed;
    while (left > 0) {
        int e = uring_enter(r, left, wait ? 1 : 0, wait ? IORING_ENTER_GETEVENTS : 0, NULL, 0);
        if (e >= 0) {
            left -= (uint32_t)e < left ? (uint32_t)e : left;
            if (wait && t0)
                spin_adapt(eng, now_ns() - t0);
            wait = 0;
            continue;
        }
        if (e == -EINTR || e == -EAGAIN || e == -EBUSY) {
            wait = 0;
            continue;
        }
        /* Submission failed: the SQEs stay in the ring and go with the next submitting enter. */
        pthread_mutex_lock(&r->sq_lock);
        uring_enter(r, left, 0, 0, NULL, 0);
        pthread_mutex_unlock(&r->sq_lock);
        break;
    }
    atomic_store(&eng->waiting, NULL);
}

int vbio_engine_submit_reap(struct vbio_engine *eng, struct vbio_op **ops, int nops, int64_t *tokens,
                            int64_t *results, int max, int64_t timeout_ns)
{
    if (eng->kind != VBIO_ENGINE_URING)
        return -EINVAL;
    if (nops > 0) {
        for (int i = 0; i < nops; i++)
            op_start(ops[i]);
        atomic_fetch_add(&eng->inflight, nops);
        uring_submit_and_wait(eng, ops, nops, timeout_ns);
    }
    return vbio_engine_reap_tokens(eng, tokens, results, max, timeout_ns);
}

int vbio_engine_reap_tokens(struct vbio_engine *eng, int64_t *tokens, int64_t *results, int max, int64_t timeout_ns)
{
    struct vbio_op *ops[256];
    if (max > 256)
        max = 256;
    int n = vbio_engine_reap(eng, ops, max, timeout_ns);
    for (int i = 0; i < n; i++) {
        tokens[i] = (int64_t)ops[i]->token;
        results[i] = ops[i]->result;
    }
    return n;
}

int vbio_op_prep1(struct vbio_op *op, int opcode, int fd, uint64_t offset, void *base, size_t len,
                  uint32_t align, uint32_t mem_align)
{
    return vbio_op_prepv(op, opcode, fd, offset, &base, &len, 1, align, mem_align);
}

int vbio_misaligned(uint64_t offset, void *bases[], size_t lens[], int n, uint32_t align, uint32_t mem_align)
{
    if (align > 1 && offset % align)
        return VBIO_MISALIGNED_OFFSET;
    for (int i = 0; i < n; i++) {
        if (align > 1 && lens[i] % align)
            return VBIO_MISALIGNED_LENGTH;
        if (mem_align > 1 && (uintptr_t)bases[i] % mem_align)
            return VBIO_MISALIGNED_ADDRESS;
    }
    return 0;
}

int vbio_op_prepv(struct vbio_op *op, int opcode, int fd, uint64_t offset, void *bases[], size_t lens[], int n,
                  uint32_t align, uint32_t mem_align)
{
    int err = vbio_misaligned(offset, bases, lens, n, align, mem_align);
    if (err)
        return err;
    op->opcode = opcode;
    op->fd = fd;
    op->offset = offset;
    op->iovcnt = n;
    for (int i = 0; i < n; i++) {
        op->iov[i].iov_base = bases[i];
        op->iov[i].iov_len = lens[i];
    }
    return 0;
}

/* -- zero detection over memory that may fault ---------------------------------------------- */

/* Set while this thread scans in vbio_zero_granules: where a SIGBUS on it jumps to. */
static _Thread_local sigjmp_buf *volatile fault_guard;
static struct sigaction fault_prev;  /* the SIGBUS handler before ours */
static pthread_once_t fault_once = PTHREAD_ONCE_INIT;

static void fault_handler(int sig, siginfo_t *info, void *ctx)
{
    sigjmp_buf *jb = fault_guard;
    if (jb)
        siglongjmp(*jb, 1);
    /* Not a guarded scan: behave as if we were not here. */
    if (fault_prev.sa_flags & SA_SIGINFO) {
        fault_prev.sa_sigaction(sig, info, ctx);
    } else if (fault_prev.sa_handler == SIG_DFL || fault_prev.sa_handler == SIG_IGN) {
        /* Put the old disposition back; the faulting access runs again and meets it (a SIGBUS
         * from a fault cannot be ignored: the kernel then kills the process, as without us). */
        sigaction(SIGBUS, &fault_prev, NULL);
    } else {
        fault_prev.sa_handler(sig);
    }
}

static void fault_install(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = fault_handler;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGBUS, &sa, &fault_prev);
}

static int all_zero(const unsigned char *p, size_t n)
{
    /* Data rarely starts or ends with a zero word: most granules are decided by two loads. */
    if (n >= 16) {
        uint64_t a, b;
        memcpy(&a, p, 8);
        memcpy(&b, p + n - 8, 8);
        if (a | b)
            return 0;
    }
    return n == 0 || (p[0] == 0 && memcmp(p, p + 1, n - 1) == 0);
}

int vbio_zero_granules(const void *buf, size_t len, size_t granule, uint8_t *out)
{
    if (granule == 0)
        return -EINVAL;
    pthread_once(&fault_once, fault_install);
    sigjmp_buf jb;
    if (sigsetjmp(jb, 1)) {
        fault_guard = NULL;
        return -EFAULT;
    }
    fault_guard = &jb;
    const unsigned char *p = buf;
    for (size_t off = 0, i = 0; off < len; off += granule, i++)
        out[i] = (uint8_t)all_zero(p + off, len - off < granule ? len - off : granule);
    fault_guard = NULL;
    return 0;
}

int vbio_engine_wake(struct vbio_engine *eng)
{
    if (eng->kind == VBIO_ENGINE_URING) {
        if (eng->pring.fd >= 0)
            uring_wake(&eng->pring);
        return uring_wake(&eng->ring);
    }
    atomic_store(&eng->pool.stopping, 1);
    pool_wake(&eng->pool, INT_MAX);
    return 0;
}

int64_t vbio_engine_inflight(struct vbio_engine *eng) { return atomic_load(&eng->inflight); }

int64_t vbio_engine_cross_wakes(struct vbio_engine *eng) { return atomic_load(&eng->cross_wakes); }

void vbio_engine_close(struct vbio_engine *eng)
{
    if (!eng)
        return;
    if (eng->kind == VBIO_ENGINE_URING) {
        uring_close(&eng->ring);
        if (eng->pring.fd >= 0)
            uring_close(&eng->pring);
    } else {
        pthread_mutex_destroy(&eng->pool.lock);
    }
    free(eng);
}
