"""The fused op: an Inception block as one kernel, on the CPU (csrc/) and on GPUs (Triton).

A block is a branch graph over one input x (spec.BranchGraphSpec): branches of convolution
chains, the last level of a branch may fan out, and a pooling branch; outputs are
concatenated along channels, branches in order, the pooling branch at spec.pool_index
(last by default: only the plan's output offsets depend on it). GoogLeNet's module is
the preset InceptionSpec.to_graph(); Inception-v3's InceptionA to E are graphs too,
including the grid reductions (stride 2). Every convolution is followed by ReLU
(BN folded in by the module around it).

plan.plan() turns a spec into stages of GEMMs; the kernels run them with every GEMM's
epilogue (bias + ReLU) storing straight into its slice of the output or of an
intermediate: there is no concat. The C++ kernel (csrc/inception_graph_cpu.cpp: float32,
float64, bfloat16 with float32 sums, float16 through float32) runs stage after stage on
zero-bordered intermediates; the Triton kernels (branch_graph_triton.py) run one grouped
launch per stage.

This file holds the weight packing, the ops (forward, forward saving its intermediates,
backward: the C++ ones registered by csrc/bindings.cpp, the Triton ones as torch.library
custom ops; each with a fake kernel and a FLOP formula), the backward's reference walk
(graph_backward_reference), BranchGraphFunction, the autograd.Function over Conv2d-layout
weights, and residual_tail, Inception-ResNet's ending after the op.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from .._extension import cpu_extension, require_cpu_extension
from . import backend as _backend
from .backend import (CPU_DTYPES, accumulator_dtype, as_gemm_b, from_gemm_b, image, pack_conv_panels, pack_panels,
                      pack_winograd, pack_winograd_flipped, packed_dtype, panel_width, rows, unpack_panels,
                      unpack_winograd, winograd_positions, weight_layout)
from .graph_backward import graph_backward_reference
from ..spec import Branch, BranchGraphSpec, Conv
from .plan import GraphPlan, Source, plan

__all__ = ["BranchGraphFunction", "apply_graph", "forward_op", "graph_backward", "graph_backward_reference",
           "graph_forward", "graph_forward_inference", "graph_forward_into", "graph_macs", "graph_forward_saving",
           "graph_triton_forward", "graph_triton_forward_saving", "pack_weights", "residual_tail", "unpack_weights",
           "winograd_data_grad", "winograd_packed", "winograd_tiles", "winograd_weight_grad"]


def pack_weights(graph: GraphPlan, weights, biases, backend: str, winograd=None,
                 gradient: bool = False) -> tuple[list, list]:
    """Per GEMM of `graph`: B of its convolutions (as_gemm_b, concatenated along columns) and
    their concatenated biases. backend "cpu" packs B in panels of panel_width(dtype) columns
    (csrc/gemm.h's register tiles; bf16 in VNNI pairs, with float32 biases, its
    accumulator's type), and an fp32 GEMM that GemmStep.winograd allows in Winograd panels
    (backend.pack_winograd), unless `winograd` is False (default: backend.WINOGRAD; a
    list gives one flag per GEMM; a flag may also be a 3x3's output tile, 2 or 4, as
    winograd_packed returns it, where True takes backend.WINOGRAD_3X3_TILE);
    "triton" keeps it row-major (K, cols).

    weights/biases: one (cout, cin, kh, kw) / (cout,) tensor per convolution of graph.convs.
    Differentiable (a linear map: permutation, zero padding, the Winograd transform).
    gradient=True packs weight gradients as the gradients of the packed tensors
    (pack_winograd's `gradient`). Raises ValueError on a count or shape that does not
    match the plan.
    """
    winograd = _backend.WINOGRAD if winograd is None else winograd
    flags = list(winograd) if isinstance(winograd, (list, tuple)) else [bool(winograd)] * len(graph.gemms)
    if len(weights) != len(graph.convs) or len(biases) != len(graph.convs):
        raise ValueError(f"need {len(graph.convs)} weights and biases (the plan's convolutions), got "
                         f"{len(weights)} and {len(biases)}")
    for i, (conv, w, b) in enumerate(zip(graph.convs, weights, biases)):
        if w.dim() != 4 or tuple(w.shape[2:]) != (conv.kh, conv.kw) or tuple(b.shape) != (w.shape[0],):
            raise ValueError(f"convolution {i} needs a (cout, cin, {conv.kh}, {conv.kw}) weight and a (cout,) "
                             f"bias, got {tuple(w.shape)} and {tuple(b.shape)}")
    packed_b, packed_bias = [], []
    for g, wino in zip(graph.gemms, flags):
        if not g.convs:  # the max-pool copy has no weights
            packed_b.append(weights[0].new_empty(0))
            packed_bias.append(biases[0].new_empty(0))
            continue
        bias = torch.cat([biases[i] for i in g.convs])
        if backend != "cpu":
            packed_b.append(torch.cat([as_gemm_b(weights[i]) for i in g.convs], dim=1).contiguous())
            packed_bias.append(bias.contiguous())
            continue
        dtype = packed_dtype(functools.reduce(torch.promote_types, (weights[i].dtype for i in g.convs)))
        # The packers copy: one convolution's weight needs no concatenated copy first.
        w_cat = weights[g.convs[0]] if len(g.convs) == 1 else torch.cat([weights[i] for i in g.convs])
        if dtype == torch.float32 and wino and g.winograd:
            tile = None if wino is True or wino == 1 else int(wino)  # pack_winograd refuses tiles but 2, 4
            b = pack_winograd(w_cat.to(dtype), panel_width(dtype), gradient, tile)
        elif dtype != torch.bfloat16:
            b = pack_conv_panels(w_cat.to(dtype), panel_width(dtype))
        else:
            b = pack_panels(torch.cat([as_gemm_b(weights[i]) for i in g.convs], dim=1).to(dtype), panel_width(dtype),
                            g.kh * g.kw)
        packed_b.append(b)
        packed_bias.append(bias.to(accumulator_dtype(dtype)).contiguous())
    return packed_b, packed_bias


# F(2x2, 5x5) transforms 9 values per output and channel (F(4x4, 3x3): 2.25), a cost linear
# in cin + cout against savings in cin x cout; a 5x5 GEMM runs it from this many channels of
# cin cout / (cin + cout). Forward, fused block, 5x5s packed direct against F(2x2, 5x5)
# (benchmarks/winograd.py --baseline no5x5, Zen 5, 2 threads, batches 1 and 32): the paper
# GoogLeNet's 3a (16 -> 32: 10.7) 0.97-1.04x, 4a (16 -> 48: 12) 1.01-1.05x, 4b and 4c (24 ->
# 64: 17.5) 0.95-1.03x; 4d (32 -> 64: 21.3) 1.03x, 4e (32 -> 128: 25.6) 1.05-1.07x, 3b (32 ->
# 96: 24) 1.06-1.22x, 5a / 5b 1.02x; pytorch-fid's Mixed_5b-5d (48 -> 64: 27.4) 1.11-1.13x.
WINOGRAD_5X5_MIN_CHANNELS = 20


def _wide_enough(cin: int, cout: int, minimum: float) -> bool:
    """cin cout / (cin + cout) >= minimum: where a Winograd form's GEMM savings (in cin x
    cout) outweigh its transforms (in cin + cout)."""
    return cin * cout >= minimum * (cin + cout)


def _winograd_flag(graph: GraphPlan, g, h: int, w: int):
    """winograd_tiles' flag for GEMM g."""
    if (g.kh, g.kw) == (3, 3):
        return _backend.winograd_3x3_tile(*g.grid(h, w)) if g.winograd else True
    if (g.kh, g.kw) == (5, 5):
        return _wide_enough(graph.in_channels if g.source < 0 else graph.buf_channels[g.source], g.cols,
                            WINOGRAD_5X5_MIN_CHANNELS)
    return True


def winograd_tiles(graph: GraphPlan, h: int, w: int) -> tuple:
    """pack_weights's per-GEMM `winograd` flags for an h x w input x: a 3x3 Winograd GEMM's
    tile by its output grid (backend.winograd_3x3_tile), a 5x5's from
    WINOGRAD_5X5_MIN_CHANNELS, True for the others (their one form, or none), all False when
    backend.WINOGRAD is off. Symbolic sizes (torch.export or torch.compile with dynamic H
    and W) take the default tile: a choice by the grid would guard the graph on it, and an
    exported program would refuse other grids."""
    if not _backend.WINOGRAD:
        return (False,) * len(graph.gemms)
    if not (isinstance(h, int) and isinstance(w, int)):
        return tuple(_winograd_flag(graph, g, h, w) if (g.kh, g.kw) == (5, 5) else True for g in graph.gemms)
    return tuple(_winograd_flag(graph, g, h, w) for g in graph.gemms)


def winograd_packed(graph: GraphPlan, g, b: torch.Tensor, in_channels: int | None = None) -> int:
    """The output tile (2 or 4, truthy) whose Winograd panels `b`, GEMM g's packed B, holds
    (backend.pack_winograd), or 0 for the direct GEMM's panels: (panels, (positions + kh*kw)
    * channels, width), 45 (F(4x4, 3x3)) or 25 (F(2x2, 3x3)) for a 3x3, 61 for a 5x5, 15
    for a 1x7 or 7x1, 7 for a 1x3 or 3x1, which the C++ kernel tells apart by the same
    shape. in_channels (x's) is needed for a GEMM over x (a stem's 3x3); raises ValueError
    without it."""
    if not g.winograd or b.dim() != 3:
        return 0
    if g.source < 0 and in_channels is None:
        raise ValueError("winograd_packed: a GEMM over x needs in_channels (x's channel count)")
    channels = in_channels if g.source < 0 else graph.buf_channels[g.source]
    for tile in (2, 4):
        positions = winograd_positions(g.kh, g.kw, tile)
        if positions and b.shape[1] == (positions + g.kh * g.kw) * channels:
            return tile
    return 0


def unpack_weights(graph: GraphPlan, packed_b, packed_bias, backend: str,
                   in_channels: int | None = None) -> tuple[list, list]:
    """The inverse of pack_weights: Conv2d-layout (weights, biases) in graph.convs order,
    the biases in the weights' dtype. in_channels (x's) is needed for bf16 CPU panels only,
    whose padding to even hides an odd channel count."""
    weights: list = [None] * len(graph.convs)
    biases: list = [None] * len(graph.convs)
    for g, b, bias in zip(graph.gemms, packed_b, packed_bias):
        full = b
        if backend == "cpu" and g.convs:
            channels = in_channels if g.source < 0 else graph.buf_channels[g.source]
            if channels is None and b.dtype == torch.bfloat16:
                raise ValueError("unpack_weights: bf16 CPU panels need in_channels (x's channel count)")
            full = (unpack_winograd(b, g.cols, channels, g.kh, g.kw) if winograd_packed(graph, g, b, channels)
                    else unpack_panels(b, g.cols, g.kh * g.kw, channels))
        for segment, i in zip(g.segments, g.convs):
            weights[i] = from_gemm_b(full[:, segment.begin:segment.end], g.kh, g.kw)
            biases[i] = bias[segment.begin:segment.end].to(b.dtype)
    return weights, biases


# The C++ kernels are operators registered by the extension (csrc/bindings.cpp, TORCH_LIBRARY):
# one dispatcher call from Python, and what torch.export / AOTInductor packages record.
# Without the extension the same schemas are defined here, with a CPU kernel that raises
# require_cpu_extension's error, so that fake tensors, tracing and the other backends see
# the same ops either way.
_CPP_SCHEMAS = (
    "graph_forward(Tensor x, Tensor[] b, Tensor[] bias, int[] flat_plan) -> Tensor",
    "graph_forward.out(Tensor x, Tensor[] b, Tensor[] bias, int[] flat_plan, *, Tensor(a!) out) -> Tensor(a!)",
    "graph_forward_saving(Tensor x, Tensor[] b, Tensor[] bias, int[] flat_plan) -> (Tensor, Tensor[])",
    "graph_backward_cpu(Tensor grad_out, Tensor x, Tensor y, Tensor[] intermediates, Tensor[] weights, "
    "bool needs_x, bool needs_weights, int[] backward_plan) -> Tensor[]",
    "pack_winograd_cpu(Tensor w, Tensor transform, int width, bool flip) -> Tensor",
    "winograd_weight_grad(Tensor x, Tensor grad, int padding, int tile, int kh=3, int kw=3, bool channels_last=False) "
    "-> Tensor",
)
if cpu_extension() is None:
    _fallback_library = torch.library.Library("inception_fast", "FRAGMENT")
    for _schema in _CPP_SCHEMAS:
        _fallback_library.define(_schema)
        _name = _schema.split("(", 1)[0]
        _fallback_library.impl(_name, lambda *args, **kwargs: require_cpu_extension(), "CPU")

# graph_forward(x, b, bias, flat_plan): x (N, C, H, W) any layout, b/bias from pack_weights
# ("cpu"), flat_plan = GraphPlan.flat(); returns (N, out_channels, H', W') channels_last.
# graph_forward_saving: also its intermediates, buffer k as the kernel keeps it,
# (N, H + 2 border_k, W + 2 border_k, channels_k) NHWC with a zero border.
graph_forward = torch.ops.inception_fast.graph_forward
graph_forward_saving = torch.ops.inception_fast.graph_forward_saving


_BELOW_AUTOGRAD = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)


