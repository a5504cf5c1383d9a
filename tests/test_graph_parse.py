"""The general structural parser (graph_parse.py): users' blocks of every form it reads,
timm's Inception-v4 blocks (built small through their conv_block argument), and the
reasons it gives for what it refuses."""

import copy
import importlib
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import inception_fast as ifast
from inception_fast.fused_graph import FusedBranchGraph
from inception_fast.graph_parse import parse_branch_graph
from inception_fast.spec import Branch, BranchGraphSpec, Conv, Residual

from conftest import TOLERANCE, assert_block_matches, needs_cpu_kernel, randomize_, rel_err, small_residual_block


def unit(cin, cout, k=1, stride=1, padding=None, bn=True, **kw):
    """conv (+ BN) + ReLU as an nn.Sequential, 'same' padding unless told."""
    k2 = (k, k) if isinstance(k, int) else k
    pad = (k2[0] // 2, k2[1] // 2) if padding is None else padding
    layers = [nn.Conv2d(cin, cout, k, stride, pad, bias=not bn, **kw)]
    return nn.Sequential(*layers, *([nn.BatchNorm2d(cout)] if bn else []), nn.ReLU(inplace=True))


class SequentialBlock(nn.Module):
    """nn.Sequential branches with BN modules and nn.ReLU, a max-pool branch, pool last."""

    def __init__(self, cin=10):
        super().__init__()
        self.b0 = unit(cin, 4)
        self.b1 = nn.Sequential(unit(cin, 5), unit(5, 6, (1, 5)), unit(6, 3, (5, 1)))
        self.b2 = nn.Sequential(nn.MaxPool2d(3, 1, 1), unit(cin, 2))

    def forward(self, x):
        return torch.cat([self.b0(x), self.b1(x), self.b2(x)], dim=1)


class FunctionalBlock(nn.Module):
    """Bare convs with bias, F.relu, a functional average pool without count_include_pad,
    the pool branch FIRST, and a fan-out concatenated through a nested cat."""

    def __init__(self, cin=9):
        super().__init__()
        self.a = nn.Conv2d(cin, 3, 1)
        self.red = nn.Conv2d(cin, 4, 1)
        self.left, self.right = nn.Conv2d(4, 2, (1, 3), padding=(0, 1)), nn.Conv2d(4, 5, (3, 1), padding=(1, 0))
        self.proj = nn.Conv2d(cin, 6, 1)

    def forward(self, x):
        pooled = F.relu(self.proj(F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)))
        t = F.relu(self.red(x))
        fan = torch.cat([F.relu(self.left(t)), torch.relu(self.right(t))], 1)
        return torch.cat((pooled, F.relu(self.a(x), inplace=True), fan), dim=1)


class Reduction(nn.Module):
    """A grid reduction: one 3x3/2 conv over x, a chain ending in 3x3/2, and the 3x3/2 max
    pool in the middle of the concat."""

    def __init__(self, cin=6):
        super().__init__()
        self.direct = unit(cin, 5, 3, stride=2, padding=0)
        self.chain = nn.Sequential(unit(cin, 3), unit(3, 4, 3), unit(4, 7, 3, stride=2, padding=0))

    def forward(self, x):
        return torch.cat([self.direct(x), F.max_pool2d(x, kernel_size=3, stride=2), self.chain(x)], 1)


CASES = {
    "sequential": (SequentialBlock, BranchGraphSpec(10, (
        Branch(((Conv(10, 4),),)),
        Branch(((Conv(10, 5),), (Conv(5, 6, 1, 5),), (Conv(6, 3, 5, 1),))),
    ), "max", Conv(10, 2))),
    "functional-pool-first-fan-out": (FunctionalBlock, BranchGraphSpec(9, (
        Branch(((Conv(9, 3),),)),
        Branch(((Conv(9, 4),), (Conv(4, 2, 1, 3), Conv(4, 5, 3, 1)))),
    ), "avg", Conv(9, 6), count_include_pad=False, pool_index=0)),
    "grid-reduction": (Reduction, BranchGraphSpec(6, (
        Branch(((Conv(6, 5, 3, 3, 2),),)),
        Branch(((Conv(6, 3),), (Conv(3, 4, 3, 3),), (Conv(4, 7, 3, 3, 2),))),
    ), "max", None, stride=2, pool_index=1)),
}


