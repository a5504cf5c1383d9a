"""The Winograd weight gradient of fp32 stride-1 3x3, 1x7 and 7x1 convolutions
(csrc/winograd_weight_grad.cpp, torch.ops.inception_fast.winograd_weight_grad) and its hook
in the backward walk (branch_graph.winograd_weight_grad): against float64 ATen, over
awkward shapes and layouts, tiles 2 and 4 (F(2, 7) for the 1-D filters); non-finite inputs
and bad arguments."""

import pytest
import torch

from conftest import TOLERANCE, needs_cpu_kernel, rel_err
from inception_fast.ops import backend, branch_graph
from inception_fast.ops.plan import plan
from inception_fast.spec import Branch, BranchGraphSpec, Conv

pytestmark = needs_cpu_kernel


def _op(x, grad, padding, tile, kh=3, kw=3):
    return torch.ops.inception_fast.winograd_weight_grad(x, grad, padding, tile, kh, kw)


def _want(x, grad, padding):
    w = torch.empty(grad.shape[1], x.shape[1], 3, 3, dtype=torch.float64)
    return torch.ops.aten.convolution_backward(grad.double(), x.double(), w, None, [1, 1], [padding] * 2, [1, 1],
                                               False, [0, 0], 1, [False, True, False])[1]


def _inputs(n, cin, cout, h, w, padding, layout="cl"):
    x = torch.randn(n, cin, h, w).relu_()
    grad = torch.randn(n, cout, h + 2 * padding - 2, w + 2 * padding - 2)
    if layout == "cl":
        return x.contiguous(memory_format=torch.channels_last), grad.contiguous(memory_format=torch.channels_last)
    if layout == "nchw":  # copied channels-last by the op
        return x, grad
    # An NHWC buffer's interior (the walk's intermediates): pixel strides of a bordered plane.
    bordered = torch.zeros(n, h + 2, w + 2, cin + 3)
    bordered[:, 1:-1, 1:-1, 2:2 + cin] = x.permute(0, 2, 3, 1)
    return bordered[:, 1:-1, 1:-1, 2:2 + cin].permute(0, 3, 1, 2), grad.contiguous(memory_format=torch.channels_last)


# (N, cin, cout, H, W): channel counts off the 16-lane and 12-row register tiles, grids that
# the tiles do not divide, a 1-pixel output (3x3 unpadded), more tiles than one 256-tile chunk.
SHAPES = [(2, 17, 33, 11, 11), (1, 5, 7, 9, 6), (3, 40, 24, 14, 14), (2, 16, 12, 3, 3), (1, 1, 1, 5, 8),
          (5, 32, 48, 30, 29)]


