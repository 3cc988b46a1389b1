/*
 * Polled virtio-blk over virtio-mmio (modern, Version 2), one split
 * virtqueue, many requests in flight.
 *
 * Completion is found by polling the used ring index; no interrupts are
 * used (the avail ring asks the device not to interrupt, or, with
 * EVENT_IDX, used_event is kept half the index space away from the
 * consumer so the device never has a reason to).  That keeps the driver free of IDT/IOAPIC set-up and
 * lets it run unchanged at CPL 3.
 *
 * Ordering (x86, TSO): the CPU does not reorder stores with older stores
 * or loads with older loads, so publishing needs only a compiler barrier
 * between "descriptors + ring entry written" and "avail->idx written", and
 * consuming needs only one between "used->idx read" and "ring entries
 * read".  The one store->load pair that matters, avail->idx store before
 * reading used->flags / avail_event to decide about notifying, gets an
 * mfence.
 */
#include "guest.h"
#include "mem.h"
#include "virtio.h"
#include "vmmio.h"

#define compiler_barrier() __asm__ volatile("" ::: "memory")

static inline void full_barrier(void)
{
	__asm__ volatile("mfence" ::: "memory");
}

static inline uint32_t vr(const struct vblk *v, uint32_t off)
{
	return mmio_read32(v->base + off);
}

static inline void vw(const struct vblk *v, uint32_t off, uint32_t val)
{
	mmio_write32(v->base + off, val);
}

static inline uint16_t load16(const uint16_t *p)
{
	return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}

static inline void store16(uint16_t *p, uint16_t val)
{
	__atomic_store_n(p, val, __ATOMIC_RELEASE);
}

static int quiet;

/* ---- feature names for the info line ---- */
static void print_features(const char *what, uint64_t f)
{
	static const struct {
		int bit;
		const char *name;
	} names[] = {
		{ VIRTIO_BLK_F_SIZE_MAX, "SIZE_MAX" },
		{ VIRTIO_BLK_F_SEG_MAX, "SEG_MAX" },
		{ VIRTIO_BLK_F_GEOMETRY, "GEOMETRY" },
		{ VIRTIO_BLK_F_RO, "RO" },
		{ VIRTIO_BLK_F_BLK_SIZE, "BLK_SIZE" },
		{ VIRTIO_BLK_F_FLUSH, "FLUSH" },
		{ VIRTIO_BLK_F_TOPOLOGY, "TOPOLOGY" },
		{ VIRTIO_BLK_F_CONFIG_WCE, "CONFIG_WCE" },
		{ VIRTIO_BLK_F_MQ, "MQ" },
		{ VIRTIO_BLK_F_DISCARD, "DISCARD" },
		{ VIRTIO_BLK_F_WRITE_ZEROES, "WRITE_ZEROES" },
		{ VIRTIO_F_INDIRECT_DESC, "INDIRECT_DESC" },
		{ VIRTIO_F_EVENT_IDX, "EVENT_IDX" },
		{ 24, "NOTIFY_ON_EMPTY" },
		{ 27, "ANY_LAYOUT" },
		{ VIRTIO_F_VERSION_1, "VERSION_1" },
		{ 33, "ACCESS_PLATFORM" },
		{ VIRTIO_F_RING_PACKED, "RING_PACKED" },
		{ 35, "IN_ORDER" },
		{ 36, "ORDER_PLATFORM" },
		{ 37, "SR_IOV" },
		{ 38, "NOTIFICATION_DATA" },
		{ 40, "RING_RESET" },
	};

	printf("virtio-blk: %s 0x%lx", what, f);
	for (unsigned int i = 0; i < sizeof(names) / sizeof(names[0]); i++)
		if (f & (1ull << names[i].bit))
			printf(" %s", names[i].name);
	printf("\n");
}

/* ---- device discovery and initialisation ---- */
/* The transport registers plus the virtio-blk config fields the driver reads. */
#define VMMIO_MIN_SIZE  (VMMIO_CONFIG + VBLK_CFG_BLK_SIZE + 4)

static int find_device(struct vblk *v, int *nannounced)
{
	struct vmmio_transport t;

	if (vmmio_find(VIRTIO_ID_BLOCK, 0, "virtio-blk", VMMIO_MIN_SIZE, &t, nannounced) < 0)
		return -1;
	v->base = t.base;
	v->slot = t.slot;
	v->irq = t.irq;
	v->announced = t.announced;
	return 0;
}

