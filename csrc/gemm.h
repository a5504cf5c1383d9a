// The register-tiled GEMM shared by the CPU kernels: pointer-addressed A rows (implicit
// GEMM over NHWC planes), B packed in panels of two SIMD vectors, and an epilogue that adds
// the bias, applies ReLU and stores into channel slices of NHWC destinations.
//
// Storage types float, double and bfloat16; bf16 accumulates in fp32 (acc_t), with B packed
// in VNNI pairs (bf16_dot.h): the AVX512-BF16 dot product where the compiler targets it.
#pragma once

#include "bf16_dot.h"
#include "nhwc.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

namespace inception_fast {
namespace gemm {

// 12 rows x 2 vectors = 24 accumulators: the most that fit 32 zmm registers next to
// the two B vectors and one broadcast A value.
constexpr int kMR = 12;

// What T accumulates in: T itself, except bf16 -> fp32 (the sums of vdpbf16ps).
template <typename T>
struct Accum {
  using type = T;
};
template <>
struct Accum<c10::BFloat16> {
  using type = float;
};
template <typename T>
using acc_t = typename Accum<T>::type;

// K rows of B per packed step: bf16 pairs them (VNNI), so a tap's K rows round up to even.
template <typename T>
constexpr int kPack = std::is_same_v<T, c10::BFloat16> ? 2 : 1;

// Columns of a register tile: two SIMD vectors of the accumulator type.
template <typename T>
constexpr int kNR = 2 * Simd<acc_t<T>>::kLanes;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// How an epilogue finishes a column's sum: relu(sum + bias), or Inception-ResNet's tail
// act(x + sum + bias) with act ReLU or none (its scale is folded into B and the bias), x read
// at the stored pixel and channel, or sum + bias as it is (kLinear: the Winograd GEMMs of
// winograd.h, whose sums are transformed before any activation).
enum class Epilogue { kRelu, kResidualRelu, kResidual, kLinear };

inline bool has_relu(Epilogue e) { return e == Epilogue::kRelu || e == Epilogue::kResidualRelu; }
inline bool has_residual(Epilogue e) { return e == Epilogue::kResidualRelu || e == Epilogue::kResidual; }

// GEMM columns [begin, end) go to channels [channel, channel + end - begin) of `dst`.
template <typename T>
struct Segment {
  int64_t begin, end;
  Plane<T> dst;
  int64_t channel;
  Epilogue epilogue = Epilogue::kRelu;
  Plane<const T> residual{};  // x, for the residual epilogues: same pixel and channel as dst
};

// 64 bytes of T as a vector of its accumulator type (bf16 widened).
template <typename T>
inline typename Simd<acc_t<T>>::Vec load_acc(const T* p) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return bf16::load(p);
  } else {
    typename Simd<T>::Vec v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
}

// A slice of the K dimension small enough that its B rows for one panel stay in L1:
// whole taps when a tap's channels fit, else a channel range of a single tap.
struct KChunk {
  int64_t tap_begin, taps;
  int64_t c_begin, c_count;
};

// C = relu(A @ B + bias), A rows given by pointers, A's K index split into taps.
template <typename T>
struct Gemm {
  const T* b_packed;                // (panels, taps * k_stride(), kNR); bf16: row pairs interleaved
  const acc_t<T>* bias;             // (cols,)
  int64_t cols;
  int64_t k_per_tap;                // channels read at each tap
  std::vector<int64_t> tap_offset;  // element offset of each tap from a row's window origin
  std::vector<Segment<T>> segments;
  std::vector<KChunk> chunks;       // filled by plan_chunks()
  int64_t panel_rows = 0;           // rows from one panel of b_packed to the next; 0: k_total()

