"""GoogLeNet's Inception module as one op: the branch graph's preset (branch_graph.py).

Weights use PyTorch's Conv2d layout, so any module's parameters pass straight in:

    w1  (c1, Cin, 1, 1)    b1  (c1,)      branch 1: 1x1
    w3r (r3, Cin, 1, 1)    b3r (r3,)      branch 2: 1x1 reduction ...
    w3  (c3, r3, K3, K3)   b3  (c3,)      ... then K3xK3, 'same' padding
    w5r (r5, Cin, 1, 1)    b5r (r5,)      branch 3: 1x1 reduction ...
    w5  (c5, r5, K5, K5)   b5  (c5,)      ... then K5xK5, 'same' padding
    wp  (cp, Cin, 1, 1)    bp  (cp,)      branch 4: 3x3/1 max pool, then 1x1

Every convolution is followed by ReLU. The output is logically NCHW (N, c1+c3+c5+cp, H, W)
and laid out channels_last, so that a stack of fused modules never transposes.

The module is InceptionSpec.to_graph(): stage 0 is one GEMM over x for [1x1 | 3x3 reduce |
5x5 reduce] plus the pool projection over max-pooled rows made on the fly; stage 1 the
K3xK3 and K5xK5 implicit GEMMs. The backward recomputes the two reductions from x (one
GEMM) instead of saving them. Backends: "cpu" (csrc/), "triton" (GPUs), "reference"
(plain PyTorch ops), "auto" (ops.backend.resolve_backend).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .._checks import check_input, check_out, check_same_dtype_device
from ..spec import InceptionSpec
from .backend import BACKENDS, autocast_dtype, resolve_backend
from .branch_graph import BranchGraphFunction, apply_graph, graph_forward_into, pack_weights, winograd_tiles
from .plan import GraphPlan, plan

__all__ = ["BACKENDS", "InceptionFunction", "InceptionWeights", "fused_forward", "inception", "preset"]

#: The autograd.Function of every fused block (GoogLeNet's module is one of its graphs).
InceptionFunction = BranchGraphFunction


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
        """The module's shape, checked for consistency across all twelve tensors.
        Raises TypeError for a non-tensor, ValueError for a shape that does not fit."""
        for name, t in self._asdict().items():
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            expected_dim = 1 if name.startswith("b") else 4
            if t.dim() != expected_dim:
                raise ValueError(f"{name} must be {expected_dim}-D, got shape {tuple(t.shape)}")
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
            return InceptionSpec(cin, self.w1.shape[0], self.w3r.shape[0], self.w3.shape[0], self.w5r.shape[0],
                                 self.w5.shape[0], self.wp.shape[0], k3=k3, k5=k5)
        except ValueError as exc:
            raise ValueError(f"inconsistent Inception weights: {exc}") from None

    @property
    def weights(self) -> list[torch.Tensor]:
        """(w1, w3r, w3, w5r, w5, wp): the preset graph's convolution order."""
        return list(self[0::2])

    @property
    def biases(self) -> list[torch.Tensor]:
        return list(self[1::2])


class Preset(NamedTuple):
    """A module's graph plan with its wire formats, built once per InceptionSpec."""

    plan: GraphPlan
    flat: list[int]
    backward_flat: list[int]
    recompute: tuple[int, ...]  # every intermediate is a reduction: recomputed, never saved


@functools.lru_cache(maxsize=None)
def preset(spec: InceptionSpec) -> Preset:
    graph = plan(spec.to_graph())
    reductions = graph.reductions()
    return Preset(graph, graph.flat(), graph.backward_flat(),
                  tuple(reductions[k] for k in range(len(graph.buf_channels))))


def _forward_reference(x: torch.Tensor, w: InceptionWeights) -> torch.Tensor:
    k3, k5 = w.w3.shape[-1], w.w5.shape[-1]
    y1 = F.relu(F.conv2d(x, w.w1, w.b1))
    y3 = F.relu(F.conv2d(F.relu(F.conv2d(x, w.w3r, w.b3r)), w.w3, w.b3, padding=k3 // 2))
    y5 = F.relu(F.conv2d(F.relu(F.conv2d(x, w.w5r, w.b5r)), w.w5, w.b5, padding=k5 // 2))
    yp = F.relu(F.conv2d(F.max_pool2d(x, 3, stride=1, padding=1), w.wp, w.bp))
    return torch.cat([y1, y3, y5, yp], dim=1).contiguous(memory_format=torch.channels_last)


def inception(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w3r: torch.Tensor, b3r: torch.Tensor,
              w3: torch.Tensor, b3: torch.Tensor, w5r: torch.Tensor, b5r: torch.Tensor, w5: torch.Tensor,
              b5: torch.Tensor, wp: torch.Tensor, bp: torch.Tensor, *, backend: str = "auto",
              out: torch.Tensor | None = None) -> torch.Tensor:
    """The whole Inception module as one op, forward and backward. Shapes: module docstring.

    x (N, Cin, H, W) float (any memory format; the C++ kernels take float32, float64, bfloat16
    and float16); returns (N, c1+c3+c5+cp, H, W) channels_last. `out`, if given, must be a
    channels_last tensor of the output's shape and x's dtype; it is written in full and
    returned (no autograd through it). Packs the weights on every call; FusedInception keeps
    them packed. Raises TypeError/ValueError naming the argument that does not fit (see
    _checks.py).

    Under torch.autocast it runs in autocast's dtype, as F.conv2d does: x and the weights are
    cast (differentiably) unless x is float64; with `out=` it does not, as PyTorch's out=
    variants are not autocast-eligible.
    """
    weights = InceptionWeights(w1, b1, w3r, b3r, w3, b3, w5r, b5r, w5, b5, wp, bp)
    dtype = autocast_dtype(x) if out is None else None
    if dtype is not None:
        with torch.autocast(x.device.type, enabled=False):  # the packing ops must not be cast again
            return fused_forward(x.to(dtype), InceptionWeights(*(t.to(dtype) for t in weights)), backend)
    return fused_forward(x, weights, backend, out=out)


def fused_forward(x: torch.Tensor, weights: InceptionWeights, backend: str = "auto", *,
                  out: torch.Tensor | None = None, spec: InceptionSpec | None = None,
                  packed: tuple[list, list] | None = None) -> torch.Tensor:
    """`inception` over an InceptionWeights. A caller that validated the weights' shapes
    passes their `spec`; one that caches the packed weights passes `packed`."""
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
        p = preset(spec)
        packed = packed if packed is not None else pack_weights(p.plan, weights.weights, weights.biases, backend,
                                                                winograd_tiles(p.plan, *x.shape[2:]))
        return graph_forward_into(out, x, *packed, p.flat, backend)
    if backend == "reference":
        return _forward_reference(x, weights)
    p = preset(spec)
    if packed is None:
        packed = pack_weights(p.plan, weights.weights, weights.biases, backend, winograd_tiles(p.plan, *x.shape[2:]))
    return apply_graph(x, backend, p.flat, p.backward_flat, p.recompute, weights.weights, weights.biases, packed)
