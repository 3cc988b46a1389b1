"""The ``--disk`` syntax: ``PATH[,ro][,format=raw|nbd][,if=virtio|ata]``.

- ``PATH`` is a raw image (file or block device) or, for ``format=nbd``, an
  NBD URL (``nbd+unix:///EXPORT?socket=SOCK`` or ``nbd://HOST[:PORT]/EXPORT``).
- The format defaults to ``nbd`` when ``PATH`` starts with an NBD URL scheme
  (``nbd://``, ``nbd+unix://``, ...), else ``raw``.  A file merely named
  ``nbd.img`` stays raw.
- ``ro`` (or ``ro=on``/``ro=off``) opens the disk read-only.
- ``if=`` picks the guest interface: ``virtio`` (default) or ``ata``.
- A comma inside ``PATH`` is written twice (``,,``), as in QEMU.

Options may come in any order; each at most once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from aiokvm.errors import ConfigError

from .base import BlockBackend
from .nbd import NbdBackend, parse_nbd_url
from .raw import RawFileBackend

FORMATS = ("raw", "nbd")
INTERFACES = ("virtio", "ata")
_NBD_SCHEME = re.compile(r"^nbds?(\+unix)?://", re.IGNORECASE)
_ON = {"on": True, "yes": True, "true": True, "1": True, "off": False, "no": False, "false": False, "0": False}
SYNTAX = "PATH[,ro][,format=raw|nbd][,if=virtio|ata]"


@dataclass(frozen=True)
class DiskSpec:
    path_or_url: str
    read_only: bool = False
    format: Literal["raw", "nbd"] = "raw"
    interface: Literal["virtio", "ata"] = "virtio"


def _split(text: str) -> list[str]:
    """Split on single commas; ``,,`` is a literal comma."""
    parts: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == ",":
            if text.startswith(",,", i):
                current.append(",")
                i += 2
                continue
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    parts.append("".join(current))
    return parts


def parse_disk_spec(text: str) -> DiskSpec:
    """Parse one ``--disk`` value.  Anything wrong raises ``ConfigError`` naming the bad part."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"empty disk spec: give {SYNTAX}")
    path, *options = _split(text)
    if not path:
        raise ConfigError(f"disk spec {text!r} has no path: give {SYNTAX}")
    seen: set[str] = set()
    read_only = False
    fmt: str | None = None
    interface = "virtio"
    for option in options:
        key, eq, value = option.partition("=")
        key = key.strip().lower()
        value = value.strip()
        if not key:
            raise ConfigError(f"disk spec {text!r} has an empty option: give {SYNTAX}")
        if key in seen:
            raise ConfigError(f"disk spec {text!r} gives {key!r} twice: keep one")
        seen.add(key)
        if key == "ro":
            if not eq:
                read_only = True
            elif value.lower() in _ON:
                read_only = _ON[value.lower()]
            else:
                raise ConfigError(f"disk spec {text!r}: ro={value!r} is not on or off")
        elif key == "format":
            if value.lower() not in FORMATS:
                raise ConfigError(f"disk spec {text!r}: format={value!r} is unknown; use format=raw or format=nbd")
            fmt = value.lower()
        elif key == "if":
            if value.lower() not in INTERFACES:
                raise ConfigError(f"disk spec {text!r}: if={value!r} is unknown; use if=virtio or if=ata")
            interface = value.lower()
        else:
            raise ConfigError(f"disk spec {text!r}: unknown option {option!r}; give {SYNTAX}")
    looks_nbd = bool(_NBD_SCHEME.match(path))
    if fmt is None:
        fmt = "nbd" if looks_nbd else "raw"
    if fmt == "nbd":
        parse_nbd_url(path)  # reject a bad URL now, not when the machine starts
    elif looks_nbd:
        raise ConfigError(f"disk spec {text!r}: {path!r} is an NBD URL but format=raw; drop format=raw")
    return DiskSpec(path_or_url=path, read_only=read_only, format=fmt, interface=interface)  # type: ignore[arg-type]


async def open_backend(spec: DiskSpec) -> BlockBackend:
    """Open the backend a ``DiskSpec`` describes.  Bad files or servers raise ``ConfigError``."""
    if spec.format == "nbd":
        return await NbdBackend.connect(spec.path_or_url, read_only=spec.read_only)
    if spec.format == "raw":
        return await RawFileBackend.open(spec.path_or_url, read_only=spec.read_only)
    raise ConfigError(f"disk format {spec.format!r} is unknown: use raw or nbd")
