"""The board: the QEMU ``microvm`` platform built on a KVM VM.

What a guest finds before any device is attached: the KVM VM with its
TSS and identity-map pages, the in-kernel irqchip (PIC, IOAPIC, LAPICs) and
PIT, guest RAM in KVM memory slots, vCPUs with the host's CPUID (APIC IDs
filled in), and the virtio-mmio slots that virtio devices take.

Layout, as QEMU microvm lays it out (``reference.md``):

- RAM from 0 (``memory.py``; above 3 GiB it continues at 4 GiB);
- the KVM identity-map and TSS pages at 0xfeffc000, reserved in the e820 map;
- virtio-mmio transport ``i`` at ``0xfeb00000 + 512*i``, IRQ ``5 + i``,
  taken from slot 7 down; each one is announced to the guest on the kernel
  command line as ``virtio_mmio.device=512@0x...:IRQ`` (what QEMU's
  auto-kernel-cmdline adds).
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError
from .kvm import Kvm, ffi
from .kvm.stats import KvmStats
from .memory import GuestMemory

# Addresses KVM needs on Intel hosts (unused on others); QEMU's choices, and
# reserved in the e820 map (boot.KVM_PRIVATE_START).
IDENTITY_MAP_ADDR = 0xFEFF_C000
TSS_ADDR = 0xFEFF_D000

VIRTIO_MMIO_BASE = 0xFEB0_0000
VIRTIO_MMIO_SIZE = 0x200
VIRTIO_MMIO_SLOTS = 8
VIRTIO_MMIO_FIRST_IRQ = 5


@dataclass(frozen=True)
class VirtioSlot:
    """One virtio-mmio transport window and its interrupt line."""

    index: int
    base: int
    irq: int
    size: int = VIRTIO_MMIO_SIZE

    @property
    def cmdline(self) -> str:
        return f"virtio_mmio.device={self.size}@{self.base:#x}:{self.irq}"


class VirtioSlots:
    """The microvm virtio-mmio slot allocator: slot 7 first, down to 0."""

    def __init__(self) -> None:
        self._taken: dict[int, VirtioSlot] = {}

    def allocate(self) -> VirtioSlot:
        for index in range(VIRTIO_MMIO_SLOTS - 1, -1, -1):
            if index not in self._taken:
                slot = VirtioSlot(index, VIRTIO_MMIO_BASE + VIRTIO_MMIO_SIZE * index, VIRTIO_MMIO_FIRST_IRQ + index)
                self._taken[index] = slot
                return slot
        raise ConfigError(f"all {VIRTIO_MMIO_SLOTS} virtio-mmio slots are taken")

    def release(self, slot: VirtioSlot) -> None:
        self._taken.pop(slot.index, None)

    def cmdline_entries(self) -> list[str]:
        """The guest command-line entries, in the order QEMU writes them (highest slot first)."""
        return [self._taken[i].cmdline for i in sorted(self._taken, reverse=True)]


class MicrovmBoard:
    """A KVM VM set up as a microvm board, with ``vcpus`` vCPUs and ``memory_size`` bytes of RAM.

    Owns every KVM fd and the guest RAM; ``close()`` frees them (idempotent).
    """

    def __init__(self, memory_size: int, vcpus: int, cpu=None, *, pit: bool = True) -> None:
        self.pit = pit  # QEMU's -machine pit=off leaves the in-kernel PIT out
        self.cpu = cpu  # a cpu.models.CpuSpec, or None: all KVM supports, as KVM reports it
        self.dropped_features: list[str] = []
        self.kvm: Kvm | None = None
        self.vm = None
        self.memory: GuestMemory | None = None
        self.vcpus: list = []
        self.kvm_stats: list[KvmStats] = []
        self.virtio_slots = VirtioSlots()
        try:
            self._build(memory_size, vcpus)
        except BaseException:
            self.close()
            raise

    def _build(self, memory_size: int, vcpu_count: int) -> None:
        self.kvm = Kvm()
        max_vcpus = self.kvm.check_extension("MAX_VCPUS") or self.kvm.check_extension("NR_VCPUS") or 1
        if vcpu_count > max_vcpus:
            raise ConfigError(f"{vcpu_count} vCPUs asked for; this KVM allows at most {max_vcpus}")
        self.vm = self.kvm.create_vm()
        for setter, addr in ((self.vm.set_tss_addr, TSS_ADDR), (self.vm.set_identity_map_addr, IDENTITY_MAP_ADDR)):
            try:
                setter(addr)
            except OSError:
                pass  # only needed by VMX hosts; others may refuse it
        self.vm.create_irqchip()
        if self.pit:
            self.vm.create_pit2()
        self.memory = GuestMemory(memory_size)
        for slot, region in enumerate(self.memory.regions):
            self.vm.set_user_memory_region(slot, region.start, region.size, self.memory.host_address(region))
        supported = self.kvm.supported_cpuid()
        entries = cpuid_entries(supported)
        if self.cpu is not None:
            from .cpu.models import apply_model

            self.dropped_features = apply_model(entries, self.cpu)
        for index in range(vcpu_count):
            vcpu = self.vm.create_vcpu(index)
            self.vcpus.append(vcpu)
            vcpu.set_cpuid2(cpuid_for(entries, index, vcpu_count))
        if self.kvm.check_extension("BINARY_STATS_FD"):
            self.kvm_stats = [KvmStats.for_vcpu(vcpu) for vcpu in self.vcpus]

    def boot_entry(self, entry32: int, ebx: int, eax: int = 0) -> None:
        """Put vCPU 0 at the guest's 32-bit entry (``boot.pvh_initial_state``;
        Multiboot differs only in EAX)."""
        from .boot import pvh_initial_state

        pvh_initial_state(self.vcpus[0], entry32, ebx, eax)

    def irq_line(self, irq: int, level: bool) -> None:
        """Drive an in-kernel irqchip input (thread-safe; ignored once closed)."""
        if self.vm is not None and not self.vm.closed:
            self.vm.irq_line(irq, level)

    def kvm_counters(self, index: int) -> dict[str, int]:
        """KVM's binary stats of vCPU ``index`` (scalars only), or {} without them."""
        if index >= len(self.kvm_stats) or self.kvm_stats[index].closed:
            return {}
        return {k: v for k, v in self.kvm_stats[index].read().items() if isinstance(v, int)}

    def close(self) -> None:
        for stats in self.kvm_stats:
            stats.close()
        for vcpu in self.vcpus:
            vcpu.close()
        for owner in (self.vm, self.kvm):
            if owner is not None:
                owner.close()
        if self.memory is not None:
            self.memory.close()