  int64_t panels() const { return ceil_div(cols, kNR<T>); }
  // B rows per tap: k_per_tap, rounded up to whole pairs for bf16 (a zero row pads an odd tap).
  int64_t k_stride() const { return ceil_div(k_per_tap, kPack<T>) * kPack<T>; }
  int64_t k_total() const { return static_cast<int64_t>(tap_offset.size()) * k_stride(); }
};

// Half of a 48 KB L1: the B chunk of one panel, with room left for the A rows it meets.
// (On a 32 KB L1, Zen 4, 16 and 12 KB chunks measured no faster on Inception-v3 and
// GoogLeNet blocks at batch 32.)
constexpr int64_t kChunkBytes = 24 * 1024;

// A rows `stride` elements apart whose lines all fall in one L1 set (a row stride of a
// multiple of 4 KB: x of 1024 or 2048 fp32 channels) evict each other while a tile's 12
// rows stream through an 8-way L1: a 1x1 GEMM over 2048 channels ran 10% below one over
// 2064. Such rows are copied per K chunk into a_pack (run_gemm) or pooled at a padded stride.
template <typename T>
inline bool set_conflicting(int64_t stride) { return stride * static_cast<int64_t>(sizeof(T)) % 4096 == 0; }

// A row stride for `cols` elements that is clear of set_conflicting (one cache line past).
template <typename T>
inline int64_t padded_stride(int64_t cols) { return set_conflicting<T>(cols) ? cols + 64 / sizeof(T) : cols; }

// The most K rows of one chunk (plan_chunks): a panel's B rows within kChunkBytes, a
// multiple of kPack so that a chunk inside a tap starts on a pair.
template <typename T>
constexpr int64_t chunk_k_max() {
  return std::max<int64_t>(kPack<T>, kChunkBytes / (kNR<T> * static_cast<int64_t>(sizeof(T))) / kPack<T> * kPack<T>);
}

// Elements of run_gemm's a_pack for blocks of `rows` rows: one K chunk of each row, padded.
template <typename T>
inline int64_t a_pack_size(int64_t rows) {
  return rows * (chunk_k_max<T>() + kPack<T> + 64 / static_cast<int64_t>(sizeof(T)));
}

// Rows of one parallel work item: enough to reuse each B chunk many times from L1, few
// enough that the block's A rows and partial sums stay in a 2 MB L2. (On a 1 MB L2, Zen 4,
// 192 rows measured no faster.)
constexpr int64_t kMaxBlockRows = 32 * kMR;

// Blocks of at most kMaxBlockRows rows that a range of `rows` is cut into, a multiple of
// `parts` (at least one): big blocks reuse each L1-resident B chunk over more rows.
inline int64_t block_count(int64_t rows, int64_t parts) {
  return parts * std::max<int64_t>(1, ceil_div(rows, parts * kMaxBlockRows));
}

// Rows of each block when `rows` are cut into `blocks` equal blocks: a multiple of the tile
// (so the last blocks may be short or empty).
inline int64_t rows_per_block(int64_t rows, int64_t blocks) { return ceil_div(ceil_div(rows, blocks), kMR) * kMR; }

// Rows of one block of a range of `rows` cut into a multiple of `parts` equal blocks.
inline int64_t block_rows(int64_t rows, int64_t parts) { return rows_per_block(rows, block_count(rows, parts)); }

// Images per work item of the image-major schedule: small images are grouped so that a
// block still has enough rows to amortise B.
inline int64_t images_per_group(int64_t HW) { return std::max<int64_t>(1, (kMaxBlockRows + HW / 2) / HW); }

// Whether `groups` image groups share out evenly enough between `threads` for the
// image-major schedule (each thread runs every stage on whole images).
inline bool image_major(int64_t groups, int64_t threads) { return groups >= 4 * threads || groups % threads == 0; }

// (n, h, w) of pixel rows [m0, m0 + rows) of an N x H x W grid.
inline void pixel_coords(int64_t m0, int64_t rows, int64_t H, int64_t W, int64_t* pn, int64_t* ph, int64_t* pw) {
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t m = m0 + i, hw = m % (H * W);
    pn[i] = m / (H * W);
    ph[i] = hw / W;
    pw[i] = hw % W;
  }
}

