/*
 * exitloop: n back-to-back exits, the instrument for measuring exit cost.
 * Options: n=N (1000)  port=P (0x80)  size=1|2|4 (1)  mode=out|in (out)
 *          mmio=ADDR (4-byte movl writes to ADDR instead of port I/O)
 *          tsc=1 (also print elapsed TSC cycles)  cpl=3 (runtime option)
 *          cpus=N (every vCPU runs the loop at the same time, CPU k on
 *          port+k or mmio+4k; each prints its own line, tagged "cpu k")
 *          batch=B (one vCPU: also time each run of B exits and print the
 *          median and the fastest batch per exit; sporadic host noise such
 *          as preemption lands in a few batches and leaves the median)
 *          work=W (W dependent multiply-adds before each exit: a compute-
 *          bound guest, for the emulation/KVM crossover; out only)
 *          alt=P (with batch: after each batch, altn=K (default B) exits on
 *          port P, or at MMIO address P with mmio=; prints the median of
 *          the per-pair ratios of cost per exit, batch / alt)
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

static uint64_t opt_work;
static uint64_t work_sink;

/* work=W: W dependent multiply-adds before each exit (a compute-bound guest). */
static void loop_work_out(uint16_t port, uint64_t n, uint64_t w)
{
	uint64_t x = work_sink | 1;

	for (uint64_t i = 0; i < n; i++) {
		for (uint64_t k = 0; k < w; k++)
			x = x * 6364136223846793005ull + 1442695040888963407ull;
		__asm__ volatile("" : "+r"(x));
		outb(port, (uint8_t)x);
	}
	work_sink = x;
}

/* n exits of the configured kind on port (or at mmio). */
static void run_exits(const char *mode, uint64_t port, uint64_t size, uint64_t mmio, uint64_t n)
{
	if (opt_work)
		loop_work_out((uint16_t)port, n, opt_work);
	else if (mmio)
		loop_mmio((uintptr_t)mmio, n);
	else if (mode[0] == 'i')
		loop_in((uint16_t)port, (unsigned int)size, n);
	else
		loop_out((uint16_t)port, (unsigned int)size, n);
}

/* The loop of one CPU; returns elapsed TSC cycles. */
static uint64_t run_loop(unsigned int cpu)
{
	uint64_t t0 = rdtsc();

	run_exits(opt_mode, opt_port + cpu, opt_size, opt_mmio ? opt_mmio + 4 * cpu : 0, opt_n);
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

#define MAX_BATCHES 256

static uint64_t batch_cycles[MAX_BATCHES], alt_cycles[MAX_BATCHES], pair_ratio[MAX_BATCHES];

/* Insertion sort: at most MAX_BATCHES values, and this code may run
 * emulated (CPL 0 under PVM), so keep it small. */
static uint64_t median_of(uint64_t *v, uint64_t n)
{
	for (uint64_t i = 1; i < n; i++) {
		uint64_t x = v[i], j = i;

		for (; j > 0 && v[j - 1] > x; j--)
			v[j] = v[j - 1];
		v[j] = x;
	}
	return n & 1 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

/* Run n exits in batches of b, timing each; prints the median and minimum
 * batch per exit.  With alt (a second port, or MMIO address), every batch
 * is followed by one of b exits there, and the median of the per-pair
 * ratios is printed too: both sides of a pair run microseconds apart, so
 * host speed drifts cancel.  Returns the cycles of the n exits on port. */
static uint64_t run_batches(const char *mode, uint64_t port, uint64_t size, uint64_t mmio, uint64_t n,
			    uint64_t b, uint64_t alt, uint64_t altn)
{
	uint64_t nb = n / b, total = 0, t0, t1, tsc_cost = ~0ull;

	/* Reading the TSC may itself trap (it is emulated at CPL 0 under PVM and
	 * costs about half an exit): measure it and take it out of every batch,
	 * so that short batches are not overcharged. */
	for (int i = 0; i < 16; i++) {
		t0 = rdtsc();
		t1 = rdtsc();
		tsc_cost = t1 - t0 < tsc_cost ? t1 - t0 : tsc_cost;
	}
	for (uint64_t k = 0; k < nb; k++) {
		t0 = rdtsc();
		run_exits(mode, port, size, mmio, b);
		t1 = rdtsc() - t0;
		batch_cycles[k] = t1 > tsc_cost ? t1 - tsc_cost : 0;
		total += t1;
		if (alt) {
			t0 = rdtsc();
			run_exits(mode, mmio ? 0 : alt, size, mmio ? alt : 0, altn);
			t1 = rdtsc() - t0;
			/* scaled to b exits */
			alt_cycles[k] = (t1 > tsc_cost ? t1 - tsc_cost : 0) * b / altn;
			pair_ratio[k] = batch_cycles[k] * 1000 / (alt_cycles[k] ? alt_cycles[k] : 1);
		}
	}
	t0 = rdtsc();
	run_exits(mode, port, size, mmio, n % b);
	total += rdtsc() - t0;
	if (!nb)
		return total;
	{
		uint64_t min = ~0ull, median;

		for (uint64_t k = 0; k < nb; k++)
			min = batch_cycles[k] < min ? batch_cycles[k] : min;
		median = median_of(batch_cycles, nb);
		printf("exitloop: batches %lu of %lu, median %lu per exit, min %lu per exit\n", nb, b,
		       median / b, min / b);
	}
	if (alt)
		printf("exitloop: alt 0x%lx median %lu per exit, pair ratio median %lu permille\n", alt,
		       median_of(alt_cycles, nb) / b, median_of(pair_ratio, nb));
	return total;
}

int main(void)
{
	uint64_t n = opt_u64("n", 1000);
	uint64_t port = opt_u64("port", 0x80);
	uint64_t size = opt_u64("size", 1);
	uint64_t mmio = opt_u64("mmio", 0);
	char mode[8] = "out";
	uint64_t t0, t1, batch;

	opt_str("mode", mode, sizeof(mode));
	opt_work = opt_u64("work", 0);
	if (size != 1 && size != 2 && size != 4) {
		printf("exitloop: bad size=%lu\n", size);
		return 2;
	}
	if (strcmp(mode, "out") != 0 && strcmp(mode, "in") != 0) {
		printf("exitloop: bad mode=%s\n", mode);
		return 2;
	}
	opt_cpus = opt_u64("cpus", 1);
	if (opt_cpus > 1 && opt_cpus <= MAX_CPUS) {
		opt_n = n;
		opt_port = port;
		opt_size = size;
		opt_mmio = mmio; /* 0 when absent: no MMIO */
		opt_tsc = opt_u64("tsc", 0);
		memcpy(opt_mode, mode, sizeof(opt_mode));
		return main_smp();
	}

	batch = opt_u64("batch", 0);
	if (batch && n / batch > MAX_BATCHES) {
		printf("exitloop: batch=%lu gives over %u batches; use batch >= %lu\n", batch, MAX_BATCHES,
		       (n + MAX_BATCHES - 1) / MAX_BATCHES);
		return 2;
	}
	t0 = rdtsc();
	if (batch) {
		uint64_t altn = opt_u64("altn", batch);

		t1 = t0 + run_batches(mode, port, size, mmio, n, batch, opt_u64("alt", 0), altn ? altn : batch);
	} else {
		run_exits(mode, port, size, mmio, n);
		t1 = rdtsc();
	}

	if (opt_u64("tsc", 0))
		printf("exitloop: cycles %lu (%lu per exit)\n", t1 - t0,
		       n ? (t1 - t0) / n : 0);
	printf("exitloop: done %lu\n", n);
	return 0;
}
