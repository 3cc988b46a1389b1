"""The command line's NIC syntax:

    --net MAC[,switch=NAME][,port=NAME][,vlan=V][,mtu=N][,mac_filter]    an in-process switch
    --net vde=DIR,mac=MAC[,vlan=V][,mtu=N][,mac_filter]                  a switch in another process

The second joins ``aiokvm switch DIR`` (or a ``vde_switch``) over VDE;
``vlan=V`` asks an aiokvm switch to make the port an untagged member of V.
"""

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
    vde: str | None = None  # DIR of a switch in another process


def parse_net_spec(text: str) -> NetSpec:
    """Parse one ``--net`` value; ``ConfigError`` with the fix for anything wrong."""
    from ..devices.virtio.net import MAX_MTU, MIN_MTU, format_mac, parse_mac

    fields = text.split(",")
    vde = fields[0].startswith("vde=")
    options: dict = {}
    if vde:
        options["vde"] = fields[0][4:]
        if not options["vde"]:
            raise ConfigError(f"--net {text}: vde= needs the switch's directory")
        macs = [f[4:] for f in fields[1:] if f.startswith("mac=")]
        if len(macs) != 1:
            raise ConfigError(f"--net {text}: give one mac= (vde=DIR,mac=MAC[,vlan=V][,mtu=N][,mac_filter])")
        mac = format_mac(parse_mac(macs[0].strip()))
        fields = [f for f in fields if not f.startswith("mac=")]
    else:
        mac = format_mac(parse_mac(fields[0].strip()))
    for field in fields[1:]:
        key, _, value = field.partition("=")
        key = key.strip()
        if key in options:
            raise ConfigError(f"--net {text}: {key} given twice")
        if key in ("switch", "port") and vde:
            raise ConfigError(f"--net {text}: {key}= is for in-process switches; a vde= NIC joins DIR's switch")
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
                              "(use MAC[,switch=NAME][,port=NAME][,vlan=V][,mtu=N][,mac_filter] or "
                              "vde=DIR,mac=MAC[,vlan=V][,mtu=N][,mac_filter])")
    return NetSpec(mac, **options)
