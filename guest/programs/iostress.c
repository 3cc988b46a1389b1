/*
 * iostress: every vCPU hammers its own device register and checks each answer.
 *
 * Protocol (the host-side device in the tests): the register of CPU k is at
 * port base+4k (or, with mmio=ADDR, at ADDR+8k).  A write of v stores v; a
 * read returns the bitwise NOT of the last value written, masked to the
 * access size.  Each CPU writes the values of its own LCG, so the host can
 * check that every exit arrived exactly once and in order.
 *
 * Options: cpus=N (1)  n=N (1000)  base=P (0x510)  size=1|2|4 (4)
 *          seed=S (1)  mmio=ADDR  cpl=3
 * Prints "iostress: cpu K done" per CPU and "iostress: N cpus, E errors";
 * exits 0 only if every read matched.
 */
#include "guest.h"

static uint64_t n_iter, size, base, mmio, seed, ncpus;
static uint32_t done = 0, errors = 0;
static spinlock_t print_lock;

static uint32_t lcg_start(unsigned int cpu)
{
	return (uint32_t)seed ^ (cpu * 0x9e3779b9u);
}

static void hammer(void)
{
	unsigned int cpu = cpu_apic_id();
	uint32_t mask = size == 4 ? 0xffffffffu : (1u << (8 * size)) - 1;
	uint32_t x = lcg_start(cpu), y, bad = 0;

	for (uint64_t i = 0; i < n_iter; i++) {
		x = x * 1664525u + 1013904223u;
		if (mmio) {
			volatile uint32_t *reg = (volatile uint32_t *)(uintptr_t)(mmio + 8 * cpu);
			*reg = x;
			y = *reg;
		} else {
			uint16_t port = (uint16_t)(base + 4 * cpu);
			if (size == 1) {
				outb(port, (uint8_t)x);
				y = inb(port);
			} else if (size == 2) {
				outw(port, (uint16_t)x);
				y = inw(port);
			} else {
				outl(port, x);
				y = inl(port);
			}
		}
		if (y != (~x & mask))
			bad++;
	}
	spin_lock(&print_lock);
	printf("iostress: cpu %u done\n", cpu);
	spin_unlock(&print_lock);
	__atomic_add_fetch(&errors, bad, __ATOMIC_SEQ_CST);
	__atomic_add_fetch(&done, 1, __ATOMIC_SEQ_CST);
}

int main(void)
{
	ncpus = opt_u64("cpus", 1);
	n_iter = opt_u64("n", 1000);
	base = opt_u64("base", 0x510);
	size = opt_u64("size", 4);
	seed = opt_u64("seed", 1);
	mmio = opt_u64("mmio", 0);
	if (size != 1 && size != 2 && size != 4)
		size = 4;
	if (mmio)
		size = 4;
	if (ncpus < 1 || ncpus > MAX_CPUS)
		ncpus = 1;
	if (ncpus > 1)
		smp_start_aps(hammer, -1);
	hammer();
	while (__atomic_load_n(&done, __ATOMIC_ACQUIRE) < ncpus)
		cpu_relax();
	printf("iostress: %lu cpus, %u errors\n", ncpus, errors);
	return errors ? 1 : 0;
}