// Rows per thread under which threads split a GEMM's columns rather than its rows.
constexpr int64_t kSplitColumnsBelowRows = 6 * kMR;

template <typename T>
void plan_chunks(Gemm<T>& g) {
  const int64_t k_max = chunk_k_max<T>();
  const int64_t taps = static_cast<int64_t>(g.tap_offset.size());
  if (g.k_stride() <= k_max) {
    const int64_t step = k_max / g.k_stride();
    for (int64_t t = 0; t < taps; t += step)
      g.chunks.push_back({t, std::min(step, taps - t), 0, g.k_per_tap});
  } else {
    for (int64_t t = 0; t < taps; ++t)
      for (int64_t c = 0; c < g.k_per_tap; c += k_max)
        g.chunks.push_back({t, 1, c, std::min(k_max, g.k_per_tap - c)});
  }
}

// tile (+)= A[MR rows, chunk] @ B[chunk, kNR] for one K chunk; the first chunk starts from 0.
// With `dst` (the last chunk of a full panel inside one segment), the sums skip the tile:
// dst[i][0:kNR] = relu(sum + bias) straight from the registers, or with `res` (the
// residual epilogues) act(res[i][0:kNR] + sum + bias), act ReLU where `relu`.
//
// bf16 sums in fp32 with B in VNNI pairs (two K rows interleaved per column): each pair of
// A's channels is broadcast as one 32-bit word into bf16_dot.h's dot2. An odd tap
// (k_per_tap odd) ends on a half pair: its A word carries a zero upper half, and the packed
// B a zero row, so the next pixel's channel is never read into a sum.
template <typename T, int MR>
void micro_tile(const T* const* a_rows, const int64_t* tap_offset, const KChunk& chunk, const T* b,
                acc_t<T>* tile /* MR x kNR */, bool accumulate, T* const* dst,
                const acc_t<T>* bias /* kNR, with dst */, const T* const* res /* MR rows or null */, bool relu) {
  using A = acc_t<T>;
  using Vec = typename Simd<A>::Vec;
  constexpr int L = Simd<A>::kLanes;
  Vec acc0[MR], acc1[MR];
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i) {
    if (accumulate) {
      std::memcpy(&acc0[i], tile + i * 2 * L, sizeof(Vec));
      std::memcpy(&acc1[i], tile + i * 2 * L + L, sizeof(Vec));
    } else {
      acc0[i] = acc1[i] = Vec{};
    }
  }
  for (int64_t t = chunk.tap_begin; t < chunk.tap_begin + chunk.taps; ++t) {
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      const uint16_t* a[MR];
#pragma GCC unroll 12
      for (int i = 0; i < MR; ++i)
        a[i] = reinterpret_cast<const uint16_t*>(a_rows[i] + tap_offset[t] + chunk.c_begin);
      const int64_t pairs = chunk.c_count / 2;
      for (int64_t p = 0; p < pairs; ++p, b += 4 * L) {
        const bf16::Pairs b0 = bf16::load_pairs(b), b1 = bf16::load_pairs(b + 2 * L);
#pragma GCC unroll 12
        for (int i = 0; i < MR; ++i) {
          uint32_t ai;
          std::memcpy(&ai, a[i] + 2 * p, sizeof(ai));
          acc0[i] = bf16::dot2(acc0[i], ai, b0);
          acc1[i] = bf16::dot2(acc1[i], ai, b1);
        }
      }
      if (chunk.c_count % 2 != 0) {  // the half pair
        const bf16::Pairs b0 = bf16::load_pairs(b), b1 = bf16::load_pairs(b + 2 * L);
        b += 4 * L;
#pragma GCC unroll 12
        for (int i = 0; i < MR; ++i) {
          const uint32_t ai = a[i][2 * pairs];
          acc0[i] = bf16::dot2(acc0[i], ai, b0);
          acc1[i] = bf16::dot2(acc1[i], ai, b1);
        }
      }
    } else {
      const T* a[MR];
#pragma GCC unroll 12
      for (int i = 0; i < MR; ++i) a[i] = a_rows[i] + tap_offset[t] + chunk.c_begin;
      for (int64_t c = 0; c < chunk.c_count; ++c, b += 2 * L) {
        const Vec b0 = *reinterpret_cast<const Vec*>(b);
        const Vec b1 = *reinterpret_cast<const Vec*>(b + L);
#pragma GCC unroll 12
        for (int i = 0; i < MR; ++i) {
          const T ai = a[i][c];
          acc0[i] += ai * b0;
          acc1[i] += ai * b1;
        }
      }
    }
  }
  if (dst != nullptr) {
    Vec bias0, bias1;
    std::memcpy(&bias0, bias, sizeof(Vec));
    std::memcpy(&bias1, bias + L, sizeof(Vec));
    const Vec zero{};
#pragma GCC unroll 12
    for (int i = 0; i < MR; ++i) {
      Vec v0 = acc0[i] + bias0, v1 = acc1[i] + bias1;
      if (res != nullptr) {
        v0 += load_acc(res[i]);
        v1 += load_acc(res[i] + L);
      }
      if (relu) {
        v0 = v0 < zero ? zero : v0;  // keeps NaN, like torch.relu
        v1 = v1 < zero ? zero : v1;
      }
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        bf16::store(dst[i], v0);
        bf16::store(dst[i] + L, v1);
      } else {
        std::memcpy(dst[i], &v0, sizeof(Vec));
        std::memcpy(dst[i] + L, &v1, sizeof(Vec));
      }
    }
    return;
  }
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i) {
    std::memcpy(tile + i * 2 * L, &acc0[i], sizeof(Vec));
    std::memcpy(tile + i * 2 * L + L, &acc1[i], sizeof(Vec));
  }
}

