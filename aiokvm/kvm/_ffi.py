"""Load the compiled cffi module, with a clear error if it was never built."""

from __future__ import annotations

import errno

from ..errors import ConfigError, KvmError

try:
    from ._kvm import ffi, lib
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ConfigError(
        "aiokvm's KVM binding is not built: reinstall with `pip install .` "
        "(gcc and linux headers needed), or run `python aiokvm/kvm/_build.py` in a source tree"
    ) from exc

__all__ = ["ffi", "lib", "check", "ioctl", "ioctl_int"]


def check(rc: int, what: str, hint: str = "") -> int:
    """Turn a helper's ``-errno`` return into a ``KvmError``."""
    if rc < 0:
        raise KvmError(-rc, what, hint)
    return rc


def ioctl(fd: int, request: int, arg, what: str, hint: str = "") -> int:
    return check(lib.aiokvm_ioctl(fd, request, arg), what, hint)


def ioctl_int(fd: int, request: int, arg: int, what: str, hint: str = "") -> int:
    return check(lib.aiokvm_ioctl_int(fd, request, arg), what, hint)


EINTR = errno.EINTR
EAGAIN = errno.EAGAIN
