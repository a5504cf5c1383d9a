"""Half precision on the CPU, against an fp64 reference and against eager PyTorch in the
same dtype on the same input:
- bfloat16: the C++ forward in bf16 (fp32 sums; AVX512-BF16 dot products where the build
  targets them) and the backward (ATen's bf16 GEMMs and our bf16 pool passes);
- float16: the float32 kernels on widened copies, rounded to fp16 once."""

import copy

import pytest
import torch

import inception_fast as ifast
from inception_fast.fused_graph import FusedBranchGraph
from inception_fast.ops.backend import pack_panels, resolve_backend, unpack_panels
from inception_fast.ops.branch_graph import graph_forward, pack_weights, unpack_weights
from inception_fast.ops.plan import plan
from inception_fast.spec import Branch, BranchGraphSpec, Conv

from conftest import TOLERANCE, needs_cpu_kernel, rel_err, small_v3_block
from test_graph_backward import SPECS, _eager, _fused, _params

pytestmark = needs_cpu_kernel
BF16 = torch.bfloat16

# Odd channel counts end a tap on half a VNNI pair; 771 channels split one tap's K into
# chunks (384, 384, 3); 37 channels over 3x3 taps group ten taps per chunk.
BF16_SPECS = {
    **SPECS,
    "wide-odd": BranchGraphSpec(771, (Branch(((Conv(771, 40),), (Conv(40, 33, 3, 3),))),), "max", Conv(771, 17)),
    "odd-taps": BranchGraphSpec(9, (Branch(((Conv(9, 37),), (Conv(37, 35, 3, 3),))),
                                   Branch(((Conv(9, 5),),))), "avg", Conv(9, 3), count_include_pad=False),
}
# Batch 1 runs stage-major (threads split each GEMM), batch 8 image-major.
SIZES = [pytest.param((1, 5, 5), id="1x5x5"), pytest.param((8, 6, 7), id="8x6x7"), pytest.param((2, 1, 1), id="2x1x1")]


def _bf16(tensors):
    return [t.to(BF16) for t in tensors]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", list(BF16_SPECS))
def test_forward_within_tolerance_and_twice_eager_bf16_error(name, size):
    spec = BF16_SPECS[name]
    if (spec.stride == 2 or spec.valid_kernel) and min(size[1:]) < 3:
        pytest.skip("a grid reduction or an unpadded 3x3 needs a 3x3 input")
    weights, biases = _params(spec, torch.float64)
    x = torch.randn(size[0], spec.in_channels, *size[1:], dtype=torch.float64)
    want = _eager(spec, x, weights, biases)
    eager_err = rel_err(_eager(spec, x.to(BF16), _bf16(weights), _bf16(biases)), want)
    graph = plan(spec)
    got = graph_forward(x.to(BF16), *pack_weights(graph, _bf16(weights), _bf16(biases), "cpu"), graph.flat())
    assert got.dtype == BF16 and got.shape == want.shape
    err = rel_err(got, want)
    assert err <= TOLERANCE[BF16]
    assert err <= 2 * eager_err, (err, eager_err)


def _leaves(tensors, dtype):
    return [t.detach().to(dtype).requires_grad_() for t in tensors]


def assert_forward_and_gradients_match(spec, dtype):
    """The fused op in `dtype` against fp64 and eager PyTorch in `dtype`, one grad_output:
    the output within the tolerance and 2x eager's error; each gradient (x, every weight
    and bias) within the tolerance of fp64's, or within 2x eager's own error (a half
    precision forward moves ReLU masks near zero, which no backward can undo)."""
    weights, biases = _params(spec, torch.float64)
    x = torch.randn(2, spec.in_channels, 6, 5, dtype=torch.float64)
    n = len(weights)
    runs = {}
    for label, run_dtype in (("fp64", torch.float64), ("eager", dtype), ("fused", dtype)):
        leaves = _leaves((x, *weights, *biases), run_dtype)
        y = (_fused(spec)(*leaves) if label == "fused" else _eager(spec, leaves[0], leaves[1:1 + n], leaves[1 + n:]))
        runs[label] = (y, leaves)
    grad = torch.randn_like(runs["fp64"][0])
    for y, _ in runs.values():
        y.backward(grad.to(y.dtype))
    (want, want_leaves), (eager, eager_leaves), (got, got_leaves) = runs["fp64"], runs["eager"], runs["fused"]
    assert got.dtype == dtype and rel_err(got, want) <= min(TOLERANCE[dtype], 2 * rel_err(eager, want))
    for i, (g, e, w) in enumerate(zip(got_leaves, eager_leaves, want_leaves)):
        assert g.grad.dtype == dtype
        assert rel_err(g.grad, w.grad) <= max(TOLERANCE[dtype], 2 * rel_err(e.grad, w.grad)), i


