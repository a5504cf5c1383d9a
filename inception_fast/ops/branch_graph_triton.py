"""Triton kernels of the branch-graph op (Inception-v3's InceptionA to E, GoogLeNet's block)
on GPUs: forward, and the backward's data gradients and fused max-pool gradient.

Forward: the C++ kernel's schedule (`branch_graph.plan`), ONE LAUNCH PER STAGE. A stage's
GEMMs are independent (each reads x or an intermediate an earlier stage wrote), so
`_graph_stage_kernel` runs up to MAX_STAGE_GEMMS of them as one grouped launch: the 1-D
grid is partitioned by program id, slot 0's tiles first, then slot 1's, and so on (as the
GoogLeNet kernels' `_pointwise_kernel` and `_spatial_kernel` do with two). Each slot is a
compile-time kind:
- WINDOW: an implicit GEMM over an NHWC source with a stride-1 kh x kw window ('same'
  zero padding by masks): the stage-0 1x1s over x, and every K x K, 1 x n, n x 1;
- AVG_POOL / MAX_POOL / AVG_POOL_EXCLUDE_PAD: a 1x1 whose A tile is the 3x3/1/1 pool of x
  taken while loading (the average with count_include_pad True, or False);
- STRIDE2: a grid reduction's 3x3 stride-2 unpadded convolution over the output grid;
- VALID: a stride-1 unpadded ('valid') kh x kw convolution over the smaller output grid
  (timm's Mixed4a, Inception-v3's stem);
- POOL_COPY: a grid reduction's 3x3 stride-2 max pool, copied into its output slice.
Columns go through bias + ReLU to their destination's channel slice; slot 0 (the stage-0
GEMM of every branch's leading 1x1) may split its columns over up to four destinations.
Slot 0 may instead end in Inception-ResNet's residual epilogue (EPILOGUE0, from
plan_with_residual: the tail's 1x1 over the concat buffer, its weight and bias already
times the tail's scale): act(x + acc + bias), x read at the same pixel and channel, act
the identity or ReLU, stored straight into the output.
So GoogLeNet's block takes two launches ([1x1 | 3x3red | 5x5red] over x with the pool
projection over max-pooled x; then K3 and K5), Inception-v3's one per stage.

Verified under TRITON_INTERPRET=1 and by ahead-of-time compilation (triton_aot.py).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .backend import flipped_gemm_b
from .graph_backward import graph_backward_reference
from .plan import Destination, GraphPlan, conv_grid
from .triton_gemm import (
    EXACT_FP32_BLOCK_K,
    KernelConfig,
    TUNED,
    autotune,
    exact_fp32,
    input_precision,
    kernel_configs,
    launch_options,
    mma,
    pixel_rows,
    prune_configs,
    round_tf32,
    round_tf32_host,
    tile_gemm,
    tuned_key,
    window_gemm,
    window_inside,
)

__all__ = ["DGRAD_KERNEL", "INPUT_GRAD_KERNEL", "LINEAR", "MAX_SEGMENTS", "MAX_STAGE_GEMMS", "POOL_GRAD_KERNEL",
           "SHIPPED_STAGES", "STAGE_KERNEL", "StageLaunch", "graph_backward_triton", "graph_configs",
           "graph_forward_triton", "max_pool_backward_configs", "stage_channel_args",
           "stage_configs", "stage_constexprs", "stage_launches"]


MAX_SEGMENTS = 4  # destinations of slot 0: the stage-0 GEMM of InceptionE has three
MAX_STAGE_GEMMS = 4  # slots of one launch: Inception-v3's stages have at most three GEMMs
# Slot kinds (constexpr KIND0..3 of _graph_stage_kernel).
NONE, WINDOW, AVG_POOL, MAX_POOL, STRIDE2, POOL_COPY, AVG_POOL_EXCLUDE_PAD, VALID = 0, 1, 2, 3, 4, 5, 6, 7
# Slot 0's epilogue (constexpr EPILOGUE0): relu(acc + bias), or the residual tail's
# x + acc + bias, then ReLU or not (plan.Destination.OUT_RESIDUAL / OUT_RESIDUAL_RELU).
# LINEAR (the train-mode BN form, branch_graph_bn_train.py): every slot stores acc + bias
# as it is, BN and ReLU coming after the stage's batch statistics.
RELU, RESIDUAL, RESIDUAL_RELU, LINEAR = 0, 1, 2, 3
_EPILOGUE_OF = {-2: RESIDUAL, -3: RESIDUAL_RELU}  # Destination code -> epilogue


@triton.jit
def _pooled_gemm(
    src_tile,  # (rows, K_src) NHWC pixel rows of x from the tile's first pixel, with their halo
    w_ptr,  # (K_src, cols) B of the 1x1
    K_src, cols, H, W, h, w, rows, m_mask, offs_n, n_mask,
    MAX: tl.constexpr, EXCLUDE_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """A 1x1 over the 3x3/1/1 pool of the source (max, or average with count_include_pad or,
    EXCLUDE_PAD, without: divided by the window's in-grid pixels), the pool taken in fp32
    while loading: the pooled tensor never exists in memory. Nine shifted windows are live
    per K slice, hence the thin slices of the pointwise list."""
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if EXCLUDE_PAD:  # each row's divisor: the window clipped to the grid, as F.avg_pool2d counts it
        count = ((tl.minimum(h + 1, H - 1) - tl.maximum(h - 1, 0) + 1)
                 * (tl.minimum(w + 1, W - 1) - tl.maximum(w - 1, 0) + 1)).to(tl.float32)
    for c0 in range(0, K_src, BLOCK_K):
        cc = c0 + offs_k
        c_mask = cc < K_src
        if MAX:
            # fp32 max (exact for every dtype): -inf padding needs no constant of the input
            # dtype, which the interpreter lacks for bf16.
            a32 = tl.full((BLOCK_M, BLOCK_K), float("-inf"), tl.float32)
        else:
            a32 = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for py in tl.static_range(-1, 2):
            for px in tl.static_range(-1, 2):
                inside = window_inside(m_mask, h, w, py, px, H, W)
                ok2 = inside[:, None] & c_mask[None, :]
                v = tl.load(src_tile + (rows + (py * W + px))[:, None] * K_src + cc[None, :],
                            mask=ok2, other=0.0).to(tl.float32)
                if MAX:
                    a32 = tl.maximum(a32, tl.where(ok2, v, float("-inf")), propagate_nan=tl.PropagateNan.ALL)
                else:
                    a32 += v  # padding adds zeros: count_include_pad
        if EXCLUDE_PAD:
            a32 = a32 / count[:, None]
        elif not MAX:
            a32 = a32 / 9.0
        # Rows past M and channels past K_src are zeroed, so -inf * 0 cannot make NaN.
        a = tl.where(m_mask[:, None] & c_mask[None, :], a32, 0.0).to(src_tile.dtype.element_ty)
        b = tl.load(w_ptr + cc[:, None] * cols + offs_n[None, :], mask=c_mask[:, None] & n_mask[None, :], other=0.0)
        acc = mma(a, b, acc, INPUT_PRECISION, UPCAST_DOT)
    return acc


@triton.jit
def _unpadded_corner(m0, rows, H, W, OH, OW, STRIDE: tl.constexpr):
    """Rows of an unpadded convolution's tile are pixels of the (OH, OW) output grid: the
    first image the tile touches, and each row's window corner (its top-left input pixel,
    STRIDE times the output pixel) as a pixel index from that image's first pixel (32-bit:
    a tile spans a few images)."""
    img = (m0 + rows) // (OH * OW)
    r = (m0 + rows) % (OH * OW)
    img0 = m0 // (OH * OW)
    return img0, ((img - img0) * H + (r // OW) * STRIDE) * W + (r % OW) * STRIDE


@triton.jit
def _unpadded_gemm(
    src_ptr,  # (N, H, W, K_src) NHWC source
    w_ptr,  # (kh * kw * K_src, cols) B, row (dy * kw + dx) * K_src + c
    K_src, cols, kh, kw, H, W, OH, OW, m0, rows, m_mask, offs_n, n_mask,
    STRIDE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """A kh x kw unpadded convolution at STRIDE (a grid reduction's 2, a 'valid' one's 1) of
    a tile of output pixels: every tap of every row is inside the input."""
    img0, corner = _unpadded_corner(m0, rows, H, W, OH, OW, STRIDE)
    base = src_ptr + (img0 * H * W).to(tl.int64) * K_src  # 64-bit base, 32-bit offsets
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tap in range(0, kh * kw):
        pix = corner + (tap // kw) * W + tap % kw
        for c0 in range(0, K_src, BLOCK_K):
            cc = c0 + offs_k
            c_mask = cc < K_src
            a = tl.load(base + pix[:, None] * K_src + cc[None, :], mask=m_mask[:, None] & c_mask[None, :], other=0.0)
            b = tl.load(w_ptr + (tap * K_src + cc)[:, None] * cols + offs_n[None, :],
                        mask=c_mask[:, None] & n_mask[None, :], other=0.0)
            acc = mma(a, b, acc, INPUT_PRECISION, UPCAST_DOT)
    return acc


# A max-pool copy tile is (BLOCK_M, COPY_N) whatever the launch's BLOCK_N: its nine window
# loads of a 64 x 128 tile took 190-250 registers, and 255 with 48-330 bytes of spill
# beside a GEMM slot (odd channel counts, sm_80/sm_90); 32 channels keep it small.
COPY_N = tl.constexpr(32)


@triton.jit
def _stride2_max_pool_tile(
    src_ptr,  # (N, H, W, K_src) NHWC x
    dst_ptr,  # (N, OH, OW, channels) NHWC output: channels [at, at + K_src) are the pool's
    K_src, H, W, OH, OW, channels, at, m0, rows, m_mask, pid_n,
    BLOCK_M: tl.constexpr,
):
    """A grid reduction's pool branch on a (BLOCK_M, COPY_N) tile: the 3x3 stride-2
    unpadded max pool of x (fp32 max, NaN wins as in torch.max_pool2d), stored into its
    output slice."""
    offs_n = pid_n * COPY_N + tl.arange(0, COPY_N)
    n_mask = offs_n < K_src
    img0, corner = _unpadded_corner(m0, rows, H, W, OH, OW, 2)
    base = src_ptr + (img0 * H * W).to(tl.int64) * K_src  # 64-bit base, 32-bit offsets
    mask = m_mask[:, None] & n_mask[None, :]
    best = tl.full((BLOCK_M, COPY_N), float("-inf"), tl.float32)
    for dy in tl.static_range(0, 3):
        for dx in tl.static_range(0, 3):
            pix = corner + dy * W + dx
            v = tl.load(base + pix[:, None] * K_src + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
            best = tl.maximum(best, v, propagate_nan=tl.PropagateNan.ALL)
    dst_tile = dst_ptr + m0.to(tl.int64) * channels + at
    tl.store(dst_tile + rows[:, None] * channels + offs_n[None, :], best.to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_segment(
    dst_ptr,  # (rows, channels) NHWC destination: columns [begin, end) go to [at, at + end - begin)
    y, m0, rows, m_mask, col, begin, end, channels, at,
):
    dst_tile = dst_ptr + m0.to(tl.int64) * channels + at  # 64-bit base, 32-bit offsets
    tl.store(dst_tile + rows[:, None] * channels + (col - begin), y,
             mask=m_mask[:, None] & (col >= begin) & (col < end))


@triton.jit
def _slot_tile(
    local,  # the program's index among this slot's tiles
    src_ptr,  # (N, H, W, K_src) NHWC source: x, or an intermediate
    w_ptr,  # (kh * kw * K_src, cols) B (unread by POOL_COPY)
    b_ptr,  # (cols,) bias (unread by POOL_COPY)
    d0_ptr, d1_ptr, d2_ptr, d3_ptr,  # (rows, ch_i) NHWC destinations of the column segments
    res_ptr,  # (N, H, W, ch0) NHWC x, added by a residual EPILOGUE (unread otherwise)
    M, H, W, OH, OW, K_src, cols, kh, kw, tiles_n,
    seg1, seg2, seg3,  # where segments 1..3 begin (segment i ends where i + 1 begins; the last at cols)
    ch0, ch1, ch2, ch3, at0, at1, at2, at3,  # each destination's channels and first channel
    KIND: tl.constexpr, SEGMENTS: tl.constexpr, EPILOGUE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """One output tile of one GEMM of a stage: rows are pixels (of the output grid for the
    stride-2 and unpadded kinds), column tiles of a row block are consecutive programs (they
    share A)."""
    pid_m = local // tiles_n
    pid_n = local % tiles_n
    m0, rows, m_mask, h, w = pixel_rows(pid_m, M, H, W, BLOCK_M)
    if KIND == 5:  # POOL_COPY: no GEMM, (BLOCK_M, COPY_N) tiles
        _stride2_max_pool_tile(src_ptr, d0_ptr, K_src, H, W, OH, OW, ch0, at0, m0, rows, m_mask, pid_n, BLOCK_M)
    else:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < cols
        if KIND == 1:  # WINDOW
            src_tile = src_ptr + m0.to(tl.int64) * K_src  # 64-bit base at the tile's first pixel
            acc = window_gemm(src_tile, w_ptr, K_src, cols, kh, kw, H, W, h, w, rows, m_mask, offs_n, n_mask,
                              BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION, UPCAST_DOT)
        elif KIND == 4:  # STRIDE2
            acc = _unpadded_gemm(src_ptr, w_ptr, K_src, cols, kh, kw, H, W, OH, OW, m0, rows, m_mask, offs_n, n_mask,
                                 2, BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION, UPCAST_DOT)
        elif KIND == 7:  # VALID
            acc = _unpadded_gemm(src_ptr, w_ptr, K_src, cols, kh, kw, H, W, OH, OW, m0, rows, m_mask, offs_n, n_mask,
                                 1, BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION, UPCAST_DOT)
        else:  # AVG_POOL (2), MAX_POOL (3) or AVG_POOL_EXCLUDE_PAD (6)
            src_tile = src_ptr + m0.to(tl.int64) * K_src
            acc = _pooled_gemm(src_tile, w_ptr, K_src, cols, H, W, h, w, rows, m_mask, offs_n, n_mask, KIND == 3,
                               KIND == 6, BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION, UPCAST_DOT)
        bias = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        y = acc + bias[None, :]
        if (EPILOGUE == 1) or (EPILOGUE == 2):  # RESIDUAL or RESIDUAL_RELU: one segment, all of out; x in fp32
            res_tile = res_ptr + m0.to(tl.int64) * ch0 + at0  # 64-bit base, 32-bit offsets
            y += tl.load(res_tile + rows[:, None] * ch0 + offs_n[None, :],
                         mask=m_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)
        if (EPILOGUE == 0) or (EPILOGUE == 2):  # RELU or RESIDUAL_RELU (LINEAR stores acc + bias)
            # ReLU that keeps NaN, like torch.relu (a plain maximum would turn NaN into 0).
            y = tl.maximum(y, 0.0, propagate_nan=tl.PropagateNan.ALL)
        if INPUT_PRECISION == "tf32" and EPILOGUE == 0:  # RELU
            # The next dot may read it: TF32-exact, so nothing is truncated (a residual
            # epilogue's output is the block's: no dot reads it, no rounding).
            y = round_tf32(y)
        y = y.to(d0_ptr.dtype.element_ty)
        col = offs_n[None, :]
        if SEGMENTS == 1:
            _store_segment(d0_ptr, y, m0, rows, m_mask, col, 0, cols, ch0, at0)
        else:
            _store_segment(d0_ptr, y, m0, rows, m_mask, col, 0, seg1, ch0, at0)
            if SEGMENTS == 2:
                _store_segment(d1_ptr, y, m0, rows, m_mask, col, seg1, cols, ch1, at1)
            else:
                _store_segment(d1_ptr, y, m0, rows, m_mask, col, seg1, seg2, ch1, at1)
                if SEGMENTS == 3:
                    _store_segment(d2_ptr, y, m0, rows, m_mask, col, seg2, cols, ch2, at2)
                else:
                    _store_segment(d2_ptr, y, m0, rows, m_mask, col, seg2, seg3, ch2, at2)
                    _store_segment(d3_ptr, y, m0, rows, m_mask, col, seg3, cols, ch3, at3)


# Tile counts and pixel counts change with the batch: not specialized (fewer recompiles,
# and the variant checked ahead of time is the one launched). kh, kw neither, as before.
# Channel counts, segment bounds and channel offsets are: divisible by 16 in real networks,
# they let the loads and stores vectorize.
@triton.jit(do_not_specialize=["H", "W", "OH", "OW", "M0", "M1", "M2", "M3", "kh0", "kw0", "kh1", "kw1", "kh2", "kw2",
                               "kh3", "kw3", "tiles_n0", "tiles_n1", "tiles_n2", "tiles_n3", "end0", "end1", "end2"])
def _graph_stage_kernel(
    # pointers of slot 0
    src0_ptr,  # (N, H, W, K0) NHWC source
    w0_ptr,  # (kh0 * kw0 * K0, cols0) B, row (dy * kw0 + dx) * K0 + c
    b0_ptr,  # (cols0,) bias
    out0_ptr, out0b_ptr, out0c_ptr, out0d_ptr,  # (rows, ch0x) NHWC destinations of its column segments
    res0_ptr,  # (N, H, W, ch0) NHWC x for slot 0's residual EPILOGUE0 (unread by the others)
    # pointers of slots 1..3, as slot 0's with one destination each
    src1_ptr, w1_ptr, b1_ptr, out1_ptr,  # (N, H, W, K1), (kh1 * kw1 * K1, cols1), (cols1,), (rows, ch1)
    src2_ptr, w2_ptr, b2_ptr, out2_ptr,  # (N, H, W, K2), (kh2 * kw2 * K2, cols2), (cols2,), (rows, ch2)
    src3_ptr, w3_ptr, b3_ptr, out3_ptr,  # (N, H, W, K3), (kh3 * kw3 * K3, cols3), (cols3,), (rows, ch3)
    # the input grid and a grid reduction's output grid
    H, W, OH, OW,
    # per slot: pixel rows, source channels, columns, window, column tiles, its programs' end
    M0, K0, cols0, kh0, kw0, tiles_n0, end0,
    M1, K1, cols1, kh1, kw1, tiles_n1, end1,
    M2, K2, cols2, kh2, kw2, tiles_n2, end2,
    M3, K3, cols3, kh3, kw3, tiles_n3,
    # destinations: slot 0's segments, then slots 1..3 (channels, first channel)
    seg0b, seg0c, seg0d, ch0, ch0b, ch0c, ch0d, at0, at0b, at0c, at0d,
    ch1, at1, ch2, at2, ch3, at3,
    # meta-parameters
    KIND0: tl.constexpr, KIND1: tl.constexpr, KIND2: tl.constexpr, KIND3: tl.constexpr, SEGMENTS: tl.constexpr,
    EPILOGUE0: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """One stage of a plan: programs [0, end0) take slot 0's tiles, [end0, end1) slot 1's,
    and so on; a slot of kind NONE (0) is not compiled. Each slot's code sits in its own
    branch: shared memory is reused across them (a three-slot stage takes one slot's, in
    the ahead-of-time table), registers are about the largest slot's, not the sum.
    EPILOGUE0 LINEAR applies to every slot (the others are RELU otherwise)."""
    pid = tl.program_id(0)
    if pid < end0:
        _slot_tile(pid, src0_ptr, w0_ptr, b0_ptr, out0_ptr, out0b_ptr, out0c_ptr, out0d_ptr, res0_ptr,
                   M0, H, W, OH, OW, K0, cols0, kh0, kw0, tiles_n0, seg0b, seg0c, seg0d,
                   ch0, ch0b, ch0c, ch0d, at0, at0b, at0c, at0d,
                   KIND0, SEGMENTS, EPILOGUE0, BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION, UPCAST_DOT)
    if KIND1 != 0:
        if (pid >= end0) & (pid < end1):
            _slot_tile(pid - end0, src1_ptr, w1_ptr, b1_ptr, out1_ptr, out1_ptr, out1_ptr, out1_ptr, res0_ptr,
                       M1, H, W, OH, OW, K1, cols1, kh1, kw1, tiles_n1, 0, 0, 0, ch1, ch1, ch1, ch1, at1, at1, at1, at1,
                       KIND1, 1, (EPILOGUE0 // 3) * 3, BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION, UPCAST_DOT)
    if KIND2 != 0:
        if (pid >= end1) & (pid < end2):
            _slot_tile(pid - end1, src2_ptr, w2_ptr, b2_ptr, out2_ptr, out2_ptr, out2_ptr, out2_ptr, res0_ptr,
                       M2, H, W, OH, OW, K2, cols2, kh2, kw2, tiles_n2, 0, 0, 0, ch2, ch2, ch2, ch2, at2, at2, at2, at2,
                       KIND2, 1, (EPILOGUE0 // 3) * 3, BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION, UPCAST_DOT)
    if KIND3 != 0:
        if pid >= end2:
            _slot_tile(pid - end2, src3_ptr, w3_ptr, b3_ptr, out3_ptr, out3_ptr, out3_ptr, out3_ptr, res0_ptr,
                       M3, H, W, OH, OW, K3, cols3, kh3, kw3, tiles_n3, 0, 0, 0, ch3, ch3, ch3, ch3, at3, at3, at3, at3,
                       KIND3, 1, (EPILOGUE0 // 3) * 3, BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION, UPCAST_DOT)


@triton.jit(do_not_specialize=["kh", "kw"])
def _graph_dgrad_kernel(
    # pointers
    g_ptr,  # (N, H, W, K_g) NHWC ReLU-masked gradient of a stride-1 kh x kw convolution's output
    w_ptr,  # (kh * kw * K_g, cols) its weight flipped and transposed (flipped_gemm_b)
    t_ptr,  # (N, H, W, cols) NHWC its input, an intermediate: the ReLU mask of the result
    d_ptr,  # (N, H, W, cols) NHWC the intermediate's gradient: written, or accumulated into
    # sizes
    M, H, W, K_g, cols, kh, kw,
    # meta-parameters
    ACCUMULATE: tl.constexpr, MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """The data gradient of one convolution over an intermediate: an implicit GEMM of its
    output gradient with the flipped weight ('same' padding makes it a stride-1 convolution
    again). A fan-out's second consumer ACCUMULATEs onto the first's result; the last one
    applies the intermediate's ReLU mask (none where t <= 0, as torch.relu) in the epilogue."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    m0, rows, m_mask, h, w = pixel_rows(pid_m, M, H, W, BLOCK_M)
    g_tile = g_ptr + m0.to(tl.int64) * K_g  # 64-bit base, 32-bit offsets (a tile plus its halo)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < cols
    acc = window_gemm(g_tile, w_ptr, K_g, cols, kh, kw, H, W, h, w, rows, m_mask, offs_n, n_mask,
                       BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION, UPCAST_DOT)
    offsets = (m0 + rows).to(tl.int64)[:, None] * cols + offs_n[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if ACCUMULATE:
        acc += tl.load(d_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if MASK:
        t = tl.load(t_ptr + offsets, mask=mask, other=0.0)
        acc = tl.where(t <= 0, 0.0, acc)
    tl.store(d_ptr + offsets, acc.to(d_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _graph_pool_grad_kernel(
    # pointers
    gp_ptr,  # (M, cp) ReLU-masked gradient of the max-pool branch's 1x1
    wp_ptr,  # (cp, C) its weight, row-major
    x_ptr,  # (N, H, W, C) NHWC input
    d_pooled_ptr,  # (M, C) gp @ Wp: the gradient of the pooled x (written with DX)
    argmax_ptr,  # (M, C) int8: window position dy * 3 + dx of each pooled value
    pooled_ptr,  # (M, C) the 3x3/1/1 max pool of x (for the 1x1's weight gradient)
    # sizes
    M, H, W, C, cp,
    # meta-parameters
    DX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """The max-pool branch's backward in one pass over x: d_pooled = gp @ Wp (with DX), and
    in the same tile the max pool with torch's argmax (row-major scan; ties to the first,
    NaN to the last NaN) and the pooled values. _graph_input_grad_kernel gathers d_pooled."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    m0, rows, m_mask, h, w = pixel_rows(pid_m, M, H, W, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < C
    out_mask = m_mask[:, None] & n_mask[None, :]
    offs = rows[:, None] * C + offs_n[None, :]
    base = m0.to(tl.int64) * C  # 64-bit base at the tile's first pixel, 32-bit offsets
    if DX:
        acc = tile_gemm(gp_ptr + m0.to(tl.int64) * cp, wp_ptr, cp, C, rows, m_mask, offs_n, n_mask,
                        BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION, UPCAST_DOT)
        # Stored before the max pool, so that its registers are free for the running max
        # and argmax (64x128 tiles spilled 528 bytes on sm_80 the other way round).
        tl.store(d_pooled_ptr + base + offs, acc.to(d_pooled_ptr.dtype.element_ty), mask=out_mask)
    # A value replaces the running max when it is greater or NaN; the first in-grid
    # position always does.
    x_tile = x_ptr + base
    best = tl.full((BLOCK_M, BLOCK_N), float("-inf"), tl.float32)
    arg = tl.full((BLOCK_M, BLOCK_N), -1, tl.int32)
    for dy in tl.static_range(0, 3):
        for dx in tl.static_range(0, 3):
            ok2 = window_inside(m_mask, h, w, dy - 1, dx - 1, H, W)[:, None] & n_mask[None, :]
            v = tl.load(x_tile + (rows + ((dy - 1) * W + dx - 1))[:, None] * C + offs_n[None, :],
                        mask=ok2, other=0.0).to(tl.float32)
            take = ok2 & ((v > best) | (v != v) | (arg < 0))
            best = tl.where(take, v, best)
            arg = tl.where(take, dy * 3 + dx, arg)
    tl.store(argmax_ptr + base + offs, arg.to(tl.int8), mask=out_mask)
    tl.store(pooled_ptr + base + offs, best.to(pooled_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _graph_input_grad_kernel(
    # pointers
    a_ptr,  # (M, K) the masked gradients of the 1x1s over x, side by side: the shared-x GEMM's A
    w_ptr,  # (K, C) their weights stacked, row-major
    d_pooled_ptr,  # (M, C) from _graph_pool_grad_kernel
    argmax_ptr,  # (M, C) int8 from _graph_pool_grad_kernel
    dx_ptr,  # (N, H, W, C) NHWC: a @ w plus the max pool's gradient
    # sizes
    M, H, W, C, K,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """The shared-x GEMM of the backward (K may be 0) with the max pool's gradient gathered
    in its epilogue: pixel p adds d_pooled of each neighbour whose argmax points at p.
    Gathering instead of scattering needs no atomics: dx is deterministic."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    m0, rows, m_mask, h, w = pixel_rows(pid_m, M, H, W, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < C
    acc = tile_gemm(a_ptr + m0.to(tl.int64) * K, w_ptr, K, C, rows, m_mask, offs_n, n_mask,
                    BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION, UPCAST_DOT)
    # Neighbour q = p + (dy - 1, dx - 1) sends its d_pooled to p when its argmax is p's
    # position in q's window, (2 - dy) * 3 + (2 - dx).
    base = m0.to(tl.int64) * C
    for dy in tl.static_range(0, 3):
        for dx in tl.static_range(0, 3):
            ok2 = window_inside(m_mask, h, w, dy - 1, dx - 1, H, W)[:, None] & n_mask[None, :]
            q = (rows + ((dy - 1) * W + dx - 1))[:, None] * C + offs_n[None, :]
            arg = tl.load(argmax_ptr + base + q, mask=ok2, other=-1).to(tl.int32)
            hit = ok2 & (arg == (2 - dy) * 3 + (2 - dx))
            acc += tl.load(d_pooled_ptr + base + q, mask=hit, other=0.0).to(tl.float32)
    tl.store(dx_ptr + base + rows[:, None] * C + offs_n[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


STAGE_KERNEL = _graph_stage_kernel
DGRAD_KERNEL = _graph_dgrad_kernel
POOL_GRAD_KERNEL = _graph_pool_grad_kernel
INPUT_GRAD_KERNEL = _graph_input_grad_kernel

# The max-pool backward's epilogues keep two more (BLOCK_M, BLOCK_N) tiles live (running
# max and argmax, or the gathered sums): 64x128 tiles spilled 480-2600 bytes per thread on
# sm_80 and sm_90 (the GoogLeNet kernels these port), so both stop at 64x64.
_MAX_EPILOGUE_TILE = 64 * 64


def max_pool_backward_configs(exact_fp32: bool) -> list[KernelConfig]:
    """The autotune list of _graph_pool_grad_kernel and _graph_input_grad_kernel: the
    pointwise list (1x1 GEMMs) up to 64x64 tiles."""
    return [c for c in kernel_configs("pointwise", exact_fp32) if c.block_m * c.block_n <= _MAX_EPILOGUE_TILE]


def graph_configs(kh: int, kw: int, stride2: bool, exact_fp32: bool) -> list[KernelConfig]:
    """The autotune list of one GEMM: the pointwise list for 1x1s (thin K slices: the
    pooled-A loads of a pool branch spilled 8-3900 bytes with the spatial list's 32-deep
    ones), the spatial list for K x K, without its 128-row tile for stride 2 (16 bytes of
    spill in fp32 on sm_80)."""
    if (kh, kw) == (1, 1) and not stride2:
        return kernel_configs("pointwise", exact_fp32)
    configs = kernel_configs("spatial", exact_fp32)
    return [c for c in configs if c.block_m <= 64] if stride2 else configs


_POOLED = (AVG_POOL, MAX_POOL, AVG_POOL_EXCLUDE_PAD)  # a 1x1 whose A is pooled while loading


def _slot_kind(gemm: list[int]) -> int:
    _stage, source, kh, kw, stride, pad_h, pad_w, *_ = gemm
    if source == -4:
        return POOL_COPY
    if source in (-2, -3, -5):
        return {-2: AVG_POOL, -3: MAX_POOL, -5: AVG_POOL_EXCLUDE_PAD}[source]
    if stride == 2:
        return STRIDE2
    if (pad_h, pad_w) == (kh // 2, kw // 2):
        return WINDOW
    if (pad_h, pad_w) == (0, 0):
        return VALID
    raise ValueError(f"a {kh}x{kw} GEMM with padding ({pad_h}, {pad_w}): the Triton kernels pad 'same' or not at all")


# The exact-fp32 (FMA dot) lists of the stage kernel, as (BLOCK_M, BLOCK_N, warps, stages)
# with BLOCK_K = EXACT_FP32_BLOCK_K. kernel_configs' exact lists, and other candidates,
# spilled 8-40 bytes per thread in some stage variants: 64x128 and 64x64 on 2 stages over
# an average-pooled A; 64x64 on 8 warps, 3 stages over K x K windows (sm_80); 64x32 on 8
# warps over a max-pooled A with BLOCK_K 16 (triton 3.6's slice); 64x64 on 4 warps beside
# the max-pool copy with odd channel counts. These, compiled for every shipped variant with
# BLOCK_K 8 and 16, do not (tests/test_triton_aot.py checks the installed triton's). Each
# list's first tiles are kernel_configs' (the interpreter runs the first: the GoogLeNet
# kernels' tiles, hence bit-identical outputs).
_EXACT_STAGE_TILES = {
    "pointwise": [(64, 64, 8, 3), (64, 32, 4, 2)],
    # A stage of one 1x1 GEMM (Inception-ResNet's stage 0 over x, its tail over the concat):
    # 64x64 on 3 pipeline stages had a 16-byte stack frame on sm_80 with channel counts
    # divisible by 16; on 2, none.
    "pointwise_alone": [(64, 64, 8, 2), (64, 32, 4, 2)],
    "spatial": [(64, 64, 8, 2), (64, 128, 8, 3), (64, 32, 4, 3)],
}


def stage_configs(kinds: tuple[tuple[int, int, int], ...], exact_fp32: bool) -> list[KernelConfig]:
    """The autotune list of a stage launch from its slots' (kind, kh, kw): the pointwise
    list when a slot's A is pooled while loading (its register budget) or every GEMM is a
    1x1 over x (a max-pool copy may join), else the spatial list; with a stride-2 slot, no
    128-row tile."""
    pooled = any(kind in _POOLED for kind, _, _ in kinds)
    pointwise = all(kind in (*_POOLED, POOL_COPY) or (kind == WINDOW and (kh, kw) == (1, 1))
                    for kind, kh, kw in kinds)
    name = "pointwise" if pooled or pointwise else "spatial"
    if exact_fp32:
        tiles = _EXACT_STAGE_TILES["pointwise_alone" if name == "pointwise" and len(kinds) == 1 else name]
        configs = [KernelConfig(bm, bn, EXACT_FP32_BLOCK_K, warps, stages) for bm, bn, warps, stages in tiles]
    else:
        configs = kernel_configs(name, exact_fp32)
    if any(kind in (STRIDE2, VALID) for kind, _, _ in kinds):
        # No 128-row tile (16 bytes of spill in fp32 on sm_80), and 8 warps for the 64x32 one
        # of the tensor-core list: on 4 warps, beside the max-pool copy, it took 254 registers
        # and spilled 40-88 bytes in tf32 with odd channel counts.
        configs = [c if exact_fp32 else c._replace(num_warps=8) for c in configs if c.block_m <= 64]
    return configs


def stage_constexprs(kinds: tuple[tuple[int, int, int], ...], segments: int, epilogue: int = RELU) -> dict:
    """_graph_stage_kernel's compile-time arguments for slots of these (kind, kh, kw), slot
    0 with `segments` destinations and `epilogue` (RELU, RESIDUAL or RESIDUAL_RELU; LINEAR
    for every slot)."""
    padded = [kind for kind, _, _ in kinds] + [NONE] * (MAX_STAGE_GEMMS - len(kinds))
    return {**{f"KIND{i}": kind for i, kind in enumerate(padded)}, "SEGMENTS": segments, "EPILOGUE0": epilogue}


def stage_channel_args(kinds: tuple[tuple[int, int, int], ...], segments: int) -> tuple[str, ...]:
    """The int arguments of _graph_stage_kernel that are channel counts or offsets of the
    used slots: multiples of 16 in GoogLeNet and Inception-v3, where the JIT specializes
    them (the variant compiled ahead of time)."""
    names = [f"seg0{'bcd'[i]}" for i in range(segments - 1)]
    names += ["ch0", "at0"] + [f"{p}0{'bcd'[i]}" for p in ("ch", "at") for i in range(segments - 1)]
    for i in range(len(kinds)):
        names += [f"K{i}", f"cols{i}"] + ([f"ch{i}", f"at{i}"] if i else [])
    return tuple(names)


# The stages GoogLeNet's, Inception-v3's and Inception-ResNet's plans launch, as (name,
# slot (kind, kh, kw), slot-0 segments, slot-0 epilogue); a representative window (kh, kw)
# per WINDOW slot. triton_aot.KERNELS compiles each with its config list; tests check that
# the real plans launch no other.
SHIPPED_STAGES = [
    ("x1x1_maxpool", ((WINDOW, 1, 1), (MAX_POOL, 1, 1)), 3, RELU),  # GoogLeNet stage 0
    ("x1x1_avgpool", ((WINDOW, 1, 1), (AVG_POOL, 1, 1)), 3, RELU),  # InceptionA, C, E stage 0
    ("x1x1_avgpool_exclude_pad", ((WINDOW, 1, 1), (AVG_POOL_EXCLUDE_PAD, 1, 1)), 3, RELU),  # pytorch-fid's A, C, E_1
    ("x1x1_copy", ((WINDOW, 1, 1), (POOL_COPY, 3, 3)), 2, RELU),  # InceptionD stage 0
    ("stride2_x1x1_copy", ((STRIDE2, 3, 3), (WINDOW, 1, 1), (POOL_COPY, 3, 3)), 1, RELU),  # InceptionB stage 0
    ("window", ((WINDOW, 3, 3),), 1, RELU),  # a one-GEMM stage: A 2, B 1, C 3, C 4, D 2
    ("window2", ((WINDOW, 5, 5), (WINDOW, 3, 3)), 1, RELU),  # GoogLeNet 1, A 1, C 1, C 2, E 2
    ("window3", ((WINDOW, 3, 3), (WINDOW, 1, 3), (WINDOW, 3, 1)), 1, RELU),  # InceptionE stage 1
    ("stride2", ((STRIDE2, 3, 3),), 1, RELU),  # InceptionB stage 2, D stage 3
    ("stride2_window", ((STRIDE2, 3, 3), (WINDOW, 1, 7)), 1, RELU),  # InceptionD stage 1
    ("valid", ((VALID, 3, 3),), 1, RELU),  # timm's Mixed4a stage 1 (and stage 3 beside a window); a stem's 3x3
    ("x1x1_3", ((WINDOW, 1, 1),), 3, RELU),  # Inception-ResNet's Block35 stage 0 (no pool branch)
    ("x1x1_2", ((WINDOW, 1, 1),), 2, RELU),  # Block17 and Block8 stage 0
    # Inception-ResNet's tail (plan_with_residual): Block35 and Block17, and Block8 but the last
    ("residual_relu", ((WINDOW, 1, 1),), 1, RESIDUAL_RELU),
    ("residual", ((WINDOW, 1, 1),), 1, RESIDUAL),  # the last Block8: no activation
]
# Training with batch norm (branch_graph_bn_train.py) launches GoogLeNet's and
# Inception-v3's stages with the LINEAR epilogue in every slot.
_TRAINED = ("x1x1_maxpool", "x1x1_avgpool", "x1x1_copy", "stride2_x1x1_copy", "window", "window2", "window3",
            "stride2", "stride2_window")
SHIPPED_STAGES += [(f"{name}_linear", kinds, segments, LINEAR) for name, kinds, segments, _ in SHIPPED_STAGES
                   if name in _TRAINED]


def _tile_cost(gemm: list[int], k_src: int) -> int:
    """Multiply-adds (or loads) of one tile per output element: the longest tiles first."""
    kind = _slot_kind(gemm)
    if kind == POOL_COPY:
        return 9
    return (9 if kind in _POOLED else gemm[2] * gemm[3]) * k_src


class StageLaunch(NamedTuple):
    """One launch of _graph_stage_kernel: the plan's GEMMs it runs, in slot order, each
    slot's (kind, kh, kw), slot 0's destination count and its epilogue."""

    gemms: tuple[int, ...]
    kinds: tuple[tuple[int, int, int], ...]
    segments: int
    epilogue: int = RELU


def stage_launches(flat_plan: list[int], in_channels: int) -> list[StageLaunch]:
    """The forward's launches: per stage of the plan, its GEMMs in slot order,
    MAX_STAGE_GEMMS at most per launch (a stage with more is split). Slot 0 holds the GEMM
    with several destinations (the only slot that may have them); the others follow by
    tile cost, longest first, so that the last wave is short."""
    return list(_host_plan(tuple(flat_plan), in_channels)[2])


@functools.lru_cache(maxsize=256)
def _host_plan(flat_plan: tuple[int, ...], in_channels: int) -> tuple[GraphPlan, list[list[int]], tuple, tuple]:
    """(plan, raw GEMM records (stage, source, kh, kw, stride, ..., segments), launches,
    packed weight shapes) of a flat plan, parsed and validated (GraphPlan.validate) once
    per plan and input width: the custom op receives the wire format on every call, and a
    launch-bound forward must not parse it there."""
    try:
        p = GraphPlan.from_flat(list(flat_plan))
    except (IndexError, TypeError, ValueError) as bad:
        raise ValueError(f"flat_plan is not a GraphPlan.flat() list ({type(bad).__name__}: {bad})") from None
    p.validate()
    epilogue = [_residual_epilogue(p, g) for g in p.gemms]
    gemms = [g.flat() for g in p.gemms]
    launches = []
    for stage in sorted({g[0] for g in gemms}):
        members = [i for i, g in enumerate(gemms) if g[0] == stage]
        k = {i: in_channels if gemms[i][1] < 0 else p.buf_channels[gemms[i][1]] for i in members}
        # Slot 0 holds a GEMM with several destinations or a residual epilogue: one per stage.
        members.sort(key=lambda i: (gemms[i][8] == 1 and not epilogue[i], -_tile_cost(gemms[i], k[i]), i))
        if sum(gemms[i][8] > 1 or epilogue[i] != RELU for i in members) > 1:
            raise ValueError(f"stage {stage} has two GEMMs with several destinations or a residual epilogue; "
                             "a launch takes one, in its slot 0")
        for j in range(0, len(members), MAX_STAGE_GEMMS):
            chunk = tuple(members[j:j + MAX_STAGE_GEMMS])
            launches.append(StageLaunch(chunk, tuple((_slot_kind(gemms[i]), gemms[i][2], gemms[i][3]) for i in chunk),
                                        gemms[chunk[0]][8], epilogue[chunk[0]]))
    # Per GEMM, the (B, bias) shapes the kernels index: (kh * kw * K_src, cols) and (cols,);
    # None for the max-pool copy, which reads no weights.
    shapes = tuple(None if not g.convs else ((g.kh * g.kw * (in_channels if g.source < 0 else p.buf_channels[g.source]),
                                              g.cols), (g.cols,)) for g in p.gemms)
    return p, gemms, tuple(launches), shapes


def _check_weights(x: torch.Tensor, b: list, bias: list, shapes: tuple) -> None:
    """Raise ValueError unless b and bias are the plan's packed weights (pack_weights with
    backend "triton") on x's device in x's dtype: the kernels index them by the plan's
    shapes, and a pointer of another dtype would be read as x's."""
    if len(b) != len(shapes) or len(bias) != len(shapes):
        raise ValueError(f"b and bias need one tensor per GEMM of the plan ({len(shapes)}), got {len(b)} and {len(bias)}")
    for i, (want, t, tb) in enumerate(zip(shapes, b, bias)):
        if want is not None and (tuple(t.shape) != want[0] or tuple(tb.shape) != want[1] or t.dtype != x.dtype
                                 or tb.dtype != x.dtype or t.device != x.device or tb.device != x.device):
            raise ValueError(f"GEMM {i}: b must be {want[0]} and bias {want[1]}, {x.dtype} on {x.device} (x's), got "
                             f"{tuple(t.shape)} {t.dtype} on {t.device} and {tuple(tb.shape)} {tb.dtype} on {tb.device}")


def _residual_epilogue(p: GraphPlan, g) -> int:
    """RELU, or the epilogue of a GEMM that stores through Destination.OUT_RESIDUAL*:
    checked to be what plan_with_residual makes, a stride-1 1x1 over a buffer (the concat)
    whose one segment is the whole output, x's channels (the epilogue reads x at the
    output's pixel and channel). Raises ValueError otherwise."""
    codes = [s.destination for s in g.segments if s.destination < Destination.OUT]
    if not codes:
        return RELU
    s = g.segments[0]
    if not (len(g.segments) == 1 and s.destination in _EPILOGUE_OF and g.source >= 0 and (g.kh, g.kw, g.stride) == (
            1, 1, 1) and (s.begin, s.end, s.channel) == (0, g.cols, 0) and g.cols == p.out_channels == p.in_channels):
        raise ValueError(f"flat_plan: a residual epilogue (Destination.OUT_RESIDUAL*) ends a stride-1 1x1 over a "
                         f"buffer (the concat) writing all {p.in_channels} channels of x into the output; got "
                         f"{g.kh}x{g.kw}/{g.stride} from source {g.source} with segments {list(g.segments)} "
                         f"into {p.out_channels} output channels")
    return _EPILOGUE_OF[s.destination]


def graph_forward_triton(x: torch.Tensor, b: list, bias: list, flat_plan: list[int],
                         keep: list | None = None, out: torch.Tensor | None = None,
                         between_stages=None) -> torch.Tensor:
    """The plan's stages, one grouped launch each (stage_launches); x (N, C, H, W) any
    layout. With `keep`, the intermediates ((N, H, W, channels) NHWC each) are appended;
    `out`, a channels_last tensor of the output's shape (checked by the caller), is
    written in full instead of a new one. With `between_stages`, every GEMM stores
    acc + bias (the LINEAR epilogue) and between_stages(stage, out, buffers) runs after
    each stage's launches, before the next stage reads its buffers (the train-mode BN
    form normalises there)."""
    n, c, h, w = x.shape
    programs, buf_channels, out_channels, oh, ow, shapes = _programs(tuple(flat_plan), n, c, h, w,
                                                                     between_stages is not None)
    _check_weights(x, b, bias, shapes)
    x = residual = x.contiguous(memory_format=torch.channels_last)
    if input_precision(x.dtype) == "tf32":  # operands TF32-exact before the dots (round_tf32_host)
        x = round_tf32_host(x)
        b = [round_tf32_host(t) for t in b]
    if out is None:
        out = torch.empty((n, out_channels, oh, ow), device=x.device, dtype=x.dtype,
                          memory_format=torch.channels_last)
    # Intermediates without a border: the kernel masks the taps that fall outside.
    bufs = [torch.empty((n, h, w, ch), device=x.device, dtype=x.dtype) for ch in buf_channels]
    if keep is not None:
        keep += bufs
    if n * h * w == 0:
        return out
    pool = [x, out, *bufs, *b, *bias, residual]  # what _StageProgram.refs index
    for i, program in enumerate(programs):
        program.run(pool, x)
        if between_stages is not None and (i + 1 == len(programs) or programs[i + 1].stage != program.stage):
            between_stages(program.stage, out, bufs)
    return out


class _Slot(NamedTuple):
    src: int  # index into the call's tensor pool: x, out, buffers, B's, biases, x unrounded
    weight: int  # its B, (kh * kw * k_src, cols)
    bias: int  # its bias, (cols,)
    dests: list  # per column segment: (tensor index, first column, its channels, its first channel)
    rows: int
    k_src: int
    cols: int
    kh: int
    kw: int


class _StageProgram:
    """One stage launch of one problem (plan, N, C, H, W), worked out once: which tensors
    of the call go to which kernel pointer, the scalar arguments and the grid per config.

    At batch 32 a GoogLeNet block's two launches take ~0.1 ms on an H200 (CUDA-graph
    replay) while the Python around them took ~0.3 ms per call; what is left per call is
    the pointer list, one TUNED lookup and triton's own launch (which still specialises
    on every pointer's alignment, so a cached program never launches a kernel compiled
    for other arguments)."""

    def __init__(self, stage: StageLaunch, gemms, n: int, c: int, h: int, w: int, oh: int, ow: int,
                 buf_channels: tuple, out_channels: int, n_bufs: int, n_gemms: int):
        slots = []
        for i in stage.gemms:
            _stage, source, kh, kw, gemm_stride, _pad_h, _pad_w, cols, n_seg, *segs = gemms[i]
            if n_seg > MAX_SEGMENTS:
                raise ValueError(f"a GEMM with {n_seg} destinations; the kernel takes at most {MAX_SEGMENTS}")
            dests = []
            for s in range(n_seg):
                begin, _end, dest, channel = segs[4 * s:4 * s + 4]
                dests.append((1 if dest < 0 else 2 + dest, begin, out_channels if dest < 0 else buf_channels[dest],
                              channel))
            copy = source == -4  # the grid reduction's max pool: no weights (x stands in, never read)
            slots.append(_Slot(0 if source < 0 else 2 + source, 0 if copy else 2 + n_bufs + i,
                               0 if copy else 2 + n_bufs + n_gemms + i, dests,
                               n * math.prod(conv_grid(h, w, kh, kw, gemm_stride, _pad_h, _pad_w)),
                               c if source < 0 else buf_channels[source], cols, kh, kw))
        unused = MAX_STAGE_GEMMS - len(slots)
        first = slots[0]
        # Slot 0's destinations, padded (SEGMENTS masks the unused ones: never stored to).
        dests = first.dests + [first.dests[0]] * (MAX_SEGMENTS - len(first.dests))
        seg_begins = [d[1] for d in first.dests[1:]] + [first.cols] * (MAX_SEGMENTS - len(first.dests))
        # x itself (the call pool's last tensor, unrounded) for a residual epilogue
        refs = [first.src, first.weight, first.bias, *(d[0] for d in dests),
                2 + n_bufs + 2 * n_gemms if stage.epilogue in (RESIDUAL, RESIDUAL_RELU) else 0]
        for slot in slots[1:] + [first] * unused:  # unused slots (kind NONE) are not compiled
            refs += [slot.src, slot.weight, slot.bias, slot.dests[0][0]]
        channel_args = [*seg_begins, *(d[2] for d in dests), *(d[3] for d in dests)]
        for slot in slots[1:]:
            channel_args += [slot.dests[0][2], slot.dests[0][3]]
        channel_args += [0, 0] * unused
        self.refs = tuple(refs)
        self.stage = gemms[stage.gemms[0]][0]  # the plan's stage this launch belongs to
        self.slots, self.kinds, self.unused = slots, stage.kinds, unused
        self.spatial = (h, w, oh, ow)
        self.channel_args = tuple(channel_args)
        self.constexprs = stage_constexprs(stage.kinds, len(first.dests), stage.epilogue)
        self.problem = (tuple(tuple(gemms[i]) for i in stage.gemms), tuple(s.k_src for s in slots), n, h, w)
        self.rows, self.cols = max(s.rows for s in slots), max(s.cols for s in slots)
        self._tuned_keys: dict[tuple, tuple] = {}  # (dtype, dot precision, device) -> autotune's key
        self._args: dict[tuple, tuple] = {}  # (config, dtype) -> (grid, scalar arguments, keyword arguments)

    def _launch_args(self, cfg: KernelConfig, dtype: torch.dtype) -> tuple:
        key = (cfg, dtype, input_precision(dtype))
        if key not in self._args:
            sizes, end = [], 0
            for slot, (kind, _, _) in zip(self.slots, self.kinds):
                tiles_n = _cdiv(slot.cols, COPY_N.value if kind == POOL_COPY else cfg.block_n)
                end += _cdiv(slot.rows, cfg.block_m) * tiles_n
                sizes += [slot.rows, slot.k_src, slot.cols, slot.kh, slot.kw, tiles_n, end]
            sizes += [0, 0, 0, 0, 0, 0, end] * self.unused
            self._args[key] = ((end,), (*self.spatial, *sizes[:-1], *self.channel_args),
                               {**self.constexprs, **launch_options(cfg, dtype)})
        return self._args[key]

    def launch(self, pool: list, cfg: KernelConfig, dtype: torch.dtype) -> None:
        grid, scalars, kwargs = self._launch_args(cfg, dtype)
        _graph_stage_kernel[grid](*[pool[r] for r in self.refs], *scalars, **kwargs)

    def run(self, pool: list, x: torch.Tensor) -> None:
        """Launch on this call's tensors, autotuned once per problem on CUDA."""
        dtype = x.dtype
        where = (dtype, input_precision(dtype), x.device)
        key = self._tuned_keys.get(where)
        cfg = None if key is None else TUNED.get(key)
        if cfg is None:  # first call, or TUNED was cleared (gpu-check times the tuning)
            configs = prune_configs(stage_configs(self.kinds, exact_fp32(dtype)), self.rows, self.cols)
            cfg = autotune("graph_stage", self.problem, x, configs, lambda c: self.launch(pool, c, dtype))
            self._tuned_keys[where] = tuned_key("graph_stage", self.problem, x)
        self.launch(pool, cfg, dtype)


@functools.lru_cache(maxsize=512)
def _programs(flat_plan: tuple[int, ...], n: int, c: int, h: int, w: int, linear: bool = False) -> tuple:
    """(stage programs, buffer channels, output channels, OH, OW, packed weight shapes) of a
    problem, with its size checks: worked out on the first call of each (plan, N, C, H, W).
    linear: every launch with the LINEAR epilogue (no residual epilogue allowed)."""
    p, gemms, launches, shapes = _host_plan(flat_plan, c)
    if linear:
        if any(stage.epilogue != RELU for stage in launches):
            raise ValueError("the train-mode BN form has no residual epilogue")
        launches = tuple(stage._replace(epilogue=LINEAR) for stage in launches)
    if c != p.in_channels:
        raise ValueError(f"x must have the plan's {p.in_channels} channels, got {c}")
    m = n * h * w
    if m >= 2**31:
        raise ValueError(f"x has {m} pixels (N*H*W); the Triton kernels take fewer than 2**31")
    oh, ow = p.out_size(h, w)
    if oh <= 0 or ow <= 0:
        raise ValueError(f"the block's unpadded or stride-2 convolutions need a larger input than {h}x{w}")
    buf_channels = tuple(p.buf_channels)
    programs = tuple(_StageProgram(stage, gemms, n, c, h, w, oh, ow, buf_channels, p.out_channels,
                                   len(buf_channels), len(gemms)) for stage in launches)
    return programs, buf_channels, p.out_channels, oh, ow, shapes


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # triton.cdiv is a constexpr function in triton 3.8: ~2 us a call on the host


def graph_backward_triton(grad_out, x, y, intermediates: list, weights: list, needs: list[bool],
                          backward_plan: list[int]) -> list:
    """graph_backward on GPUs: graph_backward_reference's walk, with
    - the data gradients of the stride-1 convolutions over intermediates (every K x K,
      1 x n and n x 1 of a chain) in `_graph_dgrad_kernel`, masks fused;
    - a stride-1 max-pool branch (GoogLeNet's) fused: `_graph_pool_grad_kernel` makes its
      d_pooled, argmax and pooled x in one pass, and `_graph_input_grad_kernel` runs the
      shared-x GEMM's dx with the max pool's gradient gathered in its epilogue;
    the other shared-x GEMMs are cuBLAS, the weight gradients and a grid reduction's
    stride-2 data gradients cuDNN's."""
    n, c, h, w = x.shape
    if n * h * w >= 2**31:
        raise ValueError(f"x has {n * h * w} pixels (N*H*W); the Triton kernels take fewer than 2**31")
    exact = exact_fp32(x.dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    m = n * h * w
    # In tf32 every operand of the Triton dots is rounded to nearest first (round_tf32_host:
    # the tensor cores would truncate it); x itself only feeds comparisons here.
    dot_operand = round_tf32_host if input_precision(x.dtype) == "tf32" else (lambda t: t)

    def max_pool_grad(g, weight, need_dx):
        g = dot_operand(g.contiguous())  # (M, cp)
        cp = weight.shape[0]
        wp = dot_operand(weight.flatten(1).contiguous())  # (cp, C)
        pooled = torch.empty((m, c), device=x.device, dtype=x.dtype)
        argmax = torch.empty((m, c), device=x.device, dtype=torch.int8)
        d_pooled = torch.empty((m, c), device=x.device, dtype=x.dtype) if need_dx else pooled  # unwritten without DX
        configs = prune_configs(max_pool_backward_configs(exact), m, c)

        def pool_launch(cfg: KernelConfig):
            grid = (_cdiv(m, cfg.block_m), _cdiv(c, cfg.block_n))
            _graph_pool_grad_kernel[grid](g, wp, x, d_pooled, argmax, pooled, m, h, w, c, cp, DX=need_dx,
                                          **launch_options(cfg, x.dtype))

        pool_launch(autotune("graph_pool_grad", (c, cp, n, h, w, need_dx), x, configs, pool_launch))
        if not need_dx:
            return pooled, None

        def pool_dx(a, w_shared):
            k = 0 if a is None else a.shape[1]
            a = d_pooled if a is None else dot_operand(a.contiguous())  # (M, K); d_pooled stands in for K = 0
            w_shared = d_pooled if w_shared is None else dot_operand(w_shared.contiguous())  # (K, C)
            dx = torch.empty((m, c), device=x.device, dtype=x.dtype)

            def launch(cfg: KernelConfig):
                grid = (_cdiv(m, cfg.block_m), _cdiv(c, cfg.block_n))
                _graph_input_grad_kernel[grid](a, w_shared, d_pooled, argmax, dx, m, h, w, c, k,
                                               **launch_options(cfg, x.dtype))

            launch(autotune("graph_input_grad", (c, k, n, h, w), x, configs, launch))
            return dx

        return pooled, pool_dx

    def data_grad(g, weight, record, d_so_far, intermediate, last):
        source, _dest, _channel, kh, kw, _stride, pad_h, pad_w = record
        if source < 0 or (pad_h, pad_w) != (kh // 2, kw // 2):  # over x, or unpadded: ATen's
            return None
        t = intermediate.contiguous()
        cols, k_g = weight.shape[1], weight.shape[0]
        d = torch.empty_like(t) if d_so_far is None else d_so_far.reshape(t.shape)
        b = dot_operand(flipped_gemm_b(weight))
        g = dot_operand(g.contiguous())
        rows = m

        def launch(cfg: KernelConfig):
            grid = (_cdiv(rows, cfg.block_m), _cdiv(cols, cfg.block_n))
            _graph_dgrad_kernel[grid](
                g, b, t, d, rows, h, w, k_g, cols, kh, kw, ACCUMULATE=d_so_far is not None, MASK=last,
                **launch_options(cfg, x.dtype))

        configs = prune_configs(graph_configs(kh, kw, False, exact), rows, cols)
        # Accumulating launches read d: each timing restores it, so tuning never changes it.
        scratch = d.clone() if d_so_far is not None and x.is_cuda else None
        launch(autotune("graph_dgrad", (kh, kw, k_g, cols, n, h, w, d_so_far is not None, last), x, configs, launch,
                        restore=None if scratch is None else lambda: d.copy_(scratch)))
        return d.reshape(rows, cols), last

    return graph_backward_reference(grad_out, x, y, intermediates, weights, needs, backward_plan,
                                    data_grad=data_grad, max_pool_grad=max_pool_grad)
