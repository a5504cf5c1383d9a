"""The train-mode BN form of the fused op (ops/branch_graph_bn_train.py) against eager
nn.BatchNorm2d: outputs, every gradient (x, conv weights, gamma, beta) with one
grad_output, running statistics and num_batches_tracked, on torchvision's GoogLeNet and
Inception-v3 blocks; and where the form does not apply, the original runs."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

import inception_fast as ifast
from inception_fast.fused_graph import FusedBranchGraph

from conftest import needs_cpu_kernel, randomize_, rel_err, small_v3_block

pytestmark = needs_cpu_kernel

@pytest.fixture(autouse=True)
def fuse_every_call(monkeypatch):
    """These tests' grids are small: fuse them anyway (bn_train_min_pixels, tested below)."""
    monkeypatch.setattr(FusedBranchGraph, "bn_train_min_pixels", 0)


# The table for this form: fp64 to 1e-10, fp32 to 1e-5 relative (norm-wise).
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def googlenet_block(in_channels: int = 10) -> nn.Module:
    from torchvision.models.googlenet import Inception

    return randomize_(Inception(in_channels, 4, 5, 7, 3, 6, 5)).eval()


BLOCKS = {
    "googlenet": (googlenet_block, 10),
    **{f"v3-{k}": ((lambda k=k: small_v3_block(k, 12)), 12) for k in "ABCDE"},
}


def _pair(kind: str, dtype: torch.dtype):
    make, channels = BLOCKS[kind]
    original = make().to(dtype).train()
    fused = _swapped(original)
    # Every call below must take the fused form: the original never runs.
    fused._original[0].register_forward_pre_hook(lambda *a: pytest.fail("the original block ran"))
    return original, fused, channels


def _swapped(block: nn.Module) -> FusedBranchGraph:
    """The block as swap_inception fuses it (GoogLeNet's as FusedInception), in its mode."""
    fused = ifast.swap_inception(nn.Sequential(copy.deepcopy(block)))[0]
    assert isinstance(fused, FusedBranchGraph)
    return fused.train(block.training)


def _grads(model: nn.Module, x: torch.Tensor, grad_out: torch.Tensor):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y = model(x)
    y.backward(grad_out)
    return y, x.grad, {n: p.grad for n, p in model.named_parameters()}


def _assert_buffers(original: nn.Module, fused: nn.Module, tol: float):
    ob, fb = dict(original.named_buffers()), dict(fused.named_buffers())
    assert ob.keys() == fb.keys()
    for name, want in ob.items():
        if want.is_floating_point():
            assert rel_err(fb[name], want) <= tol, name
        else:
            assert torch.equal(fb[name], want), name


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("kind", list(BLOCKS))
@pytest.mark.parametrize("shape", [(3, 7, 7), (2, 6, 5), (1, 9, 4)], ids=["3x7x7", "2x6x5", "1x9x4"])
def test_forward_backward_and_running_stats_match_eager(kind, dtype, shape):
    original, fused, channels = _pair(kind, dtype)
    n, h, w = shape
    x = torch.randn(n, channels, h, w, dtype=dtype)
    grad_out = torch.randn_like(original(x.clone()))  # the original's first step, mirrored below
    with torch.no_grad():
        fused(x)
    y0, dx0, g0 = _grads(original, x, grad_out)
    y1, dx1, g1 = _grads(fused, x, grad_out)
    tol = TOL[dtype]
    assert rel_err(y1, y0) <= tol
    assert rel_err(dx1, dx0) <= tol
    assert g0.keys() == g1.keys() and any(".bn." in k for k in g0)
    for name, want in g0.items():
        assert rel_err(g1[name], want) <= tol, name
    _assert_buffers(original, fused, tol)


def _stem_unit(padding: int) -> nn.Module:
    from torchvision.models.googlenet import BasicConv2d

    return randomize_(BasicConv2d(10, 24, kernel_size=3, padding=padding)).eval()


