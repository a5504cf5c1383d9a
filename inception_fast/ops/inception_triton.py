"""Triton kernels of the fused Inception forward (GPU), and their host wrapper.

Two launches per module, each storing straight into its channel slices of the
one NHWC output:

1. `_pointwise_kernel`: a grouped GEMM over the M = N*H*W pixel rows. Column
   tiles of the first group compute [1x1 | 3x3 reduce | 5x5 reduce] from x;
   tiles of the second compute the pool projection, whose A tile is the 3x3 max
   of x taken while loading (the pooled tensor never exists in memory).
2. `_spatial_kernel`: implicit-GEMM K3xK3 over t3 and K5xK5 over t5, both in
   one launch; the first programs take the K3 tiles, the rest the K5 tiles.

Accumulation is fp32; fp32 inputs use tf32 tensor cores only when
`torch.backends.cuda.matmul.allow_tf32` allows. Each tile addresses memory from
a 64-bit scalar base at its first pixel plus 32-bit offsets (a tile and a halo
row), so N*H*W*C may pass 2**31 while the loads stay cheap in registers.

Run on CPU tensors under TRITON_INTERPRET=1 (set before importing this module).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._layout import as_gemm_b
from .triton_gemm import (  # noqa: F401  (some re-exported: this module's public names before triton_gemm.py)
    EXACT_FP32_BLOCK_K,
    POINTWISE_CONFIGS,
    SPATIAL_CONFIGS,
    KernelConfig,
    autotune,
    exact_fp32,
    input_precision,
    interpreting,
    kernel_configs,
    launch_options,
    min_fp32_dot_k,
    mma,
    pixel_rows,
    prune_configs,
    tile_gemm,
    window_gemm,
    window_inside,
)
from ..spec import InceptionSpec

__all__ = [
    "FORWARD_KERNELS",
    "kernel_configs",
    "POINTWISE_CONFIGS",
    "SPATIAL_CONFIGS",
    "TritonWeights",
    "interpreting",
    "pack_triton_weights",
    "forward_triton",
]


@triton.jit
def _pointwise_kernel(
    # pointers
    x_ptr,  # (N, H, W, C_in) NHWC input
    w_red_ptr,  # (C_in, c1 + r3 + r5) [W1 | W3r | W5r]^T, row-major
    b_red_ptr,  # (c1 + r3 + r5,)
    w_pool_ptr,  # (C_in, cp) Wp^T, row-major
    b_pool_ptr,  # (cp,)
    out_ptr,  # (N, H, W, c_out) NHWC output: this launch writes [0, c1) and [c_out - cp, c_out)
    t3_ptr,  # (N, H, W, r3) NHWC 3x3 reduction
    t5_ptr,  # (N, H, W, r5) NHWC 5x5 reduction
    # sizes
    M, H, W, C_in, c1, r3, r5, cp, c_out, red_tiles_n,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    # NHWC rows are pixels: a 64-bit scalar base at the tile's first pixel, then 32-bit
    # offsets, which stay small (a tile plus a halo row) however large N*H*W*C grows.
    m0 = pid_m * BLOCK_M
    rows = tl.arange(0, BLOCK_M)
    m_mask = m0 + rows < M
    x_tile = x_ptr + m0.to(tl.int64) * C_in
    out_tile = out_ptr + m0.to(tl.int64) * c_out
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    if pid_n < red_tiles_n:
        # [1x1 | 3x3 reduce | 5x5 reduce] from one pass over x.
        n_red = c1 + r3 + r5
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_red
        acc = tile_gemm(x_tile, w_red_ptr, C_in, n_red, rows, m_mask, offs_n, n_mask,
                         BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION, UPCAST_DOT)
        bias = tl.load(b_red_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        # ReLU that keeps NaN, like torch.relu (a plain maximum would turn NaN into 0).
        y = tl.maximum(acc + bias[None, :], 0.0, propagate_nan=tl.PropagateNan.ALL).to(out_ptr.dtype.element_ty)
        # Each column goes to its own destination: the output slice, t3 or t5.
        col = offs_n[None, :]
        row_ok = m_mask[:, None]
        tl.store(out_tile + rows[:, None] * c_out + col, y, mask=row_ok & (col < c1))
        t3_tile = t3_ptr + m0.to(tl.int64) * r3
        tl.store(t3_tile + rows[:, None] * r3 + (col - c1), y, mask=row_ok & (col >= c1) & (col < c1 + r3))
        t5_tile = t5_ptr + m0.to(tl.int64) * r5
        tl.store(t5_tile + rows[:, None] * r5 + (col - c1 - r3), y, mask=row_ok & (col >= c1 + r3) & (col < n_red))
    else:
        # Pool projection: A is the 3x3/1/1 max of x, taken while loading.
        offs_n = (pid_n - red_tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < cp
        hw = (m0 + rows) % (H * W)
        h = hw // W
        w = hw % W
        for k0 in range(0, C_in, BLOCK_K):
            kk = k0 + offs_k
            k_mask = kk < C_in
            # The max runs in fp32 (exact for every input dtype): -inf padding needs no
            # constant of the input dtype, which the interpreter lacks for bf16.
            a = tl.full((BLOCK_M, BLOCK_K), float("-inf"), tl.float32)
            for dy in tl.static_range(-1, 2):
                for dx in tl.static_range(-1, 2):
                    ok = window_inside(m_mask, h, w, dy, dx, H, W)
                    ok2 = ok[:, None] & k_mask[None, :]
                    v = tl.load(x_tile + (rows + (dy * W + dx))[:, None] * C_in + kk[None, :], mask=ok2)
                    v = tl.where(ok2, v.to(tl.float32), float("-inf"))
                    a = tl.maximum(a, v, propagate_nan=tl.PropagateNan.ALL)  # NaN wins, as in torch
            # Rows past M and channels past C_in stay -inf; zero them so that 0 * -inf
            # cannot put NaN into the product.
            a = tl.where(m_mask[:, None] & k_mask[None, :], a, 0.0).to(x_ptr.dtype.element_ty)
            b = tl.load(w_pool_ptr + kk[:, None] * cp + offs_n[None, :],
                        mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            acc = mma(a, b, acc, INPUT_PRECISION, UPCAST_DOT)
        bias = tl.load(b_pool_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        y = tl.maximum(acc + bias[None, :], 0.0, propagate_nan=tl.PropagateNan.ALL).to(out_ptr.dtype.element_ty)
        tl.store(out_tile + rows[:, None] * c_out + (c_out - cp + offs_n)[None, :], y,
                 mask=m_mask[:, None] & n_mask[None, :])


# Sizes that select between the two problems must not be specialised to constants, or the
# two branches of the selection would yield different types when one of them equals 1.
@triton.jit(do_not_specialize=["r3", "c3", "K3", "r5", "c5", "K5", "c1", "tiles3_m", "tiles3_n", "tiles5_n"])
def _spatial_kernel(
    # pointers
    t3_ptr,  # (N, H, W, r3) NHWC 3x3 reduction
    w3_ptr,  # (K3 * K3 * r3, c3) row (dy * K3 + dx) * r3 + c
    b3_ptr,  # (c3,)
    t5_ptr,  # (N, H, W, r5) NHWC 5x5 reduction
    w5_ptr,  # (K5 * K5 * r5, c5)
    b5_ptr,  # (c5,)
    out_ptr,  # (N, H, W, c_out) NHWC output: this launch writes [c1, c1 + c3 + c5)
    # sizes
    M, H, W, r3, c3, K3, r5, c5, K5, c1, c_out, tiles3_m, tiles3_n, tiles5_n,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    pid = tl.program_id(0)
    tiles3 = tiles3_m * tiles3_n
    if pid < tiles3:
        t_ptr, w_ptr, b_ptr = t3_ptr, w3_ptr, b3_ptr
        r, cout, K, channel, tiles_n, local = r3, c3, K3, c1, tiles3_n, pid
    else:
        t_ptr, w_ptr, b_ptr = t5_ptr, w5_ptr, b5_ptr
        r, cout, K, channel, tiles_n, local = r5, c5, K5, c1 + c3, tiles5_n, pid - tiles3
    pid_m = local // tiles_n
    pid_n = local % tiles_n
    m0, rows, m_mask, h, w = pixel_rows(pid_m, M, H, W, BLOCK_M)
    t_tile = t_ptr + m0.to(tl.int64) * r  # 64-bit scalar base, 32-bit offsets (see above)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < cout
    acc = window_gemm(t_tile, w_ptr, r, cout, K, K, H, W, h, w, rows, m_mask, offs_n, n_mask,
                       BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION, UPCAST_DOT)
    bias = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    y = tl.maximum(acc + bias[None, :], 0.0, propagate_nan=tl.PropagateNan.ALL).to(out_ptr.dtype.element_ty)
    out_tile = out_ptr + m0.to(tl.int64) * c_out + channel
    tl.store(out_tile + rows[:, None] * c_out + offs_n[None, :], y, mask=m_mask[:, None] & n_mask[None, :])


#: kernel kind -> (kernel, autotune list kind), for ahead-of-time checks (tests/test_triton_aot.py)
FORWARD_KERNELS = {"pointwise": (_pointwise_kernel, "pointwise"), "spatial": (_spatial_kernel, "spatial")}


# -- host wrapper ----------------------------------------------------------------


class TritonWeights(NamedTuple):
    """Weights as the Triton kernels read them: row-major B = W^T."""

    w_red: torch.Tensor  # (C_in, c1 + r3 + r5)
    b_red: torch.Tensor  # (c1 + r3 + r5,)
    w3: torch.Tensor  # (K3 * K3 * r3, c3)
    b3: torch.Tensor  # (c3,)
    w5: torch.Tensor  # (K5 * K5 * r5, c5)
    b5: torch.Tensor  # (c5,)
    w_pool: torch.Tensor  # (C_in, cp)
    b_pool: torch.Tensor  # (cp,)


def pack_triton_weights(w) -> TritonWeights:
    """w in the Triton kernels' layout; differentiable (packing is linear) when grad mode is on."""
    return TritonWeights(
        w_red=torch.cat([as_gemm_b(w.w1), as_gemm_b(w.w3r), as_gemm_b(w.w5r)], dim=1).contiguous(),
        b_red=torch.cat([w.b1, w.b3r, w.b5r]).contiguous(),
        w3=as_gemm_b(w.w3).contiguous(),
        b3=w.b3.contiguous(),
        w5=as_gemm_b(w.w5).contiguous(),
        b5=w.b5.contiguous(),
        w_pool=as_gemm_b(w.wp).contiguous(),
        b_pool=w.bp.contiguous(),
    )


