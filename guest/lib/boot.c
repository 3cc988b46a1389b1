/*
 * C side of start-up: serial, IDT, TSS, boot info, CPL selection, exit,
 * and the exception reporter.
 */
#include "guest.h"

/* ---- symbols from arch/start.S ---- */
extern uint64_t gdt[];
extern const uint64_t exc_stub_table[32];
extern char rsp0_stack_top[], user_stack_top[];
__attribute__((noreturn)) void enter_user(void (*entry)(void), uint64_t rsp,
					  uint64_t rflags);
__attribute__((noreturn)) void halt_forever(void);

void crt_start(struct hvm_start_info *si);
void exception_entry(const uint64_t *frame);
void idt_load(void);

/* Weak reference: resolves to address 0 unless a program defines it. */
extern const int guest_ring0_only __attribute__((weak));

/* ---- exit ---- */
void guest_exit(uint32_t code)
{
	outl(DEBUG_EXIT_PORT, code);
	/* No debug-exit device: stop here. */
	if (current_cpl() == 0)
		halt_forever();
	for (;;)
		cpu_relax();   /* hlt would #GP at CPL 3 */
}

/* ---- IDT ---- */
struct idt_gate {
	uint16_t off_lo;
	uint16_t sel;
	uint8_t ist;
	uint8_t type_attr;
	uint16_t off_mid;
	uint32_t off_hi;
	uint32_t zero;
} __attribute__((packed));

struct desc_ptr {
	uint16_t limit;
	uint64_t base;
} __attribute__((packed));

static struct idt_gate idt[256] __attribute__((aligned(16)));
static struct desc_ptr idt_ptr;

static void idt_init(void)
{
	for (unsigned int v = 0; v < 32; v++) {
		uint64_t h = exc_stub_table[v];

		idt[v].off_lo = (uint16_t)h;
		idt[v].sel = KERNEL_CS;
		/* present interrupt gate; int3 callable from ring 3 */
		idt[v].type_attr = v == 3 ? 0xee : 0x8e;
		idt[v].off_mid = (uint16_t)(h >> 16);
		idt[v].off_hi = (uint32_t)(h >> 32);
	}
	idt_ptr.limit = sizeof(idt) - 1;
	idt_ptr.base = (uint64_t)idt;
}

void idt_load(void)
{
	__asm__ volatile("lidt %0" : : "m"(idt_ptr));
}

/* Installs a present ring-0 interrupt gate (IF cleared on entry) for an
 * external-interrupt vector.  Vectors 0-31 stay with the exception stubs. */
void idt_set_handler(unsigned int vec, void (*handler)(void))
{
	uint64_t h = (uint64_t)handler;

	if (vec < 32 || vec > 255)
		return;
	idt[vec].off_lo = (uint16_t)h;
	idt[vec].sel = KERNEL_CS;
	idt[vec].ist = 0;
	idt[vec].off_mid = (uint16_t)(h >> 16);
	idt[vec].off_hi = (uint32_t)(h >> 32);
	__asm__ volatile("" : : : "memory");   /* present bit last */
	idt[vec].type_attr = 0x8e;
}

/* ---- TSS: rsp0 for exceptions from ring 3, plus an all-zero I/O
 * permission bitmap.  Ring-3 port I/O is allowed by IOPL=3 *and* by the
 * bitmap; some hypervisors (e.g. PVM) do not preserve a guest's virtual
 * IOPL in user mode but do honour the bitmap when emulating in/out. ---- */
struct tss64 {
	uint32_t reserved0;
	uint64_t rsp[3];
	uint64_t reserved1;
	uint64_t ist[7];
	uint64_t reserved2;
	uint16_t reserved3;
	uint16_t iomap_base;
	uint8_t iomap[65536 / 8];
	uint8_t iomap_end;   /* must be 0xff */
} __attribute__((packed));

static struct tss64 tss __attribute__((aligned(16)));

static void tss_init(void)
{
	uint64_t base = (uint64_t)&tss;
	uint64_t limit = sizeof(tss) - 1;

	tss.rsp[0] = (uint64_t)rsp0_stack_top;
	tss.iomap_base = __builtin_offsetof(struct tss64, iomap);
	tss.iomap_end = 0xff;   /* iomap[] itself is zero (bss): all allowed */
	gdt[GDT_TSS_INDEX] = (limit & 0xffff) | ((base & 0xffffff) << 16) |
			     (0x89ull << 40) |               /* present, 64-bit TSS */
			     (((limit >> 16) & 0xf) << 48) |
			     (((base >> 24) & 0xff) << 56);
	gdt[GDT_TSS_INDEX + 1] = base >> 32;
	__asm__ volatile("ltr %w0" : : "r"((uint16_t)TSS_SEL));
}

