"""F(2x2, 5x5) on the CPU kernel (csrc/winograd.h): the 5x5 stages of the paper's GoogLeNet
and of Inception-v3's InceptionA (pytorch-fid's Mixed_5b-5d), fp32, stride 1, 'same' or
unpadded, over a buffer or over x; and the data gradient that the walk runs through it.

Each test runs with at least the transform's kMinTiles (32) 2x2 output tiles, so that the
Winograd path runs, and checks that it did: the 5x5's output channels differ in rounding from
the direct implicit GEMM's on the same weights.
"""

import copy

import pytest
import torch

import inception_fast as ifast
from conftest import TOLERANCE, assert_block_matches, needs_cpu_kernel, reference_module, rel_err, small_v3_block
from inception_fast.ops import branch_graph
from inception_fast.ops.branch_graph import (graph_forward, pack_weights, unpack_weights, winograd_packed,
                                             winograd_tiles)
from inception_fast.ops.plan import plan
from inception_fast.spec import Branch, BranchGraphSpec, Conv

pytestmark = needs_cpu_kernel

# 5x5s of 41 -> 47 channels (odd, past a SIMD lane multiple) and 32 -> 64 (lane multiples);
# both at or above WINOGRAD_5X5_MIN_CHANNELS, so modules pack them for Winograd too.
SPECS = [pytest.param(ifast.InceptionSpec(20, 17, 33, 35, 41, 47, 21), id="odd-channels"),
         pytest.param(ifast.InceptionSpec(40, 16, 32, 48, 32, 64, 16), id="lane-multiples")]
# (N, H, W): odd and even grids, a 1-pixel grid, batch 1 (the threads split columns).
SIZES = [pytest.param(s, id="n{}-{}x{}".format(*s)) for s in [(8, 7, 9), (1, 15, 13), (40, 1, 1), (5, 2, 17)]]


def _five(spec) -> slice:
    """The 5x5 branch's output channels."""
    lo = spec.ch1x1 + spec.ch3x3
    return slice(lo, lo + spec.ch5x5)


def _packings(spec):
    ref = reference_module(spec)
    graph = plan(spec.to_graph())
    weights, biases = ifast.FusedInception.from_module(ref)._folded(None)
    wino = pack_weights(graph, weights, biases, "cpu", winograd=True)
    direct = pack_weights(graph, weights, biases, "cpu", winograd=False)
    return ref, graph, wino, direct


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("spec", SPECS)
def test_forward_within_fp32_tolerance_and_not_the_direct_path(spec, size):
    ref, graph, wino, direct = _packings(spec)
    assert [winograd_packed(graph, g, t) for g, t in zip(graph.gemms, wino[0]) if g.kh == 5] == [2]
    x = torch.randn(size[0], spec.in_channels, *size[1:])
    with torch.no_grad():
        got, y_direct = graph_forward(x, *wino, graph.flat()), graph_forward(x, *direct, graph.flat())
        want = ref.double()(x.double())
    five = _five(spec)
    assert rel_err(got, want) <= TOLERANCE[torch.float32]
    assert rel_err(got[:, five], want[:, five]) <= TOLERANCE[torch.float32]
    assert not torch.equal(got[:, five], y_direct[:, five]), "the F(2x2, 5x5) stage did not run"


def test_modules_pack_5x5s_by_their_channels():
    """winograd_tiles: a 5x5 from WINOGRAD_5X5_MIN_CHANNELS of cin cout / (cin + cout)
    (41 -> 47: 21.9), not below (the paper GoogLeNet's 3a, 16 -> 32: 10.7)."""
    for spec, want in ((SPECS[0].values[0], True), (ifast.GOOGLENET_INCEPTION["3a"].spec, False)):
        graph = plan(spec.to_graph())
        assert [f for g, f in zip(graph.gemms, winograd_tiles(graph, 28, 28)) if g.kh == 5] == [want]


