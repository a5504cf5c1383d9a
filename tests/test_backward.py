"""The fused backward: the C++ kernel, its ATen twin, and the custom-op registrations."""

import importlib

import pytest
import torch

import inception_fast as ifast

from conftest import AWKWARD_SIZES, AWKWARD_SPECS, TOLERANCE, needs_cpu_kernel, reference_module, rel_err, weights_of

op = importlib.import_module("inception_fast.ops.inception")  # the module; ops.inception is the function
pytestmark = needs_cpu_kernel
SPEC = ifast.InceptionSpec(13, 5, 7, 9, 3, 11, 6)
ALL = (True,) * 13


def _case(spec, size, dtype, *, ties=False):
    n, h, w = size
    weights = weights_of(reference_module(spec), dtype)
    x = torch.randn(n, spec.in_channels, h, w, dtype=dtype)
    if ties:  # small integers: every 3x3 pooling window holds equal maxima
        x = x.mul(1.5).round().clamp(-1, 2)
    with torch.no_grad():
        y = op.fused_forward(x, weights, backend="cpu")
    return x, y, weights, torch.randn_like(y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("spec", AWKWARD_SPECS)
@pytest.mark.parametrize("size", AWKWARD_SIZES)
def test_cpp_backward_matches_the_aten_twin(spec, size, dtype):
    """The C++ backward (CPU) and inception_backward (every other device) agree."""
    x, y, weights, g = _case(spec, size, dtype, ties=True)
    cpp = op.backward(g, x, y, list(weights), list(ALL), "cpu")
    aten = op.inception_backward(g, x, y, weights, ALL)
    for name, a, b in zip(("x", *op.InceptionWeights._fields), cpp, aten):
        assert rel_err(a, b) <= TOLERANCE[dtype], name


def test_max_pool_ties_send_the_gradient_where_torch_does():
    """With equal maxima in a window, torch's max pool picks the first in row-major order."""
    spec = ifast.InceptionSpec(4, 1, 1, 1, 1, 1, 3)
    ref = reference_module(spec).train()
    x = torch.zeros(1, 4, 5, 5)
    x[0, :, 1:4, 1:4] = 1.0  # a plateau: most windows see several 1s
    x_ref = x.clone().requires_grad_()
    x_fused = x.clone().requires_grad_()
    grad_out = torch.randn(1, spec.out_channels, 5, 5)
    ref(x_ref).backward(grad_out)
    ifast.FusedInception.from_module(ref, backend="cpu")(x_fused).backward(grad_out)
    assert rel_err(x_fused.grad, x_ref.grad) <= TOLERANCE[torch.float32]


def test_only_the_requested_gradients_are_returned():
    x, y, weights, g = _case(SPEC, (2, 5, 5), torch.float32)
    needs = [False] + [True] * 12
    grads = op.backward(g, x, y, list(weights), needs, "cpu")
    assert grads[0].numel() == 0
    assert [tuple(t.shape) for t in grads[1:]] == [tuple(w.shape) for w in weights]


def test_backward_is_bit_identical_across_calls():
    x, y, weights, g = _case(ifast.GOOGLENET_INCEPTION["5a"].spec, (2, 7, 7), torch.float32)
    first = op.backward(g, x, y, list(weights), list(ALL), "cpu")
    again = op.backward(g, x, y, list(weights), list(ALL), "cpu")
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_empty_batch_has_zero_gradients_of_the_right_shapes():
    x, y, weights, g = _case(SPEC, (2, 5, 5), torch.float32)
    grads = op.backward(g[:0], x[:0], y[:0], list(weights), list(ALL), "cpu")
    assert tuple(grads[0].shape) == (0, 13, 5, 5)
    assert all(t.shape == w.shape and not t.any() for t, w in zip(grads[1:], weights))


@pytest.mark.parametrize("which", ["backward", "cpu_forward"])
def test_custom_op_registrations_pass_opcheck(which):
    """Schema, register_fake and register_autograd agree with the real kernels."""
    x, y, weights, g = _case(SPEC, (2, 5, 5), torch.float64)
    if which == "backward":
        args = (g, x, y, list(weights), list(ALL), "cpu")
        target = torch.ops.inception_fast.backward.default
    else:
        packed = op.pack_cpu_weights(weights)
        args = (x.requires_grad_(), *(t.requires_grad_() for t in packed[:-1]), list(packed.dims))
        target = torch.ops.inception_fast.cpu_forward.default
    torch.library.opcheck(target, args)


def test_forward_op_is_differentiable_through_its_packed_weights():
    """register_autograd: a bare cpu_forward call backpropagates to the unpacked weights."""
    ref = reference_module(ifast.InceptionSpec(4, 2, 3, 2, 2, 3, 2, k5=3)).double()
    weights = [p.detach().clone().requires_grad_() for p in ref.parameters()]
    x = torch.randn(1, 4, 4, 4, dtype=torch.float64, requires_grad=True)

    def through_the_op(x, *w):
        packed = op.pack_cpu_weights(op.InceptionWeights(*w))
        return torch.ops.inception_fast.cpu_forward(x, *packed[:-1], list(packed.dims))

    assert torch.autograd.gradcheck(through_the_op, (x, *weights), eps=1e-6, atol=1e-5, fast_mode=True)
