"""Doing one thing inside a named network namespace.

A TAP device, and a socket, belong to the namespace of the thread that
created them.  ``setns(2)`` changes only the calling thread, so the work runs
on a fresh thread that enters the namespace, does it, and ends; the loop's
thread never moves.  (``os.setns`` arrives in Python 3.12; ctypes until then.)
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from typing import TypeVar

from ..errors import ConfigError

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"

T = TypeVar("T")


def netns_path(name: str) -> str:
    """``/run/netns/NAME`` for a name made by ``ip netns add``, or a path as given."""
    return name if "/" in name else os.path.join(NETNS_DIR, name)


def run_in_netns(netns: str | None, work: Callable[[], T]) -> T:
    """``work()`` inside namespace ``netns`` (None: right here); its result or its exception."""
    if netns is None:
        return work()
    path = netns_path(netns)
    try:
        ns_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(f"no network namespace {netns!r} ({path} is missing): create it with "
                          f"`ip netns add {netns}`") from None
    except PermissionError:
        raise ConfigError(f"cannot open network namespace {path}: run as root") from None
    outcome: dict = {}

    def thread_body() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(ns_fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            outcome["error"] = ConfigError(f"cannot enter network namespace {netns!r}: {os.strerror(err)}"
                                           " (needs CAP_SYS_ADMIN: run as root)")
            return
        try:
            outcome["result"] = work()
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc

    try:
        thread = threading.Thread(target=thread_body, name=f"netns-{netns}", daemon=True)
        thread.start()
        thread.join()
    finally:
        os.close(ns_fd)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
