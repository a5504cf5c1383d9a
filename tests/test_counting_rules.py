"""counting_rules: thop, ptflops and fvcore count a swapped model as they count the original."""

import contextlib
import copy
import io
import logging

import pytest
import torch
import torchvision.models as tvm
from conftest import needs_cpu_kernel, reference_module, small_residual_block, small_v3_block
from torch import nn

import inception_fast as ifast
from inception_fast.fused_graph import FusedBranchGraph

MODELS = {
    # torchvision's GoogLeNet (BN, functional ReLU) and Inception-v3 (InceptionA-E: F.avg_pool2d,
    # F.max_pool2d), at sizes small enough to run quickly and large enough for every block.
    "googlenet": (lambda: tvm.googlenet(weights=None, aux_logits=False, init_weights=False), 96),
    "inception_v3": (lambda: tvm.inception_v3(weights=None, aux_logits=False, init_weights=False), 107),
}


def original_and_swapped(name):
    make, size = MODELS[name]
    original = make().eval()
    swapped = ifast.swap_inception(copy.deepcopy(original)).eval()
    fused = [m for m in swapped.modules() if isinstance(m, (ifast.FusedInception, FusedBranchGraph))]
    assert len(fused) == {"googlenet": 9, "inception_v3": 11}[name]
    return original, swapped, size


@needs_cpu_kernel
@pytest.mark.parametrize("name", MODELS)
def test_thop_counts_a_swapped_model_as_the_original(name):
    thop = pytest.importorskip("thop")
    original, swapped, size = original_and_swapped(name)
    x = torch.randn(1, 3, size, size)
    want = thop.profile(original, inputs=(x,), verbose=False)[0]
    # thop's hooks on the fused blocks' children make them run the original: no rule needed.
    assert thop.profile(swapped, inputs=(x,), verbose=False)[0] == want
    assert thop.profile(swapped, inputs=(x,), custom_ops=ifast.counting_rules.thop(), verbose=False)[0] == want


@needs_cpu_kernel
@pytest.mark.parametrize("name", MODELS)
def test_ptflops_counts_a_swapped_model_as_the_original(name):
    ptflops = pytest.importorskip("ptflops")
    original, swapped, size = original_and_swapped(name)

    def count(model, **kwargs):
        with contextlib.redirect_stdout(io.StringIO()):
            return ptflops.get_model_complexity_info(model, (3, size, size), backend="pytorch", as_strings=False,
                                                     print_per_layer_stat=False, **kwargs)[0]

    want = count(original)
    assert count(swapped) == want  # hooks on the children make the fused blocks run the original
    assert count(swapped, custom_modules_hooks=ifast.counting_rules.ptflops()) == want


# -- fvcore ----------------------------------------------------------------------------------------


def fvcore_total(model, x, **handles):
    from fvcore.nn import FlopCountAnalysis

    logging.getLogger("fvcore").setLevel(logging.ERROR)  # its list of ops it skips
    return FlopCountAnalysis(model, x).set_op_handle(**handles).total()


class Holder(nn.Module):
    """A block behind a 1x1 convolution, as in a network: the block's input needs a gradient."""

    def __init__(self, block, channels):
        super().__init__()
        self.stem = nn.Conv2d(channels, channels, 1)
        self.block = block

    def forward(self, x):
        return self.block(self.stem(x))


def as_traced_op(fused):
    """The fused block's forward as a jit trace holds it: its custom op over constant packed
    weights (fvcore's own trace runs the original: it hooks every module)."""
    from inception_fast.ops.branch_graph import graph_forward, residual_tail

    with torch.no_grad():
        b, bias = fused._packed("cpu", None)
        b, bias, plan = [t.clone() for t in b], [t.clone() for t in bias], list(fused._flat_plan)
        tail, conv = fused.graph.residual, getattr(fused, "conv2d", None)
        if tail is None:
            fused.forward = lambda x: graph_forward(x, b, bias, plan)
        else:  # and the residual tail after it, as the module runs it
            fused.forward = lambda x: residual_tail(x, graph_forward(x, b, bias, plan), conv.weight, conv.bias,
                                                    tail.scale, tail.relu)
    return fused


