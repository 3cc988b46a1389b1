/*
 * Polled ATA PIO: IDENTIFY DEVICE, READ/WRITE SECTORS (LBA28) and FLUSH
 * CACHE, with nIEN set so the drive never raises IRQ 14.
 *
 * Every register access is a port I/O exit.  The word mode moves data
 * with one inw/outw per 16-bit word (256 exits per sector); the rep mode
 * uses one rep insw/outsw of 256 words per sector, which a hypervisor can
 * serve in one go.
 */
#include "guest.h"
#include "ata.h"

static inline uint8_t rd(const struct ata_dev *d, int reg)
{
	return inb((uint16_t)(d->io + reg));
}

static inline void wr(const struct ata_dev *d, int reg, uint8_t v)
{
	outb((uint16_t)(d->io + reg), v);
}

static inline uint8_t alt_status(const struct ata_dev *d)
{
	return inb(d->ctl);
}

/* About 400 ns for the status to become valid after a command or a drive
 * select: four reads of the alternate status register (~100 ns each on
 * real hardware). */
static void delay400(const struct ata_dev *d)
{
	for (int i = 0; i < 4; i++)
		(void)alt_status(d);
}

static inline void rep_insw(uint16_t port, void *buf, uint32_t words)
{
	__asm__ volatile("rep insw"
			 : "+D"(buf), "+c"(words)
			 : "d"(port)
			 : "memory");
}

static inline void rep_outsw(uint16_t port, const void *buf, uint32_t words)
{
	__asm__ volatile("rep outsw"
			 : "+S"(buf), "+c"(words)
			 : "d"(port)
			 : "memory");
}

static void read_sector_data(const struct ata_dev *d, uint16_t *p)
{
	uint16_t port = (uint16_t)(d->io + ATA_REG_DATA);

	if (d->xfer == ATA_XFER_REP) {
		rep_insw(port, p, 256);
	} else {
		for (int i = 0; i < 256; i++)
			p[i] = inw(port);
	}
}

static void write_sector_data(const struct ata_dev *d, const uint16_t *p)
{
	uint16_t port = (uint16_t)(d->io + ATA_REG_DATA);

	if (d->xfer == ATA_XFER_REP) {
		rep_outsw(port, p, 256);
	} else {
		for (int i = 0; i < 256; i++)
			outw(port, p[i]);
	}
}

/* Polls the status register until BSY clears.  With want_drq, also needs
 * DRQ (data ready) unless the device reports an error. */
static int wait_ready(struct ata_dev *d, int want_drq)
{
	uint64_t hz = tsc_hz(), end = rdtsc() + d->timeout_us * (hz / 1000000);
	uint8_t s;

	for (;;) {
		s = rd(d, ATA_REG_STATUS);
		if (!(s & ATA_SR_BSY))
			break;
		if (rdtsc() > end) {
			d->last_status = s;
			return ATA_ETIMEOUT;
		}
		cpu_relax();
	}
	d->last_status = s;
	if (s & (ATA_SR_ERR | ATA_SR_DF)) {
		d->last_error = rd(d, ATA_REG_ERROR);
		return ATA_EDEV;
	}
	if (want_drq && !(s & ATA_SR_DRQ))
		return ATA_EPROTO;
	return ATA_OK;
}

static void select_drive(struct ata_dev *d, uint8_t lba_hi)
{
	wr(d, ATA_REG_DEVICE,
	   (uint8_t)(0xe0 | (d->slave ? 0x10 : 0) | (lba_hi & 0x0f)));
	delay400(d);
}

/* Programs count (1..256, 256 written as 0) and a 28-bit LBA, then the
 * command.  The caller has checked the range. */
static int issue_rw(struct ata_dev *d, uint8_t cmd, uint64_t lba, uint32_t count)
{
	int r = wait_ready(d, 0);

	/* A stale error from the last command is harmless here. */
	if (r == ATA_ETIMEOUT)
		return r;
	select_drive(d, (uint8_t)(lba >> 24));
	wr(d, ATA_REG_FEATURES, 0);
	wr(d, ATA_REG_COUNT, (uint8_t)(count & 0xff));
	wr(d, ATA_REG_LBA0, (uint8_t)lba);
	wr(d, ATA_REG_LBA1, (uint8_t)(lba >> 8));
	wr(d, ATA_REG_LBA2, (uint8_t)(lba >> 16));
	wr(d, ATA_REG_COMMAND, cmd);
	delay400(d);
	return ATA_OK;
}

static int check_range(const struct ata_dev *d, uint64_t lba, uint32_t count)
{
	return count >= 1 && count <= 256 && lba < d->sectors &&
	       count <= d->sectors - lba;
}

int ata_read(struct ata_dev *d, uint64_t lba, uint32_t count, void *buf)
{
	uint16_t *p = buf;
	int r;

	if (!check_range(d, lba, count))
		return ATA_EPROTO;
	r = issue_rw(d, ATA_CMD_READ_SECTORS, lba, count);
	if (r)
		return r;
	for (uint32_t s = 0; s < count; s++, p += 256) {
		/* Each sector: BSY clears and DRQ rises before its data. */
		r = wait_ready(d, 1);
		if (r)
			return r;
		read_sector_data(d, p);
	}
	/* After the last block the drive should be idle, DRQ clear. */
	delay400(d);
	r = wait_ready(d, 0);
	if (r == ATA_OK && (d->last_status & ATA_SR_DRQ))
		return ATA_EPROTO;
	return r;
}

