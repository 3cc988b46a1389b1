/*
 * Finding virtio-mmio transports: the ones announced on the kernel command
 * line (virtio_mmio.device=SIZE@BASE:IRQ, as QEMU microvm and aiokvm add
 * them, in order), then the 8 standard microvm slots that were not
 * announced, from slot 0 up.  Shared by the virtio-blk and virtio-net
 * drivers.  See lib/vmmio.c.
 */
#ifndef GUEST_VMMIO_H
#define GUEST_VMMIO_H

#include <stdint.h>

struct vmmio_transport {
	uintptr_t base;
	int irq;
	int slot;        /* standard slot number, or -1 */
	int announced;   /* from the command line */
};

/* The index-th (0 = first) modern (Version 2) device with DeviceID `id`.
 * `who` prefixes the messages ("virtio-blk"); `min_size` is how much of the
 * window the driver reads (registers plus its config fields).  Returns 0
 * and fills *t, or -1; *nannounced = transports announced on the command line. */
int vmmio_find(uint32_t id, int index, const char *who, uint32_t min_size,
	       struct vmmio_transport *t, int *nannounced);

/* "slot N at 0x..." or "transport at 0x...". */
void vmmio_print_where(const struct vmmio_transport *t);

#endif
