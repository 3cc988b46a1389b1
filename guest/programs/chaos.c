/*
 * chaos: seeded random port I/O and MMIO over every device window aiokvm
 * has, with legitimate disk use interleaved, to show that nothing a guest
 * does to its devices takes the VMM down.
 *
 * Options: seed=S (1)  ops=N (2000)  legit=K (64: every K ops, reset and
 *          re-initialise the virtio-blk disk and the ATA disk and write,
 *          read back and compare one sector on each; 0: never)
 *          serial_max=B (32: bytes chaos may send to the console)
 *          quiet (no per-failure lines)  use cpl=3
 *
 * Each op picks one of:
 *   - a register access in a virtio-mmio slot (0xfeb00000 + 0x200*i, all 8,
 *     empty ones too): random offset (mostly the transport's registers),
 *     size 1/2/4/8, read or write, values from a palette (status bit sets
 *     in any order, resets, QueueNotify garbage, selectors out of range);
 *   - a queue set-up on a present transport that points anywhere: rings
 *     outside RAM, across the end of RAM, overlapping each other in a
 *     scratch area, QueueNum 0 / not a power of two / huge, QueueReady
 *     toggled, DRIVER_OK with or without FEATURES_OK, then a garbage avail
 *     ring and descriptors and a notify, sometimes a reset right after;
 *   - the 16550 at 0x3f8 (plus the other COM bases, unclaimed): any
 *     register, any value, but at most serial_max bytes through THR
 *     (printable ones), so the console is not flooded;
 *   - the ATA primary channel (0x1f0-0x1f7, 0x3f6): registers, commands
 *     (IDENTIFY, READ/WRITE SECTORS with random LBA/count, FLUSH, garbage
 *     opcodes), SRST, data port words and rep insw/outsw strings;
 *   - unclaimed ports (never 0xf4-0xf7: debug-exit ends the VM) and
 *     unclaimed MMIO (between RAM and the slots, past slot 7).
 * Descriptors chaos writes only name the scratch area or memory outside
 * RAM, so the devices never scribble over the program itself.
 *
 * Prints "chaos: seed=S ops=N mmio=M pio=P legit_ok=A legit_fail=B ..." and
 * exits 0 through debug-exit (the only write to 0xf4).  A legit operation
 * follows a full reset, so legit_fail counts real device failures.
 */
#include "guest.h"
#include "ata.h"
#include "mem.h"
#include "virtio.h"

#define SCRATCH_SIZE   0x10000u
#define GUARD_SIZE     (2u << 20)
#define SECTOR         512
#define MAX_FAIL_LINES 8

static uint64_t rng;
static uint8_t *scratch;          /* garbage rings and buffers live here */
static uint8_t *ata_buf;          /* 256 sectors, for rep insw/outsw */
static uint8_t *wbuf, *rbuf;      /* legit transfers */
static uint64_t ram_end;
static uint64_t n_mmio, n_pio, serial_bytes, serial_max;
static uint64_t legit_ok, legit_fail, vblk_ok, vblk_fail, ata_ok, ata_fail;
static uint64_t needs_reset_seen, fail_lines;
static int quiet;

static uint32_t slot_id[VIRTIO_MMIO_SLOTS];   /* DeviceID, 0 if empty */
static int present[VIRTIO_MMIO_SLOTS], npresent;

/* ---- PRNG: xorshift64*, seeded through splitmix64 ---- */
static uint64_t rnd(void)
{
	rng ^= rng >> 12;
	rng ^= rng << 25;
	rng ^= rng >> 27;
	return rng * 0x2545f4914f6cdd1dull;
}

static uint32_t below(uint32_t n)
{
	return n ? (uint32_t)((rnd() >> 32) % n) : 0;
}

static void seed_rng(uint64_t s)
{
	uint64_t z = s + 0x9e3779b97f4a7c15ull;

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	rng = (z ^ (z >> 31)) | 1;
}

