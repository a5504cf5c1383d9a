"""The shape of one Inception block, and what it costs.

`BranchGraphSpec` is the one shape the fused op runs: branches of convolution chains over
one input, a pooling branch, concatenated along channels (Inception-v3's InceptionA to E,
and GoogLeNet's module). `InceptionSpec` is GoogLeNet's module in the paper's terms (Table
1 of "Going Deeper with Convolutions": #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool
proj); `InceptionSpec.to_graph()` is its branch graph, the preset the kernels run. The
kernels, the profiler and the benchmarks all read these, so that a MAC reported in one
place is the same MAC everywhere.
"""

from __future__ import annotations

import math

from dataclasses import dataclass, fields
from typing import NamedTuple

__all__ = ["Branch", "BranchCounts", "BranchGraphSpec", "Conv", "GOOGLENET_INCEPTION", "InceptionSpec", "PaperBlock",
           "Residual"]


class BranchCounts(NamedTuple):
    """A count (MACs or parameters) for each convolution of the module."""

    conv1x1: int
    reduce3x3: int
    conv3x3: int
    reduce5x5: int
    conv5x5: int
    pool_proj: int

    @property
    def total(self) -> int:
        return sum(self)


@dataclass(frozen=True)
class InceptionSpec:
    """Channel counts and spatial kernel sizes of one Inception module.

    Field names follow torchvision's ``Inception`` block. ``k3`` and ``k5`` are
    the spatial kernels of the second and third branch: the paper uses 3 and 5,
    torchvision's GoogLeNet uses 3 for both (a known, kept quirk).
    """

    in_channels: int
    ch1x1: int
    ch3x3red: int
    ch3x3: int
    ch5x5red: int
    ch5x5: int
    pool_proj: int
    k3: int = 3
    k5: int = 5

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            # bool is an int subclass; InceptionSpec(True, ...) is a bug, not a channel count.
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(
                    f"InceptionSpec.{f.name} must be an int, got {type(value).__name__} ({value!r})"
                )
            if value < 1:
                raise ValueError(f"InceptionSpec.{f.name} must be >= 1, got {value}")
        for name in ("k3", "k5"):
            k = getattr(self, name)
            if k % 2 == 0:
                raise ValueError(
                    f"InceptionSpec.{name} must be odd so that 'same' padding (k // 2) "
                    f"keeps the spatial size, got {k}"
                )

    # -- output layout -------------------------------------------------------

    @property
    def out_channels(self) -> int:
        return self.ch1x1 + self.ch3x3 + self.ch5x5 + self.pool_proj

    @property
    def reduce_channels(self) -> int:
        """Columns of the horizontally fused pointwise GEMM: [1x1 | 3x3red | 5x5red]."""
        return self.ch1x1 + self.ch3x3red + self.ch5x5red

    @property
    def slice1x1(self) -> slice:
        return slice(0, self.ch1x1)

    @property
    def slice3x3(self) -> slice:
        start = self.ch1x1
        return slice(start, start + self.ch3x3)

    @property
    def slice5x5(self) -> slice:
        start = self.ch1x1 + self.ch3x3
        return slice(start, start + self.ch5x5)

    @property
    def slice_pool(self) -> slice:
        start = self.ch1x1 + self.ch3x3 + self.ch5x5
        return slice(start, start + self.pool_proj)

    @property
    def branch_slices(self) -> tuple[slice, slice, slice, slice]:
        """Output channel slices in concat order [1x1 | 3x3 | 5x5 | pool]."""
        return (self.slice1x1, self.slice3x3, self.slice5x5, self.slice_pool)

    # -- cost ------------------------------------------------------------------

    def macs(self, height: int, width: int, batch: int = 1) -> BranchCounts:
        """Multiply-accumulates of each convolution for an input of batch x H x W.

        Biases, ReLU and max pooling are not MACs (see README, "Conventions").
        """
        _check_positive_size(height=height, width=width)
        if not isinstance(batch, int) or batch < 0:
            raise ValueError(f"batch must be an int >= 0, got {batch!r}")
        pixels = batch * height * width
        cin = self.in_channels
        return BranchCounts(
            conv1x1=pixels * cin * self.ch1x1,
            reduce3x3=pixels * cin * self.ch3x3red,
            conv3x3=pixels * self.k3 * self.k3 * self.ch3x3red * self.ch3x3,
            reduce5x5=pixels * cin * self.ch5x5red,
            conv5x5=pixels * self.k5 * self.k5 * self.ch5x5red * self.ch5x5,
            pool_proj=pixels * cin * self.pool_proj,
        )

    def to_graph(self) -> BranchGraphSpec:
        """This module as a branch graph: [1x1], [1x1, K3xK3], [1x1, K5xK5] and a 3x3/1 max pool
        with a 1x1. Its `convs` are in InceptionWeights' order (w1, w3r, w3, w5r, w5, wp) and
        its output slices in the module's concat order."""
        cin = self.in_channels
        return BranchGraphSpec(cin, (
            Branch(((Conv(cin, self.ch1x1),),)),
            Branch(((Conv(cin, self.ch3x3red),), (Conv(self.ch3x3red, self.ch3x3, self.k3, self.k3),))),
            Branch(((Conv(cin, self.ch5x5red),), (Conv(self.ch5x5red, self.ch5x5, self.k5, self.k5),))),
        ), "max", Conv(cin, self.pool_proj))

    def params(self) -> BranchCounts:
        """Weights plus biases of each convolution (the paper's form, without BN)."""
        cin = self.in_channels
        return BranchCounts(
            conv1x1=(cin + 1) * self.ch1x1,
            reduce3x3=(cin + 1) * self.ch3x3red,
            conv3x3=(self.k3 * self.k3 * self.ch3x3red + 1) * self.ch3x3,
            reduce5x5=(cin + 1) * self.ch5x5red,
            conv5x5=(self.k5 * self.k5 * self.ch5x5red + 1) * self.ch5x5,
            pool_proj=(cin + 1) * self.pool_proj,
        )