@pytest.mark.parametrize("name", ["wide-odd", "odd-taps", "grid-reduction", "avg-chain"])
def test_gradients_of_every_input_match_fp64(name):
    assert_forward_and_gradients_match(BF16_SPECS[name], BF16)


def test_nan_and_inf_reach_the_same_outputs_as_in_fp64():
    """On the same bf16 values. Not against eager bf16: oneDNN's bf16 convolution here also
    spreads a NaN to pixels whose window does not hold it (fp32 and fp64 do not)."""
    spec = BF16_SPECS["max-pool"]
    weights, biases = (_bf16(t) for t in _params(spec, torch.float32))
    x = torch.randn(2, spec.in_channels, 6, 6, dtype=BF16)
    x[0, 1, 2, 2], x[1, 3, 0, 5], x[1, 0, 4, 1] = float("nan"), float("inf"), float("-inf")
    want = _eager(spec, x.double(), [w.double() for w in weights], [b.double() for b in biases])
    graph = plan(spec)
    got = graph_forward(x, *pack_weights(graph, weights, biases, "cpu"), graph.flat())
    assert torch.isnan(want).any() and torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(torch.isinf(got), torch.isinf(want))


@pytest.mark.parametrize("taps,channels,cols", [(1, 5, 40), (9, 3, 33), (9, 64, 96), (7, 1, 1)])
def test_vnni_panels_round_trip(taps, channels, cols):
    b = torch.randn(taps * channels, cols).to(BF16)
    packed = pack_panels(b, 32, taps)
    assert packed.shape == (-(-cols // 32), taps * (channels + channels % 2), 32)
    # One 32-bit word is (B[2j][n], B[2j + 1][n]) of a tap, the pair vdpbf16ps multiplies;
    # an odd tap's last word has a zero upper half.
    flat = packed[0].flatten()
    assert torch.equal(flat[0], b[0, 0]) and torch.equal(flat[1], b[1, 0] if channels > 1 else b.new_zeros(()))
    if cols > 1:
        assert torch.equal(flat[2], b[0, 1])
    assert torch.equal(unpack_panels(packed, cols, taps, channels), b)


def test_unpack_weights_inverts_pack_weights_with_odd_channels():
    spec = BF16_SPECS["odd-taps"]
    graph = plan(spec)
    weights, biases = (_bf16(t) for t in _params(spec, torch.float32))
    got_w, got_b = unpack_weights(graph, *pack_weights(graph, weights, biases, "cpu"), "cpu", spec.in_channels)
    for a, b in zip(got_w + got_b, weights + biases):
        assert torch.equal(a, b)


def test_auto_backend_picks_the_cpu_kernel_for_bf16():
    assert resolve_backend("auto", torch.empty(1, dtype=BF16)) == "cpu"


def _ops_run(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


@pytest.mark.parametrize("name", ["A", "B", "E"])
def test_a_bf16_model_and_cpu_autocast_run_the_fused_kernel(name):
    block = small_v3_block(name)
    x = torch.randn(2, 24, 9, 9)
    fused = FusedBranchGraph.from_module(copy.deepcopy(block))
    with torch.no_grad():
        want = block.double()(x.double())
        # A bf16 model.
        fused_bf16, block_bf16 = copy.deepcopy(fused).to(BF16), copy.deepcopy(block).to(BF16)
        assert "inception_fast::graph_forward" in _ops_run(lambda: fused_bf16(x.to(BF16)))
        got, eager = fused_bf16(x.to(BF16)), block_bf16(x.to(BF16))
        assert got.dtype == BF16 and rel_err(got, want) <= min(TOLERANCE[BF16], 2 * rel_err(eager, want))
        # CPU autocast (bf16 by default) over the fp32 model.
        with torch.autocast("cpu"):
            assert "inception_fast::graph_forward" in _ops_run(lambda: fused(x))
            got, eager = fused(x), block.float()(x)
        # bf16 out of a concat of convolutions; float32 out of a grid reduction (B), whose
        # max pool of the float32 x promotes the concat, on both sides.
        assert got.dtype == eager.dtype == (torch.float32 if name == "B" else BF16)
        assert rel_err(got, want) <= min(TOLERANCE[BF16], 2 * rel_err(eager, want))


def test_swapped_bf16_googlenet_block_trains_fused():
    """A torchvision-style block (conv + BN + ReLU, BN in eval mode) in bf16: output and the
    gradients of x and of every parameter against fp64, within the tolerance or 2x eager
    bf16's own error, with one grad_output."""
    ref = ifast.ReferenceInception(ifast.InceptionSpec(16, 8, 6, 10, 4, 6, 6), batch_norm=True).eval()
    fused = ifast.FusedInception.from_module(copy.deepcopy(ref)).to(BF16)
    x = torch.randn(2, 16, 7, 7, dtype=torch.float64)
    runs = [(copy.deepcopy(ref).double(), x), (copy.deepcopy(ref).to(BF16), x.to(BF16)), (fused, x.to(BF16))]
    outs = []
    for module, inp in runs:
        inp = inp.clone().requires_grad_()
        outs.append((module(inp), inp, module))
    grad = torch.randn_like(outs[0][0])
    for y, _, _ in outs:
        y.backward(grad.to(y.dtype))
    (want, x64, m64), (_, x_eager, m_eager), (got, x16, m16) = outs
    assert got.dtype == BF16 and rel_err(got, want) <= TOLERANCE[BF16]
    grads = [(x16.grad, x_eager.grad, x64.grad)] + [
        (p.grad, e.grad, w.grad) for p, e, w in zip(m16.parameters(), m_eager.parameters(), m64.parameters())]
    for i, (g, e, w) in enumerate(grads):
        assert g is not None and g.dtype == BF16
        assert rel_err(g, w) <= max(TOLERANCE[BF16], 2 * rel_err(e, w)), i


def test_bn_fold_of_a_bf16_model_is_computed_in_fp32():
    """A BN whose shift nearly cancels (large running mean, beta ~ mean * scale): folding in
    bf16 arithmetic put the block 10x past eager bf16's error (eager's BN computes in fp32)."""
    ref = ifast.ReferenceInception(ifast.InceptionSpec(16, 8, 6, 10, 4, 6, 6), batch_norm=True).eval()
    with torch.no_grad():
        for bn in ref.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.running_mean.fill_(200.0), bn.running_var.fill_(1.0), bn.weight.fill_(1.0)
                bn.bias.copy_(200.0 / (1 + bn.eps) ** 0.5 + 0.05 * torch.randn(bn.num_features))
    ref = ref.to(BF16)
    x = torch.randn(2, 16, 7, 7).to(BF16)
    with torch.no_grad():
        want = copy.deepcopy(ref).double()(x.double())
        got, eager = ifast.FusedInception.from_module(copy.deepcopy(ref))(x), ref(x)
    assert rel_err(got, want) <= min(TOLERANCE[BF16], 2 * rel_err(eager, want))


def test_autocast_grid_reduction_pools_x_itself():
    """Under CPU autocast eager max-pools the fp32 x: the fused block's pool channels are
    exact, and its input gradient picks x's own maxima (not ties made by rounding x)."""
    block = small_v3_block("D")
    model = ifast.swap_inception(torch.nn.Sequential(copy.deepcopy(block)))
    assert isinstance(model[0], FusedBranchGraph)
    x = torch.randn(2, 24, 9, 9)
    x64 = x.double().requires_grad_()
    want = copy.deepcopy(block).double()(x64)
    grad = torch.randn_like(want)
    want.backward(grad)
    results = {}
    for name, module in (("eager", block), ("fused", model)):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu"):
            y = module(xi)
        y.backward(grad.to(y.dtype))
        results[name] = (y, xi.grad)
    (y, dx), (eager_y, eager_dx) = results["fused"], results["eager"]
    assert y.dtype == eager_y.dtype == torch.float32
    assert torch.equal(y[:, -24:], eager_y[:, -24:])  # the pool channels, last in InceptionD's concat
    assert rel_err(y, want) <= 2 * rel_err(eager_y, want)
    assert rel_err(dx, x64.grad) <= max(TOLERANCE[BF16], 2 * rel_err(eager_dx, x64.grad))


def test_swap_refuses_a_bf16_block_twice_as_far_from_fp64_as_the_original(monkeypatch, caplog):
    """In bf16 the swap-time check also holds the fused block to 2x the original's own
    error against fp64: a fold rounded in bf16 arithmetic passed the plain distance check."""
    import logging

    from inception_fast import fused_graph

    real = fused_graph.fold_conv_bn
    monkeypatch.setattr(fused_graph, "fold_conv_bn", lambda unit: tuple(
        t * 1.01 if i == 0 else t for i, t in enumerate(real(unit))))  # 1e-2: within rtol (3e-2)
    model = torch.nn.Sequential(small_v3_block("A", 8)).to(BF16)
    with caplog.at_level(logging.WARNING, logger="inception_fast"):
        ifast.swap_inception(model)
    assert not isinstance(model[0], FusedBranchGraph), caplog.text
    assert "more than twice the original's" in caplog.text
    monkeypatch.setattr(fused_graph, "fold_conv_bn", real)
    ifast.swap_inception(model)
    assert isinstance(model[0], FusedBranchGraph)


# -- float16: the float32 kernels on widened copies ------------------------------------------

FP16 = torch.float16


@pytest.mark.parametrize("name", ["avg-chain", "grid-reduction", "odd-taps", "max-pool"])
def test_fp16_forward_and_gradients_against_fp64_and_eager_fp16(name):
    """Computed in fp32 and rounded once: within the fp16 tolerance and 2x eager fp16's error
    (eager rounds every convolution's output to fp16)."""
    assert_forward_and_gradients_match(BF16_SPECS[name], FP16)


def test_fp16_model_swaps_and_runs_the_kernel_with_out_and_autocast():
    block = small_v3_block("E")
    x = torch.randn(2, 24, 6, 6)
    with torch.no_grad():
        want = copy.deepcopy(block).double()(x.double())
        model = ifast.swap_inception(torch.nn.Sequential(copy.deepcopy(block).to(FP16)))
        assert isinstance(model[0], FusedBranchGraph)
        assert resolve_backend("auto", x.to(FP16)) == "cpu"
        assert "inception_fast::graph_forward" in _ops_run(lambda: model(x.to(FP16)))
        got = model(x.to(FP16))
        assert got.dtype == FP16 and rel_err(got, want) <= TOLERANCE[FP16]
        # fp16 CPU autocast over the fp32 model: fused, fp16 out, as eager's.
        fused = FusedBranchGraph.from_module(copy.deepcopy(block))
        with torch.autocast("cpu", dtype=FP16):
            assert "inception_fast::graph_forward" in _ops_run(lambda: fused(x))
            got, eager = fused(x), block(x)
        assert got.dtype == eager.dtype == FP16 and rel_err(got, want) <= TOLERANCE[FP16]
    # out= of the functional op, in fp16: written in full.
    spec = BF16_SPECS["max-pool"]
    graph = plan(spec)
    w16, b16 = (_bf16(t) for t in _params(spec, torch.float32))
    w16, b16 = [t.to(FP16) for t in w16], [t.to(FP16) for t in b16]
    xh = torch.randn(2, spec.in_channels, 5, 5, dtype=FP16)
    packed = pack_weights(graph, w16, b16, "cpu")
    assert packed[0][0].dtype == torch.float32  # widened at packing
    out = torch.full((2, spec.out_channels, 5, 5), float("nan"), dtype=FP16).contiguous(
        memory_format=torch.channels_last)
    torch.ops.inception_fast.graph_forward.out(xh, *packed, graph.flat(), out=out)
    assert torch.equal(out, graph_forward(xh, *packed, graph.flat()))
    assert not torch.isnan(out).any()


def test_the_functional_op_follows_cpu_autocast_as_conv2d_does():
    block = ifast.GOOGLENET_INCEPTION["4a"]
    ref = ifast.ReferenceInception(block.spec).eval()
    weights = [p.detach().clone().requires_grad_() for p in ref.parameters()]  # InceptionWeights order
    x = torch.randn(2, block.spec.in_channels, 6, 5)
    with torch.autocast("cpu"):
        got, eager = ifast.inception(x, *weights), ref(x)
    assert got.dtype == eager.dtype == BF16
    assert rel_err(got, ref.double()(x.double())) <= min(TOLERANCE[BF16], 2 * rel_err(eager, ref(x.double())))
    got.float().sum().backward()
    assert all(w.grad is not None and w.grad.dtype == torch.float32 for w in weights)
    # out= variants are not autocast-eligible in PyTorch: x's own dtype, no cast.
    out = torch.empty(2, block.spec.out_channels, 6, 5).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu"):
        assert ifast.inception(x, *weights, out=out).dtype == torch.float32
