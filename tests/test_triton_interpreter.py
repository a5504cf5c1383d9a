"""The Triton kernels, run by Triton's interpreter on CPU tensors (no GPU).

TRITON_INTERPRET must be set before triton is imported, so these tests run in their
own pytest process: `make test` runs `TRITON_INTERPRET=1 pytest tests/test_triton_interpreter.py`.
"""

import os

import pytest
import torch

import inception_fast as ifast
from conftest import (
    AWKWARD_SIZES,
    AWKWARD_SPECS,
    TOLERANCE,
    assert_special_values_propagate,
    reference_module,
    rel_err,
    run_poisoned,
    weights_of,
)

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs TRITON_INTERPRET=1 before import (make test runs this file that way)",
)
triton = pytest.importorskip("triton")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("size", AWKWARD_SIZES)
@pytest.mark.parametrize("spec", AWKWARD_SPECS)
def test_awkward_shapes_match_fp64_reference(spec, size, dtype):
    n, h, w = size
    ref = reference_module(spec).double()
    x = torch.randn(n, spec.in_channels, h, w, dtype=torch.float64)
    got = run_poisoned(x.to(dtype), weights_of(ref, dtype), "triton")
    assert not torch.isnan(got).any()
    assert rel_err(got, ref(x)) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_googlenet_3a_block_at_28x28(dtype):
    block = ifast.GOOGLENET_INCEPTION["3a"]
    ref = reference_module(block.spec).double()
    x = torch.randn(1, 192, 28, 28, dtype=torch.float64)
    got = run_poisoned(x.to(dtype), weights_of(ref, dtype), "triton")
    assert rel_err(got, ref(x)) <= TOLERANCE[dtype]


@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")  # numpy, on NaN
def test_nan_and_inf_propagate_like_the_reference():
    assert_special_values_propagate("triton")


def test_two_launches_per_forward_against_at_least_13_eager_kernels(monkeypatch):
    from torch.utils._python_dispatch import TorchDispatchMode
    from triton.runtime.interpreter import InterpretedFunction

    launches = []
    original_run = InterpretedFunction.run
    monkeypatch.setattr(InterpretedFunction, "run",
                        lambda self, *a, **k: launches.append(self.fn.__name__) or original_run(self, *a, **k))
    spec = ifast.InceptionSpec(13, 5, 7, 9, 3, 11, 6)
    ref = reference_module(spec)
    x = torch.randn(1, 13, 5, 5).contiguous(memory_format=torch.channels_last)
    fused = ifast.FusedInception.from_module(ref, backend="triton")
    with torch.no_grad():
        fused(x)  # packs weights and picks configs
        launches.clear()
        fused(x)
    assert launches == ["_pointwise_kernel", "_spatial_kernel"]

    class CountOps(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountOps.count += 1
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), CountOps():
        ref(x)
    assert CountOps.count >= 13