template <typename T>
using MicroTileFn = void (*)(const T* const*, const int64_t*, const KChunk&, const T*, acc_t<T>*, bool,
                             T* const*, const acc_t<T>*, const T* const*, bool);

// The micro-kernel for each row count 1..kMR, so that a block's last tile needs no padding.
template <typename T, int... MR>
constexpr std::array<MicroTileFn<T>, sizeof...(MR)> make_table(std::integer_sequence<int, MR...>) {
  return {&micro_tile<T, MR + 1>...};
}
template <typename T>
constexpr auto kMicroTiles = make_table<T>(std::make_integer_sequence<int, kMR>{});

// ReLU that keeps NaN, like torch.relu: NaN < 0 is false.
template <typename T>
inline T relu(T v) {
  return v < T(0) ? T(0) : v;
}

// Runs `gemm` for rows whose A rows start at a_rows[i] and whose destination pixels are
// (n, h, w)[i], over column part `part` of `parts` (a contiguous range of panels); rows
// and columns need not be multiples of the tile. `acc` holds ceil(rows / kMR) * panels
// tiles of kMR x kNR partial sums.
//
// Loop order (Goto's): K chunk, then panel, then row tile. One chunk of one B panel
// (<= kChunkBytes) stays in L1 while every row tile of the block streams past it;
// the block's A rows and partial sums stay in L2.
//
// With `a_pack` (a_pack_size(rows) elements; single-tap GEMMs only), each K chunk of the
// A rows is first copied into it at a padded stride, as Goto's packed A: for rows whose
// stride is set_conflicting. The copy is read once per panel of the part.
template <typename T>
void run_gemm(const Gemm<T>& gemm, const T* const* a_rows, const int64_t* pix_n,
              const int64_t* pix_h, const int64_t* pix_w, int64_t rows, acc_t<T>* acc, int64_t part,
              int64_t parts, T* a_pack = nullptr) {
  constexpr int NR = kNR<T>;
  const int64_t panels = gemm.panels(), k_total = gemm.panel_rows > 0 ? gemm.panel_rows : gemm.k_total();
  const int64_t p_begin = panels * part / parts, p_end = panels * (part + 1) / parts;
  if (p_begin == p_end) return;
  const int64_t row_tiles = ceil_div(rows, kMR);
  // A full panel inside one segment stores from registers in its last chunk; others go
  // through the tile and the generic epilogue below.
  auto direct_segment = [&](int64_t p) -> const Segment<T>* {
    for (const Segment<T>& seg : gemm.segments)
      if (seg.begin <= p * NR && (p + 1) * NR <= seg.end) return &seg;
    return nullptr;
  };
  T* dst_rows[kMR];
  const T* res_rows[kMR];
  auto point_rows = [&](const Segment<T>& seg, int64_t r0, int mr, int64_t col) {
    for (int i = 0; i < mr; ++i) {
      dst_rows[i] = seg.dst.interior_row(pix_n[r0 + i], pix_h[r0 + i], pix_w[r0 + i]) + seg.channel + col - seg.begin;
      if (has_residual(seg.epilogue))
        res_rows[i] =
            seg.residual.interior_row(pix_n[r0 + i], pix_h[r0 + i], pix_w[r0 + i]) + seg.channel + col - seg.begin;
    }
  };
  const T* packed_rows[kMaxBlockRows];
  const int64_t no_offset = 0;
  TORCH_CHECK(a_pack == nullptr || (gemm.tap_offset.size() == 1 && rows <= kMaxBlockRows),
              "run_gemm: a_pack is for single-tap GEMMs of at most ", kMaxBlockRows, " rows");
  for (size_t c = 0; c < gemm.chunks.size(); ++c) {
    const KChunk& chunk = gemm.chunks[c];
    const bool last = c + 1 == gemm.chunks.size();
    const int64_t b_row = chunk.tap_begin * gemm.k_stride() + chunk.c_begin;
    const T* const* tile_rows = a_rows;
    const int64_t* tap_offset = gemm.tap_offset.data();
    KChunk run = chunk;
    if (a_pack != nullptr) {
      // Rounded up to a pair: bf16's half pair reads the low half of a whole word.
      const int64_t ld = padded_stride<T>(ceil_div(chunk.c_count, kPack<T>) * kPack<T>);
      for (int64_t i = 0; i < rows; ++i) {
        std::memcpy(a_pack + i * ld, a_rows[i] + gemm.tap_offset[0] + chunk.c_begin, chunk.c_count * sizeof(T));
        packed_rows[i] = a_pack + i * ld;
      }
      tile_rows = packed_rows;
      tap_offset = &no_offset;
      run = {0, 1, 0, chunk.c_count};
    }
    // The chunk's B rows of one panel, in cache lines, counted from its first row (a
    // multi-tap chunk's rows are strided per tap: the prefetch below is a hint, never a read).
    const int64_t chunk_lines = ceil_div(run.taps * run.c_count * NR * static_cast<int64_t>(sizeof(T)), int64_t{64});
    for (int64_t p = p_begin; p < p_end; ++p) {
      const T* b = gemm.b_packed + (p * k_total + b_row) * NR;
      const Segment<T>* direct = last ? direct_segment(p) : nullptr;
      // The next panel's chunk, fetched into L2 a slice per row tile while this one runs:
      // at batch 1 in a network the weights come cold from memory, and the hardware
      // prefetcher does not follow the jump from one panel's chunk to the next's (Zen 5:
      // inception_v3 at batch 1 compiled 1.00x -> 1.04-1.07x of compile(model), googlenet's
      // blocks table 1.55x -> 1.62-1.66x of eager; a block called over and over with its
      // weights hot got ~4% slower).
      const char* next_b = p + 1 < p_end ? reinterpret_cast<const char*>(b + k_total * NR) : nullptr;
      const int64_t per_tile = ceil_div(chunk_lines, row_tiles);
      for (int64_t rt = 0; rt < row_tiles; ++rt) {
        if (next_b != nullptr)
          for (int64_t l = rt * per_tile, end = std::min(chunk_lines, l + per_tile); l < end; ++l)
            __builtin_prefetch(next_b + l * 64, 0, 2);
        const int mr = static_cast<int>(std::min<int64_t>(kMR, rows - rt * kMR));
        if (direct != nullptr) point_rows(*direct, rt * kMR, mr, p * NR);
        const bool residual = direct != nullptr && has_residual(direct->epilogue);
        kMicroTiles<T>[mr - 1](tile_rows + rt * kMR, tap_offset, run, b,
                               acc + (rt * panels + p) * kMR * NR, c > 0,
                               direct != nullptr ? dst_rows : nullptr, gemm.bias + p * NR,
                               residual ? res_rows : nullptr, direct != nullptr && has_relu(direct->epilogue));
      }
    }
  }
  // Epilogue of the remaining panels: bias, ReLU, and a store into each segment's slice.
  for (int64_t rt = 0; rt < row_tiles; ++rt) {
    const int64_t r0 = rt * kMR;
    const int mr = static_cast<int>(std::min<int64_t>(kMR, rows - r0));
    for (int64_t p = p_begin; p < p_end; ++p) {
      if (direct_segment(p) != nullptr) continue;
      const acc_t<T>* tile = acc + (rt * panels + p) * kMR * NR;
      const int64_t col0 = p * NR, col1 = std::min(col0 + NR, gemm.cols);
      for (const Segment<T>& seg : gemm.segments) {
        const int64_t lo = std::max(col0, seg.begin), hi = std::min(col1, seg.end);
        if (lo >= hi) continue;
        point_rows(seg, r0, mr, 0);
        for (int i = 0; i < mr; ++i) {
          const acc_t<T>* src = tile + i * NR - col0;
          T* dst = dst_rows[i];
          // bf16: c10's round-to-nearest-even, bf16::store's rounding bit for bit.
          if (!has_residual(seg.epilogue)) {
            const bool act = has_relu(seg.epilogue);
            for (int64_t j = lo; j < hi; ++j) {
              const acc_t<T> v = src[j] + gemm.bias[j];
              dst[j] = static_cast<T>(act ? relu(v) : v);
            }
          } else {
            const T* res = res_rows[i];
            for (int64_t j = lo; j < hi; ++j) {
              const acc_t<T> v = src[j] + gemm.bias[j] + static_cast<acc_t<T>>(res[j]);  // the registers' order
              dst[j] = static_cast<T>(has_relu(seg.epilogue) ? relu(v) : v);
            }
          }
        }
      }
    }
  }
}

