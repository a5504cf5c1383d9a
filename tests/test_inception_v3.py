"""Inception-v3's blocks (torchvision InceptionA to E) on the branch-graph kernel."""

import copy
import logging

import pytest
import torch
import torchvision
from torchvision.models import inception as tv

import inception_fast as ifast
from inception_fast._extension import cpu_extension
from inception_fast.fused_graph import FusedBranchGraph
from inception_fast.ops.plan import plan
from inception_fast.spec import Branch, BranchGraphSpec, Conv

from conftest import TOLERANCE, needs_cpu_kernel, randomize_, rel_err

# (block, its grid in inception_v3 at 299x299)
BLOCKS = {
    "A": (lambda: tv.InceptionA(192, pool_features=32), 35),
    "B": (lambda: tv.InceptionB(288), 35),
    "C": (lambda: tv.InceptionC(768, channels_7x7=128), 17),
    "D": (lambda: tv.InceptionD(768), 17),
    "E": (lambda: tv.InceptionE(1280), 8),
}


def _block(name, dtype=torch.float32):
    make, size = BLOCKS[name]
    return randomize_(make()).eval().to(dtype), size


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name", list(BLOCKS))
def test_block_matches_torchvision_at_its_grid(name, dtype):
    block, size = _block(name, dtype)
    fused = FusedBranchGraph.from_module(copy.deepcopy(block), backend="cpu").eval()
    x = torch.randn(2, fused.spec.in_channels, size, size, dtype=dtype)
    with torch.no_grad():
        got, want = fused(x), block(x)
    assert got.is_contiguous()  # NCHW in, NCHW out, as the original block
    assert rel_err(got, want) <= TOLERANCE[dtype]


@needs_cpu_kernel
@pytest.mark.parametrize("size", [(1, 1, 1), (3, 5, 9), (1, 2, 2), (2, 3, 4)], ids=str)
@pytest.mark.parametrize("name", list(BLOCKS))
def test_awkward_grids_and_batches(name, size):
    """Grids smaller than the 7-tap kernels, odd shapes, batch 1 to 3 (both schedules); the
    grid reductions (B, D) need 3x3 at least."""
    block, _ = _block(name)
    fused = FusedBranchGraph.from_module(copy.deepcopy(block), backend="cpu")
    n, h, w = size
    if fused.spec.stride == 2 and min(h, w) < 3:
        pytest.skip("a 3x3 stride-2 unpadded window needs a 3x3 input")
    x = torch.randn(n, fused.spec.in_channels, h, w)
    with torch.no_grad():
        assert rel_err(fused(x), block(x)) <= TOLERANCE[torch.float32]


@needs_cpu_kernel
def test_noncontiguous_input_empty_batch_and_repeat_calls():
    block, _ = _block("A")
    fused = FusedBranchGraph.from_module(copy.deepcopy(block), backend="cpu")
    wide = torch.randn(2, 384, 6, 6)
    with torch.no_grad():
        assert rel_err(fused(wide[:, ::2]), block(wide[:, ::2])) <= TOLERANCE[torch.float32]
        assert fused(torch.randn(0, 192, 6, 6)).shape == (0, 256, 6, 6)
        x = torch.randn(2, 192, 6, 6)
        assert torch.equal(fused(x), fused(x))


def test_train_mode_uses_batch_statistics_and_updates_running_stats():
    block, _ = _block("C")
    block.train()
    twin = copy.deepcopy(block)
    fused = FusedBranchGraph.from_module(twin)
    x = torch.randn(2, 768, 5, 5)
    torch.testing.assert_close(fused(x), block(x))
    for a, b in zip(block.buffers(), twin.buffers()):
        torch.testing.assert_close(a, b)
    assert fused.state_dict().keys() == block.state_dict().keys()


