"""swap_inception and verify on real models."""

import copy
import logging
import os

import pytest
import torch
import torchvision
from torch import nn

import inception_fast as ifast
from inception_fast.models import googlenet_paper

from conftest import needs_cpu_kernel, randomize_, rel_err, small_v3_block


def torchvision_googlenet():
    model = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True)
    return randomize_(model).eval()


@needs_cpu_kernel
def test_torchvision_googlenet_all_nine_blocks_within_1e4(caplog):
    original = torchvision_googlenet()
    with caplog.at_level(logging.INFO, logger="inception_fast"):
        swapped = ifast.swap_inception(copy.deepcopy(original), backend="cpu")
    fused = [n for n, m in swapped.named_modules() if isinstance(m, ifast.FusedInception)]
    assert len(fused) == 9
    assert "swapped 9 block(s)" in caplog.text
    # BN blocks: the log says that train mode fuses by the pixel threshold, not every call
    threshold = ifast.FusedBranchGraph.bn_train_min_pixels
    assert f"a CPU call runs fused from FusedBranchGraph.bn_train_min_pixels={threshold} input pixels" in caplog.text
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert rel_err(swapped(x), original(x)) <= 1e-4
    report = ifast.verify(original, swapped, x)
    assert report.ok and len(report.blocks) == 9


@needs_cpu_kernel
def test_paper_googlenet_swaps_and_aux_heads_still_train(caplog):
    original = randomize_(googlenet_paper()).eval()
    with caplog.at_level(logging.INFO, logger="inception_fast"):
        swapped = ifast.swap_inception(copy.deepcopy(original), backend="cpu")
    assert "swapped 9 block(s)" in caplog.text and "bn_train_min_pixels" not in caplog.text  # no BN: no hint
    assert sum(isinstance(m, ifast.FusedInception) for m in swapped.modules()) == 9
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert rel_err(swapped(x), original(x)) <= 1e-4
    swapped.train()
    out = swapped(torch.randn(2, 3, 224, 224))
    assert len(out) == 3 and all(o.shape == (2, 1000) for o in out)
    ifast.models.googlenet_loss(out, torch.tensor([1, 2])).backward()
    assert swapped.inception4a.branch2[1].conv.weight.grad is not None


def test_state_dict_round_trips_between_original_and_swapped():
    original = torchvision_googlenet()
    swapped = ifast.swap_inception(copy.deepcopy(original))
    assert swapped.state_dict().keys() == original.state_dict().keys()
    fresh = torchvision_googlenet()
    fresh.load_state_dict(swapped.state_dict())
    swapped.load_state_dict(fresh.state_dict())


def test_models_without_inception_blocks_are_untouched(caplog):
    model = torchvision.models.resnet18(weights=None)
    before = repr(model)
    with caplog.at_level(logging.INFO, logger="inception_fast"):
        assert ifast.swap_inception(model) is model
    assert repr(model) == before
    assert "swapped 0 block(s)" in caplog.text


def test_unsupported_block_is_left_alone_with_a_reason(caplog):
    model = torch.nn.Sequential(ifast.ReferenceInception(ifast.InceptionSpec(8, 4, 4, 4, 4, 4, 4)))
    model[0].branch3[1].conv.stride = (2, 2)
    with caplog.at_level(logging.WARNING, logger="inception_fast"):
        ifast.swap_inception(model)
    assert isinstance(model[0], ifast.ReferenceInception)
    assert "left 0 (ReferenceInception) unfused" in caplog.text and "stride" in caplog.text


def test_repr_after_swap_names_the_fused_blocks():
    model = ifast.swap_inception(torchvision_googlenet())
    text = repr(model)
    assert text.count("FusedInception(") == 9 and "from=Inception" in text


def test_bad_arguments():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        ifast.swap_inception("googlenet")
    with pytest.raises(ValueError, match="backend must be one of"):
        ifast.swap_inception(torch.nn.Linear(2, 2), backend="gpu")