def test_one_and_two_threads_agree_bit_for_bit():
    spec = SPECS[0].values[0]
    _, graph, wino, _ = _packings(spec)
    x = torch.randn(1, spec.in_channels, 17, 14)  # batch 1: the threads split the weight panels
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = graph_forward(x, *wino, graph.flat())
        torch.set_num_threads(2)
        two = graph_forward(x, *wino, graph.flat())
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_non_finite_values_land_where_eager_puts_them():
    """A NaN or inf reaches a whole tile through the transforms (a 6x6 window feeds 2x2
    outputs); such tiles are recomputed directly, so NaN, +inf and -inf land where the
    reference puts them."""
    spec = SPECS[0].values[0]
    ref, graph, wino, _ = _packings(spec)
    x = torch.randn(4, spec.in_channels, 18, 13)
    x[0, 2, 3, 4] = float("nan")
    x[-1, 5, 0, 12] = float("inf")  # the border tile of an odd width
    x[-1, 7, 9, 0] = float("-inf")
    x[1, :, 13, 6] = float("inf")  # every channel: inf - inf in the 1x1 reductions too
    with torch.no_grad():
        got = graph_forward(x, *wino, graph.flat())
        want = ref(x)
    assert torch.isnan(want[:, _five(spec)]).any()
    for same in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(same(got), same(want))
    finite = torch.isfinite(want)
    assert rel_err(got[finite], want[finite]) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("big", [1e5, 1e10])
def test_a_huge_value_next_to_zero_weights_stays_within_tolerance(big, monkeypatch):
    """A 5x5 of only its centre tap, negative, behind a positive bias: a huge pixel's own
    outputs are cut by ReLU and its neighbours' never see it. The transforms spread it over
    the tile and cancel it again; the cancellation check has those tiles recomputed."""
    monkeypatch.setattr(branch_graph, "WINOGRAD_5X5_MIN_CHANNELS", 0)
    ref = ifast.ReferenceInception(ifast.InceptionSpec(8, 4, 8, 8, 4, 8, 4)).eval()
    with torch.no_grad():
        for conv in (ref.branch1.conv, ref.branch2[1].conv, ref.branch4[1].conv):
            conv.weight.copy_(-0.01 * conv.weight.abs())
            conv.bias.fill_(1.0)
        ref.branch3[0].conv.weight.abs_()
        w = ref.branch3[1].conv.weight
        centre = w[:, :, 2, 2].abs().clone()
        w.zero_()
        w[:, :, 2, 2] = -0.1 * centre
        ref.branch3[1].conv.bias.fill_(1.0)
    fused = ifast.FusedInception.from_module(ref)
    x = torch.rand(2, 8, 16, 16)  # 128 2x2 tiles
    x[0, :, 3, 3] = big
    with torch.no_grad():
        want = ref.double()(x.double())
        ref.float()
        got = fused(x)
    assert rel_err(got, want) <= TOLERANCE[torch.float32]


def test_module_forward_and_backward_match_the_reference():
    spec = SPECS[1].values[0]
    ref = reference_module(spec)
    fused = ifast.FusedInception.from_module(ref)
    assert_block_matches(fused, ref, torch.randn(4, spec.in_channels, 9, 16))


@pytest.mark.parametrize("spec", SPECS)
def test_gradients_through_the_packed_weights_reach_the_convolutions(spec):
    """Autograd over the bare op (what jit.trace records): the packed tensors' gradients pull
    back through pack_weights, the 5x5's through its F(2x2, 5x5) transform (G5), to each
    filter's own gradient; and an SGD step on the packed tensor itself keeps its U blocks and
    direct taps one filter (calls with many tiles and with few compute the same)."""
    ref = reference_module(spec)
    graph = plan(spec.to_graph())
    weights, biases = (list(t.detach() for t in ts) for ts in ifast.FusedInception.from_module(ref)._folded(None))
    leaves = [w.clone().requires_grad_() for w in weights]
    b, bias = pack_weights(graph, leaves, biases, "cpu", winograd=True)
    five = next(i for i, g in enumerate(graph.gemms) if g.kh == 5)
    assert winograd_packed(graph, graph.gemms[five], b[five]) == 2
    x = torch.randn(4, spec.in_channels, 10, 9)
    graph_forward(x, b, bias, graph.flat()).square().sum().backward()
    ref64 = [w.double().requires_grad_() for w in weights]
    ref_b, ref_bias = pack_weights(graph, ref64, [t.double() for t in biases], "cpu")  # fp64: direct
    graph_forward(x.double(), ref_b, ref_bias, graph.flat()).square().sum().backward()
    assert any(w.shape[-1] == 5 for w in leaves)
    for got, want in zip(leaves, ref64):
        assert rel_err(got.grad, want.grad) <= TOLERANCE[torch.float32]
    packed = [t.detach().requires_grad_() for t in b]
    graph_forward(x, packed, bias, graph.flat()).square().sum().backward()
    with torch.no_grad():
        stepped = [t - 1e-3 * t.grad for t in packed]
        w2, b2 = unpack_weights(graph, stepped, bias, "cpu", spec.in_channels)
        repacked = pack_weights(graph, w2, b2, "cpu", winograd=True)
        for xs in (x, x[:1, :, :5, :5]):  # 90 2x2 tiles, or 9: the direct part
            assert rel_err(graph_forward(xs, stepped, bias, graph.flat()),
                           graph_forward(xs, *repacked, graph.flat())) <= TOLERANCE[torch.float32]