def graph_forward_inference(x: torch.Tensor, b: list, bias: list, flat_plan: list[int],
                            backend: str = "cpu") -> torch.Tensor:
    """The forward of `backend` ("cpu" or "triton") for an eager call that needs no
    gradient on a plain tensor, past the Python in front of the operator:
    - cpu: straight to the C++ CPU kernel. register_autograd puts a Python kernel in front
      of the operator, which costs ~20 us a call even when no gradient is wanted (3-5% of
      a GoogLeNet block at batch 1).
    - triton: straight to the launches. The custom op's Python dispatch costs ~30 us a call
      on top of ~15 us of launch preparation, and a GPU block at batch 32 takes ~100 us.
    Anything else (autograd, tracing, a dispatch mode, a tensor subclass among x and the
    weights, the meta device, a running profiler, which then sees the operator) goes
    through the operator."""
    if (type(x) is torch.Tensor and not torch._C._len_torch_dispatch_stack()
            and not torch._C._autograd._profiler_enabled()
            and all(type(t) is torch.Tensor for t in (*b, *bias)) and not (
            torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in (*b, *bias))))):
        if backend == "cpu" and x.device.type == "cpu":
            return graph_forward.default.redispatch(_BELOW_AUTOGRAD, x, b, bias, flat_plan)
        if backend == "triton" and x.is_cuda:
            from . import branch_graph_triton

            return branch_graph_triton.graph_forward_triton(x, list(b), list(bias), list(flat_plan))
    return forward_op(backend)(x, b, bias, flat_plan)