def _launch_pointwise(x, tw: TritonWeights, spec: InceptionSpec, out, t3, t5, cfg: KernelConfig):
    n, h, w = x.shape[0], x.shape[2], x.shape[3]
    red_tiles_n = triton.cdiv(spec.reduce_channels, cfg.block_n)
    grid = (triton.cdiv(n * h * w, cfg.block_m), red_tiles_n + triton.cdiv(spec.pool_proj, cfg.block_n))
    _pointwise_kernel[grid](
        x, tw.w_red, tw.b_red, tw.w_pool, tw.b_pool, out, t3, t5,
        n * h * w, h, w, spec.in_channels, spec.ch1x1, spec.ch3x3red, spec.ch5x5red, spec.pool_proj,
        spec.out_channels, red_tiles_n, **launch_options(cfg, x.dtype))


def _launch_spatial(x, tw: TritonWeights, spec: InceptionSpec, out, t3, t5, cfg: KernelConfig):
    n, h, w = x.shape[0], x.shape[2], x.shape[3]
    tiles_m = triton.cdiv(n * h * w, cfg.block_m)
    tiles3_n = triton.cdiv(spec.ch3x3, cfg.block_n)
    tiles5_n = triton.cdiv(spec.ch5x5, cfg.block_n)
    _spatial_kernel[(tiles_m * (tiles3_n + tiles5_n),)](
        t3, tw.w3, tw.b3, t5, tw.w5, tw.b5, out,
        n * h * w, h, w, spec.ch3x3red, spec.ch3x3, spec.k3, spec.ch5x5red, spec.ch5x5, spec.k5,
        spec.ch1x1, spec.out_channels, tiles_m, tiles3_n, tiles5_n, **launch_options(cfg, x.dtype))


