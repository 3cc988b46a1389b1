/*
 * exitloop: n back-to-back exits, the instrument for measuring exit cost.
 * Options: n=N (1000)  port=P (0x80)  size=1|2|4 (1)  mode=out|in (out)
 *          mmio=ADDR (4-byte movl writes to ADDR instead of port I/O)
 *          tsc=1 (also print elapsed TSC cycles)  cpl=3 (runtime option)
 *          cpus=N (every vCPU runs the loop at the same time, CPU k on
 *          port+k or mmio+4k; each prints its own line, tagged "cpu k")
 */
#include "guest.h"

static void loop_out(uint16_t port, unsigned int size, uint64_t n)
{
	uint64_t i;

	switch (size) {
	case 1:
		for (i = 0; i < n; i++)
			outb(port, (uint8_t)i);
		break;
	case 2:
		for (i = 0; i < n; i++)
			outw(port, (uint16_t)i);
		break;
	default:
		for (i = 0; i < n; i++)
			outl(port, (uint32_t)i);
		break;
	}
}

static void loop_in(uint16_t port, unsigned int size, uint64_t n)
{
	uint64_t i;

	switch (size) {
	case 1:
		for (i = 0; i < n; i++)
			(void)inb(port);
		break;
	case 2:
		for (i = 0; i < n; i++)
			(void)inw(port);
		break;
	default:
		for (i = 0; i < n; i++)
			(void)inl(port);
		break;
	}
}

static void loop_mmio(uintptr_t addr, uint64_t n)
{
	for (uint64_t i = 0; i < n; i++)
		mmio_write32(addr, (uint32_t)i);
}

static uint64_t opt_n, opt_port, opt_size, opt_mmio, opt_tsc, opt_cpus;
static char opt_mode[8] = "out";
static uint32_t finished;
static spinlock_t print_lock;

/* The loop of one CPU; returns elapsed TSC cycles. */
static uint64_t run_loop(unsigned int cpu)
{
	uint64_t t0 = rdtsc();

	if (opt_mmio)
		loop_mmio((uintptr_t)(opt_mmio + 4 * cpu), opt_n);
	else if (opt_mode[0] == 'i')
		loop_in((uint16_t)(opt_port + cpu), (unsigned int)opt_size, opt_n);
	else
		loop_out((uint16_t)(opt_port + cpu), (unsigned int)opt_size, opt_n);
	return rdtsc() - t0;
}

static void report(unsigned int cpu, uint64_t cycles)
{
	spin_lock(&print_lock);
	if (opt_tsc)
		printf("exitloop: cpu %u cycles %lu (%lu per exit)\n", cpu, cycles,
		       opt_n ? cycles / opt_n : 0);
	spin_unlock(&print_lock);
}

static volatile uint32_t go;

static void ap_loop(void)
{
	unsigned int cpu = cpu_apic_id();

	while (!__atomic_load_n(&go, __ATOMIC_ACQUIRE))
		cpu_relax();
	report(cpu, run_loop(cpu));
	__atomic_add_fetch(&finished, 1, __ATOMIC_SEQ_CST);
}

static int main_smp(void)
{
	smp_start_aps(ap_loop, -1);
	/* Give every AP time to arrive before all start together. */
	delay_us(20000);
	__atomic_store_n(&go, 1, __ATOMIC_RELEASE);
	report(0, run_loop(0));
	__atomic_add_fetch(&finished, 1, __ATOMIC_SEQ_CST);
	while (__atomic_load_n(&finished, __ATOMIC_ACQUIRE) < opt_cpus)
		cpu_relax();
	printf("exitloop: done %lu on %lu cpus\n", opt_n, opt_cpus);
	return 0;
}

int main(void)
{
	uint64_t n = opt_u64("n", 1000);
	uint64_t port = opt_u64("port", 0x80);
	uint64_t size = opt_u64("size", 1);
	uint64_t mmio = opt_u64("mmio", 0);
	char mode[8] = "out";
	uint64_t t0, t1;

	opt_str("mode", mode, sizeof(mode));
	opt_cpus = opt_u64("cpus", 1);
	if (opt_cpus > 1 && opt_cpus <= MAX_CPUS) {
		opt_n = n;
		opt_port = port;
		opt_size = size;
		opt_mmio = opt_present("mmio") ? mmio : 0;
		opt_tsc = opt_u64("tsc", 0);
		memcpy(opt_mode, mode, sizeof(opt_mode));
		if ((size != 1 && size != 2 && size != 4) ||
		    (strcmp(mode, "out") != 0 && strcmp(mode, "in") != 0)) {
			printf("exitloop: bad size or mode\n");
			return 2;
		}
		return main_smp();
	}
	if (size != 1 && size != 2 && size != 4) {
		printf("exitloop: bad size=%lu\n", size);
		return 2;
	}
	if (strcmp(mode, "out") != 0 && strcmp(mode, "in") != 0) {
		printf("exitloop: bad mode=%s\n", mode);
		return 2;
	}

	t0 = rdtsc();
	if (opt_present("mmio"))
		loop_mmio((uintptr_t)mmio, n);
	else if (mode[0] == 'i')
		loop_in((uint16_t)port, (unsigned int)size, n);
	else
		loop_out((uint16_t)port, (unsigned int)size, n);
	t1 = rdtsc();

	if (opt_u64("tsc", 0))
		printf("exitloop: cycles %lu (%lu per exit)\n", t1 - t0,
		       n ? (t1 - t0) / n : 0);
	printf("exitloop: done %lu\n", n);
	return 0;
}
