"""The Triton kernels, run by Triton's interpreter on CPU tensors (no GPU).

TRITON_INTERPRET must be set before triton is imported, so these tests run in their
own pytest process: `make test` runs `TRITON_INTERPRET=1 pytest tests/test_triton_interpreter.py`.
"""

import copy
import os

import pytest
import torch

import inception_fast as ifast
from conftest import (
    AWKWARD_SIZES,
    AWKWARD_SPECS,
    TOLERANCE,
    assert_block_matches,
    assert_special_values_propagate,
    randomize_,
    reference_module,
    rel_err,
    small_residual_block,
    dtype_params,
    run_poisoned,
    tiered,
    weights_of,
)

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs TRITON_INTERPRET=1 before import (make test runs this file that way)",
)
triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# The fast tier runs half precision and the backward on the two cheapest grids only.
_BIG_GRIDS = ("n3-7x7", "n1-13x13")


@pytest.mark.parametrize("spec, size, dtype", tiered(
    AWKWARD_SPECS, AWKWARD_SIZES, dtype_params(*DTYPES),
    slow=lambda spec, size, dtype: size in _BIG_GRIDS and dtype != "float32"))
def test_awkward_shapes_match_fp64_reference(spec, size, dtype):
    n, h, w = size
    ref = reference_module(spec).double()
    x = torch.randn(n, spec.in_channels, h, w, dtype=torch.float64)
    got = run_poisoned(x.to(dtype), weights_of(ref, dtype), "triton")
    assert not torch.isnan(got).any()
    assert rel_err(got, ref(x)) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.slow)], ids=str)
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
    assert launches == ["_graph_stage_kernel"] * 2  # stage 0 (both GEMMs over x), stage 1 (K3 and K5)

    class CountOps(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountOps.count += 1
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), CountOps():
        ref(x)
    assert CountOps.count >= 13


# -- backward and reliability on the triton backend --------------------------------------


def _grads(module, x, grad_out):
    x = x.detach().clone().requires_grad_()
    module(x).backward(grad_out)
    return [x.grad, *(p.grad for p in module.parameters())]


def test_gradients_match_the_reference_module():
    import copy

    spec = ifast.InceptionSpec(13, 5, 7, 9, 3, 11, 6)
    ref = reference_module(spec).train()
    fused = ifast.FusedInception.from_module(copy.deepcopy(ref), backend="triton").train()
    x = torch.randn(2, 13, 6, 6)
    grad_out = torch.randn(2, spec.out_channels, 6, 6)
    for got, want in zip(_grads(fused, x, grad_out), _grads(ref, x, grad_out)):
        assert rel_err(got, want) <= TOLERANCE[torch.float32]


def test_bare_triton_forward_op_backpropagates_to_its_packed_weights():
    """register_autograd of inception_fast::graph_triton_forward (what jit.trace records),
    through a differentiable pack."""
    from inception_fast.ops.branch_graph import pack_weights
    from inception_fast.ops.inception import InceptionWeights, preset

    spec = ifast.InceptionSpec(13, 5, 7, 9, 3, 11, 6)
    ref = reference_module(spec).train()
    weights = InceptionWeights(*(p.detach().clone().requires_grad_() for p in ref.parameters()))
    x = torch.randn(2, 13, 5, 5)
    grad_out = torch.randn(2, spec.out_channels, 5, 5)
    p = preset(spec)
    b, bias = pack_weights(p.plan, weights.weights, weights.biases, "triton")
    torch.ops.inception_fast.graph_triton_forward(x, b, bias, p.flat).backward(grad_out)
    want = _grads(ref, x, grad_out)[1:]
    for name, w, g in zip(InceptionWeights._fields, weights, want):
        assert rel_err(w.grad, g) <= TOLERANCE[torch.float32], name


def test_next_forward_sees_optimizer_step_and_load_state_dict():
    import copy

    spec = ifast.InceptionSpec(13, 5, 7, 9, 3, 11, 6)
    ref = reference_module(spec)
    fused = ifast.FusedInception.from_module(copy.deepcopy(ref), backend="triton").eval()
    x = torch.randn(1, 13, 5, 5)
    with torch.no_grad():
        fused(x)  # fill the pack cache
    opt = torch.optim.SGD(fused.parameters(), lr=0.5)
    for p in fused.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    mirror = reference_module(spec)
    mirror.load_state_dict(fused.state_dict())
    with torch.no_grad():
        assert rel_err(fused(x), mirror(x)) <= TOLERANCE[torch.float32]
        fused.load_state_dict(ref.state_dict())
        assert rel_err(fused(x), ref(x)) <= TOLERANCE[torch.float32]


