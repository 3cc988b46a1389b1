/*
 * Polled virtio-net over virtio-mmio (modern, Version 2).
 *
 * Two split virtqueues: 0 receive, 1 transmit.  Every descriptor owns one
 * buffer for its whole life: receive descriptors are posted once and
 * re-posted as soon as their frame is copied out; transmit descriptors sit
 * on a free list between frames.  Nothing asks for interrupts (used_event
 * kept half the index space away, or NO_INTERRUPT), so the driver runs
 * unchanged at CPL 3.  Ordering as in lib/virtio.c: compiler barriers on
 * x86 TSO, an mfence between publishing avail->idx and reading the
 * device's notification wish.
 */
#include "guest.h"
#include "mem.h"
#include "virtio.h"
#include "vmmio.h"
#include "vnet.h"

#define RXQ 0
#define TXQ 1
#define TX_BUF 1536          /* header + the largest frame, rounded */
#define NET_MIN_SIZE (VMMIO_CONFIG + 12)

static inline void full_barrier(void)
{
	__asm__ volatile("mfence" ::: "memory");
}

static inline uint16_t load16(const uint16_t *p)
{
	return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}

static inline void store16(uint16_t *p, uint16_t val)
{
	__atomic_store_n(p, val, __ATOMIC_RELEASE);
}

static inline uint32_t vr(const struct vnet *n, uint32_t off)
{
	return mmio_read32(n->base + off);
}

static inline void vw(const struct vnet *n, uint32_t off, uint32_t val)
{
	mmio_write32(n->base + off, val);
}

static void set_status(struct vnet *n, uint32_t bits)
{
	vw(n, VMMIO_STATUS, vr(n, VMMIO_STATUS) | bits);
}

static int fail(struct vnet *n, const char *why)
{
	printf("virtio-net: %s\n", why);
	set_status(n, VSTAT_FAILED);
	return -2;
}

void vnet_format_mac(const uint8_t *mac, char *out)
{
	snprintf(out, 18, "%02x:%02x:%02x:%02x:%02x:%02x", mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]);
}

static int setup_queue(struct vnet *n, struct vnet_queue *q, uint32_t index, uint32_t buf_size)
{
	uint32_t max, size;

	vw(n, VMMIO_QUEUE_SEL, index);
	if (vr(n, VMMIO_QUEUE_READY) != 0)
		return fail(n, "queue already live after reset");
	max = vr(n, VMMIO_QUEUE_NUM_MAX);
	if (max == 0)
		return fail(n, "queue not available (QueueNumMax 0)");
	for (size = 1; size * 2 <= max && size * 2 <= VNET_QSIZE_CAP; size *= 2)
		;
	q->qsize = (uint16_t)size;
	q->buf_size = buf_size;
	q->desc = mem_zalloc(sizeof(struct vring_desc) * size, 4096);
	q->avail = mem_zalloc(sizeof(struct vring_avail) + 2 * (size + 1), 4096);
	q->used = mem_zalloc(sizeof(struct vring_used) + sizeof(struct vring_used_elem) * size + 2, 4096);
	q->bufs = mem_alloc((size_t)buf_size * size, 64);
	if (!q->desc || !q->avail || !q->used || !q->bufs)
		return fail(n, "out of memory for a virtqueue");
	if (n->event_idx)
		q->avail->ring[size] = 0x8000;   /* used_event: never reached (no interrupts) */
	else
		q->avail->flags = VRING_AVAIL_F_NO_INTERRUPT;
	for (uint32_t i = 0; i < size; i++) {
		q->desc[i].addr = (uint64_t)(uintptr_t)(q->bufs + (size_t)i * buf_size);
		q->desc[i].len = buf_size;
		q->desc[i].flags = index == RXQ ? VRING_DESC_F_WRITE : 0;
		q->free_list[i] = (uint16_t)i;
	}
	q->free_count = (uint16_t)size;
	vw(n, VMMIO_QUEUE_NUM, size);
	vw(n, VMMIO_QUEUE_DESC_LO, (uint32_t)(uintptr_t)q->desc);
	vw(n, VMMIO_QUEUE_DESC_HI, (uint32_t)((uint64_t)(uintptr_t)q->desc >> 32));
	vw(n, VMMIO_QUEUE_DRIVER_LO, (uint32_t)(uintptr_t)q->avail);
	vw(n, VMMIO_QUEUE_DRIVER_HI, (uint32_t)((uint64_t)(uintptr_t)q->avail >> 32));
	vw(n, VMMIO_QUEUE_DEVICE_LO, (uint32_t)(uintptr_t)q->used);
	vw(n, VMMIO_QUEUE_DEVICE_HI, (uint32_t)((uint64_t)(uintptr_t)q->used >> 32));
	full_barrier();
	vw(n, VMMIO_QUEUE_READY, 1);
	if (vr(n, VMMIO_QUEUE_READY) != 1)
		return fail(n, "QueueReady did not stick");
	return 0;
}