@pytest.mark.parametrize("kind", ["googlenet", "v3-E", "stem", "stem-unpadded"])
def test_winograd_data_gradients_match_eager(kind, monkeypatch, data_grad_spy, weight_grad_spy):
    """fp32 3x3 data gradients through the forward kernel's Winograd form (graph_forward_linear
    over the output gradient with the flipped, transposed weight), and weight gradients
    through winograd_weight_grad (each tile): over intermediates, and
    over x for a stem's conv units (swap_inception(convs=True)), 'same' and unpadded (Inception-v3's
    Conv2d_2a and 4a: the 'full' correlation of the bordered gradient). Thresholds off, so that
    these small grids take it; spies check that they did."""
    from inception_fast.ops import branch_graph_bn_train as bn_train

    monkeypatch.setattr(bn_train, "WINOGRAD_MIN_PIXELS", 0)
    planned = data_grad_spy
    if kind.startswith("stem"):
        original, channels = _stem_unit(0 if kind == "stem-unpadded" else 1).train(), 10
        fused = ifast.swap_inception(nn.Sequential(copy.deepcopy(original)), convs=True)[0].train()
        assert isinstance(fused, FusedBranchGraph)
    else:
        original, fused, channels = _pair(kind, torch.float32)
    x = torch.randn(2, channels, 12, 12)  # F(2x2, 3x3): 72 tiles, over the kernel's 64
    grad_out = torch.randn_like(original(x.clone()))
    y0, dx0, g0 = _grads(original, x, grad_out)
    y1, dx1, g1 = _grads(fused, x, grad_out)
    assert planned and all(shape[2:4] == (3, 3) for shape in planned)
    assert weight_grad_spy and all(t is not None for t in weight_grad_spy)
    assert rel_err(y1, y0) <= TOL[torch.float32]
    assert rel_err(dx1, dx0) <= TOL[torch.float32]
    for name, want in g0.items():
        assert rel_err(g1[name], want) <= TOL[torch.float32], name


def test_seven_by_one_weight_gradients_match_eager(monkeypatch):
    """Inception-v3's InceptionC (1x7 and 7x1 chains) in the train form with the 7x1s' weight
    gradients as F(2, 7) (winograd_weight_grad; thresholds off so that a small block takes
    them, and a spy that they ran): output, dx, every conv weight, gamma and beta against
    eager."""
    from inception_fast.ops import branch_graph

    monkeypatch.setattr(branch_graph, "WEIGHT_GRAD_7X1_MIN_CHANNELS", 0)
    monkeypatch.setattr(branch_graph, "WEIGHT_GRAD_MIN_TILES", 0)
    taken = []
    real = torch.ops.inception_fast.winograd_weight_grad

    def spy(x, grad, padding, tile, kh=3, kw=3, channels_last=False):
        taken.append((kh, kw))
        return real(x, grad, padding, tile, kh, kw, channels_last=channels_last)

    monkeypatch.setattr(branch_graph.torch.ops.inception_fast, "winograd_weight_grad", spy)
    original, fused, channels = _pair("v3-C", torch.float32)
    x = torch.randn(2, channels, 9, 11)
    grad_out = torch.randn_like(original(x.clone()))
    y0, dx0, g0 = _grads(original, x, grad_out)
    y1, dx1, g1 = _grads(fused, x, grad_out)
    assert (7, 1) in taken and (1, 7) not in taken
    assert rel_err(y1, y0) <= TOL[torch.float32]
    assert rel_err(dx1, dx0) <= TOL[torch.float32]
    for name, want in g0.items():
        assert rel_err(g1[name], want) <= TOL[torch.float32], name


