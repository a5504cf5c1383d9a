"""Triton kernels of the fused Inception backward (GPU), and their host wrapper.

The same algorithm as the CPU backward (csrc/inception_cpu_backward.cpp), on NHWC
pixel rows, with three launches of our own between cuBLAS/cuDNN calls:

1. `_spatial_dgrad_kernel`: dt3 and dt5 in one launch, each an implicit GEMM of the
   branch gradient with the flipped, transposed K x K weights; the epilogue applies
   the reduction's ReLU mask (t > 0) and stores into its columns of
   d_red = [g1 | dt3 | dt5].
2. `_pool_grad_kernel`: d_pooled = gp @ Wp, and in its epilogue the 3x3 max pool of
   x with torch's argmax (row-major scan; ties to the first, NaN to the last NaN),
   stored as one int8 window position per element, plus the pooled values for dWp.
3. `_input_grad_kernel`: dx = d_red @ [W1; W3r; W5r], the one GEMM of the three 1x1
   convolutions that share x, plus the max-pool gradient gathered in its epilogue:
   each pixel adds d_pooled of the neighbours whose argmax points at it. Gathering
   instead of scattering needs no atomics: dx is deterministic.

The branch gradients (ReLU masks from the saved output) are one elementwise op each;
t3, t5 are recomputed by one cuBLAS addmm each; the weight gradients are cuBLAS GEMMs
(the three shared-input 1x1 convolutions as one) and cuDNN's weight-only convolution
backward for K3 and K5.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._layout import flipped_gemm_b
from .inception import gradients_in_order
from .triton_gemm import (
    KernelConfig,
    autotune,
    exact_fp32,
    kernel_configs,
    launch_options,
    pixel_rows,
    prune_configs,
    tile_gemm,
    window_gemm,
    window_inside,
)

__all__ = ["BACKWARD_KERNELS", "backward_configs", "backward_triton"]


@triton.jit(do_not_specialize=["c3", "r3", "K3", "c5", "r5", "K5", "c1", "tiles3_m", "tiles3_n", "tiles5_n"])
def _spatial_dgrad_kernel(
    # pointers
    g3_ptr,  # (N, H, W, c3) NHWC ReLU-masked gradient of the K3 branch
    w3_ptr,  # (K3 * K3 * c3, r3) W3 flipped and transposed: row (dy * K3 + dx) * c3 + co
    t3_ptr,  # (N, H, W, r3) NHWC recomputed 3x3 reduction: its ReLU mask
    g5_ptr,  # (N, H, W, c5)
    w5_ptr,  # (K5 * K5 * c5, r5)
    t5_ptr,  # (N, H, W, r5)
    d_red_ptr,  # (N, H, W, n_red) NHWC [g1 | dt3 | dt5]: this launch writes [c1, n_red)
    # sizes
    M, H, W, c3, r3, K3, c5, r5, K5, c1, n_red, tiles3_m, tiles3_n, tiles5_n,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    pid = tl.program_id(0)
    tiles3 = tiles3_m * tiles3_n
    if pid < tiles3:
        g_ptr, w_ptr, t_ptr = g3_ptr, w3_ptr, t3_ptr
        cg, r, K, col, tiles_n, local = c3, r3, K3, c1, tiles3_n, pid
    else:
        g_ptr, w_ptr, t_ptr = g5_ptr, w5_ptr, t5_ptr
        cg, r, K, col, tiles_n, local = c5, r5, K5, c1 + r3, tiles5_n, pid - tiles3
    pid_m = local // tiles_n
    pid_n = local % tiles_n
    m0, rows, m_mask, h, w = pixel_rows(pid_m, M, H, W, BLOCK_M)
    # 64-bit scalar base at the tile's first pixel, 32-bit offsets (tile plus halo).
    g_tile = g_ptr + m0.to(tl.int64) * cg
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < r
    # dt[p] = sum over taps of g[p + tap - pad] @ W^T[tap]: the forward's implicit GEMM
    # on the gradient, with the flipped kernel.
    acc = window_gemm(g_tile, w_ptr, cg, r, K, K, H, W, h, w, rows, m_mask, offs_n, n_mask,
                       BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION, UPCAST_DOT)
    out_mask = m_mask[:, None] & n_mask[None, :]
    t_tile = t_ptr + m0.to(tl.int64) * r
    t = tl.load(t_tile + rows[:, None] * r + offs_n[None, :], mask=out_mask, other=0.0)
    # torch.relu's gradient: none where t <= 0 (a NaN t passes it, as threshold_backward does).
    dt = tl.where(t <= 0, 0.0, acc).to(d_red_ptr.dtype.element_ty)
    d_tile = d_red_ptr + m0.to(tl.int64) * n_red + col
    tl.store(d_tile + rows[:, None] * n_red + offs_n[None, :], dt, mask=out_mask)


@triton.jit
def _pool_grad_kernel(
    # pointers
    gp_ptr,  # (M, cp) ReLU-masked gradient of the pool branch
    wp_ptr,  # (cp, C_in) Wp, row-major
    x_ptr,  # (N, H, W, C_in) NHWC input
    d_pooled_ptr,  # (M, C_in) gp @ Wp
    argmax_ptr,  # (M, C_in) int8: window position dy * 3 + dx of each pixel's max
    pooled_ptr,  # (M, C_in) the 3x3/1/1 max pool of x
    # sizes
    M, H, W, C_in, cp,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    m0 = pid_m * BLOCK_M
    rows = tl.arange(0, BLOCK_M)
    m_mask = m0 + rows < M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < C_in
    acc = tile_gemm(gp_ptr + m0.to(tl.int64) * cp, wp_ptr, cp, C_in, rows, m_mask, offs_n, n_mask,
                     BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION, UPCAST_DOT)
    out_mask = m_mask[:, None] & n_mask[None, :]
    offs = rows[:, None] * C_in + offs_n[None, :]
    base = m0.to(tl.int64) * C_in
    # Stored before the max pool, so that its registers are free for the running max and
    # argmax (64x128 tiles spilled 528 bytes on sm_80 the other way round).
    tl.store(d_pooled_ptr + base + offs, acc.to(d_pooled_ptr.dtype.element_ty), mask=out_mask)

    # The max pool and torch's argmax: scan the window row-major; a value replaces the
    # running max when it is greater or NaN; the first in-bounds position always does.
    hw = (m0 + rows) % (H * W)
    h = hw // W
    w = hw % W
    x_tile = x_ptr + m0.to(tl.int64) * C_in
    best = tl.full((BLOCK_M, BLOCK_N), float("-inf"), tl.float32)
    arg = tl.full((BLOCK_M, BLOCK_N), -1, tl.int32)
    for dy in tl.static_range(0, 3):
        for dx in tl.static_range(0, 3):
            ok = window_inside(m_mask, h, w, dy - 1, dx - 1, H, W)
            ok2 = ok[:, None] & n_mask[None, :]
            v = tl.load(x_tile + (rows + ((dy - 1) * W + dx - 1))[:, None] * C_in + offs_n[None, :],
                        mask=ok2, other=0.0).to(tl.float32)
            take = ok2 & ((v > best) | (v != v) | (arg < 0))
            best = tl.where(take, v, best)
            arg = tl.where(take, dy * 3 + dx, arg)
    tl.store(argmax_ptr + base + offs, arg.to(tl.int8), mask=out_mask)
    tl.store(pooled_ptr + base + offs, best.to(pooled_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _input_grad_kernel(
    # pointers
    d_red_ptr,  # (M, n_red) [g1 | dt3 | dt5]
    w_ptr,  # (n_red, C_in) [W1; W3r; W5r], row-major
    d_pooled_ptr,  # (M, C_in) from _pool_grad_kernel
    argmax_ptr,  # (M, C_in) int8 from _pool_grad_kernel
    dx_ptr,  # (N, H, W, C_in) NHWC gradient of x
    # sizes
    M, H, W, C_in, n_red,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    m0 = pid_m * BLOCK_M
    rows = tl.arange(0, BLOCK_M)
    m_mask = m0 + rows < M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < C_in
    acc = tile_gemm(d_red_ptr + m0.to(tl.int64) * n_red, w_ptr, n_red, C_in, rows, m_mask, offs_n, n_mask,
                     BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION, UPCAST_DOT)

    # The max pool's gradient, gathered: neighbour q = p + (dy - 1, dx - 1) sends its
    # d_pooled to p when its argmax is p's position in q's window, (2 - dy) * 3 + (2 - dx).
    hw = (m0 + rows) % (H * W)
    h = hw // W
    w = hw % W
    base = m0.to(tl.int64) * C_in
    for dy in tl.static_range(0, 3):
        for dx in tl.static_range(0, 3):
            ok = window_inside(m_mask, h, w, dy - 1, dx - 1, H, W)
            ok2 = ok[:, None] & n_mask[None, :]
            q = (rows + ((dy - 1) * W + dx - 1))[:, None] * C_in + offs_n[None, :]
            arg = tl.load(argmax_ptr + base + q, mask=ok2, other=-1).to(tl.int32)
            hit = ok2 & (arg == (2 - dy) * 3 + (2 - dx))
            acc += tl.load(d_pooled_ptr + base + q, mask=hit, other=0.0).to(tl.float32)
    tl.store(dx_ptr + base + rows[:, None] * C_in + offs_n[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


# -- host wrapper ----------------------------------------------------------------

#: kernel kind -> (kernel, autotune list kind) for launches and ahead-of-time checks
BACKWARD_KERNELS = {
    "spatial_dgrad": (_spatial_dgrad_kernel, "spatial"),
    "pool_grad": (_pool_grad_kernel, "pointwise"),
    "input_grad": (_input_grad_kernel, "pointwise"),
}

# The max-pool epilogues keep two more (BLOCK_M, BLOCK_N) tiles live (running max and
# argmax, or the gathered sums): 64x128 tiles spilled 480-2600 bytes per thread on sm_80
# and sm_90 (tests/test_triton_aot.py), so those two kernels stop at 64x64.
_MAX_EPILOGUE_TILE = 64 * 64


def backward_configs(kind: str, exact_fp32: bool) -> list[KernelConfig]:
    """The autotune list of a backward kernel for a dot precision."""
    configs = kernel_configs(BACKWARD_KERNELS[kind][1], exact_fp32)
    if kind == "spatial_dgrad":
        return configs
    return [c for c in configs if c.block_m * c.block_n <= _MAX_EPILOGUE_TILE]


def _pick(kind: str, problem: tuple, rows: int, cols: int, x: torch.Tensor, launch) -> KernelConfig:
    """The fastest pruned config of one backward kernel for a problem, once (CUDA only)."""
    configs = prune_configs(backward_configs(kind, exact_fp32(x.dtype)), rows, cols)
    return autotune(f"googlenet_{kind}", problem, x, configs, launch)


def _meta(cfg: KernelConfig, x: torch.Tensor) -> dict:
    return launch_options(cfg, x.dtype)


def backward_triton(grad_out, x, y, w, needs) -> tuple[torch.Tensor | None, ...]:
    """Gradients of (x, w1, b1, ..., wp, bp) from the saved x and y; None where not needed.

    `w` is an InceptionWeights in Conv2d layout; x, y, grad_out on one device.
    """
    s = w.spec()
    n, cin, h, wd = x.shape
    m = n * h * wd
    if m >= 2**31:
        raise ValueError(f"x has {m} pixels (N*H*W); the Triton kernels take fewer than 2**31")
    cl = torch.channels_last
    x, grad_out, y = (t.contiguous(memory_format=cl) for t in (x, grad_out, y))
    rows = lambda t: t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])  # noqa: E731  (a view: NHWC)
    image = lambda r: r.reshape(n, h, wd, -1).permute(0, 3, 1, 2)  # noqa: E731
    x_rows, g_rows, y_rows = rows(x), rows(grad_out), rows(y)
    relu_backward = torch.ops.aten.threshold_backward  # as torch.relu: none where y <= 0
    c1, r3, r5 = s.ch1x1, s.ch3x3red, s.ch5x5red
    n_red = s.reduce_channels
    d_red = torch.empty((m, n_red), device=x.device, dtype=x.dtype)
    d_red[:, :c1] = relu_backward(g_rows[:, s.slice1x1], y_rows[:, s.slice1x1], 0)
    g3, g5, gp = (relu_backward(g_rows[:, sl], y_rows[:, sl], 0) for sl in (s.slice3x3, s.slice5x5, s.slice_pool))
    t3 = torch.relu(torch.addmm(w.b3r, x_rows, w.w3r.flatten(1).t()))
    t5 = torch.relu(torch.addmm(w.b5r, x_rows, w.w5r.flatten(1).t()))
    problem = (s, n, h, wd)

    # 1. dt3, dt5 into d_red.
    w3f, w5f = flipped_gemm_b(w.w3), flipped_gemm_b(w.w5)

    def dgrad(cfg: KernelConfig):
        tiles_m = triton.cdiv(m, cfg.block_m)
        tiles3_n, tiles5_n = triton.cdiv(r3, cfg.block_n), triton.cdiv(r5, cfg.block_n)
        _spatial_dgrad_kernel[(tiles_m * (tiles3_n + tiles5_n),)](
            g3, w3f, t3, g5, w5f, t5, d_red,
            m, h, wd, s.ch3x3, r3, s.k3, s.ch5x5, r5, s.k5, c1, n_red, tiles_m, tiles3_n, tiles5_n,
            **_meta(cfg, x))

    if m > 0:
        dgrad(_pick("spatial_dgrad", problem, m, max(r3, r5), x, dgrad))

    # 2. d_pooled = gp @ Wp, the argmax and the pooled input.
    wp = w.wp.flatten(1).contiguous()  # (cp, C_in)
    d_pooled = torch.empty((m, cin), device=x.device, dtype=x.dtype)
    argmax = torch.empty((m, cin), device=x.device, dtype=torch.int8)
    pooled = torch.empty((m, cin), device=x.device, dtype=x.dtype)

    def pool_grad(cfg: KernelConfig):
        grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(cin, cfg.block_n))
        _pool_grad_kernel[grid](gp, wp, x, d_pooled, argmax, pooled, m, h, wd, cin, s.pool_proj, **_meta(cfg, x))

    if m > 0:
        pool_grad(_pick("pool_grad", problem, m, cin, x, pool_grad))

    # 3. dx = d_red @ [W1; W3r; W5r] + the gathered max-pool gradient.
    dx = None
    if needs[0]:
        w_1x1 = torch.cat([w.w1, w.w3r, w.w5r]).flatten(1).contiguous()  # (n_red, C_in)
        dx_rows = torch.empty((m, cin), device=x.device, dtype=x.dtype)

        def input_grad(cfg: KernelConfig):
            grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(cin, cfg.block_n))
            _input_grad_kernel[grid](d_red, w_1x1, d_pooled, argmax, dx_rows, m, h, wd, cin, n_red, **_meta(cfg, x))

        if m > 0:
            input_grad(_pick("input_grad", problem, m, cin, x, input_grad))
        dx = image(dx_rows)

    # Weight gradients: one GEMM for the three 1x1s sharing x, cuDNN for K3/K5, one for Wp.
    # Own storage per gradient (weights are small): a custom op's outputs may not alias.
    dw_red = [g.clone() for g in (d_red.t() @ x_rows).split([c1, r3, r5])]
    db_red = [g.clone() for g in d_red.sum(0).split([c1, r3, r5])]

    def spatial_wgrad(g_branch, t_branch, weight):
        k = weight.shape[-1]
        _, dw, db = torch.ops.aten.convolution_backward(
            image(g_branch), image(t_branch), weight, [weight.shape[0]],
            [1, 1], [k // 2, k // 2], [1, 1], False, [0, 0], 1, [False, True, True])
        return dw, db

    dw3, db3 = spatial_wgrad(g3, t3, w.w3)
    dw5, db5 = spatial_wgrad(g5, t5, w.w5)
    dwp = gp.t() @ pooled
    return gradients_in_order(w, needs, dx, dw_red, db_red, (dw3, db3), (dw5, db5), (dwp, gp.sum(0)))
