"""A model of the DRAM (HBM) bytes that one Inception forward moves.

Compulsory minimum: read the input and the weights once, write the output once.

Fused (the two Triton launches): each launch moves each tensor it touches across
HBM once, assuming the re-reads of its tiles (the pool halo, the K3/K5 halos, the
column tiles of one row tile) hit L2. Launch 1 reads x and the pointwise weights
and writes the 1x1 and pool slices plus t3 and t5; launch 2 reads t3, t5 and the
spatial weights and writes the 3x3 and 5x5 slices. So fused = minimum + 2 (t3 + t5).

Eager PyTorch: every op reads its inputs and writes its output: six convolutions,
six in-place ReLUs (read + write), the max pool and its pooled tensor, and the
concat that copies all four branch outputs once more.
"""

from __future__ import annotations

from dataclasses import dataclass

from .spec import InceptionSpec

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


def traffic(spec: InceptionSpec, height: int, width: int, batch: int = 1, bytes_per_element: int = 2) -> Traffic:
    """Bytes moved by one forward, by the model in this module's docstring."""
    pixels = batch * height * width
    s = spec

    def act(channels: int) -> int:  # one activation tensor of `channels` channels
        return pixels * channels * bytes_per_element

    weights = s.params().total * bytes_per_element
    x, out = act(s.in_channels), act(s.out_channels)
    minimum = x + weights + out
    fused = minimum + 2 * (act(s.ch3x3red) + act(s.ch5x5red))
    branch_outputs = [s.ch1x1, s.ch3x3red, s.ch3x3, s.ch5x5red, s.ch5x5, s.pool_proj]
    eager = (
        4 * x  # read by three 1x1 convolutions and the max pool
        + weights
        + sum(act(c) for c in branch_outputs)  # each convolution writes its output
        + sum(2 * act(c) for c in branch_outputs)  # each in-place ReLU reads and writes it
        + act(s.ch3x3red) + act(s.ch5x5red)  # the K3 and K5 convolutions read the reductions
        + 2 * act(s.in_channels)  # the pooled tensor: written, then read by the projection
        + act(s.ch1x1 + s.ch3x3 + s.ch5x5 + s.pool_proj) + out  # torch.cat reads all, writes out
    )
    return Traffic(minimum=minimum, fused=fused, eager=eager)
