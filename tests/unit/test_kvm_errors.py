"""The KVM binding's errors say what to do."""

from __future__ import annotations

import pytest


def test_missing_dev_kvm_says_what_to_do(tmp_path):
    from aiokvm.errors import KvmUnavailableError
    from aiokvm.kvm import Kvm

    with pytest.raises(KvmUnavailableError, match="modprobe"):
        Kvm(str(tmp_path / "kvm"))


def test_unreadable_dev_kvm_says_join_the_group(monkeypatch):
    from aiokvm.errors import KvmUnavailableError
    from aiokvm.kvm import system

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(system.os, "open", refuse)  # root can open anything; simulate a user
    with pytest.raises(KvmUnavailableError, match="kvm group"):
        system.Kvm()