# -- the general block: a graph of branches ------------------------------------------


MAX_KERNEL = 31  # the largest kh, kw the C++ kernel takes (csrc/inception_graph_cpu.cpp, kMaxKernel)


def conv_grid(h, w, kh: int, kw: int, stride: int, pad_h: int, pad_w: int):
    """The output grid of a kh x kw convolution over h x w, as F.conv2d's: x's grid for 'same'
    padding at stride 1, smaller unpadded ('valid') or at stride 2. h and w may be SymInts.
    csrc/plan.h's conv_grid is the same rule."""
    return (h + 2 * pad_h - kh) // stride + 1, (w + 2 * pad_w - kw) // stride + 1


@dataclass(frozen=True)
class Conv:
    """One convolution (+ ReLU) of a branch: stride 1 with 'same' zero padding, or without
    padding (padded=False, 'valid': the grid shrinks by kh - 1, kw - 1; it ends its branch,
    as in timm's Mixed4a and Inception-v3's stem), or (ending a grid-reduction branch)
    stride 2 without padding."""

    in_channels: int
    out_channels: int
    kh: int = 1
    kw: int = 1
    stride: int = 1
    padded: bool = True

    def __post_init__(self):
        for name in ("in_channels", "out_channels", "kh", "kw"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"Conv.{name} must be a positive int, got {value!r}")
        if self.kh % 2 == 0 or self.kw % 2 == 0:
            raise ValueError(f"Conv kernel must be odd for 'same' padding, got {self.kh}x{self.kw}")
        if max(self.kh, self.kw) > MAX_KERNEL:
            raise ValueError(f"Conv kernel must be at most {MAX_KERNEL}x{MAX_KERNEL} (the kernels' limit), got "
                             f"{self.kh}x{self.kw}")
        if self.stride not in (1, 2):
            raise ValueError(f"Conv.stride must be 1 or 2, got {self.stride!r}")
        if not isinstance(self.padded, bool) or (self.stride == 2 and not self.padded):
            raise ValueError(f"Conv.padded must be a bool, and True at stride 2 (unpadded anyway), got {self.padded!r}")
        if (self.kh, self.kw) == (1, 1):  # no padding either way: one spelling, so that equal specs compare equal
            object.__setattr__(self, "padded", True)

    @property
    def padding(self) -> tuple[int, int]:
        return (self.kh // 2, self.kw // 2) if self.stride == 1 and self.padded else (0, 0)

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        """Its output grid over an h x w input (conv_grid)."""
        return conv_grid(h, w, self.kh, self.kw, self.stride, *self.padding)

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
class Residual:
    """Inception-ResNet's tail after the concat (Szegedy et al. 2016, "Inception-v4,
    Inception-ResNet and the Impact of Residual Connections"; timm's Block35, Block17 and
    Block8): out = act(x + scale * (W @ concat + b)), W a 1x1 convolution (with bias) from the
    concat's channels back to x's, act ReLU or, for the last Block8, none."""

    conv: Conv
    scale: float = 1.0
    relu: bool = True


@dataclass(frozen=True)
class BranchGraphSpec:
    """stride 1: same-grid branches and a pool branch with a 1x1 (InceptionA, C, E), or no
    pool branch (pool=None: Inception-ResNet's Block35, 17 and 8 before their residual tail).
    stride 2, a grid reduction (InceptionB, D): every branch ends in 3x3 stride-2 unpadded
    convolutions (a branch may be that one convolution over x), and the pool branch is a
    3x3 stride-2 max pool without projection, or none (a stem's lone stride-2 convolution);
    the output grid is (H - 3) // 2 + 1. Unpadded at stride 1 (timm's Mixed4a): every
    branch ends in kh x kw convolutions of one size without padding ('valid'), no pool
    branch; the output grid is (H - kh + 1, W - kw + 1).

    A branch of one level may be any one convolution over x (a grid reduction's, an
    unpadded one, or a K x K with 'same' padding: Inception-v3's stem convolutions, each a
    block of its own); a longer branch starts with one 1x1 over x.

    The output concatenates the branches in order with the pool branch at `pool_index`
    among them (None, or len(branches): last, as torchvision's blocks; timm's Inception-v4
    stem blocks put it first). Only the output's channel layout depends on it: spec.convs
    keeps the pool projection last."""

    in_channels: int
    branches: tuple[Branch, ...]
    pool: str | None  # "avg" or "max"; 3x3, padding 1 at stride 1, none at 2. None: no pool branch
    pool_proj: Conv | None
    stride: int = 1
    count_include_pad: bool = True  # of the "avg" pool, as F.avg_pool2d's (pytorch-fid's blocks: False)
    pool_index: int | None = None  # the pool branch's place in the concat; None (or len(branches)): last
    residual: Residual | None = None  # a tail after the concat: the block's output is act(x + scale * 1x1(concat))

    def __post_init__(self):
        if self.pool_index is not None:
            if not isinstance(self.pool_index, int) or isinstance(self.pool_index, bool) \
                    or not 0 <= self.pool_index <= len(self.branches):
                raise ValueError(f"pool_index must be None or an int in [0, {len(self.branches)}], "
                                 f"got {self.pool_index!r}")
            if self.pool_index == len(self.branches):  # last: one spelling, so that equal graphs compare equal
                object.__setattr__(self, "pool_index", None)
        if self.pool not in ("avg", "max", None):
            raise ValueError(f"pool must be 'avg', 'max' or None, got {self.pool!r}")
        if self.pool is None and (self.pool_proj is not None or self.pool_index is not None
                                  or self.count_include_pad is not True):
            raise ValueError("pool=None (no pool branch) takes no pool_proj, pool_index or count_include_pad")
        if self.pool is None and not self.branches:
            raise ValueError("a branch graph without a pool branch needs at least one branch")
        if not isinstance(self.count_include_pad, bool) or (self.pool == "max" and not self.count_include_pad):
            raise ValueError(f"count_include_pad must be a bool, and True for a max pool, got {self.count_include_pad!r}")
        if self.stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {self.stride!r}")
        if self.stride == 2 and (self.pool not in ("max", None) or self.pool_proj is not None):
            raise ValueError("a stride-2 block's pool branch, if any, is a max pool without projection")
        if self.stride == 1 and self.pool is not None and (
                self.pool_proj is None or self.pool_proj.in_channels != self.in_channels
                                 or (self.pool_proj.kh, self.pool_proj.kw, self.pool_proj.stride) != (1, 1, 1)):
            raise ValueError(f"pool_proj must be a 1x1 over {self.in_channels} channels, got {self.pool_proj}")
        if self.residual is not None:
            r = self.residual
            if not isinstance(r, Residual) or self.stride != 1 or (r.conv.kh, r.conv.kw, r.conv.stride) != (1, 1, 1) \
                    or r.conv.in_channels != self.concat_channels or r.conv.out_channels != self.in_channels \
                    or not isinstance(r.relu, bool) or not math.isfinite(float(r.scale)):
                raise ValueError(f"residual must be a Residual whose 1x1 maps the concat's {self.concat_channels} "
                                 f"channels back to x's {self.in_channels}, with a finite scale, in a stride-1 "
                                 f"block; got {r}")
        valid = self.valid_kernel
        if valid is not None and (self.stride != 1 or self.pool is not None or self.residual is not None):
            raise ValueError("a block with unpadded stride-1 convolutions has stride 1, no pool branch and no "
                             "residual tail")
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
                    if valid is not None and last and (conv.padded or (conv.kh, conv.kw) != valid):
                        raise ValueError(f"branch {i}, level {j}: in a block of unpadded convolutions every branch "
                                         f"ends in unpadded {valid[0]}x{valid[1]} ones, got {conv}")
                    if not conv.padded and not last:
                        raise ValueError(f"branch {i}, level {j}: an unpadded convolution ends its branch, got {conv}")
            first = branch.levels[0]
            direct = len(branch.levels) == 1 and len(first) == 1  # one convolution over x
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
    def valid_kernel(self) -> tuple[int, int] | None:
        """(kh, kw) of the block's unpadded stride-1 convolutions, or None: it has none."""
        sizes = {(c.kh, c.kw) for b in self.branches for level in b.levels for c in level if not c.padded}
        return min(sizes) if sizes else None

    @property
    def convs(self) -> tuple[Conv, ...]:
        """Every convolution in weight order: branch by branch, level by level, then pool_proj,
        then the residual tail's 1x1 (which the plan leaves out: it runs after the fused op)."""
        convs = tuple(c for b in self.branches for level in b.levels for c in level)
        return (convs + ((self.pool_proj,) if self.pool_proj is not None else ())
                + ((self.residual.conv,) if self.residual is not None else ()))

    @property
    def pool_channels(self) -> int:
        """Output channels of the pool branch: its projection's, x's for the bare max pool, 0
        without one."""
        if self.pool is None:
            return 0
        return self.pool_proj.out_channels if self.pool_proj is not None else self.in_channels

    @property
    def concat_channels(self) -> int:
        """Channels of the concat: the fused op's output."""
        return sum(b.out_channels for b in self.branches) + self.pool_channels

    @property
    def out_channels(self) -> int:
        """Channels of the block's output: the concat's, or x's after a residual tail."""
        return self.in_channels if self.residual is not None else self.concat_channels

    def out_offsets(self) -> tuple[tuple[int, ...], int]:
        """(first output channel of each branch, first output channel of the pool branch), in
        concat order: the branches in order, the pool branch at pool_index."""
        at = len(self.branches) if self.pool_index is None else self.pool_index
        offsets, channel, pool_offset = [], 0, None
        for i, branch in enumerate(self.branches):
            if i == at:
                pool_offset, channel = channel, channel + self.pool_channels
            offsets.append(channel)
            channel += branch.out_channels
        return tuple(offsets), (channel if pool_offset is None else pool_offset)

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        """The output grid over an h x w input."""
        if self.stride == 2:
            return (h - 3) // 2 + 1, (w - 3) // 2 + 1
        valid = self.valid_kernel
        return (h, w) if valid is None else (h - valid[0] + 1, w - valid[1] + 1)

    def macs(self, h: int, w: int, batch: int = 1) -> int:
        """Multiply-accumulates of every convolution for a batch x H x W input."""
        return sum(self.macs_by_conv(h, w, batch).values())

    def macs_by_conv(self, h: int, w: int, batch: int = 1) -> dict[str, int]:
        """MACs of each convolution, spec.convs order, labelled "branch i.j: kh×kw" (branch i,
        level j, [k] within a fan-out) and "pool proj" (the profiler's per-branch rows)."""
        pixels = lambda c: batch * math.prod(c.out_size(h, w))  # noqa: E731
        out: dict[str, int] = {}
        for i, branch in enumerate(self.branches):
            for j, level in enumerate(branch.levels):
                for k, c in enumerate(level):
                    fan = f"[{k}]" if len(level) > 1 else ""
                    stride = "/2" if c.stride == 2 else "" if c.padded else " valid"
                    out[f"branch {i + 1}.{j + 1}{fan}: {c.kh}×{c.kw}{stride}"] = c.macs_per_pixel() * pixels(c)
        if self.pool_proj is not None:
            out["pool proj"] = self.pool_proj.macs_per_pixel() * pixels(self.pool_proj)
        if self.residual is not None:
            out["residual 1×1"] = self.residual.conv.macs_per_pixel() * pixels(self.residual.conv)
        return out


def _check_positive_size(**sizes: int) -> None:
    for name, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")


@dataclass(frozen=True)
class PaperBlock:
    """One row of the paper's Table 1: an Inception module and its input grid."""

    name: str
    spec: InceptionSpec
    size: int  # input (and output) height == width

    @property
    def input_shape_per_image(self) -> tuple[int, int, int]:
        return (self.spec.in_channels, self.size, self.size)


def _paper_table() -> dict[str, PaperBlock]:
    # in, #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj, H=W
    rows = {
        "3a": (192, 64, 96, 128, 16, 32, 32, 28),
        "3b": (256, 128, 128, 192, 32, 96, 64, 28),
        "4a": (480, 192, 96, 208, 16, 48, 64, 14),
        "4b": (512, 160, 112, 224, 24, 64, 64, 14),
        "4c": (512, 128, 128, 256, 24, 64, 64, 14),
        "4d": (512, 112, 144, 288, 32, 64, 64, 14),
        "4e": (528, 256, 160, 320, 32, 128, 128, 14),
        "5a": (832, 256, 160, 320, 32, 128, 128, 7),
        "5b": (832, 384, 192, 384, 48, 128, 128, 7),
    }
    return {
        name: PaperBlock(name, InceptionSpec(*row[:7]), size=row[7]) for name, row in rows.items()
    }


#: The nine Inception modules of GoogLeNet ("Going Deeper with Convolutions", Table 1).
GOOGLENET_INCEPTION: dict[str, PaperBlock] = _paper_table()