static void set_status(struct vblk *v, uint32_t bits)
{
	vw(v, VMMIO_STATUS, vr(v, VMMIO_STATUS) | bits);
}

static int fail(struct vblk *v, const char *why)
{
	printf("virtio-blk: %s\n", why);
	set_status(v, VSTAT_FAILED);
	return -2;
}

/* Config space fields that can change are read inside a generation loop. */
static uint64_t read_capacity(struct vblk *v)
{
	uint32_t gen, lo, hi;

	do {
		gen = vr(v, VMMIO_CONFIG_GEN);
		lo = vr(v, VMMIO_CONFIG + VBLK_CFG_CAPACITY);
		hi = vr(v, VMMIO_CONFIG + VBLK_CFG_CAPACITY + 4);
	} while (gen != vr(v, VMMIO_CONFIG_GEN));
	return ((uint64_t)hi << 32) | lo;
}

static int setup_queue(struct vblk *v)
{
	uint32_t max, q;

	vw(v, VMMIO_QUEUE_SEL, 0);
	if (vr(v, VMMIO_QUEUE_READY) != 0)
		return fail(v, "queue 0 already live after reset");
	max = vr(v, VMMIO_QUEUE_NUM_MAX);
	if (max == 0)
		return fail(v, "queue 0 not available (QueueNumMax 0)");
	/* Split rings have power-of-two sizes; take the largest that fits. */
	for (q = 1; q * 2 <= max && q * 2 <= VBLK_QSIZE_CAP; q *= 2)
		;
	v->qsize = (uint16_t)q;

	v->desc = mem_zalloc(sizeof(struct vring_desc) * q, 4096);
	v->avail = mem_zalloc(sizeof(struct vring_avail) + 2 * (q + 1), 4096);
	v->used = mem_zalloc(sizeof(struct vring_used) +
			     sizeof(struct vring_used_elem) * q + 2, 4096);
	if (!v->desc || !v->avail || !v->used)
		return fail(v, "out of memory for the virtqueue");

	for (uint32_t i = 0; i < q; i++)
		v->desc[i].next = (uint16_t)(i + 1);
	v->free_head = 0;
	v->num_free = (uint16_t)q;
	for (uint32_t i = 0; i < VBLK_QSIZE_CAP; i++)
		v->head_tag[i] = -1;

	if (v->use_event_idx)
		/* used_event far from the consumer (see vblk_poll): never reached. */
		v->avail->ring[q] = 0x8000;
	else
		v->avail->flags = VRING_AVAIL_F_NO_INTERRUPT;

	vw(v, VMMIO_QUEUE_NUM, q);
	vw(v, VMMIO_QUEUE_DESC_LO, (uint32_t)(uintptr_t)v->desc);
	vw(v, VMMIO_QUEUE_DESC_HI, (uint32_t)((uint64_t)(uintptr_t)v->desc >> 32));
	vw(v, VMMIO_QUEUE_DRIVER_LO, (uint32_t)(uintptr_t)v->avail);
	vw(v, VMMIO_QUEUE_DRIVER_HI, (uint32_t)((uint64_t)(uintptr_t)v->avail >> 32));
	vw(v, VMMIO_QUEUE_DEVICE_LO, (uint32_t)(uintptr_t)v->used);
	vw(v, VMMIO_QUEUE_DEVICE_HI, (uint32_t)((uint64_t)(uintptr_t)v->used >> 32));
	full_barrier();
	vw(v, VMMIO_QUEUE_READY, 1);
	if (vr(v, VMMIO_QUEUE_READY) != 1)
		return fail(v, "QueueReady did not stick");
	return 0;
}

/* Data descriptors needed for len bytes. */
static uint32_t segs_for(const struct vblk *v, uint32_t len)
{
	if (!len)
		return 0;
	if (!v->size_max)
		return 1;
	return (len + v->size_max - 1) / v->size_max;
}

