/* Constants shared between the assembly start code and the C runtime. */
#ifndef GUEST_LAYOUT_H
#define GUEST_LAYOUT_H

#define KERNEL_CS        0x08  /* 64-bit ring-0 code               */
#define KERNEL_DS        0x10  /* ring-0 data                      */
#define KERNEL_CS32      0x18  /* 32-bit ring-0 code (AP bring-up) */
#define USER_DS          0x23  /* ring-3 data (GDT index 4, RPL 3) */
#define USER_CS          0x2b  /* 64-bit ring-3 code (index 5)     */
#define TSS_SEL          0x30  /* 16-byte TSS descriptor (6, 7)    */
#define GDT_TSS_INDEX    6

#define TRAMPOLINE_PHYS  0x8000     /* AP real-mode entry (SIPI vector 0x08) */

#define BOOT_STACK_SIZE  0x4000
#define RSP0_STACK_SIZE  0x4000
#define USER_STACK_SIZE  0x4000
#define AP_STACK_SIZE    0x2000
#define MAX_CPUS         64

#endif