def graph_forward_into(out: torch.Tensor, x: torch.Tensor, b: list, bias: list, flat_plan: list[int],
                       backend: str) -> torch.Tensor:
    """The forward of `backend` written straight into `out` (N, out_channels, H', W')
    channels_last, which every element of it is; no autograd, no tracing (inception(out=))."""
    if backend == "triton":
        from . import branch_graph_triton

        # The C++ op refuses an out that overlaps x (at::assert_no_overlap); the Triton
        # kernels would read x after writing over it.
        if out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
            raise ValueError("out must not share memory with x: the kernel reads x while it writes out")
        return branch_graph_triton.graph_forward_triton(x, list(b), list(bias), list(flat_plan), out=out)
    return graph_forward.out(x, b, bias, flat_plan, out=out)


@torch.library.register_fake("inception_fast::graph_forward")
def _graph_fake(x, b, bias, flat_plan):
    # A weight on another device sends the call here (the Meta kernel) even for a CPU x.
    if any(t.device != x.device for t in (*b, *bias)):
        raise ValueError(f"b and bias must be on x's device ({x.device}), got "
                         f"{sorted({str(t.device) for t in (*b, *bias)})}")
    p = GraphPlan.from_flat(flat_plan)
    n, c, h, w = x.shape  # symbolic under dynamic shapes
    torch._check(c == p.in_channels, lambda: f"x must have the plan's {p.in_channels} channels, got {c}")
    oh, ow = p.out_size(h, w)
    # As the kernels check (eager's convolution too): a shape error here, not an empty or
    # negative output under torch.compile.
    torch._check(oh >= 1 and ow >= 1, lambda: f"x ({h}x{w}) is smaller than the block's unpadded or stride-2 "
                                              "convolutions take")
    return x.new_empty((n, p.out_channels, oh, ow)).contiguous(memory_format=torch.channels_last)


def graph_macs(x_shape, flat_plan: list[int]) -> int:
    """Multiply-adds of the block that `flat_plan` computes on x of `x_shape` (N, C, H, W),
    counted as eager counts its convolutions: output pixels x kh*kw*cin x cout each,
    whatever the kernel does (a Winograd stage multiplies 1.5-2.25x less; a bf16 tap padded to
    even adds a zero row)."""
    n, c, h, w = x_shape
    p = GraphPlan.from_flat(flat_plan)
    total = 0
    for g in p.gemms:
        if g.source == Source.MAX_POOL_COPY:  # no multiply-adds
            continue
        taps = 1 if g.source < 0 and Source(g.source).pooled else g.kh * g.kw
        channels = c if g.source < 0 else p.buf_channels[g.source]
        gh, gw = g.grid(h, w)
        total += n * gh * gw * taps * channels * g.cols
    return total


def _graph_flops(x_shape, b_shapes, bias_shapes, flat_plan, out_shape=None, **kwargs) -> int:
    """2 FLOPs per multiply-add of graph_macs."""
    return 2 * graph_macs(x_shape, flat_plan)


@torch.library.custom_op("inception_fast::graph_triton_forward", mutates_args=())
def graph_triton_forward(x: torch.Tensor, b: list[torch.Tensor], bias: list[torch.Tensor],
                         flat_plan: list[int]) -> torch.Tensor:
    """The Triton branch-graph kernels (branch_graph_triton.py): one grouped launch per stage of the plan."""
    from . import branch_graph_triton  # imports triton: only when this backend runs

    return branch_graph_triton.graph_forward_triton(x, list(b), list(bias), list(flat_plan))


graph_triton_forward.register_fake(_graph_fake)


