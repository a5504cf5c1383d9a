"""The fused Inception op: weight checks, backend dispatch, host wrappers and autograd.

Weights use PyTorch's Conv2d layout, so any module's parameters pass straight in:

    w1  (c1, Cin, 1, 1)    b1  (c1,)      branch 1: 1x1
    w3r (r3, Cin, 1, 1)    b3r (r3,)      branch 2: 1x1 reduction ...
    w3  (c3, r3, K3, K3)   b3  (c3,)      ... then K3xK3, 'same' padding
    w5r (r5, Cin, 1, 1)    b5r (r5,)      branch 3: 1x1 reduction ...
    w5  (c5, r5, K5, K5)   b5  (c5,)      ... then K5xK5, 'same' padding
    wp  (cp, Cin, 1, 1)    bp  (cp,)      branch 4: 3x3/1 max pool, then 1x1

Every convolution is followed by ReLU. The output is logically NCHW
(N, c1+c3+c5+cp, H, W) and laid out channels_last, so that a stack of fused
modules never transposes.

Backends: "cpu" is the C++ kernel of csrc/ and "triton" the Triton kernels of
inception_triton.py (both two stages, every branch storing straight into its
channel slice of the output); "reference" is plain PyTorch ops.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from .._cache import TensorVersionCache, tracing
from .._checks import check_choice, check_input, check_out, check_same_dtype_device
from .._extension import cpu_extension, require_cpu_extension, warn_cpu_fallback
from ._layout import as_gemm_b, from_gemm_b
from ..spec import InceptionSpec

__all__ = [
    "BACKENDS",
    "CpuPackedWeights",
    "InceptionFunction",
    "InceptionWeights",
    "backward",
    "fused_forward",
    "inception",
    "pack_cpu_weights",
    "resolve_backend",
]

BACKENDS = ("auto", "triton", "cpu", "reference")
_CPU_DTYPES = (torch.float32, torch.float64)


class InceptionWeights(NamedTuple):
    w1: torch.Tensor
    b1: torch.Tensor
    w3r: torch.Tensor
    b3r: torch.Tensor
    w3: torch.Tensor
    b3: torch.Tensor
    w5r: torch.Tensor
    b5r: torch.Tensor
    w5: torch.Tensor
    b5: torch.Tensor
    wp: torch.Tensor
    bp: torch.Tensor

    def spec(self) -> InceptionSpec:
        """The module's shape, checked for consistency across all twelve tensors."""
        for name, t in self._asdict().items():
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            expected_dim = 1 if name.startswith("b") else 4
            if t.dim() != expected_dim:
                raise ValueError(
                    f"{name} must be {expected_dim}-D, got shape {tuple(t.shape)}"
                )
        cin = self.w1.shape[1]
        k3, k5 = self.w3.shape[-1], self.w5.shape[-1]
        expected = {
            "w1": (self.w1.shape[0], cin, 1, 1),
            "w3r": (self.w3r.shape[0], cin, 1, 1),
            "w3": (self.w3.shape[0], self.w3r.shape[0], k3, k3),
            "w5r": (self.w5r.shape[0], cin, 1, 1),
            "w5": (self.w5.shape[0], self.w5r.shape[0], k5, k5),
            "wp": (self.wp.shape[0], cin, 1, 1),
        }
        for name, shape in expected.items():
            w = getattr(self, name)
            if tuple(w.shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(w.shape)}")
            b = getattr(self, "b" + name[1:])
            if tuple(b.shape) != (shape[0],):
                raise ValueError(f"b{name[1:]} must have shape ({shape[0]},), got {tuple(b.shape)}")
        try:
            return InceptionSpec(
                in_channels=cin,
                ch1x1=self.w1.shape[0],
                ch3x3red=self.w3r.shape[0],
                ch3x3=self.w3.shape[0],
                ch5x5red=self.w5r.shape[0],
                ch5x5=self.w5.shape[0],
                pool_proj=self.wp.shape[0],
                k3=k3,
                k5=k5,
            )
        except ValueError as exc:
            raise ValueError(f"inconsistent Inception weights: {exc}") from None


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """Turn 'auto' into the backend that will run on x's device."""
    check_choice("backend", backend, BACKENDS)
    if backend == "auto":
        if x.is_cuda:
            return "triton" if _triton_available() else "reference"
        if cpu_extension() is None:
            warn_cpu_fallback()
            return "reference"
        if x.dtype not in _CPU_DTYPES:
            return "reference"
        return "cpu"
    if backend == "triton":
        if not _triton_available():
            raise RuntimeError("backend='triton' needs the triton package, which is not installed")
        # A meta tensor (profile's meta mode) stands for any device: its op runs the fake kernel.
        if not x.is_cuda and not x.is_meta and not _interpreting():
            raise ValueError(
                f"backend='triton' needs a CUDA tensor, got x on {x.device}; to run the Triton "
                "kernels on the CPU, set TRITON_INTERPRET=1 before importing inception_fast, "
                "or use backend='cpu'"
            )
    if backend == "cpu":
        if x.device.type not in ("cpu", "meta"):
            raise ValueError(f"backend='cpu' needs x on the CPU, got x on {x.device}")
        if x.dtype not in _CPU_DTYPES:
            raise TypeError(f"backend='cpu' supports x of dtype float32 or float64, got {x.dtype}")
        require_cpu_extension()
    return backend


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# -- reference backend ---------------------------------------------------------


