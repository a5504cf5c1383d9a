"""The schedule of a branch-graph block: which GEMMs run, in which stage, reading what and
writing where. One plan drives the C++ kernels, the Triton kernels and the backward walk.

Stage 0 reads x: every 1x1 convolution that starts a branch joins one GEMM over x
(horizontal fusion); the pooling branch's 1x1 is a GEMM over pooled rows of x made on the
fly; any other convolution straight over x (a grid reduction's stride-2 one, a stem's
K x K) is a GEMM of its own. Stage
i runs level i of every branch over the intermediates of level i-1. Each GEMM's columns
are cut into segments, each stored (through bias + ReLU) into a channel slice of the
output or of an intermediate buffer: there is no concat.

The plan crosses into C++ as flat int lists (`GraphPlan.flat`, `GraphPlan.backward_flat`):
custom op arguments cannot be dataclasses. csrc/plan.h mirrors the codes and record sizes
below; tests/test_plan.py keeps the two in step.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple

from ..spec import BranchGraphSpec, Conv, conv_grid

__all__ = ["CONV_RECORD", "GEMM_HEAD", "SEGMENT_FIELDS", "ConvStep", "Destination", "GemmStep", "GraphPlan",
           "Segment", "Source", "conv_grid", "plan", "plan_with_residual"]


class Source(IntEnum):
    """What a GEMM reads as its A rows; a value k >= 0 is intermediate buffer k."""

    X = -1  # the block's input
    AVG_POOL = -2  # x's 3x3/1 average pool, count_include_pad=True, made while loading
    MAX_POOL = -3  # x's 3x3/1 max pool, made while loading
    MAX_POOL_COPY = -4  # x's 3x3/2 max pool copied into one output slice: no weights
    AVG_POOL_EXCLUDE_PAD = -5  # x's 3x3/1 average pool, count_include_pad=False, made while loading

    @property
    def pooled(self) -> bool:
        """A 1x1 over rows of x pooled while loading: the pooling branch's projection."""
        return self in (Source.AVG_POOL, Source.MAX_POOL, Source.AVG_POOL_EXCLUDE_PAD)


class Destination(IntEnum):
    """Where a segment of GEMM columns is stored; a value k >= 0 is intermediate buffer k."""

    OUT = -1
    # The output through Inception-ResNet's tail epilogue, act(x + sum + bias) with x read at
    # the same pixel and channel: act the identity, or ReLU (plan_with_residual; forward only).
    OUT_RESIDUAL = -2
    OUT_RESIDUAL_RELU = -3


GEMM_HEAD = 9  # (stage, source, kh, kw, stride, pad_h, pad_w, cols, segments)
SEGMENT_FIELDS = 4  # (begin, end, destination, channel)
CONV_RECORD = 8  # (source, destination, channel, kh, kw, stride, pad_h, pad_w)


class Segment(NamedTuple):
    """GEMM columns [begin, end) go to channels [channel, channel + end - begin) of `destination`."""

    begin: int
    end: int
    destination: int
    channel: int


