"""``FdOwner``: the one way a KVM wrapper owns its file descriptor."""

from __future__ import annotations

import os


class FdOwner:
    """Owns ``self.fd``: ``close()`` is idempotent, ``with`` closes, and so
    does garbage collection as a last resort (never leak a KVM fd).

    A subclass with more to release (an mmap) overrides ``_release()``,
    which runs once, before the fd is closed.
    """

    fd: int = -1

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def _release(self) -> None:
        pass

    def close(self) -> None:
        if self.fd < 0:
            return
        self._release()
        fd, self.fd = self.fd, -1
        os.close(fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
