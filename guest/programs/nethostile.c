/*
 * nethostile: a guest that breaks the virtqueue rules on its virtio-net NIC,
 * one way at a time, to show the device refuses each with NEEDS_RESET and
 * comes back after a reset, while other VMs on the same switch go on.
 *
 * For each mode in modes= (comma-separated; default all of them) it opens
 * the NIC (which resets it), prints "nethostile: MODE armed", breaks the
 * rule and waits up to wait_ms= (5000) for the device to set NEEDS_RESET:
 *   addr  a transmit buffer outside guest RAM
 *   len   a transmit buffer that runs past the end of guest RAM
 *   loop  a transmit chain whose NEXT points back at itself
 *   idx   avail->idx published a whole ring ahead of the device
 *   head  an avail ring entry naming a descriptor beyond the queue
 *   rxro  every receive buffer marked device-readable (the device finds
 *         out when a frame arrives: the host side sends one after "armed")
 * Then it opens the NIC once more and sends one well-formed frame, waiting
 * for the device to hand the buffer back.  The frame is addressed to the
 * NIC's own MAC: a switch learns it on this port and filters it there, so
 * neighbours see none of this.  Prints a line per mode
 * and exits 0 only if every mode got NEEDS_RESET and the last frame went
 * out; 1 otherwise; 2 on bad options or no NIC.  Run at cpl=3.
 */
#include "guest.h"
#include "io.h"
#include "virtio.h"
#include "vnet.h"

#define TXQ 1

static const char *const all_modes = "addr,len,loop,idx,head,rxro";

static uint32_t status(const struct vnet *n)
{
	return mmio_read32(n->base + VMMIO_STATUS);
}

static void publish_raw(struct vnet_queue *q, uint16_t head, uint16_t advance)
{
	q->avail->ring[q->avail_idx & (q->qsize - 1)] = head;
	q->avail_idx = (uint16_t)(q->avail_idx + advance);
	__atomic_store_n(&q->avail->idx, q->avail_idx, __ATOMIC_RELEASE);
	__asm__ volatile("mfence" ::: "memory");
}

/* Breaks the rule `mode` names; 0, or -1 for an unknown mode. */
static int misbehave(struct vnet *n, const char *mode)
{
	struct vnet_queue *tx = &n->tx;
	struct vring_desc *d = &tx->desc[0];

	d->addr = (uint64_t)(uintptr_t)tx->bufs;
	d->len = 60;
	d->flags = 0;
	d->next = 0;
	if (!strcmp(mode, "addr")) {
		d->addr = 0xfffffff000ull;
	} else if (!strcmp(mode, "len")) {
		d->len = 0xfffffff0u;
	} else if (!strcmp(mode, "loop")) {
		d->flags = VRING_DESC_F_NEXT;
		d->next = 0;
	} else if (!strcmp(mode, "idx")) {
		publish_raw(tx, 0, (uint16_t)(tx->qsize + 1));
		goto kick;
	} else if (!strcmp(mode, "head")) {
		publish_raw(tx, (uint16_t)(tx->qsize + 7), 1);
		goto kick;
	} else if (!strcmp(mode, "rxro")) {
		for (uint16_t i = 0; i < n->rx.qsize; i++)
			n->rx.desc[i].flags = 0;
		__asm__ volatile("mfence" ::: "memory");
		return 0;
	} else {
		return -1;
	}
	publish_raw(tx, 0, 1);
kick:
	mmio_write32(n->base + VMMIO_QUEUE_NOTIFY, TXQ);
	return 0;
}

static int wait_reset(const struct vnet *n, uint64_t ticks)
{
	uint64_t start = rdtsc();

	while (rdtsc() - start < ticks) {
		if (status(n) & VSTAT_NEEDS_RESET)
			return 1;
		cpu_relax();
	}
	return 0;
}

int main(void)
{
	struct vnet nic;
	char modes[64];
	static uint8_t frame[60];
	uint64_t wait = opt_u64("wait_ms", 5000) * (tsc_hz() / 1000);
	int nicno = (int)opt_u64("nic", 0), failed = 0, tried = 0;

	if (!opt_str("modes", modes, sizeof(modes)))
		memcpy(modes, all_modes, strlen(all_modes) + 1);
	for (char *mode = modes, *end; *mode; mode = end) {
		end = mode;
		while (*end && *end != ',')
			end++;
		if (*end)
			*end++ = '\0';
		if (vnet_open(&nic, nicno, 0, 0) < 0)
			return 2;
		printf("nethostile: %s armed\n", mode);
		if (misbehave(&nic, mode) < 0) {
			printf("nethostile: unknown mode %s (give modes= from %s)\n", mode, all_modes);
			return 2;
		}
		tried++;
		if (wait_reset(&nic, wait)) {
			printf("nethostile: %s -> NEEDS_RESET\n", mode);
		} else {
			printf("nethostile: %s -> no NEEDS_RESET (status 0x%x)\n", mode, status(&nic));
			failed++;
		}
	}
	if (vnet_open(&nic, nicno, 0, 0) < 0)
		return 2;
	memcpy(frame, nic.mac, 6);
	memcpy(frame + 6, nic.mac, 6);
	frame[12] = 0x88;   /* local experimental ethertype */
	frame[13] = 0xb5;
	vnet_send(&nic, frame, sizeof(frame));
	uint64_t start = rdtsc();
	unsigned int back = 0;

	while (!back && rdtsc() - start < wait)
		back = vnet_reclaim(&nic);
	printf("nethostile: %d/%d modes reset, good frame after reset %s\n", tried - failed, tried,
	       back ? "sent" : "not sent");
	return failed || !back || (status(&nic) & VSTAT_NEEDS_RESET);
}
