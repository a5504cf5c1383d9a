"""A model of the DRAM (HBM) bytes that one Inception forward moves.

Compulsory minimum: read the input and the weights once, write the output once.

Fused (the Triton kernels: one grouped launch per stage of the plan): each launch moves
each tensor it touches across HBM once, assuming the re-reads of its tiles (the pool
halo, the K x K halos, the column tiles of one row tile) hit L2. Stage 0 reads x and
writes the slices and intermediates of its GEMMs; every later stage reads the
intermediates of the one before. So fused = minimum + 2 x (every intermediate): for
GoogLeNet's module, minimum + 2 (t3 + t5).

Eager PyTorch (the module without BN, as the paper's): every convolution reads its input
and writes its output, every in-place ReLU reads and writes it again, the pool reads x and
writes the pooled tensor, which its projection reads, and the concat copies every branch
output once more.
"""

from __future__ import annotations

from dataclasses import dataclass

from .spec import BranchGraphSpec, InceptionSpec

__all__ = ["Traffic", "traffic"]


@dataclass(frozen=True)
class Traffic:
    minimum: int
    fused: int
    eager: int

    @property
    def fused_ratio(self) -> float:
        return self.fused / self.minimum

    @property
    def eager_ratio(self) -> float:
        return self.eager / self.minimum


def traffic(spec: InceptionSpec | BranchGraphSpec, height: int, width: int, batch: int = 1,
            bytes_per_element: int = 2) -> Traffic:
    """Bytes moved by one forward, by the model in this module's docstring (units: bytes;
    bytes_per_element 2 for fp16/bf16, 4 for fp32). Raises TypeError for another spec."""
    if isinstance(spec, InceptionSpec):
        spec = spec.to_graph()
    if not isinstance(spec, BranchGraphSpec):
        raise TypeError(f"spec must be an InceptionSpec or a BranchGraphSpec, got {type(spec).__name__}")
    out_grid = spec.out_size(height, width)

    def act(channels: int, grid: tuple[int, int] = (height, width)) -> int:  # one activation tensor, at its grid
        return batch * grid[0] * grid[1] * channels * bytes_per_element

    weights = sum((c.kh * c.kw * c.in_channels + 1) * c.out_channels for c in spec.convs) * bytes_per_element
    x, out = act(spec.in_channels), act(spec.out_channels, out_grid)
    minimum = x + weights + out
    intermediates = [c.out_channels for b in spec.branches for level in b.levels[:-1] for c in level]
    fused = minimum + 2 * sum(act(c) for c in intermediates)
    convs = [c for b in spec.branches for level in b.levels for c in level]
    # Each convolution's output at its own grid (x's, or smaller: stride 2 or unpadded).
    finals = [act(c.out_channels, c.out_size(height, width)) for b in spec.branches for c in b.levels[-1]]
    proj = spec.pool_proj
    pool, pool_out = 0, 0
    if spec.pool is not None:
        pooled = act(spec.in_channels, out_grid)
        pool = x + pooled + (pooled + 3 * act(proj.out_channels) if proj else 0)  # pool reads x, writes; the 1x1 reads
        pool_out = act(proj.out_channels) if proj else pooled
    parts = len(finals) + (spec.pool is not None)
    eager = (
        weights
        + sum(act(c.in_channels) + 3 * act(c.out_channels, c.out_size(height, width)) for c in convs)  # conv, ReLU
        + pool
        # torch.cat reads every branch output and writes out; a lone convolution has no concat
        + (sum(finals) + pool_out + out if parts > 1 else 0)
    )
    return Traffic(minimum=minimum, fused=fused, eager=eager)