class UserBlock(torch.nn.Module):
    """A user's own Inception block: other class, other names, functional ReLUs and BN."""

    def __init__(self, cin=12, bn=False):
        super().__init__()
        self.one = torch.nn.Conv2d(cin, 5, 1)
        self.red3, self.conv3 = torch.nn.Conv2d(cin, 6, 1), torch.nn.Conv2d(6, 7, 3, padding=1)
        self.red5, self.conv5 = torch.nn.Conv2d(cin, 3, 1), torch.nn.Conv2d(3, 4, 5, padding=2)
        self.pool, self.proj = torch.nn.MaxPool2d(3, 1, 1), torch.nn.Conv2d(cin, 2, 1)
        self.bn = bn
        if bn:
            self.norms = torch.nn.ModuleList([torch.nn.BatchNorm2d(c, eps=1e-3) for c in (5, 6, 7, 3, 4, 2)])

    def norm(self, i, t):
        return self.norms[i](t) if self.bn else t

    def forward(self, x):
        relu = torch.nn.functional.relu
        b1 = relu(self.norm(0, self.one(x)))
        b2 = relu(self.norm(2, self.conv3(relu(self.norm(1, self.red3(x))))))
        b3 = relu(self.norm(4, self.conv5(relu(self.norm(3, self.red5(x))))))
        b4 = relu(self.norm(5, self.proj(self.pool(x))))
        return torch.cat([b1, b2, b3, b4], dim=1)


def test_a_users_own_block_is_recognised_by_structure():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 12, 3, padding=1), UserBlock(), torch.nn.ReLU())
    randomize_(model).eval()
    original = copy.deepcopy(model)
    ifast.swap_inception(model, verify=1e-5)
    assert isinstance(model[1], ifast.FusedInception)
    assert model[1].spec == ifast.InceptionSpec(12, 5, 6, 7, 3, 4, 2, k3=3, k5=5)
    assert model.state_dict().keys() == original.state_dict().keys()
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        assert rel_err(model(x), original(x)) <= 1e-5


def test_a_user_block_with_bn_folds_in_eval_and_runs_its_own_forward_in_train():
    block = randomize_(UserBlock(bn=True))
    fused = ifast.FusedInception.from_module(copy.deepcopy(block))
    x = torch.randn(4, 12, 6, 6)
    block.eval(), fused.eval()
    with torch.no_grad():
        assert rel_err(fused(x), block(x)) <= 1e-5
    block.train(), fused.train()
    torch.testing.assert_close(fused(x), block(x))
    torch.testing.assert_close(fused.norms[0].running_mean, block.norms[0].running_mean)


def test_a_near_miss_user_block_is_left_alone_with_the_reason(caplog):
    block = UserBlock()
    block.conv5 = torch.nn.Conv2d(3, 4, 5, padding=2, stride=2)  # not 'same': the concat would fail
    block.conv5.stride = (1, 2)
    model = torch.nn.Sequential(block)
    with caplog.at_level(logging.WARNING, logger="inception_fast"):
        ifast.swap_inception(model)
    assert isinstance(model[0], UserBlock)
    assert "left 0 (UserBlock) unfused" in caplog.text and "stride" in caplog.text


def test_verify_rejects_a_block_whose_numbers_differ(monkeypatch, caplog):
    from inception_fast import swap

    monkeypatch.setattr(swap, "_rel", lambda got, want: 1.0)
    model = torch.nn.Sequential(UserBlock())
    with caplog.at_level(logging.WARNING, logger="inception_fast"):
        ifast.swap_inception(model, verify=1e-4)
    assert isinstance(model[0], UserBlock) and "differs from the original by 1.00e+00" in caplog.text


