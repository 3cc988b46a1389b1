/* unclaimed: I/O to ports no device claims; reads should be all-ones. */
#include "guest.h"

#define PORT_B 0x2f0    /* between COM4 (0x2e8) and COM2 (0x2f8) */
#define PORT_W 0x5554
#define PORT_L 0x5558

int main(void)
{
	static const char out[16] = "aiokvm-unclaimed";
	uint8_t in[4] = { 0, 0, 0, 0 };
	uint8_t b;
	uint16_t w;
	uint32_t l;

	outb(PORT_B, 0x5a);
	outw(PORT_W, 0xa55a);
	outl(PORT_L, 0xdeadbeef);
	b = inb(PORT_B);
	w = inw(PORT_W);
	l = inl(PORT_L);
	printf("unclaimed: inb=0x%02x inw=0x%04x inl=0x%08x\n", b, w, l);

	const void *src = out;
	void *dst = in;
	size_t cnt = sizeof(out);

	__asm__ volatile("cld; rep outsb"
			 : "+S"(src), "+c"(cnt)
			 : "d"((uint16_t)PORT_B), "m"(out));
	cnt = sizeof(in);
	__asm__ volatile("cld; rep insb"
			 : "+D"(dst), "+c"(cnt), "=m"(in)
			 : "d"((uint16_t)PORT_B));
	printf("unclaimed: insb=0x%02x 0x%02x 0x%02x 0x%02x\n",
	       in[0], in[1], in[2], in[3]);
	return 0;
}