@pytest.mark.parametrize("kernel", [3, 1])
def test_one_output_channel_with_an_nchw_grad_output(kernel):
    """A unit of one output channel, its grad_output plain NCHW: that channel's rows have
    stride H*W in a dimension of size 1, which the C++ BN backward once refused."""
    from torchvision.models.googlenet import BasicConv2d

    original = randomize_(BasicConv2d(3, 1, kernel_size=kernel, padding=kernel // 2)).train()
    fused = ifast.swap_inception(nn.Sequential(copy.deepcopy(original)), convs=True)[0].train()
    assert isinstance(fused, FusedBranchGraph)
    x = torch.randn(2, 3, 8, 8)
    grad_out = torch.randn(2, 1, 8, 8)
    y0, dx0, g0 = _grads(original, x, grad_out)
    y1, dx1, g1 = _grads(fused, x, grad_out)
    assert y1.grad_fn is not None and rel_err(y1, y0) <= TOL[torch.float32]
    assert rel_err(dx1, dx0) <= TOL[torch.float32]
    for name, want in g0.items():
        assert rel_err(g1[name], want) <= TOL[torch.float32], name


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format], ids=["cl", "nchw"])
def test_output_has_eager_memory_format(memory_format):
    original, fused, channels = _pair("googlenet", torch.float32)
    x = torch.randn(2, channels, 6, 6).contiguous(memory_format=memory_format)
    want, got = original(x), fused(x)
    assert got.is_contiguous(memory_format=memory_format) and want.is_contiguous(memory_format=memory_format)
    assert rel_err(got, want) <= TOL[torch.float32]


def test_momentum_none_is_the_cumulative_average_over_steps():
    original, fused, channels = _pair("v3-A", torch.float64)
    for model in (original, fused):
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
    for step in range(3):
        x = torch.randn(2, channels, 5, 5, dtype=torch.float64) * (step + 1)
        with torch.no_grad():
            assert rel_err(fused(x), original(x)) <= TOL[torch.float64]
    _assert_buffers(original, fused, TOL[torch.float64])
    assert fused.branch1x1.bn.num_batches_tracked.item() == 3


def test_affine_false_bns_train_their_convolutions():
    original = googlenet_block().double()
    for m in original.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.affine, m.weight, m.bias = False, None, None
    original.train()
    fused = _swapped(original)
    x = torch.randn(2, 10, 5, 5, dtype=torch.float64)
    grad_out = torch.randn(2, 4 + 7 + 6 + 5, 5, 5, dtype=torch.float64)
    y0, dx0, g0 = _grads(original, x, grad_out)
    y1, dx1, g1 = _grads(fused, x, grad_out)
    assert rel_err(y1, y0) <= 1e-10 and rel_err(dx1, dx0) <= 1e-10
    assert g0.keys() == g1.keys()
    for name in g0:
        assert rel_err(g1[name], g0[name]) <= 1e-10, name


class BiasedBlock(nn.Module):
    """A user's block whose convolutions keep their biases before BN: eager's BN cancels
    them in the output, not in their own gradients (the sums of dz, ~0)."""

    def __init__(self):
        super().__init__()

        def unit(cin, cout, k):
            return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2), nn.BatchNorm2d(cout), nn.ReLU())

        self.a = unit(6, 5, 1)
        self.b = nn.Sequential(unit(6, 4, 1), unit(4, 7, 3))
        self.pool = nn.Sequential(nn.MaxPool2d(3, 1, 1), unit(6, 3, 1))

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x), self.pool(x)], 1)


def test_convolution_biases_before_bn():
    original = randomize_(BiasedBlock()).double().train()
    fused = _swapped(original)
    fused._original[0].register_forward_pre_hook(lambda *a: pytest.fail("the original block ran"))
    x = torch.randn(3, 6, 5, 5, dtype=torch.float64)
    grad_out = torch.randn(3, 15, 5, 5, dtype=torch.float64)
    y0, dx0, g0 = _grads(original, x, grad_out)
    y1, dx1, g1 = _grads(fused, x, grad_out)
    assert rel_err(y1, y0) <= 1e-10 and rel_err(dx1, dx0) <= 1e-10
    for name in g0:
        if name.endswith("0.bias") and g0[name].abs().max() < 1e-12:  # a conv bias: sum of dz, ~0 both
            assert g1[name].abs().max() < 1e-12, name
        else:
            assert rel_err(g1[name], g0[name]) <= 1e-10, name