@needs_cpu_kernel
@pytest.mark.parametrize("batch_norm", [False, True])
def test_fvcore_handles_count_the_fused_op_as_the_original_block(batch_norm):
    pytest.importorskip("fvcore")
    original = Holder(reference_module(ifast.InceptionSpec(13, 5, 7, 9, 3, 11, 6), batch_norm=batch_norm), 13).eval()
    fused = copy.deepcopy(original)
    fused.block = as_traced_op(ifast.FusedInception.from_module(fused.block, backend="cpu").eval())
    x = torch.randn(2, 13, 9, 9)
    want = fvcore_total(original, x)
    assert fvcore_total(fused, x, **ifast.counting_rules.fvcore(fused)) == want
    # Without the model the handles count the convolutions only (fvcore counts eval-mode BN too).
    bn = 2 * (2 * 9 * 9) * (5 + 7 + 9 + 3 + 11 + 6)  # 2 per element of every conv's output
    assert fvcore_total(fused, x, **ifast.counting_rules.fvcore()) == (want - bn if batch_norm else want)


@needs_cpu_kernel
@pytest.mark.parametrize("name", ["A", "B", "C", "D", "E", "residual"])
def test_fvcore_handles_count_the_graph_op_as_the_original_block(name):
    """Inception-v3's blocks, and a residual one (its tail's 1x1 is an aten::addmm in the trace)."""
    pytest.importorskip("fvcore")
    channels = 8 if name == "residual" else 24
    original = Holder(small_residual_block() if name == "residual" else small_v3_block(name), channels).eval()
    fused = copy.deepcopy(original)
    fused.block = as_traced_op(FusedBranchGraph.from_module(fused.block, backend="cpu").eval())
    x = torch.randn(2, channels, 9, 9)
    assert fvcore_total(fused, x, **ifast.counting_rules.fvcore(fused)) == fvcore_total(original, x)


def stand_in(block):
    """Stands in for ops.branch_graph.BranchGraphFunction in a trace with gradients on, where
    fvcore sees the whole Function as one prim::PythonOp.BranchGraphFunction node."""

    class BranchGraphFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, *params):  # only the count is checked: a value of the right shape
            return x.new_zeros(x.shape[0], block.graph.out_channels, *x.shape[2:])

        @staticmethod
        def backward(ctx, grad):
            raise NotImplementedError

    return lambda x: BranchGraphFunction.apply(x, *block.parameters())


@pytest.mark.parametrize("batch_norm", [False, True])
def test_fvcore_handles_count_the_autograd_function_node(batch_norm):
    pytest.importorskip("fvcore")
    original = Holder(reference_module(ifast.InceptionSpec(13, 5, 7, 9, 3, 11, 6), batch_norm=batch_norm), 13).eval()
    fused = copy.deepcopy(original)
    block = fused.block = ifast.FusedInception.from_module(fused.block, backend="reference").eval()
    block.forward = stand_in(block)
    x = torch.randn(2, 13, 9, 9)
    assert fvcore_total(fused, x, **ifast.counting_rules.fvcore(fused)) == fvcore_total(original, x)


@needs_cpu_kernel
@pytest.mark.parametrize("name", MODELS)
def test_fvcore_counts_a_swapped_model_as_the_original(name):
    pytest.importorskip("fvcore")
    original, swapped, size = original_and_swapped(name)
    x = torch.randn(1, 3, size, size)
    want = fvcore_total(original, x)
    # fvcore scopes its trace with hooks on every module, so the fused blocks run the
    # original there: equal with or without the handles.
    assert fvcore_total(swapped, x) == want
    assert fvcore_total(swapped, x, **ifast.counting_rules.fvcore(swapped)) == want


@pytest.mark.parametrize("bn", [False, True])
def test_thop_and_ptflops_count_a_users_traced_block(bn):
    # A block recognised by its traced structure (functional ReLUs): it runs its original
    # forward under the peers' hooks, so ptflops' patched F.relu counts as in the original.
    thop = pytest.importorskip("thop")
    ptflops = pytest.importorskip("ptflops")
    from test_swap import UserBlock

    model = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), UserBlock(bn=bn), nn.ReLU()).eval()
    swapped = ifast.swap_inception(copy.deepcopy(model)).eval()
    assert swapped[1]._traced is not None
    x = torch.randn(2, 3, 9, 9)
    assert thop.profile(swapped, inputs=(x,), custom_ops=ifast.counting_rules.thop(), verbose=False)[0] == \
        thop.profile(model, inputs=(x,), verbose=False)[0]
    with contextlib.redirect_stdout(io.StringIO()):
        counts = [ptflops.get_model_complexity_info(m, (3, 9, 9), backend="pytorch", as_strings=False,
                                                    print_per_layer_stat=False, **kw)[0]
                  for m, kw in ((model, {}), (swapped, {"custom_modules_hooks": ifast.counting_rules.ptflops()}))]
    assert counts[0] == counts[1]
