"""Network namespaces that a test creates and removes, and commands run inside them.

Only loopback and addresses inside these namespaces are ever used.  IPv6 is
off in them so the kernel sends nothing of its own (router solicitations,
DAD) into a capture or a guest.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess

_ids = itertools.count()


def run(*cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=timeout)


def in_ns(ns: str, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    return run("ip", "netns", "exec", ns, *cmd, check=check, timeout=timeout)


@contextlib.contextmanager
def netns(tag: str = "t"):
    """A fresh namespace ``aiokvm-TAG-PID-N`` with lo up and IPv6 off; deleted afterwards."""
    name = f"aiokvm-{tag}-{os.getpid()}-{next(_ids)}"
    run("ip", "netns", "add", name)
    try:
        in_ns(name, "ip", "link", "set", "lo", "up")
        for key in ("all", "default"):
            in_ns(name, "sysctl", "-qw", f"net.ipv6.conf.{key}.disable_ipv6=1")
        yield name
    finally:
        run("ip", "netns", "del", name, check=False)
