"""A small Multiboot v1 guest, built by the tests with gcc and binutils
(``gcc -m32 -ffreestanding``, ``ld -m elf_i386``): an ELF32 with a
Multiboot header and no PVH note, linked at 4 MiB as kvm-unit-tests' are.

It reports, one ``key=value`` line each on COM1, what a Multiboot loader and
kvm-unit-tests' devices gave it: EAX, the information structure (flags,
memory sizes, command line, the first module's bytes and string, RAM in the
memory map), fw_cfg's signature, vCPU count and RAM size, pc-testdev's
scratch register and MMIO window, and CPUID (vendor, x2APIC), then writes
``EXIT_CODE`` to isa-debug-exit.  Ring-0 code is slow under nested
virtualization: it does little.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

EXIT_CODE = 0x21

ENTRY = r"""
        .section .multiboot, "a"
        .balign 4
        .long   0x1BADB002, 0, -0x1BADB002     /* magic, flags 0 (ELF program headers), checksum */
        .text
        .globl  _start
_start: movl    $stack_top, %esp
        pushl   %ebx                            /* the information structure */
        pushl   %eax                            /* the boot magic */
        call    guest_main
1:      cli
        hlt
        jmp     1b
        .bss
        .balign 16
        .space  4096
stack_top:
"""

MAIN = r"""
typedef unsigned char u8; typedef unsigned short u16; typedef unsigned int u32; typedef unsigned long long u64;
static inline void outb(u16 p, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(p)); }
static inline void outw(u16 p, u16 v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(p)); }
static inline void outl(u16 p, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(p)); }
static inline u8 inb(u16 p) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(p)); return v; }
static inline u32 inl(u16 p) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(p)); return v; }
static void putc(char c) { outb(0x3f8, c); }
static void puts(const char *s) { while (*s) putc(*s++); }
static void put(const char *key, u64 v) {
    char digits[21]; int n = 0;
    puts(key); putc('=');
    do { digits[n++] = '0' + v % 10; v /= 10; } while (v);
    while (n) putc(digits[--n]);
    putc('\n');
}
static void cpuid(u32 leaf, u32 *r) {
    __asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(0));
}
static u64 fw_cfg(u16 key, int n) {
    u64 v = 0;
    outw(0x510, key);
    for (int i = 0; i < n; i++) v |= (u64)inb(0x511) << (8 * i);
    return v;
}
void guest_main(u32 magic, u32 *mbi) {
    put("magic", magic);
    put("flags", mbi[0]);
    put("mem_lower", mbi[1]);
    put("mem_upper", mbi[2]);
    puts("cmdline="); puts((const char *)mbi[4]); putc('\n');
    put("mods_count", mbi[5]);
    if (mbi[5]) {
        u32 *mod = (u32 *)mbi[6];
        puts("mod0=");
        for (const char *p = (const char *)mod[0]; p < (const char *)mod[1]; p++) putc(*p == '\n' ? ';' : *p);
        putc('\n');
        puts("mod0_string="); puts((const char *)mod[2]); putc('\n');
    }
    u64 ram = 0;
    for (u32 at = mbi[12]; at < mbi[12] + mbi[11]; at += *(u32 *)at + 4)
        if (*(u32 *)(at + 20) == 1) ram += *(u64 *)(at + 12);
    put("mmap_ram_kib", ram >> 10);
    puts("fw_cfg_signature=");
    outw(0x510, 0);
    for (int i = 0; i < 4; i++) putc(inb(0x511));
    putc('\n');
    put("fw_cfg_nb_cpus", fw_cfg(5, 2));
    put("fw_cfg_ram_size", fw_cfg(3, 8));
    outl(0xe0, 0x12345678);
    outb(0xea, 0xab);
    put("testdev_scratch", inl(0xe0));
    volatile u32 *iomem = (volatile u32 *)0xff000000u;
    iomem[3] = 0xdeadbeef;
    put("testdev_iomem", iomem[3]);
    outl(0xe4, 0x400000);                      /* flush our own page: we must run on */
    put("after_flush", 1);
    u32 r[4];
    cpuid(0, r);
    puts("vendor=");
    for (int i = 0; i < 4; i++) putc((char)(r[1] >> (8 * i)));
    for (int i = 0; i < 4; i++) putc((char)(r[3] >> (8 * i)));
    for (int i = 0; i < 4; i++) putc((char)(r[2] >> (8 * i)));
    putc('\n');
    cpuid(0, r);
    u32 level = r[0];
    put("cpuid_level", level);
    cpuid(1, r);
    put("x2apic", (r[2] >> 21) & 1);
    put("cpuid1_eax", r[0]);
    put("cpuid1_ecx", r[2]);
    put("cpuid1_edx", r[3] & ~(1u << 28));      /* HTT follows the vCPU count, not the model */
    if (level >= 7) {
        cpuid(7, r);
        put("cpuid7_ebx", r[1]);
        put("cpuid7_ecx", r[2]);
        put("cpuid7_edx", r[3]);
    }
    cpuid(0x80000001, r);
    put("cpuid80000001_ecx", r[2]);
    put("cpuid80000001_edx", r[3]);
#ifndef HANG
    outl(0xf4, EXIT_CODE);
#endif
}
"""

LINK_SCRIPT = """
OUTPUT_FORMAT("elf32-i386")
ENTRY(_start)
SECTIONS
{
        . = 0x400000;
        .text : { *(.multiboot) *(.text .text.*) *(.rodata .rodata.*) }
        .data : { *(.data .data.*) }
        .bss : { *(.bss .bss.*) *(COMMON) }
        /DISCARD/ : { *(.note.GNU-stack) *(.comment) *(.note.gnu.property) *(.eh_frame) }
}
"""


def build_multiboot_guest(directory: Path, *, exit_code: int = EXIT_CODE, hang: bool = False) -> Path:
    """Compile and link the guest into ``directory``; skips the test without gcc or binutils.

    ``exit_code``: what it writes to isa-debug-exit; ``hang``: it halts
    forever instead (a test that times out)."""
    for tool in ("gcc", "as", "ld"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    (directory / "entry.S").write_text(ENTRY)
    (directory / "main.c").write_text(MAIN)
    (directory / "link.ld").write_text(LINK_SCRIPT)
    elf = directory / ("mbguest-hang.elf" if hang else f"mbguest-{exit_code}.elf")
    flags = [f"-DEXIT_CODE={exit_code}", *(["-DHANG"] if hang else []), "-m32", "-ffreestanding", "-fno-pic",
             "-fno-stack-protector", "-fno-asynchronous-unwind-tables",
             "-mno-sse", "-mno-mmx", "-O2", "-c"]
    subprocess.run(["gcc", *flags, "-o", str(directory / "entry.o"), str(directory / "entry.S")],
                   check=True, capture_output=True)
    subprocess.run(["gcc", *flags, "-o", str(directory / "main.o"), str(directory / "main.c")],
                   check=True, capture_output=True)
    subprocess.run(["ld", "-m", "elf_i386", "-nostdlib", "--build-id=none", "-T", str(directory / "link.ld"),
                    "-o", str(elf), str(directory / "entry.o"), str(directory / "main.o")],
                   check=True, capture_output=True)
    return elf


def parse_report(output: bytes) -> dict[str, str]:
    report = {}
    for line in output.replace(b"\r\n", b"\n").decode(errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            report[key] = value
    return report
