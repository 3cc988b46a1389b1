/*
 * disktest: write a known pattern to a disk, read it back and verify it,
 * then checksum the whole disk.  Also a "generation" mode for crash tests.
 *
 * Options: dev=virtio|ata-word|ata-rep (probed)  sectors=N (2048)
 *          qd=K (8, virtio requests in flight)  chunk=C (8 sectors per
 *          request, 1..256)  gen=G (generation mode)  indirect=0
 *          event_idx=0 (virtio: don't negotiate those features)  cpl=3
 *          rounds=R (0: one run; else R runs, each ending in a "round"
 *          line, errors counted afresh; for backend-fault tests)
 *          write=0 (skip the write pass and flush: verify what is there)
 *
 * Pattern: byte i of sector s is byte (i % 8) (little-endian) of the
 * 64-bit word pattern_word(s, i / 8), see below; the same on every run and
 * every device.  Generation sectors have the layout of gen_fill().
 *
 * Without dev= the disk is probed (blk_probe): virtio-blk first, then the
 * ATA primary master in ata-rep mode.
 *
 * Exit: 0 ok; 1 mismatches or read errors; 2 bad options / no device;
 * 3 write errors (e.g. a read-only disk); 4 a request timed out.
 */
#include "guest.h"
#include "blk.h"
#include "mem.h"

#define SECTOR 512
#define WORDS  (SECTOR / 8)
#define MAX_REPORTS 16      /* mismatch lines printed, at most */

static struct blk dev;
static uint8_t *bufs;       /* qd * chunk sectors */
static uint8_t *bad_write;  /* bitmap over [0, nsect): write failed */
static uint32_t chunk;
static uint64_t nsect;
static uint64_t write_errors, bad_sectors, reports;
static uint64_t fnv;