@needs_cpu_kernel
def test_next_forward_sees_optimizer_step_and_load_state_dict():
    block, _ = _block("E")
    fused = FusedBranchGraph.from_module(copy.deepcopy(block), backend="cpu")
    x = torch.randn(1, 1280, 4, 4)
    with torch.no_grad():
        fused(x)  # fill the pack cache
    for p in fused.parameters():
        p.grad = torch.randn_like(p) * 0.1
    torch.optim.SGD(fused.parameters(), lr=0.5).step()
    mirror = copy.deepcopy(block)
    mirror.load_state_dict(fused.state_dict())
    with torch.no_grad():
        assert rel_err(fused(x), mirror(x)) <= TOLERANCE[torch.float32]
        fused.load_state_dict(block.state_dict())
        assert rel_err(fused(x), block(x)) <= TOLERANCE[torch.float32]


def test_gradients_in_eval_mode_take_the_fused_backward(monkeypatch):
    """With autograd on in eval mode the fused forward and backward run (the original
    branches are never called), and in train mode the train-mode BN form (the original
    only without the C++ kernel, or under FusedBranchGraph.bn_train_min_pixels)."""
    monkeypatch.setattr(FusedBranchGraph, "bn_train_min_pixels", 0)
    block, _ = _block("A")
    fused = FusedBranchGraph.from_module(copy.deepcopy(block))
    calls = []
    fused._original[0].register_forward_hook(lambda *args: calls.append(1))
    x = torch.randn(1, 192, 5, 5, requires_grad=True)
    fused(x).sum().backward()
    assert not calls and x.grad is not None and fused.branch1x1.conv.weight.grad is not None
    fused.train()(x)
    assert bool(calls) == (cpu_extension() is None)


def test_grid_reduction_plan_ends_branches_on_the_output_grid():
    spec = FusedBranchGraph.from_module(_block("D")[0]).spec
    graph = plan(spec)
    assert spec.stride == 2 and spec.out_size(17, 17) == (8, 8) and spec.out_channels == 320 + 192 + 768
    strided = [g for g in graph.gemms if g[4] == 2]
    assert [g[1] for g in strided] == [0, 3, -4]  # branch3x3_2, branch7x7x3_4 (buffers), the max-pool copy
    assert graph.buf_border == (0, 3, 3, 0)  # the 7-tap buffers need 3; the stride-2 inputs none


def test_plan_fuses_every_leading_1x1_into_one_gemm():
    spec = FusedBranchGraph.from_module(_block("E")[0]).spec
    graph = plan(spec)
    stage0 = [g for g in graph.gemms if g[0] == 0]
    assert len(stage0) == 2  # the shared-input 1x1s, and the pool projection
    assert stage0[0][7] == 320 + 384 + 448  # columns: branch1x1, branch3x3_1, branch3x3dbl_1
    assert graph.buf_channels == (384, 448, 384)
    assert graph.buf_border == (1, 1, 1)
    assert max(g[0] for g in graph.gemms) == 2
    assert graph.out_channels == 2048


@pytest.mark.parametrize("bad, words", [
    (dict(pool="lp"), "pool"),
    (dict(branches=(Branch(((Conv(8, 4, 3, 3),), (Conv(4, 4),))),)), "start with one 1x1"),
    (dict(branches=(Branch(((Conv(8, 4),), (Conv(4, 4, 3, 3, padded=False),))),)), "stride 1, no pool branch"),
    (dict(branches=(Branch(((Conv(8, 4, 3, 3, padded=False),), (Conv(4, 4),))),), pool=None, pool_proj=None),
     "ends its branch"),
    (dict(branches=(Branch(((Conv(8, 4),), (Conv(5, 4, 3, 3),))),)), "must read 4 channels"),
])
def test_bad_specs_name_what_is_wrong(bad, words):
    fields = dict(in_channels=8, branches=(Branch(((Conv(8, 4),),)),), pool="avg", pool_proj=Conv(8, 2))
    with pytest.raises(ValueError, match=words):
        BranchGraphSpec(**{**fields, **bad})
    with pytest.raises(ValueError, match="odd"):
        Conv(4, 4, 2, 1)