def forward_triton(x: torch.Tensor, tw: TritonWeights, spec: InceptionSpec, out: torch.Tensor | None = None) -> torch.Tensor:
    """Checked by the caller (ops/inception.py); allocates and launches (each kernel's
    config autotuned per problem, once, on CUDA)."""
    n, _, h, w = x.shape
    if n * h * w >= 2**31:
        # Pixel indices are 32-bit in the kernels (element offsets are 64-bit).
        raise ValueError(f"x has {n * h * w} pixels (N*H*W); the Triton kernels take fewer than 2**31")
    x = x.contiguous(memory_format=torch.channels_last)
    if out is None:
        out = torch.empty((n, spec.out_channels, h, w), device=x.device, dtype=x.dtype,
                          memory_format=torch.channels_last)
    if out.numel() == 0:
        return out
    t3 = torch.empty((n, h, w, spec.ch3x3red), device=x.device, dtype=x.dtype)
    t5 = torch.empty((n, h, w, spec.ch5x5red), device=x.device, dtype=x.dtype)
    m, exact = n * h * w, exact_fp32(x.dtype)
    problem = (spec, n, h, w)
    # The pointwise launch first: the spatial one's timings read the t3, t5 it writes.
    pointwise = prune_configs(kernel_configs("pointwise", exact), m, spec.reduce_channels)
    cfg = autotune("googlenet_pointwise", problem, x, pointwise,
                   lambda c: _launch_pointwise(x, tw, spec, out, t3, t5, c))
    _launch_pointwise(x, tw, spec, out, t3, t5, cfg)
    spatial = prune_configs(kernel_configs("spatial", exact), m, max(spec.ch3x3, spec.ch5x5))
    cfg = autotune("googlenet_spatial", problem, x, spatial, lambda c: _launch_spatial(x, tw, spec, out, t3, t5, c))
    _launch_spatial(x, tw, spec, out, t3, t5, cfg)
    return out
