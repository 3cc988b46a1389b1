"""The bundled guest kit: ELF files built from ``guest/`` at install time."""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError

GUEST_DIR = Path(__file__).resolve().parent


def names() -> list[str]:
    """Names of the bundled guests (``hello``, ``smp``, ``exitloop``, ...)."""
    return sorted(p.stem for p in GUEST_DIR.glob("*.elf"))


def path(name: str) -> Path:
    candidate = GUEST_DIR / f"{name}.elf"
    if not candidate.is_file():
        available = ", ".join(names()) or "none (reinstall aiokvm: the guest kit is built by `pip install`)"
        raise ConfigError(f"no bundled guest named {name!r}; bundled guests: {available}")
    return candidate


def resolve(guest: str | Path) -> Path:
    """A path to an existing file, or the name of a bundled guest."""
    candidate = Path(guest)
    if candidate.exists() or "/" in str(guest) or str(guest).endswith(".elf"):
        return candidate
    return path(str(guest))
