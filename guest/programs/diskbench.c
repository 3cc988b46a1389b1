/*
 * diskbench: time a stream of reads or writes with rdtsc.
 *
 * Options: dev=virtio|ata-word|ata-rep (probed)  op=read|write (read)
 *          pattern=seq|rand (seq)  bs=BYTES (4096; 512..131072, a multiple
 *          of 512)  qd=K (1; virtio only, ATA is always 1)
 *          bytes=TOTAL (1 MiB; rounded down to whole blocks, at least one)
 *          seed=S (1, for rand)  indirect=0 event_idx=0 (virtio)  cpl=3
 *
 * seq walks the disk from offset 0 and wraps at the end; rand picks
 * block-aligned offsets with xorshift64.  op=write overwrites the disk.
 * Prints
 *   diskbench: dev=.. op=.. pattern=.. bs=.. qd=.. bytes=B ticks=T tsc_hz=H
 * (T = TSC ticks from the first submission to the last completion), then
 *   diskbench: tsc_src=S elapsed_us=.. kib_per_s=.. iops=.. [notifies=..]
 * where S says where tsc_hz came from: cpuid15, cpuid16, cpuid40000010 or
 * assumed.  Exit 0; 1 on I/O errors, 2 on bad options or no disk, 4 on a
 * timeout.
 *
 * Without dev= the disk is probed (blk_probe): virtio-blk first, then the
 * ATA primary master in ata-rep mode.
 */
#include "guest.h"
#include "blk.h"
#include "mem.h"

static struct blk dev;

static uint64_t xorshift64(uint64_t *s)
{
	uint64_t x = *s;

	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return *s = x;
}

int main(void)
{
	char name[16] = "", op[8] = "read", pat[8] = "seq";
	uint64_t bs, qd, bytes, seed, nblocks, nreq, ticks, hz;
	uint64_t submitted = 0, finished = 0, errors = 0, seq_next = 0;
	uint32_t nsect;
	uint8_t *bufs;
	int kind = BLK_VIRTIO, given, is_write, is_rand, r;

	given = opt_str("dev", name, sizeof(name));
	opt_str("op", op, sizeof(op));
	opt_str("pattern", pat, sizeof(pat));
	bs = opt_u64("bs", 4096);
	qd = opt_u64("qd", 1);
	bytes = opt_u64("bytes", 1 << 20);
	seed = opt_u64("seed", 1);

	if (given)
		kind = blk_kind(name);
	is_write = strcmp(op, "write") == 0;
	is_rand = strcmp(pat, "rand") == 0;
	if (kind < 0 || (!is_write && strcmp(op, "read") != 0) ||
	    (!is_rand && strcmp(pat, "seq") != 0)) {
		printf("diskbench: bad dev=%s op=%s or pattern=%s\n", name, op, pat);
		return 2;
	}
	if (bs < 512 || bs > BLK_MAX_XFER || bs % 512) {
		printf("diskbench: bad bs=%lu (512..%u, multiple of 512)\n", bs,
		       BLK_MAX_XFER);
		return 2;
	}
	if (qd < 1 || qd > BLK_MAX_QD) {
		printf("diskbench: bad qd=%lu (1..%u)\n", qd, BLK_MAX_QD);
		return 2;
	}
	/* ata-rep when probing, as in disktest: never slower than ata-word. */
	r = given ? blk_open(&dev, kind, (unsigned int)qd) :
		    blk_probe(&dev, BLK_ATA_REP, (unsigned int)qd);
	if (r < 0) {
		if (r == -2)
			printf("diskbench: the virtio-blk disk found did not "
			       "initialise\n");
		else if (given)
			printf("diskbench: no %s disk\n", name);
		else
			printf("diskbench: no disk found (probed virtio-mmio "
			       "slots and ATA 0x%x)\n", ATA_PRIMARY_IO);
		return 2;
	}
	kind = dev.kind;
	if (kind == BLK_VIRTIO && dev.qd < qd)
		printf("diskbench: qd clamped to %u\n", dev.qd);
	qd = dev.qd;

	nsect = (uint32_t)(bs / 512);
	nblocks = dev.capacity / nsect;
	if (!nblocks) {
		printf("diskbench: disk (%lu sectors) smaller than bs\n",
		       dev.capacity);
		return 2;
	}
	nreq = bytes / bs;
	if (!nreq)
		nreq = 1;
	bytes = nreq * bs;
	if (!seed)
		seed = 1;

	bufs = mem_alloc(qd * bs, 4096);
	if (!bufs) {
		printf("diskbench: out of memory for %lu x %lu bytes\n", qd, bs);
		return 2;
	}
	if (is_write) {
		uint64_t *w = (uint64_t *)bufs, x = 0x243f6a8885a308d3ull;

		for (uint64_t i = 0; i < qd * bs / 8; i++)
			w[i] = xorshift64(&x);
	}

	unsigned int free_tags[BLK_MAX_QD], nfree = 0;

	for (unsigned int t = (unsigned int)qd; t-- > 0;)
		free_tags[nfree++] = t;

	uint64_t t0 = rdtsc();

	while (finished < nreq) {
		/* Keep qd requests in flight; reuse whichever tag finishes. */
		if (submitted < nreq && nfree) {
			unsigned int tag = free_tags[--nfree];
			uint64_t blk;
			int r;

			if (is_rand) {
				blk = xorshift64(&seed) % nblocks;
			} else {
				blk = seq_next;
				seq_next = seq_next + 1 == nblocks ? 0 : seq_next + 1;
			}
			r = blk_start(&dev, tag, is_write ? BLK_WRITE : BLK_READ,
				      blk * nsect, nsect, bufs + (uint64_t)tag * bs);
			if (r != BLK_OK) {
				printf("diskbench: cannot submit: %s\n",
				       blk_strerror(r));
				return 2;
			}
			submitted++;
			continue;
		}
		int res, t = blk_wait_any(&dev, &res);

		if (t < 0) {
			printf("diskbench: %s\n", blk_strerror(res));
			return 4;
		}
		if (res != BLK_OK)
			errors++;
		finished++;
		free_tags[nfree++] = (unsigned int)t;
	}
	ticks = rdtsc() - t0;
	hz = tsc_hz();

	printf("diskbench: dev=%s op=%s pattern=%s bs=%lu qd=%lu bytes=%lu "
	       "ticks=%lu tsc_hz=%lu\n", dev.name, op, pat, bs, qd, bytes, ticks, hz);
	/* Derived figures (integer math): us = ticks / (hz / 1e6). */
	uint64_t us = ticks / (hz / 1000000 ? hz / 1000000 : 1);

	if (!us)
		us = 1;
	printf("diskbench: tsc_src=%s elapsed_us=%lu kib_per_s=%lu iops=%lu",
	       tsc_hz_source(), us, bytes / 1024 * 1000000 / us,
	       nreq * 1000000 / us);
	if (kind == BLK_VIRTIO)
		printf(" notifies=%lu", dev.v.notifies);
	printf("\n");
	if (errors) {
		printf("diskbench: %lu I/O errors\n", errors);
		return 1;
	}
	return 0;
}