def test_wrong_input_is_rejected_before_the_kernel():
    fused = FusedBranchGraph.from_module(_block("A")[0], backend="cpu")
    with pytest.raises(ValueError, match="192"), torch.no_grad():
        fused(torch.randn(1, 191, 5, 5))
    reduction = FusedBranchGraph.from_module(_block("B")[0], backend="cpu")
    with pytest.raises(ValueError, match="x must be at least 3x3"), torch.no_grad():
        reduction(torch.randn(1, 288, 2, 5))
    with pytest.raises(TypeError, match="float64"), torch.no_grad():
        fused(torch.randn(1, 192, 5, 5, dtype=torch.float64))


@needs_cpu_kernel
@pytest.mark.slow
def test_swapped_inception_v3_logits_at_299():
    model = randomize_(torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=True)).eval()
    swapped = ifast.swap_inception(copy.deepcopy(model))
    fused = [m.source for m in swapped.modules() if isinstance(m, FusedBranchGraph)]
    assert sorted(fused) == sorted(["InceptionA"] * 3 + ["InceptionB"] + ["InceptionC"] * 4 + ["InceptionD"]
                                   + ["InceptionE"] * 2)
    x = torch.randn(1, 3, 299, 299)
    with torch.no_grad():
        assert rel_err(swapped(x), model(x)) <= 1e-4


@needs_cpu_kernel
def test_profiler_counts_the_fused_blocks_like_the_original():
    block, size = _block("C")
    fused = FusedBranchGraph.from_module(copy.deepcopy(block), backend="cpu")
    want = ifast.profile(block, (1, 768, size, size)).total_macs
    with torch.no_grad():
        got = ifast.profile(fused, (1, 768, size, size)).total_macs
    assert got == want == fused.spec.macs(size, size)


@needs_cpu_kernel
def test_swap_with_verify_checks_the_v3_blocks_too():
    model = torch.nn.Sequential(randomize_(tv.InceptionA(24, pool_features=8)).eval())
    ifast.swap_inception(model, verify=1e-5)
    assert isinstance(model[0], FusedBranchGraph)


@needs_cpu_kernel
@pytest.mark.slow
def test_export_and_compile_fullgraph_capture_the_branch_graph_op():
    block = randomize_(tv.InceptionA(24, pool_features=8)).eval()
    fused = FusedBranchGraph.from_module(copy.deepcopy(block), backend="cpu").eval()
    x = torch.randn(2, 24, 5, 5)
    with torch.no_grad():
        program = torch.export.export(fused, (x,))
        targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
        assert "inception_fast.graph_forward.default" in targets
        assert rel_err(program.module()(x), block(x)) <= TOLERANCE[torch.float32]
        compiled = torch.compile(fused, fullgraph=True)  # any graph break raises
        assert rel_err(compiled(x), block(x)) <= TOLERANCE[torch.float32]


# pytorch-fid's FID network (the one behind most published FID scores) patches four of
# torchvision's blocks: an average pool without count_include_pad (FIDInceptionA, C, E_1)
# and a max pool (FIDInceptionE_2) in the pool branch.
FID_BLOCKS = {"FIDInceptionA": (lambda m: m.FIDInceptionA(24, pool_features=8), ("avg", False)),
              "FIDInceptionC": (lambda m: m.FIDInceptionC(24, channels_7x7=12), ("avg", False)),
              "FIDInceptionE_1": (lambda m: m.FIDInceptionE_1(24), ("avg", False)),
              "FIDInceptionE_2": (lambda m: m.FIDInceptionE_2(24), ("max", True))}


