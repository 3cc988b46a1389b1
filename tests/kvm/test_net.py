"""virtio-net NICs on machines, through the switch (guest-driven tests come with the guest kit's driver)."""

from __future__ import annotations

import pytest

from aiokvm import ConfigError, Machine
from aiokvm.net import Switch

pytestmark = pytest.mark.kvm


async def test_add_nic_puts_a_virtio_net_device_on_a_switch_port_named_after_the_vm():
    async with Switch("br0", vlan_filtering=True) as sw:
        async with Machine(name="a") as a, Machine(name="b") as b:
            nic_a = a.add_nic(sw, "02:00:00:00:00:0a")
            b.add_nic(sw, "02:00:00:00:00:0b", port="b0", vlan=10)
            a.load("hello")
            assert "virtio_mmio.device=512@0xfeb00e00:12" in a.cmdline
            assert set(sw.ports) == {"a", "b0"}
            assert a.stats()["devices"]["net-a"]["kind"] == "virtio-net"
            assert nic_a.mac == bytes.fromhex("02000000000a")
            with pytest.raises(ConfigError, match="already has a port named 'a'"):
                b.add_nic(sw, "02:00:00:00:00:0c", port="a")
            assert len(b.devices.virtio) == 1  # the refused NIC took no slot
        assert sw.ports == {}  # both machines closed: their ports went with them
