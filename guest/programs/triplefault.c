/* triplefault: load an empty IDT and raise #BP -> #GP -> #DF -> reset. */
#include "guest.h"

/* lidt needs CPL 0, so ignore cpl=3. */
const int guest_ring0_only = 1;

int main(void)
{
	static const struct {
		uint16_t limit;
		uint64_t base;
	} __attribute__((packed)) empty_idt = { 0, 0 };

	printf("triplefault: about to fault\n");
	__asm__ volatile("lidt %0\n\tint3" : : "m"(empty_idt) : "memory");
	/* Not reached.  Never use debug-exit here. */
	for (;;)
		__asm__ volatile("cli; hlt");
}
