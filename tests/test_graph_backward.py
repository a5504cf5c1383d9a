"""The fused branch-graph backward (Inception-v3 blocks): the C++ kernel, its ATen twin,
gradcheck, and gradients through FusedBranchGraph against torchvision's autograd."""

import copy

import pytest
import torch
from inception_fast.fused_graph import FusedBranchGraph
from inception_fast.ops.branch_graph import BranchGraphFunction, graph_backward, graph_backward_reference, pack_weights
from inception_fast.ops.plan import plan
from inception_fast.spec import Branch, BranchGraphSpec, Conv

from inception_fast.ops.inception import InceptionWeights, _forward_reference
from inception_fast.spec import GOOGLENET_INCEPTION, InceptionSpec

from conftest import TOLERANCE, needs_cpu_kernel, randomize_, rel_err, small_v3_block

pytestmark = needs_cpu_kernel

# Small specs covering every kind of step: a chain with an asymmetric 1x3 -> 3x1, a 5x5, an
# end fan-out (InceptionE), average and max pool branches, and a grid reduction with a
# stride-2 convolution straight over x and one after a chain, plus its copied max pool.
SPECS = {
    "avg-chain": BranchGraphSpec(5, (
        Branch(((Conv(5, 3),),)),
        Branch(((Conv(5, 4),), (Conv(4, 3, 1, 3),), (Conv(3, 2, 3, 1),))),
        Branch(((Conv(5, 2),), (Conv(2, 3, 5, 5),))),
    ), "avg", Conv(5, 2)),
    "fan-out": BranchGraphSpec(4, (
        Branch(((Conv(4, 2),),)),
        Branch(((Conv(4, 3),), (Conv(3, 2, 1, 3), Conv(3, 3, 3, 1)))),
    ), "avg", Conv(4, 3)),
    "avg-exclude-pad": BranchGraphSpec(5, (
        Branch(((Conv(5, 3),), (Conv(3, 2, 3, 3),))),
    ), "avg", Conv(5, 4), count_include_pad=False),
    "max-pool": BranchGraphSpec(4, (
        Branch(((Conv(4, 3),), (Conv(3, 2, 3, 3),))),
    ), "max", Conv(4, 2)),
    "grid-reduction": BranchGraphSpec(3, (
        Branch(((Conv(3, 4, 3, 3, stride=2),),)),
        Branch(((Conv(3, 2),), (Conv(2, 3, 3, 3),), (Conv(3, 2, 3, 3, stride=2),))),
    ), "max", None, stride=2),
    # The pool branch elsewhere in the concat (timm's Inception-v4 stem: Mixed3a, Mixed5a).
    "pool-first": BranchGraphSpec(4, (
        Branch(((Conv(4, 2),),)),
        Branch(((Conv(4, 3),), (Conv(3, 2, 1, 3), Conv(3, 3, 3, 1)))),
    ), "avg", Conv(4, 3), count_include_pad=False, pool_index=0),
    "pool-between": BranchGraphSpec(4, (
        Branch(((Conv(4, 3),), (Conv(3, 2, 3, 3),))),
        Branch(((Conv(4, 2),),)),
    ), "max", Conv(4, 3), pool_index=1),
    # No pool branch (Inception-ResNet's Block17 before its residual tail): 1x7 -> 7x1.
    "no-pool": BranchGraphSpec(4, (
        Branch(((Conv(4, 3),),)),
        Branch(((Conv(4, 2),), (Conv(2, 3, 1, 7),), (Conv(3, 2, 7, 1),))),
    ), None, None),
    "grid-reduction-pool-first": BranchGraphSpec(3, (
        Branch(((Conv(3, 4, 3, 3, stride=2),),)),
        Branch(((Conv(3, 2),), (Conv(2, 3, 3, 3, stride=2),))),
    ), "max", None, stride=2, pool_index=0),
    # Unpadded ('valid') 3x3s ending every branch (timm's Mixed4a), one straight over x.
    "valid": BranchGraphSpec(4, (
        Branch(((Conv(4, 3),), (Conv(3, 2, 3, 3, padded=False),))),
        Branch(((Conv(4, 2),), (Conv(2, 3, 1, 3),), (Conv(3, 2, 3, 1),), (Conv(2, 3, 3, 3, padded=False),))),
        Branch(((Conv(4, 2, 3, 3, padded=False),),)),
    ), None, None),
    # A lone convolution over x, unpadded or 'same' (Inception-v3's stem).
    "stem-valid": BranchGraphSpec(3, (Branch(((Conv(3, 4, 3, 3, padded=False),),)),), None, None),
    "stem-same": BranchGraphSpec(3, (Branch(((Conv(3, 4, 3, 3),),)),), None, None),
}