def _forward_reference(x: torch.Tensor, w: InceptionWeights) -> torch.Tensor:
    k3, k5 = w.w3.shape[-1], w.w5.shape[-1]
    y1 = F.relu(F.conv2d(x, w.w1, w.b1))
    y3 = F.relu(F.conv2d(F.relu(F.conv2d(x, w.w3r, w.b3r)), w.w3, w.b3, padding=k3 // 2))
    y5 = F.relu(F.conv2d(F.relu(F.conv2d(x, w.w5r, w.b5r)), w.w5, w.b5, padding=k5 // 2))
    yp = F.relu(F.conv2d(F.max_pool2d(x, 3, stride=1, padding=1), w.wp, w.bp))
    return torch.cat([y1, y3, y5, yp], dim=1).contiguous(memory_format=torch.channels_last)


# -- cpu backend ---------------------------------------------------------------


class CpuPackedWeights(NamedTuple):
    """Weights in the C++ kernel's layout: B = W^T in panels of `panel_width` columns."""

    reduce_b: torch.Tensor  # (panels, Cin, width)          [W1 | W3r | W5r]^T
    reduce_bias: torch.Tensor  # (c1 + r3 + r5,)
    conv3_b: torch.Tensor  # (panels, K3*K3*r3, width)      row (dy*K3 + dx)*r3 + c
    conv3_bias: torch.Tensor  # (c3,)
    conv5_b: torch.Tensor  # (panels, K5*K5*r5, width)
    conv5_bias: torch.Tensor  # (c5,)
    pool_b: torch.Tensor  # (panels, Cin, width)            Wp^T
    pool_bias: torch.Tensor  # (cp,)
    dims: tuple[int, ...]  # (c1, r3, r5, c3, c5, cp, K3, K5)


def _pack_panels(b: torch.Tensor, width: int) -> torch.Tensor:
    """(K, cols) -> (ceil(cols / width), K, width), zero-padded: one panel per register tile."""
    k, cols = b.shape
    panels = -(-cols // width)
    padded = F.pad(b, (0, panels * width - cols))
    return padded.reshape(k, panels, width).permute(1, 0, 2).contiguous()


def _unpack_panels(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """The inverse of _pack_panels: (panels, K, width) -> (K, cols)."""
    return packed.permute(1, 0, 2).reshape(packed.shape[1], -1)[:, :cols]


def pack_cpu_weights(w: InceptionWeights, spec: InceptionSpec | None = None) -> CpuPackedWeights:
    """w in the C++ kernel's layout; differentiable (packing is linear) when grad mode is on.
    A caller that knows the spec passes it (under jit.trace, w's shapes are traced values)."""
    return CpuPackedWeights(*_cpu_panels(w), dims=tuple(_dims(spec if spec is not None else w.spec())))


def _cpu_panels(w: InceptionWeights) -> tuple[torch.Tensor, ...]:
    """The eight tensors of CpuPackedWeights, without checking shapes (symbolic ones too)."""
    # Two 64-byte SIMD vectors of columns per panel, as csrc/ expects (it checks the shape).
    width = 128 // w.w1.element_size()
    reduce_b = torch.cat([as_gemm_b(w.w1), as_gemm_b(w.w3r), as_gemm_b(w.w5r)], dim=1)
    return (
        _pack_panels(reduce_b, width), torch.cat([w.b1, w.b3r, w.b5r]).contiguous(),
        _pack_panels(as_gemm_b(w.w3), width), w.b3.contiguous(),
        _pack_panels(as_gemm_b(w.w5), width), w.b5.contiguous(),
        _pack_panels(as_gemm_b(w.wp), width), w.bp.contiguous(),
    )


def _cacheable(cache: TensorVersionCache | None, x: torch.Tensor) -> bool:
    """False while tracing (_cache.tracing) and for tensors without storage (FakeTensor)."""
    if cache is None or tracing():
        return False
    try:
        x.data_ptr()
    except RuntimeError:  # FakeTensor / FunctionalTensor
        return False
    return True


def _packed(cache: TensorVersionCache | None, x: torch.Tensor, w: InceptionWeights, pack):
    """w in a backend's kernel layout: from `cache` while current, else packed now."""
    if _cacheable(cache, x):
        with torch.no_grad():  # a cached value must never hold on to an autograd graph
            return cache.get(w, lambda: pack(w))
    return pack(w)


# Each kernel entry point is a torch.library custom op: FlopCounterMode (and so the
# profiler) sees it through the formula registered below, and tracers see its shape.
@torch.library.custom_op("inception_fast::cpu_forward", mutates_args=())
def cpu_forward(
    x: torch.Tensor,
    reduce_b: torch.Tensor,
    reduce_bias: torch.Tensor,
    conv3_b: torch.Tensor,
    conv3_bias: torch.Tensor,
    conv5_b: torch.Tensor,
    conv5_bias: torch.Tensor,
    pool_b: torch.Tensor,
    pool_bias: torch.Tensor,
    dims: list[int],
) -> torch.Tensor:
    """The C++ kernel on packed weights (CpuPackedWeights); dims = (c1, r3, r5, c3, c5, cp, K3, K5)."""
    return require_cpu_extension().inception_forward(
        x, reduce_b, reduce_bias, conv3_b, conv3_bias, conv5_b, conv5_bias, pool_b, pool_bias, list(dims)
    )


def _forward_cpu(
    x: torch.Tensor,
    w: InceptionWeights,
    cache: TensorVersionCache | None,
    out: torch.Tensor | None = None,
    spec: InceptionSpec | None = None,
) -> torch.Tensor:
    packed = _packed(cache, x, w, lambda w: pack_cpu_weights(w, spec))
    if out is not None:  # no autograd, no tracing: straight into the caller's buffer
        return require_cpu_extension().inception_forward(x, *packed, out=out)
    return cpu_forward(x, *packed[:-1], list(packed.dims))


# -- triton backend ------------------------------------------------------------


def _forward_triton(
    x: torch.Tensor,
    w: InceptionWeights,
    cache: TensorVersionCache | None,
    out: torch.Tensor | None = None,
    spec: InceptionSpec | None = None,
) -> torch.Tensor:
    from . import inception_triton  # imports triton: only when this backend runs

    packed = _packed(cache, x, w, inception_triton.pack_triton_weights)
    spec = spec if spec is not None else w.spec()
    if out is not None:
        return inception_triton.forward_triton(x, packed, spec, out)
    return triton_forward(x, *packed, _dims(spec))


@torch.library.custom_op("inception_fast::triton_forward", mutates_args=())
def triton_forward(
    x: torch.Tensor,
    w_red: torch.Tensor,
    b_red: torch.Tensor,
    w3: torch.Tensor,
    b3: torch.Tensor,
    w5: torch.Tensor,
    b5: torch.Tensor,
    w_pool: torch.Tensor,
    b_pool: torch.Tensor,
    dims: list[int],
) -> torch.Tensor:
    """The two Triton launches on TritonWeights; dims = (c1, r3, r5, c3, c5, cp, K3, K5)."""
    from . import inception_triton

    packed = inception_triton.TritonWeights(w_red, b_red, w3, b3, w5, b5, w_pool, b_pool)
    return inception_triton.forward_triton(x, packed, _spec_of(x.shape, dims))


def _dims(spec: InceptionSpec) -> list[int]:
    return [spec.ch1x1, spec.ch3x3red, spec.ch5x5red, spec.ch3x3, spec.ch5x5, spec.pool_proj, spec.k3, spec.k5]


def _spec_of(x_shape, dims) -> InceptionSpec:
    c1, r3, r5, c3, c5, cp, k3, k5 = dims
    return InceptionSpec(x_shape[1], c1, r3, c3, r5, c5, cp, k3=k3, k5=k5)


@cpu_forward.register_fake
@triton_forward.register_fake
def _(x, *weights_and_dims):
    c1, _, _, c3, c5, cp, _, _ = weights_and_dims[-1]
    n, _, h, w = x.shape  # symbolic under dynamic shapes: no InceptionSpec (it wants ints)
    return x.new_empty((n, c1 + c3 + c5 + cp, h, w)).contiguous(memory_format=torch.channels_last)


@register_flop_formula([torch.ops.inception_fast.cpu_forward, torch.ops.inception_fast.triton_forward])
def _inception_flops(x_shape, *weight_shapes_and_dims, out_shape=None, **kwargs) -> int:
    """2 FLOPs per multiply-accumulate of the six convolutions, as FlopCounterMode counts convs."""
    n, _, h, w = x_shape
    return 2 * _spec_of(x_shape, weight_shapes_and_dims[-1]).macs(h, w, n).total


_FORWARDS = {"cpu": _forward_cpu, "triton": _forward_triton}


# -- backward (every backend) ---------------------------------------------------


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N*H*W, C): NHWC pixel rows, a view when t is channels_last."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def _as_image(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N*H*W, C) pixel rows -> logical (N, C, H, W) in channels_last memory, a view."""
    n, _, h, w = like.shape
    return rows.reshape(n, h, w, -1).permute(0, 3, 1, 2)


def inception_backward(
    grad_out: torch.Tensor, x: torch.Tensor, y: torch.Tensor, w: InceptionWeights, needs: tuple[bool, ...]
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of (x, w1, b1, ..., wp, bp) from the saved input x and output y.

    Fused on NHWC pixel rows:
      1. the ReLU masks of all four branches come from y (the saved output);
      2. the K3/K5 stages give dt3, dt5 (masked by t3 > 0, t5 > 0) and their weight grads;
      3. one GEMM gives dx of the three 1x1 convolutions that share x,
         [g1 | dt3 | dt5] @ [W1; W3r; W5r], and one more their weight grads;
      4. the pool branch adds its max-pool scatter of gp @ Wp.
    t3, t5 and the pooled input are recomputed, never stored. Subgradient at 0: none
    flows where a ReLU output is exactly 0, as in torch.relu.
    """
    s = w.spec()
    rows = lambda t: _as_rows(t.contiguous(memory_format=torch.channels_last))  # noqa: E731
    relu_backward = torch.ops.aten.threshold_backward  # grad where output > 0, as torch.relu
    x_rows, grad_rows, y_rows = rows(x), rows(grad_out), rows(y)
    # The ReLU masks of the four branches, each into its own contiguous block of rows.
    g1, g3, g5, gp = (relu_backward(grad_rows[:, sl], y_rows[:, sl], 0) for sl in s.branch_slices)

    # Recompute the reductions with one GEMM: t = relu(x @ [W3r; W5r]^T + b).
    w_red = torch.cat([w.w3r, w.w5r]).flatten(1)
    t = torch.relu(torch.addmm(torch.cat([w.b3r, w.b5r]), x_rows, w_red.t()))
    t3, t5 = t[:, : s.ch3x3red], t[:, s.ch3x3red :]

    def spatial(g_branch, t_branch, weight, bias):
        k = weight.shape[-1]
        d_t, d_w, d_b = torch.ops.aten.convolution_backward(
            _as_image(g_branch, x), _as_image(t_branch, x), weight, [bias.shape[0]],
            [1, 1], [k // 2, k // 2], [1, 1], False, [0, 0], 1, [True, True, True],
        )
        return relu_backward(rows(d_t), t_branch, 0), d_w, d_b

    dt3, dw3, db3 = spatial(g3, t3.contiguous(), w.w3, w.b3)
    dt5, dw5, db5 = spatial(g5, t5.contiguous(), w.w5, w.b5)

    # The three 1x1 convolutions that share x: one GEMM for dx, one for their weights.
    d_red = torch.cat([g1, dt3, dt5], dim=1)
    w_1x1 = torch.cat([w.w1, w.w3r, w.w5r]).flatten(1)  # (c1 + r3 + r5, Cin)
    # Own storage per gradient (weights are small): a custom op's outputs may not alias.
    dw_red = [g.clone() for g in (d_red.t() @ x_rows).split([s.ch1x1, s.ch3x3red, s.ch5x5red])]
    db_red = [g.clone() for g in d_red.sum(0).split([s.ch1x1, s.ch3x3red, s.ch5x5red])]

    dx = None
    pooled, indices = F.max_pool2d(x, 3, stride=1, padding=1, return_indices=True)
    if needs[0]:
        dx_rows = d_red @ w_1x1
        d_pooled = _as_image(gp @ w.wp.flatten(1), x)
        dx = _as_image(dx_rows, x) + torch.ops.aten.max_pool2d_with_indices_backward(
            d_pooled, x, [3, 3], [1, 1], [1, 1], [1, 1], False, indices
        )
    dwp = gp.t() @ rows(pooled)
    return gradients_in_order(w, needs, dx, dw_red, db_red, (dw3, db3), (dw5, db5), (dwp, gp.sum(0)))


def gradients_in_order(w: InceptionWeights, needs, dx, dw_red, db_red, k3, k5, pool) -> tuple:
    """(dx, dw1, db1, dw3r, db3r, dw3, db3, dw5r, db5r, dw5, db5, dwp, dbp), None where not
    needed, from the grouped results: dw_red/db_red split [1x1 | 3x3 reduce | 5x5 reduce],
    and (weight, bias) pairs of the K3, K5 and pool convolutions."""
    grads = (
        dx,
        dw_red[0].reshape(w.w1.shape), db_red[0],
        dw_red[1].reshape(w.w3r.shape), db_red[1],
        *k3,
        dw_red[2].reshape(w.w5r.shape), db_red[2],
        *k5,
        pool[0].reshape(w.wp.shape), pool[1],
    )
    return tuple(g if need else None for g, need in zip(grads, needs))


_WEIGHT_NAMES = InceptionWeights._fields


@torch.library.custom_op("inception_fast::backward", mutates_args=())
def backward(
    grad_out: torch.Tensor, x: torch.Tensor, y: torch.Tensor, weights: list[torch.Tensor], needs: list[bool],
    backend: str,
) -> list[torch.Tensor]:
    """Gradients of (x, w1, b1, ..., wp, bp); an empty tensor where needs[i] is False.

    backend "cpu" runs the C++ backward of csrc/, "triton" the Triton kernels of
    inception_triton_backward.py (the forward's backend picks). Without the compiled
    extension, "cpu" falls back to inception_backward: the same algorithm as ATen calls.
    """
    extension = cpu_extension()
    if backend == "triton":
        from . import inception_triton_backward

        grads = inception_triton_backward.backward_triton(grad_out, x, y, InceptionWeights(*weights), tuple(needs))
    elif x.device.type == "cpu" and x.dtype in _CPU_DTYPES and extension is not None:
        grads = extension.inception_backward(grad_out, x, y, list(weights), list(needs))
    else:
        grads = inception_backward(grad_out, x, y, InceptionWeights(*weights), tuple(needs))
    # Fixed layouts, whatever oneDNN or cuDNN chose: dx channels_last, weight grads contiguous.
    formats = (torch.channels_last,) + (torch.contiguous_format,) * len(weights)
    return [g.contiguous(memory_format=f) if need else x.new_empty(0) for g, need, f in zip(grads, needs, formats)]


@backward.register_fake
def _(grad_out, x, y, weights, needs, backend):
    like = (x, *weights)
    formats = (torch.channels_last,) + (torch.contiguous_format,) * len(weights)
    return [t.new_empty(t.shape).contiguous(memory_format=f) if need else x.new_empty(0)
            for t, need, f in zip(like, needs, formats)]


@register_flop_formula(torch.ops.inception_fast.backward)
def _inception_backward_flops(grad_out_shape, x_shape, y_shape, weight_shapes, needs, backend, out_shape=None,
                              **kwargs) -> int:
    """2 FLOPs per multiply-add, counted as FlopCounterMode counts aten.convolution_backward
    on the reference module: a convolution's weight gradient when its weight needs one, and
    its data gradient when its input does (x for the four convolutions that read x or the
    pooled x; t3 and t5 when x or their reduction's weight or bias does). Each is one
    forward's worth of multiply-adds of that convolution."""
    n, _, h, w = x_shape
    pixels = n * h * w
    macs = [pixels * s[0] * s[1] * s[2] * s[3] for s in weight_shapes[0::2]]  # w1, w3r, w3, w5r, w5, wp
    need_x, need_w = bool(needs[0]), [bool(v) for v in needs[1::2]]  # weight needs, conv order
    need_t3 = need_x or any(needs[3:5])  # t3 = relu(conv(x, w3r) + b3r)
    need_t5 = need_x or any(needs[7:9])
    data = (need_x, need_x, need_t3, need_x, need_t5, need_x)
    return 2 * sum(m * (int(dw) + int(dx)) for m, dw, dx in zip(macs, need_w, data))


def _backward_grads(grad_out, x, y, weights, needs, backend) -> tuple[torch.Tensor | None, ...]:
    grads = backward(grad_out, x, y, list(weights), list(needs), backend)
    return tuple(g if need else None for g, need in zip(grads, needs))


class InceptionFunction(torch.autograd.Function):
    """The fused forward of a backend and the fused backward op, over Conv2d-layout weights.

    apply(x, backend, cache, w1, b1, w3r, b3r, w3, b3, w5r, b5r, w5, b5, wp, bp), with a
    concrete backend ("cpu" or "triton") and an optional TensorVersionCache of packed
    weights. Saves x, the output and the weights; t3, t5 and the pooled input are
    recomputed in the backward.
    """

    @staticmethod
    def forward(ctx, x, backend: str, cache: TensorVersionCache | None, *weights: torch.Tensor):
        y = _FORWARDS[backend](x, InceptionWeights(*weights), cache)
        ctx.save_for_backward(x, y, *weights)
        ctx.backend = backend
        return y

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, y, *weights = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], *ctx.needs_input_grad[3:])
        grads = _backward_grads(grad_out, x, y, weights, needs, ctx.backend)
        return (grads[0], None, None, *grads[1:])


# Autograd of the forward custom ops themselves, over their packed weights: packing is a
# linear map (a permutation plus zero padding), so the gradient of a packed tensor is the
# packed gradient, zero in the padding. InceptionFunction does not go through this; it is
# what makes a bare torch.ops.inception_fast.*_forward call (or a graph holding one)
# differentiable.
def _setup_forward_context(ctx, inputs, output):
    x, *packed, dims = inputs
    ctx.dims = list(dims)
    ctx.save_for_backward(x, output, *packed)


def _forward_op_backward(backend: str, unpack, pack):
    def backward_fn(ctx, grad_out):
        x, y, *packed = ctx.saved_tensors
        weights = unpack(packed, ctx.dims, x.shape[1])
        needs = (ctx.needs_input_grad[0],) + (any(ctx.needs_input_grad[1:-1]),) * len(_WEIGHT_NAMES)
        grads = _backward_grads(grad_out, x, y, weights, needs, backend)
        packed_grads = pack(InceptionWeights(*grads[1:])) if needs[1] else (None,) * len(packed)
        return (grads[0], *packed_grads[: len(packed)], None)

    return backward_fn


def _unpack_cpu(packed, dims, cin: int) -> InceptionWeights:
    c1, r3, r5, c3, c5, cp, k3, k5 = dims
    reduce_b, reduce_bias, conv3_b, conv3_bias, conv5_b, conv5_bias, pool_b, pool_bias = packed
    w1, w3r, w5r = _unpack_panels(reduce_b, c1 + r3 + r5).split([c1, r3, r5], dim=1)
    b1, b3r, b5r = reduce_bias.split([c1, r3, r5])
    return InceptionWeights(
        from_gemm_b(w1, 1), b1, from_gemm_b(w3r, 1), b3r,
        from_gemm_b(_unpack_panels(conv3_b, c3), k3), conv3_bias,
        from_gemm_b(w5r, 1), b5r,
        from_gemm_b(_unpack_panels(conv5_b, c5), k5), conv5_bias,
        from_gemm_b(_unpack_panels(pool_b, cp), 1), pool_bias,
    )


def _unpack_triton(packed, dims, cin: int) -> InceptionWeights:
    c1, r3, r5, c3, c5, cp, k3, k5 = dims
    w_red, b_red, w3, b3, w5, b5, w_pool, b_pool = packed
    w1, w3r, w5r = w_red.split([c1, r3, r5], dim=1)
    b1, b3r, b5r = b_red.split([c1, r3, r5])
    return InceptionWeights(
        from_gemm_b(w1, 1), b1, from_gemm_b(w3r, 1), b3r, from_gemm_b(w3, k3), b3,
        from_gemm_b(w5r, 1), b5r, from_gemm_b(w5, k5), b5, from_gemm_b(w_pool, 1), b_pool,
    )


def _pack_triton_grads(grads: InceptionWeights):
    from . import inception_triton

    return inception_triton.pack_triton_weights(grads)


cpu_forward.register_autograd(_forward_op_backward("cpu", _unpack_cpu, _cpu_panels),
                              setup_context=_setup_forward_context)
triton_forward.register_autograd(_forward_op_backward("triton", _unpack_triton, _pack_triton_grads),
                                 setup_context=_setup_forward_context)


def inception(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w3r: torch.Tensor,
    b3r: torch.Tensor,
    w3: torch.Tensor,
    b3: torch.Tensor,
    w5r: torch.Tensor,
    b5r: torch.Tensor,
    w5: torch.Tensor,
    b5: torch.Tensor,
    wp: torch.Tensor,
    bp: torch.Tensor,
    *,
    backend: str = "auto",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The whole Inception module as one op. See the module docstring for shapes.

    `out`, if given, must be a channels_last tensor of the output's shape and
    x's dtype; it is written in full and returned (no autograd through it).
    Packs the weights into the kernel's layout on every call; FusedInception
    keeps them packed between calls.
    """
    weights = InceptionWeights(w1, b1, w3r, b3r, w3, b3, w5r, b5r, w5, b5, wp, bp)
    return fused_forward(x, weights, backend=backend, out=out)


def fused_forward(
    x: torch.Tensor,
    weights: InceptionWeights,
    backend: str = "auto",
    cache: TensorVersionCache | None = None,
    out: torch.Tensor | None = None,
    spec: InceptionSpec | None = None,
) -> torch.Tensor:
    """`inception` over an InceptionWeights, reusing `cache`'s packed weights while they are current.

    A caller that already validated the weights' shapes (FusedInception) passes their
    `spec` and skips the per-call shape checks; the kernels still check what they read.
    """
    spec = spec if spec is not None else weights.spec()
    check_input(x, spec.in_channels)
    check_same_dtype_device(x, weights._asdict())
    backend = resolve_backend(backend, x)
    if out is not None:
        n, _, h, w = x.shape
        check_out(out, (n, spec.out_channels, h, w), x)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (x, *weights)):
            raise ValueError("out= does not support autograd; call under torch.no_grad() or drop out=")
        if backend == "reference":
            return out.copy_(_forward_reference(x, weights))
        return _FORWARDS[backend](x, weights, cache, out)
    if backend == "reference":
        return _forward_reference(x, weights)
    if torch.jit.is_tracing():
        # jit.trace records dispatcher ops but not a Python autograd.Function (it would be a
        # PythonOp that cannot be saved): call the custom op, differentiable through its
        # registered autograd, with the packing traced from the parameters.
        return _FORWARDS[backend](x, weights, None, spec=spec)
    return InceptionFunction.apply(x, backend, cache, *weights)