class GemmStep(NamedTuple):
    """One implicit GEMM: rows are pixels of its grid (conv_grid: the output grid when it
    shrinks, stride 2 or unpadded), K runs over kh x kw taps of `source` (padding by a zero
    border or masks)."""

    stage: int
    source: int
    kh: int
    kw: int
    stride: int
    pad_h: int
    pad_w: int
    cols: int
    segments: tuple[Segment, ...]
    convs: tuple[int, ...]  # the plan's convolutions in its column blocks, in column order

    def flat(self) -> list[int]:
        return [int(v) for v in (*self[:8], len(self.segments), *(v for s in self.segments for v in s))]

    @property
    def winograd_tile(self) -> tuple[int, int] | None:
        """The output tile (rows, columns) with which the fp32 CPU kernel can run this GEMM as
        Winograd's minimal filtering, or None: a stride-1 convolution over a zero-bordered
        buffer or x (bordered by the kernel when padded), 3x3 with padding 1 or none
        (F(2x2, 3x3), 2x2 tiles; packed for F(4x4, 3x3) instead, 4x4: backend.winograd_3x3_tile
        says which by the grid), 5x5 with padding 2 or none (F(2x2, 5x5), 2x2 tiles), 1x7
        with padding (0, 3) or 7x1 with padding (3, 0) (F(2, 7), 1x2 or 2x1 tiles), 1x3 with
        padding (0, 1) or 3x1 with padding (1, 0) (F(2, 3), 1x2 or 2x1 tiles).
        csrc/winograd.h, kind_of()."""
        if self.source < Source.X or self.stride != 1:
            return None
        return {(3, 3, 1, 1): (2, 2), (3, 3, 0, 0): (2, 2), (5, 5, 2, 2): (2, 2), (5, 5, 0, 0): (2, 2),
                (1, 7, 0, 3): (1, 2), (7, 1, 3, 0): (2, 1),
                (1, 3, 0, 1): (1, 2), (3, 1, 1, 0): (2, 1)}.get(
            (self.kh, self.kw, self.pad_h, self.pad_w))

    def grid(self, h, w):
        """The (rows, columns) of pixels this GEMM runs over, for an h x w input (conv_grid)."""
        return conv_grid(h, w, self.kh, self.kw, self.stride, self.pad_h, self.pad_w)

    @property
    def winograd(self) -> bool:
        """Whether the fp32 CPU kernel can run this GEMM as Winograd's (winograd_tile)."""
        return self.winograd_tile is not None


class ConvStep(NamedTuple):
    """One convolution as the backward walks it: where it reads and where its output went."""

    source: int
    destination: int
    channel: int
    kh: int
    kw: int
    stride: int
    pad_h: int
    pad_w: int

    def flat(self) -> list[int]:
        return [int(v) for v in self]

    def grid(self, h, w):
        """Its output grid over an h x w input (conv_grid)."""
        return conv_grid(h, w, self.kh, self.kw, self.stride, self.pad_h, self.pad_w)

    @property
    def over_x_1x1(self) -> bool:
        """A stride-1 1x1 over x: a column block of the stage-0 GEMM (and of the backward's
        shared-x GEMMs)."""
        return self.source == Source.X and (self.kh, self.kw, self.stride) == (1, 1, 1)


