"""FusedInception as a module: BN folding, train mode, weight caches, state_dict, autograd."""

import copy

import pytest
import torch

import inception_fast as ifast

from conftest import TOLERANCE, needs_cpu_kernel, randomize_, reference_module, rel_err

SPEC = ifast.InceptionSpec(13, 5, 7, 9, 3, 11, 6)
BACKENDS = [pytest.param("cpu", marks=needs_cpu_kernel), "reference"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_norm_is_folded_in_eval(backend):
    ref = reference_module(SPEC, batch_norm=True)
    fused = ifast.FusedInception.from_module(ref, backend=backend).eval()
    x = torch.randn(2, 13, 7, 7)
    with torch.no_grad():
        assert rel_err(fused(x), ref(x)) <= TOLERANCE[torch.float32]


def test_batch_norm_train_mode_matches_the_original_and_updates_running_stats():
    original = reference_module(SPEC, batch_norm=True).train()
    twin = copy.deepcopy(original)
    fused = ifast.FusedInception.from_module(twin)
    assert fused.training
    x = torch.randn(4, 13, 6, 6)
    torch.testing.assert_close(fused(x), original(x))
    for a, b in zip(original.buffers(), twin.buffers()):
        torch.testing.assert_close(a, b)
    assert twin.branch1.bn.num_batches_tracked.item() == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_norm", [False, True])
def test_next_forward_sees_optimizer_step_and_load_state_dict(backend, batch_norm):
    ref = reference_module(SPEC, batch_norm=batch_norm)
    fused = ifast.FusedInception.from_module(copy.deepcopy(ref), backend=backend).eval()
    x = torch.randn(1, 13, 5, 5)
    with torch.no_grad():
        fused(x)  # fill the fold and pack caches
    opt = torch.optim.SGD(fused.parameters(), lr=0.5)
    for p in fused.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    mirror = reference_module(SPEC, batch_norm=batch_norm)
    mirror.load_state_dict(fused.state_dict())
    with torch.no_grad():
        assert rel_err(fused(x), mirror(x)) <= TOLERANCE[torch.float32]
        fused.load_state_dict(ref.state_dict())
        assert rel_err(fused(x), ref(x)) <= TOLERANCE[torch.float32]


def test_state_dict_keys_are_the_original_blocks():
    from torchvision.models.googlenet import Inception

    tv = Inception(192, 64, 96, 128, 16, 32, 32)
    fused = ifast.FusedInception.from_module(tv)
    assert fused.state_dict().keys() == tv.state_dict().keys()
    plain = ifast.FusedInception(SPEC)
    assert plain.state_dict().keys() == ifast.ReferenceInception(SPEC).state_dict().keys()


def test_repr_says_what_runs():
    text = repr(ifast.FusedInception.from_module(reference_module(SPEC, batch_norm=True), backend="cpu"))
    assert text.startswith("FusedInception(")
    assert "backend='cpu'" in text and "train mode with batch norm: fused" in text and "in_channels=13" in text


def test_from_module_refuses_what_it_cannot_prove():
    bad = reference_module(SPEC)
    bad.branch2[1].conv.stride = (2, 2)
    with pytest.raises(ifast.NotAnInceptionBlock, match="stride"):
        ifast.FusedInception.from_module(bad)
    with pytest.raises(ifast.NotAnInceptionBlock, match="does not return a torch.cat"):
        ifast.FusedInception.from_module(torch.nn.Conv2d(3, 3, 1))


def backward_both(ref, backend, shape):
    """Backward of ref and of its fused twin with one grad_output; (fused, x, x_ref) with grads."""
    fused = ifast.FusedInception.from_module(copy.deepcopy(ref), backend=backend)
    x = torch.randn(*shape, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    grad_out = torch.randn(shape[0], ref.spec.out_channels, *shape[2:])
    fused(x).backward(grad_out)
    ref(x_ref).backward(grad_out)
    return fused, x, x_ref


def assert_grads_match(fused, ref, x, x_ref):
    assert rel_err(x.grad, x_ref.grad) <= TOLERANCE[torch.float32]
    for (name, p), q in zip(fused.named_parameters(), ref.parameters()):
        assert rel_err(p.grad, q.grad) <= TOLERANCE[torch.float32], name


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_the_reference_module(backend):
    ref = reference_module(SPEC).train()
    fused, x, x_ref = backward_both(ref, backend, (2, 13, 6, 6))
    assert_grads_match(fused, ref, x, x_ref)


@needs_cpu_kernel
def test_gradcheck_fp64_cpu_backend():
    spec = ifast.InceptionSpec(4, 2, 3, 2, 2, 3, 2, k5=3)
    ref = randomize_(ifast.ReferenceInception(spec)).double()
    weights = [p.detach().clone().requires_grad_() for p in ref.parameters()]
    x = torch.randn(1, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    # Keep pre-activations away from ReLU's kink, where finite differences are meaningless.
    assert torch.autograd.gradcheck(
        lambda x, *w: ifast.inception(x, *w, backend="cpu"), (x, *weights), eps=1e-6, atol=1e-5
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", [
    ifast.InceptionSpec(20, 17, 33, 35, 4, 19, 21, k5=3),
    ifast.InceptionSpec(37, 40, 24, 33, 8, 47, 1, k3=5, k5=7),
])
@pytest.mark.parametrize("size", [(1, 1, 1), (3, 7, 7), (2, 5, 9)])
def test_gradients_on_awkward_shapes(backend, spec, size):
    n, h, w = size
    ref = reference_module(spec).train()
    fused, x, x_ref = backward_both(ref, backend, (n, spec.in_channels, h, w))
    assert_grads_match(fused, ref, x, x_ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_relu_at_exactly_zero_passes_no_gradient_like_torch(backend):
    ref = reference_module(SPEC).train()
    with torch.no_grad():  # branch 1 and the 5x5 reduction output exactly 0 everywhere
        ref.branch1.conv.weight.zero_()
        ref.branch1.conv.bias.zero_()
        ref.branch3[0].conv.weight.zero_()
        ref.branch3[0].conv.bias.zero_()
    fused, x, x_ref = backward_both(ref, backend, (2, 13, 6, 6))
    assert torch.count_nonzero(fused.branch1.conv.weight.grad) == 0
    assert torch.count_nonzero(fused.branch3[0].conv.weight.grad) == 0
    assert rel_err(x.grad, x_ref.grad) <= TOLERANCE[torch.float32]
    for p, q in zip(fused.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)


@needs_cpu_kernel
def test_backward_saves_no_intermediates():
    """Saved for backward: x, the output and the weights; never t3, t5 or the pooled input."""
    spec = ifast.GOOGLENET_INCEPTION["3a"].spec
    fused = ifast.FusedInception(spec, backend="cpu").train()
    x = torch.randn(1, 192, 28, 28, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        fused(x)
    weights = sum(p.numel() for p in fused.parameters())
    expected = x.numel() + spec.out_channels * 28 * 28 + weights
    assert sum(saved) == expected


@needs_cpu_kernel
@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format], ids=["cl", "nchw"])
@pytest.mark.parametrize("kind", ["googlenet", "stem"])
def test_non_finite_weights_run_the_original(kind, memory_format, caplog):
    """A NaN in a padded 3x3's weight (a corrupted model): eager's convolution skips the
    padding taps, the kernel multiplies its zero border (0 * NaN), so the fused forward
    runs the original block instead, with eager's NaN pattern and values; it fuses again
    once the weight is finite (the packing cache rebuilds and checks again)."""
    from torchvision.models.googlenet import BasicConv2d, Inception

    torch.manual_seed(0)
    block = (randomize_(Inception(10, 4, 5, 7, 3, 6, 5)) if kind == "googlenet"
             else randomize_(BasicConv2d(10, 24, kernel_size=3, padding=1))).eval()
    fused = ifast.swap_inception(torch.nn.Sequential(copy.deepcopy(block)), convs=True)[0]
    assert isinstance(fused, ifast.FusedBranchGraph)
    x = torch.randn(2, 10, 16, 16).contiguous(memory_format=memory_format)
    ran = []
    fused._original[0].register_forward_pre_hook(lambda *a: ran.append(1))
    conv3 = lambda m: next(c for c in m.modules() if isinstance(c, torch.nn.Conv2d) and c.kernel_size == (3, 3))
    with torch.no_grad():
        # A corner tap: it reads the padding at the bottom and right borders.
        saved = conv3(block).weight[0, 0, 2, 2].item()
        for model in (block, fused):
            conv3(model).weight[0, 0, 2, 2] = float("nan")
        want, got = block(x), fused(x)
        assert ran and "non-finite folded weights" in caplog.text
        assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.isnan(want).any()
        finite = ~torch.isnan(want)
        assert rel_err(got[finite], want[finite]) <= TOLERANCE[torch.float32]
        ran.clear()
        for model in (block, fused):
            conv3(model).weight[0, 0, 2, 2] = saved
        assert rel_err(fused(x), block(x)) <= TOLERANCE[torch.float32] and not ran


@needs_cpu_kernel
def test_cached_packed_weights_hold_no_autograd_graph():
    """The packing cache builds under inference_mode(False), which turns grad mode on: the
    cached panels must still be plain tensors (no grad_fn keeping the BN fold's saved
    tensors alive, no requires_grad)."""
    ref = reference_module(SPEC, batch_norm=True).eval()
    fused = ifast.FusedInception.from_module(ref).eval()
    for grad in (False, True):
        with torch.set_grad_enabled(grad), torch.inference_mode(not grad):
            fused(torch.randn(2, 13, 7, 7))
        cached = [t for cache in fused._pack_caches.values() for part in cache._value for t in part]
        assert cached and all(t.grad_fn is None and not t.requires_grad for t in cached)


@needs_cpu_kernel
@pytest.mark.parametrize("kernel, padding", [(3, 1), (5, 2), ((1, 7), (0, 3)), ((7, 1), (3, 0))],
                         ids=["3x3", "5x5", "1x7", "7x1"])
@pytest.mark.parametrize("shape", [(3, 5, 9, 11), (1, 5, 1, 1), (2, 5, 2, 13)], ids=["9x11", "1x1", "2x13"])
def test_padded_conv_unit_over_x_on_the_direct_gemm(kernel, padding, shape):
    """A 'same' conv unit straight over x runs the direct implicit GEMM (float64 has no
    Winograd form) from a bordered copy of x whose border alone is zeroed: grids smaller
    than the border included."""
    from torchvision.models.inception import BasicConv2d

    torch.manual_seed(0)
    original = randomize_(BasicConv2d(5, 7, kernel_size=kernel, padding=padding)).eval().double()
    fused = ifast.FusedBranchGraph.from_module(copy.deepcopy(original)).eval()
    x = torch.randn(*shape, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(fused(x), original(x)) <= TOLERANCE[torch.float64]