/* ---- raw accesses of any size ---- */
static uint64_t mmio_rd(uintptr_t a, unsigned int size)
{
	uint64_t v = 0;

	n_mmio++;
	switch (size) {
	case 1:
		__asm__ volatile("movb (%1), %b0" : "=q"(v) : "r"(a) : "memory");
		return v & 0xff;
	case 2:
		__asm__ volatile("movw (%1), %w0" : "=r"(v) : "r"(a) : "memory");
		return v & 0xffff;
	case 4:
		__asm__ volatile("movl (%1), %k0" : "=r"(v) : "r"(a) : "memory");
		return v & 0xffffffffu;
	default:
		__asm__ volatile("movq (%1), %0" : "=r"(v) : "r"(a) : "memory");
		return v;
	}
}

static void mmio_wr(uintptr_t a, unsigned int size, uint64_t v)
{
	n_mmio++;
	switch (size) {
	case 1:
		__asm__ volatile("movb %b0, (%1)" : : "q"(v), "r"(a) : "memory");
		break;
	case 2:
		__asm__ volatile("movw %w0, (%1)" : : "r"(v), "r"(a) : "memory");
		break;
	case 4:
		__asm__ volatile("movl %k0, (%1)" : : "r"(v), "r"(a) : "memory");
		break;
	default:
		__asm__ volatile("movq %0, (%1)" : : "r"(v), "r"(a) : "memory");
		break;
	}
}

static int is_debug_exit(uint16_t port, unsigned int size)
{
	return port + size > DEBUG_EXIT_PORT && port < DEBUG_EXIT_PORT + 4;
}

static uint32_t pio_rd(uint16_t port, unsigned int size)
{
	if (is_debug_exit(port, size))
		return 0;
	n_pio++;
	if (size == 1)
		return inb(port);
	if (size == 2)
		return inw(port);
	return inl(port);
}

static void pio_wr(uint16_t port, unsigned int size, uint32_t v)
{
	if (is_debug_exit(port, size))
		return;
	n_pio++;
	if (size == 1)
		outb(port, (uint8_t)v);
	else if (size == 2)
		outw(port, (uint16_t)v);
	else
		outl(port, v);
}

static unsigned int rand_size(void)
{
	static const unsigned int sizes[] = { 1, 2, 4, 4, 4, 8 };

	return sizes[below(6)];
}

/* ---- value palettes ---- */
static uint32_t rand_value(void)
{
	switch (below(10)) {
	case 0:
		return 0;
	case 1:
		return 0xffffffffu;
	case 2:
		return below(16);
	case 3:
		return 1u << below(32);
	case 4:
		return 0x80000000u | (uint32_t)rnd();
	case 5:
		return (1u << below(17)) + below(3) - 1;   /* around powers of two */
	default:
		return (uint32_t)rnd();
	}
}

static uint32_t rand_status(void)
{
	static const uint32_t bits[] = {
		VSTAT_ACKNOWLEDGE, VSTAT_DRIVER, VSTAT_FEATURES_OK,
		VSTAT_DRIVER_OK, VSTAT_NEEDS_RESET, VSTAT_FAILED, 0x10, 0x20
	};
	uint32_t v = 0;

	if (below(8) == 0)
		return 0;   /* reset */
	for (unsigned int i = 0; i < 8; i++)
		if (below(2))
			v |= bits[i];
	if (below(16) == 0)
		v |= (uint32_t)rnd() & 0xffffff00u;
	return v;
}

/* An address for a ring or a buffer: the scratch area (aligned or not),
 * across the end of RAM, outside RAM (MMIO holes, above 4 GiB, the top of
 * the address space), or 0 for a ring (low memory: start-info zeros; never
 * for a buffer, which could reach the image at 1 MiB).  Whatever lies in
 * RAM is scratch or the guard after it, which a device may overwrite with
 * up to a disk's worth of data (keep chaos disks <= GUARD_SIZE). */
