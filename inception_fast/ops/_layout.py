"""Weight layouts shared by the kernels of every backend."""

import torch


def as_gemm_b(w: torch.Tensor) -> torch.Tensor:
    """Conv weight (cout, cin, k, k) -> GEMM B (k*k*cin, cout), row index (dy*k + dx)*cin + c.

    The kernels walk K tap by tap and, within a tap, channel by channel: the order in
    which NHWC stores a pixel's channels, so every tap reads contiguous memory.
    """
    return w.permute(2, 3, 1, 0).reshape(-1, w.shape[0])


def from_gemm_b(b: torch.Tensor, k: int) -> torch.Tensor:
    """The inverse of as_gemm_b: GEMM B (k*k*cin, cout) -> conv weight (cout, cin, k, k)."""
    cout = b.shape[1]
    return b.t().reshape(cout, k, k, -1).permute(0, 3, 1, 2).contiguous()


def flipped_gemm_b(w: torch.Tensor) -> torch.Tensor:
    """Conv weight (cout, cin, k, k) -> (k*k*cout, cin), row (dy*k + dx)*cout + co holding
    w[co, :, k-1-dy, k-1-dx]: the B of the data-gradient implicit GEMM (a 'same' padded
    stride-1 convolution's data gradient is the convolution of its output gradient with
    the flipped, transposed weight)."""
    return as_gemm_b(w.flip(2, 3).transpose(0, 1)).contiguous()
