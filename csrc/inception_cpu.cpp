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
#include "gemm.h"
#include "nhwc.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <utility>
#include <vector>

namespace inception_fast {
namespace {
using namespace gemm;

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
      pixel_coords(b, rows, H, W, pn, ph, pw);
      stage(rows, pn, ph, pw, s, part, parts);
    }
  };
  const int64_t threads = at::get_num_threads(), HW = H * W;
  const int64_t group = images_per_group(HW), groups = ceil_div(N, group);
  if (image_major(groups, threads)) {
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
