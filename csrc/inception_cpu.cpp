// The fused Inception forward on the CPU, NHWC, in two stages.
//
// Stage 1 (pointwise): for each block of pixel rows, one GEMM over the input for
//   [1x1 | 3x3 reduce | 5x5 reduce], and one GEMM over the 3x3-max-pooled rows
//   (pooled into a small per-thread buffer, never a full tensor) for the pool
//   projection. 1x1 and pool columns land in their channel slices of the output;
//   the reductions land in the interiors of two zero-bordered buffers t3, t5.
// Stage 2 (spatial): implicit-GEMM K3xK3 over t3 and K5xK5 over t5, into their
//   output slices. The zero border makes every tap an in-bounds load, so one
//   tap offset serves all rows of a tile and the inner loop has no branches.
//
// One register-tiled micro-kernel serves all four GEMMs: a 1x1 conv is the
// one-tap case. Rows of A are addressed through per-row pointers (implicit
// GEMM, no im2col); B is pre-packed into panels of two SIMD vectors. Every
// epilogue adds the bias, applies ReLU and stores straight into the
// destination's channel slice: there is no concat copy.
//
// Results do not depend on the thread count: each output element is one
// accumulation in a fixed order, whichever thread or block computes it.

#include "inception_cpu.h"
#include "nhwc.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <utility>
#include <vector>

namespace inception_fast {
namespace {

// 12 rows x 2 vectors = 24 accumulators: the most that fit 32 zmm registers next to
// the two B vectors and one broadcast A value.
constexpr int kMR = 12;

template <typename T>
constexpr int kNR = 2 * Simd<T>::kLanes;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// GEMM columns [begin, end) go to channels [channel, channel + end - begin) of `dst`.
template <typename T>
struct Segment {
  int64_t begin, end;
  Plane<T> dst;
  int64_t channel;
};

// A slice of the K dimension small enough that its B rows for one panel stay in L1:
// whole taps when a tap's channels fit, else a channel range of a single tap.
struct KChunk {
  int64_t tap_begin, taps;
  int64_t c_begin, c_count;
};

// C = relu(A @ B + bias), A rows given by pointers, A's K index split into taps.
template <typename T>
struct Gemm {
  const T* b_packed;                // (panels, taps * k_per_tap, kNR)
  const T* bias;                    // (cols,)
  int64_t cols;
  int64_t k_per_tap;                // channels read at each tap
  std::vector<int64_t> tap_offset;  // element offset of each tap from a row's window origin
  std::vector<Segment<T>> segments;
  std::vector<KChunk> chunks;       // filled by plan_chunks()

