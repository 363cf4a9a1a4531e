/* vbio_engine.c: the engine API of vbio.h. Opening, submitting, waking and closing go to the engine
 * of the engine's kind (vbio_uring.c, vbio_threads.c); reaping is the io_uring engine's (the
 * thread engine's workers deliver through vbio_engine_work); preparing and checking ops is the
 * same for both. */
#include "vbio_internal.h"

#include <errno.h>
#include <stdlib.h>

int vbio_engine_open(int kind, uint32_t entries, uint32_t poll_depth, int64_t spin_max_ns, struct vbio_engine **out)
{
    struct vbio_engine *eng = calloc(1, sizeof *eng);
    if (!eng)
        return -ENOMEM;
    eng->kind = kind;
    int e;
    if (kind == VBIO_ENGINE_URING)
        e = uring_engine_open(eng, entries, poll_depth, spin_max_ns);
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

int vbio_engine_submit(struct vbio_engine *eng, struct vbio_op **ops, int n)
{
    if (n <= 0)
        return 0;
    for (int i = 0; i < n; i++)
        op_start(ops[i]);
    atomic_fetch_add(&eng->inflight, n);
    int s = eng->kind == VBIO_ENGINE_URING ? uring_engine_submit(eng, ops, n)
                                           : pool_submit(&eng->pool, ops, n);
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

int vbio_engine_wake(struct vbio_engine *eng)
{
    if (eng->kind == VBIO_ENGINE_URING)
        return uring_engine_wake(eng);
    pool_stop(&eng->pool);
    return 0;
}

int64_t vbio_engine_inflight(struct vbio_engine *eng) { return atomic_load(&eng->inflight); }

int64_t vbio_engine_cross_wakes(struct vbio_engine *eng) { return atomic_load(&eng->cross_wakes); }

void vbio_engine_close(struct vbio_engine *eng)
{
    if (!eng)
        return;
    if (eng->kind == VBIO_ENGINE_URING)
        uring_engine_close(eng);
    else
        pool_close(&eng->pool);
    free(eng);
}
