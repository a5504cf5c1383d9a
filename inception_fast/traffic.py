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
    ho, wo = spec.out_size(height, width)

    def act(channels: int, stride: int = 1) -> int:  # one activation tensor, at its grid
        return batch * (height * width if stride == 1 else ho * wo) * channels * bytes_per_element

    weights = sum((c.kh * c.kw * c.in_channels + 1) * c.out_channels for c in spec.convs) * bytes_per_element
    x, out = act(spec.in_channels), act(spec.out_channels, spec.stride)
    minimum = x + weights + out
    intermediates = [c.out_channels for b in spec.branches for level in b.levels[:-1] for c in level]
    fused = minimum + 2 * sum(act(c) for c in intermediates)
    convs = [c for b in spec.branches for level in b.levels for c in level]
    finals = [(c.out_channels, c.stride) for b in spec.branches for c in b.levels[-1]]
    pooled = act(spec.in_channels, spec.stride)
    eager = (
        weights
        + sum(act(c.in_channels) + 3 * act(c.out_channels, c.stride) for c in convs)  # conv, then in-place ReLU
        + x + pooled  # the pool reads x and writes its output ...
        + (pooled + 3 * act(spec.pool_proj.out_channels) if spec.pool_proj else 0)  # ... which the projection reads
        + sum(act(c, s) for c, s in finals)  # torch.cat reads every branch output ...
        + (act(spec.pool_proj.out_channels) if spec.pool_proj else pooled) + out  # ... and writes out
    )
    return Traffic(minimum=minimum, fused=fused, eager=eager)
