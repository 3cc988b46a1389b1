/*
 * A polled virtio-net driver over virtio-mmio (modern): one receive and one
 * transmit queue, no interrupts, MRG_RXBUF optional.  See lib/vnet.c.
 */
#ifndef GUEST_VNET_H
#define GUEST_VNET_H

#include <stdint.h>

#define VIRTIO_ID_NET          1
#define VIRTIO_NET_F_MTU       3
#define VIRTIO_NET_F_MAC       5
#define VIRTIO_NET_F_MRG_RXBUF 15
#define VIRTIO_NET_F_STATUS    16

#define VNET_HDR_SIZE          12
#define VNET_FRAME_MAX         1518     /* 1500 + header + one VLAN tag */
#define VNET_QSIZE_CAP         256

struct vnet_queue {
	uint16_t qsize;
	struct vring_desc *desc;
	struct vring_avail *avail;
	struct vring_used *used;
	uint8_t *bufs;          /* qsize buffers of buf_size bytes, one per descriptor */
	uint32_t buf_size;
	uint16_t avail_idx;     /* next avail slot (free-running) */
	uint16_t kicked_idx;
	uint16_t last_used;
	uint16_t free_count;    /* tx: descriptors not in flight */
	uint16_t free_list[VNET_QSIZE_CAP];
	uint64_t notifies;
};

struct vnet {
	uintptr_t base;
	int slot, irq, announced;
	uint64_t offered, features;
	int mrg, event_idx;
	uint8_t mac[6];
	uint16_t mtu;
	struct vnet_queue rx, tx;
	uint64_t rx_frames, tx_frames, rx_bytes, tx_bytes, rx_errors, tx_full;
};

/* Options for vnet_open. */
#define VNET_OPT_NO_MRG_RXBUF  1
#define VNET_OPT_NO_EVENT_IDX  2

/* Finds the index-th virtio-net device (0 = first), negotiates VERSION_1,
 * MAC, STATUS, MTU, EVENT_IDX and (unless told not to) MRG_RXBUF, posts
 * receive buffers of rxbuf bytes (0: 12 + 1518; with MRG_RXBUF smaller ones
 * make frames span buffers), and prints what it found.  0, -1 (no device)
 * or -2 (initialisation failed). */
int vnet_open(struct vnet *n, int index, unsigned int opts, uint32_t rxbuf);

/* Queues one frame (len <= VNET_FRAME_MAX) for transmission and notifies
 * the device if it asks for it.  0, or -1 when every transmit buffer is in
 * flight (vnet_reclaim frees the finished ones; vnet_send does too). */
int vnet_send(struct vnet *n, const void *frame, uint32_t len);

/* Frees transmit buffers the device has finished with; returns how many. */
unsigned int vnet_reclaim(struct vnet *n);

/* Copies the next received frame (merged across buffers) into buf and
 * gives the buffers back to the device.  Returns its length, 0 if none is
 * waiting, or -1 for a malformed one (dropped). */
int vnet_recv(struct vnet *n, void *buf, uint32_t maxlen);

/* Link state (STATUS), 1 if the device has no STATUS. */
int vnet_link_up(struct vnet *n);

/* "02:00:00:00:00:0a" */
void vnet_format_mac(const uint8_t *mac, char *out /* 18 bytes */);

#endif