int ata_write(struct ata_dev *d, uint64_t lba, uint32_t count, const void *buf)
{
	const uint16_t *p = buf;
	int r;

	if (!check_range(d, lba, count))
		return ATA_EPROTO;
	r = issue_rw(d, ATA_CMD_WRITE_SECTORS, lba, count);
	if (r)
		return r;
	for (uint32_t s = 0; s < count; s++, p += 256) {
		/* DRQ asks for the next sector; an ERR here means the last
		 * sector (or the command) failed. */
		r = wait_ready(d, 1);
		if (r)
			return r;
		write_sector_data(d, p);
		delay400(d);
	}
	return wait_ready(d, 0);
}

int ata_flush(struct ata_dev *d)
{
	int r = wait_ready(d, 0);

	if (r == ATA_ETIMEOUT)
		return r;
	select_drive(d, 0);
	wr(d, ATA_REG_COMMAND, ATA_CMD_FLUSH_CACHE);
	delay400(d);
	return wait_ready(d, 0);
}

/* IDENTIFY strings are big-endian within each word and space padded. */
static void ident_string(char *out, const uint16_t *w, int words)
{
	int n = 0;

	for (int i = 0; i < words; i++) {
		out[n++] = (char)(w[i] >> 8);
		out[n++] = (char)(w[i] & 0xff);
	}
	while (n > 0 && (out[n - 1] == ' ' || out[n - 1] == '\0'))
		n--;
	out[n] = '\0';
}

int ata_probe(struct ata_dev *d, uint16_t io, uint16_t ctl, int slave, int xfer)
{
	uint16_t id[256];
	uint8_t s;
	int r;

	memset(d, 0, sizeof(*d));
	d->io = io;
	d->ctl = ctl;
	d->slave = slave;
	d->xfer = xfer;
	d->timeout_us = 5000000;

	/* 0xff from a floating bus: no controller at all. */
	s = rd(d, ATA_REG_STATUS);
	if (s == 0xff) {
		printf("ata: no controller at 0x%x (status 0xff)\n", io);
		return -1;
	}
	outb(ctl, ATA_CTL_NIEN);   /* no interrupts, no reset */
	select_drive(d, 0);
	/* A drive latches its taskfile registers; an empty channel or some
	 * other device in the port range doesn't read them back. */
	wr(d, ATA_REG_COUNT, 0x55);
	wr(d, ATA_REG_LBA0, 0xaa);
	if (rd(d, ATA_REG_COUNT) != 0x55 || rd(d, ATA_REG_LBA0) != 0xaa) {
		printf("ata: no drive %d at 0x%x (taskfile registers do not "
		       "latch)\n", slave, io);
		return -1;
	}
	wr(d, ATA_REG_COUNT, 0);
	wr(d, ATA_REG_LBA0, 0);
	wr(d, ATA_REG_LBA1, 0);
	wr(d, ATA_REG_LBA2, 0);
	wr(d, ATA_REG_COMMAND, ATA_CMD_IDENTIFY);
	delay400(d);
	s = rd(d, ATA_REG_STATUS);
	if (s == 0 || s == 0xff) {
		printf("ata: no drive %d at 0x%x (status 0x%x)\n", slave, io, s);
		return -1;
	}
	r = wait_ready(d, 0);
	if (r == ATA_ETIMEOUT) {
		printf("ata: IDENTIFY timed out (status 0x%x)\n", d->last_status);
		return -1;
	}
	/* An ATAPI or SATA signature in LBA1/LBA2 means "not an ATA disk". */
	if (rd(d, ATA_REG_LBA1) || rd(d, ATA_REG_LBA2)) {
		printf("ata: drive %d at 0x%x is not ATA (signature %02x %02x)\n",
		       slave, io, rd(d, ATA_REG_LBA1), rd(d, ATA_REG_LBA2));
		return -1;
	}
	if (r != ATA_OK || !(d->last_status & ATA_SR_DRQ)) {
		r = wait_ready(d, 1);
		if (r) {
			printf("ata: IDENTIFY failed (status 0x%x error 0x%x)\n",
			       d->last_status, d->last_error);
			return -1;
		}
	}
	read_sector_data(d, id);
	(void)wait_ready(d, 0);

	if (id[0] & 0x8000) {
		printf("ata: IDENTIFY word 0 = 0x%x: not an ATA device\n", id[0]);
		return -1;
	}
	if (!(id[49] & (1u << 9))) {
		printf("ata: drive does not support LBA\n");
		return -1;
	}
	d->sectors = (uint64_t)id[60] | ((uint64_t)id[61] << 16);
	if (id[83] & (1u << 10))
		d->sectors48 = (uint64_t)id[100] | ((uint64_t)id[101] << 16) |
			       ((uint64_t)id[102] << 32) | ((uint64_t)id[103] << 48);
	if (d->sectors > ATA_LBA28_MAX)
		d->sectors = ATA_LBA28_MAX;
	ident_string(d->model, &id[27], 20);
	return ATA_OK;
}