def test_one_value_per_channel_raises_as_eager_does():
    """Batch 1 through a grid reduction onto a 1x1 grid: eager's BN raises ValueError."""
    original, fused, channels = _pair("v3-B", torch.float32)
    x = torch.randn(1, channels, 3, 3)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training") as eager:
        original(x)
    before = {k: v.clone() for k, v in fused.state_dict().items()}
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training") as ours:
        fused(x)
    assert str(ours.value) == str(eager.value)
    assert all(torch.equal(v, before[k]) for k, v in fused.state_dict().items())  # raised before any update


def test_nan_poisons_the_same_outputs_as_eager():
    """A NaN in x reaches every 1x1 over x, so every BN's statistics: all NaN, as eager.
    A NaN in one weight row poisons only that convolution's channel (its statistics) and
    what reads it."""
    original, fused, channels = _pair("v3-A", torch.float32)
    x = torch.randn(2, channels, 6, 6)
    poisoned = x.clone()
    poisoned[1, 3, 2, 4] = float("nan")
    with torch.no_grad():
        assert torch.isnan(fused(poisoned)).all() and torch.isnan(original(poisoned)).all()
        for model in (original, fused):
            model.branch5x5_1.conv.weight[2, 0] = float("nan")
        want, got = original(x), fused(x)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    finite = ~torch.isnan(want)
    assert torch.isnan(want).any() and finite.any()
    assert rel_err(got[finite], want[finite]) <= TOL[torch.float32]


@pytest.mark.parametrize("kind", ["googlenet", "stem"])
def test_nan_gradients_match_eager(kind):
    """The backward through NaN activations: eager's ReLU backward (threshold_backward) keeps
    the gradient where the activation is NaN (NaN <= 0 is false), so BN's beta gradient is
    the plain sum of grad_output there. The C++ mask once dropped it (it kept only act > 0)."""
    if kind == "stem":
        original, channels = _stem_unit(1).train(), 10
        fused = ifast.swap_inception(nn.Sequential(copy.deepcopy(original)), convs=True)[0].train()
    else:
        original, fused, channels = _pair(kind, torch.float32)
    x = torch.randn(2, channels, 7, 7)
    x[0, 1, 2, 2] = float("nan")
    grad_out = torch.randn_like(original(x.clone()))
    _, _, g0 = _grads(original, x, grad_out)
    _, _, g1 = _grads(fused, x, grad_out)
    betas = [k for k in g0 if k.endswith("bn.bias")]
    # The units that write the output have finite beta gradients (those feeding another
    # convolution get NaN ones, from the NaN statistics behind them).
    assert any(torch.isfinite(g0[k]).any() for k in betas)
    for name in betas:
        want, got = g0[name], g1[name]
        assert torch.equal(torch.isnan(got), torch.isnan(want)), name
        finite = ~torch.isnan(want)
        if finite.any():
            assert rel_err(got[finite], want[finite]) <= TOL[torch.float32], name


def test_mixed_bn_modes_run_the_original():
    """One BN frozen (eval) among train-mode ones: neither the fold nor the train form."""
    block = googlenet_block().train()
    fused = _swapped(block)
    block.branch1.bn.eval(), fused.branch1.bn.eval()
    calls = []
    fused._original[0].register_forward_pre_hook(lambda *a: calls.append(1))
    x = torch.randn(2, 10, 5, 5)
    assert rel_err(fused(x), block(x)) <= TOL[torch.float32] and calls


