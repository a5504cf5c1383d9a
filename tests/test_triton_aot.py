"""Every shipped Triton kernel config, compiled ahead of time for sm_80 and sm_90 (no GPU
needed): the branch-graph op's launches as inception_fast.ops.triton_aot.KERNELS lists
them.

From the cubin (cuobjdump -res-usage, shipped in the triton wheel) and the PTX:
no spills, tensor-core instructions where a variant has a dot, shared memory within the
architecture's limit. Prints the resource table; with INCEPTION_FAST_AOT_TABLE=PATH also
writes it there (`make aot-table` refreshes benchmarks/results/aot_resources.md). Tests
never write into tracked files on their own.
"""

import os
from pathlib import Path

import pytest
import torch

import inception_fast as ifast

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="needs real JIT kernels")
triton = pytest.importorskip("triton")

from inception_fast.ops.triton_aot import (  # noqa: E402
    KERNELS,
    ODD_CHANNELS,
    SHARED_MEMORY_LIMIT,
    compile_ahead_of_time,
)

RESULTS = os.environ.get("INCEPTION_FAST_AOT_TABLE")

# (name, JIT function, AotConfig): the branch-graph op's launches.
CASES = [(name, fn, aot) for name, (fn, aots) in KERNELS.items() for aot in aots]
# (dtype, dot precision) of the tensor-core lists; the exact-fp32 lists (FMA dots, when
# allow_tf32 is off) compile for fp32 "ieee" only.
TENSOR_CORE_DTYPES = [(torch.float16, None), (torch.bfloat16, None), (torch.float32, "tf32")]
EXACT_DTYPES = [(torch.float32, "ieee")]
CAPABILITIES = (80, 90)


def dtypes_of(aot):
    return EXACT_DTYPES if aot.exact_fp32 else TENSOR_CORE_DTYPES


def _id(name, aot, dtype, precision):
    variant = "".join(f"-{k}{v}" for k, v in aot.constexprs if not k.startswith("KIND"))
    config = "x".join(map(str, aot.config))
    return f"{name}{variant}-{config}-{str(dtype).removeprefix('torch.')}-{precision or 'default'}"


def _tier(name, aot, dtype, case_index) -> list:
    """`make test` compiles, per kernel variant of a real network's launches, the first
    config of its tensor-core list in bf16 and of its exact-fp32 list (about 60 compiles,
    under a minute); `make test-all` and `make aot-table` every config, dtype and the
    odd-channel variants (awkward shapes), several hundred compiles."""
    first = case_index == next(i for i, (n, _, a) in enumerate(CASES) if n == name and a.exact_fp32 == aot.exact_fp32)
    quick = first and not name.endswith(ODD_CHANNELS) and dtype in (torch.bfloat16, torch.float32) and (
        aot.exact_fp32 or dtype == torch.bfloat16)
    return [] if quick else [pytest.mark.slow]


PARAMS = [pytest.param(name, fn, aot, dtype, precision, id=_id(name, aot, dtype, precision),
                       marks=_tier(name, aot, dtype, i))
          for i, (name, fn, aot) in enumerate(CASES) for dtype, precision in dtypes_of(aot)]
_COMPILED = {}  # (id, capability) -> CompiledKernel, in compile order


@pytest.fixture(scope="module", autouse=True)
def resource_table():
    """After the module's tests: the resource table of what they compiled (printed; written
    to INCEPTION_FAST_AOT_TABLE when set)."""
    yield
    rows = [
        "| kernel | BLOCK_M×N×K | warps | stages | dtype | sm | registers | stack | local | shared (B) | MMA |",
        "|---|---|---|---|---|---|---:|---:|---:|---:|---|",
    ]
    for r in _COMPILED.values():
        c = r.config
        rows.append(f"| {r.kernel} | {c.block_m}×{c.block_n}×{c.block_k} | {c.num_warps} | {c.num_stages} | "
                    f"{r.dtype} | {r.capability} | {r.registers} | {r.stack} | {r.local} | {r.shared} | "
                    f"{r.tensor_core_op} |")
    if RESULTS:
        Path(RESULTS).write_text(f"Triton {triton.__version__}, compiled by tests/test_triton_aot.py\n\n"
                                 + "\n".join(rows) + "\n")
    print("\n" + "\n".join(rows))


