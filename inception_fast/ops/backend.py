"""Backend choice, weight packing and the NHWC row/image views shared by every kernel.

Layouts, for a convolution weight W (cout, cin, kh, kw) in PyTorch's Conv2d layout:
  GEMM B      (kh*kw*cin, cout), row (dy*kw + dx)*cin + c: the kernels walk K tap by tap
              and, within a tap, channel by channel, the order in which NHWC stores a
              pixel's channels, so every tap reads contiguous memory (Triton reads this);
  CPU panels  (ceil(cols / width), K, width): B cut into panels of `width` columns, two
              64-byte SIMD vectors of the accumulator (16 fp32, 8 fp64; bf16 sums in fp32,
              so 16), zero-padded past the last column, one panel per register tile of
              csrc/gemm.h. bf16 panels hold VNNI pairs: each tap's channels are padded to
              an even count, and rows (2j, 2j + 1) interleave, element (k, n) of a panel at
              flat index (k // 2) * 2 * width + 2 * n + k % 2, so that one 32-bit word is
              the pair (B[2j][n], B[2j + 1][n]) that an AVX512-BF16 dot product takes.
  Winograd    (panels, (positions + taps)*cin, width), fp32 stride-1 convolutions over a
              buffer (pack_winograd): per panel, the transformed blocks U_a, cin rows
              each, then the taps of the CPU panels above (csrc/winograd.h; the direct
              part serves tiles with non-finite values). A 3x3 packs F(4x4, 3x3)'s 36
              blocks (G W G^T)[a], 45*cin rows, or F(2x2, 3x3)'s 16, 25*cin rows; a 5x5
              F(2x2, 5x5)'s 36, 61*cin rows; a 1x7
              or 7x1 F(2, 7)'s 8 blocks (G W)[a] along the filter's axis, 15*cin rows; a
              1x3 or 3x1 F(2, 3)'s 4, 7*cin rows. The kernel tells them apart by the rows.
An activation (N, C, H, W) stored channels_last is the row-major matrix of its pixel rows
(N*H*W, C): `rows` and `image` convert between the two as views.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from .._cache import tracing
from .._checks import check_choice
from .._extension import cpu_extension, require_cpu_extension, warn_cpu_fallback

__all__ = ["BACKENDS", "CPU_DTYPES", "WINOGRAD", "as_gemm_b", "autocast_dtype", "cacheable", "flipped_gemm_b",
           "from_gemm_b", "image", "interpreting", "pack_conv_panels", "pack_panels", "pack_winograd",
           "accumulator_dtype", "packed_dtype", "panel_width", "resolve_backend", "rows", "triton_available",
           "unpack_panels", "unpack_winograd", "weight_layout", "WINOGRAD_3X3_TILE", "winograd_3x3_tile",
           "winograd_positions"]

BACKENDS = ("auto", "triton", "cpu", "reference")
CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# Whether the CPU kernel runs fp32 (and fp16, computed in fp32) 3x3, 5x5, 1x7, 7x1, 1x3 and
# 3x1 stride-1 stages as Winograd's F(2x2, 3x3) or F(4x4, 3x3), F(2x2, 5x5), F(2, 7) and
# F(2, 3). INCEPTION_FAST_WINOGRAD=0 (or false/off/no), read once at import, packs every
# stage for the direct implicit GEMM instead: the A/B of benchmarks/winograd.py, or results
# that do not depend on the algorithm's rounding.
WINOGRAD = os.environ.get("INCEPTION_FAST_WINOGRAD", "1").strip().lower() not in ("0", "false", "off", "no")


def _winograd_3x3_tile() -> int | None:
    value = os.environ.get("INCEPTION_FAST_WINOGRAD_3X3", "auto").strip().lower()
    if value not in ("auto", "2", "4"):
        raise ValueError(f"INCEPTION_FAST_WINOGRAD_3X3 must be auto, 2 (F(2x2, 3x3)) or 4 (F(4x4, 3x3)), "
                         f"got {value!r}")
    return None if value == "auto" else int(value)


# The output tile of the 3x3 stages' Winograd form: F(4x4, 3x3) (4) does 4x fewer
# multiply-adds than the direct GEMM and has cheaper transforms per output, at ~1e-6
# relative error against float64 (the fp32 bound is 1e-5); F(2x2, 3x3) (2) does 2.25x fewer,
# at ~3e-7. None (INCEPTION_FAST_WINOGRAD_3X3=auto, the default) picks per convolution by its
# output grid (winograd_3x3_tile); 2 or 4 force one everywhere (read once at import).
WINOGRAD_3X3_TILE = _winograd_3x3_tile()


def winograd_3x3_tile(ho: int, wo: int) -> int:
    """The Winograd output tile, 4 or 2, for a 3x3 convolution whose output grid is ho x wo
    (WINOGRAD_3X3_TILE unless None). 4 where its 4x4 tiles cover the grid with at most 10%
    more outputs than 2x2 tiles do, and number at least 32 per image, the kernel's kMinTiles
    (csrc/winograd.h), so that a call at batch 1 runs as Winograd too (with fewer, F(4x4, 3x3)
    panels run the direct GEMM where F(2x2, 3x3) would have run as Winograd: a 256-channel
    3x3 at 16x16 took 1.28 ms against 0.72; at 24x24, 36 tiles, 0.95 against 1.43). Measured
    on a Zen 5 core against F(2x2, 3x3) (same process, alternating): Inception-v3's stem
    1.3-1.9x (147x147, 71x71), its 35x35 blocks 1.03-1.15x, GoogLeNet's 28x28 blocks
    1.11-1.17x at batch 16-32 and 1.07-1.09x at batch 1; but 0.92-0.95x on 14x14 grids (16x16 outputs computed for 14x14: 1.31x
    the work, against 1.0x for 2x2 tiles) and slower on 7x7 and 8x8 at small batches."""
    if WINOGRAD_3X3_TILE is not None:
        return WINOGRAD_3X3_TILE
    t4 = -(-ho // 4) * -(-wo // 4)
    t2 = -(-ho // 2) * -(-wo // 2)
    return 4 if t4 >= 32 and 16 * t4 * 10 <= 4 * t2 * 11 else 2


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast runs a convolution of x in, or None: autocast off on x's device, or
    x in float64 (autocast leaves float64 alone)."""
    device_type = x.device.type
    if device_type == "meta":  # no autocast there (torch raises when asked): profile's meta mode
        return None
    if not torch.is_autocast_enabled(device_type) or x.dtype == torch.float64:
        return None
    return torch.get_autocast_dtype(device_type)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """Whether Triton kernels run in its interpreter (on CPU tensors): TRITON_INTERPRET=1."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """The backend that will run on x: "auto" picks "triton" for CUDA tensors, "cpu" (the C++
    kernels) for float32/float64/bfloat16/float16 CPU tensors, else "reference" (plain PyTorch ops).

    Raises ValueError for an unknown backend or a device it cannot run on, TypeError for a
    dtype the C++ kernels lack, RuntimeError when triton or the extension is missing.
    """
    check_choice("backend", backend, BACKENDS)
    if backend == "auto":
        if x.is_cuda:
            return "triton" if triton_available() else "reference"
        if cpu_extension() is None:
            warn_cpu_fallback()
            return "reference"
        return "cpu" if x.dtype in CPU_DTYPES else "reference"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package, which is not installed")
        # A meta tensor (profile's meta mode) stands for any device: its op runs the fake kernel.
        if not x.is_cuda and not x.is_meta and not interpreting():
            raise ValueError(
                f"backend='triton' needs a CUDA tensor, got x on {x.device}; to run the Triton "
                "kernels on the CPU, set TRITON_INTERPRET=1 before importing inception_fast, "
                "or use backend='cpu'")
    if backend == "cpu":
        if x.device.type not in ("cpu", "meta"):
            raise ValueError(f"backend='cpu' needs x on the CPU, got x on {x.device}")
        if x.dtype not in CPU_DTYPES:
            raise TypeError(f"backend='cpu' supports x of dtype float32, float64, bfloat16 or float16, got {x.dtype}")
        require_cpu_extension()
    return backend


def cacheable(x: torch.Tensor) -> bool:
    """Whether packed weights for x may come from a cache: not while tracing (compile, export,
    jit.trace: the packing must be in the graph), not for tensors without storage (FakeTensor)."""
    if tracing():
        return False
    try:
        x.data_ptr()
    except RuntimeError:  # FakeTensor / FunctionalTensor
        return False
    return True


def as_gemm_b(w: torch.Tensor) -> torch.Tensor:
    """Conv weight (cout, cin, kh, kw) -> GEMM B (kh*kw*cin, cout), a view where it can be."""
    return w.permute(2, 3, 1, 0).reshape(-1, w.shape[0])


def from_gemm_b(b: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """The inverse of as_gemm_b: GEMM B (kh*kw*cin, cout) -> conv weight (cout, cin, kh, kw)."""
    return b.t().reshape(b.shape[1], kh, kw, -1).permute(0, 3, 1, 2).contiguous()


def flipped_gemm_b(w: torch.Tensor) -> torch.Tensor:
    """Conv weight (cout, cin, kh, kw) -> (kh*kw*cout, cin), row (dy*kw + dx)*cout + co
    holding w[co, :, kh-1-dy, kw-1-dx]: the B of the data-gradient implicit GEMM (a 'same'
    padded stride-1 convolution's data gradient is the convolution of its output gradient
    with the flipped, transposed weight)."""
    return as_gemm_b(w.flip(2, 3).transpose(0, 1)).contiguous()


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the CPU kernel sums `dtype` in, and the dtype of its packed biases: float32 for
    bfloat16 and float16, else `dtype` itself."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def packed_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the CPU kernel's packed B for x of `dtype`: float16 has no micro-kernel
    of its own and runs the float32 one (csrc/inception_graph_cpu.cpp), so its B is packed
    widened; the others keep their dtype."""
    return torch.float32 if dtype == torch.float16 else dtype


