// Train-mode batch norm between the stages of the fused forward (inception_graph_cpu.cpp,
// graph_forward_bn_train). A stage's GEMMs store their pre-BN sums z (Epilogue::kLinear)
// into unbordered NHWC tensors, one per segment; before the next stage reads them, each
// segment's channels get their batch statistics over every (image, pixel) of its grid, and
// y = relu(z * alpha + shift), alpha = gamma * invstd, shift = beta - mean * alpha (the form
// of ATen's CPU batch norm), goes into the real destination: a zero-bordered buffer that
// the next stage reads, or the block's output. z stays for the backward, as eager batch
// norm keeps its input.
//
// Statistics: per channel, sums of z - k and (z - k)^2, k the channel's value at the
// slice's first pixel if finite (a shift against cancellation when |mean| >> std), in the
// accumulator type over runs of kAccRows rows, each run flushed into double; over a fixed
// number of pixel chunks summed in a fixed order, so the result does not depend on the
// thread count. var is the biased variance, as batch norm normalises with; the caller makes
// the unbiased one for the running statistics.
#pragma once

#include "nhwc.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

namespace inception_fast::bn_train {

// One GEMM segment, channels [channel, channel + count) of its destination, over the
// N x gh x gw pixels of its grid.
template <typename T, typename Acc>
struct Slice {
  const T* z;          // (N, gh, gw, count): the segment's pre-BN sums, contiguous (row m at m * count)
  Plane<T> dst;        // where relu(BN(z)) goes, at `channel`
  T* copy = nullptr;   // or (N, gh, gw, copy_ld) rows at `channel` where it goes too: a bordered
  int64_t copy_ld = 0; //   buffer's contiguous interior, which the backward reads
  int64_t channel, count;
  int64_t N, gh, gw;
  const Acc* params;  // (3, C) of the destination: rows gamma, beta, eps
  Acc* stats;         // (5, C) of the destination, written: rows mean, biased var, invstd, alpha, shift
  int64_t C;          // the destination's channels: the row length of params and stats
};

inline constexpr int64_t kChunks = 32;  // pixel chunks per slice: fixed, so sums never follow threads

// (n, h, w) of pixel m of an N x gh x gw grid.
inline void pixel_of(int64_t m, int64_t gh, int64_t gw, int64_t& n, int64_t& h, int64_t& w) {
  n = m / (gh * gw);
  h = m / gw % gh;
  w = m % gw;
}

// BN's output before ReLU, z * alpha + shift: one function for the forward and for the
// backward's ReLU mask, so that both round alike (one fused multiply-add).
template <typename V>
inline V bn_affine(V z, V alpha, V shift) {
  return z * alpha + shift;
}

template <typename T>
inline typename Simd<T>::Vec vload(const T* p) {
  typename Simd<T>::Vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
inline void vstore(T* p, typename Simd<T>::Vec v) {
  std::memcpy(p, &v, sizeof(v));
}

// Rows summed in the accumulator type, vectorised, before each flush into double (a double
// per element ran 8x slower than ATen's batch norm): at most kAccRows terms per float sum.
inline constexpr int64_t kAccRows = 256;

// s1[c] += sum over `rows` rows of z - k, s1[count + c] += sum of (z - k)^2 (z rows
// contiguous, `count` apart), through `acc` (2 * count of Acc).
template <typename T, typename Acc>
void accumulate_rows(const T* __restrict__ z, const T* __restrict__ k, int64_t rows, int64_t count,
                     Acc* __restrict__ acc, double* s1) {
  static_assert(std::is_same_v<T, Acc>, "float32 and float64 only");
  using V = typename Simd<T>::Vec;
  constexpr int64_t L = Simd<T>::kLanes;
  std::fill(acc, acc + 2 * count, Acc(0));
  for (int64_t m = 0; m < rows; ++m) {
    const T* __restrict__ zr = z + m * count;
    int64_t c = 0;
    for (; c + L <= count; c += L) {
      const V d = vload(zr + c) - vload(k + c);
      vstore(acc + c, vload(acc + c) + d);
      vstore(acc + count + c, vload(acc + count + c) + d * d);
    }
    for (; c < count; ++c) {
      const Acc d = zr[c] - k[c];
      acc[c] += d;
      acc[count + c] += d * d;
    }
  }
  for (int64_t c = 0; c < 2 * count; ++c) s1[c] += static_cast<double>(acc[c]);
}

// Batch statistics of every slice, then its normalised, rectified output: two parallel
// regions (statistics, normalisation) for all slices of a stage together.
template <typename T, typename Acc>
void normalize_stage(const std::vector<Slice<T, Acc>>& slices) {
  if (slices.empty()) return;
  const int64_t jobs = static_cast<int64_t>(slices.size());
  std::vector<int64_t> offset(jobs + 1, 0);  // into the per-chunk sums: 2 * count doubles per chunk
  for (int64_t j = 0; j < jobs; ++j) offset[j + 1] = offset[j] + kChunks * 2 * slices[j].count;
  std::vector<double> sums(offset[jobs], 0.0);
  // Each channel's shift: its value at the slice's first pixel, or 0 where that is not
  // finite (an inf there made every sum inf - inf, a NaN mean where eager's is inf).
  std::vector<std::vector<T>> shifts(jobs);
  for (int64_t j = 0; j < jobs; ++j) {
    const T* first = slices[j].z;
    shifts[j].resize(slices[j].count);
    for (int64_t c = 0; c < slices[j].count; ++c) shifts[j][c] = std::isfinite(first[c]) ? first[c] : T(0);
  }
  auto chunk = [](const Slice<T, Acc>& s, int64_t c) {
    const int64_t m = s.N * s.gh * s.gw;
    return std::make_pair(m * c / kChunks, m * (c + 1) / kChunks);
  };
  at::parallel_for(0, jobs * kChunks, 1, [&](int64_t i0, int64_t i1) {
    std::vector<Acc> acc;
    for (int64_t i = i0; i < i1; ++i) {
      const Slice<T, Acc>& s = slices[i / kChunks];
      const auto [m0, m1] = chunk(s, i % kChunks);
      double* s1 = sums.data() + offset[i / kChunks] + (i % kChunks) * 2 * s.count;
      const T* __restrict__ k = shifts[i / kChunks].data();
      acc.resize(2 * s.count);
      for (int64_t r0 = m0; r0 < m1; r0 += kAccRows)
        accumulate_rows(s.z + r0 * s.count, k, std::min(kAccRows, m1 - r0), s.count, acc.data(), s1);
    }
  });
  // Per slice and channel: alpha and shift of the normalisation, stats written for the caller.
  std::vector<std::vector<Acc>> alpha(jobs), shift(jobs);
  for (int64_t j = 0; j < jobs; ++j) {
    const Slice<T, Acc>& s = slices[j];
    const double count = static_cast<double>(s.N * s.gh * s.gw);
    TORCH_CHECK(count > 1, "batch norm in training needs more than 1 value per channel, got ", s.N, "x", s.gh, "x",
                s.gw);
    alpha[j].resize(s.count);
    shift[j].resize(s.count);
    const T* k = shifts[j].data();
    for (int64_t c = 0; c < s.count; ++c) {
      double s1 = 0.0, s2 = 0.0;
      for (int64_t ch = 0; ch < kChunks; ++ch) {
        s1 += sums[offset[j] + ch * 2 * s.count + c];
        s2 += sums[offset[j] + ch * 2 * s.count + s.count + c];
      }
      const double mean_shifted = s1 / count;
      const double var = std::max(s2 / count - mean_shifted * mean_shifted, 0.0);
      const int64_t at = s.channel + c;
      const Acc mean = static_cast<Acc>(static_cast<double>(k[c]) + mean_shifted);
      const Acc eps = s.params[2 * s.C + at];
      const Acc invstd = Acc(1) / std::sqrt(static_cast<Acc>(var) + eps);
      alpha[j][c] = s.params[at] * invstd;
      shift[j][c] = s.params[s.C + at] - mean * alpha[j][c];
      s.stats[at] = mean;
      s.stats[s.C + at] = static_cast<Acc>(var);
      s.stats[2 * s.C + at] = invstd;
      s.stats[3 * s.C + at] = alpha[j][c];  // the backward's ReLU mask: z * alpha + shift > 0
      s.stats[4 * s.C + at] = shift[j][c];
    }
  }
  at::parallel_for(0, jobs * kChunks, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const Slice<T, Acc>& s = slices[i / kChunks];
      const Acc* a = alpha[i / kChunks].data();
      const Acc* b = shift[i / kChunks].data();
      const auto [m0, m1] = chunk(s, i % kChunks);
      int64_t n, h, w;
      pixel_of(m0, s.gh, s.gw, n, h, w);
      for (int64_t m = m0; m < m1; ++m) {
        const T* __restrict__ z = s.z + m * s.count;
        T* __restrict__ y = s.dst.interior_row(n, h, w) + s.channel;
        T* __restrict__ y2 = s.copy != nullptr ? s.copy + m * s.copy_ld + s.channel : nullptr;
        using V = typename Simd<T>::Vec;
        constexpr int64_t L = Simd<T>::kLanes;
        const V zero{};
        int64_t c = 0;
        for (; c + L <= s.count; c += L) {
          V v = bn_affine(vload(z + c), vload(a + c), vload(b + c));
          v = v < zero ? zero : v;  // keeps NaN, like torch.relu
          vstore(y + c, v);
          if (y2 != nullptr) vstore(y2 + c, v);
        }
        for (; c < s.count; ++c) {
          Acc v = bn_affine(z[c], a[c], b[c]);
          v = v < Acc(0) ? Acc(0) : v;
          y[c] = v;
          if (y2 != nullptr) y2[c] = v;
        }
        if (++w == s.gw) {
          w = 0;
          if (++h == s.gh) h = 0, ++n;
        }
      }
    }
  });
}


