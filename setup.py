"""Build and install r3v_fast.

The package is pure Python plus one optional native piece: the C++ CPU kernels in csrc/,
compiled by CMake into the pybind11 module ``r3v_fast._C``. If CMake or a compiler is
missing the build prints a warning and the package installs without it; the ops then fall
back to the pure-PyTorch backend. Set ``R3V_NO_CPP=1`` to skip the native build entirely.

Triton kernels live in the top-level folder kernels/ and are installed as the subpackage
``r3v_fast.kernels`` (never as a top-level ``kernels``, which is a PyPI name).
"""

import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str, source_dir: Path):
        super().__init__(name, sources=[])
        self.source_dir = str(source_dir)


class OptionalCMakeBuild(build_ext):
    """Configure and build csrc/ with CMake; a failure leaves a pure-Python install."""

    def build_extensions(self):
        # An extension that failed to build is dropped, so that setuptools does not try to
        # copy its (missing) output and the install still succeeds as pure Python.
        built = [ext for ext in self.extensions if self._try_build(ext)]
        self.extensions[:] = built

    def _try_build(self, ext) -> bool:
        if os.environ.get("R3V_NO_CPP") == "1":
            print("r3v_fast: R3V_NO_CPP=1, skipping the C++ extension")
            return False
        out_file = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        try:
            import pybind11

            configure = [
                "cmake", ext.source_dir,
                f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_file.parent}",
                f"-DR3V_EXT_FILENAME={out_file.name}",
                f"-DPython_EXECUTABLE={sys.executable}",
                f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
                "-DCMAKE_BUILD_TYPE=Release",
            ]
            subprocess.run(configure, cwd=build_dir, check=True)
            jobs = str(os.cpu_count() or 1)
            subprocess.run(["cmake", "--build", ".", "--parallel", jobs], cwd=build_dir, check=True)
            return out_file.exists()
        except Exception as err:  # noqa: BLE001 - any build failure means "no native backend"
            print(f"r3v_fast: WARNING: C++ extension not built ({err}); the 'cpp' backend "
                  "will be unavailable and 'auto' falls back to the torch backend.")
            return False


setup(
    name="r3v_fast",
    version="0.1.0",
    description="A fast engine for R3V: vision-language models that self-improve by reflecting on their rationales",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8") if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["r3v_fast", "r3v_fast.*"]) + ["r3v_fast.kernels"],
    package_dir={"r3v_fast.kernels": "kernels"},
    package_data={"r3v_fast": ["assets/**/*"]},
    include_package_data=True,
    ext_modules=[CMakeExtension("r3v_fast._C", ROOT)],
    cmdclass={"build_ext": OptionalCMakeBuild},
    install_requires=[
        "torch>=2.6",
        "torchvision",
        "transformers>=5,<6",
        "accelerate",
        "peft",
        "safetensors",
        "pillow",
        "tqdm",
        "tokenizers",
        "numpy",
        "matplotlib",   # the accuracy-per-iteration plot of every run
    ],
    extras_require={
        "dev": [
            "pytest", "pytest-benchmark", "hypothesis",
            "tensorboard",   # the --report-to tensorboard test reads the event files
            # apply_fused_loss under TRL's SFTTrainer / DPOTrainer (tested with 1.16, beside transformers 5.24)
            "trl>=1.16,<2",
            # Triton kernels are tested on the CPU under TRITON_INTERPRET=1.
            "triton; platform_system == 'Linux' and platform_machine == 'x86_64'",
        ],
        "gpu": ["flash-attn"],
    },
    zip_safe=False,
)
