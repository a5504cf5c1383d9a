"""Builds inception_fast and its C++ CPU kernels (csrc/) against the torch already installed.

Install with `pip install --no-build-isolation -e .`: an isolated build would fetch a
second multi-GB torch. A failed C++ build does not fail the install: the package then
runs on backend="reference" and says why at first use.
"""

import os
import sys

from setuptools import find_packages, setup

try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:
    sys.exit("inception_fast: install torch==2.14.1 first, then `pip install --no-build-isolation -e .`")


class OptionalBuildExtension(BuildExtension):
    def build_extensions(self):
        self.failed = []
        super().build_extensions()  # sets torch's flags, then build_extension() for each
        # Dropped from the outputs, so that an editable install does not look for them.
        self.extensions = [ext for ext in self.extensions if ext not in self.failed]

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # compiler missing or failing: keep the pure-Python package
            self.failed.append(ext)
            print(
                f"\n*** inception_fast: building {ext.name} failed ({exc}).\n"
                "*** The package installs without it; backend='cpu' will raise and backend='auto'\n"
                "*** falls back to 'reference'. Install a C++20 compiler and ninja, then reinstall.\n",
                file=sys.stderr,
            )


# The kernel is built on, and for, the machine that runs it: -march=native lets GCC use
# AVX-512 where the CPU has it. INCEPTION_FAST_PORTABLE=1 builds for baseline x86-64.
arch_flags = [] if os.environ.get("INCEPTION_FAST_PORTABLE") else ["-march=native"]

setup(
    name="inception_fast",
    version="0.1.0",
    description="The GoogLeNet Inception module as one fused kernel (Triton for GPUs, C++ for CPUs)",
    packages=find_packages(include=["inception_fast", "inception_fast.*"]),
    python_requires=">=3.10",
    install_requires=["torch==2.14.1", "torchvision==0.29.1", "numpy"],
    extras_require={
        # Peers the tests run against, pinned: the ONNX exporter and runtime the drop-in tests
        # export to (tests/test_dropin.py), and the MAC counters our counting rules serve
        # (tests/test_counting_rules.py).
        "test": ["pytest", "pytest-benchmark", "onnx==1.23.2", "onnxruntime==1.32.0", "onnxscript==0.7.2",
                 "thop==0.1.1.post2209072238", "ptflops==0.7.5", "fvcore==0.1.5.post20221221",
                 # The FID workflow's models and reference (fid.py, tests/test_fid.py, `fid-bench`).
                 "pytorch-fid==0.3.0", "timm==1.0.31", "scipy==1.17.1"],
        "bench": ["pytest-benchmark", "matplotlib"],
    },
    ext_modules=[
        CppExtension(
            "inception_fast._C",
            sources=["csrc/inception_graph_cpu.cpp", "csrc/inception_graph_cpu_backward.cpp",
                     "csrc/winograd_weight_grad.cpp", "csrc/pack_winograd.cpp", "csrc/bindings.cpp"],
            extra_compile_args=["-O3", "-std=c++20", "-fopenmp", "-Wno-psabi", *arch_flags],
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": OptionalBuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
