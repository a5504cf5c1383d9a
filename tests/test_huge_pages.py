"""The C++ kernels' large outputs (32 MiB and up) are advised onto transparent huge pages
(csrc/huge_pages.h): their mapping carries the kernel's "hg" flag (MADV_HUGEPAGE), a
smaller output's does not, INCEPTION_FAST_HUGE_PAGES=0 turns the advice off, and the
result is the same either way."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchvision.models.inception import BasicConv2d

import inception_fast as ifast

from conftest import needs_cpu_kernel, randomize_, rel_err

pytestmark = [needs_cpu_kernel, pytest.mark.skipif(
    not Path("/sys/kernel/mm/transparent_hugepage").exists() or not Path("/proc/self/smaps").exists(),
    reason="transparent huge pages and /proc/self/smaps are Linux's")]


def vm_flags(address: int) -> list[str]:
    """The VmFlags of this process's mapping that holds `address` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:  # a mapping's first line: start-end perms ...
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= address < hi
            elif inside and line.startswith("VmFlags:"):
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def unit_and_input(width: int):
    """A 1x1 conv unit (8 -> 64 channels, BN folded) and a batch-2 input whose output is
    2 x 64 x width x width float32."""
    original = randomize_(BasicConv2d(8, 64, kernel_size=1)).eval()
    x = torch.randn(2, 8, width, width).contiguous(memory_format=torch.channels_last)
    return original, ifast.FusedBranchGraph.from_module(original).eval(), x


def test_a_large_output_is_advised_onto_huge_pages_and_a_small_one_is_not():
    original, fused, x = unit_and_input(260)  # 34.6 MB of output
    with torch.no_grad():
        y = fused(x)
        assert y.untyped_storage().nbytes() >= 32 << 20
        # The advice covers the 2 MiB-aligned part of the storage (the kernel splits the
        # mapping there): look 4 MiB in.
        assert "hg" in vm_flags(y.data_ptr() + (4 << 20))
        assert rel_err(y, original(x)) <= 1e-5
        small = fused(x[:, :, :64, :64])  # 2 MB: glibc's heap, which the advice must not touch
        assert "hg" not in vm_flags(small.data_ptr())


@pytest.mark.parametrize("value", ["0", " Off "])
def test_huge_pages_env_switch_turns_the_advice_off(value):
    code = ("import torch, inception_fast as ifast\n"
            "from test_huge_pages import unit_and_input, vm_flags\n"
            "original, fused, x = unit_and_input(260)\n"
            "with torch.no_grad():\n"
            "    y = fused(x)\n"
            "print('hg' in vm_flags(y.data_ptr() + (4 << 20)), (y - original(x)).abs().max().item() < 1e-3)\n")
    tests = str(Path(__file__).parent)
    env = dict(os.environ, INCEPTION_FAST_HUGE_PAGES=value,
               PYTHONPATH=os.pathsep.join([tests, str(Path(tests).parent), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["False", "True"]