@dataclass(frozen=True)
class GraphPlan:
    buf_channels: tuple[int, ...]  # intermediate k: (N, H + 2 border, W + 2 border, channels) NHWC
    buf_border: tuple[int, ...]  # zero border of each, for the C++ kernels' unmasked taps
    gemms: tuple[GemmStep, ...]
    convs: tuple[ConvStep, ...]  # in spec.convs order (from plan()), or in GEMM column order (from_flat)
    out_channels: int
    stride: int
    pool_copy_channel: int  # the output channel where a grid reduction's max pool goes, -1 if none
    # x's channels: the kernels check x against it (a 3x3 over x packed for Winograd for 9
    # channels has as many rows as one packed direct for 25: without it, no check could tell).
    in_channels: int

    def out_size(self, h, w):
        """The output grid over an h x w input: that of the GEMMs that write the output (every
        one the same, as the C++ kernel checks; a grid reduction's max-pool copy is one)."""
        for g in self.gemms:
            if any(s.destination < 0 for s in g.segments):
                return g.grid(h, w)
        raise ValueError("the plan writes no output")

    def flat(self) -> list[int]:
        """The forward's wire format: counts, then the fields in order, x's channel count last."""
        flat = [len(self.buf_channels), *self.buf_channels, *self.buf_border, self.out_channels, self.stride,
                len(self.gemms)]
        for g in self.gemms:
            step = g.flat()
            flat += [len(step), *step]
        return flat + [self.in_channels]

    @classmethod
    def from_flat(cls, flat: list[int]) -> GraphPlan:
        """The plan of a `flat()` list. The wire format does not carry spec order: `convs` come
        out in GEMM column order, one per segment of every GEMM with weights, and each GEMM's
        `convs` index that order."""
        n = flat[0]
        buf_channels, buf_border = tuple(flat[1:1 + n]), tuple(flat[1 + n:1 + 2 * n])
        out_channels, stride, count = flat[1 + 2 * n], flat[2 + 2 * n], flat[3 + 2 * n]
        gemms, convs, copy_channel, i = [], [], -1, 4 + 2 * n
        for _ in range(count):
            head = list(flat[i + 1:i + 1 + GEMM_HEAD])
            seg = flat[i + 1 + GEMM_HEAD:i + 1 + flat[i]]
            segments = tuple(Segment(*seg[j:j + SEGMENT_FIELDS]) for j in range(0, len(seg), SEGMENT_FIELDS))
            i += 1 + flat[i]
            stage, source, kh, kw, g_stride, pad_h, pad_w, cols, _ = head
            if source == Source.MAX_POOL_COPY:
                copy_channel, indices = segments[0].channel, ()
            else:
                indices = tuple(range(len(convs), len(convs) + len(segments)))
                convs += [ConvStep(source, s.destination, s.channel, kh, kw, g_stride, pad_h, pad_w) for s in segments]
            gemms.append(GemmStep(stage, source, kh, kw, g_stride, pad_h, pad_w, cols, segments, indices))
        return cls(buf_channels, buf_border, tuple(gemms), tuple(convs), out_channels, stride, copy_channel, flat[i])

    def validate(self) -> GraphPlan:
        """Raise ValueError unless this plan is one the kernels may run, as the C++ kernel's
        parser checks a flat list (csrc/inception_graph_cpu.cpp, parse_flat_plan): every
        GEMM's segments cover its columns in order, each into channels its destination has;
        every channel of the output and of each buffer written exactly once; the output
        written at the block's stride; each buffer read only in a later stage than every
        GEMM writing it (the C++ parser also checks the buffers' zero borders, which the
        Triton kernels do without). The Triton host runs it once per plan: a plan from a
        flat list of any origin must raise there, never launch a kernel that writes past a
        tensor or returns memory nothing wrote. Returns self."""
        def fail(why: str):
            raise ValueError(f"flat_plan: {why}")

        if self.stride not in (1, 2):
            fail(f"stride must be 1 or 2, got {self.stride}")
        if min((self.out_channels, self.in_channels, *self.buf_channels), default=1) < 1:
            fail("channel counts must be positive")
        written = {k: [0] * c for k, c in
                   ((Destination.OUT, self.out_channels), *enumerate(self.buf_channels))}
        last_write = [-1] * len(self.buf_channels)
        for i, g in enumerate(self.gemms):
            if not (Source.AVG_POOL_EXCLUDE_PAD <= g.source < len(self.buf_channels)) or g.stride not in (1, 2) or not (
                    0 <= g.pad_h < g.kh and 0 <= g.pad_w < g.kw) or g.cols < 1:
                fail(f"GEMM {i} ({g.kh}x{g.kw}/{g.stride}, padding ({g.pad_h}, {g.pad_w}), source {g.source}, "
                     f"{g.cols} columns) is out of range")
            end = 0
            for s in g.segments:
                dest = Destination.OUT if s.destination < Destination.OUT else s.destination
                if s.begin != end or not s.begin < s.end <= g.cols or not (
                        Destination.OUT_RESIDUAL_RELU <= s.destination < len(self.buf_channels)) or s.channel < 0:
                    fail(f"bad segment {tuple(s)} of GEMM {i} ({g.cols} columns)")
                if dest == Destination.OUT and g.stride != self.stride:
                    fail(f"GEMM {i} writes the output at stride {g.stride} in a stride-{self.stride} block")
                if dest != Destination.OUT and g.stride != 1:
                    fail(f"GEMM {i}, stride {g.stride}, must write the output")
                channels = written[dest]
                if s.channel + s.end - s.begin > len(channels):
                    fail(f"GEMM {i} writes past the {len(channels)} channels of its destination {int(dest)}")
                for c in range(s.channel, s.channel + s.end - s.begin):
                    channels[c] += 1
                if dest >= 0:
                    last_write[dest] = max(last_write[dest], g.stage)
                end = s.end
            if end != g.cols:
                fail(f"the segments of GEMM {i} must cover its {g.cols} columns")
        for dest, channels in written.items():
            if any(n != 1 for n in channels):
                c = next(c for c, n in enumerate(channels) if n != 1)
                fail(f"channel {c} of {'the output' if dest == Destination.OUT else f'buffer {dest}'} is written "
                     f"{channels[c]} times, not once")
        for i, g in enumerate(self.gemms):
            if g.source >= 0 and g.stage <= last_write[g.source]:
                fail(f"GEMM {i} (stage {g.stage}) reads buffer {g.source} before stage {last_write[g.source]} "
                     "has written it")
        return self

    def backward_flat(self) -> list[int]:
        """The backward's wire format: per convolution, where it reads and writes."""
        return [self.out_channels, self.stride, self.pool_copy_channel, len(self.buf_channels), *self.buf_channels,
                len(self.convs), *(v for c in self.convs for v in c.flat())]

    @staticmethod
    def from_backward_flat(flat: list[int]) -> tuple[int, int, int, list[int], list[ConvStep]]:
        """(out_channels, stride, pool_copy_channel, buf_channels, convs) of backward_flat()."""
        out_channels, stride, copy_channel, n = flat[:4]
        buf_channels = list(flat[4:4 + n])
        count, table = flat[4 + n], flat[5 + n:]
        if len(table) != count * CONV_RECORD:
            raise ValueError(f"a backward plan of {count} convolutions needs {count * CONV_RECORD} values, "
                             f"got {len(table)}")
        return out_channels, stride, copy_channel, buf_channels, [
            ConvStep(*table[i:i + CONV_RECORD]) for i in range(0, len(table), CONV_RECORD)]

    def reductions(self) -> dict[int, int]:
        """Buffer -> the convolution that fills it, for buffers made by a 1x1 over x: the
        stage-0 reductions, which the backward can recompute from x with one GEMM instead
        of saving them."""
        return {c.destination: i for i, c in enumerate(self.convs) if c.over_x_1x1 and c.destination >= 0}


