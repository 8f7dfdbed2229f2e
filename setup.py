"""Builds the optional compiled CPU kernels (``src/sparsecircuits/kernels/csrc``).

Metadata lives in pyproject.toml; this file only adds the extension. It is a plain C++ shared
library (no torch headers, so no torch is needed at build time) called through ctypes. The
extension is optional: without a working compiler the install still succeeds and the package
uses its pure-torch fallback (``sparsecircuits.kernels.backend()`` says which is in use).
Set ``SPARSECIRCUITS_NO_EXT=1`` to skip the build on purpose.
"""

import os
import platform
from glob import glob

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CSRC = "src/sparsecircuits/kernels/csrc"
FLAGS = ["-O3", "-std=c++17", "-fopenmp", "-fvisibility=hidden"]
if platform.machine().lower() in ("x86_64", "amd64"):
    FLAGS += ["-mavx2", "-mfma"]  # the loader refuses the library on CPUs without them


class OptionalBuildExt(build_ext):
    """Any failure to compile leaves the package without the extension, never fails the install."""

    def run(self):
        try:
            super().run()
        except Exception as e:
            self.warn(f"sparsecircuits: compiled kernels not built ({e}); using the torch fallback")

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:
            self.warn(f"sparsecircuits: compiled kernels not built ({e}); using the torch fallback")


ext_modules = []
if not os.environ.get("SPARSECIRCUITS_NO_EXT"):
    ext_modules.append(
        Extension(
            "sparsecircuits.kernels._sckernels",
            sources=sorted(glob(f"{CSRC}/*.cpp")),
            depends=sorted(glob(f"{CSRC}/*.h")),
            include_dirs=[CSRC],
            language="c++",
            extra_compile_args=FLAGS,
            extra_link_args=["-fopenmp"],
            optional=True,
        )
    )

setup(ext_modules=ext_modules, cmdclass={"build_ext": OptionalBuildExt})
