/*
 * exitloop: n back-to-back exits, the instrument for measuring exit cost.
 * Options: n=N (1000)  port=P (0x80)  size=1|2|4 (1)  mode=out|in (out)
 *          mmio=ADDR (4-byte movl writes to ADDR instead of port I/O)
 *          tsc=1 (also print elapsed TSC cycles)  cpl=3 (runtime option)
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

int main(void)
{
	uint64_t n = opt_u64("n", 1000);
	uint64_t port = opt_u64("port", 0x80);
	uint64_t size = opt_u64("size", 1);
	uint64_t mmio = opt_u64("mmio", 0);
	char mode[8] = "out";
	uint64_t t0, t1;

	opt_str("mode", mode, sizeof(mode));
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