/* ---- boot information ---- */
struct hvm_start_info *boot_info;
static char cmdline_buf[2048];
static uint64_t mem_bytes;

uint64_t boot_mem_bytes(void)
{
	return mem_bytes;
}

const char *boot_cmdline(void)
{
	return cmdline_buf;
}

static void boot_info_init(struct hvm_start_info *si)
{
	boot_info = si;
	if (!si || si->magic != HVM_START_MAGIC) {
		printf("warning: bad hvm_start_info at %p\n", (void *)si);
		boot_info = NULL;
		return;
	}
	/* Keep a private copy: low memory (e.g. the AP trampoline page)
	 * may be reused later. */
	if (si->cmdline_paddr) {
		const char *c = (const char *)(uintptr_t)si->cmdline_paddr;
		size_t n = 0;

		while (c[n] && n < sizeof(cmdline_buf) - 1) {
			cmdline_buf[n] = c[n];
			n++;
		}
		cmdline_buf[n] = '\0';
	}
	if (si->version >= 1 && si->memmap_paddr) {
		const struct hvm_memmap_table_entry *e =
			(const void *)(uintptr_t)si->memmap_paddr;

		for (uint32_t i = 0; i < si->memmap_entries; i++)
			if (e[i].type == HVM_MEMMAP_TYPE_RAM)
				mem_bytes += e[i].size;
	}
}

static void debug_dump(void)
{
	const struct hvm_start_info *si = boot_info;

	if (!si)
		return;
	printf("guest: start_info=%p version=%u flags=0x%x modules=%u rsdp=0x%lx\n",
	       (void *)si, si->version, si->flags, si->nr_modules,
	       si->rsdp_paddr);
	printf("guest: cmdline@0x%lx \"%s\"\n", si->cmdline_paddr, cmdline_buf);
	if (si->version >= 1 && si->memmap_paddr) {
		const struct hvm_memmap_table_entry *e =
			(const void *)(uintptr_t)si->memmap_paddr;

		for (uint32_t i = 0; i < si->memmap_entries; i++)
			printf("guest: memmap[%u] 0x%016lx-0x%016lx type %u\n",
			       i, e[i].addr, e[i].addr + e[i].size - 1,
			       e[i].type);
	}
}

static int debug;

static void run_main(void)
{
	if (debug)
		printf("guest: main() at cpl %u\n", current_cpl());
	guest_exit((uint32_t)main());
}

/* Called from start.S on the boot stack, at CPL 0, long mode. */
void crt_start(struct hvm_start_info *si)
{
	serial_init();
	idt_init();
	idt_load();
	tss_init();
	boot_info_init(si);

	debug = opt_present("debug");
	if (debug)
		debug_dump();

	uint64_t cpl = opt_u64("cpl", 0);

	if (cpl == 3 && !(&guest_ring0_only && guest_ring0_only))
		/* IOPL=3 (bits 12-13), IF=0, reserved bit 1. RSP is set as
		 * if run_main had been called (RSP+8 16-byte aligned). */
		enter_user(run_main, (uint64_t)user_stack_top - 8, 0x3002);
	if (cpl != 0 && cpl != 3)
		printf("warning: cpl=%lu not supported, using 0\n", cpl);
	run_main();
}

/* ---- exceptions ---- */
static const char *const exc_names[32] = {
	"#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM",
	"#DF", "CSO", "#TS", "#NP", "#SS", "#GP", "#PF", "?15",
	"#MF", "#AC", "#MC", "#XM", "#VE", "#CP", "?22", "?23",
	"?24", "?25", "?26", "?27", "#HV", "#VC", "#SX", "?31",
};

/* frame: vector, error code, RIP, CS, RFLAGS, RSP, SS */
void exception_entry(const uint64_t *f)
{
	static uint32_t active;

	if (__atomic_exchange_n(&active, 1, __ATOMIC_ACQ_REL))
		guest_exit(3);   /* fault while reporting, or second CPU */
	serial_init();   /* the report must get out even if the UART was left in loopback */
	printf_nolock("\nexception: vector %lu (%s) rip=0x%lx err=0x%lx "
		      "cs=0x%lx rflags=0x%lx rsp=0x%lx",
		      f[0], exc_names[f[0] & 31], f[2], f[1], f[3], f[4], f[5]);
	if (f[0] == 14) {
		uint64_t cr2;

		__asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
		printf_nolock(" cr2=0x%lx", cr2);
	}
	printf_nolock("\n");
	guest_exit(3);
}
