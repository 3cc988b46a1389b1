"""Running kvm-unit-tests' x86 guests under aiokvm (``aiokvm kut``).

``config.py`` reads the suite's ``x86/unittests.cfg`` and turns each test's
QEMU options into a plan (or a reason it cannot run here); ``runner.py``
runs plans under aiokvm and, for ``--compare-qemu``, under QEMU microvm,
and maps outcomes to the suite's statuses.
"""