@needs_cpu_kernel
@pytest.mark.parametrize("name", list(CASES))
def test_users_blocks_parse_and_fuse(name):
    make, want = CASES[name]
    block = randomize_(make()).eval()
    spec, units, _ = parse_branch_graph(block)
    assert spec == want
    assert [u.conv.out_channels for u in units] == [c.out_channels for c in spec.convs]
    fused = FusedBranchGraph.from_module(copy.deepcopy(block), backend="cpu").eval()
    x = torch.randn(2, spec.in_channels, 9, 8)
    with torch.no_grad():
        assert rel_err(fused(x), block(x)) <= TOLERANCE[torch.float32]
    # Gradients through the fused backward reach every parameter as the original's do.
    block.requires_grad_(True)
    x_ref, x_fused = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn_like(block(x))
    block(x_ref).backward(g)
    fused(x_fused).backward(g)
    assert rel_err(x_fused.grad, x_ref.grad) <= TOLERANCE[torch.float32]
    named = dict(fused.named_parameters())
    for pname, p in block.named_parameters():
        assert rel_err(named[pname].grad, p.grad) <= TOLERANCE[torch.float32], pname


@needs_cpu_kernel
def test_swap_fuses_users_blocks_and_keeps_googlenet_shape_on_fused_inception(caplog):
    from test_swap import UserBlock  # GoogLeNet's shape, functional ReLUs

    model = nn.Sequential(SequentialBlock(10), nn.Conv2d(9, 9, 1), FunctionalBlock(9), nn.Conv2d(16, 12, 1),
                          UserBlock(12))
    randomize_(model).eval()
    original = copy.deepcopy(model)
    with caplog.at_level(logging.INFO, logger="inception_fast"):
        ifast.swap_inception(model, backend="cpu", verify=1e-5)
    assert "swapped 3 block(s), left 0 unfused" in caplog.text
    assert [type(model[i]) for i in (0, 2, 4)] == [FusedBranchGraph, FusedBranchGraph, ifast.FusedInception]
    assert model.state_dict().keys() == original.state_dict().keys()
    x = torch.randn(2, 10, 7, 7)
    with torch.no_grad():
        assert rel_err(model(x), original(x)) <= TOLERANCE[torch.float32]


# -- refusals ------------------------------------------------------------------