def test_a_bn_subclass_with_its_own_forward_is_left_alone(caplog):
    """A BN subclass outside torch.nn is traced through, so the swap reads its forward
    (here it fails to: BN's forward branches on its flags) and never assumes BN's math."""
    class Scaled(nn.BatchNorm2d):
        def forward(self, x):
            return 2 * super().forward(x)

    block = googlenet_block()
    block.branch1.bn = Scaled(4, eps=0.001).eval()
    with caplog.at_level(logging.WARNING, logger="inception_fast"):
        model = ifast.swap_inception(nn.Sequential(copy.deepcopy(block)))
    assert not isinstance(model[0], FusedBranchGraph) and "unfused" in caplog.text


def test_sync_batch_norm_is_refused_at_swap_time(caplog):
    model = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(googlenet_block()))
    with caplog.at_level(logging.WARNING, logger="inception_fast"):
        swapped = ifast.swap_inception(model)
    assert not isinstance(swapped[0], FusedBranchGraph)
    assert "(SyncBatchNorm) is not a plain nn.BatchNorm2d" in caplog.text


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_under_compile_train_mode_runs_the_form_as_one_graph(momentum, monkeypatch):
    """torch.compile(fullgraph=True) of a swapped block in train mode: the form runs as the
    graph_bn_train custom op (a spy on its body), three steps match eager (output, every
    gradient, running statistics, num_batches_tracked) with no recompile, and momentum=None
    (the cumulative average, a tensor factor under compile) too."""
    from inception_fast.ops import branch_graph_bn_train as bn_train

    torch._dynamo.reset()
    original, fused, channels = _pair("googlenet", torch.float32)
    for model in (original, fused):
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = momentum
    compiled = torch.compile(fused, fullgraph=True)
    x = torch.randn(3, channels, 7, 7)
    grad_out = torch.randn_like(original(x.clone()))
    with torch.no_grad():
        fused(x)  # the eager form's first step, as the original's above
    ran = []  # graph_bn_train's body (the eager form's forward calls _cpu_run too, so only from here)
    cpu_run = bn_train._cpu_run
    monkeypatch.setattr(bn_train, "_cpu_run", lambda *a: ran.append(1) or cpu_run(*a))
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for step in range(3):
        y0, dx0, g0 = _grads(original, x * (step + 1), grad_out)
        y1, dx1, g1 = _grads(compiled, x * (step + 1), grad_out)
        assert rel_err(y1, y0) <= TOL[torch.float32] and rel_err(dx1, dx0) <= TOL[torch.float32]
        for name, want in g0.items():
            assert rel_err(g1["_orig_mod." + name], want) <= TOL[torch.float32], name
        _assert_buffers(original, fused, TOL[torch.float32])
    assert len(ran) == 3
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - frames == 1  # no recompile


@pytest.mark.parametrize("weight_format", [torch.contiguous_format, torch.channels_last], ids=["nchw-w", "cl-w"])
def test_the_compile_ops_pass_opcheck(weight_format):
    """The custom ops' fake kernels and autograd against their real ones
    (torch.library.opcheck: schema, fake tensor shapes and strides, autograd registration);
    channels_last weights get channels_last gradients on both."""
    from inception_fast.ops import branch_graph_bn_train as bn_train
    from inception_fast.ops.branch_graph import pack_weights

    original, fused, channels = _pair("googlenet", torch.float32)
    graph = fused._plan
    x = torch.randn(2, channels, 6, 5, requires_grad=True)
    weights = [u.conv.weight.detach().clone().contiguous(memory_format=weight_format).requires_grad_()
               for u in fused._units]
    biases = [w.new_zeros(w.shape[0]).requires_grad_() for w in weights]
    bns = [bn_train.BatchNormTrain(bn.weight, bn.bias, bn.eps, None) for bn in fused._bns]
    b, bias = pack_weights(graph, weights, biases, "cpu", False)
    params = [p.detach().requires_grad_() for p in bn_train._bn_params(graph, x, bns)]
    args = (x, [t.detach() for t in b], [t.detach() for t in bias], params, weights, biases, graph.flat(),
            fused._backward_plan, list(bn_train._segments(graph).z_index))
    torch.library.opcheck(bn_train.graph_bn_train, args)