def test_edge_shapes_and_layouts():
    spec = ifast.InceptionSpec(13, 5, 7, 9, 3, 11, 6)
    ref = reference_module(spec)
    fused = ifast.FusedInception.from_module(ref, backend="triton")
    wide = torch.randn(2, 26, 6, 8)
    with torch.no_grad():
        assert fused(torch.randn(0, 13, 5, 5)).shape == (0, spec.out_channels, 5, 5)
        for x in (torch.randn(3, 13, 1, 1), wide[:, ::2], wide.contiguous(memory_format=torch.channels_last)[:, :13]):
            assert rel_err(fused(x), ref(x)) <= TOLERANCE[torch.float32]


def test_repeated_calls_are_bit_identical():
    fused = ifast.FusedInception.from_module(reference_module(ifast.InceptionSpec(13, 5, 7, 9, 3, 11, 6)),
                                             backend="triton")
    x = torch.randn(2, 13, 5, 5)
    with torch.no_grad():
        assert torch.equal(fused(x), fused(x))


@pytest.mark.parametrize("bad, error, words", [
    (torch.randn(1, 12, 5, 5), ValueError, "13"),
    (torch.randn(13, 5, 5), ValueError, "4-D"),
    (torch.zeros(1, 13, 5, 5, dtype=torch.int32), TypeError, "floating"),
    (torch.randn(1, 13, 5, 5, dtype=torch.float64), TypeError, "dtype"),
])
def test_bad_input_is_rejected_before_any_launch(bad, error, words, monkeypatch):
    from triton.runtime.interpreter import InterpretedFunction

    monkeypatch.setattr(InterpretedFunction, "run", lambda *a, **k: pytest.fail("a kernel ran"))
    fused = ifast.FusedInception.from_module(reference_module(ifast.InceptionSpec(13, 5, 7, 9, 3, 11, 6)),
                                             backend="triton")
    with pytest.raises(error, match=words), torch.no_grad():
        fused(bad)


@pytest.mark.parametrize("spec, size", tiered(AWKWARD_SPECS, AWKWARD_SIZES, slow=lambda spec, size: size in _BIG_GRIDS))
def test_triton_backward_on_awkward_shapes_matches_fp64_autograd(spec, size):
    """End to end in fp32: the three backward kernels (and the ATen calls around them)
    against fp64 eager autograd, inputs with max-pool ties included."""
    import copy

    n, h, w = size
    module = reference_module(spec).train()
    ref = copy.deepcopy(module).double()
    fused = ifast.FusedInception.from_module(module, backend="triton").train()
    x = torch.randn(n, spec.in_channels, h, w).mul(1.5).round().clamp(-1, 2)
    grad_out = torch.randn(n, spec.out_channels, h, w)
    got = _grads(fused, x, grad_out)
    want = _grads(ref, x.double(), grad_out.double())
    for i, (a, b) in enumerate(zip(got, want)):
        assert rel_err(a, b) <= TOLERANCE[torch.float32], i


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("spec", AWKWARD_SPECS)
def test_triton_backward_in_half_precision_matches_the_fp64_backward_of_the_same_output(spec, dtype):
    """In fp16/bf16 the forward's rounding moves some outputs across ReLU's kink, which
    changes eager autograd by percents as much as ours; so the backward is checked on its
    own: the same saved x, y and grad_output, against the fp64 backward algorithm."""
    from inception_fast.ops.branch_graph import graph_backward_reference, graph_triton_forward_saving, pack_weights
    from inception_fast.ops.branch_graph_triton import graph_backward_triton
    from inception_fast.ops.inception import InceptionWeights, preset

    weights = weights_of(reference_module(spec), dtype)
    x = torch.randn(2, spec.in_channels, 7, 9).mul(1.5).round().clamp(-1, 2).to(dtype)
    p = preset(spec)
    with torch.no_grad():
        b, bias = pack_weights(p.plan, weights.weights, weights.biases, "triton")
        y, inter = graph_triton_forward_saving(x, b, bias, p.flat)
    grad_out = torch.randn_like(y)
    got = graph_backward_triton(grad_out, x, y, inter, weights.weights, [True, True], p.backward_flat)
    want = graph_backward_reference(grad_out.double(), x.double(), y.double(), [t.double() for t in inter],
                                    [t.double() for t in weights.weights], [True, True], p.backward_flat)
    for name, a, b in zip(("x", *InceptionWeights._fields), got, want):
        assert rel_err(a, b) <= TOLERANCE[dtype], name


# -- Inception-v3's branch graph on the Triton kernel --------------------------------------


@pytest.fixture
def launches(monkeypatch):
    """The names of the Triton kernels launched while the test runs, in order."""
    from triton.runtime.interpreter import InterpretedFunction

    names = []
    original_run = InterpretedFunction.run
    monkeypatch.setattr(InterpretedFunction, "run",
                        lambda self, *a, **k: names.append(self.fn.__name__) or original_run(self, *a, **k))
    return names


