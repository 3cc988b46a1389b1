"""CPU models: what CPUID a guest sees (``--cpu MODEL[,+feat][,-feat][,prop=value]``).

KVM reports what it can virtualize on this host (``KVM_GET_SUPPORTED_CPUID``);
a model is a view of that.  ``host`` and ``max`` give all of it (under KVM,
QEMU's ``max`` is ``host``).  ``qemu64``, ``kvm64`` and ``Opteron_G1`` give QEMU's fixed
feature sets (QEMU 7.2 ``target/i386/cpu.c``) with the KVM defaults QEMU
adds (x2apic on, the hypervisor bit), their family and brand string, and,
as QEMU does under KVM, the host's vendor.
``+feat`` adds a feature, ``-feat`` removes one; as QEMU does without
``enforce``, a feature the host cannot give is dropped with a warning, never
faked.  ``vendor=`` sets the vendor string; ``phys-bits``/``host-phys-bits``
and ``migratable`` are accepted (the host's physical address width is always
what the guest sees).  Anything else is a one-line ``ConfigError``.

Pure logic: it edits a list of CPUID entries (dicts), no KVM calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError

EAX, EBX, ECX, EDX = "eax", "ebx", "ecx", "edx"

# name -> (function, index, register, bit); QEMU's names ("_" and "-" alike).
FEATURES: dict[str, tuple[int, int, str, int]] = {}


def _table(function: int, index: int, register: str, names: dict[int, str]) -> None:
    for bit, name in names.items():
        FEATURES[name] = (function, index, register, bit)


_table(1, 0, EDX, {0: "fpu", 1: "vme", 2: "de", 3: "pse", 4: "tsc", 5: "msr", 6: "pae", 7: "mce", 8: "cx8",
                   9: "apic", 11: "sep", 12: "mtrr", 13: "pge", 14: "mca", 15: "cmov", 16: "pat", 17: "pse36",
                   19: "clflush", 21: "ds", 22: "acpi", 23: "mmx", 24: "fxsr", 25: "sse", 26: "sse2", 27: "ss",
                   28: "ht"})
_table(1, 0, ECX, {0: "pni", 1: "pclmulqdq", 3: "monitor", 5: "vmx", 9: "ssse3", 12: "fma", 13: "cx16",
                   15: "pdcm", 17: "pcid", 19: "sse4.1", 20: "sse4.2", 21: "x2apic", 22: "movbe", 23: "popcnt",
                   24: "tsc-deadline", 25: "aes", 26: "xsave", 28: "avx", 29: "f16c", 30: "rdrand",
                   31: "hypervisor"})
_table(7, 0, EBX, {0: "fsgsbase", 1: "tsc-adjust", 3: "bmi1", 4: "hle", 5: "avx2", 7: "smep", 8: "bmi2",
                   9: "erms", 10: "invpcid", 11: "rtm", 14: "mpx", 16: "avx512f", 18: "rdseed", 19: "adx",
                   20: "smap", 23: "clflushopt", 24: "clwb", 29: "sha-ni"})
_table(7, 0, ECX, {2: "umip", 3: "pku", 16: "la57", 22: "rdpid"})
_table(7, 0, EDX, {26: "spec-ctrl", 29: "arch-capabilities"})
_table(0x80000001, 0, EDX, {11: "syscall", 20: "nx", 26: "pdpe1gb", 27: "rdtscp", 29: "lm"})
_table(0x80000001, 0, ECX, {0: "lahf-lm", 1: "cmp-legacy", 2: "svm", 3: "extapic", 4: "cr8legacy", 5: "abm",
                            6: "sse4a", 7: "misalignsse", 8: "3dnowprefetch", 9: "osvw", 10: "ibs", 11: "xop",
                            12: "skinit", 13: "wdt", 15: "lwp", 16: "fma4", 17: "tce", 19: "nodeid-msr", 21: "tbm",
                            22: "topoext", 23: "perfctr-core", 24: "perfctr-nb"})
# SVM's own features (QEMU names them like CPU features: -cpu max,+svm,-npt).
_table(0x8000000A, 0, EDX, {0: "npt", 1: "lbrv", 2: "svm-lock", 3: "nrip-save", 4: "tsc-scale", 5: "vmcb-clean",
                            6: "flushbyasid", 7: "decodeassists", 10: "pause-filter", 12: "pfthreshold",
                            13: "avic", 15: "v-vmsave-vmload", 16: "vgif"})
# The registers that hold feature bits (leaf 1, leaf 7, the extended leaf, SVM's).
FEATURE_REGISTERS = sorted({(function, index, reg) for function, index, reg, _bit in FEATURES.values()})
ALIASES = {"sse3": "pni", "sse4_1": "sse4.1", "sse4_2": "sse4.2", "lahf_lm": "lahf-lm", "tsc_deadline": "tsc-deadline",
           "tsc_adjust": "tsc-adjust", "sha_ni": "sha-ni", "i64": "lm", "xd": "nx"}

# QEMU's PPRO_FEATURES, the base of qemu64/kvm64's leaf-1 EDX.
_PPRO = ("fpu", "de", "pse", "tsc", "msr", "pae", "mce", "cx8", "apic", "sep", "pge", "cmov", "pat", "fxsr", "mmx",
         "sse", "sse2")
# What QEMU adds under KVM to every named model (kvm_default_props, and the hypervisor bit).
_KVM_DEFAULTS = ("x2apic", "hypervisor")


@dataclass(frozen=True)
class Model:
    name: str
    vendor: str | None  # None: the host's
    family_model_stepping: tuple[int, int, int] | None
    features: tuple[str, ...] | None  # None: everything KVM supports
    level: int | None = None  # highest basic leaf
    xlevel: int | None = None  # highest extended leaf
    brand: str | None = None


MODELS = {
    "host": Model("host", None, None, None),
    "max": Model("max", None, None, None),
    # Under KVM QEMU gives every named model the host's vendor (so that SYSCALL and
    # SYSENTER behave as the host CPU runs them); vendor= overrides it.
    "qemu64": Model("qemu64", None, (15, 107, 1),
                    (*_PPRO, "mtrr", "clflush", "mca", "pse36", "pni", "cx16", "lm", "syscall", "nx", "lahf-lm",
                     *_KVM_DEFAULTS),
                    level=0xD, xlevel=0x8000000A, brand="QEMU Virtual CPU version 2.5+"),
    "kvm64": Model("kvm64", None, (15, 6, 1),
                   (*_PPRO, "mtrr", "clflush", "mca", "pse36", "pni", "cx16", "lm", "syscall", "nx",
                    *_KVM_DEFAULTS),
                   level=0xD, xlevel=0x80000008, brand="Common KVM processor"),
    "Opteron_G1": Model("Opteron_G1", None, (15, 6, 1),
                        ("vme", *_PPRO, "mtrr", "clflush", "mca", "pse36", "pni", "lm", "nx", "syscall",
                         *_KVM_DEFAULTS),
                        level=5, xlevel=0x80000008, brand="AMD Opteron 240 (Gen 1 Class Opteron)"),
}
# On an AMD-vendor CPU QEMU mirrors these leaf-1 EDX bits into 0x80000001 EDX (CPUID_EXT2_AMD_ALIASES).
AMD_ALIASES = 0x0183F3FF
IGNORED_PROPERTIES = ("host-phys-bits", "phys-bits", "migratable", "check", "l3-cache", "pmu")


@dataclass
class CpuSpec:
    """A parsed ``--cpu`` value."""

    model: Model
    add: list[str] = field(default_factory=list)  # +feat
    remove: list[str] = field(default_factory=list)  # -feat
    props: list[tuple[str, bool]] = field(default_factory=list)  # feat=on|off, in order (the last one wins)
    vendor: str | None = None
    text: str = ""


def _feature(name: str, spec: str) -> str:
    name = ALIASES.get(name, name)
    if name not in FEATURES:
        name = name.replace("_", "-")
    if name not in FEATURES:
        raise ConfigError(f"--cpu {spec}: unknown CPU feature {name!r}; aiokvm knows these: "
                          f"{', '.join(sorted(FEATURES))}")
    return name


def parse_cpu(spec: str) -> CpuSpec:
    """``MODEL[,+feat|-feat|feat=on|off|prop=value]...`` as QEMU's ``-cpu``."""
    parts = [p.strip() for p in spec.split(",")]
    model = MODELS.get(parts[0])
    if model is None:
        raise ConfigError(f"unknown CPU model {parts[0]!r}; choose one of {', '.join(MODELS)}")
    parsed = CpuSpec(model, text=spec)
    for part in parts[1:]:
        if not part:
            continue
        if part[0] in "+-":
            name = _feature(part[1:], spec)
            (parsed.add if part[0] == "+" else parsed.remove).append(name)
            continue
        key, _, value = part.partition("=")
        if key == "vendor":
            if len(value.encode()) != 12:
                raise ConfigError(f"--cpu {spec}: vendor must be 12 characters, like GenuineIntel")
            parsed.vendor = value
        elif key in IGNORED_PROPERTIES or key.startswith("hv_") or key.startswith("hv-"):
            if key.startswith("hv"):
                raise ConfigError(f"--cpu {spec}: Hyper-V enlightenments ({key}) are not offered by aiokvm")
        elif value in ("on", "off", "true", "false", "yes", "no") or not value:
            parsed.props.append((_feature(key, spec), value in ("on", "true", "yes", "")))
        else:
            raise ConfigError(f"--cpu {spec}: unknown property {key!r}")
    return parsed


