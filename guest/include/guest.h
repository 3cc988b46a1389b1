/* aiokvm guest kit runtime API. */
#ifndef GUEST_H
#define GUEST_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include "hvm_start_info.h"
#include "io.h"
#include "layout.h"

/* Each program provides this; its return value becomes the exit code. */
int main(void);

/* A program that defines this as nonzero always runs at CPL 0, even
 * when cpl=3 is given on the command line (e.g. triplefault needs lidt). */
extern const int guest_ring0_only;

/* ---- interrupts ---- */
/* Points IDT vector vec (32-255; others are ignored) at handler through a
 * ring-0 interrupt gate (IF is cleared on entry).  The handler must end in
 * iretq and save what it clobbers: in C, declare it
 *   __attribute__((interrupt)) void h(struct interrupt_frame *f);
 * and cast it to void (*)(void).  It runs on the current stack (CPL 0)
 * or on the TSS rsp0 stack (interrupt from CPL 3). */
struct interrupt_frame;
void idt_set_handler(unsigned int vec, void (*handler)(void));

/* ---- exit ---- */
#define DEBUG_EXIT_PORT 0xf4
__attribute__((noreturn)) void guest_exit(uint32_t code);

/* ---- serial console (16550 at 0x3f8) ---- */
void serial_init(void);
void serial_putc(char c);
void serial_write(const char *s, size_t n);

/* ---- formatted output ---- */
int printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int vprintf(const char *fmt, va_list ap);
/* Same as printf but takes no lock: for exception context. */
int printf_nolock(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int snprintf(char *buf, size_t size, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
int vsnprintf(char *buf, size_t size, const char *fmt, va_list ap);

/* ---- spinlocks ---- */
typedef struct {
	volatile uint32_t locked;
} spinlock_t;

static inline void spin_lock(spinlock_t *l)
{
	while (__atomic_exchange_n(&l->locked, 1, __ATOMIC_ACQUIRE))
		while (__atomic_load_n(&l->locked, __ATOMIC_RELAXED))
			cpu_relax();
}

static inline void spin_unlock(spinlock_t *l)
{
	__atomic_store_n(&l->locked, 0, __ATOMIC_RELEASE);
}

/* ---- boot information ---- */
extern struct hvm_start_info *boot_info;  /* as passed in EBX */
uint64_t boot_mem_bytes(void);            /* sum of RAM (type 1) entries */
const char *boot_cmdline(void);           /* private copy, never NULL */

/* ---- command line options: "key=value key2 ..." ---- */
/* Returns 1 if the key appears (with or without "=value"). */
int opt_present(const char *key);
/* Copies the value (may be empty) into out; returns 1 if key present. */
int opt_str(const char *key, char *out, size_t outlen);
/* Decimal or 0x-hex number; def if missing or malformed. */
uint64_t opt_u64(const char *key, uint64_t def);
/* Parses a decimal or 0x-hex number; returns 0 on failure. */
int parse_u64(const char *s, uint64_t *out);

/* ---- timing ---- */
uint64_t tsc_hz(void);          /* from CPUID if known, else assumed */
/* Where tsc_hz() got its value: "cpuid15", "cpuid16", "cpuid40000010"
 * (hypervisor timing leaf) or "assumed" (3 GHz). */
const char *tsc_hz_source(void);
void delay_us(uint64_t us);

/* ---- local APIC / SMP ---- */
#define LAPIC_BASE 0xfee00000ul
uint32_t lapic_read(uint32_t reg);
void lapic_write(uint32_t reg, uint32_t v);
unsigned int cpu_apic_id(void);   /* LAPIC ID register [31:24] */
/* Copies the trampoline and sends INIT-SIPI-SIPI.  If dest < 0 the IPIs
 * are broadcast to all-excluding-self, otherwise sent to APIC ID dest.
 * Each AP that arrives calls fn() on its own stack, then halts. */
void smp_start_aps(void (*fn)(void), int dest);

/* ---- string / memory ---- */
void *memcpy(void *d, const void *s, size_t n);
void *memmove(void *d, const void *s, size_t n);
void *memset(void *d, int c, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int strcmp(const char *a, const char *b);
int strncmp(const char *a, const char *b, size_t n);

#endif
