"""The shape of one Inception module, and what it costs.

`InceptionSpec` is the single source of truth for channel counts, kernel sizes,
output slice offsets and the analytic multiply-add and parameter counts. The
kernels, the profiler and the benchmarks all read it, so that a MAC reported in
one place is the same MAC everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import NamedTuple

__all__ = ["InceptionSpec", "BranchCounts", "PaperBlock", "GOOGLENET_INCEPTION"]


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