int vblk_open(struct vblk *v, unsigned int tags, unsigned int opts)
{
	uint64_t want;
	uint32_t st, per_req, lim;
	int announced;

	memset(v, 0, sizeof(*v));
	quiet = !!(opts & VBLK_OPT_QUIET);
	if (find_device(v, &announced) < 0) {
		printf("virtio-blk: no modern virtio-blk device (%d announced on "
		       "the command line, %d slots at 0x%lx)\n", announced,
		       VIRTIO_MMIO_SLOTS, VIRTIO_MMIO_BASE);
		return -1;
	}

	/* Reset and wait for it to finish. */
	vw(v, VMMIO_STATUS, 0);
	for (unsigned int i = 0; vr(v, VMMIO_STATUS) != 0; i++) {
		if (i > 1000000)
			return fail(v, "device does not reset");
		cpu_relax();
	}
	vw(v, VMMIO_STATUS, VSTAT_ACKNOWLEDGE);
	set_status(v, VSTAT_DRIVER);

	vw(v, VMMIO_DEV_FEATURES_SEL, 0);
	v->offered = vr(v, VMMIO_DEV_FEATURES);
	vw(v, VMMIO_DEV_FEATURES_SEL, 1);
	v->offered |= (uint64_t)vr(v, VMMIO_DEV_FEATURES) << 32;
	if (!(v->offered & (1ull << VIRTIO_F_VERSION_1)))
		return fail(v, "device does not offer VERSION_1");

	want = (1ull << VIRTIO_F_VERSION_1) | (1ull << VIRTIO_BLK_F_RO) |
	       (1ull << VIRTIO_BLK_F_BLK_SIZE) | (1ull << VIRTIO_BLK_F_FLUSH) |
	       (1ull << VIRTIO_BLK_F_SIZE_MAX) | (1ull << VIRTIO_BLK_F_SEG_MAX);
	if (!(opts & VBLK_OPT_NO_INDIRECT))
		want |= 1ull << VIRTIO_F_INDIRECT_DESC;
	if (!(opts & VBLK_OPT_NO_EVENT_IDX))
		want |= 1ull << VIRTIO_F_EVENT_IDX;
	v->features = v->offered & want;
	vw(v, VMMIO_DRV_FEATURES_SEL, 0);
	vw(v, VMMIO_DRV_FEATURES, (uint32_t)v->features);
	vw(v, VMMIO_DRV_FEATURES_SEL, 1);
	vw(v, VMMIO_DRV_FEATURES, (uint32_t)(v->features >> 32));
	set_status(v, VSTAT_FEATURES_OK);
	st = vr(v, VMMIO_STATUS);
	if (!(st & VSTAT_FEATURES_OK))
		return fail(v, "device rejected the features (FEATURES_OK not set)");

	v->use_indirect = !!(v->features & (1ull << VIRTIO_F_INDIRECT_DESC));
	v->use_event_idx = !!(v->features & (1ull << VIRTIO_F_EVENT_IDX));
	v->ro = !!(v->features & (1ull << VIRTIO_BLK_F_RO));

	/* Device configuration. */
	v->capacity = read_capacity(v);
	v->blk_size = 512;
	if (v->features & (1ull << VIRTIO_BLK_F_BLK_SIZE))
		v->blk_size = vr(v, VMMIO_CONFIG + VBLK_CFG_BLK_SIZE);
	if (v->features & (1ull << VIRTIO_BLK_F_SIZE_MAX))
		v->size_max = vr(v, VMMIO_CONFIG + VBLK_CFG_SIZE_MAX);
	if (v->size_max && v->size_max < 512)
		v->size_max = 512;   /* nonsense; sectors can't be split further */
	if (v->features & (1ull << VIRTIO_BLK_F_SEG_MAX))
		v->seg_max = vr(v, VMMIO_CONFIG + VBLK_CFG_SEG_MAX);

	if (setup_queue(v) < 0)
		return -2;

	/* How many requests of the largest size (128 KiB) fit at once. */
	per_req = v->use_indirect ? 1 : 2 + segs_for(v, 131072);
	lim = v->qsize / per_req;
	if (lim > VBLK_MAX_TAGS)
		lim = VBLK_MAX_TAGS;
	if (tags < 1)
		tags = 1;
	v->max_tags = tags < lim ? tags : lim;
	v->tm = mem_zalloc(sizeof(struct vblk_tagmem) * v->max_tags, 64);
	if (!v->tm)
		return fail(v, "out of memory for request headers");

	set_status(v, VSTAT_DRIVER_OK);
	if (vr(v, VMMIO_STATUS) & VSTAT_NEEDS_RESET)
		return fail(v, "device needs reset after DRIVER_OK");

	if (!quiet) {
		struct vmmio_transport where = { v->base, v->irq, v->slot, v->announced };

		printf("virtio-blk: ");
		vmmio_print_where(&where);
		printf(" (irq %d unused, polled%s)\n", v->irq,
		       v->announced ? ", announced on the command line" : "");
		print_features("offered", v->offered);
		print_features("negotiated", v->features);
		printf("virtio-blk: queue size %u (max %u), %u requests in "
		       "flight%s, capacity %lu sectors, blk_size %u%s%s\n",
		       v->qsize, vr(v, VMMIO_QUEUE_NUM_MAX), v->max_tags,
		       v->max_tags < tags ? " (clamped)" : "",
		       v->capacity, v->blk_size,
		       v->size_max ? ", size_max set" : "",
		       v->ro ? ", read-only" : "");
	}
	return 0;
}