@torch.library.register_fake("inception_fast::graph_forward_saving")
def _graph_saving_fake(x, b, bias, flat_plan):
    p = GraphPlan.from_flat(flat_plan)
    n, _, h, w = x.shape
    # The intermediates are the kernel's compute dtype (float32 for an fp16 x).
    return _graph_fake(x, b, bias, flat_plan), [x.new_empty((n, h + 2 * pad, w + 2 * pad, ch),
                                                             dtype=packed_dtype(x.dtype))
                                                 for ch, pad in zip(p.buf_channels, p.buf_border)]


@torch.library.custom_op("inception_fast::graph_triton_forward_saving", mutates_args=())
def graph_triton_forward_saving(x: torch.Tensor, b: list[torch.Tensor], bias: list[torch.Tensor],
                                flat_plan: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """graph_triton_forward that also returns its intermediates, (N, H, W, channels_k) NHWC
    (the Triton kernels mask the padding taps: no border)."""
    from . import branch_graph_triton

    buffers: list[torch.Tensor] = []
    out = branch_graph_triton.graph_forward_triton(x, list(b), list(bias), list(flat_plan), buffers)
    return out, buffers


@graph_triton_forward_saving.register_fake
def _graph_triton_saving_fake(x, b, bias, flat_plan):
    n, _, h, w = x.shape
    return _graph_fake(x, b, bias, flat_plan), [x.new_empty((n, h, w, ch))
                                                 for ch in GraphPlan.from_flat(flat_plan).buf_channels]


def forward_op(backend: str, saving: bool = False):
    """The forward custom op of `backend` ("triton", else the C++ one); `saving`: the variant
    that also returns the intermediates for the backward."""
    if saving:
        return graph_triton_forward_saving if backend == "triton" else graph_forward_saving
    return graph_triton_forward if backend == "triton" else graph_forward


# One registration for the four forwards: register_flop_formula returns the formula wrapped
# for shapes, and registering that wrapped function again wraps it twice ("multiple values
# for keyword argument 'out_shape'" as soon as any op but the first one is counted).
register_flop_formula([torch.ops.inception_fast.graph_forward, torch.ops.inception_fast.graph_triton_forward,
                       torch.ops.inception_fast.graph_forward_saving,
                       torch.ops.inception_fast.graph_triton_forward_saving])(_graph_flops)


@torch.library.custom_op("inception_fast::graph_backward", mutates_args=())
def graph_backward(grad_out: torch.Tensor, x: torch.Tensor, y: torch.Tensor, intermediates: list[torch.Tensor],
                   weights: list[torch.Tensor], needs: list[bool], backward_plan: list[int],
                   backend: str) -> list[torch.Tensor]:
    """[dx, dW_0, db_0, dW_1, db_1, ...] in spec.convs order, an empty tensor where not
    needed; needs = (x, weights); backward_plan = GraphPlan.backward_flat();
    intermediates (N, H, W, channels) NHWC in plan order.

    backend "cpu" runs the C++ backward, "triton" the Triton one (branch_graph_triton.py);
    anything else, or a CPU without the extension, the ATen twin graph_backward_reference.
    """
    if x.numel() == 0 or grad_out.numel() == 0:
        grads = [torch.zeros_like(x)] + [torch.zeros(s, dtype=x.dtype, device=x.device)
                                         for wt in weights for s in (wt.shape, wt.shape[:1])]
    elif backend == "triton":
        from . import branch_graph_triton

        grads = branch_graph_triton.graph_backward_triton(grad_out, x, y, list(intermediates), list(weights),
                                                          list(needs), list(backward_plan))
    elif x.device.type == "cpu" and x.dtype == torch.float16 and cpu_extension() is not None:
        # As its forward: the float32 kernel on widened copies, gradients rounded once.
        grads = torch.ops.inception_fast.graph_backward_cpu(
            grad_out.float(), x.float(), y.float(), [t.float() for t in intermediates], [w.float() for w in weights],
            needs[0], needs[1], backward_plan)
        grads = [g.half() for g in grads]
    elif (x.device.type == "cpu" and x.dtype == torch.float32 and cpu_extension() is not None
          and _walk_backward_pays(x, list(weights), list(backward_plan))):
        grads = graph_backward_reference(grad_out, x, y, list(intermediates), list(weights), list(needs),
                                         list(backward_plan), data_grad=winograd_data_grad(*x.shape[:1], *x.shape[2:]),
                                         weight_grad=winograd_weight_grad, conv_1x1=True,
                                         max_pool_scatter=torch.ops.inception_fast.max_pool3x3_scatter)
    elif x.device.type == "cpu" and x.dtype in CPU_DTYPES and cpu_extension() is not None:
        grads = torch.ops.inception_fast.graph_backward_cpu(grad_out, x, y, intermediates, weights, needs[0],
                                                            needs[1], backward_plan)
    else:
        grads = graph_backward_reference(grad_out, x, y, list(intermediates), list(weights), list(needs),
                                         list(backward_plan))
    wanted = [needs[0]] + [needs[1]] * (2 * len(weights))
    formats = [torch.channels_last] + [f for wt in weights for f in (weight_layout(wt), torch.contiguous_format)]
    return [g.contiguous(memory_format=f) if want else x.new_empty(0) for g, want, f in zip(grads, wanted, formats)]


@graph_backward.register_fake
def _graph_backward_fake(grad_out, x, y, intermediates, weights, needs, backward_plan, backend):
    grads = [x.new_empty(x.shape).contiguous(memory_format=torch.channels_last) if needs[0] else x.new_empty(0)]
    for wt in weights:
        grads += ([wt.new_empty(wt.shape).contiguous(memory_format=weight_layout(wt)), wt.new_empty(wt.shape[:1])]
                  if needs[1] else [x.new_empty(0)] * 2)
    return grads


@torch.library.register_fake("inception_fast::pack_winograd_cpu")
def _pack_winograd_cpu_fake(w, transform, width, flip):
    return w.new_empty(-(-w.shape[0] // width), (transform.shape[0] + w.shape[2] * w.shape[3]) * w.shape[1], width)


@torch.library.register_fake("inception_fast::winograd_weight_grad")
def _winograd_weight_grad_fake(x, grad, padding, tile, kh=3, kw=3, channels_last=False):
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty((grad.shape[1], x.shape[1], kh, kw), dtype=x.dtype, device=x.device, memory_format=layout)


@torch.library.register_fake("inception_fast::graph_backward_cpu")
def _graph_backward_cpu_fake(grad_out, x, y, intermediates, weights, needs_x, needs_weights, backward_plan):
    return _graph_backward_fake(grad_out, x, y, intermediates, weights, (needs_x, needs_weights), backward_plan, "cpu")


def _graph_backward_flops(grad_out_shape, x_shape, y_shape, intermediate_shapes, weight_shapes, needs,
                          backward_plan, backend, out_shape=None, **kwargs) -> int:
    """2 FLOPs per multiply-add, counted as FlopCounterMode counts aten.convolution_backward
    on the unfused block: each convolution's weight gradient when needs[1], and its data
    gradient when its input needs one: always for an intermediate (it depends on weights or
    x that need gradients, or the backward would not run), for x and the pooled x only when
    needs[0]. Each is one forward's worth of multiply-adds of that convolution."""
    _, _, _, _, table = GraphPlan.from_backward_flat(backward_plan)
    n, _, h, w = x_shape
    total = 0
    for conv, shape in zip(table, weight_shapes):
        source = conv.source
        gh, gw = conv.grid(h, w)
        macs = n * gh * gw * shape[0] * shape[1] * shape[2] * shape[3]
        total += macs * (int(bool(needs[1])) + int(source >= 0 or bool(needs[0])))
    return 2 * total


register_flop_formula(torch.ops.inception_fast.graph_backward)(_graph_backward_flops)


# The data gradient of a stride-1 3x3 or 5x5 convolution is the same-sized convolution of its
# output gradient with the flipped, transposed weight: the forward kernel's Winograd form runs it
# with fewer multiplies than oneDNN's direct backward, where repacking the weights (every
# call) pays. Measured on Zen 5, 2 threads, packing included, against oneDNN's data
# gradient: GoogLeNet's 3a 3x3 (128 -> 96 channels, 28x28) at batch 32 6.5 ms against 10.9,
# 3b's 11.3 against 21.3, 4a's 3.4 against 4.2 (14x14), v3's 35x35 1.5 against 2.1 at
# batch 8; below ~0.4 G multiply-adds it lost (3a's 32 -> 16 channels 0.73 against 0.53,
# 4e's 128 -> 32 at 14x14 1.19 against 0.90), and below ~2,000 pixels packing costs more
# than it saves (as for the train-mode form's Winograd forward). Inception-v3's 1x7 / 7x1
# (F(2, 7), 1.75x fewer multiplies) lost: 2.2 against 2.0 ms at 17x17, batch 8. The 5x5s as
# F(2x2, 5x5), same method (medians of 9): the paper GoogLeNet's 3b (32 -> 96 at 28x28) at
# batches 16 and 32 1.37x, 4e (32 -> 128 at 14x14) at 32 1.16x (16: 0.91x, 0.32 G), Inception-v3's
# Mixed_5b-5d (48 -> 64 at 35x35) at batch 8 1.01x; below 0.4 G: 0.5-1.1x.
DATA_GRAD_MIN_MACS = 400_000_000
DATA_GRAD_MIN_PIXELS = 2048


@functools.lru_cache(maxsize=256)
def _data_grad_plan(cout: int, cin: int, kh: int, kw: int, padded: bool = True) -> GraphPlan:
    """The plan of one kh x kw stride-1 convolution from cout to cin channels whose linear
    forward (graph_forward_linear) over a convolution's output gradient, with that
    convolution's flipped, transposed weight, is the convolution's data gradient: 'same'
    for a 'same' convolution; unpadded over the gradient with a (kh - 1, kw - 1) zero
    border (the 'full' correlation) for an unpadded one."""
    return plan(BranchGraphSpec(in_channels=cout, branches=(Branch(levels=((Conv(cout, cin, kh, kw, padded=padded),),)),),
                                pool=None, pool_proj=None))


def _winograd_gradients_on(step, weight: torch.Tensor) -> bool:
    """What every Winograd gradient needs: Winograd on (backend.WINOGRAD), an fp32 weight,
    stride 1."""
    return _backend.WINOGRAD and weight.dtype == torch.float32 and step.stride == 1


def _winograd_square(step, weight: torch.Tensor, sizes: tuple[int, ...]) -> bool:
    """Whether convolution `step` (a ConvStep) of weight `weight` is one the Winograd
    gradients can take: a k x k (_winograd_gradients_on), k in `sizes`, 'same' (padding
    k // 2) or unpadded."""
    k = weight.shape[2]
    return (_winograd_gradients_on(step, weight) and k in sizes and weight.shape[3] == k
            and step.pad_h == step.pad_w and step.pad_h in (0, k // 2))


def data_grad_pays(n: int, h: int, w: int, step, weight: torch.Tensor) -> bool:
    """Whether winograd_data_grad takes convolution `step` (a ConvStep) of weight `weight`
    over an n x h x w input: a 3x3 or 5x5 (_winograd_square; a 5x5 from
    WINOGRAD_5X5_MIN_CHANNELS, as its forward), from DATA_GRAD_MIN_PIXELS output pixels and
    DATA_GRAD_MIN_MACS multiply-adds."""
    gh, gw = step.grid(h, w)
    cout, cin = weight.shape[:2]
    return (_winograd_square(step, weight, (3, 5)) and n * gh * gw >= DATA_GRAD_MIN_PIXELS
            and n * gh * gw * weight.numel() >= DATA_GRAD_MIN_MACS
            and (weight.shape[2] == 3 or _wide_enough(cin, cout, WINOGRAD_5X5_MIN_CHANNELS)))


def winograd_data_grad(n: int, h: int, w: int):
    """graph_backward_reference's data_grad hook for the CPU: the Winograd data gradient of
    each convolution that data_grad_pays for ('same' or unpadded, over an intermediate or
    over x: a stem's conv unit), through graph_forward_linear; None, ATen's convolution
    backward, for the others."""
    def data_grad(g, weight, step, d_so_far, intermediate, last):
        if not data_grad_pays(n, h, w, step, weight):
            return None
        cout, cin, kh, kw = weight.shape
        gh, gw = step.grid(h, w)
        padded = (gh, gw) == (h, w)
        graph = _data_grad_plan(cout, cin, kh, kw, padded)
        g_image = image(g, n, gh, gw)
        if not padded:
            # Only the border is zeroed: the whole buffer's fill cost Inception-v3's stem
            # Conv2d_4a (192 channels at 71x71, batch 8) 4-13 ms a step.
            bordered = g.new_empty(n, h + kh - 1, w + kw - 1, cout)
            bordered[:, :kh - 1].zero_()
            bordered[:, kh - 1 + gh:].zero_()
            bordered[:, kh - 1:kh - 1 + gh, :kw - 1].zero_()
            bordered[:, kh - 1:kh - 1 + gh, kw - 1 + gw:].zero_()
            bordered[:, kh - 1:kh - 1 + gh, kw - 1:kw - 1 + gw] = g.view(n, gh, gw, cout)
            g_image = bordered.permute(0, 3, 1, 2)
        tile = winograd_tiles(graph, *g_image.shape[2:])[0]  # a 3x3's by the grid; a 5x5's True
        b = pack_winograd_flipped(weight, panel_width(torch.float32), tile if tile in (2, 4) else 2)
        d = rows(torch.ops.inception_fast.graph_forward_linear(g_image, [b], [weight.new_zeros(cin)], graph.flat()))
        # d_so_far: the sum of the intermediate's other consumers, a fresh tensor of the walk.
        return (d if d_so_far is None else d_so_far.add_(d)), False

    return data_grad


# The weight gradient of a stride-1 3x3 convolution by Winograd (winograd_weight_grad.cpp):
# per position of the transformed tile, one GEMM that reduces over every tile of the batch.
# Measured on Zen 5, 2 threads, medians of 9 alternating calls, against oneDNN's weight
# gradient (convolution_backward), F(4x4, 3x3) / F(2x2, 3x3):
#   - googlenet's stem conv3 (64 -> 192 at 56x56), batch 16: 8.5 against 25.7 ms (3.0x);
#   - GoogLeNet 3b's 3x3 (128 -> 192 at 28x28), batch 16: 5.7 against 11.7 (2.0x);
#   - 4e's (160 -> 320 at 14x14), batch 16: 3.5 against 6.2; batch 4: 1.59x as F(2x2) and
#     1.25x as F(4x4), whose 64 tiles give each GEMM too short a sum for its 36 x 320 x 160
#     sums; 5b's (192 -> 384 at 7x7), batch 32: 1.29x as F(2x2), 1.03x as F(4x4);
#   - Inception-v3's 35x35 3x3s (64 -> 96, 96 -> 96), batch 8: 1.45-1.59x; its stem
#     Conv2d_2b (32 -> 64 at 147x147): 1.19x; Conv2d_2a (32 -> 32, unpadded at 149x149):
#     1.04-1.09x; 3a's 16 -> 32 at 28x28: 0.6-0.7x, 24 -> 32 at 56x56: 0.65x (the
#     transforms, linear in cin + cout, outweigh GEMMs that are small in cin x cout).
# Hence F(4x4, 3x3) from WEIGHT_GRAD_F4_MIN_TILES of its tiles, F(2x2, 3x3) from
# WEIGHT_GRAD_MIN_TILES of its own, and neither where cin cout / (cin + cout) is below
# WEIGHT_GRAD_MIN_CHANNELS (24 -> 32: 13.7; 32 -> 32: 16, a gain within noise; 32 -> 64: 21.3).
# Inception-v3's 17x17 7x1s as F(2, 7) (1.75x fewer multiply-adds; its 1x2 tiles waste one
# column in 18 at 17x17), same method, 11 calls: 192 -> 192 at batches 8 and 16 1.30x and
# 1.29x, 128 -> 192 1.25x / 1.24x, 160 -> 160 1.15x / 1.13x. Not the 1x7s: oneDNN's weight
# gradient runs those faster than its 7x1s (192 -> 192 at batch 8: 2.9 against 3.1 ms;
# 128 -> 128: 1.06 against 1.39), and F(2, 7) took them at 0.83x (128 -> 128) to 1.17x
# (192 at batch 8). Nor the
# narrower 7x1s: 128 -> 128 gained 1.07x alone, but Inception-v3's Mixed_6b (two of them)
# trained 1-3% slower with them than with oneDNN's gradients (3 alternating runs, batch 8),
# hence WEIGHT_GRAD_7X1_MIN_CHANNELS (128 -> 128: 64; 128 -> 192: 76.8).
WEIGHT_GRAD_7X1_MIN_CHANNELS = 72
WEIGHT_GRAD_F4_MIN_TILES = 192
WEIGHT_GRAD_MIN_TILES = 32
WEIGHT_GRAD_MIN_CHANNELS = 20


def weight_grad_tile(n: int, gh: int, gw: int, cin: int, cout: int) -> int | None:
    """The Winograd output tile (4 or 2) that winograd_weight_grad runs the weight gradient
    of a 3x3 stride-1 convolution from cin to cout channels with an n x gh x gw output grid
    in, or None where oneDNN's direct weight gradient is faster (the thresholds above)."""
    if not _wide_enough(cin, cout, WEIGHT_GRAD_MIN_CHANNELS):
        return None
    if n * -(-gh // 4) * -(-gw // 4) >= WEIGHT_GRAD_F4_MIN_TILES:
        return 4
    return 2 if n * -(-gh // 2) * -(-gw // 2) >= WEIGHT_GRAD_MIN_TILES else None


def weight_grad_pays(n: int, h: int, w: int, step, weight: torch.Tensor) -> int | None:
    """The tile winograd_weight_grad runs convolution `step` (a ConvStep) of weight `weight`
    over an n x h x w input with: a 3x3 (_winograd_square), where weight_grad_tile picks
    one; a 7x1 padded (3, 0) (F(2, 7), tile 2) from WEIGHT_GRAD_7X1_MIN_CHANNELS (as
    _wide_enough) and WEIGHT_GRAD_MIN_TILES of its 2x1 tiles; else None."""
    cout, cin = weight.shape[:2]
    if _winograd_seven_by_one(step, weight):
        gh, gw = step.grid(h, w)
        wide = _wide_enough(cin, cout, WEIGHT_GRAD_7X1_MIN_CHANNELS)
        return 2 if wide and n * -(-gh // 2) * gw >= WEIGHT_GRAD_MIN_TILES else None
    if not _winograd_square(step, weight, (3,)):
        return None
    return weight_grad_tile(n, *step.grid(h, w), cin, cout)


def _winograd_seven_by_one(step, weight: torch.Tensor) -> bool:
    """A 7x1 padded (3, 0) (_winograd_gradients_on): F(2, 7)'s weight gradient."""
    return (_winograd_gradients_on(step, weight) and tuple(weight.shape[2:]) == (7, 1)
            and (step.pad_h, step.pad_w) == (3, 0))


def winograd_weight_grad(g: torch.Tensor, src: torch.Tensor, weight: torch.Tensor, step) -> torch.Tensor | None:
    """graph_backward_reference's weight_grad hook for the CPU: the Winograd weight gradient
    of each convolution that weight_grad_pays for (over an intermediate or over x); None,
    ATen's convolution backward, for the others, and where an input was not finite or a
    transformed sum overflowed (the C++ op then returns NaN throughout: the direct backward
    puts each non-finite value where eager's convolution does). Returned in the weight's
    layout (weight_layout)."""
    n, _, h, w = src.shape
    tile = weight_grad_pays(n, h, w, step, weight) if src.dtype == torch.float32 and g.device.type == "cpu" else None
    if tile is None:
        return None
    d = torch.ops.inception_fast.winograd_weight_grad(src, g, step.pad_h, tile, *weight.shape[2:],
                                                      channels_last=weight_layout(weight) == torch.channels_last)
    # All NaN or all valid (the op's contract), so one element decides: torch.isfinite(d).all()
    # cost 0.3 ms a 192 x 192 x 7 x 1, 1.3% of Inception-v3's Mixed_6e train step at batch 8.
    return None if d.numel() and math.isnan(d[0, 0, 0, 0]) else d


# The eval form's CPU backward takes the walk with Winograd gradients from this many
# multiply-adds of 3x3 data and weight gradients that Winograd takes (data_grad_pays,
# weight_grad_tile). Forward + backward, eval form, walk against the C++ backward (Zen 5,
# 2 threads, alternating, 8 reps): GoogLeNet's 3a at batch 32 (5.5 G) 1.17x, 4e at 32 (5.8 G)
# 1.13x, 4a at 32 (2.3 G) 1.04x, Inception-v3's Mixed_5b at 8 (2.7 G) 1.05x; below, the C++
# backward's in-place column writes (~1 ms a block) win: 3a at 8 (1.4 G) 0.93x, 4e at 8
# (1.5 G) 1.01x, Mixed_5b at 2 (0.7 G) 0.97x.
WALK_MIN_MACS = 2_000_000_000


def _walk_backward_pays(x: torch.Tensor, weights: list[torch.Tensor], backward_plan: list[int]) -> bool:
    """Whether the eval-form CPU backward runs graph_backward_reference's walk with the
    Winograd data and weight gradients instead of the C++ backward
    (inception_graph_cpu_backward.cpp): from WALK_MIN_MACS multiply-adds of gradients that
    Winograd takes."""
    n, _, h, w = x.shape
    steps = GraphPlan.from_backward_flat(backward_plan)[4]
    macs = 0
    for step, wt in zip(steps, weights):
        gh, gw = step.grid(h, w)
        conv_macs = n * gh * gw * wt.numel()
        # The 7x1s' F(2, 7) weight gradients do not count: measured in the train form only.
        square = wt.shape[2] == wt.shape[3]
        macs += conv_macs * (data_grad_pays(n, h, w, step, wt)
                             + (square and weight_grad_pays(n, h, w, step, wt) is not None))
    return macs >= WALK_MIN_MACS


def _interiors(buffers: list[torch.Tensor], h: int, w: int) -> list[torch.Tensor]:
    """Each saved buffer's (N, H, W, C) interior: the C++ kernel's carry a zero border, Triton's none."""
    return [buf[:, (buf.shape[1] - h) // 2:(buf.shape[1] + h) // 2, (buf.shape[2] - w) // 2:(buf.shape[2] + w) // 2]
            for buf in buffers]


def _recomputed(x: torch.Tensor, weights, biases, recompute) -> dict[int, torch.Tensor]:
    """Buffer -> its (N, H, W, C) value relu(x @ W^T + b), for the buffers that `recompute`
    maps to the 1x1 over x that fills them: one GEMM for all of them, as the forward's stage 0."""
    pairs = [(k, i) for k, i in enumerate(recompute) if i >= 0]
    if not pairs:
        return {}
    n, _, h, w = x.shape
    w_cat = torch.cat([weights[i].flatten(1) for _, i in pairs])
    b_cat = torch.cat([biases[i] for _, i in pairs])
    if x.device.type == "cpu" and x.dtype == torch.float32:
        # As a 1x1 convolution, oneDNN's: 2.2x faster than addmm (MKL's sgemm) on AMD's Zen 5
        # (GoogLeNet's 5b at batch 32: 1.3 against 2.9 ms).
        t = torch.relu(rows(F.conv2d(x.contiguous(memory_format=torch.channels_last),
                                     w_cat.reshape(*w_cat.shape, 1, 1), b_cat)))
    else:
        t = torch.relu(torch.addmm(b_cat, rows(x), w_cat.t()))
    parts = t.split([weights[i].shape[0] for _, i in pairs], dim=1)
    return {k: part.reshape(n, h, w, -1) for (k, _), part in zip(pairs, parts)}


class BranchGraphFunction(torch.autograd.Function):
    """The fused forward of a backend with the fused backward, over Conv2d-layout weights
    and biases (the plan's convolution order; folded BN, when the module has one).

    apply(x, backend, flat_plan, backward_plan, recompute, packed_b, packed_bias, *weights, *biases):
    backend "cpu" or "triton"; the plan as GraphPlan.flat() and .backward_flat();
    recompute: per intermediate buffer, the index of the 1x1 over x that fills it to
    recompute it in the backward from x (one GEMM), or -1 to save it
    (GraphPlan.reductions() lists the candidates); packed_b/packed_bias: pack_weights of
    the same weights (cached by the caller). Saves x, the output, the weights and biases
    and the intermediates not recomputed.
    """

    @staticmethod
    def forward(ctx, x, backend: str, flat_plan, backward_plan, recompute, packed_b, packed_bias, *params):
        half = len(params) // 2
        saved: list[torch.Tensor] = []
        if all(i >= 0 for i in recompute):  # nothing to keep: the plain forward
            y = forward_op(backend)(x, list(packed_b), list(packed_bias), flat_plan)
        else:
            y, buffers = forward_op(backend, saving=True)(x, list(packed_b), list(packed_bias), flat_plan)
            saved = [t for t, i in zip(_interiors(buffers, x.shape[2], x.shape[3]), recompute) if i < 0]
        recomputing = any(i >= 0 for i in recompute)
        # The biases only serve to recompute: a backward that recomputes nothing leaves them.
        ctx.save_for_backward(x, y, *(params if recomputing else params[:half]), *saved)
        ctx.backend, ctx.backward_plan, ctx.recompute, ctx.half = backend, backward_plan, tuple(recompute), half
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, y, *rest = ctx.saved_tensors
        weights = rest[:ctx.half]
        recomputing = any(i >= 0 for i in ctx.recompute)
        biases = rest[ctx.half:2 * ctx.half] if recomputing else ()
        saved = iter(rest[2 * ctx.half:] if recomputing else rest[ctx.half:])
        recomputed = _recomputed(x, weights, biases, ctx.recompute)
        intermediates = [recomputed[k] if i >= 0 else next(saved) for k, i in enumerate(ctx.recompute)]
        needs = [ctx.needs_input_grad[0], any(ctx.needs_input_grad[7:])]
        grads = graph_backward(grad_out, x, y, intermediates, list(weights), needs, ctx.backward_plan, ctx.backend)
        dx = grads[0] if needs[0] else None
        d_params = (grads[1::2] + grads[2::2]) if needs[1] else [None] * (2 * len(weights))
        return (dx, None, None, None, None, None, None, *d_params)


def apply_graph(x: torch.Tensor, backend: str, flat_plan: list[int], backward_plan: list[int], recompute: tuple,
                weights: list, biases: list, packed: tuple[list, list]) -> torch.Tensor:
    """x (N, C, H, W), any memory format, through the fused op on `backend` ("cpu" or
    "triton"); returns (N, out_channels, H', W') channels_last. Differentiable when autograd
    needs it (BranchGraphFunction); else the bare custom op, which is also what jit.trace
    records (with the op's own registered autograd, over the traced packing).
    `packed`: pack_weights of `weights`/`biases` for this backend (cached by the caller, or
    computed in the traced graph).
    """
    if torch.is_grad_enabled() and not torch.jit.is_tracing() and (
            x.requires_grad or any(t.requires_grad for t in (*weights, *biases))):
        return BranchGraphFunction.apply(x, backend, flat_plan, backward_plan, recompute, *packed, *weights, *biases)
    return forward_op(backend)(x, packed[0], packed[1], flat_plan)


def residual_tail(x: torch.Tensor, concat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  scale: float, relu: bool) -> torch.Tensor:
    """Inception-ResNet's tail (spec.Residual): act(x + scale * (weight @ concat + bias)).

    x (N, C, H, W); concat (N, K, H, W), the fused op's output (channels_last); weight
    (C, K, 1, 1), bias (C,) or None. Returns (N, C, H, W) channels_last. x's pixel rows plus
    the scaled bias, then one GEMM accumulating into them (addmm_, scale as its alpha: no
    scaled copy of the weight), then the ReLU in place: plain ATen ops, so autograd, tracing
    and compile see through them. This is the tail under autograd, tracing and autocast;
    inference runs it as the kernel's last GEMM instead (C++ or Triton), x added in its
    epilogue (plan.plan_with_residual).
    """
    n, _, h, w = x.shape
    # In place after the first pass: every full pass over the output costs ~1 ms on a
    # Block35 at batch 8 (a new allocation's first touch, then the read and the write).
    out = rows(x) + bias * scale if bias is not None else rows(x).clone()
    # Under autocast x may be wider than the op's output: the GEMM then runs in x's dtype.
    out.addmm_(rows(concat).to(out.dtype), weight.flatten(1).t().to(out.dtype), alpha=scale)
    return image(out.relu_() if relu else out, n, h, w)


# Autograd of the bare forward ops, over their packed weights, for a graph that holds the op
# itself (jit.trace, a direct torch.ops call); BranchGraphFunction does not go through this.
# The flat plan carries no spec order, so the backward runs on the plan's GEMM column order
# (GraphPlan.from_flat), which still visits every consumer before its producer; it re-runs
# the saving forward for the intermediates, and packing is linear, so the gradient of a
# packed tensor is the packed gradient.
def _setup_op_context(ctx, inputs, output):
    x, b, bias, flat_plan = inputs
    ctx.flat_plan, ctx.n = list(flat_plan), len(b)
    ctx.save_for_backward(x, *b, *bias)


def _op_backward(backend: str):
    def backward(ctx, grad_out):
        x, *packed = ctx.saved_tensors
        b, bias = packed[:ctx.n], packed[ctx.n:]
        graph = GraphPlan.from_flat(ctx.flat_plan)
        weights, biases = unpack_weights(graph, b, bias, backend, x.shape[1])
        y, buffers = forward_op(backend, saving=True)(x, list(b), list(bias), ctx.flat_plan)
        # needs_input_grad holds one flag per tensor of a list input
        needs = [ctx.needs_input_grad[0], any(ctx.needs_input_grad[1]) or any(ctx.needs_input_grad[2])]
        w_list = [w for w in weights if w is not None]
        grads = graph_backward(grad_out, x, y, _interiors(buffers, x.shape[2], x.shape[3]), w_list, needs,
                               graph.backward_flat(), backend)
        # A list input takes a list of gradients, None where not needed.
        d_b, d_bias = [None] * len(b), [None] * len(bias)
        if needs[1]:
            winograd = [winograd_packed(graph, g, t, x.shape[1]) for t, g in zip(b, graph.gemms)]  # as b came
            d_b, d_bias = pack_weights(graph, grads[1::2], grads[2::2], backend, winograd=winograd, gradient=True)
        return grads[0] if needs[0] else None, d_b, d_bias, None

    return backward


torch.library.register_autograd("inception_fast::graph_forward", _op_backward("cpu"), setup_context=_setup_op_context)
graph_triton_forward.register_autograd(_op_backward("triton"), setup_context=_setup_op_context)
