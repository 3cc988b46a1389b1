"""Shared test configuration.

- Every async test runs on both uvloop and the stdlib loop
  (``pytest_asyncio_loop_factories``); a test can narrow that with
  ``@pytest.mark.asyncio(loop_factories=["uvloop"])``.
- ``kvm`` / ``qemu`` / ``root`` markers skip cleanly where the host lacks the
  thing; CI runs as root with /dev/kvm and QEMU installed, so there they run.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil

import pytest
import structlog
import uvloop


def _drop_below_warning(logger, method: str, event: dict) -> dict:
    if getattr(logging, method.upper(), logging.WARNING) < logging.WARNING:
        raise structlog.DropEvent
    return event


# The library never configures structlog (the CLI does); the tests keep the
# lifecycle events out of the output.  A processor, not a filtering wrapper,
# so that structlog.testing.capture_logs() still sees every level.
structlog.configure(processors=[_drop_below_warning, *structlog.get_config()["processors"]])


def pytest_asyncio_loop_factories(config, item):
    return {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}


def kvm_available() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


QEMU = shutil.which("qemu-system-x86_64")


def pytest_collection_modifyitems(config, items):
    skip_kvm = pytest.mark.skip(reason="/dev/kvm is not available")
    skip_qemu = pytest.mark.skip(reason="qemu-system-x86_64 is not installed (.ci/run installs it)")
    skip_root = pytest.mark.skip(reason="needs root")
    for item in items:
        if "kvm" in item.keywords and not kvm_available():
            item.add_marker(skip_kvm)
        if "qemu" in item.keywords and QEMU is None:
            item.add_marker(skip_qemu)
        if "root" in item.keywords and os.geteuid() != 0:
            item.add_marker(skip_root)
