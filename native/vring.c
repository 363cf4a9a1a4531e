/* vring: the virtio-blk fast path of vblock.virtio (see vring.h for the contract). */
#include <endian.h>
#include <linux/virtio_blk.h>
#include <linux/virtio_ring.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

#include "vring.h"

#define STR2(x) #x
#define STR(x) STR2(x)

enum { DESC_F_NEXT = VRING_DESC_F_NEXT, DESC_F_WRITE = VRING_DESC_F_WRITE,
       DESC_F_INDIRECT = VRING_DESC_F_INDIRECT, DESC_BYTES = 16 };

/* vring.h is also the cffi cdef, which cannot include the kernel's headers: the build proves its
 * copies of kernel numbers equal to them. */
_Static_assert(VRING_BLK_T_IN == VIRTIO_BLK_T_IN, "VRING_BLK_T_IN is not the kernel's");
_Static_assert(VRING_BLK_T_OUT == VIRTIO_BLK_T_OUT, "VRING_BLK_T_OUT is not the kernel's");
_Static_assert(DESC_BYTES == sizeof(struct vring_desc), "a descriptor is not the kernel's size");

struct desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

/* One read of a descriptor the guest may be rewriting: copy it, then a compiler barrier, so every
 * later use is of this copy and never a second load from guest memory. */
static inline struct desc read_desc(const uint8_t *p)
{
    struct desc d;
    memcpy(&d, p, sizeof d);
    __asm__ __volatile__("" ::: "memory");
    d.addr = le64toh(d.addr);
    d.len = le32toh(d.len);
    d.flags = le16toh(d.flags);
    d.next = le16toh(d.next);
    return d;
}

/* Whether [addr, addr + len) lies inside the region, without overflow. */
static inline int inside(uint64_t addr, uint64_t len, uint64_t gpa, uint64_t size)
{
    return addr >= gpa && addr - gpa <= size && len <= size - (addr - gpa);
}

/* The walk of vring_blk_frame (rules in vring.h). Returns `n | r << 16` for a valid chain of n
 * buffers, the first r readable, with out[0], out[1] = readable and writable bytes and out[2 + 2i],
 * out[3 + 2i] = start and end offsets of buffer i in the region; or VRING_SLOW. */
static int64_t walk_split(const struct vring_split *w, uint32_t head)
{
    const uint8_t *region = w->region;
    const uint64_t region_gpa = w->region_gpa, region_len = w->region_len;
    const uint32_t out_max = w->out_max;
    uint64_t *out = w->out;
    if (head >= w->qsize || out_max > 0xFFFF)
        return VRING_SLOW;
    const uint8_t *tab = w->table;
    uint32_t size = w->qsize, ttl = w->qsize, idx = head, nbuf = 0, nread = 0;
    int in_indirect = 0;
    uint64_t rbytes = 0, wbytes = 0;
    for (;;) {
        if (ttl == 0)
            return VRING_SLOW; /* longer than its table allows: a loop */
        ttl--;
        struct desc d = read_desc(tab + (uint64_t)idx * DESC_BYTES);
        if (d.flags & DESC_F_INDIRECT) {
            if (!w->indirect_ok || in_indirect || (d.flags & DESC_F_NEXT))
                return VRING_SLOW;
            if (d.len == 0 || d.len % DESC_BYTES || d.len / DESC_BYTES > w->indirect_max)
                return VRING_SLOW;
            if (!inside(d.addr, d.len, region_gpa, region_len))
                return VRING_SLOW;
            tab = region + (d.addr - region_gpa);
            size = ttl = d.len / DESC_BYTES;
            idx = 0;
            in_indirect = 1;
            continue;
        }
        if (d.len == 0 || !inside(d.addr, d.len, region_gpa, region_len) || nbuf == out_max)
            return VRING_SLOW;
        if (d.flags & DESC_F_WRITE) {
            wbytes += d.len;
        } else {
            if (wbytes)
                return VRING_SLOW; /* readable after writable */
            rbytes += d.len;
            nread++;
        }
        uint64_t start = d.addr - region_gpa;
        out[2 + 2 * nbuf] = start;
        out[3 + 2 * nbuf] = start + d.len;
        nbuf++;
        if (!(d.flags & DESC_F_NEXT)) {
            if (rbytes + wbytes >= (UINT64_C(1) << 32))
                return VRING_SLOW;
            out[0] = rbytes;
            out[1] = wbytes;
            return (int64_t)nbuf | (int64_t)nread << 16;
        }
        if (d.next >= size)
            return VRING_SLOW;
        idx = d.next;
    }
}

int64_t vring_blk_frame(const struct vring_split *w, uint32_t head)
{
    int64_t r = walk_split(w, head);
    if (r < 0)
        return r;
    uint64_t *out = w->out;
    uint32_t n = (uint32_t)(r & 0xFFFF), nread = (uint32_t)(r >> 16);
    /* buffer 0 is the header, buffer n - 1 the status byte, the ones between the data */
    if (n < 2 || nread == 0 || nread == n || out[3] - out[2] != 16 || out[2 * n + 1] - out[2 * n] != 1)
        return VRING_SLOW;
    uint8_t hdr[16];
    memcpy(hdr, w->region + out[2], sizeof hdr);
    __asm__ __volatile__("" ::: "memory");
    uint32_t type;
    uint64_t sector;
    memcpy(&type, hdr, 4);
    memcpy(&sector, hdr + 8, 8);
    type = le32toh(type);
    sector = le64toh(sector);
    uint64_t data_bytes;
    if (type == VRING_BLK_T_IN && nread == 1)
        data_bytes = out[1] - 1;
    else if (type == VRING_BLK_T_OUT && nread == n - 1)
        data_bytes = out[0] - 16;
    else
        return VRING_SLOW;
    out[0] = sector;
    out[1] = data_bytes;
    out[2] = out[2 * n]; /* the status byte; the data pairs are already at out[4 ...] */
    return (int64_t)(n - 2) | (int64_t)type << 16;
}

void vring_fence_acquire(void) { atomic_thread_fence(memory_order_acquire); }
void vring_fence_release(void) { atomic_thread_fence(memory_order_release); }
void vring_fence_full(void) { atomic_thread_fence(memory_order_seq_cst); }

const char *vring_version(void)
{
    return STR(VRING_VERSION);
}