// out[c] = max(out[c], in[c]) for c < C; NaN wins, as in torch.max_pool2d. bf16 compares
// in fp32 on the raw bits (widening is a shift, and the max is one of the inputs, so
// narrowing back is exact): c10::BFloat16's operators convert one element at a time and
// leave the loop scalar, 10x slower.
template <typename T>
inline void max_into(T* out, const T* in, int64_t C) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    auto* o = reinterpret_cast<uint16_t*>(out);
    const auto* v = reinterpret_cast<const uint16_t*>(in);
    for (int64_t c = 0; c < C; ++c) {
      const float a = bf16::widen(uint32_t(o[c]) << 16), b = bf16::widen(uint32_t(v[c]) << 16);
      o[c] = (b > a || b != b) ? v[c] : o[c];
    }
  } else {
    for (int64_t c = 0; c < C; ++c) {
      const T v = in[c];
      out[c] = (v > out[c] || v != v) ? v : out[c];
    }
  }
}

// The in-bounds rows of the 3x3 window around pixel (n, h, w) of an H x W grid, row-major
// (torch's scan order), into taps; returns how many (4 to 9: the centre is always in).
template <typename T>
inline int window_rows(const Plane<const T>& x, int64_t H, int64_t W, int64_t n, int64_t h, int64_t w,
                       const T* (&taps)[9]) {
  int count = 0;
  const Window win = window_of(H, W, h, w);
  for (int64_t hh = win.h0; hh <= win.h1; ++hh)
    for (int64_t ww = win.w0; ww <= win.w1; ++ww) taps[count++] = x.interior_row(n, hh, ww);
  return count;
}