def test_an_in_place_op_on_the_output_keeps_gradients_right():
    """The backward keeps no reference to the output (its ReLU masks come from the pre-BN
    sums), so an in-place op on it works as on eager's concat."""
    original, fused, channels = _pair("v3-A", torch.float64)
    x = torch.randn(2, channels, 5, 5, dtype=torch.float64)
    grads = []
    for model in (original, fused):
        xx = x.clone().requires_grad_()
        y = model(xx)
        y.mul_(2).sub_(0.5)
        y.sum().backward()
        grads.append(xx.grad)
    assert rel_err(grads[1], grads[0]) <= TOL[torch.float64]


def test_below_the_pixel_threshold_the_original_runs(monkeypatch):
    """bn_train_min_pixels: under it (N x H x W of x) the original block runs, with the same
    batch statistics and running-stat updates; at it, the fused form."""
    monkeypatch.setattr(FusedBranchGraph, "bn_train_min_pixels", 2 * 6 * 6)
    block = googlenet_block().train()
    fused = _swapped(block)
    calls = []
    fused._original[0].register_forward_pre_hook(lambda *a: calls.append(1))
    for n, ran_original in ((1, True), (2, False)):
        calls.clear()
        x = torch.randn(n, 10, 6, 6)
        assert rel_err(fused(x), block(x)) <= TOL[torch.float32]
        assert bool(calls) == ran_original
    _assert_buffers(block, fused, TOL[torch.float32])


