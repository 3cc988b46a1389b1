"""Placeholder until the VDE client lands."""

from __future__ import annotations

from ...errors import ConfigError
from .base import SwitchPort


class VdePort(SwitchPort):
    kind = "vde"

    def __init__(self, directory: str, *, name: str | None = None) -> None:
        raise ConfigError("vde: ports are not built yet")