  int64_t panels() const { return ceil_div(cols, kNR<T>); }
  int64_t k_total() const { return static_cast<int64_t>(tap_offset.size()) * k_per_tap; }
};

// Half of a 48 KB L1: the B chunk of one panel, with room left for the A rows it meets.
constexpr int64_t kChunkBytes = 24 * 1024;

// Rows of one parallel work item: enough to reuse each B chunk many times from L1, few
// enough that the block's A rows and partial sums stay in a 2 MB L2.
constexpr int64_t kMaxBlockRows = 32 * kMR;

// Rows per thread under which threads split a GEMM's columns rather than its rows.
constexpr int64_t kSplitColumnsBelowRows = 6 * kMR;

template <typename T>
void plan_chunks(Gemm<T>& g) {
  const int64_t k_max = std::max<int64_t>(1, kChunkBytes / (kNR<T> * sizeof(T)));
  const int64_t taps = static_cast<int64_t>(g.tap_offset.size());
  if (g.k_per_tap <= k_max) {
    const int64_t step = k_max / g.k_per_tap;
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
// dst[i][0:kNR] = relu(sum + bias) straight from the registers.
template <typename T, int MR>
void micro_tile(const T* const* a_rows, const int64_t* tap_offset, const KChunk& chunk,
                const T* b, T* tile /* MR x kNR */, bool accumulate, T* const* dst,
                const T* bias /* kNR, with dst */) {
  using Vec = typename Simd<T>::Vec;
  constexpr int L = Simd<T>::kLanes;
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
  if (dst != nullptr) {
    Vec bias0, bias1;
    std::memcpy(&bias0, bias, sizeof(Vec));
    std::memcpy(&bias1, bias + L, sizeof(Vec));
    const Vec zero{};
#pragma GCC unroll 12
    for (int i = 0; i < MR; ++i) {
      Vec v0 = acc0[i] + bias0, v1 = acc1[i] + bias1;
      v0 = v0 < zero ? zero : v0;  // keeps NaN, like torch.relu
      v1 = v1 < zero ? zero : v1;
      std::memcpy(dst[i], &v0, sizeof(Vec));
      std::memcpy(dst[i] + L, &v1, sizeof(Vec));
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
using MicroTileFn = void (*)(const T* const*, const int64_t*, const KChunk&, const T*, T*, bool,
                             T* const*, const T*);

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
template <typename T>
void run_gemm(const Gemm<T>& gemm, const T* const* a_rows, const int64_t* pix_n,
              const int64_t* pix_h, const int64_t* pix_w, int64_t rows, T* acc, int64_t part,
              int64_t parts) {
  constexpr int NR = kNR<T>;
  const int64_t panels = gemm.panels(), k_total = gemm.k_total();
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
  auto point_rows = [&](const Segment<T>& seg, int64_t r0, int mr, int64_t col) {
    for (int i = 0; i < mr; ++i)
      dst_rows[i] = seg.dst.interior_row(pix_n[r0 + i], pix_h[r0 + i], pix_w[r0 + i]) +
                    seg.channel + col - seg.begin;
  };
  for (size_t c = 0; c < gemm.chunks.size(); ++c) {
    const KChunk& chunk = gemm.chunks[c];
    const bool last = c + 1 == gemm.chunks.size();
    const int64_t b_row = chunk.tap_begin * gemm.k_per_tap + chunk.c_begin;
    for (int64_t p = p_begin; p < p_end; ++p) {
      const T* b = gemm.b_packed + (p * k_total + b_row) * NR;
      const Segment<T>* direct = last ? direct_segment(p) : nullptr;
      for (int64_t rt = 0; rt < row_tiles; ++rt) {
        const int mr = static_cast<int>(std::min<int64_t>(kMR, rows - rt * kMR));
        if (direct != nullptr) point_rows(*direct, rt * kMR, mr, p * NR);
        kMicroTiles<T>[mr - 1](a_rows + rt * kMR, gemm.tap_offset.data(), chunk, b,
                               acc + (rt * panels + p) * kMR * NR, c > 0,
                               direct != nullptr ? dst_rows : nullptr, gemm.bias + p * NR);
      }
    }
  }
  // Epilogue of the remaining panels: bias, ReLU, and a store into each segment's slice.
  for (int64_t rt = 0; rt < row_tiles; ++rt) {
    const int64_t r0 = rt * kMR;
    const int mr = static_cast<int>(std::min<int64_t>(kMR, rows - r0));
    for (int64_t p = p_begin; p < p_end; ++p) {
      if (direct_segment(p) != nullptr) continue;
      const T* tile = acc + (rt * panels + p) * kMR * NR;
      const int64_t col0 = p * NR, col1 = std::min(col0 + NR, gemm.cols);
      for (const Segment<T>& seg : gemm.segments) {
        const int64_t lo = std::max(col0, seg.begin), hi = std::min(col1, seg.end);
        if (lo >= hi) continue;
        point_rows(seg, r0, mr, 0);
        for (int i = 0; i < mr; ++i) {
          const T* src = tile + i * NR - col0;
          T* dst = dst_rows[i];
          for (int64_t j = lo; j < hi; ++j) dst[j] = relu(src[j] + gemm.bias[j]);
        }
      }
    }
  }
}

// pooled[i][c] = max of x over the 3x3 window (-inf padding) around pixel i; NaN wins, as in
// torch.max_pool2d.
template <typename T>
void max_pool_rows(const Plane<const T>& x, int64_t H, int64_t W, int64_t C, const int64_t* pix_n,
                   const int64_t* pix_h, const int64_t* pix_w, int64_t rows, T* pooled) {
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t n = pix_n[i], h = pix_h[i], w = pix_w[i];
    T* out = pooled + i * C;
    std::memcpy(out, x.interior_row(n, h, w), C * sizeof(T));
    for (int64_t dy = -1; dy <= 1; ++dy) {
      if (h + dy < 0 || h + dy >= H) continue;
      for (int64_t dx = -1; dx <= 1; ++dx) {
        if ((dy == 0 && dx == 0) || w + dx < 0 || w + dx >= W) continue;
        const T* in = x.interior_row(n, h + dy, w + dx);
        for (int64_t c = 0; c < C; ++c) {
          const T v = in[c];
          out[c] = (v > out[c] || v != v) ? v : out[c];
        }
      }
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
Plane<T> padded_plane(at::Tensor& buf, int64_t H, int64_t W, int64_t C, int64_t pad) {
  const int64_t Wp = W + 2 * pad;
  return {buf.data_ptr<T>(), (H + 2 * pad) * Wp * C, Wp * C, C, pad};
}

template <typename T>
void forward_impl(const at::Tensor& x, const at::Tensor& reduce_b, const at::Tensor& reduce_bias,
                  const at::Tensor& conv3_b, const at::Tensor& conv3_bias,
                  const at::Tensor& conv5_b, const at::Tensor& conv5_bias,
                  const at::Tensor& pool_b, const at::Tensor& pool_bias, const InceptionDims& d,
                  at::Tensor& out) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t c_out = out.size(1), M = N * H * W;
  const int64_t p3 = d.k3 / 2, p5 = d.k5 / 2;

  // Intermediates keep a zero border so that stage 2 never tests bounds.
  auto opts = x.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor t3 = at::empty({N, H + 2 * p3, W + 2 * p3, d.r3}, opts);
  at::Tensor t5 = at::empty({N, H + 2 * p5, W + 2 * p5, d.r5}, opts);
  const Plane<T> t3_plane = padded_plane<T>(t3, H, W, d.r3, p3);
  const Plane<T> t5_plane = padded_plane<T>(t5, H, W, d.r5, p5);

  const Plane<const T> x_plane{x.data_ptr<T>(), H * W * C, W * C, C, 0};
  const Plane<T> out_plane{out.data_ptr<T>(), H * W * c_out, W * c_out, c_out, 0};

  const int64_t c1 = d.c1, r3 = d.r3, r5 = d.r5;
  Gemm<T> reduce{reduce_b.data_ptr<T>(), reduce_bias.data_ptr<T>(), c1 + r3 + r5, C, {0},
                       {{0, c1, out_plane, 0},
                        {c1, c1 + r3, t3_plane, 0},
                        {c1 + r3, c1 + r3 + r5, t5_plane, 0}}};
  Gemm<T> pool{pool_b.data_ptr<T>(), pool_bias.data_ptr<T>(), d.cp, C, {0},
                     {{0, d.cp, out_plane, c1 + d.c3 + d.c5}}};
  auto spatial = [&](const at::Tensor& b, const at::Tensor& bias, int64_t cols, int64_t k,
                     const Plane<T>& src, int64_t channel) {
    Gemm<T> g{b.data_ptr<T>(), bias.data_ptr<T>(), cols, src.stride_w, {}, {{0, cols, out_plane, channel}}};
    for (int64_t dy = 0; dy < k; ++dy)
      for (int64_t dx = 0; dx < k; ++dx) g.tap_offset.push_back(dy * src.stride_h + dx * src.stride_w);
    return g;
  };
  Gemm<T> conv3 = spatial(conv3_b, conv3_bias, d.c3, d.k3, t3_plane, c1);
  Gemm<T> conv5 = spatial(conv5_b, conv5_bias, d.c5, d.k5, t5_plane, c1 + d.c3);
  for (Gemm<T>* g : {&reduce, &pool, &conv3, &conv5}) plan_chunks(*g);

  // Per-thread scratch for one block of rows: pixel coordinates, A row pointers, the
  // partial-sum tiles, and the max-pooled input rows of the pool projection.
  const int64_t max_panels = std::max({reduce.panels(), pool.panels(), conv3.panels(), conv5.panels()});
  struct Scratch {
    std::vector<int64_t> pix;
    std::vector<const T*> a_rows;
    std::vector<T> acc, pooled;
  };
  auto make_scratch = [&](int64_t block) {
    return Scratch{std::vector<int64_t>(3 * block), std::vector<const T*>(block),
                   std::vector<T>(ceil_div(block, kMR) * max_panels * kMR * kNR<T>),
                   std::vector<T>(block * C)};
  };

  // Stage 1 for pixel rows [m0, m0 + rows): pointwise GEMMs, pooled rows built on the fly.
  auto stage1 = [&](int64_t rows, const int64_t* pn, const int64_t* ph, const int64_t* pw,
                    Scratch& s, int64_t part, int64_t parts) {
    const T** a_rows = s.a_rows.data();
    for (int64_t i = 0; i < rows; ++i) a_rows[i] = x_plane.interior_row(pn[i], ph[i], pw[i]);
    run_gemm(reduce, a_rows, pn, ph, pw, rows, s.acc.data(), part, parts);
    if (pool.panels() * part / parts == pool.panels() * (part + 1) / parts) return;
    max_pool_rows(x_plane, H, W, C, pn, ph, pw, rows, s.pooled.data());
    for (int64_t i = 0; i < rows; ++i) a_rows[i] = s.pooled.data() + i * C;
    run_gemm(pool, a_rows, pn, ph, pw, rows, s.acc.data(), part, parts);
  };
  // Stage 2: both spatial convolutions for the same rows, so every block costs the same.
  auto stage2 = [&](int64_t rows, const int64_t* pn, const int64_t* ph, const int64_t* pw,
                    Scratch& s, int64_t part, int64_t parts) {
    const T** a_rows = s.a_rows.data();
    for (int64_t i = 0; i < rows; ++i) a_rows[i] = t3_plane.window_row(pn[i], ph[i], pw[i]);
    run_gemm(conv3, a_rows, pn, ph, pw, rows, s.acc.data(), part, parts);
    for (int64_t i = 0; i < rows; ++i) a_rows[i] = t5_plane.window_row(pn[i], ph[i], pw[i]);
    run_gemm(conv5, a_rows, pn, ph, pw, rows, s.acc.data(), part, parts);
  };
  // Runs `stage` over rows [m0, m1) in blocks of at most `block` rows, for column part
  // `part` of `parts`.
  auto for_rows = [&](int64_t m0, int64_t m1, int64_t block, Scratch& s, auto&& stage,
                      int64_t part = 0, int64_t parts = 1) {
    for (int64_t b = m0; b < m1; b += block) {
      const int64_t rows = std::min(block, m1 - b);
      int64_t *pn = s.pix.data(), *ph = pn + block, *pw = ph + block;
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t m = b + i, hw = m % (H * W);
        pn[i] = m / (H * W);
        ph[i] = hw / W;
        pw[i] = hw % W;
      }
      stage(rows, pn, ph, pw, s, part, parts);
    }
  };
  // Big blocks reuse each L1-resident B chunk over more rows; `parts` equal blocks per range.
  auto block_rows = [](int64_t rows, int64_t parts) {
    const int64_t blocks = parts * ceil_div(rows, parts * kMaxBlockRows);
    return ceil_div(ceil_div(rows, blocks), kMR) * kMR;
  };

  const int64_t threads = at::get_num_threads(), HW = H * W;
  // Small images are grouped so that a block still has enough rows to amortise B.
  const int64_t group = std::max<int64_t>(1, (kMaxBlockRows + HW / 2) / HW);
  const int64_t groups = ceil_div(N, group);
  if (groups >= 4 * threads || groups % threads == 0) {
    // Image-major: a thread runs both stages on a group of whole images, so their t3 and
    // t5 go from stage 1 to stage 2 through its L2 instead of through DRAM.
    const int64_t block = block_rows(std::min(group, N) * HW, 1);
    at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
      Scratch scratch = make_scratch(block);
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t n0 = g * group, n1 = std::min(n0 + group, N);
        for (int64_t n = n0; n < n1; ++n) {
          zero_border(t3_plane, n, H, W, d.r3);
          zero_border(t5_plane, n, H, W, d.r5);
        }
        for_rows(n0 * HW, n1 * HW, block, scratch, stage1);
        for_rows(n0 * HW, n1 * HW, block, scratch, stage2);
      }
    });
  } else {
    // Too few images to share out: split the pixel rows of all images between threads,
    // one stage after the other (stage 2 reads stage 1's halo rows from other blocks).
    // With only a few register tiles of rows per thread (a 7x7 grid at batch 1), the threads
    // split the weight columns instead: weights then dominate the traffic, and each thread
    // reads only its part of them (measured: 1.28x on 5b at batch 1, 0.93x on 4a's 196 rows).
    const bool split_columns = M < threads * kSplitColumnsBelowRows;
    const int64_t parts = split_columns ? threads : 1;
    const int64_t block = split_columns ? block_rows(M, 1) : block_rows(M, threads);
    const int64_t blocks = ceil_div(M, block);
    at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        zero_border(t3_plane, n, H, W, d.r3);
        zero_border(t5_plane, n, H, W, d.r5);
      }
    });
    auto in_parallel = [&](auto&& stage) {
      at::parallel_for(0, blocks * parts, 1, [&](int64_t i0, int64_t i1) {
        Scratch scratch = make_scratch(block);
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t b = i / parts;
          for_rows(b * block, std::min((b + 1) * block, M), block, scratch, stage, i % parts, parts);
        }
      });
    };
    in_parallel(stage1);
    in_parallel(stage2);
  }
}

