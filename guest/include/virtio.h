/*
 * virtio 1.x over the MMIO transport (Version 2 register layout only),
 * split virtqueues, and a polled virtio-blk driver with many requests in
 * flight.  See lib/virtio.c.
 */
#ifndef GUEST_VIRTIO_H
#define GUEST_VIRTIO_H

#include <stdint.h>

/* ---- MMIO transport (virtio 1.x, section 4.2.2) ---- */
#define VIRTIO_MMIO_BASE       0xfeb00000ul  /* QEMU microvm / aiokvm slots */
#define VIRTIO_MMIO_STRIDE     0x200
#define VIRTIO_MMIO_SLOTS      8

#define VMMIO_MAGIC            0x000  /* "virt" = 0x74726976 */
#define VMMIO_VERSION          0x004  /* 2 = modern, 1 = legacy */
#define VMMIO_DEVICE_ID        0x008
#define VMMIO_VENDOR_ID        0x00c
#define VMMIO_DEV_FEATURES     0x010
#define VMMIO_DEV_FEATURES_SEL 0x014
#define VMMIO_DRV_FEATURES     0x020
#define VMMIO_DRV_FEATURES_SEL 0x024
#define VMMIO_QUEUE_SEL        0x030
#define VMMIO_QUEUE_NUM_MAX    0x034
#define VMMIO_QUEUE_NUM        0x038
#define VMMIO_QUEUE_READY      0x044
#define VMMIO_QUEUE_NOTIFY     0x050
#define VMMIO_INT_STATUS       0x060
#define VMMIO_INT_ACK          0x064
#define VMMIO_STATUS           0x070
#define VMMIO_QUEUE_DESC_LO    0x080
#define VMMIO_QUEUE_DESC_HI    0x084
#define VMMIO_QUEUE_DRIVER_LO  0x090
#define VMMIO_QUEUE_DRIVER_HI  0x094
#define VMMIO_QUEUE_DEVICE_LO  0x0a0
#define VMMIO_QUEUE_DEVICE_HI  0x0a4
#define VMMIO_CONFIG_GEN       0x0fc
#define VMMIO_CONFIG           0x100

#define VIRTIO_MAGIC_VALUE     0x74726976u

/* Device status bits. */
#define VSTAT_ACKNOWLEDGE      0x01
#define VSTAT_DRIVER           0x02
#define VSTAT_DRIVER_OK        0x04
#define VSTAT_FEATURES_OK      0x08
#define VSTAT_NEEDS_RESET      0x40
#define VSTAT_FAILED           0x80

/* Device-independent feature bits. */
#define VIRTIO_F_INDIRECT_DESC 28
#define VIRTIO_F_EVENT_IDX     29
#define VIRTIO_F_VERSION_1     32
#define VIRTIO_F_RING_PACKED   34

#define VIRTIO_ID_BLOCK        2

/* ---- split virtqueue (section 2.7) ---- */
#define VRING_DESC_F_NEXT      1
#define VRING_DESC_F_WRITE     2
#define VRING_DESC_F_INDIRECT  4
#define VRING_AVAIL_F_NO_INTERRUPT 1
#define VRING_USED_F_NO_NOTIFY 1

struct vring_desc {
	uint64_t addr;
	uint32_t len;
	uint16_t flags;
	uint16_t next;
};

struct vring_avail {
	uint16_t flags;
	uint16_t idx;
	uint16_t ring[];   /* [qsize], then used_event (EVENT_IDX) */
};

struct vring_used_elem {
	uint32_t id;       /* head descriptor of the finished chain */
	uint32_t len;      /* bytes the device wrote */
};

struct vring_used {
	uint16_t flags;
	uint16_t idx;
	struct vring_used_elem ring[];   /* [qsize], then avail_event */
};

/* ---- virtio-blk (section 5.2) ---- */
#define VIRTIO_BLK_F_SIZE_MAX  1
#define VIRTIO_BLK_F_SEG_MAX   2
#define VIRTIO_BLK_F_GEOMETRY  4
#define VIRTIO_BLK_F_RO        5
#define VIRTIO_BLK_F_BLK_SIZE  6
#define VIRTIO_BLK_F_FLUSH     9
#define VIRTIO_BLK_F_TOPOLOGY  10
#define VIRTIO_BLK_F_CONFIG_WCE 11
#define VIRTIO_BLK_F_MQ        12
#define VIRTIO_BLK_F_DISCARD   13
#define VIRTIO_BLK_F_WRITE_ZEROES 14

/* Config space offsets (from VMMIO_CONFIG). */
#define VBLK_CFG_CAPACITY      0x00  /* le64, 512-byte sectors */
#define VBLK_CFG_SIZE_MAX      0x08  /* le32 */
#define VBLK_CFG_SEG_MAX       0x0c  /* le32 */
#define VBLK_CFG_BLK_SIZE      0x14  /* le32 */