@pytest.mark.parametrize("name, dtype", tiered(
    [pytest.param(n, id=n) for n in "ABCDE"], dtype_params(torch.float32, torch.bfloat16),
    slow=lambda name, dtype: name in "DE" and dtype == "float32"))
def test_inception_v3_blocks_on_the_triton_kernel_one_launch_per_stage(name, dtype, launches):
    import copy

    from conftest import small_v3_block
    from inception_fast.fused_graph import FusedBranchGraph

    block = small_v3_block(name, in_channels=40 if name == "C" else 24).to(dtype)
    reference = copy.deepcopy(block).double()  # the same rounded weights, exact arithmetic
    fused = FusedBranchGraph.from_module(block, backend="triton")
    x = torch.randn(2, fused.spec.in_channels, 5, 9).to(dtype)
    with torch.no_grad():
        fused._packed("triton")  # packs the weights: no launches
        launches.clear()
        got = fused(x)
        want = reference(x.double())
    assert got.dtype == dtype and not torch.isnan(got).any()
    assert rel_err(got, want) <= TOLERANCE[dtype]
    # A grid reduction's max-pool copy joins its stage's launch.
    assert launches == ["_graph_stage_kernel"] * len({g[0] for g in fused._plan.gemms})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_googlenet_block_runs_in_two_launches_and_matches_the_reference(dtype, launches):
    """The grouped stage kernel runs GoogLeNet's module (the graph's preset) in two
    launches: stage 0's two GEMMs (over x, over max-pooled x), then K3 and K5."""
    spec = ifast.InceptionSpec(13, 5, 7, 9, 3, 11, 6)
    weights = weights_of(reference_module(spec), dtype)
    for n, h, w in [(1, 5, 5), (2, 6, 7)]:
        x = torch.randn(n, 13, h, w).to(dtype)
        with torch.no_grad():
            launches.clear()
            got = ifast.inception(x, *weights, backend="triton")
            want = ifast.inception(x.double(), *(t.double() for t in weights), backend="reference")
        assert launches == ["_graph_stage_kernel"] * 2
        assert rel_err(got, want) <= TOLERANCE[dtype], (n, h, w)


@pytest.mark.parametrize("name", ["A", "B", "C", pytest.param("D", marks=pytest.mark.slow),
                                  pytest.param("E", marks=pytest.mark.slow)])
def test_inception_v3_block_gradients_on_the_triton_kernels(name):
    """Eval mode with autograd: the Triton forward and backward (its data-gradient kernel,
    masks fused, fan-out accumulated) against fp64 eager autograd of torchvision's block,
    for x and every conv weight and BN affine parameter."""
    import copy

    from conftest import small_v3_block
    from inception_fast.fused_graph import FusedBranchGraph

    block = small_v3_block(name)
    reference = copy.deepcopy(block).double()
    fused = FusedBranchGraph.from_module(block, backend="triton")
    fused._original = (None,)  # the fused path, never the original branches
    x = torch.randn(1, 24, 5, 7)
    x_fused, x_ref = x.clone().requires_grad_(), x.double().requires_grad_()
    y_ref = reference(x_ref)
    grad_out = torch.randn_like(y_ref)
    y_ref.backward(grad_out)
    fused(x_fused).backward(grad_out.float())
    assert rel_err(x_fused.grad, x_ref.grad) <= TOLERANCE[torch.float32]
    named = dict(reference.named_parameters())
    for pname, p in fused.named_parameters():
        assert rel_err(p.grad, named[pname].grad) <= TOLERANCE[torch.float32], pname


def test_branch_graph_triton_backward_in_bf16_matches_the_fp64_backward_of_the_same_output():
    """bf16 on its own (as for the GoogLeNet backward): the same saved x, y, intermediates
    and grad_output, against the fp64 ATen twin."""
    import copy

    from conftest import small_v3_block
    from inception_fast.fused_graph import FusedBranchGraph
    from inception_fast.ops.branch_graph import graph_backward_reference, graph_triton_forward_saving
    from inception_fast.ops.branch_graph_triton import graph_backward_triton

    block = small_v3_block("E").to(torch.bfloat16)
    fused = FusedBranchGraph.from_module(copy.deepcopy(block), backend="triton")
    x = torch.randn(1, 24, 5, 6, dtype=torch.bfloat16)
    with torch.no_grad():
        b, bias = fused._packed("triton")
        y, intermediates = graph_triton_forward_saving(x, b, bias, fused._plan.flat())
        from inception_fast.blocks import fold_conv_bn

        weights = [fold_conv_bn(u)[0] for u in fused._units]
    grad_out = torch.randn_like(y)
    flat = fused._plan.backward_flat()
    got = graph_backward_triton(grad_out, x, y, intermediates, weights, [True, True], flat)
    want = graph_backward_reference(grad_out.double(), x.double(), y.double(), [t.double() for t in intermediates],
                                    [w.double() for w in weights], [True, True], flat)
    for i, (a, b_) in enumerate(zip(got, want)):
        assert a.dtype == torch.bfloat16 and rel_err(a, b_) <= TOLERANCE[torch.bfloat16], i


