"""Winograd F(2x2, 3x3) on the CPU kernel (csrc/winograd.h): fp32 3x3 stride-1 stages.

Each test runs a size with at least winograd::kMinTiles (32) 2x2 tiles, so that the
Winograd path runs, and checks that it did: its output differs in rounding from the direct
implicit GEMM's on the same weights.
"""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import inception_fast as ifast
from conftest import TOLERANCE, assert_block_matches, needs_cpu_kernel, reference_module, rel_err, small_v3_block
from inception_fast.ops.branch_graph import graph_forward, pack_weights, unpack_weights, winograd_packed
from inception_fast.ops.plan import plan

pytestmark = needs_cpu_kernel

SPECS = [
    pytest.param(ifast.InceptionSpec(20, 17, 33, 35, 4, 19, 21, k5=3), id="odd-channels"),
    pytest.param(ifast.InceptionSpec(40, 16, 32, 48, 16, 32, 16, k5=3), id="lane-multiples"),
]
# (N, H, W): odd and even grids, a 1-pixel-wide grid, and the two schedules: image-major
# (many images) and stage-major with the threads splitting columns (batch 1).
SIZES = [pytest.param((8, 7, 9), id="n8-7x9"), pytest.param((1, 15, 13), id="n1-15x13"),
         pytest.param((40, 1, 1), id="n40-1x1"), pytest.param((5, 2, 17), id="n5-2x17"),
         pytest.param((2, 12, 12), id="n2-12x12")]


def _winograd_stages(graph, b) -> int:
    """GEMMs whose packed B is laid out for the Winograd kernel (backend.pack_winograd)."""
    return sum(winograd_packed(graph, g, t) for t, g in zip(b, graph.gemms))


def _op_inputs(spec, x, winograd: bool):
    ref = reference_module(spec)
    fused = ifast.FusedInception.from_module(ref)
    graph = plan(spec.to_graph())
    weights, biases = fused._folded(None)
    packed = pack_weights(graph, weights, biases, "cpu", winograd=winograd)
    return ref, graph, packed


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("size", SIZES)
def test_forward_within_fp32_tolerance_and_not_the_direct_path(spec, size):
    n, h, w = size
    x = torch.randn(n, spec.in_channels, h, w)
    ref, graph, wino = _op_inputs(spec, x, True)
    direct = pack_weights(graph, *ifast.FusedInception.from_module(ref)._folded(None), "cpu", winograd=False)
    assert _winograd_stages(graph, wino[0]) == 2 and _winograd_stages(graph, direct[0]) == 0
    out = torch.full((n, spec.out_channels, h, w), float("nan")).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        got = torch.ops.inception_fast.graph_forward.out(x, *wino, graph.flat(), out=out)
        want = ref.double()(x.double())
        y_direct = graph_forward(x, *direct, graph.flat())
    assert rel_err(got, want) <= TOLERANCE[torch.float32]
    assert not torch.equal(got, y_direct), "the Winograd stages did not run"


