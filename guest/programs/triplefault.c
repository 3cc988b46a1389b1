/*
 * triplefault: load an empty IDT (limit 0) and raise an exception; the
 * exception cannot be delivered (#GP), neither can the #GP (#DF), and
 * the #DF escalates to a triple fault -> shutdown/reset.
 * Option: how=ud2 (default) | int3 | de (divide by zero).
 * "int3" is a software interrupt, which some instruction emulators
 * (KVM's, used when ring 0 is emulated) cannot deliver in long mode;
 * ud2 raises a plain fault and works everywhere.
 */
#include "guest.h"

/* lidt needs CPL 0, so ignore cpl=3. */
const int guest_ring0_only = 1;

int main(void)
{
	static const struct {
		uint16_t limit;
		uint64_t base;
	} __attribute__((packed)) empty_idt = { 0, 0 };
	char how[8] = "ud2";

	opt_str("how", how, sizeof(how));
	printf("triplefault: about to fault\n");

	__asm__ volatile("lidt %0" : : "m"(empty_idt) : "memory");
	if (strcmp(how, "int3") == 0) {
		__asm__ volatile("int3");
	} else if (strcmp(how, "de") == 0) {
		__asm__ volatile("xorl %%ecx, %%ecx\n\tdivl %%ecx"
				 : : : "eax", "ecx", "edx");
	} else {
		__asm__ volatile("ud2");
	}
	/* Not reached.  Never use debug-exit here. */
	for (;;)
		__asm__ volatile("cli; hlt");
}