@pytest.mark.parametrize("kind", ["googlenet", "v3"])
def test_autocast_runs_the_triton_kernel_in_the_autocast_dtype(kind, monkeypatch):
    """Under autocast the Triton kernels take the autocast dtype (bf16 here, on CPU tensors
    through the interpreter); the output has the dtype the original gives, within bf16's
    tolerance of the fp64 reference, and the fused kernel (not the original) ran."""
    from conftest import small_v3_block

    from inception_fast._dropin import DropInBlock
    from inception_fast.fused_graph import FusedBranchGraph

    if kind == "googlenet":
        block = reference_module(ifast.InceptionSpec(13, 5, 7, 9, 3, 11, 6))
        fused = ifast.FusedInception.from_module(block, backend="triton")
    else:
        block = small_v3_block("A", 13)
        fused = FusedBranchGraph.from_module(block, backend="triton")
    monkeypatch.setattr(DropInBlock, "_run_original", lambda self, x: pytest.fail("the original ran"))
    x = torch.randn(2, 13, 5, 5)
    with torch.no_grad():
        want = block.double()(x.double())
        block.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = fused(x)
    assert got.dtype == torch.bfloat16 and got.is_contiguous()
    assert rel_err(got, want) <= TOLERANCE[torch.bfloat16]


def _assert_close_with_specials(got, want, tolerance, what):
    """The same NaN, +inf and -inf positions, and the finite rest within tolerance."""
    for special in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(special(got), special(want)), (what, special.__name__)
    finite = torch.isfinite(want)
    assert rel_err(got[finite], want[finite]) <= tolerance, what


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, on NaN and inf
@pytest.mark.parametrize("special", ["ties", "nan-inf"])
def test_graph_backward_fuses_the_max_pool_and_matches_the_fp64_reference(special, launches):
    """GoogLeNet's block as a branch graph: the Triton backward takes the stride-1 max pool
    in _graph_pool_grad_kernel (d_pooled, argmax, pooled x in one pass) and gathers its
    gradient in the shared-x GEMM (_graph_input_grad_kernel), against the ATen walk in fp64
    on the same saved tensors; x has ties in every pool window (and NaN, +-inf)."""
    from inception_fast.ops.branch_graph import graph_backward_reference, graph_triton_forward_saving, pack_weights
    from inception_fast.ops.branch_graph_triton import graph_backward_triton
    from inception_fast.ops.plan import plan

    spec = ifast.InceptionSpec(13, 5, 7, 9, 3, 11, 6)
    graph = plan(spec.to_graph())
    params = weights_of(reference_module(spec))
    weights, biases = list(params[0::2]), list(params[1::2])
    x = torch.randn(2, 13, 5, 6).mul(1.5).round().clamp(-1, 2)
    if special == "nan-inf":
        x[0, 2, 1, 1] = float("nan")
        x[0, 2, 1, 2] = float("nan")  # two NaNs in one window: the last one takes the gradient
        x[1, 4, 4, 4] = float("inf")
        x[1, 7, 0, 5] = float("-inf")
    b, bias = pack_weights(graph, weights, biases, "triton")
    with torch.no_grad():
        y, intermediates = graph_triton_forward_saving(x, b, bias, graph.flat())
    grad_out = torch.randn_like(y)
    flat = graph.backward_flat()
    for needs in ([True, True], [True, False], [False, True]):
        launches.clear()
        got = graph_backward_triton(grad_out, x, y, intermediates, weights, needs, flat)
        fused = ["_graph_pool_grad_kernel"] + ["_graph_input_grad_kernel"] * needs[0]
        assert sorted(launches) == sorted(["_graph_dgrad_kernel"] * 2 + fused)
        want = graph_backward_reference(grad_out.double(), x.double(), y.double(),
                                        [t.double() for t in intermediates], [w.double() for w in weights],
                                        needs, flat)
        for i, (a, b_) in enumerate(zip(got, want)):
            assert (a is None) == (b_ is None), (needs, i)
            if b_ is not None:
                _assert_close_with_specials(a, b_, TOLERANCE[torch.float32], (needs, i))


