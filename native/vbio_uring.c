/* vbio_uring.c: the io_uring engine, through raw system calls (no liburing): an ordinary ring and,
 * above a queue depth, one polled by the process's SQPOLL kernel thread; the reaping thread's
 * adaptive busy-wait; resubmission of short transfers. See vbio.h for the contract and
 * vbio_engine.c for the calls that reach here. */
#include "vbio_internal.h"

#include <errno.h>
#include <limits.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

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

int uring_reap(struct vbio_engine *eng, struct vbio_op **out, int max, int64_t timeout_ns)
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

/* Push ops and enter the kernel once to submit them and, when nothing has completed yet, to wait
 * for a completion as well: the completion thread's resubmissions cost no extra syscall. */
void uring_submit_and_wait(struct vbio_engine *eng, struct vbio_op **ops, int n, int64_t timeout_ns)
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


/* -- the engine's io_uring side (called by vbio_engine.c) -------------------------------------- */

int uring_engine_open(struct vbio_engine *eng, uint32_t entries, uint32_t poll_depth, int64_t spin_max_ns)
{
    eng->spin_max_ns = spin_max_ns > 0 ? spin_max_ns : 0;
    eng->ring.fd = eng->pring.fd = -1;
    int e = uring_init(&eng->ring, entries ? entries : 256, 0);
    if (e == 0 && poll_depth > 0 && eng->ring.ext_arg) {
        /* Optional: where SQPOLL is refused (old kernels, seccomp) the ordinary ring does all. */
        int anchor = sqpoll_anchor();
        if (anchor >= 0 && uring_init(&eng->pring, entries ? entries : 256, anchor) == 0)
            eng->poll_depth = (int)poll_depth;
        else
            eng->pring.fd = -1;
    }
    return e;
}

int uring_engine_submit(struct vbio_engine *eng, struct vbio_op **ops, int n)
{
    struct uring *r = uring_route(eng);
    atomic_fetch_add(&r->inflight, n);
    int s = uring_submit(r, ops, n);
    if (s < n)
        atomic_fetch_sub(&r->inflight, n - (s < 0 ? 0 : s));
    struct uring *w = atomic_load(&eng->waiting);
    if (w && w != r) {
        atomic_fetch_add(&eng->cross_wakes, 1);
        uring_wake(w); /* the completion thread sleeps on the other ring */
    }
    return s;
}

int uring_engine_wake(struct vbio_engine *eng)
{
    if (eng->pring.fd >= 0)
        uring_wake(&eng->pring);
    return uring_wake(&eng->ring);
}

void uring_engine_close(struct vbio_engine *eng)
{
    uring_close(&eng->ring);
    if (eng->pring.fd >= 0)
        uring_close(&eng->pring);
}