def _params(spec, dtype):
    weights = [torch.randn(c.out_channels, c.in_channels, c.kh, c.kw, dtype=dtype) / (c.kh * c.kw * c.in_channels) ** 0.5
               for c in spec.convs]
    biases = [torch.rand(c.out_channels, dtype=dtype) * 0.4 - 0.1 for c in spec.convs]
    return weights, biases


def _fused(spec):
    """f(x, *weights, *biases) on the C++ kernels, packing what it is given on every call
    (gradcheck perturbs the weights in place between calls)."""
    graph = plan(spec)

    def f(x, *params):
        half = len(params) // 2
        with torch.no_grad():
            b, bias = pack_weights(graph, [p.detach() for p in params[:half]], [p.detach() for p in params[half:]],
                                   "cpu")
        keep = (-1,) * len(graph.buf_channels)
        return BranchGraphFunction.apply(x, "cpu", graph.flat(), graph.backward_flat(), keep, b, bias, *params)

    return f


def _saved(spec, x, weights, biases):
    """(y, intermediates) of the C++ forward."""
    graph = plan(spec)
    b, bias = pack_weights(graph, weights, biases, "cpu")
    y, buffers = torch.ops.inception_fast.graph_forward_saving(x, b, bias, graph.flat())
    h, w = x.shape[2:]
    return y, [buf[:, p:p + h, p:p + w] for buf, p in zip(buffers, graph.buf_border)], graph


def _eager(spec, x, weights, biases):
    """The block of `spec` as eager convolutions, pools and one torch.cat in concat order."""
    params = iter(zip(weights, biases))

    def unit(t, conv):
        w, b = next(params)
        return torch.relu(torch.nn.functional.conv2d(t, w, b, conv.stride, conv.padding))  # Conv.padding: F's

    outs = []
    for branch in spec.branches:
        t = x
        for level in branch.levels:
            ys = [unit(t, c) for c in level]
            t = ys[0] if len(ys) == 1 else torch.cat(ys, 1)
        outs.append(t)
    F = torch.nn.functional
    if spec.pool is None:
        return torch.cat(outs, 1)
    if spec.stride == 2:
        pooled = F.max_pool2d(x, 3, 2)
    else:
        p = (F.max_pool2d(x, 3, 1, 1) if spec.pool == "max"
             else F.avg_pool2d(x, 3, 1, 1, count_include_pad=spec.count_include_pad))
        pooled = unit(p, spec.pool_proj)
    outs.insert(len(outs) if spec.pool_index is None else spec.pool_index, pooled)
    return torch.cat(outs, 1)


@pytest.mark.parametrize("name", list(SPECS))
def test_forward_matches_eager_convolutions(name):
    """Every output channel where the concat order puts it (the plan's segments)."""
    spec = SPECS[name]
    weights, biases = _params(spec, torch.float64)
    x = torch.randn(2, spec.in_channels, 7, 6, dtype=torch.float64)
    y, _, _ = _saved(spec, x, weights, biases)
    want = _eager(spec, x, weights, biases)
    assert y.shape == want.shape and rel_err(y, want) <= TOLERANCE[torch.float64]