CPUID_FIELDS = ("function", "index", "flags", "eax", "ebx", "ecx", "edx")


def cpuid_entries(supported) -> list[dict]:
    """KVM's ``struct kvm_cpuid2`` as plain dicts (what ``cpu.models`` edits)."""
    return [{name: getattr(supported.entries[i], name) for name in CPUID_FIELDS} for i in range(supported.nent)]


def cpuid_for(entries: list[dict], index: int, count: int):
    """The CPUID entries with vCPU ``index``'s APIC ID filled in, as a ``struct kvm_cpuid2``."""
    n = len(entries)
    cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": n, "entries": n})
    cpuid.nent = n
    for i in range(n):
        src, dst = entries[i], cpuid.entries[i]
        for field in CPUID_FIELDS:
            setattr(dst, field, src[field])
        if dst.function == 1:
            # EBX[31:24] initial APIC ID, EBX[23:16] logical processors per package.
            dst.ebx = (dst.ebx & 0x0000FFFF) | (index << 24) | (min(count, 255) << 16)
            if count > 1:
                dst.edx |= 1 << 28  # HTT: the count field above is valid
        elif dst.function in (0xB, 0x1F):
            dst.edx = index  # x2APIC ID
        elif dst.function == 0x80000001 and count > 1 and not _intel(entries):
            dst.ecx |= 1 << 1  # CmpLegacy, as QEMU sets it for several vCPUs on a non-Intel vendor
    return cpuid


def _intel(entries: list[dict]) -> bool:
    leaf0 = next((e for e in entries if e["function"] == 0), None)
    return leaf0 is not None and leaf0["ebx"] == int.from_bytes(b"Genu", "little")