# FIDInceptionE_2 (its max pool branch) takes ~30 s in the interpreter at InceptionE's
# widths: make test-all. make test covers the max-pool slot with GoogLeNet's blocks.
@pytest.mark.parametrize("name", ["FIDInceptionA", pytest.param("FIDInceptionE_2", marks=pytest.mark.slow)])
def test_pytorch_fid_pool_branches_on_triton(name):
    """pytorch-fid's pool branches on the stage kernel: the average without
    count_include_pad (each row divided by its window's in-grid pixels: 4, 6 or 9 here) and
    the max pool, forward and input gradient against the original block."""
    fid = pytest.importorskip("pytorch_fid.inception")
    make = {"FIDInceptionA": lambda: fid.FIDInceptionA(24, pool_features=8),
            "FIDInceptionE_2": lambda: fid.FIDInceptionE_2(24)}[name]
    block = randomize_(make()).eval()
    fused = ifast.FusedBranchGraph.from_module(copy.deepcopy(block), backend="triton").eval()
    assert_block_matches(fused, block, torch.randn(2, 24, 5, 6), parameters=False)


@pytest.mark.parametrize("unit", ["valid", "same", "stride2", "Mixed4a"])
def test_unpadded_and_stem_convolutions_on_triton(unit):
    """Unpadded ('valid') 3x3s over the smaller output grid (the VALID slot kind: timm's
    Mixed4a, Inception-v3's stem Conv2d_2a), a 'same' 3x3 straight over x (Conv2d_2b) and
    a lone 3x3/2 (Conv2d_1a), forward and every gradient against the original."""
    from torchvision.models.inception import BasicConv2d

    if unit == "Mixed4a":
        from test_graph_parse import small_timm

        block, x = small_timm("Mixed4a"), torch.randn(2, 10, 6, 5)
    else:
        geometry = {"valid": dict(), "same": dict(padding=1), "stride2": dict(stride=2)}[unit]
        block, x = randomize_(BasicConv2d(3, 5, kernel_size=3, **geometry)).eval(), torch.randn(2, 3, 7, 6)
    fused = ifast.FusedBranchGraph.from_module(copy.deepcopy(block), backend="triton").eval()
    assert_block_matches(fused, block, x)


@pytest.mark.parametrize("relu", [True, False])
def test_residual_block_without_a_pool_branch_on_triton(relu):
    """Inception-ResNet's block form (no pool branch, then act(x + scale * 1x1(concat))):
    the branches on the stage kernels, the tail in ATen, forward and every gradient."""
    block = small_residual_block(relu)
    fused = ifast.FusedBranchGraph.from_module(copy.deepcopy(block), backend="triton").eval()
    assert_block_matches(fused, block, torch.randn(2, 8, 5, 6))


def test_out_sharing_memory_with_x_is_refused():
    """The kernels read x while they write out: an aliased out= would be read half-written
    (the C++ op refuses it through at::assert_no_overlap)."""
    spec = ifast.InceptionSpec(16, 4, 3, 4, 2, 4, 4)  # 16 output channels, as many as x has
    x = torch.randn(2, 16, 3, 5).contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="out must not share memory with x"), torch.no_grad():
        ifast.inception(x, *weights_of(reference_module(spec)), backend="triton", out=x)


from inception_fast.ops.triton_gemm import round_tf32  # noqa: E402  (after the interpreter check)


def _tf32_reference(t: torch.Tensor) -> torch.Tensor:
    """Round fp32 to the nearest TF32 value (10 stored mantissa bits), ties away from zero,
    by arithmetic in fp64 (not by the kernels' bit trick); inf and NaN unchanged."""
    t64 = t.double()
    mag = t64.abs()
    _, e = torch.frexp(mag)  # mag = m * 2**e, m in [0.5, 1)
    ulp = torch.ldexp(torch.ones_like(mag), (e - 11).clamp_min(-136))  # fp32 subnormals: 2**-136 in TF32
    rounded = torch.copysign(torch.floor(mag / ulp + 0.5) * ulp, t64)
    return torch.where(torch.isfinite(t64), rounded, t64).to(t.dtype)


@triton.jit
def _round_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, round_tf32(tl.load(x_ptr + offs, mask=mask)), mask=mask)


def test_tf32_rounding_is_to_nearest_with_ties_away_from_zero():
    """What the tf32 dots are fed (the tensor cores would truncate an unrounded operand):
    the kernels' round_tf32 and the host's round_tf32_host, bit for bit."""
    from inception_fast.ops.triton_gemm import round_tf32_host

    ulp1 = 2.0**-10  # TF32 spacing in [1, 2)
    specials = [0.0, -0.0, 1.0, 1 + ulp1 / 2, -(1 + ulp1 / 2), 1 + ulp1 / 2 - 2**-23, 1 + 1.5 * ulp1,
                3.4028234663852886e38, 1e-40, -1e-45, float("inf"), float("-inf"), float("nan")]
    x = torch.cat([torch.tensor(specials), torch.randn(500) * 10.0 ** torch.randint(-30, 30, (500,))]).float()
    want = _tf32_reference(x)
    in_kernel = torch.empty_like(x)
    _round_kernel[(1,)](x, in_kernel, x.numel(), BLOCK=1024)
    for got in (in_kernel, round_tf32_host(x)):
        assert torch.equal(got.isnan(), want.isnan())
        finite = ~want.isnan()
        assert torch.equal(got[finite].view(torch.int32), want[finite].view(torch.int32))
        assert got[3] == 1 + ulp1 and got[4] == -(1 + ulp1) and got[5] == 1.0 and got[6] == 1 + 2 * ulp1
    with pytest.raises(TypeError, match="float32"):  # another dtype's bits would be misread
        round_tf32_host(torch.zeros(4, 2, dtype=torch.float16))


