/* vring: the virtio layer's native accelerator (vblock.virtio._vring), apart from the host I/O
 * shim so that nothing under vblock.virtio knows what a descriptor is.
 *
 * Like vbio.h, this file is both the C header and the cffi cdef (native/build_vring.py): only
 * declarations and integer constants. Addresses are guest-physical, offsets and lengths in bytes.
 * Where a constant restates a kernel number, vring.c proves it equal to the kernel header's.
 */

#define VRING_VERSION 2

/* vring_blk_frame's answer when it leaves a chain to the reference. */
#define VRING_SLOW -1

/* virtio-blk request types the fast path serves (5.2.6; the kernel's VIRTIO_BLK_T_IN / _OUT). */
#define VRING_BLK_T_IN 0
#define VRING_BLK_T_OUT 1

/* What vring_blk_frame walks over, set once per queue by the caller, who keeps the memory it
 * points to alive and unmoved while it is in use. */
struct vring_split {
    const uint8_t *region; /* one region of guest memory, mapped here ... */
    uint64_t region_gpa;   /* ... at guest addresses [region_gpa, region_gpa + region_len) */
    uint64_t region_len;
    const uint8_t *table;  /* the queue's descriptor table: qsize little-endian struct virtq_desc */
    uint32_t qsize;
    uint32_t indirect_ok;  /* VIRTIO_F_INDIRECT_DESC negotiated */
    uint32_t indirect_max; /* entries an indirect table may hold */
    uint32_t out_max;      /* buffers `out` has room for (at most 65535) */
    uint64_t *out;         /* 2 + 2 * out_max entries, written by each walk */
};

/* Walk the split-virtqueue descriptor chain at `head` of w->table and, if it is a virtio-blk IN or
 * OUT request in the standard layout, say where its parts are.
 *
 * The walk applies exactly the rules of vblock.virtio.chain.walk, the reference: head and next
 * below the table size, at most qsize descriptors in the direct part and at most len/16 in an
 * indirect table (which bounds loops), INDIRECT only if indirect_ok, never with NEXT, never
 * nested, with a length that is a non-zero multiple of 16 and at most indirect_max entries; no
 * zero-length buffer; readable buffers before writable ones; a chain total below 2^32; every
 * buffer and indirect table inside w's region; at most out_max buffers. Each descriptor, and the
 * request header, is read once into a local copy.
 *
 * The standard layout: a 16-byte readable header buffer first, a 1-byte writable status buffer
 * last, and data buffers between them, all writable for IN (type 0), all readable for OUT
 * (type 1). For such a request it returns `d | type << 16`, d the number of data buffers, with
 * out[0] = the header's sector, out[1] = data bytes, out[2] = the status byte's offset in the
 * region, and out[4 + 2i], out[5 + 2i] = start and end offsets of data buffer i in the region.
 *
 * Anything else (a broken rule, another request type or layout, a buffer outside the region)
 * gives VRING_SLOW: the caller walks and parses the chain with the reference, which reads it
 * again and answers it. Nothing the caller acts on comes from two reads of one descriptor. */
int64_t vring_blk_frame(const struct vring_split *w, uint32_t head);

/* CPU memory fences for rings shared with a driver that runs concurrently (a vhost-user front-end's
 * vCPUs): acquire after reading an index the other side publishes, release before publishing ours,
 * full between a store and a load that must not pass it (virtio's used_event and re-check cases).
 * C11 atomic_thread_fence with the matching memory order. */
void vring_fence_acquire(void);
void vring_fence_release(void);
void vring_fence_full(void);

/* The version string, compared with the Python package at import. */
const char *vring_version(void);
