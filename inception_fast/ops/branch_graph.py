"""The fused branch-graph op: Inception-v3's blocks (InceptionA to E) as one kernel.

A block is a small graph over one input x. Each branch is a chain of levels; level 0
reads x and is a 1x1 convolution; level i reads level i-1's single output; the last
level may fan out into several convolutions (InceptionE's 1x3 and 3x1), whose outputs are
concatenated. One pooling branch (3x3/1, max or average with count_include_pad) ends
with a 1x1. Every convolution is stride 1 with 'same' padding, any odd kh x kw, followed
by ReLU (BN folded in). Outputs are concatenated along channels: branches in order, the
pooling branch last. A grid reduction (stride 2: InceptionB, D) ends every branch with
3x3 stride-2 unpadded convolutions (a branch may be just that, over x) and its pooling
branch is a 3x3 stride-2 max pool without projection.

The C++ kernel (csrc/inception_graph_cpu.cpp) runs it as stages of GEMMs: stage 0 is
every branch's leading 1x1 as one GEMM over x (horizontal fusion) plus the pool branch's
1x1 over pooled rows made on the fly; stage i runs level i of every branch over
zero-bordered intermediates. Each GEMM stores through bias + ReLU straight into its slice
of the output or of the next intermediate. `plan()` turns a spec into that schedule.

On the CPU (float32, float64) and, through branch_graph_triton.py, on GPUs. The backward
(graph_backward, below) is fused too; BranchGraphFunction ties the two together. The
module around it (fused_graph.py) runs the original branches in train mode, where BN
needs batch statistics anyway.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from .._extension import cpu_extension, require_cpu_extension
from ._layout import as_gemm_b
from .inception import _pack_panels

__all__ = ["Conv", "Branch", "BranchGraphSpec", "GraphPlan", "plan", "pack_graph_weights", "graph_forward",
           "graph_triton_forward", "graph_forward_saving", "graph_triton_forward_saving", "graph_backward",
           "graph_backward_reference", "BranchGraphFunction"]

_SOURCE_X, _SOURCE_AVG_POOL, _SOURCE_MAX_POOL, _SOURCE_MAX_POOL_COPY = -1, -2, -3, -4
_DEST_OUT = -1


@dataclass(frozen=True)
class Conv:
    """One convolution (+ ReLU) of a branch: stride 1 with 'same' zero padding, or (ending a
    grid-reduction branch) stride 2 without padding."""

    in_channels: int
    out_channels: int
    kh: int = 1
    kw: int = 1
    stride: int = 1

    def __post_init__(self):
        for name in ("in_channels", "out_channels", "kh", "kw"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"Conv.{name} must be a positive int, got {value!r}")
        if self.kh % 2 == 0 or self.kw % 2 == 0:
            raise ValueError(f"Conv kernel must be odd for 'same' padding, got {self.kh}x{self.kw}")
        if self.stride not in (1, 2):
            raise ValueError(f"Conv.stride must be 1 or 2, got {self.stride!r}")

    @property
    def padding(self) -> tuple[int, int]:
        return (self.kh // 2, self.kw // 2) if self.stride == 1 else (0, 0)

    def macs_per_pixel(self) -> int:
        return self.kh * self.kw * self.in_channels * self.out_channels


@dataclass(frozen=True)
class Branch:
    """levels[0] reads x (one 1x1); levels[i] reads levels[i-1]'s one output; only the last
    level may hold several convolutions (a fan-out, concatenated in order)."""

    levels: tuple[tuple[Conv, ...], ...]

    @property
    def out_channels(self) -> int:
        return sum(c.out_channels for c in self.levels[-1])


@dataclass(frozen=True)
class BranchGraphSpec:
    """stride 1: same-grid branches and a pool branch with a 1x1 (InceptionA, C, E).
    stride 2, a grid reduction (InceptionB, D): every branch ends in 3x3 stride-2 unpadded
    convolutions (a branch may be that one convolution over x), and the pool branch is a
    3x3 stride-2 max pool without projection; the output grid is (H - 3) // 2 + 1."""

    in_channels: int
    branches: tuple[Branch, ...]
    pool: str  # "avg" (count_include_pad) or "max"; 3x3, padding 1 at stride 1, none at 2
    pool_proj: Conv | None
    stride: int = 1

    def __post_init__(self):
        if self.pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {self.pool!r}")
        if self.stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {self.stride!r}")
        if self.stride == 2 and (self.pool != "max" or self.pool_proj is not None):
            raise ValueError("a stride-2 block's pool branch is a max pool without projection")
        if self.stride == 1 and (self.pool_proj is None or self.pool_proj.in_channels != self.in_channels
                                 or (self.pool_proj.kh, self.pool_proj.kw, self.pool_proj.stride) != (1, 1, 1)):
            raise ValueError(f"pool_proj must be a 1x1 over {self.in_channels} channels, got {self.pool_proj}")
        for i, branch in enumerate(self.branches):
            if not branch.levels or any(not level for level in branch.levels):
                raise ValueError(f"branch {i} has an empty level")
            for j, level in enumerate(branch.levels):
                last = j == len(branch.levels) - 1
                for conv in level:
                    want = 2 if self.stride == 2 and last else 1
                    if conv.stride != want or (want == 2 and (conv.kh, conv.kw) != (3, 3)):
                        raise ValueError(f"branch {i}, level {j}: a stride-{self.stride} block needs "
                                         f"{'3x3 stride-2' if want == 2 else 'stride-1'} convolutions here, got {conv}")
            first = branch.levels[0]
            direct = self.stride == 2 and len(branch.levels) == 1  # one stride-2 conv over x
            if len(first) != 1 or first[0].in_channels != self.in_channels or (
                    not direct and (first[0].kh, first[0].kw) != (1, 1)):
                raise ValueError(f"branch {i} must start with one 1x1 over {self.in_channels} channels, got {first}")
            for j in range(1, len(branch.levels)):
                if len(branch.levels[j - 1]) != 1:
                    raise ValueError(f"branch {i}: only the last level may fan out (level {j - 1} has "
                                     f"{len(branch.levels[j - 1])} convolutions)")
                width = branch.levels[j - 1][0].out_channels
                if any(c.in_channels != width for c in branch.levels[j]):
                    raise ValueError(f"branch {i}, level {j}: convolutions must read {width} channels")

    @property
    def convs(self) -> tuple[Conv, ...]:
        """Every convolution in weight order: branch by branch, level by level, then pool_proj."""
        convs = tuple(c for b in self.branches for level in b.levels for c in level)
        return convs + ((self.pool_proj,) if self.pool_proj is not None else ())

    @property
    def out_channels(self) -> int:
        pool = self.pool_proj.out_channels if self.pool_proj is not None else self.in_channels
        return sum(b.out_channels for b in self.branches) + pool

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        return (h, w) if self.stride == 1 else ((h - 3) // 2 + 1, (w - 3) // 2 + 1)

    def macs(self, h: int, w: int, batch: int = 1) -> int:
        ho, wo = self.out_size(h, w)
        return batch * sum(c.macs_per_pixel() * (h * w if c.stride == 1 else ho * wo) for c in self.convs)


class GraphPlan(NamedTuple):
    """The C++ kernel's schedule: intermediates, and GEMMs over x, pooled x or intermediates."""

    buf_channels: tuple[int, ...]
    buf_border: tuple[int, ...]
    # (stage, source, kh, kw, stride, pad_h, pad_w, cols, n_segments,
    #  (begin, end, destination, channel) * n_segments)
    gemms: tuple[tuple[int, ...], ...]
    # for each GEMM, the indices into spec.convs of its column blocks, in column order
    gemm_convs: tuple[tuple[int, ...], ...]
    out_channels: int
    stride: int
    # for each conv of spec.convs: (source, destination, channel, kh, kw, stride, pad_h,
    # pad_w), sources and destinations numbered as in the GEMMs
    conv_table: tuple[tuple[int, ...], ...]
    # the output channel where a grid reduction's max pool is copied, -1 if none
    pool_copy_channel: int

    def flat(self) -> list[int]:
        """One int list (a custom op argument): counts, then the fields in order."""
        flat = [len(self.buf_channels), *self.buf_channels, *self.buf_border, self.out_channels, self.stride,
                len(self.gemms)]
        for g in self.gemms:
            flat += [len(g), *g]
        return flat

    @staticmethod
    def from_flat(flat: list[int]) -> tuple[list[int], list[int], int, int, list[list[int]]]:
        """(buf_channels, buf_border, out_channels, stride, gemms) of GraphPlan.flat()."""
        n = flat[0]
        buf_channels, buf_border = list(flat[1:1 + n]), list(flat[1 + n:1 + 2 * n])
        out_channels, stride, count = flat[1 + 2 * n], flat[2 + 2 * n], flat[3 + 2 * n]
        gemms, i = [], 4 + 2 * n
        for _ in range(count):
            gemms.append(list(flat[i + 1:i + 1 + flat[i]]))
            i += 1 + flat[i]
        return buf_channels, buf_border, out_channels, stride, gemms

    def backward_flat(self) -> list[int]:
        """The backward's view of the graph as one int list: per convolution, where it reads
        and writes (see graph_backward)."""
        return [self.out_channels, self.stride, self.pool_copy_channel, len(self.buf_channels), *self.buf_channels,
                len(self.conv_table), *(v for row in self.conv_table for v in row)]

    @staticmethod
    def from_backward_flat(flat: list[int]) -> tuple[int, int, int, list[int], list[list[int]]]:
        """(out_channels, stride, pool_copy_channel, buf_channels, conv_table) of backward_flat()."""
        out_channels, stride, copy_channel, n = flat[:4]
        buf_channels = list(flat[4:4 + n])
        count, table = flat[4 + n], flat[5 + n:]
        if len(table) != count * _CONV_RECORD:
            raise ValueError(f"a backward plan of {count} convolutions needs {count * _CONV_RECORD} values, "
                             f"got {len(table)}")
        return out_channels, stride, copy_channel, buf_channels, [
            list(table[i:i + _CONV_RECORD]) for i in range(0, len(table), _CONV_RECORD)]


_CONV_RECORD = 8  # (source, destination, channel, kh, kw, stride, pad_h, pad_w)


def plan(spec: BranchGraphSpec) -> GraphPlan:
    """The stages of GEMMs that compute `spec`, each storing into the output or a buffer."""
    index = 0  # into spec.convs
    buf_channels: list[int] = []
    buf_consumers: list[list[Conv]] = []
    stage0_cols, stage0_convs, stage0_segments = 0, [], []
    # (stage, source, conv, conv index, destination): every GEMM but the fused stage-0 one
    single: list[tuple[int, int, Conv, int, tuple[int, int]]] = []
    out_offset = 0
    conv_table: list[tuple[int, ...]] = []
    for branch in spec.branches:
        previous = None  # the buffer holding the previous level's output
        for level_index, level in enumerate(branch.levels):
            last = level_index == len(branch.levels) - 1
            for conv in level:
                if last:
                    destination = (_DEST_OUT, out_offset)
                    out_offset += conv.out_channels
                else:
                    buf_channels.append(conv.out_channels)
                    buf_consumers.append([])
                    destination = (len(buf_channels) - 1, 0)
                source = _SOURCE_X if level_index == 0 else previous
                conv_table.append((source, *destination, conv.kh, conv.kw, conv.stride, *conv.padding))
                if level_index == 0 and (conv.kh, conv.kw, conv.stride) == (1, 1, 1):
                    stage0_segments.append((stage0_cols, stage0_cols + conv.out_channels, *destination))
                    stage0_cols += conv.out_channels
                    stage0_convs.append(index)
                elif level_index == 0:  # a grid reduction's stride-2 conv straight over x
                    single.append((0, _SOURCE_X, conv, index, destination))
                else:
                    buf_consumers[previous].append(conv)
                    single.append((level_index, previous, conv, index, destination))
                index += 1
            if not last:
                previous = len(buf_channels) - 1
    gemms, gemm_convs = [], []
    if stage0_segments:
        gemms.append((0, _SOURCE_X, 1, 1, 1, 0, 0, stage0_cols, len(stage0_segments),
                      *(v for seg in stage0_segments for v in seg)))
        gemm_convs.append(tuple(stage0_convs))
    for stage, source, conv, conv_i, (dest, channel) in single:
        gemms.append((stage, source, conv.kh, conv.kw, conv.stride, *conv.padding, conv.out_channels, 1,
                      0, conv.out_channels, dest, channel))
        gemm_convs.append((conv_i,))
    if spec.pool_proj is not None:
        cp = spec.pool_proj.out_channels
        source = _SOURCE_AVG_POOL if spec.pool == "avg" else _SOURCE_MAX_POOL
        gemms.append((0, source, 1, 1, 1, 0, 0, cp, 1, 0, cp, _DEST_OUT, out_offset))
        gemm_convs.append((index,))
        conv_table.append((source, _DEST_OUT, out_offset, 1, 1, 1, 0, 0))
        copy_channel = -1
    else:  # the grid reduction's max pool, copied into its slice: no weights
        c = spec.in_channels
        gemms.append((0, _SOURCE_MAX_POOL_COPY, 3, 3, 2, 0, 0, c, 1, 0, c, _DEST_OUT, out_offset))
        gemm_convs.append(())
        copy_channel = out_offset
    border = tuple(max((max(c.padding) for c in consumers), default=0) for consumers in buf_consumers)
    return GraphPlan(tuple(buf_channels), border, tuple(gemms), tuple(gemm_convs), spec.out_channels, spec.stride,
                     tuple(conv_table), copy_channel)


def pack_graph_weights(spec: BranchGraphSpec, graph: GraphPlan, weights, biases) -> tuple[list, list]:
    """Per GEMM: B = [W of its convolutions]^T in panels, and the concatenated biases.

    weights/biases: one (cout, cin, kh, kw) / (cout,) tensor per conv, in spec.convs order.
    """
    if len(weights) != len(spec.convs) or len(biases) != len(spec.convs):
        raise ValueError(f"need {len(spec.convs)} weights and biases (spec.convs order), got "
                         f"{len(weights)} and {len(biases)}")
    for i, (conv, w, b) in enumerate(zip(spec.convs, weights, biases)):
        if tuple(w.shape) != (conv.out_channels, conv.in_channels, conv.kh, conv.kw) or tuple(b.shape) != (conv.out_channels,):
            raise ValueError(f"convolution {i} needs weight {(conv.out_channels, conv.in_channels, conv.kh, conv.kw)}"
                             f" and bias ({conv.out_channels},), got {tuple(w.shape)} and {tuple(b.shape)}")
    width = 128 // weights[0].element_size()  # two 64-byte vectors of columns, as csrc/ expects
    packed_b, packed_bias = [], []
    for convs in graph.gemm_convs:
        if not convs:  # the max-pool copy has no weights
            packed_b.append(weights[0].new_empty(0))
            packed_bias.append(biases[0].new_empty(0))
            continue
        packed_b.append(_pack_panels(torch.cat([as_gemm_b(weights[i]) for i in convs], dim=1), width))
        packed_bias.append(torch.cat([biases[i] for i in convs]).contiguous())
    return packed_b, packed_bias


@torch.library.custom_op("inception_fast::graph_forward", mutates_args=())
def graph_forward(x: torch.Tensor, b: list[torch.Tensor], bias: list[torch.Tensor], flat_plan: list[int]) -> torch.Tensor:
    """The C++ branch-graph kernel on packed weights; flat_plan = GraphPlan.flat()."""
    buf_channels, buf_border, out_channels, stride, gemms = GraphPlan.from_flat(flat_plan)
    return require_cpu_extension().inception_graph_forward(
        x, buf_channels, buf_border, gemms, list(b), list(bias), out_channels, stride)


@graph_forward.register_fake
def _graph_fake(x, b, bias, flat_plan):
    _, _, out_channels, stride, _ = GraphPlan.from_flat(flat_plan)
    n, _, h, w = x.shape
    if stride == 2:
        h, w = (h - 3) // 2 + 1, (w - 3) // 2 + 1
    return x.new_empty((n, out_channels, h, w)).contiguous(memory_format=torch.channels_last)


def _graph_flops(x_shape, b_shapes, bias_shapes, flat_plan, out_shape=None, **kwargs) -> int:
    """2 FLOPs per multiply-add of every GEMM: rows x K x columns, K = B's second-last dim
    (packed CPU panels (panels, K, width) and Triton's (K, cols) alike)."""
    n, _, h, w = x_shape
    _, _, _, _, gemms = GraphPlan.from_flat(flat_plan)
    out_pixels = n * ((h - 3) // 2 + 1) * ((w - 3) // 2 + 1)
    return 2 * sum((n * h * w if g[4] == 1 else out_pixels) * shape[-2] * g[7]
                   for shape, g in zip(b_shapes, gemms) if len(shape) >= 2)


@torch.library.custom_op("inception_fast::graph_triton_forward", mutates_args=())
def graph_triton_forward(x: torch.Tensor, b: list[torch.Tensor], bias: list[torch.Tensor],
                         flat_plan: list[int]) -> torch.Tensor:
    """The Triton branch-graph kernel (branch_graph_triton.py), one launch per GEMM of the plan."""
    from . import branch_graph_triton  # imports triton: only when this backend runs

    return branch_graph_triton.graph_forward_triton(x, list(b), list(bias), list(flat_plan))


graph_triton_forward.register_fake(_graph_fake)


# -- backward -------------------------------------------------------------------------
#
# The forward saves x, its output y and the intermediates (every non-final level's
# output, which the forward computes anyway); the backward walks the convolutions in
# reverse spec order, so every consumer of an intermediate is done before its producer:
#   1. each convolution's ReLU gradient: masked by y > 0 for those that write the output,
#      by intermediate > 0 for the others (after all its consumers have added to it);
#   2. a K x K or stride-2 convolution's data and weight gradients: convolution backward;
#   3. every 1x1 that reads x joins one GEMM for dx and one for their weight gradients,
#      and so does the average-pool branch: the 3x3/1 average pool with count_include_pad
#      is self-adjoint, so its contribution to dx is avgpool(gp) @ Wp and its weight
#      gradient avgpool(gp)^T @ x, with the pooled x never recomputed;
#   4. a max pool's gradient (the stride-1 pool branch, or the grid reduction's copied
#      pool) goes to its argmax, torch's rule: the first maximum in a row-major scan.
# Subgradient at 0: none flows where a ReLU output is exactly 0, as in torch.relu.


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N*H*W, C) NHWC pixel rows (a view when t is channels_last)."""
    return t.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def _image(rows: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
    """(N*H*W, C) rows -> logical (N, C, H, W), channels_last memory: a view."""
    return rows.reshape(n, h, w, -1).permute(0, 3, 1, 2)


def graph_backward_reference(grad_out: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                             intermediates: list[torch.Tensor], weights: list[torch.Tensor], needs: list[bool],
                             backward_plan: list[int], data_grad=None,
                             max_pool_grad=None) -> list[torch.Tensor | None]:
    """[dx, dW_0, db_0, dW_1, db_1, ...] (spec.convs order; None where not needed) as ATen
    calls, on any device: the algorithm the C++ backward (csrc/inception_graph_cpu_backward.cpp)
    and the Triton one implement. intermediates: (N, H, W, channels) NHWC, any strides.

    data_grad, if given, computes the data gradient of each stride-1 convolution over an
    intermediate instead of ATen: data_grad(g, weight, record, d_so_far, intermediate, last)
    -> (d, masked), g the (M, cout) masked gradient of its output, d_so_far the sum over
    the intermediate's other consumers (None for the first), last whether no consumer is
    left, masked whether d already carries the intermediate's ReLU mask (the Triton kernel
    applies it in its epilogue).

    max_pool_grad, if given, takes the stride-1 max-pool branch instead of ATen:
    max_pool_grad(g, weight, need_dx) -> (pooled, pool_dx), g the (M, cout) masked gradient
    of its 1x1, pooled the (M, C) rows of the pooled x (for the weight gradient), and
    pool_dx (None unless need_dx) a function (a, w) -> the (M, C) rows of a @ w plus the max
    pool's gradient, which then computes the shared-x GEMM's dx (a and w None when no 1x1
    reads x): the Triton backward gathers that gradient in the GEMM's epilogue.
    """
    _, stride, copy_channel, _, table = GraphPlan.from_backward_flat(backward_plan)
    n, c, h, w = x.shape
    ho, wo = (h, w) if stride == 1 else ((h - 3) // 2 + 1, (w - 3) // 2 + 1)
    relu_backward = torch.ops.aten.threshold_backward
    grad_rows, y_rows, x_rows = _rows(grad_out), _rows(y), _rows(x)
    inter_rows = [t.reshape(-1, t.shape[-1]) for t in intermediates]
    d_inter: list[torch.Tensor | None] = [None] * len(intermediates)
    masked = [False] * len(intermediates)
    consumers_left = [sum(row[0] == k for row in table) for k in range(len(intermediates))]
    d_weights: list[torch.Tensor | None] = [None] * len(table)
    d_biases: list[torch.Tensor | None] = [None] * len(table)
    shared: dict[int, torch.Tensor] = {}  # conv index -> its columns of the shared-x GEMM
    dx_terms: list[torch.Tensor] = []  # logical (N, C, H, W)
    pool_dx = None  # from max_pool_grad: the shared-x GEMM's dx with the max pool's gradient
    for i in reversed(range(len(table))):
        source, dest, channel, kh, kw, conv_stride, pad_h, pad_w = table[i]
        weight = weights[i]
        co = weight.shape[0]
        if dest < 0:
            g = relu_backward(grad_rows[:, channel:channel + co], y_rows[:, channel:channel + co], 0)
        else:
            g = d_inter[dest] if masked[dest] else relu_backward(d_inter[dest], inter_rows[dest], 0)
        d_biases[i] = g.sum(0)
        if source >= 0:
            consumers_left[source] -= 1
        if source == _SOURCE_X and (kh, kw, conv_stride) == (1, 1, 1):
            shared[i] = g
        elif source == _SOURCE_AVG_POOL:
            shared[i] = _rows(F.avg_pool2d(_image(g, n, h, w), 3, 1, 1))  # self-adjoint
        elif source == _SOURCE_MAX_POOL and max_pool_grad is not None:
            pooled, pool_dx = max_pool_grad(g, weight, needs[0])
            d_weights[i] = (g.t() @ pooled).reshape(weight.shape) if needs[1] else None
        elif source == _SOURCE_MAX_POOL:
            pooled, indices = F.max_pool2d(x, 3, 1, 1, return_indices=True)
            d_weights[i] = (g.t() @ _rows(pooled)).reshape(weight.shape) if needs[1] else None
            if needs[0]:
                dx_terms.append(torch.ops.aten.max_pool2d_with_indices_backward(
                    _image(g @ weight.flatten(1), n, h, w), x, [3, 3], [1, 1], [1, 1], [1, 1], False, indices))
        elif data_grad is not None and source >= 0 and conv_stride == 1:
            d_inter[source], masked[source] = data_grad(g, weight, table[i], d_inter[source], intermediates[source],
                                                        consumers_left[source] == 0)
            _, d_weights[i], _ = torch.ops.aten.convolution_backward(
                _image(g, n, h, w), intermediates[source].permute(0, 3, 1, 2), weight, None, [1, 1], [pad_h, pad_w],
                [1, 1], False, [0, 0], 1, [False, needs[1], False])
        else:
            gh, gw = (h, w) if conv_stride == 1 else (ho, wo)
            src = x if source == _SOURCE_X else intermediates[source].permute(0, 3, 1, 2)
            need_input = source >= 0 or needs[0]
            d_src, d_weights[i], _ = torch.ops.aten.convolution_backward(
                _image(g, n, gh, gw), src, weight, None, [conv_stride] * 2, [pad_h, pad_w], [1, 1], False, [0, 0], 1,
                [need_input, needs[1], False])
            if source >= 0:
                d_src = _rows(d_src)
                d_inter[source] = d_src if d_inter[source] is None else d_inter[source] + d_src
            elif need_input:
                dx_terms.append(d_src)
    if copy_channel >= 0 and needs[0]:
        _, indices = F.max_pool2d(x, 3, 2, return_indices=True)
        dx_terms.append(torch.ops.aten.max_pool2d_with_indices_backward(
            grad_out[:, copy_channel:copy_channel + c], x, [3, 3], [2, 2], [0, 0], [1, 1], False, indices))
    order = sorted(shared)
    a = w_shared = None
    if order:
        a = torch.cat([shared[i] for i in order], dim=1)  # (M, K0)
        w_shared = torch.cat([weights[i].flatten(1) for i in order])  # (K0, C)
        if needs[1]:
            d_shared = (a.t() @ x_rows).split([weights[i].shape[0] for i in order])
            for i, d in zip(order, d_shared):
                d_weights[i] = d.reshape(weights[i].shape).clone()
    if pool_dx is not None:
        dx_terms.append(_image(pool_dx(a, w_shared), n, h, w))
    elif order and needs[0]:
        dx_terms.append(_image(a @ w_shared, n, h, w))
    dx = None
    if needs[0]:
        dx = sum(dx_terms[1:], dx_terms[0]) if dx_terms else torch.zeros_like(x)
    return [dx] + [g if needs[1] else None for pair in zip(d_weights, d_biases) for g in pair]


@torch.library.custom_op("inception_fast::graph_forward_saving", mutates_args=())
def graph_forward_saving(x: torch.Tensor, b: list[torch.Tensor], bias: list[torch.Tensor],
                         flat_plan: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """graph_forward that also returns its intermediates for the backward: buffer k as the
    kernel keeps it, (N, H + 2 border_k, W + 2 border_k, channels_k) NHWC with a zero border."""
    buf_channels, buf_border, out_channels, stride, gemms = GraphPlan.from_flat(flat_plan)
    out, buffers = require_cpu_extension().inception_graph_forward_saving(
        x, buf_channels, buf_border, gemms, list(b), list(bias), out_channels, stride)
    return out, list(buffers)


@graph_forward_saving.register_fake
def _graph_saving_fake(x, b, bias, flat_plan):
    buf_channels, buf_border, _, _, _ = GraphPlan.from_flat(flat_plan)
    n, _, h, w = x.shape
    return _graph_fake(x, b, bias, flat_plan), [x.new_empty((n, h + 2 * p, w + 2 * p, ch))
                                                 for ch, p in zip(buf_channels, buf_border)]


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
    buf_channels, _, _, _, _ = GraphPlan.from_flat(flat_plan)
    n, _, h, w = x.shape
    return _graph_fake(x, b, bias, flat_plan), [x.new_empty((n, h, w, ch)) for ch in buf_channels]


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
    extension = cpu_extension()
    if x.numel() == 0 or grad_out.numel() == 0:
        grads = [torch.zeros_like(x)] + [torch.zeros(s, dtype=x.dtype, device=x.device)
                                         for wt in weights for s in (wt.shape, wt.shape[:1])]
    elif backend == "triton":
        from . import branch_graph_triton

        grads = branch_graph_triton.graph_backward_triton(grad_out, x, y, list(intermediates), list(weights),
                                                          list(needs), list(backward_plan))
    elif x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and extension is not None:
        grads = extension.inception_graph_backward(grad_out, x, y, list(intermediates), list(weights),
                                                   list(needs), list(backward_plan))
    else:
        grads = graph_backward_reference(grad_out, x, y, list(intermediates), list(weights), list(needs),
                                         list(backward_plan))
    wanted = [needs[0]] + [needs[1]] * (2 * len(weights))
    formats = [torch.channels_last] + [torch.contiguous_format] * (2 * len(weights))
    return [g.contiguous(memory_format=f) if want else x.new_empty(0) for g, want, f in zip(grads, wanted, formats)]


@graph_backward.register_fake
def _graph_backward_fake(grad_out, x, y, intermediates, weights, needs, backward_plan, backend):
    grads = [x.new_empty(x.shape).contiguous(memory_format=torch.channels_last) if needs[0] else x.new_empty(0)]
    for wt in weights:
        grads += [wt.new_empty(wt.shape), wt.new_empty(wt.shape[:1])] if needs[1] else [x.new_empty(0)] * 2
    return grads


def _graph_backward_flops(grad_out_shape, x_shape, y_shape, intermediate_shapes, weight_shapes, needs,
                          backward_plan, backend, out_shape=None, **kwargs) -> int:
    """2 FLOPs per multiply-add, counted as FlopCounterMode counts aten.convolution_backward
    on the unfused block: each convolution's weight gradient when needs[1], and its data
    gradient when its input needs one: always for an intermediate (it depends on weights or
    x that need gradients, or the backward would not run), for x and the pooled x only when
    needs[0]. Each is one forward's worth of multiply-adds of that convolution."""
    _, stride, _, _, table = GraphPlan.from_backward_flat(backward_plan)
    n, _, h, w = x_shape
    out_pixels = n * ((h - 3) // 2 + 1) * ((w - 3) // 2 + 1)
    total = 0
    for (source, *_, conv_stride, _, _), shape in zip(table, weight_shapes):
        macs = (n * h * w if conv_stride == 1 else out_pixels) * shape[0] * shape[1] * shape[2] * shape[3]
        total += macs * (int(bool(needs[1])) + int(source >= 0 or bool(needs[0])))
    return 2 * total


register_flop_formula(torch.ops.inception_fast.graph_backward)(_graph_backward_flops)


class BranchGraphFunction(torch.autograd.Function):
    """The fused branch-graph forward of a backend with the fused backward, over Conv2d-
    layout weights and biases (spec.convs order; folded BN, when the module has one).

    apply(x, backend, flat_plan, backward_plan, packed_b, packed_bias, *weights, *biases):
    backend "cpu" or "triton"; the plan as GraphPlan.flat() and .backward_flat();
    packed_b/packed_bias the forward's layout of the same weights (cached by the caller).
    Saves x, the output, the intermediates and the weights.
    """

    @staticmethod
    def forward(ctx, x, backend: str, flat_plan, backward_plan, packed_b, packed_bias, *params):
        saving = graph_triton_forward_saving if backend == "triton" else graph_forward_saving
        y, buffers = saving(x, list(packed_b), list(packed_bias), flat_plan)
        h, w = x.shape[2], x.shape[3]
        # Each buffer's interior: the C++ kernel's buffers carry a zero border, Triton's none.
        intermediates = [buf[:, (buf.shape[1] - h) // 2:(buf.shape[1] + h) // 2,
                             (buf.shape[2] - w) // 2:(buf.shape[2] + w) // 2] for buf in buffers]
        half = len(params) // 2
        ctx.save_for_backward(x, y, *intermediates, *params[:half])
        ctx.backend, ctx.backward_plan, ctx.buffers = backend, backward_plan, len(buffers)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, y, *rest = ctx.saved_tensors
        intermediates, weights = rest[:ctx.buffers], rest[ctx.buffers:]
        needs = [ctx.needs_input_grad[0], any(ctx.needs_input_grad[6:])]
        grads = graph_backward(grad_out, x, y, intermediates, list(weights), needs, ctx.backward_plan, ctx.backend)
        dx = grads[0] if needs[0] else None
        d_params = (grads[1::2] + grads[2::2]) if needs[1] else [None] * (2 * len(weights))
        return (dx, None, None, None, None, None, *d_params)
