/*
 * aiokvm guest kit: PVH entry, descriptor tables, identity page tables,
 * exception stubs, ring-3 entry and the AP real-mode trampoline.
 *
 * Ring-0 and real-mode code is emulated (slowly) on the target host, so
 * the paths below are deliberately short: page tables and the GDT are
 * built at link time and only a handful of instructions run before C.
 */
#include "layout.h"

/* ------------------------------------------------------------------ */
/* PVH ELF note: "Xen", XEN_ELFNOTE_PHYS32_ENTRY (18), 32-bit entry.  */
/* ------------------------------------------------------------------ */
        .section .note.Xen, "a", @note
        .balign 4
        .long   4                       /* namesz ("Xen\0")           */
        .long   4                       /* descsz                      */
        .long   18                      /* XEN_ELFNOTE_PHYS32_ENTRY    */
        .asciz  "Xen"
        .long   pvh_start32             /* desc: physical entry point  */

/* ------------------------------------------------------------------ */
/* 32-bit entry.  PVH state: protected mode, paging off, flat segments,*/
/* EBX = struct hvm_start_info *.                                      */
/* ------------------------------------------------------------------ */
        .section .text.boot, "ax", @progbits
        .code32
        .globl  pvh_start32
pvh_start32:
        movl    %ebx, %esi              /* start_info for kmain       */
        xorl    %edi, %edi              /* 0 = bootstrap processor    */
        lgdtl   gdt_desc

/* Shared by BSP and APs: ESI = start_info, EDI = 0 (BSP) / 1 (AP). */
        .globl  enter_long_mode
enter_long_mode:
        movl    $0x20, %eax             /* CR4.PAE                    */
        movl    %eax, %cr4
        movl    $pml4, %eax
        movl    %eax, %cr3
        movl    $0xc0000080, %ecx       /* EFER.LME                   */
        movl    $0x100, %eax
        xorl    %edx, %edx
        wrmsr
        movl    $0x80000011, %eax       /* CR0.PG | CR0.ET | CR0.PE   */
        movl    %eax, %cr0
        ljmpl   $KERNEL_CS, $long_entry

        .code64
long_entry:
        movl    $KERNEL_DS, %eax
        movl    %eax, %ds
        movl    %eax, %es
        movl    %eax, %ss
        testl   %edi, %edi
        jnz     ap_long_entry
        movq    $boot_stack_top, %rsp
        movq    $__bss_start, %rdi      /* zero .bss (stacks excluded) */
        movq    $__bss_end, %rcx
        subq    %rdi, %rcx
        shrq    $3, %rcx
        xorl    %eax, %eax
        rep stosq
        movl    %esi, %edi
        call    crt_start               /* never returns               */
        jmp     halt_forever

ap_long_entry:
        movl    $AP_STACK_SIZE, %eax    /* claim a per-AP stack        */
        lock xaddq %rax, ap_stack_cursor(%rip)
        addq    $AP_STACK_SIZE, %rax
        cmpq    $ap_stacks_end, %rax
        ja      halt_forever            /* more CPUs than MAX_CPUS     */
        movq    %rax, %rsp
        call    ap_start_c              /* never returns               */

        .globl  halt_forever
halt_forever:
        cli
1:      hlt
        jmp     1b

/* ------------------------------------------------------------------ */
/* enter_user(entry, user_rsp, rflags): iretq to ring 3.               */
/* ------------------------------------------------------------------ */
        .text
        .globl  enter_user
enter_user:
        pushq   $USER_DS                /* SS     */
        pushq   %rsi                    /* RSP    */
        pushq   %rdx                    /* RFLAGS */
        pushq   $USER_CS                /* CS     */
        pushq   %rdi                    /* RIP    */
        iretq

/* ------------------------------------------------------------------ */
/* Exception stubs (vectors 0-31): push [dummy error], vector, go to C.*/
/* ------------------------------------------------------------------ */
        .macro  EXC_STUB vec
        .balign 16
exc_stub_\vec:
        .if (\vec == 8) || (\vec == 10) || (\vec == 11) || (\vec == 12) || (\vec == 13) || (\vec == 14) || (\vec == 17) || (\vec == 21) || (\vec == 29) || (\vec == 30)
        .else
        pushq   $0
        .endif
        pushq   $\vec
        jmp     exc_common
        .endm

        .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        EXC_STUB \v
        .endr

