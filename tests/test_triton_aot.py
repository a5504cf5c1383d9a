"""Every shipped Triton config of the forward and backward kernels, compiled ahead of time
for sm_80 and sm_90 (no GPU needed).

From the cubin (cuobjdump -res-usage, shipped in the triton wheel) and the PTX:
no spills, tensor-core instructions, shared memory within the architecture's limit.
Prints the resource table; with INCEPTION_FAST_AOT_TABLE=PATH also writes it there
(`make aot-table` refreshes benchmarks/results/aot_resources.md). Tests never write into
tracked files on their own.
"""

import os
from pathlib import Path

import pytest
import torch

import inception_fast as ifast

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="needs real JIT kernels")
triton = pytest.importorskip("triton")

from inception_fast.ops.inception_triton import SHARED_MEMORY_LIMIT, compile_ahead_of_time, kernel_configs  # noqa: E402

RESULTS = os.environ.get("INCEPTION_FAST_AOT_TABLE")
from inception_fast.ops.branch_graph_triton import graph_configs  # noqa: E402
from inception_fast.ops.inception_triton_backward import BACKWARD_KERNELS, backward_configs  # noqa: E402

# Forward kernels, then backward kernels, each with the autotune list it launches with.
CASES = [(kind, exact, cfg) for kind in ("pointwise", "spatial") for exact in (False, True)
         for cfg in kernel_configs(kind, exact_fp32=exact)]
CASES += [(kind, exact, cfg) for kind in BACKWARD_KERNELS for exact in (False, True)
          for cfg in backward_configs(kind, exact_fp32=exact)]
# The branch-graph kernels in the shapes their plans launch: (kernel, constexprs, taps,
# stride 2). Forward: a K x K stage, the stage-0 1x1 over x into three destinations, the
# average-pool branch's 1x1, a grid reduction's stride-2 3x3. Backward: the data gradient
# of a convolution over an intermediate, as a fan-out's last consumer (accumulate + mask,
# the most registers).
GRAPH_VARIANTS = {
    "graph_gemm": ("graph_gemm", dict(POOL=0, SEGMENTS=1, STRIDE2=False), (3, 3), False),
    "graph_gemm_stage0": ("graph_gemm", dict(POOL=0, SEGMENTS=3, STRIDE2=False), (1, 1), False),
    "graph_gemm_avgpool": ("graph_gemm", dict(POOL=1, SEGMENTS=1, STRIDE2=False), (1, 1), False),
    "graph_gemm_stride2": ("graph_gemm", dict(POOL=0, SEGMENTS=1, STRIDE2=True), (3, 3), True),
    "graph_dgrad": ("graph_dgrad", dict(ACCUMULATE=True, MASK=True), (3, 3), False),
}
CASES += [(kind, exact, cfg) for kind, (_, _, taps, stride2) in GRAPH_VARIANTS.items() for exact in (False, True)
          for cfg in graph_configs(*taps, stride2, exact_fp32=exact)]
# (dtype, dot precision) of the tensor-core lists; the exact-fp32 lists (FMA dots, when
# allow_tf32 is off) compile for fp32 "ieee" only.
TENSOR_CORE_DTYPES = [(torch.float16, None), (torch.bfloat16, None), (torch.float32, "tf32")]
EXACT_DTYPES = [(torch.float32, "ieee")]


def dtypes_of(exact):
    return EXACT_DTYPES if exact else TENSOR_CORE_DTYPES


PARAMS = [(kind, cfg, dtype, precision) for kind, exact, cfg in CASES for dtype, precision in dtypes_of(exact)]


@pytest.fixture(scope="module")
def compiled():
    results = {}
    for kind, exact, cfg in CASES:
        for dtype, precision in dtypes_of(exact):
            for capability in (80, 90):
                jit_kind, constexprs = GRAPH_VARIANTS[kind][:2] if kind in GRAPH_VARIANTS else (kind, None)
                results[kind, cfg, dtype, precision, capability] = compile_ahead_of_time(
                    jit_kind, cfg, dtype, capability, precision, constexprs)._replace(kernel=kind)
    rows = [
        "| kernel | BLOCK_M×N×K | warps | stages | dtype | sm | registers | stack | local | shared (B) | MMA |",
        "|---|---|---|---|---|---|---:|---:|---:|---:|---|",
    ]
    for r in results.values():
        c = r.config
        rows.append(f"| {r.kernel} | {c.block_m}×{c.block_n}×{c.block_k} | {c.num_warps} | {c.num_stages} | "
                    f"{r.dtype} | {r.capability} | {r.registers} | {r.stack} | {r.local} | {r.shared} | "
                    f"{r.tensor_core_op} |")
    if RESULTS:
        Path(RESULTS).write_text(f"Triton {triton.__version__}, compiled by tests/test_triton_aot.py\n\n"
                                 + "\n".join(rows) + "\n")
    print("\n".join(rows))
    return results


@pytest.mark.parametrize("capability", [80, 90])
@pytest.mark.parametrize(
    "kind, cfg, dtype, precision", PARAMS,
    ids=[f"{k}-{'x'.join(map(str, c))}-{str(d).removeprefix('torch.')}-{p or 'default'}" for k, c, d, p in PARAMS],
)
def test_config_compiles_without_spills_on_tensor_cores(compiled, kind, cfg, dtype, precision, capability):
    r = compiled[kind, cfg, dtype, precision, capability]
    assert r.stack == 0 and r.local == 0, f"spills: STACK {r.stack} LOCAL {r.local}"
    assert r.shared <= SHARED_MEMORY_LIMIT[capability]
    if precision != "ieee":
        assert r.tensor_core_op == {80: "mma.sync", 90: "wgmma"}[capability]


def test_more_than_2_31_pixels_is_refused_before_any_allocation():
    from inception_fast.ops.inception_triton import forward_triton

    spec = ifast.InceptionSpec(4, 2, 2, 2, 2, 2, 2)
    x = torch.empty(1, 4, 1, 1).expand(2**31, 4, 1, 1)  # no memory behind the batch
    with pytest.raises(ValueError, match="fewer than 2\\*\\*31"):
        forward_triton(x, None, spec)


@pytest.mark.parametrize("capability", [80, 90])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_grid_reduction_max_pool_kernel_compiles_without_spills(dtype, capability):
    from inception_fast.ops.inception_triton import KernelConfig

    r = compile_ahead_of_time("max_pool_stride2", KernelConfig(64, 64, 16, 4, 1), dtype, capability)
    assert r.stack == 0 and r.local == 0, f"spills: STACK {r.stack} LOCAL {r.local}"