@pytest.fixture
def tf32():
    flag = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    yield
    torch.backends.cuda.matmul.allow_tf32 = flag


def test_tf32_forward_feeds_its_dots_tf32_exact_operands(tf32, monkeypatch):
    """With torch.backends.cuda.matmul.allow_tf32 every operand of the kernels' dots is
    TF32-exact (x and B rounded on the host, intermediates in the epilogue; outputs are
    rounded too), so the tensor cores' truncation drops nothing. The block then equals the
    fp64 computation on rounded operands, to fp32 accumulation error, not to TF32's ~3e-4.
    GoogLeNet's block: its max pool of rounded values is rounded (an average pool is not)."""
    spec = AWKWARD_SPECS[0].values[0]
    ref = reference_module(spec).double()
    x = torch.randn(2, spec.in_channels, 5, 9, dtype=torch.float64)
    got = run_poisoned(x.float(), weights_of(ref, torch.float32), "triton")
    with torch.no_grad():
        exact = ref(x.float().double())
    real_conv = torch.nn.functional.conv2d
    tf32_of = lambda t: _tf32_reference(t.float()).double()  # noqa: E731
    monkeypatch.setattr(torch.nn.functional, "conv2d",
                        lambda inp, w, b=None, *a: tf32_of(real_conv(tf32_of(inp), tf32_of(w), b, *a)))
    with torch.no_grad():
        want = copy.deepcopy(ref).float().double()(x.float().double())
    assert rel_err(got, want) <= 2e-6
    assert rel_err(got, exact) > 1e-5  # it did run in TF32: exact fp32 would be ~1e-7 off


def test_tf32_backward_feeds_its_dots_tf32_exact_operands(tf32, monkeypatch):
    """The backward's three Triton kernels (data gradient, max-pool gradient, input gradient)
    get TF32-exact dot operands in tf32 (rounded on the host). (Their values against fp64
    need data on which no ReLU mask flips with rounding: the GPU check's dyadic cases.)"""
    from inception_fast.ops import branch_graph_triton as bgt
    from inception_fast.ops.triton_gemm import round_tf32_host

    checked = []

    def checking(kernel, operands):
        class Launch:
            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    for i in operands(args):
                        assert torch.equal(round_tf32_host(args[i]), args[i]), (kernel, i)
                        checked.append(kernel)
                    return getattr(bgt, f"_real{kernel}")[grid](*args, **kwargs)
                return run
        return Launch()

    for kernel, operands in (("_graph_dgrad_kernel", lambda a: (0, 1)), ("_graph_pool_grad_kernel", lambda a: (0, 1)),
                             ("_graph_input_grad_kernel", lambda a: (0, 1) if a[9] > 0 else ())):
        monkeypatch.setattr(bgt, f"_real{kernel}", getattr(bgt, kernel), raising=False)
        monkeypatch.setattr(bgt, kernel, checking(kernel, operands))
    spec = AWKWARD_SPECS[0].values[0]
    fused = ifast.FusedInception.from_module(reference_module(spec).train(), backend="triton").train()
    x = torch.randn(2, spec.in_channels, 5, 9)
    grad_out = torch.randn(2, spec.out_channels, 5, 9)
    got = _grads(fused, x, grad_out)
    assert {"_graph_dgrad_kernel", "_graph_pool_grad_kernel", "_graph_input_grad_kernel"} <= set(checked)
    assert all(torch.isfinite(g).all() for g in got)