def plan(spec: BranchGraphSpec) -> GraphPlan:
    """The stages of GEMMs that compute `spec`, each storing into the output or a buffer."""
    index = 0  # into spec.convs
    buf_channels: list[int] = []
    buf_consumers: list[list[Conv]] = []
    stage0_cols, stage0_convs, stage0_segments = 0, [], []
    # (stage, source, conv, conv index, segment): every GEMM but the fused stage-0 one
    single: list[tuple[int, int, Conv, int, Segment]] = []
    branch_offsets, pool_offset = spec.out_offsets()  # output channels in concat order
    convs: list[ConvStep] = []
    for branch, out_offset in zip(spec.branches, branch_offsets):
        previous = None  # the buffer holding the previous level's output
        for level_index, level in enumerate(branch.levels):
            last = level_index == len(branch.levels) - 1
            for conv in level:
                if last:
                    destination, channel = Destination.OUT, out_offset
                    out_offset += conv.out_channels
                else:
                    buf_channels.append(conv.out_channels)
                    buf_consumers.append([])
                    destination, channel = len(buf_channels) - 1, 0
                source = Source.X if level_index == 0 else previous
                convs.append(ConvStep(int(source), int(destination), channel, conv.kh, conv.kw, conv.stride,
                                      *conv.padding))
                if convs[-1].over_x_1x1:
                    stage0_segments.append(Segment(stage0_cols, stage0_cols + conv.out_channels, int(destination),
                                                   channel))
                    stage0_cols += conv.out_channels
                    stage0_convs.append(index)
                else:  # a K x K (or a grid reduction's stride-2 conv straight over x)
                    if level_index > 0:
                        buf_consumers[previous].append(conv)
                    single.append((level_index, int(source), conv, index,
                                   Segment(0, conv.out_channels, int(destination), channel)))
                index += 1
            if not last:
                previous = len(buf_channels) - 1
    gemms: list[GemmStep] = []
    if stage0_segments:
        gemms.append(GemmStep(0, Source.X, 1, 1, 1, 0, 0, stage0_cols, tuple(stage0_segments), tuple(stage0_convs)))
    for stage, source, conv, conv_i, segment in single:
        gemms.append(GemmStep(stage, source, conv.kh, conv.kw, conv.stride, *conv.padding, conv.out_channels,
                              (segment,), (conv_i,)))
    copy_channel = -1
    if spec.pool_proj is not None:
        cp = spec.pool_proj.out_channels
        source = (Source.MAX_POOL if spec.pool == "max" else Source.AVG_POOL if spec.count_include_pad
                  else Source.AVG_POOL_EXCLUDE_PAD)
        gemms.append(GemmStep(0, source, 1, 1, 1, 0, 0, cp, (Segment(0, cp, Destination.OUT, pool_offset),), (index,)))
        convs.append(ConvStep(int(source), int(Destination.OUT), pool_offset, 1, 1, 1, 0, 0))
    elif spec.pool is not None:  # the grid reduction's max pool, copied into its slice: no weights
        c = spec.in_channels
        gemms.append(GemmStep(0, Source.MAX_POOL_COPY, 3, 3, 2, 0, 0, c, (Segment(0, c, Destination.OUT, pool_offset),),
                              ()))
        copy_channel = pool_offset
    border = tuple(max((max(c.padding) for c in consumers), default=0) for consumers in buf_consumers)
    return GraphPlan(tuple(buf_channels), border, tuple(gemms), tuple(convs), spec.concat_channels, spec.stride,
                     copy_channel, spec.in_channels)


