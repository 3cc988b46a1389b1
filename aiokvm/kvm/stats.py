"""KVM binary statistics: the file behind ``KVM_GET_STATS_FD``.

Since Linux 5.14 (``KVM_CAP_BINARY_STATS_FD``) each VM fd and each vCPU fd
can hand out a read-only "stats fd".  Its contents, all found by offsets in
the header at the start of the file (see ``<linux/kvm.h>``):

- ``struct kvm_stats_header``: counts, name size, and the offsets below;
- the id string (``name_size`` bytes at ``id_offset``), e.g. ``kvm-1234/vcpu-0``;
- ``num_desc`` descriptors at ``desc_offset``, each a ``struct kvm_stats_desc``
  followed by its NUL-padded name (``name_size`` bytes);
- the data block at ``data_offset``: each statistic is ``desc.size``
  consecutive ``u64`` values at ``data_offset + desc.offset``.

The header, id and descriptors do not change for the life of the fd, so
``KvmStats`` parses them once; ``read()`` then costs one ``pread`` of the data
block.

    with KvmStats.for_vcpu(vcpu) as stats:
        before = stats.read()
        ...
        after = stats.read()
        print(after["exits"] - before["exits"])

Values are returned **raw**, exactly as the kernel stores them: a descriptor's
``unit``, ``base`` and ``exponent`` say what a raw value means (a stat with
``unit="seconds"``, ``base=10``, ``exponent=-9`` counts nanoseconds), and
``StatDescriptor.scale`` is the factor that converts it to the base unit.
One ``pread`` is not a consistent snapshot: the kernel copies each value while
the vCPU may keep running, so two counters read together may be a few events
apart.

A stats fd holds a reference on its VM in the kernel, so an open ``KvmStats``
keeps the VM's kernel state alive after the VM and vCPU fds are closed; close
it (or use ``with``) when done.
"""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass

from ..errors import KvmError
from ._fd import FdOwner
from ._ffi import ffi, lib

__all__ = ["KvmStats", "StatDescriptor"]

_HEADER_SIZE = ffi.sizeof("struct kvm_stats_header")
_DESC_SIZE = ffi.sizeof("struct kvm_stats_desc")  # without the name that follows it
_U64 = 8

_KINDS = {0: "cumulative", 1: "instant", 2: "peak", 3: "linear_hist", 4: "log_hist"}
_UNITS = {0: "none", 1: "bytes", 2: "seconds", 3: "cycles", 4: "boolean"}
_BASES = {0: 10, 1: 2}

_NO_CAPABILITY_HINT = (
    "this kernel has no binary stats interface (KVM_CAP_BINARY_STATS_FD, Linux 5.14+); "
    "the same counters may be readable under /sys/kernel/debug/kvm/"
)


def _field(flags: int, mask: int) -> int:
    """The bit field ``mask`` selects from ``flags``, shifted down to bit 0."""
    shift = (mask & -mask).bit_length() - 1
    return (flags & mask) >> shift


@dataclass(frozen=True)
class StatDescriptor:
    """One statistic as the kernel describes it.

    ``kind`` is ``"cumulative"``, ``"instant"``, ``"peak"``, ``"linear_hist"``
    or ``"log_hist"``; ``unit`` is ``"none"``, ``"bytes"``, ``"seconds"``,
    ``"cycles"`` or ``"boolean"``.  A kind or unit newer than this module is
    reported as ``"unknown(N)"`` rather than refused.  ``base`` (10 or 2) and
    ``exponent`` give the scale of raw values: ``raw * base ** exponent`` is
    in ``unit``.  ``size`` is the number of ``u64`` values (1 for scalars,
    the bucket count for histograms), ``offset`` their byte offset inside the
    data block, ``bucket_size`` the bucket width of a linear histogram.
    """

    name: str
    kind: str
    unit: str
    base: int
    exponent: int
    size: int
    offset: int
    bucket_size: int

    @property
    def scale(self) -> float:
        """Factor from a raw value to ``unit`` (e.g. ``1e-9`` for nanoseconds)."""
        return float(self.base) ** self.exponent

    @property
    def is_histogram(self) -> bool:
        return self.kind in ("linear_hist", "log_hist")