// pooled[i][c] = max of x over the 3x3 window (-inf padding) around pixel i; NaN wins, as in
// torch.max_pool2d, whose row-major scan order (a later value replaces the running max
// when greater or NaN) this keeps, signed zeros included. Row i of pooled starts at
// pooled + i * ld (ld >= C).
template <typename T>
void max_pool_rows(const Plane<const T>& x, int64_t H, int64_t W, int64_t C, const int64_t* pix_n,
                   const int64_t* pix_h, const int64_t* pix_w, int64_t rows, T* pooled, int64_t ld) {
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t n = pix_n[i], h = pix_h[i], w = pix_w[i];
    T* out = pooled + i * ld;
    const T* taps[9] = {};
    const int count = window_rows(x, H, W, n, h, w, taps);
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
      // A vector of channels at a time, the running max in a register: 9 loads and one store
      // per vector, where max_into's pass per tap loaded and stored the row 9 times (10% of
      // GoogLeNet 3a's fused forward at batch 16).
      using V = typename Simd<T>::Vec;
      constexpr int64_t L = Simd<T>::kLanes;
      int64_t c = 0;
      for (; c + L <= C; c += L) {
        V m;
        std::memcpy(&m, taps[0] + c, sizeof(V));
#pragma GCC unroll 9
        for (int k = 1; k < count; ++k) {
          V v;
          std::memcpy(&v, taps[k] + c, sizeof(V));
          m = ((v > m) | (v != v)) ? v : m;
        }
        std::memcpy(out + c, &m, sizeof(V));
      }
      for (; c < C; ++c) {
        T m = taps[0][c];
        for (int k = 1; k < count; ++k) {
          const T v = taps[k][c];
          if (v > m || v != v) m = v;
        }
        out[c] = m;
      }
    } else {
      std::memcpy(out, taps[0], C * sizeof(T));
      for (int k = 1; k < count; ++k) max_into(out, taps[k], C);
    }
  }
}