def plan_with_residual(spec: BranchGraphSpec) -> GraphPlan:
    """plan(spec) with Inception-ResNet's tail (spec.residual) as its last GEMM, for the
    forward kernels (C++ and Triton): the branches store into one more buffer, the concat
    (border 0), instead of the output, and a 1x1 GEMM over it stores act(x + sum + bias)
    into the output through the residual epilogue (Destination.OUT_RESIDUAL*). Its convs
    end with the tail's 1x1, whose packed weight and bias must carry the tail's scale:
    scale * (W @ concat + b).

    On the CPU, in the image-major schedule, a group of images' concat is written and read
    by one thread, stage after stage, so it stays in that thread's cache. On Triton the
    tail is the last stage's launch: the concat is written once and read once (by then
    partly in L2), and the tail's output, x and the activation never make a pass of their
    own. The backward does not take this plan (it raises). Raises ValueError for a spec
    without a residual tail.
    """
    if spec.residual is None or spec.stride != 1:
        raise ValueError(f"plan_with_residual needs a stride-1 spec with a residual tail, got {spec!r}")
    base = plan(spec)
    concat = len(base.buf_channels)

    def into_concat(step):
        return step._replace(destination=concat) if step.destination == Destination.OUT else step

    gemms = [g._replace(segments=tuple(into_concat(s) for s in g.segments)) for g in base.gemms]
    convs = [into_concat(c) for c in base.convs]
    out = Destination.OUT_RESIDUAL_RELU if spec.residual.relu else Destination.OUT_RESIDUAL
    c = spec.in_channels
    gemms.append(GemmStep(max(g.stage for g in gemms) + 1, concat, 1, 1, 1, 0, 0, c, (Segment(0, c, int(out), 0),),
                          (len(convs),)))
    convs.append(ConvStep(concat, int(out), 0, 1, 1, 1, 0, 0))
    return GraphPlan((*base.buf_channels, spec.concat_channels), (*base.buf_border, 0), tuple(gemms), tuple(convs),
                     c, 1, -1, c)