@pytest.mark.parametrize("layout", ["cl", "nchw", "interior"])
@pytest.mark.parametrize("padding", [1, 0], ids=["same", "unpadded"])
@pytest.mark.parametrize("tile", [2, 4], ids=["F2x2", "F4x4"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "n{}-{}to{}-{}x{}".format(*s))
def test_matches_float64(shape, tile, padding, layout):
    x, grad = _inputs(*shape, padding, layout)
    got = _op(x, grad, padding, tile)
    assert got.shape == (shape[2], shape[1], 3, 3) and got.dtype == torch.float32 and got.is_contiguous()
    assert rel_err(got, _want(x, grad, padding)) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("filt", [(3, 3), (1, 7), (7, 1)], ids=["3x3", "1x7", "7x1"])
@pytest.mark.parametrize("shape", [(2, 17, 33, 11, 9), (1, 5, 7, 1, 1), (1, 1, 1, 3, 8)],
                         ids=lambda s: "n{}-{}to{}-{}x{}".format(*s))
def test_channels_last_output_holds_the_same_values(shape, filt):
    """channels_last=True: the same values (bit for bit) in a channels_last (K, C, kh, kw)
    tensor, the layout of a channels_last parameter; NaN throughout there too."""
    n, cin, cout, h, w = shape
    kh, kw = filt
    padding = 1 if filt == (3, 3) else 3
    x = torch.randn(n, cin, h, w).relu_().contiguous(memory_format=torch.channels_last)
    grad = torch.randn(n, cout, h, w).contiguous(memory_format=torch.channels_last)
    plain = torch.ops.inception_fast.winograd_weight_grad(x, grad, padding, 2, kh, kw)
    cl = torch.ops.inception_fast.winograd_weight_grad(x, grad, padding, 2, kh, kw, channels_last=True)
    assert cl.is_contiguous(memory_format=torch.channels_last) and (cin == 1 or not cl.is_contiguous())
    assert torch.equal(cl, plain)
    x[0, 0, 0, 0] = float("nan")
    assert torch.isnan(torch.ops.inception_fast.winograd_weight_grad(x, grad, padding, 2, kh, kw,
                                                                     channels_last=True)).all()


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_opcheck_and_empty_sums_keep_the_layout(channels_last):
    """The fake kernel against the real op (opcheck: shapes, strides, schema), and the
    nothing-to-sum path (no output rows: a 3x3 unpadded over 2 rows) in the asked layout."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x, grad = _inputs(2, 8, 16, 6, 6, 1)
    torch.library.opcheck(torch.ops.inception_fast.winograd_weight_grad, (x, grad, 1, 2, 3, 3),
                          {"channels_last": channels_last})
    empty = torch.ops.inception_fast.winograd_weight_grad(torch.randn(1, 5, 2, 6), torch.randn(1, 7, 0, 4), 0, 2,
                                                          channels_last=channels_last)
    assert torch.equal(empty, torch.zeros(7, 5, 3, 3)) and empty.is_contiguous(memory_format=layout)
    assert channels_last == (not empty.is_contiguous())


def test_differs_from_direct_in_rounding():
    """The op is not a disguised direct convolution backward: fp32 results differ in rounding
    between the tiles and from oneDNN's, all within the tolerance of float64."""
    x, grad = _inputs(4, 32, 48, 28, 28, 1)
    f2, f4 = _op(x, grad, 1, 2), _op(x, grad, 1, 4)
    direct = torch.ops.aten.convolution_backward(grad, x, torch.empty(48, 32, 3, 3), None, [1, 1], [1, 1], [1, 1],
                                                 False, [0, 0], 1, [False, True, False])[1]
    assert not torch.equal(f2, f4) and not torch.equal(f4, direct)


# (N, cin, cout, H, W) for the 1-D filters: 1x1 and single-row grids, odd lengths along the
# filter (a 2-output tile half past the edge), channels off the register tiles, and more
# tiles than one chunk.
SHAPES_1D = [(2, 17, 33, 11, 9), (1, 5, 7, 1, 1), (3, 40, 24, 17, 17), (1, 1, 1, 3, 8), (6, 24, 36, 45, 41)]


@pytest.mark.parametrize("layout", ["cl", "nchw"])
@pytest.mark.parametrize("filt", [(1, 7), (7, 1)], ids=["1x7", "7x1"])
@pytest.mark.parametrize("shape", SHAPES_1D, ids=lambda s: "n{}-{}to{}-{}x{}".format(*s))
def test_one_dimensional_filters_match_float64(shape, filt, layout):
    """F(2, 7) along the filter's axis, 'same' padding (3 along it, 0 across)."""
    n, cin, cout, h, w = shape
    kh, kw = filt
    x, grad = torch.randn(n, cin, h, w).relu_(), torch.randn(n, cout, h, w)
    if layout == "cl":
        x, grad = (t.contiguous(memory_format=torch.channels_last) for t in (x, grad))
    got = _op(x, grad, 3, 2, kh, kw)
    want = torch.ops.aten.convolution_backward(grad.double(), x.double(), torch.empty(cout, cin, kh, kw).double(),
                                               None, [1, 1], [kh // 2, kw // 2], [1, 1], False, [0, 0], 1,
                                               [False, True, False])[1]
    assert got.shape == (cout, cin, kh, kw) and got.dtype == torch.float32 and got.is_contiguous()
    assert rel_err(got, want) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("shapes", [((0, 4, 6, 6), (0, 5, 6, 6)), ((2, 0, 6, 6), (2, 5, 6, 6)),
                                    ((2, 4, 6, 6), (2, 0, 6, 6)), ((2, 0, 6, 6), (2, 0, 6, 6))],
                         ids=["empty-batch", "no-cin", "no-cout", "no-channels"])
def test_empty_sums_are_zero(shapes):
    x, grad = torch.zeros(*shapes[0]), torch.zeros(*shapes[1])
    assert torch.equal(_op(x, grad, 1, 4), torch.zeros(shapes[1][1], shapes[0][1], 3, 3))


def test_scratch_past_the_kept_size_then_a_small_call():
    """A call whose scratch passes what is kept between calls (M: 36 x 600 x 608 floats, 52
    MB) frees it on return; the calls after it, small and large again, stay right."""
    for shape in [(1, 600, 600, 8, 8), (2, 17, 33, 11, 11), (1, 600, 600, 8, 8), (3, 40, 24, 14, 14)]:
        x, grad = _inputs(*shape, 1)
        assert rel_err(_op(x, grad, 1, 4), _want(x, grad, 1)) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("tile", [2, 4])
def test_overflowing_transformed_sums_give_nan_throughout(tile):
    """Finite inputs near 1e18: the exact gradient (~1e37) fits float32, but the transformed
    sums may overflow; the op then returns NaN throughout (never a mix of NaN and values),
    and the hook falls back to ATen's direct gradient."""
    torch.manual_seed(0)
    x, grad = torch.randn(1, 4, 8, 8) * 1e18, torch.randn(1, 4, 8, 8) * 1e18
    got = _op(x, grad, 1, tile)
    assert torch.isnan(got).all() or rel_err(got, _want(x, grad, 1)) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("where", ["x", "grad"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_input_gives_nan_and_the_hook_declines(where, value):
    """Non-finite inputs: NaN throughout, so that the hook returns None and the walk runs the
    direct backward, which puts the non-finite values where eager does."""
    x, grad = _inputs(2, 16, 24, 12, 12, 1)
    (x if where == "x" else grad)[1, 3, 5, 7] = value
    assert torch.isnan(_op(x, grad, 1, 4)).all()
    step = plan(BranchGraphSpec(in_channels=16, branches=(Branch(levels=((Conv(16, 24, 3, 3),),)),),
                                pool=None, pool_proj=None)).convs[0]
    assert branch_graph.winograd_weight_grad(grad, x, torch.empty(24, 16, 3, 3), step) is None


def test_hook_picks_the_tile_and_declines_what_does_not_pay(monkeypatch):
    """weight_grad_tile's rules: F(4x4, 3x3) with enough 4x4 tiles, F(2x2, 3x3) with fewer,
    none for few channels or tiny grids; the hook honours backend.WINOGRAD and float32 only."""
    assert branch_graph.weight_grad_tile(16, 56, 56, 64, 192) == 4
    assert branch_graph.weight_grad_tile(4, 14, 14, 160, 320) == 2
    assert branch_graph.weight_grad_tile(1, 7, 7, 192, 384) is None  # 16 tiles of 2x2
    assert branch_graph.weight_grad_tile(32, 28, 28, 16, 32) is None  # few channels
    step = plan(BranchGraphSpec(in_channels=64, branches=(Branch(levels=((Conv(64, 96, 3, 3),),)),),
                                pool=None, pool_proj=None)).convs[0]
    x, grad = _inputs(4, 64, 96, 28, 28, 1)
    weight = torch.empty(96, 64, 3, 3)
    got = branch_graph.winograd_weight_grad(grad, x, weight, step)
    assert got is not None and rel_err(got, _want(x, grad, 1)) <= TOLERANCE[torch.float32]
    assert branch_graph.winograd_weight_grad(grad.double(), x.double(), weight.double(), step) is None
    monkeypatch.setattr(backend, "WINOGRAD", False)
    assert branch_graph.winograd_weight_grad(grad, x, weight, step) is None


def _seven_step(kh: int, kw: int, cin: int, cout: int):
    return plan(BranchGraphSpec(in_channels=cin, branches=(Branch(levels=((Conv(cin, cout, kh, kw),),)),),
                                pool=None, pool_proj=None)).convs[0]


def test_hook_takes_the_wide_seven_by_ones_only():
    """F(2, 7) runs the weight gradients of 7x1s from WEIGHT_GRAD_7X1_MIN_CHANNELS and
    WEIGHT_GRAD_MIN_TILES: Inception-v3's 192 -> 192 at 17x17 and batch 8 takes it (and
    matches float64); its 1x7s, a 128 -> 128 7x1, a 1x1 grid and non-finite inputs do not."""
    x, grad = torch.randn(8, 192, 17, 17).relu_(), torch.randn(8, 192, 17, 17)
    x, grad = (t.contiguous(memory_format=torch.channels_last) for t in (x, grad))
    got = branch_graph.winograd_weight_grad(grad, x, torch.empty(192, 192, 7, 1), _seven_step(7, 1, 192, 192))
    want = torch.ops.aten.convolution_backward(grad.double(), x.double(), torch.empty(192, 192, 7, 1).double(), None,
                                               [1, 1], [3, 0], [1, 1], False, [0, 0], 1, [False, True, False])[1]
    assert got is not None and rel_err(got, want) <= TOLERANCE[torch.float32]
    assert branch_graph.winograd_weight_grad(grad, x, torch.empty(192, 192, 1, 7), _seven_step(1, 7, 192, 192)) is None
    narrow_x, narrow_g = x[:, :128], grad[:, :128]
    assert branch_graph.winograd_weight_grad(narrow_g, narrow_x, torch.empty(128, 128, 7, 1),
                                             _seven_step(7, 1, 128, 128)) is None
    assert branch_graph.winograd_weight_grad(grad[:1, :, :1, :1], x[:1, :, :1, :1], torch.empty(192, 192, 7, 1),
                                             _seven_step(7, 1, 192, 192)) is None
    grad = grad.clone()
    grad[3, 5, 16, 0] = float("inf")
    assert branch_graph.winograd_weight_grad(grad, x, torch.empty(192, 192, 7, 1), _seven_step(7, 1, 192, 192)) is None


@pytest.mark.parametrize("bad, match", [
    (lambda x, g: (x.double(), g.double(), 1, 4), "float32"),
    (lambda x, g: (x, g[:, :, :-1], 1, 4), "maps 8x8 onto 8x8"),
    (lambda x, g: (x, g, 2, 4), "padding must be 1"),
    (lambda x, g: (x, g, 1, 3), "tile must be 2"),
    (lambda x, g: (x[0], g, 1, 4), "4-D"),
    (lambda x, g: (x[:1], g, 1, 4), "same batch"),
    (lambda x, g: (x, g, 2, 2, 5, 5), r"must be \(3, 3\), \(1, 7\) or \(7, 1\)"),
    (lambda x, g: (x, g, 1, 2, 1, 7), "padded 3 along its filter"),
    (lambda x, g: (x, g, 3, 4, 7, 1), "tile must be 2"),
    (lambda x, g: (x, g[:, :, :-1], 3, 2, 1, 7), r"padding \(0, 3\) maps 8x8 onto 8x8"),
])
def test_bad_arguments_raise(bad, match):
    x, grad = _inputs(2, 4, 5, 8, 8, 1)
    with pytest.raises(RuntimeError, match=match):
        _op(*bad(x, grad))
