"""The packed access word: how the C vCPU loop hands an access to Python.

For every access a Python handler must see, the C loop
(``aiokvm/kvm/_vcpu_loop.h``) packs it into one integer, which is both the
return value of ``aiokvm_vcpu_run`` (vCPU thread) and of
``aiokvm_hub_serve`` (loop), so that dispatching it reads no struct field::

    bits 0-3   code    (AIOKVM_RC_PYTHON)
    bits 4-5   op      (OP_READ, OP_WRITE, OP_STRING)
    bits 6-9   size    (bytes of one element, 1-8)
    bits 10-19 region  (the bus region id: index of the dispatch tables)
    bits 20-62 offset  (from the region's base)

The layout comes from the C header through the cffi cdef; this module is
its only Python description.  ``unpack()`` decodes a word.  The two hot
loops (``VcpuThread._loop`` and ``SlotServer._serve_burst``) inline the same
shifts with the constants below bound to locals, because a function call
per exit costs about 1% of an exit here.
"""

from __future__ import annotations

from typing import NamedTuple

from .kvm import lib

CODE_MASK = lib.AIOKVM_PACK_CODE_MASK
OP_SHIFT, OP_MASK = lib.AIOKVM_PACK_OP_SHIFT, lib.AIOKVM_PACK_OP_MASK
SIZE_SHIFT, SIZE_MASK = lib.AIOKVM_PACK_SIZE_SHIFT, lib.AIOKVM_PACK_SIZE_MASK
REGION_SHIFT, REGION_MASK = lib.AIOKVM_PACK_REGION_SHIFT, lib.AIOKVM_PACK_REGION_MASK
OFFSET_SHIFT = lib.AIOKVM_PACK_OFFSET_SHIFT

OP_READ, OP_WRITE, OP_STRING = lib.AIOKVM_OP_READ, lib.AIOKVM_OP_WRITE, lib.AIOKVM_OP_STRING
#: the op field in place: ``packed & OP_FIELD`` is ``op << OP_SHIFT``
OP_FIELD = OP_MASK << OP_SHIFT
READ_OP, WRITE_OP, STRING_OP = OP_READ << OP_SHIFT, OP_WRITE << OP_SHIFT, OP_STRING << OP_SHIFT
#: ``packed & ONE_ELEMENT_MASK == ONE_ELEMENT`` selects a one-element read or write
ONE_ELEMENT_MASK = CODE_MASK | STRING_OP
ONE_ELEMENT = lib.AIOKVM_RC_PYTHON

#: a read result keeps its low ``size`` bytes: ``value & MASKS[size]``
MASKS = tuple((1 << (8 * n)) - 1 for n in range(9))
ALL_ONES = MASKS[8]

assert REGION_MASK + 1 == lib.AIOKVM_MAX_REGIONS


class Access(NamedTuple):
    """One decoded access word."""

    op: int       # OP_READ, OP_WRITE or OP_STRING
    size: int
    region: int
    offset: int

    @property
    def is_write(self) -> bool:
        return self.op == OP_WRITE


def unpack(packed: int) -> Access:
    return Access((packed >> OP_SHIFT) & OP_MASK, (packed >> SIZE_SHIFT) & SIZE_MASK,
                  (packed >> REGION_SHIFT) & REGION_MASK, packed >> OFFSET_SHIFT)


def pack(op: int, size: int, region: int, offset: int) -> int:
    """The word the C loop would build (for tests and tools)."""
    return (lib.AIOKVM_RC_PYTHON | op << OP_SHIFT | size << SIZE_SHIFT | region << REGION_SHIFT
            | offset << OFFSET_SHIFT)