// What a 3x3/1 average pool divides its window sum by: 9 (count_include_pad, zero padding
// counts, as F.avg_pool2d(x, 3, 1, 1)), the in-bounds pixels of the window
// (count_include_pad=False), or nothing (a sum pool: the backward's adjoint of the latter).
enum class PoolDivisor { kNine, kInBounds, kNone };

// pooled[i][c] = sum of x over the 3x3 window around pixel i (row-major, in-bounds
// pixels), divided as `divisor` says.
// Row i of pooled starts at pooled + i * ld (ld >= C: rows may sit inside a wider matrix).
// bf16 sums in fp32 and rounds once, as ATen's bf16 average pool does.
template <typename T>
void avg_pool_rows(const Plane<const T>& x, int64_t H, int64_t W, int64_t C, const int64_t* pix_n,
                   const int64_t* pix_h, const int64_t* pix_w, int64_t rows, T* pooled, int64_t ld,
                   PoolDivisor divisor = PoolDivisor::kNine) {
  using A = acc_t<T>;
  if constexpr (std::is_same_v<A, T>) {
    // float32 and float64: a vector of channels at a time, its sum in a register over the
    // window's taps, then one division and one store, where a pass per tap loaded and
    // stored the row 9 times. The same additions in the same order (from 0, row-major),
    // so the same bits.
    using V = typename Simd<T>::Vec;
    constexpr int64_t L = Simd<T>::kLanes;
    for (int64_t i = 0; i < rows; ++i) {
      const T* taps[9] = {};
      const int count = window_rows(x, H, W, pix_n[i], pix_h[i], pix_w[i], taps);
      const T divide_by = divisor == PoolDivisor::kNine ? T(9) : T(count);
      T* out = pooled + i * ld;
      int64_t c = 0;
      for (; c + L <= C; c += L) {
        V sum{};
#pragma GCC unroll 9
        for (int k = 0; k < count; ++k) {
          V v;
          std::memcpy(&v, taps[k] + c, sizeof(V));
          sum += v;
        }
        if (divisor != PoolDivisor::kNone) sum /= divide_by;
        std::memcpy(out + c, &sum, sizeof(V));
      }
      for (; c < C; ++c) {
        T sum = T(0);
        for (int k = 0; k < count; ++k) sum += taps[k][c];
        out[c] = divisor != PoolDivisor::kNone ? sum / divide_by : sum;
      }
    }
  } else {
    // bf16: a row's sums in fp32, rounded once.
    std::vector<A> out(C);
    for (int64_t i = 0; i < rows; ++i) {
      const T* taps[9] = {};
      const int count = window_rows(x, H, W, pix_n[i], pix_h[i], pix_w[i], taps);
      std::fill(out.begin(), out.end(), A(0));
      for (int k = 0; k < count; ++k)
        for (int64_t c = 0; c < C; ++c) out[c] += static_cast<A>(taps[k][c]);
      if (divisor != PoolDivisor::kNone) {
        const A divide_by = divisor == PoolDivisor::kNine ? A(9) : A(count);
        for (int64_t c = 0; c < C; ++c) out[c] /= divide_by;
      }
      T* row = pooled + i * ld;
      for (int64_t c = 0; c < C; ++c) row[c] = static_cast<T>(out[c]);
    }
  }
}

