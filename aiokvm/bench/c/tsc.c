/* tsc.c: host TSC ticks per second (rdtsc against CLOCK_MONOTONIC_RAW over 250 ms).
 * Guests time themselves with the TSC; the benchmarks turn ticks into seconds with this. */
#include <stdint.h>
#include <stdio.h>
#include <time.h>
#include <x86intrin.h>

static double wall(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC_RAW, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

int main(void)
{
	double w0 = wall(), w1;
	uint64_t t0 = __rdtsc(), t1;

	do {
		w1 = wall();
	} while (w1 - w0 < 0.25);
	t1 = __rdtsc();
	printf("%.0f\n", (t1 - t0) / (w1 - w0));
	return 0;
}
