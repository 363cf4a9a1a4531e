/* vbio_internal.h: what the shim's C files share; private to native/ (never a cffi cdef).
 *
 * The shim is split by subsystem: vbio_file.c (files, memory, and the synchronous run of one op),
 * vbio_uring.c (the io_uring engine), vbio_threads.c (the thread engine), vbio_engine.c (the
 * engine API of vbio.h, which hands each call to the engine of its kind) and vbio_zero.c (the
 * zero scan). Each includes this header first. Functions declared here are hidden: the compiled
 * module exports only the vbio_* API of vbio.h.
 */
#ifndef VBIO_INTERNAL_H
#define VBIO_INTERNAL_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <linux/io_uring.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/uio.h>
#include <time.h>

#include "vbio.h"

#define VBIO_HIDDEN __attribute__((visibility("hidden")))

/* -- engine state ------------------------------------------------------------------------------ */

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

/* -- shared helpers ---------------------------------------------------------------------------- */

static inline int64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* One step of a busy-wait: tells the CPU (and a hypervisor) that this thread spins. */
static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* -- vbio_file.c: ops run synchronously -------------------------------------------------------- */

/* Reset op's progress before it is (re)run; readv/writev get length = the iov total. */
VBIO_HIDDEN void op_start(struct vbio_op *op);
/* Move the iovec window past `n` bytes already transferred: iov[first..] is rewritten in place. */
VBIO_HIDDEN void iov_advance(struct vbio_op *op, size_t n);
/* Run a started op on this thread to its end: its result (bytes, 0 or -errno). */
VBIO_HIDDEN int64_t op_run_sync(struct vbio_op *op);

/* -- vbio_uring.c: the io_uring engine (struct vbio_engine but for `pool`) --------------------- */

VBIO_HIDDEN int uring_engine_open(struct vbio_engine *eng, uint32_t entries, uint32_t poll_depth,
                                  int64_t spin_max_ns);
/* Submit started ops already counted in eng->inflight: how many went in, or -errno. */
VBIO_HIDDEN int uring_engine_submit(struct vbio_engine *eng, struct vbio_op **ops, int n);
VBIO_HIDDEN int uring_reap(struct vbio_engine *eng, struct vbio_op **out, int max, int64_t timeout_ns);
/* Submit started ops already counted in eng->inflight, and wait in the same system call when
 * nothing has completed yet; what cannot be submitted is handed back failed by the next reap. */
VBIO_HIDDEN void uring_submit_and_wait(struct vbio_engine *eng, struct vbio_op **ops, int n,
                                       int64_t timeout_ns);
VBIO_HIDDEN int uring_engine_wake(struct vbio_engine *eng);
VBIO_HIDDEN void uring_engine_close(struct vbio_engine *eng);

/* -- vbio_threads.c: the thread engine (eng->pool; the worker side is vbio_engine_work) -------- */

VBIO_HIDDEN int pool_init(struct vbio_engine *eng);
/* Queue started ops already counted in eng->inflight for the workers: returns n. */
VBIO_HIDDEN int pool_submit(struct threadpool *p, struct vbio_op **ops, int n);
/* Stop the workers once every op is delivered (vbio_engine_wake). */
VBIO_HIDDEN void pool_stop(struct threadpool *p);
VBIO_HIDDEN void pool_close(struct threadpool *p);

#endif