/* ---- descriptors ---- */
static int alloc_descs(struct vblk *v, unsigned int n, uint16_t *out)
{
	if (v->num_free < n)
		return -1;
	for (unsigned int i = 0; i < n; i++) {
		out[i] = v->free_head;
		v->free_head = v->desc[v->free_head].next;
	}
	v->num_free = (uint16_t)(v->num_free - n);
	return 0;
}

static void free_chain(struct vblk *v, uint16_t head)
{
	uint16_t i = head, n = 1;

	while (v->desc[i].flags & VRING_DESC_F_NEXT) {
		i = v->desc[i].next;
		n++;
	}
	v->desc[i].next = v->free_head;
	v->free_head = head;
	v->num_free = (uint16_t)(v->num_free + n);
}

static void fill(struct vring_desc *d, uint64_t addr, uint32_t len,
		 uint16_t flags, uint16_t next)
{
	d->addr = addr;
	d->len = len;
	d->flags = flags;
	d->next = next;
}

int vblk_submit(struct vblk *v, unsigned int tag, uint32_t type,
		uint64_t sector, void *buf, uint32_t len)
{
	struct vblk_tagmem *tm;
	uint32_t nseg = segs_for(v, len), ndesc = nseg + 2;
	uint16_t dataflag, idx[VBLK_MAX_SEGS + 2], head;
	uint64_t addr = (uint64_t)(uintptr_t)buf;
	uint32_t left = len;

	if (tag >= v->max_tags || v->tag_busy[tag] || v->tag_done[tag])
		return -1;
	if (nseg > VBLK_MAX_SEGS || (v->seg_max && nseg > v->seg_max))
		return -1;
	tm = &v->tm[tag];
	tm->hdr.type = type;
	tm->hdr.reserved = 0;
	tm->hdr.sector = sector;
	tm->status = 0xff;   /* the device overwrites this */
	/* Reads and GET_ID fill the buffer: device-writable. */
	dataflag = (type == VIRTIO_BLK_T_IN || type == VIRTIO_BLK_T_GET_ID) ?
		   VRING_DESC_F_WRITE : 0;

	if (v->use_indirect) {
		struct vring_desc *t = tm->ind;

		if (alloc_descs(v, 1, &head) < 0)
			return -1;
		fill(&t[0], (uint64_t)(uintptr_t)&tm->hdr, sizeof(tm->hdr),
		     VRING_DESC_F_NEXT, 1);
		for (uint32_t s = 0; s < nseg; s++) {
			uint32_t l = v->size_max && left > v->size_max ?
				     v->size_max : left;

			fill(&t[1 + s], addr, l, dataflag | VRING_DESC_F_NEXT,
			     (uint16_t)(2 + s));
			addr += l;
			left -= l;
		}
		fill(&t[1 + nseg], (uint64_t)(uintptr_t)&tm->status, 1,
		     VRING_DESC_F_WRITE, 0);
		fill(&v->desc[head], (uint64_t)(uintptr_t)t,
		     ndesc * sizeof(struct vring_desc), VRING_DESC_F_INDIRECT, 0);
	} else {
		if (alloc_descs(v, ndesc, idx) < 0)
			return -1;
		head = idx[0];
		fill(&v->desc[idx[0]], (uint64_t)(uintptr_t)&tm->hdr,
		     sizeof(tm->hdr), VRING_DESC_F_NEXT, idx[1]);
		for (uint32_t s = 0; s < nseg; s++) {
			uint32_t l = v->size_max && left > v->size_max ?
				     v->size_max : left;

			fill(&v->desc[idx[1 + s]], addr, l,
			     dataflag | VRING_DESC_F_NEXT, idx[2 + s]);
			addr += l;
			left -= l;
		}
		fill(&v->desc[idx[1 + nseg]], (uint64_t)(uintptr_t)&tm->status,
		     1, VRING_DESC_F_WRITE, 0);
	}

	v->head_tag[head] = (int16_t)tag;
	v->tag_busy[tag] = 1;

	/* Publish: ring entry, then (after everything above) the index. */
	v->avail->ring[v->avail_idx & (v->qsize - 1)] = head;
	compiler_barrier();
	v->avail_idx++;
	store16(&v->avail->idx, v->avail_idx);
	v->pending_kick++;
	return 0;
}

