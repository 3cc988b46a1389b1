"""A tiny ELF32 i386 PVH guest, built by the tests with binutils (``as --32``, ``ld -m elf_i386``).

At the PVH entry (32-bit protected mode, paging off) it writes ``MESSAGE`` to
COM1's THR one byte at a time, then writes ``GOOD_EXIT`` to the isa-debug-exit
port if EBX points at an ``hvm_start_info`` with the right magic, else
``BAD_EXIT``.  No stack, no interrupts: ring-0 code is slow under nested
virtualization, so it does as little as it can.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

LOAD_ADDR = 0x100000
MESSAGE = b"pvh32: hello from an ELF32 guest\n"
GOOD_EXIT = 42
BAD_EXIT = 7
_MESSAGE_ASM = MESSAGE.decode().replace("\n", "\\n")  # as a gas string literal

SOURCE = rf"""
        .code32
        .section .text.entry, "ax"
        .globl  pvh32_entry
pvh32_entry:
        cld
        movl    ${BAD_EXIT}, %edi
        cmpl    $0x336ec578, (%ebx)     /* hvm_start_info magic */
        jne     1f
        movl    ${GOOD_EXIT}, %edi
1:      movl    $message, %esi
        movl    $message_end - message, %ecx
        movw    $0x3f8, %dx             /* COM1 THR */
2:      lodsb
        outb    %al, %dx
        loop    2b
        movl    %edi, %eax
        movw    $0xf4, %dx              /* isa-debug-exit */
        outl    %eax, %dx
3:      cli
        hlt
        jmp     3b

        .section .rodata, "a"
message:
        .ascii  "{_MESSAGE_ASM}"
message_end:

        /* PVH: name "Xen", type 18 (XEN_ELFNOTE_PHYS32_ENTRY), the 32-bit entry */
        .section .note.Xen, "a", @note
        .balign 4
        .long   4
        .long   desc_end - desc_start
        .long   18
        .asciz  "Xen"
        .balign 4
desc_start:
        .long   pvh32_entry
        .if     DESC_SIZE == 8
        .long   0                       /* Linux's 64-bit kernels use an 8-byte descriptor */
        .endif
desc_end:
        .balign 4
"""

LINK_SCRIPT = f"""
OUTPUT_FORMAT("elf32-i386")
OUTPUT_ARCH(i386)
ENTRY(pvh32_entry)
PHDRS
{{
        text PT_LOAD FLAGS(5);
        note PT_NOTE FLAGS(4);
}}
SECTIONS
{{
        . = {LOAD_ADDR:#x};
        .text : {{ *(.text.entry) *(.text .text.*) *(.rodata .rodata.*) }} :text
        .note.Xen : {{ *(.note.Xen) }} :text :note
        /DISCARD/ : {{ *(.note.GNU-stack) *(.comment) }}
}}
"""


def build_pvh32(directory: Path, *, desc_size: int = 4) -> Path:
    """Assemble and link the guest into ``directory``; skips the test without binutils."""
    if shutil.which("as") is None or shutil.which("ld") is None:
        pytest.skip("binutils (as, ld) is not installed")
    source = directory / "pvh32.S"
    obj = directory / "pvh32.o"
    script = directory / "pvh32.ld"
    elf = directory / f"pvh32-desc{desc_size}.elf"
    source.write_text(SOURCE)
    script.write_text(LINK_SCRIPT)
    subprocess.run(["as", "--32", f"--defsym=DESC_SIZE={desc_size}", "-o", str(obj), str(source)],
                   check=True, capture_output=True)
    subprocess.run(["ld", "-m", "elf_i386", "-nostdlib", "--build-id=none", "-T", str(script),
                    "-o", str(elf), str(obj)], check=True, capture_output=True)
    return elf