@pytest.mark.parametrize("name", list(SPECS))
def test_gradcheck_fp64(name):
    spec = SPECS[name]
    weights, biases = _params(spec, torch.float64)
    x = torch.randn(2, spec.in_channels, 7, 6, dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (x, *weights, *biases)]
    assert torch.autograd.gradcheck(_fused(spec), inputs, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("size", [(1, 1, 1), (3, 3, 5), (2, 8, 7)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", list(SPECS))
def test_cpp_backward_matches_the_aten_twin(name, size, dtype):
    spec = SPECS[name]
    n, h, w = size
    if (spec.stride == 2 or spec.valid_kernel) and min(h, w) < 3:
        pytest.skip("a grid reduction or an unpadded 3x3 needs 3x3 input")
    weights, biases = _params(spec, dtype)
    x = torch.randn(n, spec.in_channels, h, w, dtype=dtype).mul(1.5).round()  # ties in every pool window
    y, intermediates, graph = _saved(spec, x, weights, biases)
    g = torch.randn_like(y)
    for needs in ([True, True], [True, False], [False, True]):
        cpp = graph_backward(g, x, y, intermediates, weights, needs, graph.backward_flat(), "cpu")
        aten = graph_backward_reference(g, x, y, intermediates, weights, needs, graph.backward_flat())
        assert len(cpp) == len(aten) == 1 + 2 * len(weights)
        for i, (a, b) in enumerate(zip(cpp, aten)):
            wanted = needs[0] if i == 0 else needs[1]
            assert (b is not None) == wanted
            if wanted:
                assert rel_err(a, b) <= TOLERANCE[dtype], (needs, i)
            else:
                assert a.numel() == 0


def _tv_block(name, dtype=torch.float32):
    return small_v3_block(name).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name", list("ABCDE"))
def test_gradients_match_torchvision_in_eval_mode(name, dtype):
    """dx and the gradients of every conv weight and BN affine parameter: the folding's own
    autograd carries the folded weights' gradients back to them."""
    block = _tv_block(name, dtype)
    fused = FusedBranchGraph.from_module(copy.deepcopy(block), backend="cpu")
    fused._original = (None,)  # the original branches must not run: this is the fused path
    x = torch.randn(2, 24, 9, 8, dtype=dtype)
    x_ref, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref = block(x_ref)
    g = torch.randn_like(y_ref)
    y_ref.backward(g)
    fused(x_fused).backward(g)
    assert rel_err(x_fused.grad, x_ref.grad) <= TOLERANCE[dtype]
    named = dict(fused.named_parameters())
    for pname, p in block.named_parameters():
        assert rel_err(named[pname].grad, p.grad) <= TOLERANCE[dtype], pname


def test_input_only_and_weights_only_gradients():
    block = _tv_block("E")
    fused = FusedBranchGraph.from_module(copy.deepcopy(block), backend="cpu")
    fused.requires_grad_(False)
    x = torch.randn(1, 24, 5, 5, requires_grad=True)
    fused(x).sum().backward()
    block.requires_grad_(False)
    x_ref = x.detach().clone().requires_grad_()
    block(x_ref).sum().backward()
    assert rel_err(x.grad, x_ref.grad) <= TOLERANCE[torch.float32]
    fused.requires_grad_(True)
    fused(torch.randn(1, 24, 5, 5)).sum().backward()
    assert all(p.grad is not None for p in fused.parameters())


def test_empty_batch_gives_zero_gradients():
    fused = FusedBranchGraph.from_module(_tv_block("A"), backend="cpu")
    x = torch.randn(0, 24, 5, 5, requires_grad=True)
    fused(x).sum().backward()
    assert x.grad.shape == x.shape
    assert all(p.grad is not None and not p.grad.any() for p in fused.parameters())


def test_a_nan_in_x_reaches_the_same_gradients_as_torchvision():
    """NaN poisons the gradients where it does in eager autograd: no mask hides it."""
    block = _tv_block("A")
    fused = FusedBranchGraph.from_module(copy.deepcopy(block), backend="cpu")
    x = torch.randn(1, 24, 6, 6)
    x[0, 3, 2, 2] = float("nan")
    x_ref, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
    block(x_ref).sum().backward()
    fused(x_fused).sum().backward()
    assert torch.equal(torch.isnan(x_fused.grad), torch.isnan(x_ref.grad))
    named = dict(fused.named_parameters())
    for pname, p in block.named_parameters():
        assert torch.equal(torch.isnan(named[pname].grad), torch.isnan(p.grad)), pname


def _with_threads(threads, fn):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_column_split_is_bit_identical_to_one_thread(dtype):
    """5b at batch 1 has 49 pixel rows, under 2 threads * kSplitColumnsBelowRows: with two
    threads the kernel splits the weight panels instead of the rows. Each output element
    is still one accumulation in a fixed order, so nothing may change by a bit."""
    s = GOOGLENET_INCEPTION["5b"].spec
    spec = s.to_graph()
    weights, biases = _params(spec, dtype)
    graph = plan(spec)
    b, bias = pack_weights(graph, weights, biases, "cpu")
    old_weights = InceptionWeights(*(t for pair in zip(weights, biases) for t in pair))
    x = torch.randn(1, s.in_channels, 7, 7, dtype=dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        one = _with_threads(1, lambda: torch.ops.inception_fast.graph_forward(x, b, bias, graph.flat()))
        two = _with_threads(2, lambda: torch.ops.inception_fast.graph_forward(x, b, bias, graph.flat()))
        want = _forward_reference(x, old_weights)
    assert torch.equal(two, one)
    assert rel_err(two, want) <= TOLERANCE[dtype]


@pytest.mark.parametrize("name", list(SPECS))
def test_column_split_of_every_kind_of_gemm_is_bit_identical_to_one_thread(name):
    """The small specs at batch 1 on 7x7 (column split at 2 threads): GEMMs of one panel,
    so one part owns none (and skips its pooled rows), chains over bordered buffers, and a
    grid reduction's stride-2 GEMMs and copied max pool (split by channels)."""
    spec = SPECS[name]
    weights, biases = _params(spec, torch.float32)
    graph = plan(spec)
    b, bias = pack_weights(graph, weights, biases, "cpu")
    x = torch.randn(1, spec.in_channels, 7, 7).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        one = _with_threads(1, lambda: torch.ops.inception_fast.graph_forward(x, b, bias, graph.flat()))
        two = _with_threads(2, lambda: torch.ops.inception_fast.graph_forward(x, b, bias, graph.flat()))
    assert torch.equal(two, one)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_max_pool_branch_backward_with_nan_and_ties_matches_the_aten_twin(dtype):
    """The fused max-pool pass against ATen's max_pool2d_with_indices and its backward:
    torch's argmax (row-major, ties to the first, NaN wins, so the last NaN of a window).
    70 channels: full SIMD vectors, a scalar tail and two channel blocks."""
    spec = InceptionSpec(70, 5, 6, 7, 3, 4, 9).to_graph()
    weights, biases = _params(spec, dtype)
    x = torch.randn(2, 70, 6, 5, dtype=dtype).mul(1.5).round()  # ties in every pool window
    x[0, 3, 2, 2] = x[0, 3, 2, 3] = float("nan")  # two NaNs in the windows around them
    x[1, 40, 0, 0] = float("nan")  # a corner window
    x[1, 68, 5, 4] = float("nan")  # the scalar tail
    x = x.contiguous(memory_format=torch.channels_last)
    y, intermediates, graph = _saved(spec, x, weights, biases)
    g = torch.randn_like(y)
    for needs in ([True, True], [True, False], [False, True]):
        cpp = graph_backward(g, x, y, intermediates, weights, needs, graph.backward_flat(), "cpu")
        aten = graph_backward_reference(g, x, y, intermediates, weights, needs, graph.backward_flat())
        for i, (a, b) in enumerate(zip(cpp, aten)):
            if b is None:
                assert a.numel() == 0
                continue
            assert torch.equal(torch.isnan(a), torch.isnan(b)), (needs, i)
            finite = ~torch.isnan(b)
            assert rel_err(a[finite], b[finite]) <= TOLERANCE[dtype], (needs, i)
    # The pool projection's weight gradient (last conv) is NaN where a pooled NaN meets it.
    assert torch.isnan(cpp[-2]).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 16, 1, 1), (1, 17, 1, 5), (2, 70, 6, 5), (1, 64, 2, 2), (3, 33, 3, 7),
                                   (1, 130, 9, 4), (2, 5, 4, 4), (2, 70, 9, 8), (1, 17, 1, 80), (1, 33, 70, 1),
                                   (1, 48, 12, 11)], ids=str)
def test_max_pool3x3_scatter_matches_aten(shape, dtype):
    """The C++ pass alone against ATen's max_pool2d_with_indices and its backward added to
    dx: grids down to 1x1, single rows and columns, whole SIMD vectors, scalar tails and
    several channel blocks, with ties, NaNs and -infs; the pooled values exactly, dx within
    the tolerance."""
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=gen).mul(1.5).round()  # ties in most windows
    flat = x.view(-1)
    flat[torch.randint(0, x.numel(), (3,), generator=gen)] = float("nan")
    flat[torch.randint(0, x.numel(), (3,), generator=gen)] = float("-inf")
    cl = torch.channels_last
    x = x.to(dtype).contiguous(memory_format=cl)
    dp = torch.randn(shape, generator=gen).to(dtype).contiguous(memory_format=cl)
    dx = torch.randn(shape, generator=gen).to(dtype).contiguous(memory_format=cl)
    want_pooled, indices = torch.nn.functional.max_pool2d(x.double(), 3, 1, 1, return_indices=True)
    want_dx = dx.double() + torch.ops.aten.max_pool2d_with_indices_backward(
        dp.double(), x.double(), [3, 3], [1, 1], [1, 1], [1, 1], False, indices)
    pooled = torch.ops.inception_fast.max_pool3x3_scatter(x, dp, dx)
    assert torch.equal(torch.isnan(pooled), torch.isnan(want_pooled))
    assert torch.equal(pooled.double().nan_to_num(), want_pooled.nan_to_num())
    assert rel_err(dx.double(), want_dx) <= TOLERANCE[dtype]
    alone = torch.ops.inception_fast.max_pool3x3_scatter(x, None, None)  # the pool without a scatter
    assert torch.equal(alone.nan_to_num(), pooled.nan_to_num())


