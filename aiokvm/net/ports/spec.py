"""Port specs, as the command line and ``Switch.open_port`` take them.

``KIND:WHERE[,key=value...]``, with ``name=PORT`` and ``vlan=V`` for every kind:

    tap:IFNAME[,netns=NS]
    stream:unix:PATH[,server][,reconnect=S]       QEMU -netdev stream (socket)
    stream:tcp:HOST:PORT[,server][,reconnect=S]
    dgram:unix:LOCAL,remote=PATH                  QEMU -netdev dgram
    dgram:udp:HOST:PORT,remote=HOST:PORT
    vxlan:VNI[,local=IP[:PORT]],remote=IP[,remote=IP...][,dst_port=N][,netns=NS]
    vde:DIR                                       join a vde_switch (or an aiokvm switch)

Adding a kind means its module, and one line in ``KINDS``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...errors import ConfigError
from .base import SwitchPort

USAGE = ("tap:IFNAME[,netns=NS] | stream:unix:PATH[,server] | stream:tcp:HOST:PORT[,server] | "
         "dgram:unix:LOCAL,remote=PATH | dgram:udp:HOST:PORT,remote=HOST:PORT | "
         "vxlan:VNI,local=IP[:PORT],remote=IP | vde:DIR  (plus ,name=PORT ,vlan=V)")


@dataclass
class PortSpec:
    kind: str
    where: str
    options: dict[str, list[str]] = field(default_factory=dict)
    name: str | None = None
    vlan: int | None = None
    text: str = ""

    def take(self, key: str, default: str | None = None) -> str | None:
        values = self.options.pop(key, None)
        if values is None:
            return default
        if len(values) > 1:
            raise ConfigError(f"port {self.text}: {key}= given twice")
        return values[0]

    def take_all(self, key: str) -> list[str]:
        return self.options.pop(key, [])

    def flag(self, key: str) -> bool:
        values = self.options.pop(key, None)
        if values is None:
            return False
        if values != [""]:
            raise ConfigError(f"port {self.text}: {key} takes no value")
        return True

    def done(self) -> None:
        if self.options:
            raise ConfigError(f"port {self.text}: unknown option {sorted(self.options)[0]!r} for {self.kind}")

    def error(self, why: str) -> ConfigError:
        return ConfigError(f"port {self.text}: {why}")


def host_port(spec: PortSpec, text: str, *, default_port: int | None = None) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        if default_port is None:
            raise spec.error(f"{text!r} needs HOST:PORT")
        host, port = text, str(default_port)
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise spec.error(f"{text!r} is not HOST:PORT with a port in 0-65535")
    return host, int(port)


def parse_port_spec(text: str) -> PortSpec:
    kind, sep, rest = text.partition(":")
    if not sep or kind not in KINDS:
        raise ConfigError(f"port {text!r}: give one of {USAGE}")
    where, *fields = rest.split(",")
    spec = PortSpec(kind, where, text=text)
    for item in fields:
        key, _, value = item.partition("=")
        spec.options.setdefault(key.strip(), []).append(value)
    name = spec.take("name")
    if name is not None and (not name or any(c in name for c in " /,")):
        raise spec.error("name= needs a port name without spaces, commas or slashes")
    spec.name = name
    vlan = spec.take("vlan")
    if vlan is not None:
        if not vlan.isdigit() or not 1 <= int(vlan) <= 4094:
            raise spec.error("vlan= must be a VLAN id in 1-4094")
        spec.vlan = int(vlan)
    if not where:
        raise spec.error(f"nothing after {kind}: ({USAGE})")
    return spec


def _tap(spec: PortSpec) -> SwitchPort:
    from .tap import TapPort

    return TapPort(spec.where, name=spec.name, netns=spec.take("netns"))


def _stream(spec: PortSpec) -> SwitchPort:
    from .stream import RECONNECT_S, StreamPort

    family, _, address = spec.where.partition(":")
    server = spec.flag("server")
    reconnect = spec.take("reconnect")
    try:
        reconnect_s = float(reconnect) if reconnect is not None else RECONNECT_S
    except ValueError:
        raise spec.error("reconnect= takes seconds") from None
    if family == "unix" and address:
        return StreamPort(address, server=server, name=spec.name, reconnect_s=reconnect_s)
    if family == "tcp":
        return StreamPort(host_port(spec, address), server=server, name=spec.name, reconnect_s=reconnect_s)
    raise spec.error("give stream:unix:PATH or stream:tcp:HOST:PORT")


def _dgram(spec: PortSpec) -> SwitchPort:
    from .dgram import DgramPort

    family, _, address = spec.where.partition(":")
    remote = spec.take("remote")
    if remote is None:
        raise spec.error("dgram needs remote= (where frames go)")
    if family == "unix" and address:
        return DgramPort(address, remote, name=spec.name)
    if family == "udp":
        return DgramPort(host_port(spec, address), host_port(spec, remote), name=spec.name)
    raise spec.error("give dgram:unix:LOCAL,remote=PATH or dgram:udp:HOST:PORT,remote=HOST:PORT")


def _vxlan(spec: PortSpec) -> SwitchPort:
    from .vxlan import VXLAN_PORT, VxlanPort

    if not spec.where.isdigit():
        raise spec.error("vxlan:VNI needs a number")
    local = host_port(spec, spec.take("local", "0.0.0.0"), default_port=VXLAN_PORT)
    dst_port = spec.take("dst_port")
    if dst_port is not None and (not dst_port.isdigit() or not 1 <= int(dst_port) <= 65535):
        raise spec.error("dst_port= must be a UDP port")
    remotes = spec.take_all("remote")
    if not remotes or not all(remotes):
        raise spec.error("vxlan needs at least one remote=IP (where unknown destinations are flooded)")
    return VxlanPort(int(spec.where), local=local, remotes=remotes, name=spec.name,
                     dst_port=int(dst_port) if dst_port else None, netns=spec.take("netns"))


def _vde(spec: PortSpec) -> SwitchPort:
    from .vde import VdePort

    return VdePort(spec.where, name=spec.name)


KINDS = {"tap": _tap, "stream": _stream, "dgram": _dgram, "vxlan": _vxlan, "vde": _vde}


def port_from_spec(text: str) -> tuple[SwitchPort, PortSpec]:
    """An unopened port for ``text`` and its parsed spec; ``ConfigError`` for anything wrong."""
    spec = parse_port_spec(text)
    port = KINDS[spec.kind](spec)
    spec.done()
    return port, spec
