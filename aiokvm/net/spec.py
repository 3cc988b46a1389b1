"""The command line's NIC syntax: ``--net MAC[,switch=NAME][,port=NAME][,vlan=V][,mtu=N][,mac_filter]``."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError

DEFAULT_SWITCH = "br0"


@dataclass(frozen=True)
class NetSpec:
    mac: str
    switch: str = DEFAULT_SWITCH
    port: str | None = None
    vlan: int | None = None
    mtu: int = 1500
    mac_filter: bool = False


def parse_net_spec(text: str) -> NetSpec:
    """Parse one ``--net`` value; ``ConfigError`` with the fix for anything wrong."""
    from ..devices.virtio.net import MAX_MTU, MIN_MTU, format_mac, parse_mac

    fields = text.split(",")
    mac = format_mac(parse_mac(fields[0].strip()))
    options: dict = {}
    for field in fields[1:]:
        key, _, value = field.partition("=")
        key = key.strip()
        if key in options:
            raise ConfigError(f"--net {text}: {key} given twice")
        if key in ("switch", "port"):
            if not value or any(c in value for c in " ,/"):
                raise ConfigError(f"--net {text}: {key}= needs a name without spaces, commas or slashes")
            options[key] = value
        elif key == "vlan":
            if not value.isdigit() or not 1 <= int(value) <= 4094:
                raise ConfigError(f"--net {text}: vlan= must be a VLAN id in 1-4094")
            options[key] = int(value)
        elif key == "mtu":
            if not value.isdigit() or not MIN_MTU <= int(value) <= MAX_MTU:
                raise ConfigError(f"--net {text}: mtu= must be in [{MIN_MTU}, {MAX_MTU}]")
            options[key] = int(value)
        elif key == "mac_filter" and not value:
            options[key] = True
        else:
            raise ConfigError(f"--net {text}: unknown option {field!r} "
                              "(use MAC[,switch=NAME][,port=NAME][,vlan=V][,mtu=N][,mac_filter])")
    return NetSpec(mac, **options)