void check_packed(const at::Tensor& b, const char* name, int64_t k, int64_t cols,
                  const at::Tensor& x) {
  const int64_t width = panel_width(x.scalar_type());
  TORCH_CHECK(b.scalar_type() == x.scalar_type(), name, " must have x's dtype ", x.scalar_type(),
              ", got ", b.scalar_type());
  TORCH_CHECK(b.is_contiguous() && b.dim() == 3 && b.size(0) == ceil_div(cols, width) &&
                  b.size(1) == k && b.size(2) == width,
              name, " must be contiguous with shape (", ceil_div(cols, width), ", ", k, ", ",
              width, "), got ", b.sizes());
}

void check_bias(const at::Tensor& b, const char* name, int64_t cols, const at::Tensor& x) {
  TORCH_CHECK(b.scalar_type() == x.scalar_type() && b.is_contiguous() && b.dim() == 1 &&
                  b.size(0) == cols,
              name, " must be a contiguous (", cols, ",) tensor of dtype ", x.scalar_type(),
              ", got ", b.sizes(), " of ", b.scalar_type());
}

}  // namespace

int64_t panel_width(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return kNR<float>;
    case at::kDouble: return kNR<double>;
    default: TORCH_CHECK(false, "inception_fast CPU kernel supports float32 and float64, got ", dtype);
  }
}

