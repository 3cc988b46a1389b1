/*
 * irqtest: receive n interrupts on one irqchip input that the host drives
 * (KVM_IRQ_LINE or an irqfd), edge- or level-triggered.
 *
 * Options: irq=N (5), n=K (10), port=P (0x520), mode=ioapic|pic (ioapic),
 * level=1 (level-triggered, active high; default edge), timeout_ms=T
 * (wait by polling the TSC for at most T ms per interrupt instead of hlt).
 *
 * Protocol: before waiting for interrupt i (0-based) the guest writes i to
 * port P ("ready").  The handler counts, writes the count (low byte) to
 * port P+1, then sends EOI.  For a level-triggered line the host lowers it
 * on that P+1 write (or on the EOI, with an irqfd resampler).
 *
 * Vectors: 0x30+irq in ioapic mode (8259s masked); in pic mode the 8259s
 * are remapped to 0x20 (master) / 0x28 (slave).  The IOAPIC entry points
 * at APIC ID 0, fixed delivery, active high.
 *
 * Output: "irqtest: received K interrupts" and exit 0, or
 * "irqtest: timeout after K interrupts" and exit 1.  Bad options: exit 2.
 */
#include "guest.h"

/* cli/sti/hlt, IDT changes and EOIs need ring 0. */
const int guest_ring0_only = 1;

#define IOAPIC_BASE   0xfec00000ul
#define LAPIC_SVR     0xf0
#define LAPIC_EOI     0xb0
#define LAPIC_LVT0    0x350
#define PIC1_CMD      0x20
#define PIC1_DATA     0x21
#define PIC2_CMD      0xa0
#define PIC2_DATA     0xa1
#define PIC_EOI       0x20
#define ELCR_PORT     0x4d0   /* 0x4d0: IRQ 0-7, 0x4d1: IRQ 8-15 */

static volatile uint32_t count;     /* interrupts handled */
static volatile uint32_t spurious;  /* spurious vectors taken */
static uint16_t ack_port;           /* P + 1 */
static int use_pic;
static int on_slave;                /* pic mode, irq >= 8 */

__attribute__((interrupt)) static void irq_handler(struct interrupt_frame *f)
{
	uint32_t c = count + 1;

	(void)f;
	count = c;
	outb(ack_port, (uint8_t)c);
	if (use_pic) {
		if (on_slave)
			outb(PIC2_CMD, PIC_EOI);
		outb(PIC1_CMD, PIC_EOI);
	} else {
		mmio_write32(LAPIC_BASE + LAPIC_EOI, 0);
	}
}

/* LAPIC spurious vector and 8259 IRQ 7: no EOI. */
__attribute__((interrupt)) static void spurious_handler(struct interrupt_frame *f)
{
	(void)f;
	spurious = spurious + 1;
}

/* 8259 IRQ 15 spurious: the master saw a real request on line 2. */
__attribute__((interrupt)) static void spurious15_handler(struct interrupt_frame *f)
{
	(void)f;
	spurious = spurious + 1;
	outb(PIC1_CMD, PIC_EOI);
}

static void ioapic_write(uint32_t reg, uint32_t v)
{
	mmio_write32(IOAPIC_BASE, reg);
	mmio_write32(IOAPIC_BASE + 0x10, v);
}

static void lapic_sw_enable(void)
{
	lapic_write(LAPIC_SVR, (lapic_read(LAPIC_SVR) & ~0x3ffu) | 0x100 | 0xff);
}

static void setup_ioapic(unsigned int irq, int level)
{
	lapic_sw_enable();
	outb(PIC1_DATA, 0xff);   /* the ISA IRQs also reach the 8259s */
	outb(PIC2_DATA, 0xff);
	idt_set_handler(0x30 + irq, (void (*)(void))irq_handler);
	/* high dword first (dest APIC ID 0), then the low one unmasks:
	 * vector, fixed, physical, active high, edge (0) or level (bit 15) */
	ioapic_write(0x10 + 2 * irq + 1, 0);
	ioapic_write(0x10 + 2 * irq, (0x30 + irq) | (level ? 1u << 15 : 0));
}