@pytest.mark.slow
def test_compile_fullgraph_trains_through_the_fused_backward():
    block = _tv_block("A")
    fused = FusedBranchGraph.from_module(copy.deepcopy(block), backend="cpu")
    compiled = torch.compile(fused, fullgraph=True)  # any graph break raises
    x = torch.randn(2, 24, 5, 5, requires_grad=True)
    compiled(x).sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    block(x_ref).sum().backward()
    assert rel_err(x.grad, x_ref.grad) <= TOLERANCE[torch.float32]
    assert rel_err(fused.branch_pool.bn.weight.grad, block.branch_pool.bn.weight.grad) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("weight_format", [torch.contiguous_format, torch.channels_last], ids=["nchw-w", "cl-w"])
@pytest.mark.parametrize("which", ["graph_backward", "graph_backward_cpu", "graph_forward_saving"])
def test_custom_op_registrations_pass_opcheck(which, weight_format):
    """Schema and register_fake agree with the real kernels (shapes, strides, aliasing);
    channels_last weights (a model moved to channels_last) get channels_last gradients."""
    spec = SPECS["fan-out"]
    weights, biases = _params(spec, torch.float64)
    weights = [w.contiguous(memory_format=weight_format) for w in weights]
    x = torch.randn(2, spec.in_channels, 5, 4, dtype=torch.float64)
    y, intermediates, graph = _saved(spec, x, weights, biases)
    if which == "graph_backward":
        args = (torch.randn_like(y), x, y, [t.contiguous() for t in intermediates], weights, [True, True],
                graph.backward_flat(), "cpu")
    elif which == "graph_backward_cpu":  # the C++ operator under graph_backward
        args = (torch.randn_like(y), x, y, [t.contiguous() for t in intermediates], weights, True, True,
                graph.backward_flat())
    else:
        b, bias = pack_weights(graph, weights, biases, "cpu")
        args = (x, b, bias, graph.flat())
    op = getattr(torch.ops.inception_fast, which).default
    torch.library.opcheck(op, args)
    if which != "graph_forward_saving":
        grads = op(*args)[1:]
        spatial = [(w, g) for w, g in zip(weights, grads[::2]) if w.shape[2] * w.shape[3] > 1]
        assert spatial and all(g.is_contiguous(memory_format=weight_format) for _, g in spatial)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_weight_gradients_keep_the_parameters_layout(mode):
    """Every convolution weight's gradient reaches autograd in its parameter's layout
    (channels_last for a block moved to channels_last, contiguous for one that was not, fed
    channels_last inputs either way), so that AccumulateGrad stores it without a copy and
    the folded BN's multiply runs on one layout; and matches eager's values. The train
    form's (C: its 7x1s' F(2, 7) weight gradients, thresholds off) and the eval form's."""
    from inception_fast.ops import branch_graph

    def strides(t):
        # Strides of size-1 dims do not matter (a 1x1's two layouts are one memory order;
        # AccumulateGrad's layout contract skips them too).
        return [st for st, n in zip(t.stride(), t.shape) if n > 1]

    for model_format in (torch.channels_last, torch.contiguous_format):
        for kind in ("C", "E"):
            block = _tv_block(kind).to(memory_format=model_format).train(mode == "train")
            fused = FusedBranchGraph.from_module(copy.deepcopy(block), backend="cpu").train(mode == "train")
            fused.bn_train_min_pixels = 0
            handed = {}
            for name, p in fused.named_parameters():
                if p.dim() == 4:
                    p.register_hook(lambda g, name=name: handed.__setitem__(name, strides(g)))
            x = torch.randn(2, block.branch1x1.conv.in_channels, 6, 5).contiguous(memory_format=torch.channels_last)
            grad = torch.randn_like(block(x))
            block(x).backward(grad)
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(branch_graph, "WEIGHT_GRAD_7X1_MIN_CHANNELS", 0)
                mp.setattr(branch_graph, "WEIGHT_GRAD_MIN_TILES", 0)
                fused(x).backward(grad)
            for (name, p0), (fused_name, p1) in zip(block.named_parameters(), fused.named_parameters()):
                if p0.dim() != 4:
                    continue
                assert handed[fused_name] == strides(p1), (model_format, kind, name)
                assert rel_err(p1.grad, p0.grad) <= TOLERANCE[torch.float32], (model_format, kind, name)