# A 5x5 straight over x, 'same' (read from a zero-bordered copy) or unpadded (tiles over the
# (H - 4) x (W - 4) grid).
OVER_X = {"same": True, "valid": False}


@pytest.mark.parametrize("size", [(8, 9, 11), (1, 16, 18), (40, 5, 5), (3, 8, 17)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("padded", list(OVER_X.values()), ids=list(OVER_X))
def test_a_5x5_over_x_within_fp32_tolerance_and_not_the_direct_path(padded, size):
    spec = BranchGraphSpec(6, (Branch(((Conv(6, 10, 5, 5, padded=padded),),)),), None, None)
    graph = plan(spec)
    w, b = torch.randn(10, 6, 5, 5) / 150 ** 0.5, torch.randn(10) * 0.1
    x = torch.randn(size[0], 6, *size[1:])
    wino = pack_weights(graph, [w], [b], "cpu", winograd=True)
    direct = pack_weights(graph, [w], [b], "cpu", winograd=False)
    assert winograd_packed(graph, graph.gemms[0], wino[0][0], 6) == 2
    got, y_direct = graph_forward(x, *wino, graph.flat()), graph_forward(x, *direct, graph.flat())
    want = torch.relu(torch.nn.functional.conv2d(x.double(), w.double(), b.double(), padding=2 if padded else 0))
    assert got.shape == want.shape
    assert rel_err(got, want) <= TOLERANCE[torch.float32]
    assert not torch.equal(got, y_direct), "the F(2x2, 5x5) stage did not run"


@pytest.mark.parametrize("train", [False, True], ids=["eval-walk", "train-bn"])
def test_backward_takes_the_5x5_data_gradient(train, monkeypatch, data_grad_spy):
    """The walk's data gradient of InceptionA's 5x5 (48 -> 64) runs as the forward's
    F(2x2, 5x5) over the output gradient (thresholds off: branch_graph's data_grad_pays),
    in the eval form's backward and the train-mode BN form's; dx and every parameter's
    gradient match the eager block."""
    from inception_fast.fused_graph import FusedBranchGraph

    monkeypatch.setattr(FusedBranchGraph, "bn_train_min_pixels", 0)
    from inception_fast.ops import branch_graph_bn_train

    monkeypatch.setattr(branch_graph_bn_train, "WINOGRAD_MIN_PIXELS", 0)
    original = small_v3_block("A", 12)
    fused = ifast.swap_inception(torch.nn.Sequential(copy.deepcopy(original)))[0]
    if train:
        original.train()
        fused.train()
    x = torch.randn(2, 12, 12, 12)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    y0, y1 = original(xs[0]), fused(xs[1])
    grad_out = torch.randn_like(y0)
    y0.backward(grad_out)
    y1.backward(grad_out)
    assert any(shape[2:4] == (5, 5) for shape in data_grad_spy), data_grad_spy
    assert rel_err(y1, y0) <= TOLERANCE[torch.float32] and rel_err(xs[1].grad, xs[0].grad) <= TOLERANCE[torch.float32]
    for (name, p0), p1 in zip(original.named_parameters(), fused.parameters()):
        assert rel_err(p1.grad, p0.grad) <= TOLERANCE[torch.float32], name
