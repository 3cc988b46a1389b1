/* 16550 UART on COM1 (0x3f8), polled, 115200 8N1. */
#include "guest.h"

#define COM1     0x3f8
#define UART_THR 0   /* transmit holding (DLAB=0)   */
#define UART_DLL 0   /* divisor low     (DLAB=1)    */
#define UART_IER 1   /* interrupt enable (DLAB=0)   */
#define UART_DLM 1   /* divisor high    (DLAB=1)    */
#define UART_FCR 2
#define UART_LCR 3
#define UART_MCR 4
#define UART_LSR 5
#define LSR_THRE 0x20

void serial_init(void)
{
	outb(COM1 + UART_IER, 0x00);   /* no interrupts              */
	outb(COM1 + UART_LCR, 0x80);   /* DLAB on                    */
	outb(COM1 + UART_DLL, 0x01);   /* divisor 1 -> 115200 baud   */
	outb(COM1 + UART_DLM, 0x00);
	outb(COM1 + UART_LCR, 0x03);   /* DLAB off, 8 data, no parity, 1 stop */
	outb(COM1 + UART_FCR, 0xc7);   /* FIFO on, clear both, 14-byte trigger */
	outb(COM1 + UART_MCR, 0x03);   /* DTR | RTS                  */
}

void serial_putc(char c)
{
	/* Bounded wait so a missing/odd UART cannot hang the guest. */
	for (unsigned int i = 0; i < 100000; i++) {
		if (inb(COM1 + UART_LSR) & LSR_THRE)
			break;
		cpu_relax();
	}
	outb(COM1 + UART_THR, (uint8_t)c);
}

void serial_write(const char *s, size_t n)
{
	while (n--)
		serial_putc(*s++);
}
