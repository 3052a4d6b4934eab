"""The native expert kernel (runtime/native/experts.c) is optional: where it cannot be built
(no C compiler, an unusual platform) the package installs without it and the runtime runs
experts through onnxruntime sessions instead, saying so once. Everything else is in pyproject.toml."""

import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    def run(self):
        try:
            super().run()
        except Exception as e:  # noqa: BLE001 - any failure leaves the session path
            print(f"fate: the native expert kernel was not built ({e}); experts will run as sessions", file=sys.stderr)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001
            print(f"fate: the native expert kernel was not built ({e}); experts will run as sessions", file=sys.stderr)


setup(
    ext_modules=[Extension("fate.runtime.native._kernel", ["runtime/native/experts.c", "runtime/native/kernel.c", "runtime/native/reads.c"],
                           depends=["runtime/native/kernel.h", "runtime/native/reads.h", "runtime/native/threads.h"],
                           extra_compile_args=["-O3", "-std=c11", "-Wall", "-Wno-maybe-uninitialized"], libraries=["m"])],
    cmdclass={"build_ext": OptionalBuildExt},
)