@pytest.mark.parametrize("name", list(FID_BLOCKS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_pytorch_fid_blocks_fuse_forward_and_backward(name, dtype):
    fid = pytest.importorskip("pytorch_fid.inception")
    make, pool = FID_BLOCKS[name]
    block = randomize_(make(fid)).eval().to(dtype)
    swapped = ifast.swap_inception(torch.nn.Sequential(copy.deepcopy(block)), backend="cpu")[0]
    assert isinstance(swapped, FusedBranchGraph)
    assert (swapped.spec.pool, swapped.spec.count_include_pad) == pool
    # 1x1 and 5x6 grids: every pixel of a 3x3 window at a border (count 4, 6) or inside (9)
    for size in ((1, 1), (5, 6)):
        x = torch.randn(2, 24, *size, dtype=dtype, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_()
        y, want = swapped(x), block(x_ref)
        assert rel_err(y, want) <= TOLERANCE[dtype]
        grad = torch.randn_like(want)
        y.backward(grad)
        want.backward(grad)
        assert rel_err(x.grad, x_ref.grad) <= TOLERANCE[dtype]


@pytest.mark.slow
def test_timm_inception_v3_fuses_every_block_and_keeps_its_logits():
    """timm builds conv + BN + ReLU as ConvNormAct, whose BatchNormAct2d traces through to
    F.batch_norm over its own buffers: the same computation as torchvision's BasicConv2d."""
    timm = pytest.importorskip("timm")
    model = randomize_(timm.create_model("inception_v3", pretrained=False)).eval()
    swapped = ifast.swap_inception(copy.deepcopy(model), backend="cpu")
    fused = [m for m in swapped.modules() if isinstance(m, FusedBranchGraph)]
    assert len(fused) == 11
    x = torch.randn(1, 3, 299, 299)
    with torch.no_grad():
        assert rel_err(swapped(x), model(x)) <= 1e-5


@pytest.mark.parametrize("min_pixels", [0, 4096], ids=["train_form", "original"])
def test_a_timm_block_fuses_and_trains_with_its_batch_norm_act(min_pixels, monkeypatch):
    """timm's units are ConvNormAct with BatchNormAct2d, which the swap reads by tracing
    through it (in both modes): in train mode the train-mode BN form runs (or, under
    bn_train_min_pixels, the original), with eager's outputs, gradients and statistics."""
    timm = pytest.importorskip("timm")
    from timm.models.inception_v3 import InceptionA

    monkeypatch.setattr(FusedBranchGraph, "bn_train_min_pixels", min_pixels)
    block = randomize_(InceptionA(24, pool_features=8)).eval().double()
    swapped = ifast.swap_inception(torch.nn.Sequential(copy.deepcopy(block)), backend="cpu")[0]
    assert isinstance(swapped, FusedBranchGraph) and swapped._bn_train
    x = torch.randn(2, 24, 6, 5, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(swapped(x), block(x)) <= TOLERANCE[torch.float64]
    swapped.train()
    block.train()
    calls = []
    swapped._original[0].register_forward_pre_hook(lambda *a: calls.append(1))
    grads = []
    for model in (block, swapped):
        xx = x.clone().requires_grad_()
        model(xx).square().sum().backward()
        grads.append((xx.grad, model.branch1x1.conv.weight.grad, model.branch_pool.bn.weight.grad))
    assert bool(calls) == (min_pixels > 0)
    for want, got in zip(*grads):
        assert rel_err(got, want) <= 1e-10
    for (name, want), got in zip(block.named_buffers(), swapped.buffers()):
        assert rel_err(got, want) <= 1e-10 if want.is_floating_point() else torch.equal(got, want), name


def test_swapping_a_timm_model_leaves_its_state_and_fx_replays_the_mode_traced():
    """Tracing timm's blocks in train mode (the swap's check) runs BatchNormAct2d's
    num_batches_tracked.add_(1) on the real buffers: restored, so the swap changes no state.
    An FX trace of the swapped model in train mode (create_feature_extractor) replays the
    train-mode trace, whose BNs use batch statistics (the eval one gave 44x wrong features)."""
    timm = pytest.importorskip("timm")
    from torchvision.models.feature_extraction import create_feature_extractor

    model = randomize_(timm.create_model("inception_v3", pretrained=False, num_classes=10)).double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    swapped = ifast.swap_inception(copy.deepcopy(model))
    assert all(torch.equal(v, before[k]) for k, v in swapped.state_dict().items())
    x = torch.randn(2, 3, 107, 107, dtype=torch.float64)
    for train in (True, False):
        want = create_feature_extractor(copy.deepcopy(model).train(train), {"Mixed_5b": "f"}).train(train)(x)["f"]
        got = create_feature_extractor(copy.deepcopy(swapped).train(train), {"Mixed_5b": "f"}).train(train)(x)["f"]
        assert rel_err(got, want) <= 1e-12, train


def test_a_non_module_is_refused_with_a_type_error():
    with pytest.raises(TypeError, match="block must be a torch.nn.Module, got str"):
        FusedBranchGraph("InceptionA")


@needs_cpu_kernel
def test_swap_convs_fuses_the_stem_conv_units_forward_and_backward(caplog):
    """swap_inception(convs=True) on Inception-v3's stem: Conv2d_1a (3x3/2), 2a (unpadded
    3x3), 2b ('same' 3x3 straight over x), 3b (1x1) and 4a (unpadded 3x3) each become a
    one-branch graph, the max pools stay eager; output, input gradient and every parameter
    gradient against the original with the same grad_output. Without convs nothing there
    is fused."""
    model = randomize_(torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)).eval()
    names = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3")
    stem = torch.nn.Sequential(*[getattr(model, n) for n in names])
    assert not any(isinstance(m, FusedBranchGraph) for m in ifast.swap_inception(copy.deepcopy(stem)).modules())
    with caplog.at_level(logging.INFO, logger="inception_fast"):
        swapped = ifast.swap_inception(copy.deepcopy(stem), convs=True)
    assert "swapped 0 block(s) and 5 conv unit(s), left 0 unfused" in caplog.text
    fused = [m for m in swapped.modules() if isinstance(m, FusedBranchGraph)]
    assert [(c.kh, c.stride, c.padded) for m in fused for c in m.spec.convs] == [
        (3, 2, True), (3, 1, False), (3, 1, True), (1, 1, True), (3, 1, False)]
    x = torch.randn(2, 3, 41, 40).contiguous(memory_format=torch.channels_last)  # 2a: 162 Winograd tiles
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    ys = [stem(xs[0]), swapped(xs[1])]
    assert ys[1].shape == ys[0].shape == (2, 192, 6, 6)
    assert rel_err(ys[1], ys[0]) <= TOLERANCE[torch.float32]
    grad_out = torch.randn_like(ys[0])
    for y in ys:
        y.backward(grad_out)
    assert rel_err(xs[1].grad, xs[0].grad) <= TOLERANCE[torch.float32]
    assert list(swapped.state_dict()) == list(stem.state_dict())  # drop-in: the same keys
    for (name, p), q in zip(stem.named_parameters(), swapped.parameters()):
        assert rel_err(q.grad, p.grad) <= TOLERANCE[torch.float32], name


def test_fx_tracing_a_timm_block_with_mixed_bn_modes_raises():
    """timm's norms are traced through, their mode baked into the graph: with some BNs in
    another mode than the block, no trace replays what the block computes."""
    timm = pytest.importorskip("timm")
    import torch.fx as fx
    from timm.models.inception_v3 import InceptionA

    swapped = ifast.swap_inception(torch.nn.Sequential(randomize_(InceptionA(24, pool_features=8))))
    swapped.train()
    swapped[0].branch1x1.bn.eval()
    with pytest.raises(RuntimeError, match="batch norms are in another mode than the block"):
        fx.symbolic_trace(swapped)
    swapped[0].branch1x1.bn.train()
    fx.symbolic_trace(swapped)  # one mode: the train-mode trace replays