static uint64_t chaos_addr(uint32_t len_hint, int ring)
{
	uint64_t s = (uint64_t)(uintptr_t)scratch, a;

	switch (below(10)) {
	case 0:
		return ram_end - below(len_hint ? len_hint : 64);
	case 1:
		a = 0xfeb00000ull + below(0x1000);
		break;
	case 2:
		a = 0x100000000ull + (rnd() & 0xfffffff0ull);
		break;
	case 3:
		a = rnd();
		break;
	case 4:
		a = 0xfffffffffffff000ull + below(0x1000);
		break;
	case 5:
		a = 0x80000000ull + below(0x10000000);
		break;
	case 6:
		if (ring)
			return 0;
		/* fall through */
	default:
		a = s + below(SCRATCH_SIZE - 4096);
		return below(2) ? a & ~15ull : a;
	}
	return a < ram_end ? a + ram_end : a;   /* a big guest: still outside RAM */
}

/* ---- virtio-mmio ---- */
static uintptr_t slot_base(int i)
{
	return VIRTIO_MMIO_BASE + (uintptr_t)i * VIRTIO_MMIO_STRIDE;
}

static void vreg_wr(uintptr_t base, uint32_t off, uint32_t v)
{
	mmio_wr(base + off, 4, v);
}

static uint32_t vreg_rd(uintptr_t base, uint32_t off)
{
	return (uint32_t)mmio_rd(base + off, 4);
}

static int rand_slot(void)
{
	/* Mostly a present transport; sometimes any slot. */
	if (npresent && below(4))
		return present[below((uint32_t)npresent)];
	return (int)below(VIRTIO_MMIO_SLOTS);
}

static const uint32_t vregs[] = {
	VMMIO_MAGIC, VMMIO_VERSION, VMMIO_DEVICE_ID, VMMIO_VENDOR_ID,
	VMMIO_DEV_FEATURES, VMMIO_DEV_FEATURES_SEL, VMMIO_DRV_FEATURES,
	VMMIO_DRV_FEATURES_SEL, VMMIO_QUEUE_SEL, VMMIO_QUEUE_NUM_MAX,
	VMMIO_QUEUE_NUM, VMMIO_QUEUE_READY, VMMIO_QUEUE_NOTIFY,
	VMMIO_INT_STATUS, VMMIO_INT_ACK, VMMIO_STATUS, VMMIO_QUEUE_DESC_LO,
	VMMIO_QUEUE_DESC_HI, VMMIO_QUEUE_DRIVER_LO, VMMIO_QUEUE_DRIVER_HI,
	VMMIO_QUEUE_DEVICE_LO, VMMIO_QUEUE_DEVICE_HI, 0xac, 0xb0, 0xb4, 0xb8,
	0xbc, 0xc0, VMMIO_CONFIG_GEN, VMMIO_CONFIG, VMMIO_CONFIG + 4,
	VMMIO_CONFIG + 8, VMMIO_CONFIG + 0x14,
};
#define NVREGS (sizeof(vregs) / sizeof(vregs[0]))

static uint32_t value_for(uint32_t off)
{
	switch (off) {
	case VMMIO_STATUS:
		return rand_status();
	case VMMIO_QUEUE_DESC_LO:
	case VMMIO_QUEUE_DRIVER_LO:
	case VMMIO_QUEUE_DEVICE_LO:
		return (uint32_t)chaos_addr(4096, 1);
	case VMMIO_QUEUE_DESC_HI:
	case VMMIO_QUEUE_DRIVER_HI:
	case VMMIO_QUEUE_DEVICE_HI:
		return below(2) ? 0 : (uint32_t)(chaos_addr(0, 1) >> 32);
	case VMMIO_QUEUE_SEL:
	case VMMIO_QUEUE_NOTIFY:
	case VMMIO_DEV_FEATURES_SEL:
	case VMMIO_DRV_FEATURES_SEL:
		return below(2) ? below(4) : rand_value();
	default:
		return rand_value();
	}
}

static void op_vmmio_reg(void)
{
	uintptr_t base = slot_base(rand_slot());
	uint32_t off;
	unsigned int size;

	if (below(4)) {
		off = vregs[below(NVREGS)];
		size = below(4) ? 4 : rand_size();
	} else {
		off = below(VIRTIO_MMIO_STRIDE);   /* may cross into the next slot */
		size = rand_size();
	}
	if (below(2)) {
		mmio_rd(base + off, size);
	} else {
		uint64_t v = value_for(off);

		if (size == 8)
			v |= rnd() & 0xffffffff00000000ull;
		mmio_wr(base + off, size, v);
	}
}