@triton.jit
def _truncating_mma(a, b, acc, INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """What a GPU's tf32 dot does with fp32 operands: drop their low 13 mantissa bits."""
    if INPUT_PRECISION == "tf32":
        a = (a.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
        b = (b.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@pytest.mark.parametrize("kind", ["googlenet", "InceptionB", "InceptionD"])
def test_tf32_results_do_not_change_when_the_dots_truncate_as_a_gpu_does(kind, tf32, monkeypatch):
    """The interpreter's tf32 dot is exact fp32; a GPU's truncates its operands. With every
    operand TF32-exact the truncation drops nothing: forward and every gradient are the
    same bit for bit with a truncating dot. (An average-pool branch, InceptionA/C/E, still
    feeds an unrounded pooled operand: there they differ, by ~3e-5 to 1e-4.)"""
    from conftest import small_v3_block
    from inception_fast.ops import branch_graph_triton as bgt
    from inception_fast.ops import triton_gemm as tg

    # GoogLeNet's reference block has no BN: train mode. torchvision's v3 blocks have BN:
    # eval mode (frozen statistics), where the fused backward runs.
    if kind == "googlenet":
        block, shape, fuse = reference_module(AWKWARD_SPECS[0].values[0]).train(), (2, 13, 5, 6), ifast.FusedInception
    else:
        block, shape, fuse = small_v3_block(kind[-1], 16).eval(), (2, 16, 7, 7), ifast.FusedBranchGraph
    x = torch.randn(shape)
    launches = []
    real_kernel = bgt._graph_stage_kernel

    def run(mma):
        monkeypatch.setattr(bgt, "mma", mma)
        monkeypatch.setattr(tg, "mma", mma)
        fused = fuse.from_module(copy.deepcopy(block), backend="triton")
        xg = x.clone().requires_grad_()
        y = fused(xg)
        y.backward(torch.ones_like(y))
        return [y.detach(), xg.grad, *(p.grad for p in fused.parameters())]

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return real_kernel[grid]

    monkeypatch.setattr(bgt, "_graph_stage_kernel", Counting())
    exact, truncating = run(tg.mma), run(_truncating_mma)
    assert launches  # the fused kernels ran (not the original branches)
    for i, (a, b) in enumerate(zip(exact, truncating)):
        assert torch.equal(a, b), i


def _recording_stage_kernel(monkeypatch) -> list[dict]:
    """Wrap _graph_stage_kernel so that each launch's compile-time arguments are recorded."""
    import inception_fast.ops.branch_graph_triton as bgt

    real, launches = bgt._graph_stage_kernel, []

    class Recording:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(kwargs)
                return real[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(bgt, "_graph_stage_kernel", Recording())
    return launches


# Inference runs Inception-ResNet's tail as the stage kernel's last launch, x added in its
# epilogue: 40 channels make a full 32-wide column tile and a partial one; NaN in x reaches
# the output through the branches and through the residual add alone.
@pytest.mark.parametrize("size", [(1, 5, 6), (3, 8, 7)], ids=["1x5x6", "3x8x7"])
@pytest.mark.parametrize("dtype", dtype_params(*DTYPES))
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no-act"])
def test_residual_tail_is_the_stage_kernels_epilogue_in_inference(relu, dtype, size, monkeypatch):
    import inception_fast.fused_graph as fg

    block = small_residual_block(relu, channels=40)
    fused = ifast.FusedBranchGraph.from_module(copy.deepcopy(block).to(dtype), backend="triton").eval()
    monkeypatch.setattr(fg, "residual_tail", lambda *a: pytest.fail("the tail ran as ATen ops"))
    launches = _recording_stage_kernel(monkeypatch)
    x = torch.randn(size[0], 40, *size[1:], dtype=torch.float64)
    x[0, 3, 2, 2] = float("nan")
    with torch.no_grad():
        got, want = fused(x.to(dtype)), block.double()(x)
    assert [k["EPILOGUE0"] for k in launches] == [0, 0, 2 if relu else 1]  # stage 0, the 3x3, the tail
    assert got.dtype == dtype and got.shape == want.shape
    assert torch.equal(got.isnan(), want.isnan())
    finite = ~want.isnan()
    assert rel_err(got[finite], want[finite]) <= TOLERANCE[dtype]


def _residual_op(relu=True):
    """(block, x, packed B and bias, flat plan_with_residual) of a small residual block."""
    from inception_fast.ops.branch_graph import pack_weights
    from inception_fast.ops.plan import plan_with_residual

    block = small_residual_block(relu, channels=8)
    fused = ifast.FusedBranchGraph.from_module(copy.deepcopy(block), backend="triton").eval()
    graph = plan_with_residual(fused.graph)
    weights, biases = fused._folded(None)
    n = len(weights) - 1  # the tail's 1x1 last, its scale folded as FusedBranchGraph._packed does
    scale = fused.graph.residual.scale
    packed = pack_weights(graph, [*weights[:n], weights[n] * scale], [*biases[:n], biases[n] * scale], "triton")
    return block, torch.randn(2, 8, 5, 6), [t.detach() for t in packed[0]], [t.detach() for t in packed[1]], graph


def test_residual_epilogue_writes_every_output_element():
    """Into a NaN-filled out=: the tail's launch stores each pixel and channel."""
    from inception_fast.ops.branch_graph_triton import graph_forward_triton

    block, x, b, bias, graph = _residual_op()
    out = torch.full((2, 8, 5, 6), float("nan")).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        got = graph_forward_triton(x, b, bias, graph.flat(), out=out)
        want = block(x)
    assert got.data_ptr() == out.data_ptr()
    assert rel_err(got, want) <= TOLERANCE[torch.float32]


def test_a_residual_epilogue_that_does_not_end_a_1x1_over_the_concat_is_refused():
    """A flat plan whose residual epilogue ends a GEMM over x (not the concat buffer) is
    refused before any launch; and the bare op's own autograd says it has no residual
    backward instead of computing one."""
    from inception_fast.ops.branch_graph import graph_triton_forward
    from inception_fast.ops.branch_graph_triton import stage_launches
    from inception_fast.ops.plan import Destination

    _, x, b, bias, graph = _residual_op()
    flat = graph.flat()
    assert [s.epilogue for s in stage_launches(flat, 8)] == [0, 0, 2]
    tail = flat.index(Destination.OUT_RESIDUAL_RELU) - 2 - 9  # the tail GEMM's record: head, then its segment
    bad = flat[:tail + 1] + [-1] + flat[tail + 2:]  # its source: x instead of the concat buffer
    with pytest.raises(ValueError, match="a residual epilogue .* ends a stride-1 1x1 over a buffer"):
        graph_triton_forward(x, b, bias, bad)
    y = graph_triton_forward(x, [t.requires_grad_() for t in b], bias, flat)
    with pytest.raises(ValueError, match="the backward has none"):
        y.sum().backward()


def test_a_corrupted_plan_or_wrong_weights_raise_before_any_launch(monkeypatch):
    """The Triton host validates the plan (GraphPlan.validate) and the packed weights' shapes,
    dtype and device, once per plan: a concat buffer declared too short made the kernels
    write past it (the process aborted), and the tail placed in its concat's stage read the
    concat before it was written (3.7e31 off), both without a word."""
    from inception_fast.ops.branch_graph import graph_triton_forward

    launches = _recording_stage_kernel(monkeypatch)
    _, x, b, bias, graph = _residual_op()
    short = graph.__class__(**{**graph.__dict__, "buf_channels": (graph.buf_channels[0], 6)})
    with pytest.raises(ValueError, match="writes past the 6 channels"):
        graph_triton_forward(x, b, bias, short.flat())
    with pytest.raises(ValueError, match=r"GEMM 1: b must be \(27, 5\)"):
        graph_triton_forward(x, [b[0], b[1][:-1], b[2]], bias, graph.flat())
    with pytest.raises(ValueError, match="GEMM 0: b must be"):
        graph_triton_forward(x, [b[0].double(), *b[1:]], bias, graph.flat())
    with pytest.raises(ValueError, match="one tensor per GEMM"):
        graph_triton_forward(x, b[:2], bias[:2], graph.flat())
    assert not launches


def _train_block(kind: str) -> torch.nn.Module:
    from torchvision.models import inception as tv
    from torchvision.models.googlenet import Inception

    make = {"googlenet": lambda: Inception(10, 4, 5, 7, 3, 6, 5), "A": lambda: tv.InceptionA(10, 8),
            "B": lambda: tv.InceptionB(10), "C": lambda: tv.InceptionC(10, 12), "D": lambda: tv.InceptionD(10),
            "E": lambda: tv.InceptionE(10)}[kind]
    return randomize_(make()).train()


@pytest.mark.parametrize("kind", ["googlenet", "B", *(pytest.param(k, marks=pytest.mark.slow) for k in "ACDE")])
def test_train_mode_bn_form_on_triton_matches_eager(kind):
    """Train-mode BN on the Triton kernels (LINEAR stage epilogues, statistics between the
    launches): output, every gradient and the running statistics against eager, fp32."""
    from inception_fast.fused_graph import FusedBranchGraph

    original = _train_block(kind)
    fused = ifast.swap_inception(torch.nn.Sequential(copy.deepcopy(original)), backend="triton")[0].train()
    assert isinstance(fused, FusedBranchGraph)
    fused._original[0].register_forward_pre_hook(lambda *a: pytest.fail("the original block ran"))
    x = torch.randn(2, 10, 7, 6)
    grad_out = None
    results = []
    for model in (original, fused):
        model.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_()
        y = model(xx)
        grad_out = torch.randn_like(y) if grad_out is None else grad_out
        y.backward(grad_out)
        results.append((y, xx.grad, {n: p.grad for n, p in model.named_parameters()}))
    (y0, dx0, g0), (y1, dx1, g1) = results
    assert rel_err(y1, y0) <= 1e-5 and rel_err(dx1, dx0) <= 1e-5
    for name, want in g0.items():
        assert rel_err(g1[name], want) <= 1e-5, name
    fb = dict(fused.named_buffers())
    for name, want in original.named_buffers():
        assert (rel_err(fb[name], want) <= 1e-5) if want.is_floating_point() else torch.equal(fb[name], want), name
