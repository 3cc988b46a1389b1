/* PVH boot protocol start-of-day structure (x86/HVM direct boot ABI). */
#ifndef GUEST_HVM_START_INFO_H
#define GUEST_HVM_START_INFO_H

#include <stdint.h>

#define HVM_START_MAGIC     0x336ec578u
#define HVM_MEMMAP_TYPE_RAM 1

struct hvm_start_info {
	uint32_t magic;
	uint32_t version;
	uint32_t flags;
	uint32_t nr_modules;
	uint64_t modlist_paddr;
	uint64_t cmdline_paddr;
	uint64_t rsdp_paddr;
	uint64_t memmap_paddr;    /* version >= 1 */
	uint32_t memmap_entries;  /* version >= 1 */
	uint32_t reserved;
};

struct hvm_memmap_table_entry {
	uint64_t addr;
	uint64_t size;
	uint32_t type;
	uint32_t reserved;
};

#endif
