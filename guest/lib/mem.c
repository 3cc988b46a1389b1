/* Bump allocator over the RAM that follows the guest image (see mem.h). */
#include "guest.h"
#include "mem.h"

extern char __image_end[];

static uint64_t arena_next, arena_limit;
static int arena_ready;

/* If [a, a+len) starts inside [next, limit), move next past it. */
static void skip_range(uint64_t a, uint64_t len)
{
	if (len && a + len > arena_next && a < arena_limit)
		arena_next = (a + len + 4095) & ~4095ull;
}

static void arena_init(void)
{
	const struct hvm_start_info *si = boot_info;
	uint64_t start = ((uint64_t)(uintptr_t)__image_end + 4095) & ~4095ull;

	arena_ready = 1;
	if (!si || si->version < 1 || !si->memmap_paddr)
		return;

	const struct hvm_memmap_table_entry *e =
		(const void *)(uintptr_t)si->memmap_paddr;

	for (uint32_t i = 0; i < si->memmap_entries; i++) {
		if (e[i].type != HVM_MEMMAP_TYPE_RAM)
			continue;
		if (start >= e[i].addr && start < e[i].addr + e[i].size) {
			arena_next = start;
			arena_limit = e[i].addr + e[i].size;
		}
	}
	/* Only the low 4 GiB are mapped. */
	if (arena_limit > 0x100000000ull)
		arena_limit = 0x100000000ull;

	/* Stay clear of the boot information, wherever the loader put it. */
	skip_range((uint64_t)(uintptr_t)si, sizeof(*si));
	skip_range(si->memmap_paddr,
		   (uint64_t)si->memmap_entries * sizeof(*e));
	if (si->cmdline_paddr)
		skip_range(si->cmdline_paddr,
			   strlen((const char *)(uintptr_t)si->cmdline_paddr) + 1);
	if (arena_next > arena_limit)
		arena_next = arena_limit;
}

void *mem_alloc(size_t size, size_t align)
{
	uint64_t p;

	if (!arena_ready)
		arena_init();
	if (align < 16)
		align = 16;
	p = (arena_next + align - 1) & ~(uint64_t)(align - 1);
	if (!arena_limit || p > arena_limit || size > arena_limit - p)
		return NULL;
	arena_next = p + size;
	return (void *)(uintptr_t)p;
}

void *mem_zalloc(size_t size, size_t align)
{
	void *p = mem_alloc(size, align);

	if (p)
		memset(p, 0, size);
	return p;
}
