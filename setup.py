"""Build hooks: the cffi KVM binding and the guest kit.

- ``cffi_modules`` compiles ``aiokvm.kvm._kvm`` from ``<linux/kvm.h>``.
- ``build_py`` also runs ``make -C guest`` so the bundled guests ship as
  ``aiokvm/guests/*.elf`` (in the source tree for editable installs).
"""

import os
import subprocess
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


class BuildPyWithGuests(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            out = os.path.join(HERE, "aiokvm", "guests")
        else:
            out = os.path.join(os.path.abspath(self.build_lib), "aiokvm", "guests")
        # Objects stay out of the package directory (and so out of the wheel).
        objdir = os.path.join(HERE, "guest", "build", "obj")
        os.makedirs(out, exist_ok=True)
        try:
            subprocess.run(["make", "-s", "-C", os.path.join(HERE, "guest"), f"O={out}", f"OBJDIR={objdir}"],
                           check=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            sys.exit(f"aiokvm: building the guest kit failed ({exc}); gcc, binutils and make are needed")


setup(
    cffi_modules=["aiokvm/kvm/_build.py:ffibuilder"],
    cmdclass={"build_py": BuildPyWithGuests},
)