#define VIRTIO_BLK_T_IN        0
#define VIRTIO_BLK_T_OUT       1
#define VIRTIO_BLK_T_FLUSH     4
#define VIRTIO_BLK_T_GET_ID    8

#define VIRTIO_BLK_S_OK        0
#define VIRTIO_BLK_S_IOERR     1
#define VIRTIO_BLK_S_UNSUPP    2
#define VBLK_S_TIMEOUT         0x100  /* driver-side: no completion in time */
#define VBLK_S_NODESC          0x101  /* driver-side: could not submit */

#define VBLK_MAX_TAGS          64     /* requests in flight, at most */
#define VBLK_MAX_SEGS          32     /* data descriptors per request */
#define VBLK_QSIZE_CAP         256    /* ring entries we ask for, at most */

struct virtio_blk_req_hdr {
	uint32_t type;
	uint32_t reserved;
	uint64_t sector;
};

/* Per-request memory owned by the driver. */
struct vblk_tagmem {
	struct vring_desc ind[VBLK_MAX_SEGS + 2];   /* indirect table */
	struct virtio_blk_req_hdr hdr;
	volatile uint8_t status;
};

struct vblk {
	uintptr_t base;          /* MMIO base of the transport */
	int slot;                /* standard slot (0..7), or -1 */
	int irq;                 /* announced or 5 + slot; never used */
	int announced;           /* found through virtio_mmio.device= */
	uint64_t offered;        /* device features */
	uint64_t features;       /* negotiated features */
	uint64_t capacity;       /* 512-byte sectors */
	uint32_t blk_size, size_max, seg_max;
	int ro, use_indirect, use_event_idx;

	/* queue 0 */
	uint16_t qsize;
	struct vring_desc *desc;
	struct vring_avail *avail;
	struct vring_used *used;
	uint16_t free_head, num_free;
	uint16_t avail_idx;      /* next avail ring slot (free-running) */
	uint16_t kicked_idx;     /* avail_idx at the last notify decision */
	uint16_t last_used;      /* next used ring slot to consume */
	uint32_t pending_kick;   /* requests published but not notified */
	uint64_t notifies;       /* QueueNotify writes done */

	/* tags */
	unsigned int max_tags;
	struct vblk_tagmem *tm;  /* [max_tags] */
	int16_t head_tag[VBLK_QSIZE_CAP];  /* head descriptor -> tag */
	uint8_t tag_busy[VBLK_MAX_TAGS];   /* submitted, not completed */
	uint8_t tag_done[VBLK_MAX_TAGS];   /* completed, not yet collected */
	uint16_t tag_status[VBLK_MAX_TAGS];
};

/* Options for vblk_open (bit flags). */
#define VBLK_OPT_NO_INDIRECT  1   /* don't negotiate INDIRECT_DESC */
#define VBLK_OPT_NO_EVENT_IDX 2   /* don't negotiate EVENT_IDX */
#define VBLK_OPT_QUIET        4   /* no info lines */

/* Looks for the first modern virtio-blk device: first at the transports
 * announced on the command line (virtio_mmio.device=SIZE@BASE:IRQ, in
 * order), then in the 8 standard virtio-mmio slots from slot 0 up, and
 * initialises it with one queue of up to VBLK_QSIZE_CAP entries and room
 * for `tags` requests in flight (clamped to what the queue can hold; the
 * result is in v->max_tags).  Prints what it finds.  Returns 0 on success,
 * -1 if there is no device, -2 if initialisation failed. */
int vblk_open(struct vblk *v, unsigned int tags, unsigned int opts);

/* Queues request `tag` (0..max_tags-1, must be idle): type VIRTIO_BLK_T_*,
 * starting sector, data buffer of len bytes (len 0 for FLUSH).  The request
 * is published in the avail ring but the device is only notified by
 * vblk_kick (or by the wait functions).  Returns 0, or -1 if the tag is
 * busy, the request is too large, or descriptors ran out. */
int vblk_submit(struct vblk *v, unsigned int tag, uint32_t type,
		uint64_t sector, void *buf, uint32_t len);

/* Notifies the device of published requests, if it wants to be told. */
void vblk_kick(struct vblk *v);

/* Reaps every used ring entry (any order): marks those tags done.
 * Returns the number reaped. */
unsigned int vblk_poll(struct vblk *v);

/* Waits (kick + poll) until `tag` completes; returns its status
 * (VIRTIO_BLK_S_* or VBLK_S_TIMEOUT) and frees the tag. */
unsigned int vblk_wait(struct vblk *v, unsigned int tag, uint64_t timeout_us);

/* Waits until any busy tag completes; returns that tag and stores its
 * status in *status, or -1 if nothing is in flight or on a timeout
 * (*status = VBLK_S_TIMEOUT). */
int vblk_wait_any(struct vblk *v, unsigned int *status, uint64_t timeout_us);

/* Synchronous helper on tag 0 (nothing else may be in flight on tag 0). */
unsigned int vblk_rw(struct vblk *v, uint32_t type, uint64_t sector,
		     void *buf, uint32_t len);

#endif
