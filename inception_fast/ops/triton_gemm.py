"""The Triton layers every fused kernel shares: tile configs, autotuning, GEMM main loops.

The kernel file (branch_graph_triton.py) imports
from here and from nothing above them; the ahead-of-time tooling is triton_aot.py.

- `KernelConfig` and the two autotune lists: POINTWISE_CONFIGS for GEMMs whose A tile is
  loaded plainly or pooled while loading (1x1 convolutions), SPATIAL_CONFIGS for K x K
  implicit GEMMs; `kernel_configs` gives a list for a dot precision, `prune_configs` drops
  tiles far larger than a problem.
- `autotune`: one cache for every kernel. Under TRITON_INTERPRET=1 or off CUDA it takes
  the list's first config, so the interpreter tests run the configs a GPU lists first.
- @triton.jit helpers, inlined into the kernels: `mma` (one tl.dot step), `pixel_rows`
  (a tile's NHWC pixel rows), `window_inside` (the in-grid mask of one window tap),
  `tile_gemm` (A rows of one matrix) and `window_gemm` (a stride-1 kh x kw implicit GEMM).

Addressing convention of every kernel: a 64-bit scalar base at the tile's first pixel,
then 32-bit offsets (a tile plus a halo row), so N*H*W*C may pass 2**31 while the
per-element offsets stay cheap in registers; pixel indices themselves are 32-bit, which
the host wrappers guard (N*H*W < 2**31).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import triton
import triton.language as tl

from .backend import interpreting

__all__ = [
    "EXACT_FP32_BLOCK_K",
    "KernelConfig",
    "POINTWISE_CONFIGS",
    "SPATIAL_CONFIGS",
    "TUNED",
    "autotune",
    "exact_fp32",
    "input_precision",
    "interpreting",
    "kernel_configs",
    "launch_options",
    "min_fp32_dot_k",
    "mma",
    "pixel_rows",
    "prune_configs",
    "round_tf32",
    "round_tf32_host",
    "tile_gemm",
    "tuned_key",
    "window_gemm",
    "window_inside",
]


class KernelConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Small lists, each config checked ahead of time for sm_80 and sm_90 (no spills, tensor
# cores, shared memory in limit: tests/test_triton_aot.py, table in
# benchmarks/results/aot_resources.md). A pooled A load holds nine shifted windows: with
# BLOCK_K 32, 128-row or 4-warp tiles spill, so the pointwise list keeps 64 x (32..128) x 16
# tiles on 8 warps (~130-250 registers, no spill). Every tile has at least 64 rows: a
# Hopper warpgroup MMA (wgmma) is 64 rows tall.
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
    """The autotune list of a kernel kind ("pointwise" or "spatial") for a dot precision."""
    configs = {"pointwise": POINTWISE_CONFIGS, "spatial": SPATIAL_CONFIGS}[kind]
    if exact_fp32:
        return [c._replace(block_k=EXACT_FP32_BLOCK_K) for c in configs if c.block_m <= 64]
    return list(configs)


def input_precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision for a data dtype: tf32 for fp32 when
    torch.backends.cuda.matmul.allow_tf32 allows, else exact ("ieee")."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"  # exact fp32; fp16/bf16 use tensor cores whatever this says


def exact_fp32(dtype: torch.dtype) -> bool:
    """Whether a dtype's dots run exact fp32 on FMA units (the exact-fp32 config lists)."""
    return dtype == torch.float32 and input_precision(dtype) == "ieee"


def launch_options(cfg: KernelConfig, dtype: torch.dtype) -> dict:
    """The meta-parameters of a GEMM kernel launch: tile, dot precision, warps, stages.
    UPCAST_DOT is set only under the interpreter, whose bf16 dot is wrong."""
    return dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                INPUT_PRECISION=input_precision(dtype), UPCAST_DOT=interpreting() and dtype == torch.bfloat16,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def prune_configs(configs: list[KernelConfig], rows: int, cols: int) -> list[KernelConfig]:
    """Drop tiles far larger than the problem: they only add masked-out work."""
    # Plain Python: triton.next_power_of_2 is a constexpr function in triton 3.8, slow on the host.
    fitting = [c for c in configs if c.block_m <= max(64, 1 << max(rows - 1, 0).bit_length())
               and c.block_n <= max(32, 1 << max(cols - 1, 0).bit_length())]
    return fitting or configs[-1:]


#: (kind, *problem, dtype, dot precision, device) -> the config autotune picked.
TUNED: dict[tuple, KernelConfig] = {}


def tuned_key(kind: str, problem: tuple, x: torch.Tensor) -> tuple:
    """autotune's cache key: (kind, *problem, x.dtype, input_precision(x.dtype), x.device)."""
    return (kind, *problem, x.dtype, input_precision(x.dtype), x.device)


