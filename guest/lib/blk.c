/* Common block interface over virtio-blk and ATA PIO (see blk.h). */
#include "guest.h"
#include "blk.h"

static const char *const kind_names[] = { "virtio", "ata-word", "ata-rep" };

int blk_kind(const char *name)
{
	for (int i = 0; i < 3; i++)
		if (strcmp(name, kind_names[i]) == 0)
			return i;
	return -1;
}

const char *blk_strerror(int res)
{
	switch (res) {
	case BLK_OK:
		return "ok";
	case BLK_EIO:
		return "I/O error";
	case BLK_EUNSUPP:
		return "unsupported";
	case BLK_ETIMEOUT:
		return "timeout";
	default:
		return "invalid request";
	}
}

int blk_open(struct blk *b, int kind, unsigned int qd)
{
	memset(b, 0, sizeof(*b));
	b->kind = kind;
	b->name = kind_names[kind];
	b->timeout_us = 30000000;
	if (qd < 1)
		qd = 1;
	if (qd > BLK_MAX_QD)
		qd = BLK_MAX_QD;

	if (kind == BLK_VIRTIO) {
		unsigned int opts = 0;

		if (opt_u64("indirect", 1) == 0)
			opts |= VBLK_OPT_NO_INDIRECT;
		if (opt_u64("event_idx", 1) == 0)
			opts |= VBLK_OPT_NO_EVENT_IDX;
		int r = vblk_open(&b->v, qd, opts);

		if (r < 0)
			return r;
		b->capacity = b->v.capacity;
		b->qd = b->v.max_tags;
		b->ro = b->v.ro;
		b->has_flush = !!(b->v.features & (1ull << VIRTIO_BLK_F_FLUSH));
		return 0;
	}

	if (ata_probe(&b->a, ATA_PRIMARY_IO, ATA_PRIMARY_CTL, 0,
		      kind == BLK_ATA_REP ? ATA_XFER_REP : ATA_XFER_WORD) != ATA_OK)
		return -1;
	printf("ata: primary master \"%s\", %lu LBA28 sectors%s, %s transfers, "
	       "polled (nIEN)\n", b->a.model, b->a.sectors,
	       b->a.sectors48 > b->a.sectors ? " (disk is larger: LBA48 unused)" : "",
	       kind == BLK_ATA_REP ? "rep insw/outsw" : "inw/outw per word");
	b->capacity = b->a.sectors;
	b->qd = 1;
	b->has_flush = 1;
	return 0;
}

int blk_probe(struct blk *b, int ata_kind, unsigned int qd)
{
	int r = blk_open(b, BLK_VIRTIO, qd);

	if (r == -1)
		r = blk_open(b, ata_kind, qd);
	if (r == 0)
		printf("blk: no dev= option: probed, found %s\n", b->name);
	return r;
}

static int from_virtio(unsigned int st)
{
	switch (st) {
	case VIRTIO_BLK_S_OK:
		return BLK_OK;
	case VIRTIO_BLK_S_IOERR:
		return BLK_EIO;
	case VIRTIO_BLK_S_UNSUPP:
		return BLK_EUNSUPP;
	case VBLK_S_TIMEOUT:
		return BLK_ETIMEOUT;
	default:
		return BLK_EINVAL;   /* includes 0xff: status never written */
	}
}

static int from_ata(int r)
{
	switch (r) {
	case ATA_OK:
		return BLK_OK;
	case ATA_EDEV:
		return BLK_EIO;
	case ATA_ETIMEOUT:
		return BLK_ETIMEOUT;
	default:
		return BLK_EINVAL;
	}
}

int blk_start(struct blk *b, unsigned int tag, int op, uint64_t sector,
	      uint32_t nsect, void *buf)
{
	uint32_t bytes = nsect * 512;
	int r;

	if (tag >= b->qd || bytes > BLK_MAX_XFER ||
	    (op != BLK_FLUSH && (nsect == 0 || sector >= b->capacity ||
				 nsect > b->capacity - sector)))
		return BLK_EINVAL;

	if (b->kind == BLK_VIRTIO) {
		static const uint32_t types[] = {
			VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH
		};

		if (op == BLK_FLUSH) {
			sector = 0;
			bytes = 0;
			buf = NULL;
		}
		if (vblk_submit(&b->v, tag, types[op], sector, buf, bytes) < 0)
			return BLK_EINVAL;
		return BLK_OK;
	}

	if (b->ata_done[tag])
		return BLK_EINVAL;
	if (op == BLK_READ)
		r = ata_read(&b->a, sector, nsect, buf);
	else if (op == BLK_WRITE)
		r = ata_write(&b->a, sector, nsect, buf);
	else
		r = ata_flush(&b->a);
	b->ata_status[tag] = (uint8_t)from_ata(r);
	b->ata_done[tag] = 1;
	return BLK_OK;
}

int blk_wait(struct blk *b, unsigned int tag)
{
	if (tag >= b->qd)
		return BLK_EINVAL;
	if (b->kind == BLK_VIRTIO)
		return from_virtio(vblk_wait(&b->v, tag, b->timeout_us));
	if (!b->ata_done[tag])
		return BLK_EINVAL;
	b->ata_done[tag] = 0;
	return b->ata_status[tag];
}

int blk_wait_any(struct blk *b, int *res)
{
	if (b->kind == BLK_VIRTIO) {
		unsigned int st;
		int tag = vblk_wait_any(&b->v, &st, b->timeout_us);

		*res = from_virtio(st);
		return tag;
	}
	for (unsigned int t = 0; t < b->qd; t++) {
		if (b->ata_done[t]) {
			b->ata_done[t] = 0;
			*res = b->ata_status[t];
			return (int)t;
		}
	}
	*res = BLK_EINVAL;
	return -1;
}

int blk_sync(struct blk *b, int op, uint64_t sector, uint32_t nsect, void *buf)
{
	int r = blk_start(b, 0, op, sector, nsect, buf);

	return r != BLK_OK ? r : blk_wait(b, 0);
}