def _vendor_regs(vendor: str) -> tuple[int, int, int]:
    raw = vendor.encode()
    return (int.from_bytes(raw[0:4], "little"), int.from_bytes(raw[4:8], "little"),
            int.from_bytes(raw[8:12], "little"))  # EBX, EDX, ECX


def apply_model(entries: list[dict], spec: CpuSpec) -> list[str]:
    """Edit the host-supported CPUID ``entries`` (dicts with function, index,
    eax..edx) into what ``spec`` describes.  Returns the features asked for
    that the host cannot give (dropped, as QEMU warns and drops them)."""
    supported = {(e["function"], e["index"]): dict(e) for e in entries}

    def entry(function: int, index: int = 0) -> dict | None:
        for e in entries:
            if e["function"] == function and e["index"] == index:
                return e
        return None

    def host_has(name: str) -> bool:
        function, index, reg, bit = FEATURES[name]
        e = supported.get((function, index))
        return e is not None and bool(e[reg] >> bit & 1)

    model = spec.model
    wanted = {name for name in FEATURES if host_has(name)} if model.features is None else set(model.features)
    wanted.add("hypervisor")  # QEMU sets it under KVM, whatever the model
    # QEMU's order: feat=on|off as written (the last wins), then every +feat, then every -feat.
    for name, on in spec.props:
        (wanted.add if on else wanted.discard)(name)
    wanted |= set(spec.add)
    wanted -= set(spec.remove)
    dropped = sorted(name for name in wanted if not host_has(name) and name != "hypervisor")
    wanted -= set(dropped)
    if model.features is not None:
        # A named model is its feature list and nothing else, as QEMU's: every
        # feature register starts empty (bits this table has no name for too),
        # and so do the leaves it gives no features in (the PMU's, leaf 7's
        # subleaf count, the power-management leaf).
        for function, index, reg in FEATURE_REGISTERS:
            if (e := entry(function, index)) is not None:
                e[reg] = 0
        for e in entries:
            if e["function"] in (7, 0xA, 0x80000007) or (e["function"] == 0x80000008 and "ebx" in e):
                for reg in ((EBX,) if e["function"] == 0x80000008 else (EAX, EBX, ECX, EDX)):
                    e[reg] = 0
    for name, (function, index, reg, bit) in FEATURES.items():  # every named bit: on if wanted, else off
        if (e := entry(function, index)) is not None:
            e[reg] = e[reg] | 1 << bit if name in wanted else e[reg] & ~(1 << bit)
    vendor = spec.vendor or model.vendor
    if model.level is not None and (e := entry(0)) is not None:
        e["eax"] = min(e["eax"], model.level)
    if vendor is not None:
        ebx, edx, ecx = _vendor_regs(vendor)
        for function in (0, 0x80000000):
            if (e := entry(function)) is not None:
                e.update(ebx=ebx, edx=edx, ecx=ecx)
    if model.features is not None and (vendor or "") == "AuthenticAMD":
        leaf1, ext = entry(1), entry(0x80000001)
        if leaf1 is not None and ext is not None:
            ext["edx"] |= leaf1["edx"] & AMD_ALIASES
    if model.xlevel is not None and (e := entry(0x80000000)) is not None:
        e["eax"] = min(e["eax"], model.xlevel)
    if model.family_model_stepping is not None and (e := entry(1)) is not None:
        e["eax"] = _signature(*model.family_model_stepping)
    if model.brand is not None:
        raw = model.brand.encode().ljust(48, b"\0")
        for i, function in enumerate((0x80000002, 0x80000003, 0x80000004)):
            if (e := entry(function)) is not None:
                chunk = raw[16 * i:16 * i + 16]
                e.update(eax=int.from_bytes(chunk[0:4], "little"), ebx=int.from_bytes(chunk[4:8], "little"),
                         ecx=int.from_bytes(chunk[8:12], "little"), edx=int.from_bytes(chunk[12:16], "little"))
    # Leaves past the model's limits are not removed: a guest reads only up to the limits.
    return dropped


def _signature(family: int, model: int, stepping: int) -> int:
    """CPUID.1:EAX for a family/model/stepping (extended fields as Intel and AMD define them)."""
    base_family = min(family, 0xF)
    ext_family = family - 0xF if family > 0xF else 0
    return (ext_family << 20) | ((model >> 4) << 16) | (base_family << 8) | ((model & 0xF) << 4) | stepping