/* Notify the device of what was published since the last call, if it wants to be told. */
static void kick(struct vnet *n, struct vnet_queue *q, uint32_t index)
{
	uint16_t new_idx = q->avail_idx, old_idx = q->kicked_idx;
	int need;

	if (new_idx == old_idx)
		return;
	full_barrier();   /* avail->idx visible before we read the device's wish */
	q->kicked_idx = new_idx;
	if (n->event_idx) {
		uint16_t ev = load16((const uint16_t *)&q->used->ring[q->qsize]);

		need = (uint16_t)(new_idx - ev - 1) < (uint16_t)(new_idx - old_idx);
	} else {
		need = !(load16(&q->used->flags) & VRING_USED_F_NO_NOTIFY);
	}
	if (need) {
		vw(n, VMMIO_QUEUE_NOTIFY, index);
		q->notifies++;
	}
}

static void publish(struct vnet_queue *q, uint16_t id)
{
	q->avail->ring[q->avail_idx & (q->qsize - 1)] = id;
	q->avail_idx++;
	store16(&q->avail->idx, q->avail_idx);
}

int vnet_open(struct vnet *n, int index, unsigned int opts, uint32_t rxbuf)
{
	struct vmmio_transport t;
	uint64_t want;
	int announced;
	char mac[18];

	memset(n, 0, sizeof(*n));
	if (vmmio_find(VIRTIO_ID_NET, index, "virtio-net", NET_MIN_SIZE, &t, &announced) < 0) {
		printf("virtio-net: no modern virtio-net device #%d (%d announced on the command line)\n",
		       index, announced);
		return -1;
	}
	n->base = t.base;
	n->slot = t.slot;
	n->irq = t.irq;
	n->announced = t.announced;

	vw(n, VMMIO_STATUS, 0);
	for (unsigned int i = 0; vr(n, VMMIO_STATUS) != 0; i++) {
		if (i > 1000000)
			return fail(n, "device does not reset");
		cpu_relax();
	}
	vw(n, VMMIO_STATUS, VSTAT_ACKNOWLEDGE);
	set_status(n, VSTAT_DRIVER);
	vw(n, VMMIO_DEV_FEATURES_SEL, 0);
	n->offered = vr(n, VMMIO_DEV_FEATURES);
	vw(n, VMMIO_DEV_FEATURES_SEL, 1);
	n->offered |= (uint64_t)vr(n, VMMIO_DEV_FEATURES) << 32;
	if (!(n->offered & (1ull << VIRTIO_F_VERSION_1)))
		return fail(n, "device does not offer VERSION_1");
	want = (1ull << VIRTIO_F_VERSION_1) | (1ull << VIRTIO_NET_F_MAC) | (1ull << VIRTIO_NET_F_STATUS) |
	       (1ull << VIRTIO_NET_F_MTU);
	if (!(opts & VNET_OPT_NO_EVENT_IDX))
		want |= 1ull << VIRTIO_F_EVENT_IDX;
	if (!(opts & VNET_OPT_NO_MRG_RXBUF))
		want |= 1ull << VIRTIO_NET_F_MRG_RXBUF;
	n->features = n->offered & want;
	vw(n, VMMIO_DRV_FEATURES_SEL, 0);
	vw(n, VMMIO_DRV_FEATURES, (uint32_t)n->features);
	vw(n, VMMIO_DRV_FEATURES_SEL, 1);
	vw(n, VMMIO_DRV_FEATURES, (uint32_t)(n->features >> 32));
	set_status(n, VSTAT_FEATURES_OK);
	if (!(vr(n, VMMIO_STATUS) & VSTAT_FEATURES_OK))
		return fail(n, "device rejected the features (FEATURES_OK not set)");
	n->mrg = !!(n->features & (1ull << VIRTIO_NET_F_MRG_RXBUF));
	n->event_idx = !!(n->features & (1ull << VIRTIO_F_EVENT_IDX));

	if (n->features & (1ull << VIRTIO_NET_F_MAC)) {
		for (int i = 0; i < 6; i++)
			n->mac[i] = mmio_read8(n->base + VMMIO_CONFIG + (uint32_t)i);
	} else {
		static const uint8_t fallback[6] = { 0x02, 0, 0, 0, 0x7e, 0x01 };

		memcpy(n->mac, fallback, 6);
	}
	n->mtu = 1500;
	if (n->features & (1ull << VIRTIO_NET_F_MTU))
		n->mtu = mmio_read16(n->base + VMMIO_CONFIG + 10);

	if (!rxbuf)
		rxbuf = VNET_HDR_SIZE + VNET_FRAME_MAX;
	if (rxbuf < VNET_HDR_SIZE + (n->mrg ? 1 : VNET_FRAME_MAX))
		return fail(n, "receive buffers too small (without MRG_RXBUF they hold a whole frame)");
	if (setup_queue(n, &n->rx, RXQ, rxbuf) < 0 || setup_queue(n, &n->tx, TXQ, TX_BUF) < 0)
		return -2;
	set_status(n, VSTAT_DRIVER_OK);
	if (vr(n, VMMIO_STATUS) & VSTAT_NEEDS_RESET)
		return fail(n, "device needs reset after DRIVER_OK");
	for (uint16_t i = 0; i < n->rx.qsize; i++)
		publish(&n->rx, i);
	n->rx.free_count = 0;
	kick(n, &n->rx, RXQ);

	vnet_format_mac(n->mac, mac);
	printf("virtio-net: ");
	vmmio_print_where(&t);
	printf(" mac %s mtu %u link %s, %s, queues %u/%u, rx buffers %u bytes%s\n", mac, n->mtu,
	       vnet_link_up(n) ? "up" : "down", n->mrg ? "MRG_RXBUF" : "no MRG_RXBUF", n->rx.qsize,
	       n->tx.qsize, rxbuf, n->event_idx ? ", EVENT_IDX" : "");
	return 0;
}

