/* vbio_threads.c: the thread engine, for hosts where io_uring cannot be had.
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
 * op on); a woken worker wakes the next while work is left.
 *
 * Sleeping without a lost wake-up: a worker counts itself idle, reads `wake_seq`, then checks for
 * work and for the stop condition, and sleeps only if `wake_seq` still has the value it read.
 * Whoever makes work or the stop condition visible then reads `idle` and, if anyone sleeps, bumps
 * `wake_seq` before the futex wake. (Sequentially consistent atomics on both sides: one of the two
 * always sees the other's write.)
 */
#include "vbio_internal.h"

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

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

int pool_init(struct vbio_engine *eng)
{
    struct threadpool *p = &eng->pool;
    memset(p, 0, sizeof *p);
    pthread_mutex_init(&p->lock, NULL);
    return 0;
}

int pool_submit(struct threadpool *p, struct vbio_op **ops, int n)
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

void pool_stop(struct threadpool *p)
{
    atomic_store(&p->stopping, 1);
    pool_wake(p, INT_MAX);
}

void pool_close(struct threadpool *p) { pthread_mutex_destroy(&p->lock); }