def panel_width(dtype: torch.dtype) -> int:
    """Columns per CPU panel: two 64-byte SIMD vectors of the accumulator (csrc/ checks the shape)."""
    return 128 // torch.empty((), dtype=accumulator_dtype(dtype)).element_size()


def pack_panels(b: torch.Tensor, width: int, taps: int = 1) -> torch.Tensor:
    """(K, cols) -> (ceil(cols / width), K', width), zero-padded: one panel per register tile.
    K = taps * channels; bf16 pads each tap's channels to even (K' = taps * 2 ceil(channels / 2))
    and interleaves row pairs (the module docstring's VNNI layout); K' = K otherwise.
    Linear, so differentiable: the gradient of a panel is the panel of the gradient."""
    k, cols = b.shape
    panels = -(-cols // width)
    b = F.pad(b, (0, panels * width - cols))
    if b.dtype != torch.bfloat16:
        return b.reshape(k, panels, width).permute(1, 0, 2).contiguous()
    channels = k // taps
    b = F.pad(b.reshape(taps, channels, -1), (0, 0, 0, channels % 2)).reshape(-1, 2, panels, width)
    return b.permute(2, 0, 3, 1).reshape(panels, -1, width).contiguous()


def _pad_to_panels(w: torch.Tensor, width: int) -> torch.Tensor:
    """(cout, ...) -> a new (whole panels of width, ...) tensor, zero rows appended (a copy
    even when cout is whole: what is packed never aliases the weights)."""
    cout = int(w.shape[0])  # jit.trace hands traced sizes
    return F.pad(w, (0, 0) * (w.dim() - 1) + (0, -(-cout // width) * width - cout))


def _panel_view(w: torch.Tensor, width: int) -> torch.Tensor:
    """(panels * width, cin, kh, kw), padded (_pad_to_panels) -> its (panels, kh * kw, cin,
    width) view: the panel layout, before the one copy that makes it contiguous."""
    rows, cin, kh, kw = (int(k) for k in w.shape)
    return w.view(rows // width, width, cin, kh * kw).permute(0, 3, 2, 1)


def pack_conv_panels(w: torch.Tensor, width: int) -> torch.Tensor:
    """Conv weights (cout, cin, kh, kw) -> pack_panels(as_gemm_b(w), width, kh * kw) for any
    dtype but bf16, in one strided pass after padding cout to whole panels (the GEMM-row
    route makes three more full copies: training repacks every step). Differentiable.
    Contiguous: for a 1x1 the reshape is a view with the width and cin strides swapped, which
    the kernels took as a copy of the whole panel on every call (Inception-v3 at batch 1 ran
    11% slower from that)."""
    view = _panel_view(_pad_to_panels(w, width), width)
    return view.reshape(view.shape[0], -1, width).contiguous()


def unpack_panels(packed: torch.Tensor, cols: int, taps: int = 1, channels: int | None = None) -> torch.Tensor:
    """The inverse of pack_panels: (panels, K', width) -> (K, cols), K = taps * channels
    (channels: of each tap, needed for bf16 only)."""
    panels, k, width = packed.shape
    if packed.dtype != torch.bfloat16:
        return packed.permute(1, 0, 2).reshape(k, -1)[:, :cols]
    if channels is None:
        raise ValueError("unpack_panels: bf16 panels need `channels` (per tap): their padding to even hides it")
    b = packed.reshape(panels, k // 2, width, 2).permute(1, 3, 0, 2).reshape(taps, k // taps, -1)
    return b[:, :channels, :cols].reshape(taps * channels, cols)


# Winograd weight transforms G (positions x taps), csrc/winograd.h's: F(2x2, 3x3) applies
# G3 along both axes, F(2, 3) G3 and F(2, 7) G7 along the filter's. G7 interpolates at 0, 1,
# -1, 2, -2, 1/2, -1/2 and infinity (Lavin and Gray 2016's construction, row 0's sign moved
# to B^T's row 0); its rows pair with winograd.h's B^T.
_G3 = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))
# F(4x4, 3x3)'s G (6 x 3), applied along both axes: interpolation at 0, 2/3, -2/3, 3/2, -3/2
# and infinity, row j the point p's (1, p, p^2) over prod_{l != j} (p - p_l).
_G3_F4 = ((1.0, 0.0, 0.0),
          (-81 / 130, -27 / 65, -18 / 65),
          (-81 / 130, 27 / 65, -18 / 65),
          (8 / 65, 12 / 65, 18 / 65),
          (8 / 65, -12 / 65, 18 / 65),
          (0.0, 0.0, 1.0))
# F(2x2, 5x5)'s G (6 x 5), applied along both axes: the same points and rows, (1, p, ..., p^4).
_G5 = ((1.0, 0.0, 0.0, 0.0, 0.0),
       (-81 / 130, -27 / 65, -18 / 65, -12 / 65, -8 / 65),
       (-81 / 130, 27 / 65, -18 / 65, 12 / 65, -8 / 65),
       (8 / 65, 12 / 65, 18 / 65, 27 / 65, 81 / 130),
       (8 / 65, -12 / 65, 18 / 65, -27 / 65, 81 / 130),
       (0.0, 0.0, 0.0, 0.0, 1.0))
_G7 = ((1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
       tuple(-2 / 9 for _ in range(7)),
       tuple(-2 / 9 * (-1) ** k for k in range(7)),
       tuple(2 ** k / 90 for k in range(7)),
       tuple((-2) ** k / 90 for k in range(7)),
       tuple(2 ** (6 - k) / 90 for k in range(7)),
       tuple((-1) ** k * 2 ** (6 - k) / 90 for k in range(7)),
       (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0))


def winograd_positions(kh: int, kw: int, tile: int = 2) -> int:
    """Transformed positions per input channel of a Winograd-packed kh x kw filter: 16
    (3x3, F(2x2, 3x3)) or 36 (3x3 with tile 4, F(4x4, 3x3)), 36 (5x5, F(2x2, 5x5); tile 2
    only), 8 (1x7 or 7x1, F(2, 7)), 4 (1x3 or 3x1, F(2, 3)), or 0 (no Winograd form)."""
    if tile == 4:
        return 36 if (kh, kw) == (3, 3) else 0
    return {(3, 3): 16, (5, 5): 36, (1, 7): 8, (7, 1): 8, (1, 3): 4, (3, 1): 4}.get((kh, kw), 0)


def _g(taps: int, tile: int) -> tuple[tuple[float, ...], ...]:
    """The 1-D weight transform G (positions x taps) of a filter of `taps` taps."""
    return {7: _G7, 5: _G5}.get(taps, _G3_F4 if tile == 4 else _G3)


def _transform_matrix(kh: int, kw: int, tile: int = 2) -> tuple[tuple[float, ...], ...]:
    """The weight transform of a kh x kw filter as one (positions, taps) matrix over its flat
    taps: kron(G, G) for a 3x3 (G3, or G3_F4 with tile 4; row p a + b, column 3r + s:
    U[a][b] = sum G[a][r] w[r][s] G[b][s]) or a 5x5 (G5), G7 or G3 for a 1xK or Kx1 (the
    flat filter runs along its axis)."""
    g = _g(max(kh, kw), tile)
    if kh == kw:
        return tuple(tuple(ga * gb for ga in g[a] for gb in g[b]) for a in range(len(g)) for b in range(len(g)))
    return g


def _winograd_u(w: torch.Tensor, tile: int) -> torch.Tensor:
    """U = G w G^T (3x3) or G w along the filter's axis (1x7, 7x1: G7; 1x3, 3x1: G3):
    (cout, cin, kh, kw) -> (cout, cin, positions), position-major as winograd.h reads it.
    Linear, so differentiable."""
    kh, kw = (int(k) for k in w.shape[2:])  # jit.trace hands traced sizes
    # One matmul with a constant (torch.compile lowers it in a few nodes, where per-tap scalar
    # ops took seconds); its backward saves only the constant. A custom autograd.Function that
    # rebuilt it in forward and backward broke dynamo's tracing of the backward under
    # torch.compile(dynamic=True).
    return w.flatten(2) @ torch.tensor(_transform_matrix(kh, kw, tile), dtype=w.dtype, device=w.device).t()


@functools.cache
def _gtg_eigh(taps: int, tile: int) -> tuple[tuple[float, ...], tuple[tuple[float, ...], ...]]:
    """eigh of G^T G (_g(taps, tile)) in float64, as Python constants: computed once, so a
    traced backward holds constants, not an eigensolver."""
    g = torch.tensor(_g(taps, tile), dtype=torch.float64)
    lam, q = torch.linalg.eigh(g.t() @ g)
    return tuple(lam.tolist()), tuple(map(tuple, q.tolist()))


def _winograd_gradient_preimage(dw: torch.Tensor, tile: int) -> torch.Tensor:
    """The v with P^T P v = dW, P = pack_winograd's map w -> [U(w); w] (per filter).
    3x3: P^T P v = (G^T G) v (G^T G) + v; 1xK or Kx1: (G^T G + I) v along the filter's axis.
    G^T G = Q diag(l) Q^T (symmetric), so v divides dW's coordinates in Q's basis by
    l_i l_j + 1 (3x3) or l_i + 1."""
    kh, kw = (int(k) for k in dw.shape[2:])
    lam, q = _gtg_eigh(max(kh, kw), tile)
    lam = torch.tensor(lam, dtype=torch.float64, device=dw.device)
    q = torch.tensor(q, dtype=torch.float64, device=dw.device)
    d = dw.double()
    if kh == kw:
        v = q @ ((q.t() @ d @ q) / (lam[:, None] * lam[None, :] + 1)) @ q.t()
    else:
        v = (((d.flatten(2) @ q) / (lam + 1)) @ q.t()).reshape(d.shape)
    return v.to(dw.dtype)


def pack_winograd(w: torch.Tensor, width: int, gradient: bool = False, tile: int | None = None) -> torch.Tensor:
    """fp32 conv weights (cout, cin, kh, kw), 3x3, 5x5, 1x7, 7x1, 1x3 or 3x1 -> the Winograd panels
    (panels, (positions + kh*kw)*cin, width) of the module docstring: the transformed blocks,
    then the direct panels. U is computed in float64 and rounded once. Linear, so
    differentiable. Raises ValueError for another filter size, or a tile other than 2 or 4
    (4: a 3x3 only).

    tile: a 3x3's output tile, 4 (F(4x4, 3x3)) or 2 (F(2x2, 3x3)); default
    WINOGRAD_3X3_TILE, or 2 where that is None (the grid is not known here: modules pick by
    it, winograd_3x3_tile). The 5x5 and 1-D forms have 2.

    gradient=True packs a weight gradient dW as the gradient of the packed tensor, for
    autograd over the bare op: P(v) with P this packing and v the solution of P^T P v = dW.
    Its pull-back through the packing, P^T P(v), is dW, the weights' gradient; and it lies in
    P's range (it is the orthogonal projection onto that range of any gradient that pulls
    back to dW), so an optimizer stepping the packed tensor itself keeps the U blocks and the
    direct taps the same filter, as both paths of the kernel need."""
    kh, kw = (int(k) for k in w.shape[2:])  # jit.trace hands traced sizes
    if tile is None:
        tile = (WINOGRAD_3X3_TILE or 2) if (kh, kw) == (3, 3) else 2
    if tile not in (2, 4) or (tile == 4 and (kh, kw) != (3, 3)):
        raise ValueError(f"pack_winograd: tile must be 2, or 4 for a 3x3 filter, got {tile} for a {kh}x{kw}")
    if winograd_positions(kh, kw, tile) == 0:
        raise ValueError(f"pack_winograd: w must be a 3x3, 5x5, 1x7, 7x1, 1x3 or 3x1 filter, got {kh}x{kw}")
    if gradient:
        w = _winograd_gradient_preimage(w, tile)
    if _one_pass_packing(w):
        return torch.ops.inception_fast.pack_winograd_cpu(w, _transform_tensor(kh, kw, tile), width, False)
    # Straight into the panel layout, (panels, positions + taps, cin, width): U (as a filter
    # of `positions` taps) and the taps, each a padded strided view, in one copy. Permuting U
    # to GEMM rows and packing those took 3.9 ms for GoogLeNet's 5b 3x3, repacked per
    # step in training; this takes ~1.
    w = _pad_to_panels(w, width)  # before U: U of the zero rows is zero, and U needs no padding of its own
    u = _winograd_u(w.double(), tile).to(w.dtype)  # (panels * width, cin, positions)
    packed = torch.cat([_panel_view(u.unsqueeze(-1), width), _panel_view(w, width)], dim=1)
    return packed.reshape(packed.shape[0], -1, width)


def pack_winograd_flipped(w: torch.Tensor, width: int, tile: int) -> torch.Tensor:
    """pack_winograd of the flipped, transposed weight w.flip(2, 3).transpose(0, 1) (the data
    gradient's filter, from cout to cin channels), without making it: in one pass on the
    C++ kernel where no gradient is taken."""
    if _one_pass_packing(w):
        kh, kw = (int(k) for k in w.shape[2:])
        return torch.ops.inception_fast.pack_winograd_cpu(w.transpose(0, 1), _transform_tensor(kh, kw, tile), width,
                                                          True)
    return pack_winograd(w.flip(2, 3).transpose(0, 1), width, tile=tile)


def _one_pass_packing(w: torch.Tensor) -> bool:
    """Whether pack_winograd runs the C++ one-pass packer (pack_winograd.cpp): fp32 CPU
    weights, no gradient taken through the packing (the ATen path is the differentiable
    one), not under tracing (the compiled train form traces its packing), extension built."""
    return (w.dtype == torch.float32 and w.device.type == "cpu" and not (torch.is_grad_enabled() and w.requires_grad)
            and not tracing() and cpu_extension() is not None)


@functools.cache
def _transform_tensor(kh: int, kw: int, tile: int) -> torch.Tensor:
    """_transform_matrix as a float64 CPU tensor, made once (read-only by the packer)."""
    return torch.tensor(_transform_matrix(kh, kw, tile), dtype=torch.float64)


def unpack_winograd(packed: torch.Tensor, cols: int, cin: int, kh: int, kw: int) -> torch.Tensor:
    """The GEMM B (kh*kw*cin, cols) of a kh x kw filter's Winograd panels (either tile): their
    direct part, the last kh*kw*cin rows, exactly the weights packed."""
    return unpack_panels(packed[:, packed.shape[1] - kh * kw * cin:], cols, kh * kw, cin)


def rows(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N*H*W, C) NHWC pixel rows: a view when t is channels_last."""
    return t.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def image(pixel_rows: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
    """(N*H*W, C) rows -> logical (N, C, H, W) in channels_last memory: a view."""
    return pixel_rows.reshape(n, h, w, -1).permute(0, 3, 1, 2)


def weight_layout(w: torch.Tensor) -> torch.memory_format:
    """The memory format a gradient of convolution weight `w` is returned in: channels_last
    for a channels_last weight (a model moved with .to(memory_format=torch.channels_last)),
    else contiguous: the parameter's own layout, in which AccumulateGrad stores it. A
    contiguous gradient for a channels_last weight cost its folded-BN multiply (mixed
    layouts: 1.15 ms for Inception-v3's 384 x 448 x 3 x 3) and AccumulateGrad's copy into the
    parameter's layout, ~5 ms of Mixed_7b's 45 at batch 8.
    csrc/inception_graph_cpu_backward.cpp follows the same rule."""
    channels_last = w.dim() == 4 and w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format