int vnet_link_up(struct vnet *n)
{
	if (!(n->features & (1ull << VIRTIO_NET_F_STATUS)))
		return 1;
	return mmio_read16(n->base + VMMIO_CONFIG + 6) & 1;
}

unsigned int vnet_reclaim(struct vnet *n)
{
	struct vnet_queue *q = &n->tx;
	uint16_t end = load16(&q->used->idx);
	unsigned int count = 0;

	while (q->last_used != end) {
		uint32_t id = q->used->ring[q->last_used & (q->qsize - 1)].id;

		q->last_used++;
		if (id >= q->qsize || q->free_count >= q->qsize) {
			n->rx_errors++;   /* the device returned something it never had */
			continue;
		}
		q->free_list[q->free_count++] = (uint16_t)id;
		count++;
	}
	if (count && n->event_idx)
		store16(&q->avail->ring[q->qsize], (uint16_t)(q->last_used + 0x8000));
	return count;
}

int vnet_send(struct vnet *n, const void *frame, uint32_t len)
{
	struct vnet_queue *q = &n->tx;
	uint16_t id;
	uint8_t *buf;

	if (len > VNET_FRAME_MAX)
		return -1;
	if (q->free_count == 0 && vnet_reclaim(n) == 0) {
		n->tx_full++;
		return -1;
	}
	id = q->free_list[--q->free_count];
	buf = q->bufs + (size_t)id * q->buf_size;
	memset(buf, 0, VNET_HDR_SIZE);
	memcpy(buf + VNET_HDR_SIZE, frame, len);
	q->desc[id].len = VNET_HDR_SIZE + len;
	q->desc[id].flags = 0;
	publish(q, id);
	kick(n, q, TXQ);
	n->tx_frames++;
	n->tx_bytes += len;
	return 0;
}

int vnet_recv(struct vnet *n, void *out, uint32_t maxlen)
{
	struct vnet_queue *q = &n->rx;
	uint16_t end = load16(&q->used->idx);
	uint8_t *dst = out;
	uint32_t total = 0, num = 1;
	int bad = 0;

	if (q->last_used == end)
		return 0;
	for (uint32_t i = 0; i < num; i++) {
		if (q->last_used == end) {
			bad = 1;   /* num_buffers promised more than was published */
			break;
		}
		const struct vring_used_elem *e = &q->used->ring[q->last_used & (q->qsize - 1)];
		uint32_t id = e->id, len = e->len, skip = 0;

		q->last_used++;
		if (id >= q->qsize || len > q->buf_size) {
			bad = 1;
			continue;
		}
		const uint8_t *buf = q->bufs + (size_t)id * q->buf_size;

		if (i == 0) {
			if (len < VNET_HDR_SIZE) {
				bad = 1;
			} else if (n->mrg) {
				num = (uint32_t)buf[10] | (uint32_t)buf[11] << 8;
				if (num == 0 || num > q->qsize)
					bad = 1, num = 1;
			}
			skip = VNET_HDR_SIZE;
		}
		if (!bad && len > skip) {
			uint32_t take = len - skip;

			if (total + take > maxlen)
				bad = 1;
			else
				memcpy(dst + total, buf + skip, take);
			total += take;
		}
		publish(q, (uint16_t)id);   /* the buffer goes straight back */
	}
	kick(n, q, RXQ);
	if (n->event_idx)
		store16(&q->avail->ring[q->qsize], (uint16_t)(q->last_used + 0x8000));
	if (bad) {
		n->rx_errors++;
		return -1;
	}
	n->rx_frames++;
	n->rx_bytes += total;
	return (int)total;
}
