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

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._layout import as_gemm_b
from ..spec import InceptionSpec

__all__ = [
    "kernel_configs",
    "POINTWISE_CONFIGS",
    "SPATIAL_CONFIGS",
    "TritonWeights",
    "interpreting",
    "pack_triton_weights",
    "forward_triton",
]


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


class KernelConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Small lists, each config checked ahead of time for sm_80 and sm_90 (no spills, tensor
# cores, shared memory in limit: tests/test_triton_aot.py, table in
# benchmarks/results/aot_resources.md). The pointwise kernel's pooled load holds nine
# shifted windows: with BLOCK_K 32, 128-row or 4-warp tiles spill, so it keeps
# 64 x (32..128) x 16 tiles on 8 warps (~130-250 registers, no spill). Every tile has at
# least 64 rows: a Hopper warpgroup MMA (wgmma) is 64 rows tall.
POINTWISE_CONFIGS = [
    KernelConfig(64, 64, 16, 8, 2),
    KernelConfig(64, 128, 16, 8, 2),
    KernelConfig(64, 32, 16, 8, 2),
]
SPATIAL_CONFIGS = [
    KernelConfig(64, 64, 32, 8, 3),
    KernelConfig(128, 64, 32, 8, 3),
    KernelConfig(64, 128, 32, 8, 3),
    KernelConfig(64, 32, 32, 4, 3),
]


def min_fp32_dot_k() -> int:
    """The smallest K of an fp32 tl.dot that the installed triton compiles for NVIDIA GPUs:
    8 in triton 3.8, 16 in 3.6 (which asserts K >= 16 for every operand wider than 8 bits).
    Asked of triton's own backend (a private function); 16, the bound of every version,
    where it cannot be asked."""
    try:
        from triton.backends.nvidia.compiler import min_dot_size

        return int(min_dot_size(None)(tl.float32, tl.float32)[2])
    except Exception:  # noqa: BLE001  (moved or changed in another triton: take the safe bound)
        return 16


# Exact fp32 dots run on FMA units with both operands in registers: a thinner K slice,
# and no 128-row tile (16 bytes of spill on sm_80), keep them from spilling. The slice is
# as thin as the installed triton allows (min_fp32_dot_k), the same under the interpreter.
EXACT_FP32_BLOCK_K = max(8, min_fp32_dot_k())


def kernel_configs(kind: str, exact_fp32: bool) -> list[KernelConfig]:
    """The autotune list of a kernel ("pointwise" or "spatial") for a dot precision."""
    configs = {"pointwise": POINTWISE_CONFIGS, "spatial": SPATIAL_CONFIGS}[kind]
    if exact_fp32:
        return [c._replace(block_k=EXACT_FP32_BLOCK_K) for c in configs if c.block_m <= 64]
    return list(configs)


@triton.jit
def _mma(a, b, acc, INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """acc + a @ b. UPCAST_DOT is set only under the interpreter, whose bf16 dot is wrong."""
    if UPCAST_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def _pixel_rows(pid_m, M, H, W, BLOCK_M: tl.constexpr):
    """A tile's BLOCK_M pixel rows of an NHWC grid (M = N*H*W rows): its first row m0, the
    row offsets from it, which are in range, and each row's (h, w)."""
    m0 = pid_m * BLOCK_M
    rows = tl.arange(0, BLOCK_M)
    hw = (m0 + rows) % (H * W)
    return m0, rows, m0 + rows < M, hw // W, hw % W


@triton.jit
def _tile_gemm(
    a_tile,  # (rows, K) row-major, from the tile's first row
    b_ptr,  # (K, N) row-major
    K, N, rows, m_mask, offs_n, n_mask,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """A[rows, :K] @ B[:K, offs_n] in fp32: the plain GEMM main loop of every kernel whose A
    is rows of one contiguous matrix (x, or a gradient)."""
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        k_mask = kk < K
        a = tl.load(a_tile + rows[:, None] * K + kk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptr + kk[:, None] * N + offs_n[None, :], mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = _mma(a, b, acc, INPUT_PRECISION, UPCAST_DOT)
    return acc


@triton.jit
def _window_gemm(
    src_tile,  # (rows, K_src) NHWC pixel rows from the tile's first pixel, with their halo
    w_ptr,  # (kh * kw * K_src, cols) B, row (dy * kw + dx) * K_src + c
    K_src, cols, kh, kw, H, W, h, w, rows, m_mask, offs_n, n_mask,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """The stride-1 kh x kw implicit GEMM of a tile in fp32, 'same' zero padding by masks:
    the main loop of every K x K convolution (GoogLeNet's and the branch graph's) and of
    their data gradients (the flipped weights make those stride-1 convolutions too)."""
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tap in range(0, kh * kw):
        dy = tap // kw - kh // 2
        dx = tap % kw - kw // 2
        ok = m_mask & (h + dy >= 0) & (h + dy < H) & (w + dx >= 0) & (w + dx < W)  # zero padding
        for c0 in range(0, K_src, BLOCK_K):
            cc = c0 + offs_k
            c_mask = cc < K_src
            a = tl.load(src_tile + (rows + (dy * W + dx))[:, None] * K_src + cc[None, :],
                        mask=ok[:, None] & c_mask[None, :], other=0.0)
            b = tl.load(w_ptr + (tap * K_src + cc)[:, None] * cols + offs_n[None, :],
                        mask=c_mask[:, None] & n_mask[None, :], other=0.0)
            acc = _mma(a, b, acc, INPUT_PRECISION, UPCAST_DOT)
    return acc


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
        acc = _tile_gemm(x_tile, w_red_ptr, C_in, n_red, rows, m_mask, offs_n, n_mask,
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
                    ok = m_mask & (h + dy >= 0) & (h + dy < H) & (w + dx >= 0) & (w + dx < W)
                    ok2 = ok[:, None] & k_mask[None, :]
                    v = tl.load(x_tile + (rows + (dy * W + dx))[:, None] * C_in + kk[None, :], mask=ok2)
                    v = tl.where(ok2, v.to(tl.float32), float("-inf"))
                    a = tl.maximum(a, v, propagate_nan=tl.PropagateNan.ALL)  # NaN wins, as in torch
            # Rows past M and channels past C_in stay -inf; zero them so that 0 * -inf
            # cannot put NaN into the product.
            a = tl.where(m_mask[:, None] & k_mask[None, :], a, 0.0).to(x_ptr.dtype.element_ty)
            b = tl.load(w_pool_ptr + kk[:, None] * cp + offs_n[None, :],
                        mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            acc = _mma(a, b, acc, INPUT_PRECISION, UPCAST_DOT)
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
    m0, rows, m_mask, h, w = _pixel_rows(pid_m, M, H, W, BLOCK_M)
    t_tile = t_ptr + m0.to(tl.int64) * r  # 64-bit scalar base, 32-bit offsets (see above)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < cout
    acc = _window_gemm(t_tile, w_ptr, r, cout, K, K, H, W, h, w, rows, m_mask, offs_n, n_mask,
                       BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION, UPCAST_DOT)
    bias = tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    y = tl.maximum(acc + bias[None, :], 0.0, propagate_nan=tl.PropagateNan.ALL).to(out_ptr.dtype.element_ty)
    out_tile = out_ptr + m0.to(tl.int64) * c_out + channel
    tl.store(out_tile + rows[:, None] * c_out + offs_n[None, :], y, mask=m_mask[:, None] & n_mask[None, :])


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


def input_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"  # exact fp32; fp16/bf16 use tensor cores whatever this says


def prune_configs(configs: list[KernelConfig], rows: int, cols: int) -> list[KernelConfig]:
    """Drop tiles far larger than the problem: they only add masked-out work."""
    fitting = [c for c in configs if c.block_m <= max(64, triton.next_power_of_2(rows))
               and c.block_n <= max(32, triton.next_power_of_2(cols))]
    return fitting or configs[-1:]


_BEST: dict[tuple, tuple[KernelConfig, KernelConfig]] = {}


def _launch(x, tw: TritonWeights, spec: InceptionSpec, out, t3, t5, cfg_pw: KernelConfig, cfg_sp: KernelConfig):
    n, h, w = x.shape[0], x.shape[2], x.shape[3]
    m = n * h * w
    precision = input_precision(x.dtype)
    upcast = interpreting() and x.dtype == torch.bfloat16
    red_cols = spec.reduce_channels
    red_tiles_n = triton.cdiv(red_cols, cfg_pw.block_n)
    grid = (triton.cdiv(m, cfg_pw.block_m), red_tiles_n + triton.cdiv(spec.pool_proj, cfg_pw.block_n))
    _pointwise_kernel[grid](
        x, tw.w_red, tw.b_red, tw.w_pool, tw.b_pool, out, t3, t5,
        m, h, w, spec.in_channels, spec.ch1x1, spec.ch3x3red, spec.ch5x5red, spec.pool_proj,
        spec.out_channels, red_tiles_n,
        BLOCK_M=cfg_pw.block_m, BLOCK_N=cfg_pw.block_n, BLOCK_K=cfg_pw.block_k, INPUT_PRECISION=precision, UPCAST_DOT=upcast,
        num_warps=cfg_pw.num_warps, num_stages=cfg_pw.num_stages,
    )
    tiles_m = triton.cdiv(m, cfg_sp.block_m)
    tiles3_n = triton.cdiv(spec.ch3x3, cfg_sp.block_n)
    tiles5_n = triton.cdiv(spec.ch5x5, cfg_sp.block_n)
    _spatial_kernel[(tiles_m * (tiles3_n + tiles5_n),)](
        t3, tw.w3, tw.b3, t5, tw.w5, tw.b5, out,
        m, h, w, spec.ch3x3red, spec.ch3x3, spec.k3, spec.ch5x5red, spec.ch5x5, spec.k5,
        spec.ch1x1, spec.out_channels, tiles_m, tiles3_n, tiles5_n,
        BLOCK_M=cfg_sp.block_m, BLOCK_N=cfg_sp.block_n, BLOCK_K=cfg_sp.block_k, INPUT_PRECISION=precision, UPCAST_DOT=upcast,
        num_warps=cfg_sp.num_warps, num_stages=cfg_sp.num_stages,
    )


def _autotune(x, tw, spec, out, t3, t5) -> tuple[KernelConfig, KernelConfig]:
    """Pick the fastest pruned config pair per problem, once (CUDA only)."""
    n, _, h, w = x.shape
    key = (spec, n, h, w, x.dtype, input_precision(x.dtype), x.device.index)
    if key not in _BEST:
        m = n * h * w
        exact = x.dtype == torch.float32 and input_precision(x.dtype) == "ieee"
        pointwise = prune_configs(kernel_configs("pointwise", exact), m, spec.reduce_channels)
        spatial = prune_configs(kernel_configs("spatial", exact), m, max(spec.ch3x3, spec.ch5x5))
        if interpreting() or not x.is_cuda:
            _BEST[key] = (pointwise[0], spatial[0])
        else:
            from triton.testing import do_bench

            timings = {
                (p, s): do_bench(lambda p=p, s=s: _launch(x, tw, spec, out, t3, t5, p, s), warmup=5, rep=20)
                for p in pointwise for s in spatial
            }
            _BEST[key] = min(timings, key=timings.get)
    return _BEST[key]


def forward_triton(x: torch.Tensor, tw: TritonWeights, spec: InceptionSpec, out: torch.Tensor | None = None) -> torch.Tensor:
    """Checked by the caller (ops/inception.py); allocates and launches."""
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
    cfg_pw, cfg_sp = _autotune(x, tw, spec, out, t3, t5)
    _launch(x, tw, spec, out, t3, t5, cfg_pw, cfg_sp)
    return out


# -- ahead-of-time compilation (no GPU needed) ------------------------------------

#: Opt-in shared memory per block, bytes (CUDA programming guide, compute capabilities).
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


class CompiledKernel(NamedTuple):
    kernel: str
    config: KernelConfig
    dtype: str  # with "-ieee" for exact fp32 dots
    capability: int
    registers: int
    stack: int  # bytes of stack frame per thread: > 0 means spills
    local: int  # bytes of local memory per thread
    shared: int  # bytes of shared memory per block
    ptx: str

    @property
    def tensor_core_op(self) -> str | None:
        for op in ("wgmma", "mma.sync"):
            if op in self.ptx:
                return op
        return None


_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
#: Pointer arguments that are not of the data dtype.
_POINTER_DTYPES = {"argmax_ptr": "i8"}


def jit_kernel(kind: str):
    """The JIT function of a kernel kind: the forward's "pointwise" and "spatial", or one of
    the backward's (inception_triton_backward.BACKWARD_KERNELS)."""
    from .branch_graph_triton import GRAPH_KERNELS
    from .inception_triton_backward import BACKWARD_KERNELS

    kernels = {"pointwise": _pointwise_kernel, "spatial": _spatial_kernel,
               **{k: fn for k, (fn, _) in BACKWARD_KERNELS.items()}, **{k: fn for k, (fn, _) in GRAPH_KERNELS.items()}}
    if kind not in kernels:
        raise ValueError(f"kind must be one of {sorted(kernels)}, got {kind!r}")
    return kernels[kind]


def _cuda_tool(name: str) -> str:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} is not in the triton wheel at {path}")
    return path


def compile_ahead_of_time(
    kind: str, config: KernelConfig, dtype: torch.dtype, capability: int, precision: str | None = None,
    constexprs: dict[str, int] | None = None,
) -> CompiledKernel:
    """Compile one kernel config for an sm_<capability> GPU, and read its resource usage.

    `precision` is the dot's input precision; by default tf32 for fp32 (the tensor-core
    path) and "ieee" otherwise. `constexprs` sets a kernel's other compile-time arguments
    (the branch-graph kernel's POOL and SEGMENTS).
    """
    import re
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = jit_kernel(kind)
    if not isinstance(fn, triton.runtime.JITFunction):
        raise RuntimeError("ahead-of-time compilation needs real JIT kernels: unset TRITON_INTERPRET")
    meta = {"BLOCK_M": config.block_m, "BLOCK_N": config.block_n, "BLOCK_K": config.block_k,
            "INPUT_PRECISION": precision or ("tf32" if dtype == torch.float32 else "ieee"), "UPCAST_DOT": False,
            **(constexprs or {})}
    meta = {k: v for k, v in meta.items() if k in fn.arg_names}  # kernels without a dot take fewer
    pointers = [name for name in fn.arg_names if name.endswith("_ptr")]
    signature = {name: ("constexpr" if name in meta
                        else f"*{_POINTER_DTYPES.get(name, _TRITON_DTYPE[dtype])}" if name in pointers else "i32")
                 for name in fn.arg_names}
    # Launches see 16-byte aligned pointers (torch allocations), as here.
    attrs = {(fn.arg_names.index(p),): [["tt.divisibility", 16]] for p in pointers}
    source = ASTSource(fn=fn, signature=signature, constexprs=meta, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([_cuda_tool("cuobjdump"), "-res-usage", f.name],
                               capture_output=True, text=True, check=True).stdout

    def field(name: str) -> int:
        match = re.search(rf"\b{name}:(\d+)", usage)
        if match is None:
            raise RuntimeError(f"cuobjdump -res-usage printed no {name}: {usage!r}")
        return int(match.group(1))

    return CompiledKernel(
        kernel=kind, config=config, capability=capability,
        dtype=_TRITON_DTYPE[dtype] + ("-ieee" if dtype == torch.float32 and meta.get("INPUT_PRECISION") == "ieee" else ""),
        registers=field("REG"), stack=field("STACK"), local=field("LOCAL"),
        shared=max(field("SHARED"), compiled.metadata.shared), ptx=compiled.asm["ptx"],
    )