/* Fills the ring memory that lies inside scratch with garbage that names
 * only scratch or non-RAM addresses. */
static int in_scratch(uint64_t a, uint64_t len)
{
	uint64_t s = (uint64_t)(uintptr_t)scratch;

	return a >= s && len <= SCRATCH_SIZE && a - s <= SCRATCH_SIZE - len;
}

static void garbage_rings(uint64_t desc, uint64_t avail, uint32_t qn)
{
	uint32_t n = qn > 256 || qn == 0 ? 16 : qn;

	if (in_scratch(desc, 16ull * n)) {
		struct vring_desc *d = (struct vring_desc *)(uintptr_t)desc;

		for (uint32_t i = 0; i < n; i++) {
			d[i].addr = chaos_addr(64, 0);
			d[i].len = below(3) ? below(4096) + 1 : rand_value();
			d[i].flags = (uint16_t)(below(4) ? below(8) : rnd());
			d[i].next = (uint16_t)(below(4) ? below(n) : rnd());
		}
	}
	if (in_scratch(avail, 4 + 2ull * n + 2)) {
		struct vring_avail *a = (struct vring_avail *)(uintptr_t)avail;

		a->flags = (uint16_t)below(3);
		for (uint32_t i = 0; i < n; i++)
			a->ring[i] = (uint16_t)(below(4) ? below(n) : rnd());
		a->idx = (uint16_t)(below(2) ? below(n + 1) : rnd());
	}
	__asm__ volatile("mfence" ::: "memory");
}

static uint32_t rand_qnum(uint32_t max)
{
	switch (below(8)) {
	case 0:
		return 0;
	case 1:
		return max + 1;
	case 2:
		return 0xffffffffu;
	case 3:
		return 3 + 2 * below(100);   /* not a power of two */
	case 4:
		return 0x10000;
	default:
		return 1u << below(9);      /* 1..256 */
	}
}