def test_an_original_that_rounds_more_than_the_kernel_is_judged_against_fp64(monkeypatch, caplog):
    """As on a GPU in fp32, where cuDNN's convolutions default to TF32 and the kernel to exact
    fp32: here the original's convolutions round their operands to bf16 (~3e-3 off fp64, past
    the fp32 self-check's 1e-4), the fused CPU kernel does not. The block is fused, and the
    fused model is nearer fp64 than the original."""
    real = torch.nn.functional.conv2d
    bf16 = lambda t: t.to(torch.bfloat16).float()  # noqa: E731
    monkeypatch.setattr(torch.nn.functional, "conv2d", lambda x, w, b=None, *a: real(
        bf16(x), bf16(w), b, *a) if x.dtype == torch.float32 else real(x, w, b, *a))
    model = torch.nn.Sequential(UserBlock()).eval()
    exact = copy.deepcopy(model).double()
    with caplog.at_level(logging.WARNING, logger="inception_fast"):
        ifast.swap_inception(model)
    assert not isinstance(model[0], UserBlock), caplog.text
    x = torch.randn(2, 12, 9, 9)
    with torch.no_grad():
        want = exact(x.double())
        err = ((model(x).double() - want).norm() / want.norm()).item()
    assert err < 1e-5


def _ill_conditioned(kind: str) -> torch.nn.Module:
    """An Inception-v3 block whose own fp32 output is far from fp64 for reasons no rounding
    explains: an overflowing conv scaled back by its BN, or a huge bias cancelled by BN."""
    torch.manual_seed(0)
    block = small_v3_block("A", 9)
    conv, bn = block.branch1x1.conv, block.branch1x1.bn
    with torch.no_grad():
        if kind == "overflow":
            conv.weight.mul_(1e38)
            bn.weight.fill_(1e-38)
        else:
            biased = torch.nn.Conv2d(9, conv.out_channels, 1, bias=True)
            biased.weight.copy_(conv.weight)
            biased.bias.fill_(1e9)
            block.branch1x1.conv = biased
            bn.running_mean.fill_(1e9)
            bn.running_var.fill_(1.0)
    return torch.nn.Sequential(torch.nn.Identity(), block)


@needs_cpu_kernel
@pytest.mark.parametrize("kind", ["overflow", "cancellation"])
def test_an_original_far_from_fp64_excuses_no_wrong_fused_block(kind, monkeypatch, caplog):
    """The fp64 fallback must not accept a wrong kernel (here: one that outputs zeros) just
    because the original is itself far from fp64: only an error its dtype's rounding
    explains (the tolerance table's reduced-precision limit) may excuse the fused block."""
    from inception_fast import fused_graph

    real = fused_graph.graph_forward_inference
    monkeypatch.setattr(fused_graph, "graph_forward_inference", lambda *a, **k: real(*a, **k) * 0)
    model = _ill_conditioned(kind)
    with caplog.at_level(logging.WARNING, logger="inception_fast"):
        ifast.swap_inception(model, backend="cpu")
    assert type(model[1]).__name__ == "InceptionA", caplog.text
    assert "left 1 (InceptionA) unfused" in caplog.text


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter runs triton on the CPU")
def test_a_backend_that_cannot_run_the_block_leaves_it_with_a_log_line(caplog):
    """backend='triton' on a CPU model: each block is refused with the reason, the walk
    goes on, nothing raises half-way through the model."""
    model = torch.nn.Sequential(small_v3_block("B", 7), small_v3_block("A", 9))
    with caplog.at_level(logging.WARNING, logger="inception_fast"):
        ifast.swap_inception(model, backend="triton")
    assert [type(m).__name__ for m in model] == ["InceptionB", "InceptionA"]
    assert caplog.text.count("unfused: backend='triton' needs") == 2