class KvmStats(FdOwner):
    """Reader for one KVM binary stats fd (per VM or per vCPU).

    Takes ownership of ``fd``: ``close()`` (or leaving a ``with`` block)
    closes it, and so does a failure while parsing it in the constructor.
    ``read()`` may be called from any thread; it does not touch the vCPU.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        try:
            self._parse()
        except BaseException:
            self.close()
            raise

    # -- opening ------------------------------------------------------------------
    @classmethod
    def for_vm(cls, vm) -> KvmStats:
        """Open the stats of a ``VmFd``."""
        return cls(_get_stats_fd(vm, getattr(vm, "kvm", None), "VM"))

    @classmethod
    def for_vcpu(cls, vcpu) -> KvmStats:
        """Open the stats of a ``VcpuFd``."""
        vm = getattr(vcpu, "vm", None)
        return cls(_get_stats_fd(vcpu, getattr(vm, "kvm", None), f"vCPU {getattr(vcpu, 'index', '?')}"))

    # -- parsing (once) -----------------------------------------------------------
    def _pread_exact(self, length: int, offset: int, what: str) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise KvmError(errno.EIO, f"reading KVM stats {what}",
                           f"got {len(data)} of {length} bytes at offset {offset}")
        return data

    def _parse(self) -> None:
        raw = self._pread_exact(_HEADER_SIZE, 0, "header")
        header = ffi.new("struct kvm_stats_header *")
        ffi.memmove(header, raw, _HEADER_SIZE)
        name_size = int(header.name_size)
        count = int(header.num_desc)
        if name_size == 0:
            raise KvmError(errno.EINVAL, "parsing KVM stats header", "name_size is 0")
        self.flags = int(header.flags)
        self.data_offset = int(header.data_offset)

        raw_id = self._pread_exact(name_size, int(header.id_offset), "id")
        self.id: str = raw_id.split(b"\0", 1)[0].decode("ascii", "replace")

        stride = _DESC_SIZE + name_size
        block = self._pread_exact(stride * count, int(header.desc_offset), "descriptors") if count else b""
        base_ptr = ffi.from_buffer(block) if block else None
        descriptors: list[StatDescriptor] = []
        for i in range(count):
            start = i * stride
            desc = ffi.cast("struct kvm_stats_desc *", base_ptr + start)
            flags = int(desc.flags)
            kind = _field(flags, lib.KVM_STATS_TYPE_MASK)
            unit = _field(flags, lib.KVM_STATS_UNIT_MASK)
            base = _field(flags, lib.KVM_STATS_BASE_MASK)
            name = block[start + _DESC_SIZE:start + stride].split(b"\0", 1)[0].decode("ascii", "replace")
            descriptors.append(StatDescriptor(
                name=name,
                kind=_KINDS.get(kind, f"unknown({kind})"),
                unit=_UNITS.get(unit, f"unknown({unit})"),
                base=_BASES.get(base, 10),
                exponent=int(desc.exponent),
                size=int(desc.size),
                offset=int(desc.offset),
                bucket_size=int(desc.bucket_size),
            ))
        del base_ptr
        self.descriptors: list[StatDescriptor] = descriptors
        self._by_name = {d.name: d for d in descriptors}
        self.data_size = max((d.offset + d.size * _U64 for d in descriptors), default=0)
        # (name, decoder, offset, is_scalar): struct copes with any alignment.
        self._decoders = [
            (d.name, struct.Struct(f"={d.size}Q"), d.offset, d.size == 1 and not d.is_histogram)
            for d in descriptors
        ]

    # -- reading ------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [d.name for d in self.descriptors]

    def descriptor(self, name: str) -> StatDescriptor:
        """The descriptor called ``name`` (``KeyError`` if this kernel has none)."""
        return self._by_name[name]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def read(self) -> dict[str, int | list[int]]:
        """All values, raw: an ``int`` for scalars, a ``list[int]`` for histograms.

        One ``pread`` of the data block (descriptors are not re-read).
        """
        if self.fd < 0:
            raise KvmError(errno.EBADF, "reading KVM stats", "the stats reader is closed")
        if not self.data_size:
            return {}
        data = self._pread_exact(self.data_size, self.data_offset, "data")
        values: dict[str, int | list[int]] = {}
        for name, decoder, offset, scalar in self._decoders:
            items = decoder.unpack_from(data, offset)
            values[name] = items[0] if scalar else list(items)
        return values

    # -- lifetime -----------------------------------------------------------------
    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self.fd}"
        return f"<KvmStats {getattr(self, 'id', '?')!r} {len(getattr(self, 'descriptors', []))} stats {state}>"


def _get_stats_fd(owner, kvm, what: str) -> int:
    """KVM_GET_STATS_FD on a VM or vCPU, with a clear error where it is missing."""
    if getattr(owner, "fd", -1) < 0:
        raise KvmError(errno.EBADF, f"KVM_GET_STATS_FD ({what})", f"the {what} fd is closed")
    if kvm is not None and getattr(kvm, "fd", -1) >= 0 and not kvm.check_extension("BINARY_STATS_FD"):
        raise KvmError(errno.EOPNOTSUPP, f"KVM_GET_STATS_FD ({what})", _NO_CAPABILITY_HINT)
    try:
        return owner.stats_fd()
    except KvmError as exc:
        if exc.errno in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
            raise KvmError(exc.errno, f"KVM_GET_STATS_FD ({what})", _NO_CAPABILITY_HINT) from None
        raise