class Variant(SequentialBlock):
    """SequentialBlock with one change, named by `kind`."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        if kind == "valid":
            self.b1[1] = unit(5, 6, (1, 5), padding=0)
        elif kind == "dilation":
            self.b1[1] = unit(5, 6, 3, padding=2, dilation=2)
        elif kind == "groups":
            self.b1[1] = unit(5, 5, 3, groups=5)
            self.b1[2] = unit(5, 3, (5, 1))
        elif kind == "residual":
            self.mix = nn.Conv2d(12, 10, 1)

    def forward(self, x):
        if self.kind == "residual":
            return torch.tanh(self.mix(super().forward(x)) * 0.2 + x)  # not ReLU: not the fused tail
        if self.kind == "extra op":
            return torch.cat([self.b0(x), self.b1(x) * 2, self.b2(x)], dim=1)
        if self.kind == "tree":  # an intermediate read by two levels: not a fan-out at the end
            t = self.b1[0](x)
            return torch.cat([self.b0(x), self.b1[2](self.b1[1](t)), t, self.b2(x)], dim=1)
        if self.kind == "no pool":
            return torch.cat([self.b0(x), self.b1(x)], dim=1)
        if self.kind == "pool 3x3/1/0":
            return torch.cat([self.b0(x), self.b1(x), self.b2[1](F.max_pool2d(x, 3, 1))], dim=1)
        return super().forward(x)


REFUSALS = {
    "valid": "Variant: branch 2, level 2 (b1.1.0): 1x5 conv with padding 0 at stride 1 ('valid') shrinks the "
             "grid",
    "dilation": "branch 2, level 2 (b1.1.0): dilated 3x3 conv (dilation (2, 2))",
    "groups": "branch 2, level 2 (b1.1.0): grouped 3x3 conv (groups=5)",
    "residual": "the concat of its 3 branches is not the output: the forward goes on with mix (1x1 conv, with bias) "
                "-> mul(mix, 0.2) -> add(mul, x) -> tanh(add); a residual Inception block whose tail is not",
    "extra op": "branch 2 ends in mul(",
    "tree": "branch 2: the output of b1.0.0's unit also feeds the concat; only the last level of a branch may fan out",
    "pool 3x3/1/0": "branch 3: a max pool with kernel (3, 3), stride (1, 1), padding (0, 0)",
}


@needs_cpu_kernel
def test_a_concat_of_conv_branches_without_a_pool_branch_fuses():
    block = Variant("no pool").eval()
    spec = parse_branch_graph(block)[0]
    assert spec.pool is None and len(spec.branches) == 2
    fused = FusedBranchGraph.from_module(copy.deepcopy(block), backend="cpu").eval()
    x = torch.randn(2, spec.in_channels, 6, 7)
    with torch.no_grad():
        assert rel_err(fused(x), block(x)) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("kind", list(REFUSALS))
def test_refusals_say_why_in_one_line(kind):
    with pytest.raises(ifast.NotAnInceptionBlock) as info:
        parse_branch_graph(Variant(kind).eval())
    message = str(info.value)
    assert REFUSALS[kind] in message and "\n" not in message
    assert info.value.near_miss


def test_a_module_that_is_no_branch_graph_is_not_a_near_miss():
    with pytest.raises(ifast.NotAnInceptionBlock, match="does not return a torch.cat") as info:
        parse_branch_graph(unit(3, 4, 3))
    assert not info.value.near_miss


def test_a_refused_block_is_left_alone_with_the_general_reason(caplog):
    model = nn.Sequential(Variant("dilation").eval())
    with caplog.at_level(logging.WARNING, logger="inception_fast"):
        ifast.swap_inception(model)
    assert isinstance(model[0], Variant)
    assert "left 0 (Variant) unfused: Variant: branch 2, level 2 (b1.1.0): dilated" in caplog.text


# -- timm's Inception-v4 blocks, built small -------------------------------------


def small_timm(name, div=16):
    """timm's inception_v4 block `name` with every conv unit's channels divided by `div`
    (through its conv_block argument: timm's own forward, ConvNormAct units with
    BatchNormAct2d, padding 0 unless the block asks, as InceptionV4 builds them)."""
    timm = pytest.importorskip("timm")
    from timm.layers import ConvNormAct
    import importlib

    inception_v4 = importlib.import_module("timm.models.inception_v4")

    def conv_block(cin, cout, **kw):
        kw.setdefault("padding", 0)
        return ConvNormAct(cin // div, cout // div, norm_kwargs=dict(eps=1e-3), act_kwargs=dict(inplace=True), **kw)

    assert timm.__version__
    return randomize_(getattr(inception_v4, name)(conv_block=conv_block)).eval()


TIMM_SPECS = {
    "Mixed3a": BranchGraphSpec(4, (Branch(((Conv(4, 6, 3, 3, 2),),)),), "max", None, stride=2, pool_index=0),
    "InceptionA": BranchGraphSpec(24, (
        Branch(((Conv(24, 6),),)),
        Branch(((Conv(24, 4),), (Conv(4, 6, 3, 3),))),
        Branch(((Conv(24, 4),), (Conv(4, 6, 3, 3),), (Conv(6, 6, 3, 3),))),
    ), "avg", Conv(24, 6), count_include_pad=False),
    "ReductionA": BranchGraphSpec(24, (
        Branch(((Conv(24, 24, 3, 3, 2),),)),
        Branch(((Conv(24, 12),), (Conv(12, 14, 3, 3),), (Conv(14, 16, 3, 3, 2),))),
    ), "max", None, stride=2),
    # Unpadded ('valid') 3x3s end both branches: 9x9 in, 7x7 out.
    "Mixed4a": BranchGraphSpec(10, (
        Branch(((Conv(10, 4),), (Conv(4, 6, 3, 3, padded=False),))),
        Branch(((Conv(10, 4),), (Conv(4, 4, 1, 7),), (Conv(4, 4, 7, 1),), (Conv(4, 6, 3, 3, padded=False),))),
    ), None, None),
    "InceptionC": BranchGraphSpec(96, (
        Branch(((Conv(96, 16),),)),
        Branch(((Conv(96, 24),), (Conv(24, 16, 1, 3), Conv(24, 16, 3, 1)))),
        Branch(((Conv(96, 24),), (Conv(24, 28, 3, 1),), (Conv(28, 32, 1, 3),),
                (Conv(32, 16, 1, 3), Conv(32, 16, 3, 1)))),
    ), "avg", Conv(96, 16), count_include_pad=False),
}


@needs_cpu_kernel
@pytest.mark.parametrize("name", list(TIMM_SPECS))
def test_timm_inception_v4_blocks_parse_and_fuse(name):
    block = small_timm(name)
    assert parse_branch_graph(block)[0] == TIMM_SPECS[name]
    fused = FusedBranchGraph.from_module(copy.deepcopy(block), backend="cpu").eval()
    x = torch.randn(2, TIMM_SPECS[name].in_channels, 9, 9)
    with torch.no_grad():
        assert rel_err(fused(x), block(x)) <= TOLERANCE[torch.float32]


def test_a_valid_convolution_before_its_branch_ends_is_refused():
    """Unpadded 3x3s must end their branch (the intermediates are on x's grid): one in the
    middle of Mixed4a's second branch is named, level and unit."""
    block = small_timm("Mixed4a")
    block.branch1[1].conv.padding = (0, 0)  # the 1x7, unpadded: it shrinks the grid mid-branch
    with pytest.raises(ifast.NotAnInceptionBlock, match=r"^Mixed4a: branch 2, level 2 \(branch1.1.conv\): 1x7 conv "
                       r"with padding 0 at stride 1 \('valid'\) shrinks the grid before its branch ends"):
        parse_branch_graph(block)


@needs_cpu_kernel
@pytest.mark.parametrize("name, channels, residual", [
    ("Block35", 320, Residual(Conv(128, 320), 0.17, True)),
    ("Block17", 1088, Residual(Conv(384, 1088), 0.1, True)),
    ("Block8", 2080, Residual(Conv(448, 2080), 0.2, True)),
    ("Block8-no-relu", 2080, Residual(Conv(448, 2080), 1.0, False)),
])
def test_timm_residual_blocks_parse_and_fuse_forward_and_backward(name, channels, residual):
    """Inception-ResNet-v2's Block35, 17 and 8 (the last one without ReLU): branches without
    a pool, then the residual tail; forward and every gradient against the original."""
    pytest.importorskip("timm")
    irv2 = importlib.import_module("timm.models.inception_resnet_v2")

    make = {"Block35": lambda: irv2.Block35(scale=0.17), "Block17": lambda: irv2.Block17(scale=0.1),
            "Block8": lambda: irv2.Block8(scale=0.2), "Block8-no-relu": lambda: irv2.Block8(no_relu=True)}[name]
    block = randomize_(make()).eval()
    spec = parse_branch_graph(block)[0]
    assert (spec.pool, spec.residual, spec.out_channels) == (None, residual, channels)
    fused = FusedBranchGraph.from_module(copy.deepcopy(block), backend="cpu").eval()
    assert_block_matches(fused, block, torch.randn(2, channels, 5, 4))


@needs_cpu_kernel
@pytest.mark.parametrize("relu", [True, False])
def test_a_users_residual_block_fuses_and_a_different_tail_is_refused(relu):
    block = small_residual_block(relu)
    assert parse_branch_graph(block)[0].residual == Residual(Conv(9, 8), 0.3, relu)
    fused = FusedBranchGraph.from_module(copy.deepcopy(block), backend="cpu").eval()
    x = torch.randn(3, 8, 6, 5)
    with torch.no_grad():
        assert rel_err(fused(x), block(x)) <= TOLERANCE[torch.float32]

    class SigmoidTail(type(block)):
        def forward(self, x):
            return torch.sigmoid(self.conv2d(torch.cat((self.branch0(x), self.branch1(x)), 1))) + x

    with pytest.raises(ifast.NotAnInceptionBlock, match=r"a residual Inception block whose tail is not act\(x \+ "
                       r"scale \* 1x1 conv\(concat\)\)"):
        parse_branch_graph(randomize_(SigmoidTail()).eval())


# Inference on the CPU runs the tail as the kernel's last GEMM, x added in its epilogue: 40
# channels make one full register panel (stored from the registers) and a partial one (the
# scalar epilogue); 1 image runs stage after stage, 9 images in image groups.
@needs_cpu_kernel
@pytest.mark.parametrize("size", [(1, 5, 6), (9, 8, 8)], ids=["1x5x6", "9x8x8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no-act"])
def test_residual_tail_is_the_kernels_epilogue_in_inference(relu, dtype, size, monkeypatch):
    import inception_fast.fused_graph as fg

    block = small_residual_block(relu, channels=40)
    fused = FusedBranchGraph.from_module(copy.deepcopy(block).to(dtype), backend="cpu")
    monkeypatch.setattr(fg, "residual_tail", lambda *a: pytest.fail("the tail ran as ATen ops"))
    x = torch.randn(size[0], 40, *size[1:], dtype=torch.float64)
    x[0, 3, 2, 2] = float("nan")
    with torch.no_grad():
        got, want = fused(x.to(dtype)), block.double()(x)
    assert got.dtype == dtype and got.shape == want.shape
    assert torch.equal(got.isnan(), want.isnan())
    finite = ~want.isnan()
    assert rel_err(got[finite], want[finite]) <= TOLERANCE[dtype]


@needs_cpu_kernel
def test_the_kernel_refuses_a_residual_epilogue_that_does_not_end_a_1x1_over_the_concat():
    from inception_fast.ops.branch_graph import graph_forward, pack_weights
    from inception_fast.ops.plan import Destination, plan_with_residual

    spec = FusedBranchGraph.from_module(small_residual_block()).graph
    graph = plan_with_residual(spec)
    weights = [torch.randn(c.out_channels, c.in_channels, c.kh, c.kw) for c in spec.convs]  # the tail last
    packed = pack_weights(graph, weights, [torch.zeros(w.shape[0]) for w in weights], "cpu")
    x = torch.randn(1, 8, 5, 5)
    assert graph_forward(x, *packed, graph.flat()).shape == x.shape
    flat = graph.flat()
    stage0 = flat.index(Destination.OUT_RESIDUAL_RELU) - 2 - 9  # the tail GEMM's record: head, then its segment
    bad = flat[:stage0 + 1] + [-1] + flat[stage0 + 2:]  # its source: x instead of the concat buffer
    with pytest.raises(RuntimeError, match="a residual epilogue ends a 1x1 over a buffer"):
        graph_forward(x, *packed, bad)
    # The op's own autograd (a direct call with a gradient) has no residual backward: it says so.
    y = graph_forward(x.requires_grad_(), *packed, flat)
    with pytest.raises(RuntimeError, match="the backward has none"):
        y.sum().backward()


@pytest.mark.slow
@needs_cpu_kernel
@pytest.mark.parametrize("name, convs, fused_blocks, left", [
    ("inception_v4", False, 19, set()),
    # The stem's three conv units too: 3x3/2, 3x3 unpadded, 3x3 'same'.
    ("inception_v4", True, 22, set()),
    ("inception_resnet_v2", False, 43, set()),
])
def test_timm_models_swap_with_logits_within_1e5(name, convs, fused_blocks, left, caplog):
    timm = pytest.importorskip("timm")
    model = randomize_(timm.create_model(name, pretrained=False)).eval()
    swapped = copy.deepcopy(model)
    with caplog.at_level(logging.WARNING, logger="inception_fast"):
        ifast.swap_inception(swapped, backend="cpu", convs=convs)
    assert sum(isinstance(m, FusedBranchGraph) for m in swapped.modules()) == fused_blocks
    refused = {r.getMessage().split("(")[1].split(")")[0] for r in caplog.records if "unfused:" in r.getMessage()}
    assert refused == left
    x = torch.randn(1, 3, 299, 299)
    with torch.no_grad():
        assert rel_err(swapped(x), model(x)) <= 1e-5


@needs_cpu_kernel
def test_torchvision_children_with_another_concat_order_go_to_the_general_parser():
    """torchvision's InceptionA with the pool branch moved first: not torchvision's graph,
    but a branch graph, so the general parser fuses it."""
    from torchvision.models.inception import InceptionA

    class PoolFirst(InceptionA):
        def _forward(self, x):
            outs = super()._forward(x)
            return [outs[-1]] + outs[:-1]

    model = nn.Sequential(randomize_(PoolFirst(24, 8)).eval())
    original = copy.deepcopy(model)
    ifast.swap_inception(model, backend="cpu")
    assert isinstance(model[0], FusedBranchGraph) and model[0].graph.pool_index == 0
    x = torch.randn(2, 24, 7, 7)
    with torch.no_grad():
        assert rel_err(model(x), original(x)) <= TOLERANCE[torch.float32]