def test_a_network_whose_top_level_looks_like_a_near_miss_is_no_warning(caplog):
    """Two conv branches concatenated at the top of a network: not a block left unfused."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(3, 8, 1)

        def forward(self, x):
            return torch.cat([self.a(x), self.b(x)], 1)

    with caplog.at_level(logging.WARNING, logger="inception_fast"):
        ifast.swap_inception(Net())
    assert "unfused" not in caplog.text


def test_fp32_on_a_gpu_under_default_flags_gets_one_note_on_the_trade(monkeypatch):
    from inception_fast.swap import _precision_note

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    gpu_fp32 = {("cuda", torch.float32)}
    flag = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        note = _precision_note(gpu_fp32, "auto")
        assert "exact fp32" in note and "TF32" in note and "bfloat16" in note
        assert _precision_note({("cpu", torch.float32)}, "auto") is None
        assert _precision_note({("cuda", torch.bfloat16)}, "auto") is None
        assert _precision_note(gpu_fp32, "reference") is None
        torch.backends.cuda.matmul.allow_tf32 = True  # the kernels run TF32 too
        assert _precision_note(gpu_fp32, "auto") is None
    finally:
        torch.backends.cuda.matmul.allow_tf32 = flag


def test_verify_disables_the_fp64_fallback(monkeypatch, caplog):
    """verify= asks for the fused block within that distance of the original itself."""
    real = torch.nn.functional.conv2d
    bf16 = lambda t: t.to(torch.bfloat16).float()  # noqa: E731
    monkeypatch.setattr(torch.nn.functional, "conv2d", lambda x, w, b=None, *a: real(
        bf16(x), bf16(w), b, *a) if x.dtype == torch.float32 else real(x, w, b, *a))
    model = torch.nn.Sequential(UserBlock()).eval()
    with caplog.at_level(logging.WARNING, logger="inception_fast"):
        ifast.swap_inception(model, verify=1e-4)
    assert isinstance(model[0], UserBlock) and "differs from the original" in caplog.text


def test_a_fused_block_worse_than_twice_the_originals_own_error_is_refused(monkeypatch, caplog):
    from inception_fast import swap

    errors = iter([5e-3, 2e-3, 5e-4])  # fused vs original, fused vs fp64, original vs fp64
    monkeypatch.setattr(swap, "_rel", lambda got, want: next(errors))
    model = torch.nn.Sequential(UserBlock())
    with caplog.at_level(logging.WARNING, logger="inception_fast"):
        ifast.swap_inception(model)
    assert isinstance(model[0], UserBlock)
    assert "against fp64 the fused block is off by 2.00e-03, the original by 5.00e-04" in caplog.text


def test_to_dtype_and_memory_format_keep_working_after_a_swap():
    model = ifast.swap_inception(torchvision_googlenet())
    model = model.to(torch.float64).to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 224, 224, dtype=torch.float64)
    with torch.no_grad():
        assert model(x).dtype == torch.float64


@needs_cpu_kernel
def test_convs_true_checks_large_unpadded_units_and_leaves_kernels_past_31_alone(caplog):
    """The swap-time check's input grows with an unpadded kernel (a 9x9 'valid' unit needs
    9x9: on 7x7 the original itself raised, out of the walk, leaving the model half
    swapped); a kernel past the C++ limit (31) is refused with its reason, and the rest of
    the model is still swapped."""
    from torchvision.models.inception import BasicConv2d

    model = nn.Sequential(randomize_(BasicConv2d(4, 6, kernel_size=9)).eval(),
                          randomize_(BasicConv2d(6, 5, kernel_size=33, padding=16)).eval(),
                          randomize_(BasicConv2d(5, 3, kernel_size=3)).eval())
    original = copy.deepcopy(model)
    with caplog.at_level(logging.DEBUG, logger="inception_fast"):
        ifast.swap_inception(model, convs=True)
    assert [type(m).__name__ for m in model] == ["FusedBranchGraph", "BasicConv2d", "FusedBranchGraph"]
    assert "33x33 conv; the fused op's kernels are at most 31x31" in caplog.text
    x = torch.randn(2, 4, 40, 41)
    with torch.no_grad():
        assert rel_err(model(x), original(x)) <= 1e-5
    with pytest.raises(ifast.NotAnInceptionBlock, match="at most 31x31"):
        ifast.FusedBranchGraph.from_module(original[1])
    with pytest.raises(TypeError, match="model is itself a conv unit; use FusedBranchGraph.from_module"):
        ifast.swap_inception(original[0], convs=True)
