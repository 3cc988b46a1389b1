"""Build hooks: the cffi KVM binding and the guest kit.

- ``cffi_modules`` compiles ``aiokvm.kvm._kvm`` from ``<linux/kvm.h>``.
- ``build_py`` also runs ``make -C guest`` so the bundled guests ship as
  ``aiokvm/guests/*.elf`` (in the source tree for editable installs).
- The package list is found, not written out, so a new subpackage cannot
  drop out of the wheel; ``devices/`` installs as ``aiokvm.devices``.
"""

import os
import subprocess
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))

# Package name -> source folder, for the packages that do not live at their name.
PACKAGE_DIR = {"aiokvm.devices": "devices"}


def find_all_packages() -> list[str]:
    packages = find_packages(HERE, include=["aiokvm", "aiokvm.*"])
    for name, folder in PACKAGE_DIR.items():
        packages += [name] + [f"{name}.{sub}" for sub in find_packages(os.path.join(HERE, folder))]
    return sorted(packages)


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
    packages=find_all_packages(),
    package_dir=PACKAGE_DIR,
    cffi_modules=["aiokvm/kvm/_build.py:ffibuilder"],
    cmdclass={"build_py": BuildPyWithGuests},
)