/* ---- the pattern ---- */
/* splitmix64's output function applied to x + golden ratio. */
static uint64_t mix64(uint64_t x)
{
	uint64_t z = x + 0x9e3779b97f4a7c15ull;

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

static inline uint64_t pattern_word(uint64_t s, unsigned int j)
{
	return mix64(s * WORDS + j);
}

static void fill_pattern(uint8_t *buf, uint64_t s, uint32_t n)
{
	uint64_t *w = (uint64_t *)buf;

	for (uint32_t k = 0; k < n; k++, s++, w += WORDS)
		for (unsigned int j = 0; j < WORDS; j++)
			w[j] = pattern_word(s, j);
}

static int sector_matches(const uint8_t *buf, uint64_t s)
{
	const uint64_t *w = (const uint64_t *)buf;

	for (unsigned int j = 0; j < WORDS; j++)
		if (w[j] != pattern_word(s, j))
			return 0;
	return 1;
}

/* Generation g written to sector s: "AKVM-GEN" magic, g, s, then
 * mix64(~(g * 64 + j)) for words j = 3..63. */
#define GEN_MAGIC 0x4e45472d4d564b41ull   /* "AKVM-GEN" little-endian */

static void gen_fill(uint8_t *buf, uint64_t g, uint64_t s)
{
	uint64_t *w = (uint64_t *)buf;

	w[0] = GEN_MAGIC;
	w[1] = g;
	w[2] = s;
	for (unsigned int j = 3; j < WORDS; j++)
		w[j] = mix64(~(g * WORDS + j));
}

/* ---- FNV-1a 64 ---- */
static void fnv_update(const uint8_t *p, uint64_t n)
{
	uint64_t h = fnv;

	for (uint64_t i = 0; i < n; i++) {
		h ^= p[i];
		h *= 0x100000001b3ull;
	}
	fnv = h;
}

/* ---- one pipelined pass over [first, first + count) ---- */
typedef void (*prep_fn)(uint8_t *buf, uint64_t s, uint32_t n);
typedef void (*done_fn)(uint8_t *buf, uint64_t s, uint32_t n, int res);

static uint8_t *tag_buf(unsigned int tag)
{
	return bufs + (uint64_t)tag * chunk * SECTOR;
}

static void fatal(const char *what, uint64_t s, int res)
{
	printf("disktest: %s at sector %lu: %s\n", what, s, blk_strerror(res));
	guest_exit(res == BLK_ETIMEOUT ? 4 : 2);
}

/* Requests go out in order on tags 0, 1, .., qd-1, 0, ..; completions
 * may arrive in any order but are handed to done() in request order. */
static void pass(int op, uint64_t first, uint64_t count, prep_fn prep,
		 done_fn done)
{
	uint64_t next = first, end = first + count;
	uint64_t submitted = 0, finished = 0;
	uint64_t sec[BLK_MAX_QD];
	uint32_t cnt[BLK_MAX_QD];
	unsigned int qd = dev.qd;

	while (next < end || finished < submitted) {
		while (next < end && submitted - finished < qd) {
			unsigned int tag = (unsigned int)(submitted % qd);
			uint32_t n = end - next < chunk ? (uint32_t)(end - next) : chunk;
			int r;

			if (prep)
				prep(tag_buf(tag), next, n);
			sec[tag] = next;
			cnt[tag] = n;
			r = blk_start(&dev, tag, op, next, n, tag_buf(tag));
			if (r != BLK_OK)
				fatal("cannot submit request", next, r);
			next += n;
			submitted++;
		}
		unsigned int tag = (unsigned int)(finished % qd);
		int res = blk_wait(&dev, tag);

		if (res == BLK_ETIMEOUT || res == BLK_EINVAL)
			fatal(op == BLK_WRITE ? "write" : "read", sec[tag], res);
		done(tag_buf(tag), sec[tag], cnt[tag], res);
		finished++;
	}
}

/* ---- pass callbacks ---- */
static void write_done(uint8_t *buf, uint64_t s, uint32_t n, int res)
{
	(void)buf;
	if (res == BLK_OK)
		return;
	printf("disktest: write error at sector %lu\n", s);
	write_errors++;
	for (uint32_t k = 0; k < n; k++)
		bad_write[(s + k) / 8] |= (uint8_t)(1u << ((s + k) % 8));
}

static void verify_done(uint8_t *buf, uint64_t s, uint32_t n, int res)
{
	if (res != BLK_OK) {
		printf("disktest: read error at sector %lu\n", s);
		bad_sectors += n;
		return;
	}
	for (uint32_t k = 0; k < n; k++, buf += SECTOR) {
		uint64_t t = s + k;

		if (bad_write[t / 8] & (1u << (t % 8)))
			continue;   /* its write already failed */
		if (!sector_matches(buf, t)) {
			if (reports++ < MAX_REPORTS)
				printf("disktest: mismatch at sector %lu\n", t);
			bad_sectors++;
		}
	}
}

static void sum_done(uint8_t *buf, uint64_t s, uint32_t n, int res)
{
	if (res != BLK_OK) {
		printf("disktest: read error at sector %lu\n", s);
		bad_sectors += n;
	}
	fnv_update(buf, (uint64_t)n * SECTOR);
}

/* ---- flush ---- */
static int do_flush(void)
{
	int r;

	if (!dev.has_flush)
		return BLK_OK;   /* no FLUSH feature: a write-through device */
	r = blk_sync(&dev, BLK_FLUSH, 0, 0, NULL);
	if (r == BLK_ETIMEOUT || r == BLK_EINVAL)
		fatal("flush", 0, r);
	return r;
}

/* ---- generation mode ---- */
static int run_gen(uint64_t gens)
{
	uint8_t *buf = tag_buf(0);

	for (uint64_t g = 1; g <= gens; g++) {
		uint64_t s = g % nsect;
		int r;

		gen_fill(buf, g, s);
		r = blk_sync(&dev, BLK_WRITE, s, 1, buf);
		if (r == BLK_ETIMEOUT || r == BLK_EINVAL)
			fatal("write", s, r);
		if (r != BLK_OK) {
			printf("disktest: write error at sector %lu\n", s);
			write_errors++;
			continue;
		}
		r = do_flush();
		if (r != BLK_OK) {
			printf("disktest: flush error: %s\n", blk_strerror(r));
			write_errors++;
			continue;
		}
		printf("disktest: flushed generation %lu\n", g);
	}
	if (write_errors) {
		printf("disktest: read-only: %lu write errors\n", write_errors);
		return 3;
	}
	printf("disktest: ok\n");
	return 0;
}

static void print_virtio_id(void)
{
	char id[21];
	uint8_t *buf = tag_buf(0);
	unsigned int st;

	memset(buf, 0, 20);
	st = vblk_rw(&dev.v, VIRTIO_BLK_T_GET_ID, 0, buf, 20);
	if (st != VIRTIO_BLK_S_OK) {
		printf("disktest: GET_ID status %u\n", st);
		return;
	}
	for (int i = 0; i < 20; i++)
		id[i] = buf[i] >= 0x20 && buf[i] < 0x7f ? (char)buf[i] :
			buf[i] ? '?' : '\0';
	id[20] = '\0';
	printf("disktest: id \"%s\"\n", id);
}

int main(void)
{
	char name[16] = "";
	uint64_t want, qd, gens, rounds, round = 0, t0, t_write = 0, t_verify, t_sum;
	int kind = BLK_VIRTIO, given, r;

	given = opt_str("dev", name, sizeof(name));
	want = opt_u64("sectors", 2048);
	qd = opt_u64("qd", 8);
	chunk = (uint32_t)opt_u64("chunk", 8);
	gens = opt_u64("gen", 0);
	rounds = opt_u64("rounds", 0);
	if (given)
		kind = blk_kind(name);
	if (kind < 0) {
		printf("disktest: bad dev=%s (virtio, ata-word or ata-rep)\n", name);
		return 2;
	}
	if (chunk < 1 || chunk > BLK_MAX_XFER / SECTOR) {
		printf("disktest: bad chunk=%u (1..%u)\n", chunk,
		       BLK_MAX_XFER / SECTOR);
		return 2;
	}
	if (qd < 1 || qd > BLK_MAX_QD) {
		printf("disktest: bad qd=%lu (1..%u)\n", qd, BLK_MAX_QD);
		return 2;
	}
	/* ata-rep when probing: never slower than ata-word (rep insw is
	 * served in one go; rep outsw costs what outw does). */
	r = given ? blk_open(&dev, kind, (unsigned int)qd) :
		    blk_probe(&dev, BLK_ATA_REP, (unsigned int)qd);
	if (r < 0) {
		if (r == -2)
			printf("disktest: the virtio-blk disk found did not "
			       "initialise\n");
		else if (given)
			printf("disktest: no %s disk\n", name);
		else
			printf("disktest: no disk found (probed virtio-mmio "
			       "slots and ATA 0x%x)\n", ATA_PRIMARY_IO);
		return 2;
	}
	kind = dev.kind;
	printf("disktest: dev=%s capacity=%lu sectors\n", dev.name, dev.capacity);
	if (!dev.capacity) {
		printf("disktest: empty disk\n");
		return 2;
	}
	nsect = want < dev.capacity ? want : dev.capacity;

	bufs = mem_alloc((uint64_t)dev.qd * chunk * SECTOR, 4096);
	bad_write = mem_zalloc(nsect / 8 + 1, 16);
	if (!bufs || !bad_write) {
		printf("disktest: out of memory\n");
		return 2;
	}
	if (dev.ro)
		printf("disktest: the device says it is read-only; writing "
		       "anyway to see the errors\n");
	if (kind == BLK_VIRTIO)
		print_virtio_id();

	if (gens) {
		if (!nsect) {
			printf("disktest: gen needs sectors >= 1\n");
			return 2;
		}
		return run_gen(gens);
	}

again:
	if (opt_u64("write", 1)) {
		printf("disktest: writing %lu sectors, %u per request, %u in flight\n",
		       nsect, chunk, dev.qd);
		t0 = rdtsc();
		pass(BLK_WRITE, 0, nsect, fill_pattern, write_done);
		if (nsect) {
			int r = do_flush();

			if (r != BLK_OK) {
				printf("disktest: flush error: %s\n", blk_strerror(r));
				write_errors++;
			}
		}
		t_write = rdtsc() - t0;
	}

	t0 = rdtsc();
	pass(BLK_READ, 0, nsect, NULL, verify_done);
	t_verify = rdtsc() - t0;

	fnv = 0xcbf29ce484222325ull;   /* FNV-1a 64 offset basis */
	t0 = rdtsc();
	pass(BLK_READ, 0, dev.capacity, NULL, sum_done);
	t_sum = rdtsc() - t0;

	if (rounds) {
		printf("disktest: round %lu write_errors=%lu bad=%lu checksum %016lx\n",
		       ++round, write_errors, bad_sectors, fnv);
		if (round < rounds) {
			write_errors = bad_sectors = reports = 0;
			memset(bad_write, 0, nsect / 8 + 1);
			goto again;
		}
	}
	printf("disktest: ticks write=%lu verify=%lu checksum=%lu", t_write,
	       t_verify, t_sum);
	if (kind == BLK_VIRTIO)
		printf(" notifies=%lu", dev.v.notifies);
	printf("\n");
	printf("disktest: checksum %016lx\n", fnv);
	if (bad_sectors) {
		printf("disktest: %lu bad sectors\n", bad_sectors);
		return 1;
	}
	if (write_errors) {
		printf("disktest: read-only: %lu write errors\n", write_errors);
		return 3;
	}
	printf("disktest: ok\n");
	return 0;
}