@pytest.mark.parametrize("capability", CAPABILITIES)
@pytest.mark.parametrize("name, fn, aot, dtype, precision", PARAMS)
def test_config_compiles_without_spills_on_tensor_cores(name, fn, aot, dtype, precision, capability):
    r = _COMPILED[_id(name, aot, dtype, precision), capability] = compile_ahead_of_time(
        fn, aot.config, dtype, capability, precision, aot.constexprs, aot.divisible, name=name)
    assert r.stack == 0 and r.local == 0, f"spills: STACK {r.stack} LOCAL {r.local}"
    assert r.shared <= SHARED_MEMORY_LIMIT[capability]
    if aot.dot and precision != "ieee":
        assert r.tensor_core_op == {80: "mma.sync", 90: "wgmma"}[capability]


def test_more_than_2_31_pixels_is_refused_before_any_allocation():
    from inception_fast.ops.branch_graph_triton import graph_forward_triton
    from inception_fast.ops.inception import preset

    p = preset(ifast.InceptionSpec(4, 2, 2, 2, 2, 2, 2))
    x = torch.empty(1, 4, 1, 1).expand(2**31, 4, 1, 1)  # no memory behind the batch
    with pytest.raises(ValueError, match="fewer than 2\\*\\*31"):
        graph_forward_triton(x, [], [], p.flat)


def test_real_plans_launch_only_the_stage_variants_checked_here():
    """Each stage launch of GoogLeNet's nine blocks (as branch graphs), Inception-v3's five
    block types (both also with the train-mode BN form's LINEAR epilogue) and
    Inception-ResNet-v2's residual blocks (with their tail's epilogue, both activations)
    has the compile-time variant and config list of an entry of
    branch_graph_triton.SHIPPED_STAGES, the stage kernels KERNELS compiles above."""
    from torchvision.models import inception as tv

    from inception_fast.fused_graph import FusedBranchGraph
    from inception_fast.ops import branch_graph_triton as graph
    from inception_fast.ops.plan import plan, plan_with_residual
    from inception_fast.spec import Residual

    specs = [block.spec.to_graph() for block in ifast.GOOGLENET_INCEPTION.values()]
    specs += [FusedBranchGraph.from_module(make().eval(), backend="cpu").spec for make in (
        lambda: tv.InceptionA(192, pool_features=32), lambda: tv.InceptionB(288),
        lambda: tv.InceptionC(768, channels_7x7=128), lambda: tv.InceptionD(768), lambda: tv.InceptionE(1280))]
    plans = [(plan(spec), spec.in_channels) for spec in specs]
    irv2 = pytest.importorskip("timm.models.inception_resnet_v2")
    for make in (lambda: irv2.Block35(scale=0.17), lambda: irv2.Block17(scale=0.1), lambda: irv2.Block8(scale=0.2),
                 lambda: irv2.Block8(no_relu=True)):
        spec = FusedBranchGraph.from_module(make().eval(), backend="cpu").graph
        plans.append((plan_with_residual(spec), spec.in_channels))
    assert {p.gemms[-1].segments[0].destination for p, _ in plans[-4:]} == {-2, -3}  # both epilogues

    def shape(kinds, segments, epilogue, exact):
        return graph.stage_constexprs(kinds, segments, epilogue), graph.stage_configs(kinds, exact)

    shipped = [shape(*stage[1:], exact) for stage in graph.SHIPPED_STAGES for exact in (False, True)]
    for i, (p, in_channels) in enumerate(plans):
        stages = graph.stage_launches(p.flat(), in_channels)
        assert len(stages) == len({g[0] for g in p.gemms})  # one launch per stage
        # GoogLeNet's and Inception-v3's also launch in training with BN, every slot LINEAR.
        trained = i < len(specs)
        for stage in stages:
            for exact in (False, True):
                assert shape(stage.kinds, stage.segments, stage.epilogue, exact) in shipped, (p, stage)
                if trained:
                    assert shape(stage.kinds, stage.segments, graph.LINEAR, exact) in shipped, (p, stage)