at::Tensor inception_forward(const at::Tensor& x_in, const at::Tensor& reduce_b,
                             const at::Tensor& reduce_bias, const at::Tensor& conv3_b,
                             const at::Tensor& conv3_bias, const at::Tensor& conv5_b,
                             const at::Tensor& conv5_bias, const at::Tensor& pool_b,
                             const at::Tensor& pool_bias, const InceptionDims& d,
                             const std::optional<at::Tensor>& out_opt) {
  TORCH_CHECK(x_in.device().is_cpu(), "x must be a CPU tensor, got ", x_in.device());
  TORCH_CHECK(x_in.dim() == 4, "x must be 4-D (N, C, H, W), got ", x_in.sizes());
  TORCH_CHECK(d.k3 % 2 == 1 && d.k5 % 2 == 1, "kernel sizes must be odd, got ", d.k3, " and ", d.k5);
  const int64_t N = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  check_packed(reduce_b, "reduce_b", C, d.c1 + d.r3 + d.r5, x_in);
  check_bias(reduce_bias, "reduce_bias", d.c1 + d.r3 + d.r5, x_in);
  check_packed(conv3_b, "conv3_b", d.k3 * d.k3 * d.r3, d.c3, x_in);
  check_bias(conv3_bias, "conv3_bias", d.c3, x_in);
  check_packed(conv5_b, "conv5_b", d.k5 * d.k5 * d.r5, d.c5, x_in);
  check_bias(conv5_bias, "conv5_bias", d.c5, x_in);
  check_packed(pool_b, "pool_b", C, d.cp, x_in);
  check_bias(pool_bias, "pool_bias", d.cp, x_in);

  // NHWC in memory; a no-op for channels_last inputs, one copy for anything else.
  const at::Tensor x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  const std::vector<int64_t> out_shape{N, d.c1 + d.c3 + d.c5 + d.cp, H, W};
  at::Tensor out;
  if (out_opt.has_value()) {
    out = *out_opt;
    TORCH_CHECK(out.sizes() == at::IntArrayRef(out_shape) && out.scalar_type() == x.scalar_type() &&
                    out.device() == x.device() &&
                    out.is_contiguous(at::MemoryFormat::ChannelsLast),
                "out must be a channels_last ", x.scalar_type(), " tensor of shape ",
                at::IntArrayRef(out_shape), ", got ", out.sizes(), " of ", out.scalar_type(),
                out.is_contiguous(at::MemoryFormat::ChannelsLast) ? "" : " (not channels_last)");
  } else {
    out = at::empty(out_shape, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  }
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "inception_forward", [&] {
    forward_impl<scalar_t>(x, reduce_b, reduce_bias, conv3_b, conv3_bias, conv5_b, conv5_bias,
                           pool_b, pool_bias, d, out);
  });
  return out;
}

}  // namespace inception_fast