def autotune(kind: str, problem: tuple, x: torch.Tensor, configs: list[KernelConfig],
             launch: Callable[[KernelConfig], object], restore: Callable[[], object] | None = None) -> KernelConfig:
    """The config of `configs` that runs `launch` fastest for a problem, picked once.

    The cache key is (kind, *problem, x.dtype, input_precision(x.dtype), x.device): the
    caller names the kernel and the sizes that change its speed, x gives the rest. On CUDA
    every config is timed by triton.testing.do_bench (imported at each use, so that a
    caller may shorten it); `restore` runs after each timing, for launches that read what
    they write (an accumulating launch). Under the interpreter or off CUDA: configs[0].
    """
    key = tuned_key(kind, problem, x)
    if key not in TUNED:
        if interpreting() or not x.is_cuda or len(configs) == 1:
            TUNED[key] = configs[0]
        else:
            from triton.testing import do_bench

            timings = {}
            for cfg in configs:
                timings[cfg] = do_bench(lambda cfg=cfg: launch(cfg), warmup=5, rep=20)
                if restore is not None:
                    restore()
            TUNED[key] = min(timings, key=timings.get)
    return TUNED[key]


# -- @triton.jit helpers ------------------------------------------------------------------


def round_tf32_host(t: torch.Tensor) -> torch.Tensor:
    """An fp32 tensor rounded to the nearest TF32 values (ties away from zero, as cuBLAS and
    cuDNN round; inf kept, NaN kept): what the Triton kernels' tf32 dots are fed. tl.dot's
    tf32 mode hands the tensor cores fp32 bits and the hardware drops the low 13 mantissa
    bits, a truncation whose bias adds up over K (triton issue 4574). On an H200 that put
    our TF32 Inception-v3 blocks 4-6x further from fp64 than cuDNN's. Rounding inside the
    main loop gave sm_80 configs stack frames, so the operands are rounded where they are
    made: x and B here, once per call, and every intermediate in the epilogue that stores
    it (round_tf32; the block's outputs too, which no dot of its own reads). Left
    truncated: an average-pool slot's pooled operand, made inside the main loop. Raises TypeError for another dtype (its bits would be misread)."""
    if t.dtype != torch.float32:
        raise TypeError(f"round_tf32_host rounds float32 tensors, got {t.dtype}")
    rounded = ((t.view(torch.int32) + 0x1000) & -8192).view(torch.float32)
    return torch.where(torch.isnan(t), t, rounded)


@triton.jit
def round_tf32(x):
    """round_tf32_host inside a kernel (integer ops, so the interpreter runs it too)."""
    # -8192 = 0xFFFFE000: keep sign, exponent and 10 mantissa bits. An infinity comes
    # through (mantissa 0); a NaN could carry into inf or -0, so it is kept as is.
    rounded = ((x.to(tl.int32, bitcast=True) + 0x1000) & -8192).to(tl.float32, bitcast=True)
    return tl.where(x != x, x, rounded)


@triton.jit
def mma(a, b, acc, INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """acc + a @ b. UPCAST_DOT is set only under the interpreter, whose bf16 dot is wrong."""
    if UPCAST_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def pixel_rows(pid_m, M, H, W, BLOCK_M: tl.constexpr):
    """A tile's BLOCK_M pixel rows of an NHWC grid (M = N*H*W rows): its first row m0, the
    row offsets from it, which are in range, and each row's (h, w)."""
    m0 = pid_m * BLOCK_M
    rows = tl.arange(0, BLOCK_M)
    hw = (m0 + rows) % (H * W)
    return m0, rows, m0 + rows < M, hw // W, hw % W


@triton.jit
def window_inside(m_mask, h, w, dy, dx, H, W):
    """Rows in range whose pixel (h + dy, w + dx) lies in the H x W grid: the mask of one
    window tap ('same' zero padding of a convolution, -inf padding of a max pool)."""
    return m_mask & (h + dy >= 0) & (h + dy < H) & (w + dx >= 0) & (w + dx < W)


@triton.jit
def tile_gemm(
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
        acc = mma(a, b, acc, INPUT_PRECISION, UPCAST_DOT)
    return acc


@triton.jit
def window_gemm(
    src_tile,  # (rows, K_src) NHWC pixel rows from the tile's first pixel, with their halo
    w_ptr,  # (kh * kw * K_src, cols) B, row (dy * kw + dx) * K_src + c
    K_src, cols, kh, kw, H, W, h, w, rows, m_mask, offs_n, n_mask,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """The stride-1 kh x kw implicit GEMM of a tile in fp32, 'same' zero padding by masks:
    the main loop of every K x K convolution (GoogLeNet's and the branch graph's, 1x1s
    included) and of their data gradients (the flipped weights make those stride-1
    convolutions too)."""
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tap in range(0, kh * kw):
        dy = tap // kw - kh // 2
        dx = tap % kw - kw // 2
        ok = window_inside(m_mask, h, w, dy, dx, H, W)  # zero padding
        for c0 in range(0, K_src, BLOCK_K):
            cc = c0 + offs_k
            c_mask = cc < K_src
            a = tl.load(src_tile + (rows + (dy * W + dx))[:, None] * K_src + cc[None, :],
                        mask=ok[:, None] & c_mask[None, :], other=0.0)
            b = tl.load(w_ptr + (tap * K_src + cc)[:, None] * cols + offs_n[None, :],
                        mask=c_mask[:, None] & n_mask[None, :], other=0.0)
            acc = mma(a, b, acc, INPUT_PRECISION, UPCAST_DOT)
    return acc
