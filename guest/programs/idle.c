/*
 * idle: do n port writes (n=, port=; default none), print a line, then halt
 * with interrupts enabled forever.  Nothing wakes it: the VM is idle, which
 * is what the adaptive-polling test measures (CPU time of an idle VM).
 */
#include "guest.h"

/* sti and hlt need ring 0. */
const int guest_ring0_only = 1;

int main(void)
{
	uint64_t n = opt_u64("n", 0);
	uint16_t port = (uint16_t)opt_u64("port", 0x80);

	for (uint64_t i = 0; i < n; i++)
		outb(port, (uint8_t)i);
	printf("idle: halting\n");
	for (;;)
		__asm__ volatile("sti; hlt" ::: "memory");
	return 0;
}
