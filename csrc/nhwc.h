// Building blocks shared by the CPU kernels: SIMD vectors and NHWC pixel addressing.
#pragma once

#include <algorithm>
#include <cstdint>

namespace inception_fast {

// 64-byte vectors: one zmm register with AVX-512, two ymm with AVX2 (GCC splits them).
template <typename T>
struct Simd;
template <>
struct Simd<float> {
  typedef float Vec __attribute__((vector_size(64)));
  typedef int32_t Mask __attribute__((vector_size(64)));  // what comparing two Vecs gives
  static constexpr int kLanes = 16;
};
template <>
struct Simd<double> {
  typedef double Vec __attribute__((vector_size(64)));
  typedef int64_t Mask __attribute__((vector_size(64)));
  static constexpr int kLanes = 8;
};

// An NHWC tensor, possibly with a spatial zero border of `pad`, seen as pixel rows.
// All offsets are int64: N*H*W*C may pass 2^31 (tested through pixel_offset()).
template <typename T>
struct Plane {
  T* data;
  int64_t stride_n, stride_h, stride_w;  // elements; channels are contiguous
  int64_t pad;

  int64_t interior_offset(int64_t n, int64_t h, int64_t w) const {
    return n * stride_n + (h + pad) * stride_h + (w + pad) * stride_w;
  }
  T* interior_row(int64_t n, int64_t h, int64_t w) const { return data + interior_offset(n, h, w); }
  // Top-left corner of the KxK window centred on output pixel (h, w), with pad == K / 2.
  T* window_row(int64_t n, int64_t h, int64_t w) const {
    return data + n * stride_n + h * stride_h + w * stride_w;
  }
};

// The in-bounds rows [h0, h1] and columns [w0, w1] of the 3x3 window around (h, w) of an
// H x W grid: 4 to 9 pixels, the centre always in. The one bounds rule of the 3x3/1 pools,
// forward (gemm.h's window_rows) and backward (max_pool_backward.h), which both scan it
// row-major, torch's pooling order. (Bounds, not a visitor: a lambda per pixel timed the
// backward's scatter 4-10% slower in three alternating pairs of runs.)
struct Window {
  int64_t h0, h1, w0, w1;
};
inline Window window_of(int64_t H, int64_t W, int64_t h, int64_t w) {
  return {std::max<int64_t>(h - 1, 0), std::min(h + 1, H - 1), std::max<int64_t>(w - 1, 0), std::min(w + 1, W - 1)};
}

// The element offset Plane::interior_row uses, for the index-arithmetic unit tests.
inline int64_t pixel_offset(int64_t stride_n, int64_t stride_h, int64_t stride_w, int64_t pad,
                            int64_t n, int64_t h, int64_t w) {
  return Plane<const float>{nullptr, stride_n, stride_h, stride_w, pad}.interior_offset(n, h, w);
}

}  // namespace inception_fast