def test_second_order_gradients_raise_and_fuse_train_bn_false_gives_eager():
    """A gradient penalty (WGAN-GP): create_graph=True through the form raises, even where
    grad_out needs no grad (once_differentiable alone then dropped the block's terms in
    silence); with fuse_train_bn False the block runs the original, eager's gradients."""
    original, fused, channels = _pair("googlenet", torch.float64)
    x = torch.randn(2, channels, 5, 5, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="second-order gradients.*fuse_train_bn = False"):
        torch.autograd.grad(fused(x).sum(), x, create_graph=True)
    fused._original[0]._forward_pre_hooks.clear()
    fused.fuse_train_bn = False
    penalties = []
    for model in (original, fused):
        model.zero_grad(set_to_none=True)
        y = model(x)
        (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
        (y.mean() + 10 * (gx.norm() - 1) ** 2).backward()
        penalties.append(model.branch1.conv.weight.grad)
    assert rel_err(penalties[1], penalties[0]) <= TOL[torch.float64]


def test_track_running_stats_switched_off_after_the_swap_leaves_the_buffers():
    original, fused, channels = _pair("v3-A", torch.float64)
    for model in (original, fused):
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.track_running_stats = False  # the buffers stay; eager's train forward skips them
    x = torch.randn(2, channels, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(fused(x), original(x)) <= TOL[torch.float64]
    _assert_buffers(original, fused, 0.0)


def test_an_empty_batch_runs_the_original():
    original, fused, channels = _pair("googlenet", torch.float64)
    fused._original[0]._forward_pre_hooks.clear()
    x = torch.randn(0, channels, 5, 7, dtype=torch.float64, requires_grad=True)
    y = fused(x)
    y.sum().backward()
    assert y.shape == original(x.detach()).shape and x.grad.shape == x.shape
    _assert_buffers(original, fused, 0.0)


@pytest.mark.parametrize("scale, eps", [(1e150, 1e-3), (1e-120, 1e-250)], ids=["huge", "tiny"])
def test_float64_at_extreme_magnitudes(scale, eps):
    """invstd passes 1e100 or z 1e150: the backward factors as ATen's (invstd^3 in one
    product overflowed or underflowed)."""
    original, fused, channels = _pair("googlenet", torch.float64)
    for model in (original, fused):
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eps = eps
    x = torch.randn(2, channels, 5, 7, dtype=torch.float64) * scale
    grad_out = torch.randn(2, 22, 5, 7, dtype=torch.float64)
    y0, dx0, _ = _grads(original, x, grad_out)
    y1, dx1, _ = _grads(fused, x, grad_out)
    assert rel_err(y1, y0) <= TOL[torch.float64] and rel_err(dx1 * scale, dx0 * scale) <= TOL[torch.float64]


def test_an_infinite_first_value_gives_eager_running_mean():
    """The statistics' shift is a channel's first value, or 0 where it is infinite (inf - inf
    made the mean NaN where eager's is inf)."""
    original, fused, channels = _pair("v3-B", torch.float64)
    with torch.no_grad():
        for model in (original, fused):
            for m in model.modules():
                if isinstance(m, nn.Conv2d):
                    m.weight.abs_()
    x = torch.rand(2, channels, 5, 7, dtype=torch.float64)
    x[0, :, 0, 0] = float("inf")
    with torch.no_grad():
        original(x), fused(x)
    want, got = original.branch3x3dbl_1.bn.running_mean, fused.branch3x3dbl_1.bn.running_mean
    assert torch.isinf(want).all() and torch.equal(got, want)


def test_a_forward_set_on_a_bn_instance_runs_the_original():
    original = googlenet_block().train()
    fused = _swapped(original)
    for model in (original, fused):
        bn = model.branch1.bn
        bn.forward = lambda x, bn=bn: 2 * nn.BatchNorm2d.forward(bn, x)
    x = torch.randn(2, 10, 5, 5)
    assert rel_err(fused(x), original(x)) <= TOL[torch.float32]


def test_eval_after_a_train_step_of_the_original_sees_the_new_statistics():
    """BNs without num_batches_tracked (a checkpoint without it): the original's train step
    updates the running statistics in place, bumping no version the packed-weight cache
    watches; the block forgets its packed weights then."""
    original = googlenet_block().double()
    for m in original.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.num_batches_tracked = None
    fused = _swapped(original)
    fused.fuse_train_bn = False
    x = torch.randn(2, 10, 5, 7, dtype=torch.float64)
    with torch.no_grad():
        for model in (original, fused):
            model.eval()(x)
            model.train()(x + 1)
            model.eval()
        assert rel_err(fused(x), original(x)) <= TOL[torch.float64]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_relu_batch_norm_backward_into_writes_the_columns_it_is_given(dtype):
    """The walk's shared-x matrix takes each convolution's masked gradient in its own columns:
    the out variant equals the plain op there, leaves the other columns alone, and refuses
    an out of the wrong shape or one overlapping its inputs."""
    torch.manual_seed(0)
    m, c = 40, 7
    grad, z = torch.randn(m, c, dtype=dtype), torch.randn(m, c, dtype=dtype)
    mean, invstd = z.mean(0), z.var(0, unbiased=False).add(1e-5).rsqrt()
    gamma = torch.randn(c, dtype=dtype)
    want = torch.ops.inception_fast.relu_batch_norm_backward(grad, z.relu(), z, mean, invstd, gamma)
    matrix = torch.full((m, c + 5), 7.0, dtype=dtype)
    d_gamma, d_beta = torch.ops.inception_fast.relu_batch_norm_backward_into(
        grad, z.relu(), z, mean, invstd, gamma, None, None, matrix[:, 2:2 + c])
    assert torch.equal(matrix[:, 2:2 + c], want[0]) and torch.equal(d_gamma, want[1]) and torch.equal(d_beta, want[2])
    assert (matrix[:, :2] == 7).all() and (matrix[:, 2 + c:] == 7).all()
    with pytest.raises(RuntimeError, match="out must be"):
        torch.ops.inception_fast.relu_batch_norm_backward_into(grad, z.relu(), z, mean, invstd, gamma, None, None,
                                                               matrix[:, :c - 1])
    with pytest.raises(RuntimeError, match="single memory location"):
        torch.ops.inception_fast.relu_batch_norm_backward_into(grad, z.relu(), z, mean, invstd, gamma, None, None, grad)
