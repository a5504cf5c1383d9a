// The backward of a stride-1 3x3 max pool followed by a 1x1 convolution (GoogLeNet's pool
// branch, Inception-v3's where it pools by max), on NHWC rows: one pass recomputes the pool
// and its argmax and scatters d_pooled = gp @ Wp into dx at the argmax, in place. No index
// tensor, no zeroed gradient buffer, no separate add, no full-size gp @ Wp tensor; the
// pooled rows it leaves give the projection's weight gradient (gp^T @ pooled).
// Used by csrc/inception_graph_cpu_backward.cpp.
#pragma once

#include "bf16_dot.h"
#include "nhwc.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

namespace inception_fast {

// A SIMD vector's worth of channels of T, in the type the pool compares and sums in:
// T's own vector, or for bf16 16 channels widened to fp32 (a shift: exact).
template <typename T>
struct PoolLanes {
  using Acc = T;  // what the scatter into dx sums in
  using Vec = typename Simd<T>::Vec;
  using Mask = typename Simd<T>::Mask;
  static constexpr int64_t kLanes = Simd<T>::kLanes;
  static Vec load(const T* p) {
    Vec v;
    std::memcpy(&v, p, sizeof(Vec));
    return v;
  }
  static void store(T* p, Vec v) { std::memcpy(p, &v, sizeof(Vec)); }
  static void store_max(T* p, Vec v) { store(p, v); }
};
template <>
struct PoolLanes<c10::BFloat16> {
  using Acc = float;
  using Vec = Simd<float>::Vec;
  using Mask = Simd<float>::Mask;
  static constexpr int64_t kLanes = Simd<float>::kLanes;
  static Vec load(const c10::BFloat16* p) { return bf16::load(p); }
  // A sum: rounded to nearest even.
  static void store(c10::BFloat16* p, Vec v) { bf16::store(p, v); }
  // A max is one of the loaded bf16 values: its upper half, NaN payloads included.
  static void store_max(c10::BFloat16* p, Vec v) {
    bf16::Bits u;
    std::memcpy(&u, &v, sizeof(u));
    const bf16::Half h = __builtin_convertvector(u >> 16, bf16::Half);
    std::memcpy(p, &h, sizeof(h));
  }
};

// One pixel of one channel block (cb channels) of the pool branch: pooled = max over the
// window's `taps` pixels (x rows, row-major), and dx[argmax] += dp, dx in PoolLanes' Acc.
// kTaps > 0 fixes the tap count at compile time (an interior pixel's full 3x3 window), so
// the tap loops unroll.
template <typename T, int kTaps>
inline void pool_pixel(const T* const* x, typename PoolLanes<T>::Acc* const* dx, T* pooled, const T* dp, int taps,
                       int64_t cb) {
  using P = PoolLanes<T>;
  using Acc = typename P::Acc;
  using Vec = typename P::Vec;
  using Mask = typename P::Mask;
  constexpr int64_t L = P::kLanes;
  if constexpr (kTaps > 0) taps = kTaps;
  int64_t c = 0;
  for (; c + L <= cb; c += L) {
    Vec m = P::load(x[0] + c);
    Mask arg{};
#pragma GCC unroll 9
    for (int k = 1; k < taps; ++k) {
      const Vec v = P::load(x[k] + c);
      const Mask take = (v > m) | (v != v);
      m = take ? v : m;
      arg = take ? Mask{} + k : arg;
    }
    P::store_max(pooled + c, m);
    if (dp == nullptr) continue;
    const Vec g = P::load(dp + c);
#pragma GCC unroll 9
    for (int k = 0; k < taps; ++k) {
      Vec acc;
      std::memcpy(&acc, dx[k] + c, sizeof(Vec));
      acc += arg == k ? g : Vec{};
      std::memcpy(dx[k] + c, &acc, sizeof(Vec));
    }
  }
  for (; c < cb; ++c) {  // the same, one channel at a time
    T m = x[0][c];
    int arg = 0;
    for (int k = 1; k < taps; ++k) {
      const T v = x[k][c];
      if (v > m || v != v) m = v, arg = k;
    }
    pooled[c] = m;
    if (dp != nullptr) dx[arg][c] += static_cast<Acc>(dp[c]);
  }
}

// pooled = 3x3/1 max pool of x (pad 1, -inf border); with dx, dx[argmax] += gp @ Wp.
// The argmax is torch's: the window is scanned row-major and a value replaces the running
// max when it is greater or NaN, so ties go to the first and NaN to the last NaN. Work items
// are (image, channel block) pairs: no two write the same element of dx, whatever the
// thread count, so the scatter needs no atomics and is deterministic. Each item computes
// its own block of d_pooled = gp @ Wp (one image's rows, one block of columns): it stays
// in L2 instead of making a round trip through memory as a full (M, C) tensor; unless the
// caller passes that tensor made already (`dp_full`: fp32, where oneDNN's 1x1 convolution
// makes it faster than the per-item at::mm calls run on AMD's Zen 5, whose MKL takes these
// small GEMMs at ~40 GMAC/s).
// (Measured and rejected: items that own a channel block across all images, so that dx
// and pooled never exist in full either; the many small GEMMs that needs ran at a third
// of MKL's speed and the whole step got 1.7x slower. And a gather in place of the scatter:
// each pixel's argmax kept as a window position in a ring of three rows, then each dx row
// summing the d_pooled of the neighbours whose argmax it is, one store per element. It won
// where the tensors fit the 32 MB L3 (GoogLeNet 4a's shape at batch 8: 0.45 against 0.52
// ms) and lost where they do not (batch 32: 2.85 against 2.33 ms inside the train step):
// there the pass is bound by memory, ~60 MB a call, and the gather reads d_pooled's rows
// three image rows at a time, which streams worse than the scatter's one.)
//
// bf16 scatters into an fp32 copy of the item's block of dx, zeroed, and adds it to dx
// once, as eager's bf16 max-pool backward sums in fp32: rounding dx after each of up to
// nine additions lost precision. (Its time did not change beyond the ±15% noise of these
// machines: 10-13 ms for GoogLeNet 3a at batch 32, either way.)
template <typename T>
void max_pool3x3_backward(const T* x /* (N, H, W, C) */, const at::Tensor& gp /* (M, cp) */,
                          const at::Tensor& wp /* (cp, C) */, T* dx /* (N, H, W, C) or null, accumulated into */,
                          T* pooled /* (N, H, W, C) */, int64_t N, int64_t H, int64_t W, int64_t C,
                          const T* dp_full = nullptr /* (N, H, W, C) gp @ Wp, or null: made per item */) {
  using P = PoolLanes<T>;
  using Acc = typename P::Acc;
  constexpr bool kWide = !std::is_same_v<Acc, T>;
  constexpr int64_t kBlock = 4 * P::kLanes;  // channels of one work item: its rows stay in L1
  const int64_t blocks = (C + kBlock - 1) / kBlock, HW = H * W;
  at::parallel_for(0, N * blocks, 1, [&](int64_t i0, int64_t i1) {
    std::vector<Acc> wide(kWide && dx != nullptr ? HW * kBlock : 0);  // (HW, cb): bf16's dx block in fp32
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t n = item / blocks, c0 = (item % blocks) * kBlock, cb = std::min(C, c0 + kBlock) - c0;
      at::Tensor dp_block;  // (HW, cb): this item's d_pooled
      if (dx != nullptr && dp_full == nullptr) dp_block = at::mm(gp.narrow(0, n * HW, HW), wp.narrow(1, c0, cb));
      if (!wide.empty()) std::fill(wide.begin(), wide.begin() + HW * cb, Acc(0));
      // Where pixel (hh, ww)'s channel c0 of dx is summed: dx itself, or its row of `wide`.
      auto dx_at = [&](int64_t hh, int64_t ww) -> Acc* {
        if constexpr (kWide) return wide.data() + (hh * W + ww) * cb;
        else return dx + ((n * H + hh) * W + ww) * C + c0;
      };
      for (int64_t h = 0; h < H; ++h) {
        for (int64_t w = 0; w < W; ++w) {
          const T* x_rows[9];
          Acc* dx_rows[9];
          int taps = 0;
          const Window win = window_of(H, W, h, w);
          for (int64_t hh = win.h0; hh <= win.h1; ++hh)
            for (int64_t ww = win.w0; ww <= win.w1; ++ww) {
              x_rows[taps] = x + ((n * H + hh) * W + ww) * C + c0;
              dx_rows[taps++] = dx != nullptr ? dx_at(hh, ww) : nullptr;
            }
          const int64_t p = h * W + w;
          const T* dp = dx == nullptr        ? nullptr
                        : dp_full != nullptr ? dp_full + (n * HW + p) * C + c0
                                             : dp_block.data_ptr<T>() + p * cb;
          T* out = pooled + (n * HW + p) * C + c0;
          if (taps == 9)
            pool_pixel<T, 9>(x_rows, dx_rows, out, dp, taps, cb);
          else
            pool_pixel<T, 0>(x_rows, dx_rows, out, dp, taps, cb);
        }
      }
      if constexpr (kWide) {
        if (dx == nullptr) continue;
        for (int64_t p = 0; p < HW; ++p) {  // dx += the block's sums, rounded once
          T* d = dx + (n * HW + p) * C + c0;
          const Acc* s = wide.data() + p * cb;
          int64_t c = 0;
          for (; c + P::kLanes <= cb; c += P::kLanes) {
            typename P::Vec v;
            std::memcpy(&v, s + c, sizeof(v));
            P::store(d + c, P::load(d + c) + v);
          }
          for (; c < cb; ++c) d[c] = static_cast<T>(static_cast<Acc>(d[c]) + s[c]);
        }
      }
    }
  });
}

}  // namespace inception_fast
