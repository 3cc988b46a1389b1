/* TSC timing, xAPIC access and AP start-up (INIT-SIPI-SIPI). */
#include "guest.h"

extern const char ap_trampoline_start[], ap_trampoline_end[];
__attribute__((noreturn)) void halt_forever(void);
void idt_load(void);
void ap_start_c(void);

#define LAPIC_ID   0x020
#define LAPIC_SVR  0x0f0
#define LAPIC_ICRL 0x300
#define LAPIC_ICRH 0x310

#define ICR_INIT        0x00000500u
#define ICR_STARTUP     0x00000600u
#define ICR_BUSY        0x00001000u
#define ICR_ASSERT      0x00004000u
#define ICR_ALL_BUT_ME  0x000c0000u

/* ---- TSC ---- */
static const char *hz_source = "assumed";

uint64_t tsc_hz(void)
{
	static uint64_t hz;
	uint32_t a, b, c, d, max;

	if (hz)
		return hz;
	cpuid(0, 0, &max, &b, &c, &d);
	if (max >= 0x15) {
		cpuid(0x15, 0, &a, &b, &c, &d);
		if (a && b && c) {
			hz = (uint64_t)c * b / a;
			hz_source = "cpuid15";
		}
	}
	if (!hz && max >= 0x16) {
		cpuid(0x16, 0, &a, &b, &c, &d);
		if (a & 0xffff) {
			hz = (uint64_t)(a & 0xffff) * 1000000;
			hz_source = "cpuid16";
		}
	}
	if (!hz) {
		cpuid(1, 0, &a, &b, &c, &d);
		if (c & (1u << 31)) {   /* hypervisor present */
			cpuid(0x40000000, 0, &max, &b, &c, &d);
			if (max >= 0x40000010) {
				cpuid(0x40000010, 0, &a, &b, &c, &d);
				hz = (uint64_t)a * 1000;   /* kHz */
				if (hz)
					hz_source = "cpuid40000010";
			}
		}
	}
	if (!hz)
		hz = 3000000000ull;   /* unknown: assume 3 GHz */
	return hz;
}

const char *tsc_hz_source(void)
{
	(void)tsc_hz();
	return hz_source;
}

void delay_us(uint64_t us)
{
	uint64_t end = rdtsc() + us * (tsc_hz() / 1000000);

	while (rdtsc() < end)
		cpu_relax();
}

/* ---- local APIC (xAPIC MMIO) ---- */
uint32_t lapic_read(uint32_t reg)
{
	return mmio_read32(LAPIC_BASE + reg);
}

void lapic_write(uint32_t reg, uint32_t v)
{
	mmio_write32(LAPIC_BASE + reg, v);
}

/* The LAPIC ID register rather than CPUID.1:EBX[31:24]: some nested
 * hypervisors do not trap CPUID at CPL 3 and would report host values. */
unsigned int cpu_apic_id(void)
{
	return lapic_read(LAPIC_ID) >> 24;
}

static void send_ipi(uint32_t hi, uint32_t lo)
{
	lapic_write(LAPIC_ICRH, hi);
	lapic_write(LAPIC_ICRL, lo);
	for (unsigned int i = 0; i < 100000; i++) {
		if (!(lapic_read(LAPIC_ICRL) & ICR_BUSY))
			break;
		cpu_relax();
	}
}

/* ---- AP start-up ---- */
static void (*volatile ap_fn)(void);

/* Reached from start.S on the AP's own stack, CPL 0, long mode. */
void ap_start_c(void)
{
	void (*fn)(void);

	idt_load();
	fn = ap_fn;
	if (fn)
		fn();
	halt_forever();
}

void smp_start_aps(void (*fn)(void), int dest)
{
	uint32_t hi = 0, shorthand = ICR_ALL_BUT_ME;
	uint32_t vector = TRAMPOLINE_PHYS >> 12;

	ap_fn = fn;
	memcpy((void *)(uintptr_t)TRAMPOLINE_PHYS, ap_trampoline_start,
	       (size_t)(ap_trampoline_end - ap_trampoline_start));
	__atomic_thread_fence(__ATOMIC_SEQ_CST);

	/* Software-enable the local APIC, spurious vector 0xff. */
	lapic_write(LAPIC_SVR, lapic_read(LAPIC_SVR) | 0x1ff);

	if (dest >= 0) {
		hi = (uint32_t)dest << 24;
		shorthand = 0;
	}
	send_ipi(hi, shorthand | ICR_ASSERT | ICR_INIT);
	delay_us(10000);
	send_ipi(hi, shorthand | ICR_ASSERT | ICR_STARTUP | vector);
	delay_us(200);
	send_ipi(hi, shorthand | ICR_ASSERT | ICR_STARTUP | vector);
}
