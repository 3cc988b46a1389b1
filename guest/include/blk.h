/*
 * One interface over the two disk drivers, for the test programs:
 * "virtio" (lib/virtio.c, asynchronous, many requests in flight) and
 * "ata-word" / "ata-rep" (lib/ata.c, synchronous, one at a time).
 *
 * Requests are identified by a tag 0..qd-1 chosen by the caller.  For
 * ATA, blk_start does the whole transfer before returning and the wait
 * functions only hand back its result, so the same loop drives both.
 */
#ifndef GUEST_BLK_H
#define GUEST_BLK_H

#include <stdint.h>

#include "ata.h"
#include "virtio.h"

#define BLK_VIRTIO    0
#define BLK_ATA_WORD  1
#define BLK_ATA_REP   2

#define BLK_READ      0
#define BLK_WRITE     1
#define BLK_FLUSH     2

#define BLK_MAX_QD    VBLK_MAX_TAGS
#define BLK_MAX_XFER  131072u   /* bytes per request */

/* Request results. */
#define BLK_OK        0
#define BLK_EIO       1   /* device error (virtio IOERR, ATA ERR/DF) */
#define BLK_EUNSUPP   2   /* virtio UNSUPP */
#define BLK_ETIMEOUT  3   /* no completion in time */
#define BLK_EINVAL    4   /* bad request, busy tag, or protocol error */

struct blk {
	int kind;
	const char *name;     /* "virtio", "ata-word", "ata-rep" */
	uint64_t capacity;    /* 512-byte sectors */
	unsigned int qd;      /* usable tags (1 for ATA) */
	int ro;               /* device says read-only (virtio RO feature) */
	int has_flush;
	uint64_t timeout_us;
	struct vblk v;
	struct ata_dev a;
	uint8_t ata_done[BLK_MAX_QD];
	uint8_t ata_status[BLK_MAX_QD];
};

/* Parses a dev= name; returns BLK_* or -1. */
int blk_kind(const char *name);

/* Opens the device (prints driver info).  qd = wanted requests in flight.
 * Returns 0, -1 (no such device) or -2 (found, but it failed to
 * initialise). */
int blk_open(struct blk *b, int kind, unsigned int qd);

/* For programs run without dev=: opens the disk the machine was given.
 * A modern virtio-blk device first (announced virtio-mmio transports, then
 * the 8 slots), else the ATA primary master, opened as ata_kind
 * (BLK_ATA_WORD or BLK_ATA_REP).  b->kind and b->name say which.  Returns
 * like blk_open; a virtio-blk device that fails to initialise is -2, not a
 * reason to try ATA. */
int blk_probe(struct blk *b, int ata_kind, unsigned int qd);

/* Starts request `tag` (op BLK_*; nsect 512-byte sectors, at most
 * BLK_MAX_XFER bytes; 0 for FLUSH).  Returns BLK_OK or BLK_EINVAL. */
int blk_start(struct blk *b, unsigned int tag, int op, uint64_t sector,
	      uint32_t nsect, void *buf);

/* Waits for `tag`; returns its result (BLK_*). */
int blk_wait(struct blk *b, unsigned int tag);

/* Waits for any started tag: returns it (result in *res), or -1 when
 * none is outstanding or on a timeout (*res = BLK_ETIMEOUT). */
int blk_wait_any(struct blk *b, int *res);

/* Synchronous request on tag 0. */
int blk_sync(struct blk *b, int op, uint64_t sector, uint32_t nsect, void *buf);

const char *blk_strerror(int res);

#endif
