/*
 * memcoh: read a 32-bit word the host keeps incrementing, and count the
 * times it goes backwards.  The host must store guest-visible words in one
 * piece (a store that zero-fills first is seen here as a drop to 0).
 * Options: addr=A (0x300000)  n=N reads (100000000); the host writes
 * 0xffffffff to end early.  Prints "memcoh: decreases D max M first P->V".
 */
#include "guest.h"

int main(void)
{
	uint64_t addr = opt_u64("addr", 0x300000), n = opt_u64("n", 100000000);
	volatile uint32_t *p = (volatile uint32_t *)(uintptr_t)addr;
	uint32_t last = 0, dec = 0, maxv = 0, bad_prev = 0, bad = 0;

	for (uint64_t i = 0; i < n; i++) {
		uint32_t v = *p;

		if (v < last) {
			if (!dec) {
				bad_prev = last;
				bad = v;
			}
			dec++;
		}
		last = v;
		if (v > maxv)
			maxv = v;
		if (v == 0xffffffff)
			break;
	}
	printf("memcoh: decreases %u max %u first %u->%u\n", dec, maxv, bad_prev, bad);
	return 0;
}
