/*
 * smp: bring up cpus=N vCPUs with INIT-SIPI-SIPI and wait for them.
 * Options: cpus=N (default 1), timeout_ms=T (default 10000),
 *          ipi=each (target APIC IDs 1..N-1 instead of broadcasting).
 */
#include "guest.h"

static uint32_t online = 1;   /* the BSP */

static void ap_main(void)
{
	printf("cpu %u online\n", cpu_apic_id());
	__atomic_add_fetch(&online, 1, __ATOMIC_SEQ_CST);
}

int main(void)
{
	uint64_t ncpus = opt_u64("cpus", 1);
	uint64_t timeout_ms = opt_u64("timeout_ms", 10000);
	char ipi[16] = "";

	if (ncpus < 1)
		ncpus = 1;
	if (ncpus > MAX_CPUS) {
		printf("smp: cpus=%lu clamped to %d\n", ncpus, MAX_CPUS);
		ncpus = MAX_CPUS;
	}
	opt_str("ipi", ipi, sizeof(ipi));

	printf("cpu %u online\n", cpu_apic_id());
	if (ncpus > 1) {
		if (strcmp(ipi, "each") == 0)
			for (int id = 1; id < (int)ncpus; id++)
				smp_start_aps(ap_main, id);
		else
			smp_start_aps(ap_main, -1);
	}

	uint64_t deadline = rdtsc() + timeout_ms * (tsc_hz() / 1000);
	uint32_t n;

	while ((n = __atomic_load_n(&online, __ATOMIC_ACQUIRE)) < ncpus &&
	       rdtsc() < deadline)
		cpu_relax();

	if (n >= ncpus) {
		printf("all %lu cpus online\n", ncpus);
		return 0;
	}
	printf("smp: timeout, %u of %lu online\n", n, ncpus);
	return 1;
}
