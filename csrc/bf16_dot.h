// The bf16 steps of the CPU GEMM (gemm.h's micro_tile for bf16): a dot product of pairs of
// bf16 into fp32 sums, and the store that rounds fp32 sums to bf16.
//
// B is packed in VNNI pairs: for K rows (k, k + 1) and column n, the 32-bit word
// (B[k][n], B[k + 1][n]), low half first. A pair of A's channels is one 32-bit word too, so
// one step adds a[k] * b[k][n] + a[k + 1] * b[k + 1][n] to column n's sum. Where the
// compiler targets AVX512-BF16 (-march=native on Cooper Lake, Sapphire Rapids, Zen 4 and
// later) a step is one vdpbf16ps; elsewhere the pairs are widened to fp32 and fused
// multiply-added, with the same sums up to the order of the two products' roundings,
// except for denormals: vdpbf16ps flushes them to zero (as oneDNN's bf16 convolutions
// do), the widened path keeps them.
#pragma once

#include "nhwc.h"

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace inception_fast::bf16 {

using Vec = Simd<float>::Vec;

// The float whose bits these are (a bf16 shifted into the upper half is its value).
inline float widen(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
typedef uint32_t Bits __attribute__((vector_size(64)));
typedef uint16_t Half __attribute__((vector_size(32)));

#if defined(__AVX512BF16__)
constexpr const char* kPath = "avx512_bf16 (vdpbf16ps)";
using Pairs = __m512bh;  // 16 columns' (k, k + 1) pairs

inline Pairs load_pairs(const c10::BFloat16* p) { return (__m512bh)_mm512_loadu_si512(p); }

// acc[n] += a.lo * b[n].lo + a.hi * b[n].hi
inline Vec dot2(Vec acc, uint32_t a, Pairs b) {
  return (Vec)_mm512_dpbf16_ps((__m512)acc, (__m512bh)_mm512_set1_epi32(static_cast<int>(a)), b);
}
#else
constexpr const char* kPath = "fp32 FMA on widened bf16 (this build's target lacks AVX512-BF16)";
struct Pairs {
  Vec lo, hi;  // the even and the odd K row of 16 columns, widened
};

inline Pairs load_pairs(const c10::BFloat16* p) {
  Bits u;
  std::memcpy(&u, p, sizeof(u));
  const Bits lo = u << 16, hi = u & 0xFFFF0000u;
  Pairs out;
  std::memcpy(&out.lo, &lo, sizeof(Vec));
  std::memcpy(&out.hi, &hi, sizeof(Vec));
  return out;
}

inline Vec dot2(Vec acc, uint32_t a, const Pairs& b) {
  return acc + widen(a << 16) * b.lo + widen(a & 0xFFFF0000u) * b.hi;
}
#endif

// 16 bf16 values widened to fp32 (a shift: exact).
inline Vec load(const c10::BFloat16* p) {
  Half h;
  std::memcpy(&h, p, sizeof(h));
  const Bits u = __builtin_convertvector(h, Bits) << 16;
  Vec v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
}

// dst[0:16] = v rounded to bf16: nearest, ties to even, NaN as 0x7FC0: c10::BFloat16's
// rounding bit for bit, so the register and the scalar epilogues agree.
inline void store(c10::BFloat16* dst, Vec v) {
  Bits u;
  std::memcpy(&u, &v, sizeof(u));
  Bits r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  r = (v != v) ? Bits{} + 0x7FC0u : r;
  const Half h = __builtin_convertvector(r, Half);
  std::memcpy(dst, &h, sizeof(h));
}

}  // namespace inception_fast::bf16