@pytest.mark.slow
def test_swapped_inception_v3_gradients_in_fp64():
    """All 11 fused blocks at 299x299, eval mode: dx and every parameter's gradient match
    the original's to fp64 rounding (in fp32 both drift ~2e-3 from fp64 on this untrained,
    badly conditioned network: the comparison is made where it is meaningful)."""
    import torchvision

    import inception_fast as ifast

    model = randomize_(torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=True))
    model = model.eval().double()
    swapped = ifast.swap_inception(copy.deepcopy(model))
    assert sum(isinstance(m, FusedBranchGraph) for m in swapped.modules()) == 11
    x = torch.randn(1, 3, 299, 299, dtype=torch.float64)
    x_ref, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
    model(x_ref).sum().backward()
    swapped(x_fused).sum().backward()
    assert rel_err(x_fused.grad, x_ref.grad) <= 1e-10
    named = dict(swapped.named_parameters())
    for name, p in model.named_parameters():
        assert rel_err(named[name].grad, p.grad) <= 1e-10, name


def test_traced_module_with_frozen_weights_gives_the_input_gradient():
    """jit.trace records the bare forward op over the packed weights; with frozen weights its
    backward must still answer the packed lists (None per tensor), as autograd requires."""
    import warnings

    import inception_fast as ifast

    ref = randomize_(ifast.ReferenceInception(InceptionSpec(20, 17, 33, 35, 4, 19, 21, k5=3))).eval()
    fused = ifast.FusedInception.from_module(ref)
    for p in fused.parameters():
        p.requires_grad_(False)
    x = torch.randn(4, 20, 9, 8, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(fused, x)
    traced(x).sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    ref(x_ref).sum().backward()
    assert rel_err(x.grad, x_ref.grad) <= 1e-5