static void op_queue_setup(void)
{
	uintptr_t base = slot_base(rand_slot());
	uint32_t qn, max, st;
	uint64_t ring[3];

	/* Half the time a by-the-book set-up (so the device really takes the
	 * queue and walks the garbage in it), otherwise anything goes. */
	int plausible = below(2);

	if (plausible) {
		uint64_t offered;

		vreg_wr(base, VMMIO_STATUS, 0);
		vreg_wr(base, VMMIO_STATUS, VSTAT_ACKNOWLEDGE | VSTAT_DRIVER);
		vreg_wr(base, VMMIO_DEV_FEATURES_SEL, 0);
		offered = vreg_rd(base, VMMIO_DEV_FEATURES);
		vreg_wr(base, VMMIO_DEV_FEATURES_SEL, 1);
		offered |= (uint64_t)vreg_rd(base, VMMIO_DEV_FEATURES) << 32;
		offered &= rnd() | (1ull << VIRTIO_F_VERSION_1);
		vreg_wr(base, VMMIO_DRV_FEATURES_SEL, 0);
		vreg_wr(base, VMMIO_DRV_FEATURES, (uint32_t)offered);
		vreg_wr(base, VMMIO_DRV_FEATURES_SEL, 1);
		vreg_wr(base, VMMIO_DRV_FEATURES, (uint32_t)(offered >> 32));
		vreg_wr(base, VMMIO_STATUS, VSTAT_ACKNOWLEDGE | VSTAT_DRIVER | VSTAT_FEATURES_OK);
		vreg_wr(base, VMMIO_QUEUE_SEL, below(2));
		qn = 1u << below(9);
		max = vreg_rd(base, VMMIO_QUEUE_NUM_MAX);
		while (qn > max && qn > 1)
			qn >>= 1;
		vreg_wr(base, VMMIO_QUEUE_NUM, qn);
		for (int i = 0; i < 3; i++)
			ring[i] = i && below(4) == 0 ? ring[below((uint32_t)i)] + 16 * below(4) :
				  (uint64_t)(uintptr_t)scratch + (below(SCRATCH_SIZE / 2) & ~15u);
		garbage_rings(ring[0], ring[1], qn);
		for (int i = 0; i < 3; i++) {
			vreg_wr(base, VMMIO_QUEUE_DESC_LO + 0x10 * (uint32_t)i, (uint32_t)ring[i]);
			vreg_wr(base, VMMIO_QUEUE_DESC_HI + 0x10 * (uint32_t)i, 0);
		}
		vreg_wr(base, VMMIO_QUEUE_READY, 1);
		vreg_wr(base, VMMIO_STATUS, VSTAT_ACKNOWLEDGE | VSTAT_DRIVER | VSTAT_FEATURES_OK |
			VSTAT_DRIVER_OK);
		goto notify;
	}
	if (below(3))
		vreg_wr(base, VMMIO_STATUS, 0);   /* sometimes no reset: live queue */
	st = VSTAT_ACKNOWLEDGE | VSTAT_DRIVER;
	if (below(4))
		vreg_wr(base, VMMIO_STATUS, below(4) ? st : rand_status());
	vreg_wr(base, VMMIO_DRV_FEATURES_SEL, below(3) ? 1 : below(3));
	vreg_wr(base, VMMIO_DRV_FEATURES, below(2) ? 1 : rand_value());
	vreg_wr(base, VMMIO_DRV_FEATURES_SEL, 0);
	vreg_wr(base, VMMIO_DRV_FEATURES, below(2) ? vreg_rd(base, VMMIO_DEV_FEATURES) : rand_value());
	if (below(4))
		vreg_wr(base, VMMIO_STATUS, st | VSTAT_FEATURES_OK);
	vreg_wr(base, VMMIO_QUEUE_SEL, below(4) ? below(2) : rand_value());
	max = vreg_rd(base, VMMIO_QUEUE_NUM_MAX);
	qn = rand_qnum(max);
	vreg_wr(base, VMMIO_QUEUE_NUM, qn);

	for (int i = 0; i < 3; i++) {
		if (i && below(4) == 0)
			ring[i] = ring[below((uint32_t)i)] + below(64);   /* overlap */
		else
			ring[i] = below(3) ? (uint64_t)(uintptr_t)scratch +
					     (below(SCRATCH_SIZE / 2) & ~15u) : chaos_addr(4096, 1);
	}
	garbage_rings(ring[0], ring[1], qn);
	for (int i = 0; i < 3; i++) {
		vreg_wr(base, VMMIO_QUEUE_DESC_LO + 0x10 * (uint32_t)i, (uint32_t)ring[i]);
		vreg_wr(base, VMMIO_QUEUE_DESC_HI + 0x10 * (uint32_t)i, (uint32_t)(ring[i] >> 32));
	}
	for (unsigned int t = below(4); t; t--)
		vreg_wr(base, VMMIO_QUEUE_READY, below(3) ? 1 : rand_value());
	if (below(4))
		vreg_wr(base, VMMIO_STATUS, below(4) ? st | VSTAT_FEATURES_OK | VSTAT_DRIVER_OK
					     : rand_status());
notify:
	for (unsigned int k = below(4) + plausible; k; k--) {
		vreg_wr(base, VMMIO_QUEUE_NOTIFY, below(3) ? below(3) : rand_value());
		if (below(3) == 0)
			garbage_rings(ring[0], ring[1], qn);   /* change it under the device */
	}
	if (vreg_rd(base, VMMIO_STATUS) & VSTAT_NEEDS_RESET)
		needs_reset_seen++;
	vreg_rd(base, VMMIO_INT_STATUS);
	if (below(3) == 0)
		vreg_wr(base, VMMIO_INT_ACK, rand_value());
	if (below(4) == 0)
		vreg_wr(base, VMMIO_STATUS, 0);   /* reset mid-operation */
}