def test_one_and_two_threads_agree_bit_for_bit():
    spec = SPECS[0].values[0]
    x = torch.randn(3, spec.in_channels, 11, 10)
    _, graph, wino = _op_inputs(spec, x, True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = graph_forward(x, *wino, graph.flat())
        torch.set_num_threads(2)
        two = graph_forward(x, *wino, graph.flat())
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@pytest.mark.parametrize("batch", [1, 6])
def test_non_finite_values_land_where_eager_puts_them(batch):
    """A NaN or inf reaches a whole 2x2 tile through the transforms; such tiles are recomputed
    directly, so NaN, +inf and -inf (0 after ReLU) land where the reference puts them."""
    spec = SPECS[0].values[0]
    x = torch.randn(batch, spec.in_channels, 14, 13)
    x[0, 2, 3, 4] = float("nan")  # a tile's inside corner: the direct window misses tile pixels
    x[-1, 5, 0, 12] = float("inf")  # the border tile of an odd width
    x[-1, 7, 9, 0] = float("-inf")
    x[0, :, 13, 6] = float("inf")  # every channel: inf - inf in the 1x1 reductions too
    ref, graph, wino = _op_inputs(spec, x, True)
    with torch.no_grad():
        got = graph_forward(x, *wino, graph.flat())
        want = ref(x)
    assert torch.isnan(want).any() and torch.isposinf(want).any()
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(torch.isposinf(got), torch.isposinf(want))
    assert torch.equal(torch.isneginf(got), torch.isneginf(want))
    finite = torch.isfinite(want)
    assert rel_err(got[finite], want[finite]) <= TOLERANCE[torch.float32]


def test_module_forward_and_backward_match_the_reference():
    spec = SPECS[1].values[0]
    ref = reference_module(spec)
    fused = ifast.FusedInception.from_module(ref)
    assert_block_matches(fused, ref, torch.randn(4, spec.in_channels, 9, 8))


def test_gradients_through_the_packed_weights_reach_the_convolutions():
    """Autograd over the bare op (what jit.trace records): the packed tensor's gradient
    pulls back through pack_weights' Winograd transform to each weight's own gradient."""
    spec = SPECS[0].values[0]
    x = torch.randn(4, spec.in_channels, 10, 9)
    ref = reference_module(spec)
    graph = plan(spec.to_graph())
    weights, biases = ifast.FusedInception.from_module(ref)._folded(None)
    weights = [w.detach().requires_grad_() for w in weights]
    biases = [b.detach().requires_grad_() for b in biases]
    b, bias = pack_weights(graph, weights, biases, "cpu", winograd=True)
    y = graph_forward(x, b, bias, graph.flat())
    want = ref(x)
    grad = torch.randn_like(want)
    y.backward(grad)
    want.backward(grad)
    convs = [m for m in ref.modules() if isinstance(m, torch.nn.Conv2d)]
    assert _winograd_stages(graph, b) == 2
    for w, bb in zip(weights, biases):
        match = [c for c in convs if c.weight.shape == w.shape and torch.equal(c.weight, w.detach())]
        assert len(match) == 1
        assert rel_err(w.grad, match[0].weight.grad) <= TOLERANCE[torch.float32]
        assert rel_err(bb.grad, match[0].bias.grad) <= TOLERANCE[torch.float32]


def test_unpacking_returns_the_weights_exactly():
    spec = SPECS[0].values[0]
    graph = plan(spec.to_graph())
    weights = [torch.randn(c.out_channels, c.in_channels, c.kh, c.kw) for c in spec.to_graph().convs]
    biases = [torch.randn(c.out_channels) for c in spec.to_graph().convs]
    b, bias = pack_weights(graph, weights, biases, "cpu", winograd=True)
    got_w, got_b = unpack_weights(graph, b, bias, "cpu", spec.in_channels)
    assert all(torch.equal(u, v) for u, v in zip(got_w, weights))
    assert all(torch.equal(u, v) for u, v in zip(got_b, biases))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_only_fp32_is_packed_for_winograd(dtype):
    spec = SPECS[0].values[0]
    graph = plan(spec.to_graph())
    weights = [torch.randn(c.out_channels, c.in_channels, c.kh, c.kw, dtype=dtype) for c in spec.to_graph().convs]
    biases = [torch.randn(c.out_channels, dtype=dtype) for c in spec.to_graph().convs]
    b, _ = pack_weights(graph, weights, biases, "cpu", winograd=True)
    assert _winograd_stages(graph, b) == 0


def test_flop_count_is_the_convolutions_not_the_algorithms():
    """FlopCounterMode counts the fused op as eager's convolutions, whichever way it is packed."""
    spec = SPECS[1].values[0]
    x = torch.randn(2, spec.in_channels, 12, 12)
    ref, graph, wino = _op_inputs(spec, x, True)
    direct = pack_weights(graph, *ifast.FusedInception.from_module(ref)._folded(None), "cpu", winograd=False)
    counts = []
    for packed in (wino, direct):
        with FlopCounterMode(display=False) as c:
            graph_forward(x, *packed, graph.flat())
        counts.append(c.get_total_flops())
    with FlopCounterMode(display=False) as c:
        ref(x)
    assert counts[0] == counts[1] == c.get_total_flops()


@pytest.mark.parametrize("name", ["A", "E"])
def test_inception_v3_blocks(name):
    """InceptionA's double 3x3 chain and InceptionE's 3x3 before its fan-out."""
    block = small_v3_block(name)
    fused = ifast.swap_inception(torch.nn.Sequential(block)).to(memory_format=torch.channels_last)[0]
    assert sum(g.winograd for g in fused._plan.gemms) >= 1
    x = torch.randn(3, 24, 12, 11)
    with torch.no_grad():
        assert rel_err(fused(x), block.double()(x.double())) <= TOLERANCE[torch.float32]


def _centre_tap_block():
    """A block whose 3x3s use only their centre tap, negative there, with a positive bias:
    a huge pixel's own outputs are cut by ReLU, its neighbours' never see it."""
    spec = ifast.InceptionSpec(8, 4, 8, 8, 4, 8, 4, k5=3)
    ref = ifast.ReferenceInception(spec).eval()
    with torch.no_grad():
        for conv in (ref.branch1.conv, ref.branch4[1].conv):
            conv.weight.copy_(-0.01 * conv.weight.abs())
            conv.bias.fill_(1.0)
        for branch in (ref.branch2, ref.branch3):
            branch[0].conv.weight.abs_()
            w = branch[1].conv.weight
            centre = w[:, :, 1, 1].abs().clone()
            w.zero_()
            w[:, :, 1, 1] = -0.1 * centre
            branch[1].conv.bias.fill_(1.0)
    return ref


@pytest.mark.parametrize("big", [1e5, 1e10])
def test_a_huge_value_next_to_zero_weights_stays_within_tolerance(big):
    """The transforms spread a huge window value over the whole tile and cancel it again,
    leaving a few ulps of it in outputs that should not see it (2e-4 relative at 1e6 before
    the cancellation check); such (tile, panel)s are recomputed directly."""
    ref = _centre_tap_block()
    fused = ifast.FusedInception.from_module(ref)
    x = torch.rand(2, 8, 8, 8)  # 32 tiles: Winograd
    x[0, :, 3, 3] = big
    with torch.no_grad():
        want = ref.double()(x.double())
        ref.float()
        assert rel_err(fused(x), want) <= TOLERANCE[torch.float32]


def test_threads_agree_bit_for_bit_when_a_tile_overflows_in_some_columns():
    """Direct recomputes are decided per (tile, weight panel): the same with the threads
    splitting panels (batch 1) as with one thread running them all."""
    spec = ifast.InceptionSpec(8, 4, 8, 64, 4, 8, 4, k5=3)  # the 3x3 stage has two panels
    ref = ifast.ReferenceInception(spec).eval()
    with torch.no_grad():
        reduce, conv = ref.branch2[0].conv, ref.branch2[1].conv
        reduce.weight.zero_()
        reduce.bias.zero_()
        for i in range(8):
            reduce.weight[i, i, 0, 0] = 1.0
        conv.weight.normal_(0, 0.01)
        conv.weight[:32] = 100.0  # the first panel overflows on a huge pixel, the second does not
    fused = ifast.FusedInception.from_module(ref)
    x = torch.rand(1, 8, 8, 15)  # 32 tiles
    x[0, :, 4, 7] = 1e37
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.no_grad():
            one = fused(x)
        torch.set_num_threads(2)
        with torch.no_grad():
            two = fused(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one.isnan(), two.isnan())
    assert torch.equal(one.nan_to_num(), two.nan_to_num())


def _leaf_setup(spec):
    graph = plan(spec.to_graph())
    weights, biases = ifast.FusedInception.from_module(reference_module(spec))._folded(None)
    return graph, [w.detach() for w in weights], [b.detach() for b in biases]


def test_op_backward_takes_each_gemms_packing_as_it_came():
    """One GEMM packed for Winograd, another for the direct GEMM: the bare op's backward
    packs each gradient the way its weight came, and the weights' gradients are right."""
    spec = SPECS[0].values[0]
    graph, weights, biases = _leaf_setup(spec)
    weights = [w.requires_grad_() for w in weights]
    wino, bias = pack_weights(graph, weights, biases, "cpu", winograd=True)
    direct, _ = pack_weights(graph, weights, biases, "cpu", winograd=False)
    mixed = [wino[0], wino[1], direct[2], wino[3]]
    assert _winograd_stages(graph, mixed) == 1
    x = torch.randn(4, spec.in_channels, 9, 8)
    graph_forward(x, mixed, bias, graph.flat()).square().sum().backward()
    got = [w.grad.clone() for w in weights]
    for w in weights:
        w.grad = None
    ref_w = [w.detach().double().requires_grad_() for w in weights]
    ref_b, ref_bias = pack_weights(graph, ref_w, [b.double() for b in biases], "cpu")  # fp64: direct
    graph_forward(x.double(), ref_b, ref_bias, graph.flat()).square().sum().backward()
    for g, r in zip(got, ref_w):
        assert rel_err(g, r.grad) <= TOLERANCE[torch.float32]


def test_stepping_the_packed_tensor_keeps_both_paths_one_filter():
    """The packed tensor's gradient lies in the packing's range: an SGD step on the packed
    weights themselves changes the Winograd blocks and the direct taps alike, so calls with
    many tiles (Winograd) and few (direct) compute the same stepped filter."""
    spec = SPECS[0].values[0]
    graph, weights, biases = _leaf_setup(spec)
    b, bias = pack_weights(graph, weights, biases, "cpu", winograd=True)
    b = [t.clone().requires_grad_() for t in b]
    x = torch.randn(4, spec.in_channels, 9, 8)  # 80 tiles
    graph_forward(x, b, bias, graph.flat()).square().sum().backward()
    with torch.no_grad():
        stepped = [t - 0.01 * t.grad if t.grad is not None and t.numel() else t for t in b]
        w2, b2 = unpack_weights(graph, stepped, bias, "cpu", spec.in_channels)
        repacked = pack_weights(graph, w2, b2, "cpu", winograd=True)
        for many in (True, False):
            xs = x if many else x[:1, :, :7, :7]  # 16 tiles: the direct part
            got = graph_forward(xs, stepped, bias, graph.flat())
            want = graph_forward(xs, *repacked, graph.flat())
            assert rel_err(got, want) <= TOLERANCE[torch.float32]


def test_out_overlapping_the_packed_weights_raises():
    spec = SPECS[0].values[0]
    graph, weights, biases = _leaf_setup(spec)
    b, bias = pack_weights(graph, weights, biases, "cpu", winograd=True)
    x = torch.randn(4, spec.in_channels, 9, 8)
    c = spec.out_channels
    out = torch.as_strided(b[1], (4, c, 9, 8), (c * 72, 1, 8 * c, c))
    with pytest.raises(RuntimeError, match="memory location"):
        torch.ops.inception_fast.graph_forward.out(x, b, bias, graph.flat(), out=out)