static void setup_pic(unsigned int irq, int level)
{
	uint8_t m1 = 0xff, m2 = 0xff;

	/* ExtINT reaches the CPU through LINT0; set it explicitly (KVM and
	 * QEMU do so for the BSP at reset, but other VMMs may not). */
	lapic_sw_enable();
	lapic_write(LAPIC_LVT0, 0x700);   /* ExtINT, unmasked */

	outb(PIC1_CMD, 0x11);             /* ICW1: edge (ELCR decides), ICW4 */
	outb(PIC2_CMD, 0x11);
	outb(PIC1_DATA, 0x20);            /* ICW2: vector base */
	outb(PIC2_DATA, 0x28);
	outb(PIC1_DATA, 4);               /* ICW3: slave on line 2 */
	outb(PIC2_DATA, 2);
	outb(PIC1_DATA, 1);               /* ICW4: 8086 mode */
	outb(PIC2_DATA, 1);

	if (irq != 7)
		idt_set_handler(0x27, (void (*)(void))spurious_handler);
	if (irq != 15)
		idt_set_handler(0x2f, (void (*)(void))spurious15_handler);
	idt_set_handler(0x20 + irq, (void (*)(void))irq_handler);
	if (level) {
		uint16_t elcr = ELCR_PORT + (irq >> 3);

		outb(elcr, inb(elcr) | (uint8_t)(1u << (irq & 7)));
	}
	if (irq >= 8) {
		m1 &= ~(1u << 2);
		m2 &= ~(1u << (irq - 8));
	} else {
		m1 &= ~(1u << irq);
	}
	outb(PIC2_DATA, m2);
	outb(PIC1_DATA, m1);
}

int main(void)
{
	unsigned int irq = (unsigned int)opt_u64("irq", 5);
	uint32_t n = (uint32_t)opt_u64("n", 10);
	uint16_t port = (uint16_t)opt_u64("port", 0x520);
	int level = opt_u64("level", 0) != 0;
	uint64_t timeout_ms = opt_u64("timeout_ms", 0);
	uint64_t ticks = 0;
	char mode[8] = "ioapic";
	uint32_t i;

	opt_str("mode", mode, sizeof(mode));
	use_pic = strcmp(mode, "pic") == 0;
	if (!use_pic && strcmp(mode, "ioapic") != 0) {
		printf("irqtest: bad mode=%s (pic|ioapic)\n", mode);
		return 2;
	}
	if (use_pic ? irq > 15 || irq == 2 : irq > 23) {
		printf("irqtest: bad irq=%u for mode=%s\n", irq, mode);
		return 2;
	}
	ack_port = port + 1;
	on_slave = irq >= 8;
	if (timeout_ms)
		ticks = timeout_ms * (tsc_hz() / 1000);

	idt_set_handler(0xff, (void (*)(void))spurious_handler);
	if (use_pic)
		setup_pic(irq, level);
	else
		setup_ioapic(irq, level);

	/* IF is 0 here (PVH entry state) and between the waits below. */
	for (i = 0; i < n; i++) {
		uint32_t want = i + 1;

		outb(port, (uint8_t)i);
		if (ticks) {
			uint64_t deadline = rdtsc() + ticks;

			__asm__ volatile("sti" ::: "memory");
			while (count < want && rdtsc() < deadline)
				cpu_relax();
			__asm__ volatile("cli" ::: "memory");
			if (count < want)
				break;
		} else {
			/* sti's one-instruction shadow makes "sti; hlt" atomic:
			 * an interrupt pending at sti wakes the hlt. */
			while (count < want)
				__asm__ volatile("sti; hlt; cli" ::: "memory");
		}
	}
	if (spurious)
		printf("irqtest: %u spurious interrupts\n", spurious);
	if (i < n) {
		printf("irqtest: timeout after %u interrupts\n", count);
		return 1;
	}
	printf("irqtest: received %u interrupts\n", count);
	return count == n ? 0 : 1;
}