/* ---- 16550 ---- */
static void op_serial(void)
{
	static const uint16_t bases[] = { 0x3f8, 0x3f8, 0x3f8, 0x2f8, 0x3e8, 0x2e8 };
	uint16_t port = (uint16_t)(bases[below(6)] + below(8));
	unsigned int size = below(6) ? 1 : rand_size() % 8;   /* 8 -> 0 -> 1 */

	if (!size)
		size = 1;
	if (below(2)) {
		if (below(8) == 0) {
			uint8_t tmp[16], *p = tmp;
			uint64_t n = below(16) + 1;

			n_pio++;
			__asm__ volatile("rep insb" : "+D"(p), "+c"(n) : "d"(port) : "memory");
		} else {
			pio_rd(port, size);
		}
		return;
	}
	/* Offset 0 of COM1 may be THR (DLAB 0): count it against the budget,
	 * and so does a wide write that spans it. */
	if ((port & ~7) == 0x3f8 && (port & 7) == 0) {
		if (serial_bytes >= serial_max)
			return;
		serial_bytes++;
		pio_wr(port, 1, 'a' + below(26));
		return;
	}
	if ((port & ~7) == 0x3f8 && (port & 7) + size > 8)
		size = 1;   /* would reach 0x400: keep to the UART */
	pio_wr(port, size, rand_value());
}

/* ---- ATA ---- */
static void op_ata(void)
{
	static const uint8_t cmds[] = {
		ATA_CMD_IDENTIFY, ATA_CMD_READ_SECTORS, ATA_CMD_WRITE_SECTORS,
		ATA_CMD_FLUSH_CACHE, 0x21, 0x31, 0xea, 0x24, 0x34, 0xc8, 0x00, 0xff,
	};
	uint16_t io = ATA_PRIMARY_IO;

	switch (below(10)) {
	case 0:   /* a command with random taskfile */
		pio_wr(io + ATA_REG_COUNT, 1, below(3) ? below(4) : rnd());
		pio_wr(io + ATA_REG_LBA0, 1, (uint32_t)rnd());
		pio_wr(io + ATA_REG_LBA1, 1, below(2) ? 0 : (uint32_t)rnd());
		pio_wr(io + ATA_REG_LBA2, 1, below(2) ? 0 : (uint32_t)rnd());
		pio_wr(io + ATA_REG_DEVICE, 1, below(3) ? 0xe0 : (uint32_t)rnd());
		pio_wr(io + ATA_REG_COMMAND, 1, below(4) ? cmds[below(sizeof(cmds))] : (uint32_t)rnd());
		break;
	case 1: {   /* strings on the data port */
		/* rep outsw costs an exit per word on some hosts: keep it short */
		uint64_t words = below(4) ? 256 : below(1024) + 1;
		void *p = ata_buf;

		n_pio++;
		if (below(2))
			__asm__ volatile("rep insw" : "+D"(p), "+c"(words)
					 : "d"((uint16_t)io) : "memory");
		else
			__asm__ volatile("rep outsw" : "+S"(p), "+c"(words)
					 : "d"((uint16_t)io) : "memory");
		break;
	}
	case 2:   /* device control: SRST, nIEN, garbage */
		pio_wr(ATA_PRIMARY_CTL, 1, below(2) ? ATA_CTL_SRST | ATA_CTL_NIEN : rand_value());
		if (below(2))
			pio_wr(ATA_PRIMARY_CTL, 1, ATA_CTL_NIEN);
		break;
	case 3:
		pio_rd(ATA_PRIMARY_CTL, rand_size() % 8 ? 1 : 2);
		break;
	case 4: case 5:
		for (unsigned int k = below(8) + 1; k; k--)
			pio_wr(io, 2, (uint32_t)rnd());
		break;
	default: {
		uint16_t port = (uint16_t)(io + below(8));
		unsigned int size = rand_size() % 8;

		if (!size)
			size = 2;
		if (below(2))
			pio_rd(port, size);
		else
			pio_wr(port, size, rand_value());
	}
	}
}

