"""CPU models as edits of the host-supported CPUID (pure logic; the KVM side
is checked by tests/kvm/test_multiboot_guest.py and the kvm-unit-tests run)."""

from __future__ import annotations

import pytest

from aiokvm.cpu.models import FEATURES, apply_model, parse_cpu
from aiokvm.errors import ConfigError


def bit(name: str) -> tuple[int, int, str, int]:
    return FEATURES[name]


def host_entries(*names: str) -> list[dict]:
    """A host CPUID with the named features (and the leaves a model edits)."""
    entries = {key: {"function": key[0], "index": key[1], "flags": 0, "eax": 0, "ebx": 0, "ecx": 0, "edx": 0}
               for key in ((0, 0), (1, 0), (7, 0), (0x80000000, 0), (0x80000001, 0), (0x80000002, 0),
                           (0x80000003, 0), (0x80000004, 0), (0x80000008, 0))}
    entries[(0, 0)].update(eax=0x1F, ebx=int.from_bytes(b"Genu", "little"), edx=int.from_bytes(b"ineI", "little"),
                           ecx=int.from_bytes(b"ntel", "little"))
    entries[(0x80000000, 0)]["eax"] = 0x80000008
    entries[(1, 0)]["eax"] = 0x50654
    for name in names:
        function, index, reg, b = bit(name)
        entries[(function, index)][reg] |= 1 << b
    return list(entries.values())


def has(entries: list[dict], name: str) -> bool:
    function, index, reg, b = bit(name)
    return any(e["function"] == function and e["index"] == index and e[reg] >> b & 1 for e in entries)


def vendor(entries: list[dict]) -> bytes:
    e = next(e for e in entries if e["function"] == 0)
    return b"".join(e[r].to_bytes(4, "little") for r in ("ebx", "edx", "ecx"))


QEMU64_BASE = ("fpu", "de", "pse", "tsc", "msr", "pae", "mce", "cx8", "apic", "sep", "pge", "cmov", "pat", "fxsr",
               "mmx", "mtrr", "clflush", "mca", "pse36", "lahf-lm")
HOST = (*QEMU64_BASE, "sse", "sse2", "pni", "cx16", "x2apic", "tsc-deadline", "pcid", "invpcid", "smep", "smap", "umip",
        "pku", "avx2", "lm", "nx", "syscall", "rdtscp", "vmx", "xsave")


def test_qemu64_is_qemus_feature_set_on_this_host():
    entries = host_entries(*HOST)
    dropped = apply_model(entries, parse_cpu("qemu64"))
    assert dropped == []  # the host has every qemu64 feature
    for name in ("sse2", "pni", "cx16", "x2apic", "hypervisor", "lm", "nx", "syscall"):
        assert has(entries, name), name
    for name in ("pcid", "invpcid", "smep", "smap", "umip", "pku", "avx2", "rdtscp", "vmx", "tsc-deadline", "xsave"):
        assert not has(entries, name), name
    assert vendor(entries) == b"GenuineIntel"  # QEMU under KVM: the host's vendor, whatever the model
    leaf1 = next(e for e in entries if e["function"] == 1)
    assert (leaf1["eax"] >> 8 & 0xF, leaf1["eax"] >> 4 & 0xF, leaf1["eax"] >> 16 & 0xF) == (15, 0xB, 6)  # model 107
    assert next(e for e in entries if e["function"] == 0)["eax"] == 0xD


def test_plus_minus_and_properties_like_unittests_cfg():
    entries = host_entries(*HOST)
    apply_model(entries, parse_cpu("qemu64,+x2apic,+tsc-deadline,-lm,vendor=AuthenticAMD"))
    assert has(entries, "tsc-deadline") and has(entries, "x2apic") and not has(entries, "lm")
    assert vendor(entries) == b"AuthenticAMD"
    entries = host_entries(*HOST)
    apply_model(entries, parse_cpu("qemu64,-x2apic,+pcid,invpcid=on"))
    assert not has(entries, "x2apic") and has(entries, "pcid") and has(entries, "invpcid")


def test_host_and_max_keep_everything_and_drop_on_request():
    entries = host_entries(*HOST)
    apply_model(entries, parse_cpu("max,-pku,host-phys-bits"))
    assert all(has(entries, n) for n in HOST if n != "pku") and not has(entries, "pku")
    assert has(entries, "hypervisor") and vendor(entries) == b"GenuineIntel"


def test_features_the_host_lacks_are_dropped_not_faked():
    entries = host_entries("fpu", "lm")
    dropped = apply_model(entries, parse_cpu("qemu64,+la57,+umip"))
    assert {"la57", "umip", "pni", "cx16"} <= set(dropped)
    assert not has(entries, "la57") and not has(entries, "pni")


@pytest.mark.parametrize(("spec", "message"), [
    ("Skylake-Server", "unknown CPU model 'Skylake-Server'"),
    ("qemu64,+warp-drive", "unknown CPU feature 'warp-drive'"),
    ("qemu64,vendor=Intel", "vendor must be 12 characters"),
    ("host,hv_passthrough", "Hyper-V enlightenments"),
    ("qemu64,frobnicate=7", "unknown property 'frobnicate'"),
])
def test_bad_cpu_specs_are_one_line_errors(spec, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_cpu(spec)
    assert "\n" not in str(info.value)


def test_feature_names_accept_qemus_spellings():
    assert parse_cpu("qemu64,+tsc_deadline,+sse4_2,+sse3").add == ["tsc-deadline", "sse4.2", "pni"]


def test_a_named_model_is_its_list_and_nothing_else():
    entries = host_entries(*HOST)
    for e in entries:  # host bits with no name here, and leaves a named model leaves empty
        if e["function"] in (1, 7, 0x80000001):
            e["ecx"] |= 1 << 30 if e["function"] == 7 else 0
            e["edx"] |= 1 << 10 if e["function"] == 7 else 0
    entries.append({"function": 0xA, "index": 0, "flags": 0, "eax": 0x07300403, "ebx": 0, "ecx": 0, "edx": 0x603})
    apply_model(entries, parse_cpu("qemu64"))
    leaf7 = next(e for e in entries if e["function"] == 7)
    assert leaf7["ebx"] == leaf7["ecx"] == leaf7["edx"] == leaf7["eax"] == 0  # QEMU's qemu64: no leaf-7 features
    assert next(e for e in entries if e["function"] == 0xA)["eax"] == 0  # no PMU


def test_on_off_properties_apply_in_order_then_plus_then_minus():
    entries = host_entries(*HOST)
    apply_model(entries, parse_cpu("qemu64,x2apic=off,x2apic=on"))
    assert has(entries, "x2apic")  # the last one wins, as QEMU's properties
    entries = host_entries(*HOST)
    apply_model(entries, parse_cpu("qemu64,pcid=on,-pcid,+pcid"))
    assert not has(entries, "pcid")  # -feat wins over everything, as in QEMU