exc_common:
        cld
        movq    %rsp, %rdi              /* struct exc_frame *          */
        andq    $-16, %rsp
        call    exception_entry         /* never returns               */
        jmp     halt_forever

        .section .rodata
        .balign 8
        .globl  exc_stub_table
exc_stub_table:
        .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        .quad   exc_stub_\v
        .endr

/* ------------------------------------------------------------------ */
/* AP trampoline, copied to TRAMPOLINE_PHYS; entered in real mode with */
/* CS = TRAMPOLINE_PHYS >> 4, IP = 0.  Real mode -> protected mode,    */
/* then the shared enter_long_mode path above.                         */
/* ------------------------------------------------------------------ */
        .section .rodata.trampoline, "a", @progbits
        .code16
        .globl  ap_trampoline_start, ap_trampoline_end
ap_trampoline_start:
        lgdtl   %cs:(tramp_gdt_desc - ap_trampoline_start)
        movl    $0x11, %eax             /* CR0.PE | CR0.ET             */
        movl    %eax, %cr0
        xorl    %esi, %esi
        movl    $1, %edi                /* 1 = application processor   */
        ljmpl   $KERNEL_CS32, $enter_long_mode
        .balign 4
tramp_gdt_desc:
        .word   gdt_end - gdt - 1
        .long   gdt
ap_trampoline_end:
        .code64

/* ------------------------------------------------------------------ */
/* GDT (accessed bits preset so loads do not write the table).         */
/* ------------------------------------------------------------------ */
        .data
        .balign 16
        .globl  gdt
gdt:
        .quad   0                       /* 0x00 null                   */
        .quad   0x00af9b000000ffff      /* 0x08 kernel code, 64-bit    */
        .quad   0x00cf93000000ffff      /* 0x10 kernel data            */
        .quad   0x00cf9b000000ffff      /* 0x18 kernel code, 32-bit    */
        .quad   0x00cff3000000ffff      /* 0x20 user data   (DPL 3)    */
        .quad   0x00affb000000ffff      /* 0x28 user code, 64-bit      */
        .quad   0, 0                    /* 0x30 TSS, filled in by C    */
gdt_end:
        .balign 4
        .globl  gdt_desc
gdt_desc:
        .word   gdt_end - gdt - 1
        .long   gdt

        .balign 8
ap_stack_cursor:
        .quad   ap_stacks

/* ------------------------------------------------------------------ */
/* Identity page tables, 4 GiB with 2 MiB pages, U/S set everywhere so */
/* ring 3 can touch everything.  3-4 GiB (MMIO hole) is PCD|PWT.       */
/* ------------------------------------------------------------------ */
        .section .data.pagetables, "aw", @progbits
        .balign 4096
        .globl  pml4
pml4:
        .quad   pdpt + 0x7              /* P | RW | US                 */
        .fill   511, 8, 0
pdpt:
        .quad   pd + 0x0007
        .quad   pd + 0x1007
        .quad   pd + 0x2007
        .quad   pd + 0x3007
        .fill   508, 8, 0
pd:
        .set    pg, 0
        .rept   2048
        .if     pg >= 0xc0000000
        .quad   pg | 0x9f               /* P|RW|US|PWT|PCD|PS          */
        .else
        .quad   pg | 0x87               /* P|RW|US|PS                  */
        .endif
        .set    pg, pg + 0x200000
        .endr

/* ------------------------------------------------------------------ */
/* Stacks: NOBITS, placed after __bss_end so boot-time zeroing skips  */
/* them (the boot stack is live while .bss is cleared).                */
/* ------------------------------------------------------------------ */
        .section .stacks, "aw", @nobits
        .balign 4096
        .skip   BOOT_STACK_SIZE
boot_stack_top:
        .skip   RSP0_STACK_SIZE
        .globl  rsp0_stack_top
rsp0_stack_top:
        .skip   USER_STACK_SIZE
        .globl  user_stack_top
user_stack_top:
ap_stacks:
        .skip   AP_STACK_SIZE * MAX_CPUS
ap_stacks_end:

        .section .note.GNU-stack, "", @progbits