/* ---- unclaimed space ---- */
static void op_unclaimed(void)
{
	if (below(2)) {
		uint16_t port = (uint16_t)(0x100 + below(0xff00));
		unsigned int size = rand_size() % 8;

		if (!size)
			size = 4;
		if (port + size > 0x3f8 && port < 0x400)
			return;   /* COM1's THR: only op_serial writes it, within budget */
		if (below(2))
			pio_rd(port, size);
		else
			pio_wr(port, size, rand_value());
		return;
	}
	static const uint64_t holes[] = {
		0xfeb01000ull, 0xfea00000ull, 0xfe000000ull, 0xd0000000ull,
	};
	uintptr_t a = (uintptr_t)(holes[below(4)] + below(0x1000));
	unsigned int size = rand_size();

	if (a < ram_end)
		return;
	if (below(2))
		mmio_rd(a, size);
	else
		mmio_wr(a, size, rnd());
}

/* ---- legitimate use ---- */
static void fill_sector(uint8_t *p, uint64_t tag)
{
	uint64_t *w = (uint64_t *)p;

	for (unsigned int i = 0; i < SECTOR / 8; i++)
		w[i] = tag * 0x9e3779b97f4a7c15ull + i * 0x2545f4914f6cdd1dull;
}

static void legit_result(const char *dev, int ok, uint64_t op, const char *why)
{
	if (ok) {
		legit_ok++;
		return;
	}
	legit_fail++;
	if (!quiet && fail_lines++ < MAX_FAIL_LINES) {
		serial_init();
		printf("chaos: legit %s failed at op %lu: %s\n", dev, op, why);
	}
}

static void legit_vblk(uint64_t op)
{
	static struct vblk v;
	unsigned int opts = VBLK_OPT_QUIET;
	uint64_t sector;
	unsigned int st;

	if (below(4) == 0)
		opts |= VBLK_OPT_NO_INDIRECT;
	if (below(4) == 0)
		opts |= VBLK_OPT_NO_EVENT_IDX;
	/* vblk_open resets the device, then initialises it from scratch. */
	int r = vblk_open(&v, 1, opts);

	if (r == -1)
		return;   /* no virtio-blk disk: nothing to test */
	if (r < 0) {
		vblk_fail++;
		legit_result("virtio-blk", 0, op, "initialisation failed");
		return;
	}
	if (!v.capacity) {
		vblk_fail++;
		legit_result("virtio-blk", 0, op, "capacity 0");
		return;
	}
	sector = rnd() % v.capacity;
	fill_sector(wbuf, sector ^ op);
	memset(rbuf, 0, SECTOR);
	if (v.ro) {
		st = VIRTIO_BLK_S_OK;
	} else {
		st = vblk_submit(&v, 0, VIRTIO_BLK_T_OUT, sector, wbuf, SECTOR) ? VBLK_S_NODESC
			: vblk_wait(&v, 0, 5000000);
	}
	if (st == VIRTIO_BLK_S_OK)
		st = vblk_submit(&v, 0, VIRTIO_BLK_T_IN, sector, rbuf, SECTOR) ? VBLK_S_NODESC
			: vblk_wait(&v, 0, 5000000);
	if (st != VIRTIO_BLK_S_OK) {
		vblk_fail++;
		legit_result("virtio-blk", 0, op, st == VBLK_S_TIMEOUT ? "timeout" : "request failed");
	} else if (!v.ro && memcmp(wbuf, rbuf, SECTOR)) {
		vblk_fail++;
		legit_result("virtio-blk", 0, op, "read back differs");
	} else {
		vblk_ok++;
		legit_result("virtio-blk", 1, op, NULL);
	}
}

static int ata_present = -1;

