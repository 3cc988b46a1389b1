/*
 * ATA PIO driver (polled, LBA28) for a legacy IDE channel.  See lib/ata.c.
 */
#ifndef GUEST_ATA_H
#define GUEST_ATA_H

#include <stdint.h>

#define ATA_PRIMARY_IO    0x1f0
#define ATA_PRIMARY_CTL   0x3f6

/* Command block registers (offsets from the I/O base). */
#define ATA_REG_DATA      0   /* 16-bit */
#define ATA_REG_ERROR     1   /* read */
#define ATA_REG_FEATURES  1   /* write */
#define ATA_REG_COUNT     2
#define ATA_REG_LBA0      3   /* LBA 7:0   */
#define ATA_REG_LBA1      4   /* LBA 15:8  */
#define ATA_REG_LBA2      5   /* LBA 23:16 */
#define ATA_REG_DEVICE    6   /* 1 LBA 1 DEV LBA27:24 */
#define ATA_REG_STATUS    7   /* read */
#define ATA_REG_COMMAND   7   /* write */

/* Control block register: alternate status (read) / device control (write). */
#define ATA_CTL_NIEN      0x02
#define ATA_CTL_SRST      0x04

#define ATA_SR_ERR        0x01
#define ATA_SR_DRQ        0x08
#define ATA_SR_DF         0x20
#define ATA_SR_DRDY       0x40
#define ATA_SR_BSY        0x80

#define ATA_CMD_READ_SECTORS   0x20
#define ATA_CMD_WRITE_SECTORS  0x30
#define ATA_CMD_FLUSH_CACHE    0xe7
#define ATA_CMD_IDENTIFY       0xec

#define ATA_LBA28_MAX     0x0fffffffull   /* addressable sectors */

/* Data transfer modes. */
#define ATA_XFER_WORD     0   /* one inw/outw per 16-bit word */
#define ATA_XFER_REP      1   /* rep insw/outsw, 256 words per sector */

/* Results. */
#define ATA_OK            0
#define ATA_EDEV          1   /* the device set ERR or DF */
#define ATA_ETIMEOUT      2   /* BSY/DRQ never settled */
#define ATA_EPROTO        3   /* DRQ missing when data was expected */

struct ata_dev {
	uint16_t io, ctl;
	int slave;
	int xfer;             /* ATA_XFER_* */
	uint64_t sectors;     /* LBA28 user-addressable sectors (words 60-61) */
	uint64_t sectors48;   /* words 100-103 if LBA48 is supported, else 0 */
	char model[41];
	uint8_t last_status, last_error;
	uint64_t timeout_us;
};

/* Selects the drive, disables its interrupt (nIEN) and runs IDENTIFY
 * DEVICE.  Returns ATA_OK, or -1 if no ATA disk answers. */
int ata_probe(struct ata_dev *d, uint16_t io, uint16_t ctl, int slave, int xfer);

/* count sectors (1..256) starting at lba; buf holds count*512 bytes.
 * Return ATA_OK or ATA_E*; last_status/last_error keep the registers. */
int ata_read(struct ata_dev *d, uint64_t lba, uint32_t count, void *buf);
int ata_write(struct ata_dev *d, uint64_t lba, uint32_t count, const void *buf);
int ata_flush(struct ata_dev *d);

#endif