// Zeros the `pad`-wide spatial border of image n of an (N, H + 2 pad, W + 2 pad, C) buffer.
// The interior is fully written by stage 1, so zeroing all of it would waste bandwidth.
template <typename T>
void zero_border(const Plane<T>& buf, int64_t n, int64_t H, int64_t W, int64_t C) {
  const int64_t pad = buf.pad, Wp = W + 2 * pad;
  if (pad == 0) return;
  T* img = buf.data + n * buf.stride_n;
  for (int64_t hp = 0; hp < H + 2 * pad; ++hp) {
    T* row = img + hp * buf.stride_h;
    if (hp < pad || hp >= H + pad) {
      std::fill(row, row + Wp * C, T(0));
    } else {
      std::fill(row, row + pad * C, T(0));
      std::fill(row + (W + pad) * C, row + Wp * C, T(0));
    }
  }
}

template <typename T>
Plane<T> padded_plane(const at::Tensor& buf, int64_t H, int64_t W, int64_t C, int64_t pad) {
  const int64_t Wp = W + 2 * pad;
  return {buf.data_ptr<T>(), (H + 2 * pad) * Wp * C, Wp * C, C, pad};
}

}  // namespace gemm

// Columns of one packed weight panel for `dtype`: two 64-byte SIMD vectors of its
// accumulator. Python packs B as (ceil(cols / width), K, width), zero-padded past the last
// column; bf16 in VNNI pairs, each tap's K rounded up to even (gemm::Gemm::k_stride).
inline int64_t panel_width(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return gemm::kNR<float>;
    case at::kDouble: return gemm::kNR<double>;
    case at::kBFloat16: return gemm::kNR<c10::BFloat16>;
    default: TORCH_CHECK(false, "inception_fast CPU kernel supports float32, float64 and bfloat16, got ", dtype);
  }
}

}  // namespace inception_fast