static void legit_ata(uint64_t op)
{
	static struct ata_dev d;
	uint64_t lba;
	int r;

	if (!ata_present)
		return;
	/* A proper reset first: SRST, then the driver's probe (IDENTIFY). */
	outb(ATA_PRIMARY_CTL, ATA_CTL_SRST | ATA_CTL_NIEN);
	outb(ATA_PRIMARY_CTL, ATA_CTL_NIEN);
	n_pio += 2;
	r = ata_probe(&d, ATA_PRIMARY_IO, ATA_PRIMARY_CTL, 0,
		      below(8) ? ATA_XFER_REP : ATA_XFER_WORD);
	if (ata_present < 0) {
		/* The first probe (before any chaos) says whether there is one. */
		ata_present = r == ATA_OK;
		if (!ata_present)
			return;
	}
	if (r != ATA_OK || !d.sectors) {
		ata_fail++;
		legit_result("ata", 0, op, "probe failed");
		return;
	}
	lba = rnd() % d.sectors;
	fill_sector(wbuf, lba ^ op ^ 0xa7a);
	memset(rbuf, 0, SECTOR);
	r = ata_write(&d, lba, 1, wbuf);
	if (r == ATA_EDEV && (d.last_error & 0x04)) {
		r = ata_read(&d, lba, 1, rbuf);   /* ABRT: a read-only disk; just read */
	} else if (r == ATA_OK) {
		r = ata_read(&d, lba, 1, rbuf);
		if (r == ATA_OK && memcmp(wbuf, rbuf, SECTOR))
			r = -1;
	}
	if (r != ATA_OK) {
		ata_fail++;
		legit_result("ata", 0, op, r < 0 ? "read back differs" : "request failed");
	} else {
		ata_ok++;
		legit_result("ata", 1, op, NULL);
	}
}

static void legit(uint64_t op)
{
	legit_vblk(op);
	legit_ata(op);
}

/* ---- main ---- */
int main(void)
{
	uint64_t seed = opt_u64("seed", 1);
	uint64_t ops = opt_u64("ops", 2000);
	uint64_t every = opt_u64("legit", 64);

	serial_max = opt_u64("serial_max", 32);
	quiet = opt_present("quiet");
	seed_rng(seed);
	ram_end = boot_mem_bytes();
	if (ram_end > 0xc0000000ull)
		ram_end = 0xc0000000ull;   /* RAM above 3 GiB continues at 4 GiB */

	scratch = mem_alloc(SCRATCH_SIZE + GUARD_SIZE, 4096);
	ata_buf = scratch ? scratch + SCRATCH_SIZE : NULL;   /* in the guard */
	wbuf = mem_alloc(SECTOR, 4096);
	rbuf = mem_alloc(SECTOR, 4096);
	if (!scratch || !ata_buf || !wbuf || !rbuf) {
		printf("chaos: out of memory\n");
		return 2;
	}
	for (uint32_t i = 0; i < SCRATCH_SIZE / 8; i++)
		((uint64_t *)scratch)[i] = rnd();
	for (int i = 0; i < VIRTIO_MMIO_SLOTS; i++) {
		uintptr_t b = slot_base(i);

		if (mmio_read32(b + VMMIO_MAGIC) == VIRTIO_MAGIC_VALUE &&
		    (slot_id[i] = mmio_read32(b + VMMIO_DEVICE_ID)) != 0)
			present[npresent++] = i;
	}
	printf("chaos: seed=%lu ops=%lu legit every %lu, %d virtio transport(s):", seed, ops,
	       every, npresent);
	for (int i = 0; i < npresent; i++)
		printf(" slot %d id %u", present[i], slot_id[present[i]]);
	printf("\n");

	legit(0);   /* before any chaos: the baseline (and whether ATA is there) */
	for (uint64_t op = 1; op <= ops; op++) {
		uint32_t r = below(100);

		if (r < 40)
			op_vmmio_reg();
		else if (r < 60)
			op_queue_setup();
		else if (r < 75)
			op_serial();
		else if (r < 92)
			op_ata();
		else
			op_unclaimed();
		if (every && op % every == 0)
			legit(op);
	}
	legit(ops + 1);   /* after the last one too */

	serial_init();   /* chaos may have left the UART in any mode */
	if (serial_bytes)
		printf("\n");   /* after chaos's own bytes */
	printf("chaos: seed=%lu ops=%lu mmio=%lu pio=%lu legit_ok=%lu legit_fail=%lu "
	       "vblk=%lu/%lu ata=%lu/%lu needs_reset_seen=%lu serial_bytes=%lu\n",
	       seed, ops, n_mmio, n_pio, legit_ok, legit_fail, vblk_ok, vblk_ok + vblk_fail,
	       ata_ok, ata_ok + ata_fail, needs_reset_seen, serial_bytes);
	return 0;
}
