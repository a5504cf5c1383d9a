"""The fused backward of GoogLeNet's module (the branch graph's preset): the C++ kernel, its
ATen twin, and the custom-op registrations."""

import pytest
import torch

import inception_fast as ifast
from inception_fast.ops import branch_graph as bg
from inception_fast.ops.inception import InceptionWeights, preset

from conftest import AWKWARD_SIZES, AWKWARD_SPECS, TOLERANCE, needs_cpu_kernel, reference_module, rel_err, weights_of

pytestmark = needs_cpu_kernel
SPEC = ifast.InceptionSpec(13, 5, 7, 9, 3, 11, 6)
ALL = [True, True]  # (x, weights)


def _case(spec, size, dtype, *, ties=False):
    """x, y, the intermediates (t3, t5), the weights, grad_out and the preset's plan."""
    n, h, w = size
    weights = weights_of(reference_module(spec), dtype)
    x = torch.randn(n, spec.in_channels, h, w, dtype=dtype)
    if ties:  # small integers: every 3x3 pooling window holds equal maxima
        x = x.mul(1.5).round().clamp(-1, 2)
    p = preset(spec)
    with torch.no_grad():
        packed = bg.pack_weights(p.plan, weights.weights, weights.biases, "cpu")
        y, buffers = torch.ops.inception_fast.graph_forward_saving(x, *packed, p.flat)
    inter = [buf[:, k:k + h, k:k + w] for buf, k in zip(buffers, p.plan.buf_border)]
    return x, y, inter, weights, torch.randn_like(y), p


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("spec", AWKWARD_SPECS)
@pytest.mark.parametrize("size", AWKWARD_SIZES)
def test_cpp_backward_matches_the_aten_twin(spec, size, dtype):
    """The C++ backward (CPU) and graph_backward_reference (every other device) agree."""
    x, y, inter, weights, g, p = _case(spec, size, dtype, ties=True)
    cpp = bg.graph_backward(g, x, y, inter, weights.weights, ALL, p.backward_flat, "cpu")
    aten = bg.graph_backward_reference(g, x, y, inter, weights.weights, ALL, p.backward_flat)
    names = ["x"] + [f"{kind}{i}" for i in range(6) for kind in ("w", "b")]
    for name, a, b in zip(names, cpp, aten):
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
    x, y, inter, weights, g, p = _case(SPEC, (2, 5, 5), torch.float32)
    grads = bg.graph_backward(g, x, y, inter, weights.weights, [False, True], p.backward_flat, "cpu")
    assert grads[0].numel() == 0
    assert [tuple(t.shape) for t in grads[1:]] == [tuple(t.shape) for pair in zip(weights.weights, weights.biases)
                                                   for t in pair]
    grads = bg.graph_backward(g, x, y, inter, weights.weights, [True, False], p.backward_flat, "cpu")
    assert grads[0].shape == x.shape and all(t.numel() == 0 for t in grads[1:])


def test_backward_is_bit_identical_across_calls():
    x, y, inter, weights, g, p = _case(ifast.GOOGLENET_INCEPTION["5a"].spec, (2, 7, 7), torch.float32)
    first = bg.graph_backward(g, x, y, inter, weights.weights, ALL, p.backward_flat, "cpu")
    again = bg.graph_backward(g, x, y, inter, weights.weights, ALL, p.backward_flat, "cpu")
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_empty_batch_has_zero_gradients_of_the_right_shapes():
    x, y, inter, weights, g, p = _case(SPEC, (2, 5, 5), torch.float32)
    grads = bg.graph_backward(g[:0], x[:0], y[:0], [t[:0] for t in inter], weights.weights, ALL, p.backward_flat, "cpu")
    assert tuple(grads[0].shape) == (0, 13, 5, 5)
    assert all(t.shape == w.shape and not t.any() for t, w in zip(grads[1::2], weights.weights))


@pytest.mark.parametrize("which", ["graph_backward", "graph_forward", "graph_forward_saving"])
def test_custom_op_registrations_pass_opcheck(which):
    """Schema, register_fake and register_autograd agree with the real kernels."""
    x, y, inter, weights, g, p = _case(SPEC, (2, 5, 5), torch.float64)
    if which == "graph_backward":
        args = (g, x, y, inter, weights.weights, ALL, p.backward_flat, "cpu")
    else:
        b, bias = bg.pack_weights(p.plan, weights.weights, weights.biases, "cpu")
        if which == "graph_forward":  # the saving op has no autograd: BranchGraphFunction owns its backward
            x, b, bias = x.requires_grad_(), [t.requires_grad_() for t in b], [t.requires_grad_() for t in bias]
        args = (x, b, bias, p.flat)
    torch.library.opcheck(getattr(torch.ops.inception_fast, which).default, args)


def test_forward_op_is_differentiable_through_its_packed_weights():
    """register_autograd: a bare graph_forward call (what jit.trace records) backpropagates
    to the unpacked weights."""
    ref = reference_module(ifast.InceptionSpec(4, 2, 3, 2, 2, 3, 2, k5=3)).double()
    weights = [p.detach().clone().requires_grad_() for p in ref.parameters()]
    x = torch.randn(1, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    p = preset(InceptionWeights(*weights).spec())

    def through_the_op(x, *w):
        w = InceptionWeights(*w)
        b, bias = bg.pack_weights(p.plan, w.weights, w.biases, "cpu")
        return torch.ops.inception_fast.graph_forward(x, b, bias, p.flat)

    assert torch.autograd.gradcheck(through_the_op, (x, *weights), eps=1e-6, atol=1e-5, fast_mode=True)
