/* vbio_zero.c: zero detection over memory that may fault (vbio_zero_granules; contract in vbio.h).
 * A scan of a file mapping meets SIGBUS where the file shrank under it: a handler installed once
 * per process turns that fault, on a scanning thread only, into -EFAULT. */
#include "vbio_internal.h"

#include <errno.h>
#include <setjmp.h>
#include <signal.h>
#include <string.h>

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
