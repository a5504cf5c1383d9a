"""Triton kernels of the branch-graph forward (Inception-v3's InceptionA to E) on GPUs.

The schedule is the C++ kernel's (`branch_graph.plan`): one launch per GEMM of the plan,
stage after stage. `_graph_gemm_kernel` is one implicit GEMM over an NHWC source with a
kh x kw window (zero padding by masks), whose A tile may be the 3x3 average or max pool
of the source taken while loading (the pool branch), and whose columns go, through bias +
ReLU, to up to four destinations (channel slices of the output or of intermediates): the
stage-0 GEMM computes every branch's leading 1x1 from one pass over x. With STRIDE2 it
runs a grid reduction's 3x3 stride-2 convolution over the output grid; the reduction's max
pool is `_max_pool_stride2_kernel`, copied straight into its output slice.

Verified under TRITON_INTERPRET=1 and by ahead-of-time compilation, like the GoogLeNet
kernels; never run on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._layout import as_gemm_b, flipped_gemm_b
from .branch_graph import GraphPlan, graph_backward_reference
from .triton_gemm import (
    KernelConfig,
    autotune,
    exact_fp32,
    input_precision,
    interpreting,
    kernel_configs,
    launch_options,
    mma,
    pixel_rows,
    prune_configs,
    window_gemm,
    window_inside,
)

__all__ = ["GRAPH_KERNELS", "graph_backward_triton", "graph_configs", "graph_forward_triton",
           "pack_graph_weights_triton"]


MAX_SEGMENTS = 4  # destinations of one GEMM: the stage-0 GEMM of InceptionE has three
POOL_NONE, POOL_AVG, POOL_MAX = 0, 1, 2


@triton.jit(do_not_specialize=["kh", "kw", "seg_begin1", "seg_begin2", "seg_begin3"])
def _graph_gemm_kernel(
    # pointers
    src_ptr,  # (N, H, W, K_src) NHWC source: x or an intermediate
    w_ptr,  # (kh * kw * K_src, cols) B, row (dy * kw + dx) * K_src + c
    b_ptr,  # (cols,)
    dst0_ptr,  # (N, H, W, dst0_channels) NHWC destination of columns [0, seg_begin1)
    dst1_ptr,  # ... of columns [seg_begin1, seg_begin2)
    dst2_ptr,  # ... of columns [seg_begin2, seg_begin3)
    dst3_ptr,  # ... of columns [seg_begin3, cols)
    # sizes
    M, H, W, K_src, cols, kh, kw, OH, OW,
    seg_begin1, seg_begin2, seg_begin3,
    dst0_channels, dst1_channels, dst2_channels, dst3_channels,
    dst0_channel, dst1_channel, dst2_channel, dst3_channel,
    # meta-parameters
    POOL: tl.constexpr, SEGMENTS: tl.constexpr, STRIDE2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    m0, rows, m_mask, h, w = pixel_rows(pid_m, M, H, W, BLOCK_M)
    # 64-bit scalar base at the tile's first pixel, 32-bit offsets (a tile plus its halo).
    src_tile = src_ptr + m0.to(tl.int64) * K_src
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < cols
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if STRIDE2:
        # A grid reduction's kh x kw stride-2 unpadded convolution: rows are pixels of the
        # (OH, OW) output grid; offsets are relative to the first image the tile touches.
        img = (m0 + rows) // (OH * OW)
        r = (m0 + rows) % (OH * OW)
        img0 = m0 // (OH * OW)
        base = src_ptr + (img0 * H * W).to(tl.int64) * K_src
        for tap in range(0, kh * kw):
            hi = (r // OW) * 2 + tap // kw
            wi = (r % OW) * 2 + tap % kw
            pix = ((img - img0) * H + hi) * W + wi
            for c0 in range(0, K_src, BLOCK_K):
                cc = c0 + offs_k
                c_mask = cc < K_src
                a = tl.load(base + pix[:, None] * K_src + cc[None, :], mask=m_mask[:, None] & c_mask[None, :],
                            other=0.0)
                b = tl.load(w_ptr + (tap * K_src + cc)[:, None] * cols + offs_n[None, :],
                            mask=c_mask[:, None] & n_mask[None, :], other=0.0)
                acc = mma(a, b, acc, INPUT_PRECISION, UPCAST_DOT)
    elif POOL == 0:
        acc = window_gemm(src_tile, w_ptr, K_src, cols, kh, kw, H, W, h, w, rows, m_mask, offs_n, n_mask,
                           BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION, UPCAST_DOT)
    else:
        # A 1x1 over the 3x3/1/1 pool of the source, taken in fp32 while loading.
        for c0 in range(0, K_src, BLOCK_K):
            cc = c0 + offs_k
            c_mask = cc < K_src
            if POOL == 1:
                a32 = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
            else:
                a32 = tl.full((BLOCK_M, BLOCK_K), float("-inf"), tl.float32)
            for py in tl.static_range(-1, 2):
                for px in tl.static_range(-1, 2):
                    inside = window_inside(m_mask, h, w, py, px, H, W)
                    ok2 = inside[:, None] & c_mask[None, :]
                    v = tl.load(src_tile + (rows + (py * W + px))[:, None] * K_src + cc[None, :],
                                mask=ok2, other=0.0).to(tl.float32)
                    if POOL == 1:
                        a32 += v  # padding adds zeros: count_include_pad
                    else:
                        a32 = tl.maximum(a32, tl.where(ok2, v, float("-inf")), propagate_nan=tl.PropagateNan.ALL)
            if POOL == 1:
                a32 = a32 / 9.0
            # Rows past M and channels past K_src are zeroed, so -inf * 0 cannot make NaN.
            a = tl.where(m_mask[:, None] & c_mask[None, :], a32, 0.0).to(src_ptr.dtype.element_ty)
            b = tl.load(w_ptr + cc[:, None] * cols + offs_n[None, :], mask=c_mask[:, None] & n_mask[None, :], other=0.0)
            acc = mma(a, b, acc, INPUT_PRECISION, UPCAST_DOT)
    bias = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    y = tl.maximum(acc + bias[None, :], 0.0, propagate_nan=tl.PropagateNan.ALL).to(dst0_ptr.dtype.element_ty)
    col = offs_n[None, :]
    row_ok = m_mask[:, None]
    pix = (m0 + rows).to(tl.int64)[:, None]
    # Each column block to its destination's channel slice.
    tl.store(dst0_ptr + pix * dst0_channels + dst0_channel + col, y, mask=row_ok & (col < seg_begin1) & (col < cols))
    if SEGMENTS > 1:
        tl.store(dst1_ptr + pix * dst1_channels + dst1_channel + (col - seg_begin1), y,
                 mask=row_ok & (col >= seg_begin1) & (col < seg_begin2) & (col < cols))
    if SEGMENTS > 2:
        tl.store(dst2_ptr + pix * dst2_channels + dst2_channel + (col - seg_begin2), y,
                 mask=row_ok & (col >= seg_begin2) & (col < seg_begin3) & (col < cols))
    if SEGMENTS > 3:
        tl.store(dst3_ptr + pix * dst3_channels + dst3_channel + (col - seg_begin3), y,
                 mask=row_ok & (col >= seg_begin3) & (col < cols))


@triton.jit
def _max_pool_stride2_kernel(
    x_ptr,  # (N, H, W, C) NHWC input
    out_ptr,  # (N, OH, OW, out_channels) NHWC output: this launch writes [channel, channel + C)
    M, H, W, C, OH, OW, out_channels, channel,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """A grid reduction's pool branch: the 3x3 stride-2 unpadded max pool of x, copied
    into its output slice (fp32 max, NaN wins as in torch.max_pool2d)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    m0 = pid_m * BLOCK_M
    rows = tl.arange(0, BLOCK_M)
    m_mask = m0 + rows < M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < C
    img = (m0 + rows) // (OH * OW)
    r = (m0 + rows) % (OH * OW)
    img0 = m0 // (OH * OW)
    base = x_ptr + (img0 * H * W).to(tl.int64) * C
    mask = m_mask[:, None] & n_mask[None, :]
    best = tl.full((BLOCK_M, BLOCK_N), float("-inf"), tl.float32)
    for dy in tl.static_range(0, 3):
        for dx in tl.static_range(0, 3):
            pix = ((img - img0) * H + (r // OW) * 2 + dy) * W + (r % OW) * 2 + dx
            v = tl.load(base + pix[:, None] * C + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
            best = tl.maximum(best, v, propagate_nan=tl.PropagateNan.ALL)
    out = out_ptr + m0.to(tl.int64) * out_channels + channel
    tl.store(out + rows[:, None] * out_channels + offs_n[None, :], best.to(out_ptr.dtype.element_ty), mask=mask)


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


GRAPH_KERNELS = {"graph_gemm": (_graph_gemm_kernel, "spatial"), "max_pool_stride2": (_max_pool_stride2_kernel, None),
                 "graph_dgrad": (_graph_dgrad_kernel, "spatial")}


def graph_configs(kh: int, kw: int, stride2: bool, exact_fp32: bool) -> list[KernelConfig]:
    """The autotune list of one GEMM of a plan: the GoogLeNet pointwise kernel's for 1x1s
    (thin K slices: the pooled-A loads of the pool branch spilled 8-3900 bytes with the
    spatial list's 32-deep ones), the spatial kernel's for the K x K stages, without its
    128-row tile for stride 2 (16 bytes of spill in fp32 on sm_80)."""
    if (kh, kw) == (1, 1) and not stride2:
        return kernel_configs("pointwise", exact_fp32)
    configs = kernel_configs("spatial", exact_fp32)
    return [c for c in configs if c.block_m <= 64] if stride2 else configs


def pack_graph_weights_triton(graph: GraphPlan, weights, biases) -> tuple[list, list]:
    """Per GEMM of the plan: B = [W of its convolutions]^T, row-major, and the biases."""
    # The max-pool copy (no convolutions) gets empty placeholders.
    b = [torch.cat([as_gemm_b(weights[i]) for i in convs], dim=1).contiguous() if convs else weights[0].new_empty(0)
         for convs in graph.gemm_convs]
    bias = [torch.cat([biases[i] for i in convs]).contiguous() if convs else biases[0].new_empty(0)
            for convs in graph.gemm_convs]
    return b, bias


def graph_forward_triton(x: torch.Tensor, b: list, bias: list, flat_plan: list[int],
                         keep: list | None = None) -> torch.Tensor:
    """The plan's GEMMs, stage by stage, one launch each; x (N, C, H, W) any layout. With
    `keep`, the intermediates ((N, H, W, channels) NHWC each) are appended to it."""
    buf_channels, _, out_channels, stride, gemms = GraphPlan.from_flat(flat_plan)
    n, c, h, w = x.shape
    m = n * h * w
    if m >= 2**31:
        raise ValueError(f"x has {m} pixels (N*H*W); the Triton kernels take fewer than 2**31")
    oh, ow = (h, w) if stride == 1 else ((h - 3) // 2 + 1, (w - 3) // 2 + 1)
    if oh <= 0 or ow <= 0:
        raise ValueError(f"a stride-2 block needs at least 3x3 input, got {h}x{w}")
    x = x.contiguous(memory_format=torch.channels_last)
    out = torch.empty((n, out_channels, oh, ow), device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    # Intermediates without a border: the kernel masks the taps that fall outside.
    bufs = [torch.empty((n, h, w, ch), device=x.device, dtype=x.dtype) for ch in buf_channels]
    if keep is not None:
        keep += bufs
    if m == 0:
        return out
    precision = input_precision(x.dtype)
    upcast = interpreting() and x.dtype == torch.bfloat16
    exact = x.dtype == torch.float32 and precision == "ieee"
    for g in sorted(range(len(gemms)), key=lambda i: gemms[i][0]):  # stage order
        _stage, source, kh, kw, gemm_stride, _pad_h, _pad_w, cols, n_seg, *segs = gemms[g]
        rows = m if gemm_stride == 1 else n * oh * ow  # a stride-2 GEMM runs over the output grid
        if source == -4:  # the grid reduction's max pool, copied into its slice
            grid = (triton.cdiv(rows, 64), triton.cdiv(c, 64))
            _max_pool_stride2_kernel[grid](x, out, rows, h, w, c, oh, ow, out_channels, segs[3],
                                           BLOCK_M=64, BLOCK_N=64, num_warps=4)
            continue
        src = x if source < 0 else bufs[source]
        pool = {-1: POOL_NONE, -2: POOL_AVG, -3: POOL_MAX}[source] if source < 0 else POOL_NONE
        k_src = c if source < 0 else buf_channels[source]
        dsts, begins, channels, offsets = [], [], [], []
        for s in range(n_seg):
            begin, _end, dest, channel = segs[4 * s:4 * s + 4]
            dsts.append(out if dest < 0 else bufs[dest])
            begins.append(begin)
            channels.append(out_channels if dest < 0 else buf_channels[dest])
            offsets.append(channel)
        if n_seg > MAX_SEGMENTS:
            raise ValueError(f"a GEMM with {n_seg} destinations; the kernel takes at most {MAX_SEGMENTS}")
        pad = MAX_SEGMENTS - n_seg  # unused destinations: never stored to (SEGMENTS masks them)
        dsts += [dsts[0]] * pad
        begins = (begins[1:] + [cols] * MAX_SEGMENTS)[:MAX_SEGMENTS - 1]  # where segments 1..3 start
        channels += [channels[0]] * pad
        offsets += [0] * pad

        def launch(cfg: KernelConfig):
            grid = (triton.cdiv(rows, cfg.block_m), triton.cdiv(cols, cfg.block_n))
            _graph_gemm_kernel[grid](
                src, b[g], bias[g], *dsts, rows, h, w, k_src, cols, kh, kw, oh, ow, *begins, *channels, *offsets,
                POOL=pool, SEGMENTS=n_seg, STRIDE2=gemm_stride == 2,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                INPUT_PRECISION=precision, UPCAST_DOT=upcast, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

        configs = prune_configs(graph_configs(kh, kw, gemm_stride == 2, exact), rows, cols)
        launch(autotune("graph_gemm", (tuple(gemms[g]), n, h, w), x, configs, launch))
    return out


def graph_backward_triton(grad_out, x, y, intermediates: list, weights: list, needs: list[bool],
                          backward_plan: list[int]) -> list:
    """graph_backward on GPUs: graph_backward_reference's walk, with the data gradients of
    the stride-1 convolutions over intermediates (every K x K, 1 x n and n x 1 of a chain)
    in `_graph_dgrad_kernel`, masks fused; the shared-x GEMMs are cuBLAS, the weight
    gradients and a grid reduction's stride-2 data gradients cuDNN's."""
    n, _, h, w = x.shape
    if n * h * w >= 2**31:
        raise ValueError(f"x has {n * h * w} pixels (N*H*W); the Triton kernels take fewer than 2**31")
    exact = exact_fp32(x.dtype)

    def data_grad(g, weight, record, d_so_far, intermediate, last):
        _source, _dest, _channel, kh, kw, *_ = record
        t = intermediate.contiguous()
        cols, k_g = weight.shape[1], weight.shape[0]
        d = torch.empty_like(t) if d_so_far is None else d_so_far.reshape(t.shape)
        b = flipped_gemm_b(weight)
        g = g.contiguous()
        rows = n * h * w

        def launch(cfg: KernelConfig):
            grid = (triton.cdiv(rows, cfg.block_m), triton.cdiv(cols, cfg.block_n))
            _graph_dgrad_kernel[grid](
                g, b, t, d, rows, h, w, k_g, cols, kh, kw, ACCUMULATE=d_so_far is not None, MASK=last,
                **launch_options(cfg, x.dtype))

        configs = prune_configs(graph_configs(kh, kw, False, exact), rows, cols)
        # Accumulating launches read d: each timing restores it, so tuning never changes it.
        scratch = d.clone() if d_so_far is not None and x.is_cuda else None
        launch(autotune("graph_dgrad", (kh, kw, k_g, cols, n, h, w, d_so_far is not None, last), x, configs, launch,
                        restore=None if scratch is None else lambda: d.copy_(scratch)))
        return d.reshape(rows, cols), last

    return graph_backward_reference(grad_out, x.contiguous(memory_format=torch.channels_last), y, intermediates,
                                    weights, needs, backward_plan, data_grad=data_grad)
