/* hello: greeting plus the RAM size seen in the PVH memory map. */
#include "guest.h"

int main(void)
{
	printf("Hello from aiokvm guest\n");
	printf("memory: %lu MiB\n", boot_mem_bytes() >> 20);
	return 0;
}
