/*
 * Bump allocator for large buffers (DMA buffers, virtqueues).
 *
 * Memory comes from the RAM region (per the PVH memmap) that holds the
 * end of the guest image, starting at the first 4 KiB boundary after the
 * image, and is never freed.  It is NOT zeroed: .bss is cleared by ring-0
 * code at start-up, which is slow on hosts that emulate CPL 0, so big
 * arrays are kept out of it.  Everything is identity mapped below 4 GiB,
 * so a returned pointer is also its guest-physical address.
 */
#ifndef GUEST_MEM_H
#define GUEST_MEM_H

#include <stddef.h>
#include <stdint.h>

/* size bytes aligned to align (a power of two, at least 16); NULL when
 * the region is exhausted or there is no usable memmap. */
void *mem_alloc(size_t size, size_t align);

/* Same, then zeroed. */
void *mem_zalloc(size_t size, size_t align);

/* Bytes still available (ignoring alignment). */

#endif