// The backward of relu(BN(z)) on batch statistics over M rows (pixels) of `count`
// channels, rows of each input `ld` elements apart (channels contiguous), dz's ld_dz apart:
//   g = grad except where y <= 0 (threshold_backward's rule, as eager's ReLU backward: none
//       where y == 0, and a NaN activation passes its gradient), y the activation, or
//       without it bn_affine(z, alpha, shift) as the forward computed it (the block's
//       output need not be kept for the masks),
//   d_beta = sum g, d_gamma = invstd * sum g (z - mean),
//   dz = gamma invstd (g - d_beta / M - (z - mean) invstd^2 sum g (z - mean) / M),
// ATen's CPU batch-norm backward formula. Two passes: the sums, storing g into dz; then dz
// from g and z in place. The second reads two arrays, not three (grad, y and z again cost
// 1.4 ms against ATen's 1.1 for GoogLeNet 3a's 3x3 at batch 16: their 25 MB fall out of
// the last-level cache between the passes). Sums in double over kChunks fixed row chunks.
template <typename T, typename Acc>
void relu_bn_backward(const T* grad, int64_t ld_grad, const T* y, int64_t ld_y, const T* z, int64_t ld_z,
                      int64_t rows, int64_t count, const Acc* mean, const Acc* invstd, const Acc* gamma, T* dz,
                      int64_t ld_dz, Acc* d_gamma, Acc* d_beta, const Acc* alpha = nullptr,
                      const Acc* shift_z = nullptr) {
  static_assert(std::is_same_v<T, Acc>, "float32 and float64 only");
  using V = typename Simd<T>::Vec;
  constexpr int64_t L = Simd<T>::kLanes;
  const V zero{};
  std::vector<double> sums(kChunks * 2 * count, 0.0);
  at::parallel_for(0, kChunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<Acc> acc(2 * count);
    Acc* __restrict__ a_g = acc.data();
    Acc* __restrict__ a_gz = a_g + count;
    for (int64_t ch = c0; ch < c1; ++ch) {
      double* s = sums.data() + ch * 2 * count;
      const int64_t m_end = rows * (ch + 1) / kChunks;
      for (int64_t r0 = rows * ch / kChunks; r0 < m_end; r0 += kAccRows) {
        std::fill(acc.begin(), acc.end(), Acc(0));
        for (int64_t m = r0; m < std::min(r0 + kAccRows, m_end); ++m) {
          const T* __restrict__ gr = grad + m * ld_grad;
          const T* __restrict__ zr = z + m * ld_z;
          T* __restrict__ out = dz + m * ld_dz;
          // The activation: y itself, or remade from z as the forward made it.
          const T* __restrict__ yr = y != nullptr ? y + m * ld_y : nullptr;
          auto act = [&](int64_t c) { return yr != nullptr ? vload(yr + c)
                                                           : bn_affine(vload(zr + c), vload(alpha + c), vload(shift_z + c)); };
          auto act1 = [&](int64_t c) { return yr != nullptr ? yr[c] : bn_affine(zr[c], alpha[c], shift_z[c]); };
          int64_t c = 0;
          for (; c + L <= count; c += L) {
            const V g = act(c) <= zero ? zero : vload(gr + c);  // torch's rule: NaN passes
            vstore(out + c, g);
            vstore(a_g + c, vload(a_g + c) + g);
            vstore(a_gz + c, vload(a_gz + c) + g * (vload(zr + c) - vload(mean + c)));
          }
          for (; c < count; ++c) {
            const Acc g = act1(c) <= T(0) ? Acc(0) : gr[c];
            out[c] = g;
            a_g[c] += g;
            a_gz[c] += g * (zr[c] - mean[c]);
          }
        }
        for (int64_t c = 0; c < 2 * count; ++c) s[c] += static_cast<double>(acc[c]);
      }
    }
  });
  std::vector<Acc> scale(count), k(count), shift(count);
  for (int64_t c = 0; c < count; ++c) {
    double s_g = 0.0, s_gz = 0.0;
    for (int64_t ch = 0; ch < kChunks; ++ch) {
      s_g += sums[ch * 2 * count + c];
      s_gz += sums[ch * 2 * count + count + c];
    }
    const double is = static_cast<double>(invstd[c]);
    d_beta[c] = static_cast<Acc>(s_g);
    d_gamma[c] = static_cast<Acc>(s_gz * is);
    const double w = gamma != nullptr ? static_cast<double>(gamma[c]) : 1.0;
    // dz = scale (g - mean_g - (z - mean) proj), ATen's factoring: invstd^3 in one
    // product overflowed (or underflowed) where invstd passes ~1e100 in float64.
    scale[c] = static_cast<Acc>(w * is);
    k[c] = static_cast<Acc>(is * is * s_gz / static_cast<double>(rows));
    shift[c] = static_cast<Acc>(s_g / static_cast<double>(rows));
  }
  at::parallel_for(0, rows, 256, [&](int64_t m0, int64_t m1) {
    const Acc* __restrict__ sc = scale.data();
    const Acc* __restrict__ kk = k.data();
    const Acc* __restrict__ sh = shift.data();
    for (int64_t m = m0; m < m1; ++m) {
      const T* __restrict__ zr = z + m * ld_z;
      T* __restrict__ out = dz + m * ld_dz;
      int64_t c = 0;
      for (; c + L <= count; c += L)
        vstore(out + c, vload(sc + c) * (vload(out + c) - vload(sh + c) -
                                         (vload(zr + c) - vload(mean + c)) * vload(kk + c)));
      for (; c < count; ++c) out[c] = sc[c] * (out[c] - sh[c] - (zr[c] - mean[c]) * kk[c]);
    }
  });
}

}  // namespace inception_fast::bn_train