void vblk_kick(struct vblk *v)
{
	uint16_t new_idx, old_idx;
	int need;

	if (!v->pending_kick)
		return;
	/* avail->idx must be visible before we look at what the device
	 * asked for, or a device going idle could miss our update. */
	full_barrier();
	new_idx = v->avail_idx;
	old_idx = v->kicked_idx;
	v->kicked_idx = new_idx;
	v->pending_kick = 0;
	if (v->use_event_idx) {
		uint16_t ev = load16((const uint16_t *)&v->used->ring[v->qsize]);

		/* Notify if avail_event lies in [old_idx, new_idx). */
		need = (uint16_t)(new_idx - ev - 1) < (uint16_t)(new_idx - old_idx);
	} else {
		need = !(load16(&v->used->flags) & VRING_USED_F_NO_NOTIFY);
	}
	if (need) {
		vw(v, VMMIO_QUEUE_NOTIFY, 0);
		v->notifies++;
	}
}

unsigned int vblk_poll(struct vblk *v)
{
	uint16_t end = load16(&v->used->idx);
	unsigned int n = 0;

	while (v->last_used != end) {
		const struct vring_used_elem *e =
			&v->used->ring[v->last_used & (v->qsize - 1)];
		uint32_t id = e->id;
		int tag;

		v->last_used++;
		if (id >= v->qsize || v->head_tag[id] < 0) {
			printf("virtio-blk: device returned unknown id %u\n", id);
			continue;
		}
		tag = v->head_tag[id];
		v->head_tag[id] = -1;
		free_chain(v, (uint16_t)id);
		v->tag_status[tag] = v->tm[tag].status;
		v->tag_busy[tag] = 0;
		v->tag_done[tag] = 1;
		n++;
	}
	if (n && v->use_event_idx)
		/* No interrupts wanted: keep used_event half the index space away.
		 * The device tests it against the entries it just published, which
		 * lie within qsize of last_used.  (last_used - 1, the previous
		 * choice, is the entry this loop just consumed, so a device that
		 * published it a moment ago and checks now sees it and interrupts,
		 * once per request.) */
		store16(&v->avail->ring[v->qsize], (uint16_t)(v->last_used + 0x8000));
	return n;
}

static uint64_t deadline(uint64_t timeout_us)
{
	uint64_t hz = tsc_hz();

	return rdtsc() + timeout_us * (hz / 1000000);
}

unsigned int vblk_wait(struct vblk *v, unsigned int tag, uint64_t timeout_us)
{
	uint64_t end = deadline(timeout_us);

	if (tag >= v->max_tags)
		return VBLK_S_NODESC;
	vblk_kick(v);
	while (!v->tag_done[tag]) {
		if (!v->tag_busy[tag])
			return VBLK_S_NODESC;   /* never submitted */
		if (!vblk_poll(v)) {
			if (rdtsc() > end)
				return VBLK_S_TIMEOUT;
			cpu_relax();
		}
	}
	v->tag_done[tag] = 0;
	return v->tag_status[tag];
}

int vblk_wait_any(struct vblk *v, unsigned int *status, uint64_t timeout_us)
{
	uint64_t end = deadline(timeout_us);
	int busy;

	vblk_kick(v);
	for (;;) {
		busy = 0;
		for (unsigned int t = 0; t < v->max_tags; t++) {
			if (v->tag_done[t]) {
				v->tag_done[t] = 0;
				*status = v->tag_status[t];
				return (int)t;
			}
			busy |= v->tag_busy[t];
		}
		if (!busy) {
			*status = VBLK_S_NODESC;
			return -1;
		}
		if (!vblk_poll(v)) {
			if (rdtsc() > end) {
				*status = VBLK_S_TIMEOUT;
				return -1;
			}
			cpu_relax();
		}
	}
}

unsigned int vblk_rw(struct vblk *v, uint32_t type, uint64_t sector,
		     void *buf, uint32_t len)
{
	if (vblk_submit(v, 0, type, sector, buf, len) < 0)
		return VBLK_S_NODESC;
	return vblk_wait(v, 0, 30000000);
}
