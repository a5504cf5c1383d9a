// The weight gradient of an fp32 stride-1 3x3, 1x7 or 7x1 convolution by Winograd's minimal
// filtering: the transpose of the forward's algorithm (winograd.h). The forward computes
// each output tile as Y = A^T [ (G g G^T) . (B^T d B) ] A, linear in the filter g; its
// adjoint gives
//     dg = sum over tiles of G^T [ (A dY A^T) . (B^T d B) ] G,
// dY the tile's output gradient. The sum over tiles commutes with G^T . G, so it runs in the
// transformed domain as one GEMM per position alpha, reducing over every tile of every image:
//     M_alpha (cout x cin) = sum_t U_alpha[t]^T V_alpha[t],
// U = A dY A^T (t x cout) and V = B^T d B (t x cin), and each (cout, cin) pair's 3x3 taps are
// then G^T M G. F(4x4, 3x3) spends 36 multiply-adds per tile of 16 outputs where the direct
// weight gradient (oneDNN's) spends 144; F(2x2, 3x3) 16 for 4, against 36. The 1-D F(2, 7)
// (Inception-v3's 17x17 blocks) runs the same along its filter's axis: 8 per 2 outputs,
// against 14, with G^T m alone.
//
// The GEMMs are our own register-tiled transposed-A kernel (tn_tile), over chunks of tiles
// whose transformed U and V stay in the last-level cache: ~210 GMAC/s on 2 Zen 5 threads,
// where ATen's bmm (MKL's sgemm on this AMD CPU) ran at ~100 and the direct weight
// gradient (oneDNN's) runs at ~215 on 4x the multiply-adds. The transforms then take about
// as long as the GEMMs (memory-bound: they write 2.25x the activations).
// Errors: on GoogLeNet's 28x28 and 14x14 3x3s and a 56x56 stem unit (post-ReLU inputs,
// random gradients) the result's distance from float64 was 0.4-1.2e-6 of its norm, the
// direct fp32 weight gradient's 0.2-1.0e-6.
//
// Non-finite inputs: a NaN or inf in x or the gradient, or a transformed sum that overflows
// float32, makes every result NaN (the caller then runs the direct convolution backward,
// which puts non-finite values where eager does; the transforms would spread them
// differently, and overflow where the direct sums do not).
#include "inception_cpu.h"
#include "nhwc.h"
#include "winograd.h"

#include <ATen/Parallel.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>

namespace inception_fast {
namespace {

using winograd::Along;
using winograd::F2_7;
using winograd::F2x2_3x3;
using winograd::F4x4_3x3;

template <typename T>
Plane<const T> plane(const at::Tensor& t) {  // t (N, C, H, W) with its channels contiguous
  return Plane<const T>{t.data_ptr<T>(), t.stride(0), t.stride(2), t.stride(3), 0};
}

// The transformed tiles t0 + [begin, end) of a chunk: V (positions, tiles, cin) from x's
// windows, U (positions, tiles, cout) from the gradient's tiles. Tile t is image
// t / (th tw), tile row t / tw % th, column t % tw; its window starts pad_h pixels above and
// pad_w left of its outputs; pixels outside x and outputs outside the gradient's grid read as 0.
// Returns false where a transformed value is not finite.
template <typename Tr>
bool transform_tiles(const Plane<const float>& x, const Plane<const float>& dy, int64_t C, int64_t K, int64_t H,
                     int64_t W, int64_t Ho, int64_t Wo, int64_t pad_h, int64_t pad_w, int64_t th, int64_t tw,
                     int64_t t0,
                     int64_t begin, int64_t end,
                     float* v /* (P, sv): rows of ldv from row i = tile t0 + i */,
                     int64_t ldv, int64_t sv,
                     float* u /* (P, su): rows of ldu, as v */,
                     int64_t ldu, int64_t su) {
  using Vec = Simd<float>::Vec;
  constexpr int L = Simd<float>::kLanes, P = Tr::kPositions, TH = Tr::kTileH, TW = Tr::kTileW;
  Vec bad{};
  float bad1 = 0.0f;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t t = t0 + i, n = t / (th * tw), h0 = t / tw % th * TH, w0 = t % tw * TW;
    const float* p[P];
    for (int r = 0; r < Tr::kWinH; ++r)
      for (int s = 0; s < Tr::kWinW; ++s) {
        const int64_t h = h0 - pad_h + r, w = w0 - pad_w + s;
        p[r * Tr::kWinW + s] = h >= 0 && w >= 0 && h < H && w < W ? x.interior_row(n, h, w) : nullptr;
      }
    const float* q[TH * TW];
    for (int r = 0; r < TH; ++r)
      for (int s = 0; s < TW; ++s)
        q[r * TW + s] = h0 + r < Ho && w0 + s < Wo ? dy.interior_row(n, h0 + r, w0 + s) : nullptr;
    // The next tile's window and gradient rows, fetched while this one transforms: the
    // window loads otherwise stall on memory (x and the gradient stream from DRAM once).
    if (i + 1 < end) {
      const int64_t t1 = t + 1, n1 = t1 / (th * tw), h1 = t1 / tw % th * TH, w1 = t1 % tw * TW;
      for (int r = 0; r < Tr::kWinH; ++r)
        for (int s = Tr::kWinW - TW; s < Tr::kWinW; ++s) {  // the columns this tile's window lacks
          const int64_t h = h1 - pad_h + r, w = w1 - pad_w + s;
          if (h < 0 || w < 0 || h >= H || w >= W) continue;
          const char* row = reinterpret_cast<const char*>(x.interior_row(n1, h, w));
          for (int64_t b = 0; b < C * 4; b += 64) __builtin_prefetch(row + b);
        }
      for (int r = 0; r < TH; ++r)
        for (int s = 0; s < TW; ++s) {
          if (h1 + r >= Ho || w1 + s >= Wo) continue;
          const char* row = reinterpret_cast<const char*>(dy.interior_row(n1, h1 + r, w1 + s));
          for (int64_t b = 0; b < K * 4; b += 64) __builtin_prefetch(row + b);
        }
    }
    float* vo = v + i * ldv;
    for (int a = 0; a < P; ++a) std::fill(vo + a * sv + C, vo + a * sv + ldv, 0.0f);  // the GEMM's padding
    int64_t c = 0;
    for (; c + L <= C; c += L) {
      Vec d[P], o[P];
      winograd::load_rows<P>(p, c, d);
      Tr::input_tile(d, o);
      for (int a = 0; a < P; ++a) {
        bad += o[a] - o[a];  // 0 where finite, NaN where not
        std::memcpy(vo + a * sv + c, &o[a], sizeof(Vec));
      }
    }
    for (; c < C; ++c) {
      float d[P], o[P];
      for (int a = 0; a < P; ++a) d[a] = p[a] != nullptr ? p[a][c] : 0.0f;
      Tr::input_tile(d, o);
      for (int a = 0; a < P; ++a) {
        bad1 += o[a] - o[a];
        vo[a * sv + c] = o[a];
      }
    }
    float* uo = u + i * ldu;
    for (int a = 0; a < P; ++a) std::fill(uo + a * su + K, uo + a * su + ldu, 0.0f);
    int64_t k = 0;
    for (; k + L <= K; k += L) {
      Vec g[TH * TW], o[P];
      winograd::load_rows<TH * TW>(q, k, g);
      Tr::grad_tile(g, o);
      for (int a = 0; a < P; ++a) {
        bad += o[a] - o[a];
        std::memcpy(uo + a * su + k, &o[a], sizeof(Vec));
      }
    }
    for (; k < K; ++k) {
      float g[TH * TW], o[P];
      for (int a = 0; a < TH * TW; ++a) g[a] = q[a] != nullptr ? q[a][k] : 0.0f;
      Tr::grad_tile(g, o);
      for (int a = 0; a < P; ++a) {
        bad1 += o[a] - o[a];
        uo[a * su + k] = o[a];
      }
    }
  }
  bool finite = bad1 == 0.0f;
  for (int l = 0; l < L; ++l) finite = finite && bad[l] == 0.0f;
  return finite;
}

constexpr int kRows = 12;  // output channels per register tile: 12 x 2 vectors, 24 accumulators
// Tiles summed in registers before they join m: a blocked sum, whose rounding error grows
// with 64 + (tiles / 64) terms where one running sum over all tiles grew with all of them
// (4e-6 of the result's norm over a 56x56 stem unit at batch 16, against 1e-6 blocked).
constexpr int64_t kSumBlock = 64;

// m[kRows][NV vectors] (+)= sum over t < count of u[t][0:kRows]^T v[t][0:NV lanes]: the
// transposed-A product as rank-1 updates, one broadcast of u per row and NV loads of v per t
// (u is the row-major (count, cout) U_alpha, so a register tile's kRows values of one tile sit
// together, as in a packed A).
template <int NV>
void tn_tile(const float* u /* (count, ldu) */, int64_t ldu, const float* v /* (count, ldv) */, int64_t ldv,
             int64_t count, float* m /* (kRows, ldm) */, int64_t ldm, bool accumulate) {
  using Vec = Simd<float>::Vec;
  constexpr int L = Simd<float>::kLanes;
  for (int64_t t0 = 0; t0 < count; t0 += kSumBlock) {
    const int64_t t1 = std::min(count, t0 + kSumBlock);
    Vec acc[kRows][NV] = {};
    for (int64_t t = t0; t < t1; ++t) {
      const float* a = u + t * ldu;
      Vec b[NV];
      for (int j = 0; j < NV; ++j) std::memcpy(&b[j], v + t * ldv + j * L, sizeof(Vec));
#pragma GCC unroll 12
      for (int i = 0; i < kRows; ++i)
        for (int j = 0; j < NV; ++j) acc[i][j] += a[i] * b[j];
    }
    for (int i = 0; i < kRows; ++i)
      for (int j = 0; j < NV; ++j) {
        float* dst = m + i * ldm + j * L;
        if (accumulate || t0 > 0) {
          Vec old;
          std::memcpy(&old, dst, sizeof(Vec));
          acc[i][j] += old;
        }
        std::memcpy(dst, &acc[i][j], sizeof(Vec));
      }
  }
}

// A grow-only, 64-byte aligned float buffer.
class Buffer {
 public:
  float* get(int64_t n) {
    if (n > size_) {
      data_.reset();
      size_ = 0;
      data_.reset(static_cast<float*>(std::aligned_alloc(64, (n * sizeof(float) + 63) / 64 * 64)));
      TORCH_CHECK(data_ != nullptr, "winograd_weight_grad: out of memory for ", n, " floats of scratch");
      size_ = n;
    }
    return data_.get();
  }
  // Frees a buffer past `floats`: the scratch kept between calls stays bounded.
  void trim(int64_t floats) {
    if (size_ > floats) {
      data_.reset();
      size_ = 0;
    }
  }

 private:
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  std::unique_ptr<float, Free> data_;
  int64_t size_ = 0;
};

// U, V and M, kept per calling thread between calls: fresh buffers cost their page faults
// and zeroing every call, ~1.3 ms of 4e's 4.4 at batch 16. At most kKeptFloats each are kept
// (16 MB; GoogLeNet's and Inception-v3's sizes need up to ~10 MB in all); a larger call
// frees its buffers when it returns.
constexpr int64_t kKeptFloats = int64_t{4} << 20;
struct Scratch {
  Buffer u, v, m;
};
thread_local Scratch scratch;
struct TrimScratch {  // on every exit of weight_grad, exceptions included
  ~TrimScratch() {
    scratch.u.trim(kKeptFloats);
    scratch.v.trim(kKeptFloats);
    scratch.m.trim(kKeptFloats);
  }
};

template <typename Tr>
at::Tensor weight_grad(const at::Tensor& x, const at::Tensor& dy, int64_t pad_h, int64_t pad_w, bool channels_last) {
  constexpr int64_t P = Tr::kPositions, TH = Tr::kTileH, TW = Tr::kTileW, kTaps = Tr::kTaps;
  constexpr int64_t KH = Tr::kWinH - TH + 1, KW = Tr::kWinW - TW + 1;  // the filter
  static_assert(KH * KW == kTaps, "a transform's window is its tile plus the filter");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t K = dy.size(1), Ho = dy.size(2), Wo = dy.size(3);
  const int64_t th = gemm::ceil_div(Ho, TH), tw = gemm::ceil_div(Wo, TW), tiles = N * th * tw;
  // U and V rows padded to whole register tiles (zeros: the GEMMs run full tiles only).
  constexpr int L = Simd<float>::kLanes;
  const int64_t ldu = gemm::ceil_div(K, kRows) * kRows, ldv = gemm::ceil_div(C, L) * L;
  // Tiles per chunk: U and V of a chunk in ~8 MB (an L3 slice), at least 256 tiles so that
  // each GEMM reduces over enough rows to amortise loading and storing its sums.
  const auto opts = x.options().memory_format(channels_last ? at::MemoryFormat::ChannelsLast
                                                            : at::MemoryFormat::Contiguous);
  // Nothing to sum: zeros, in the asked layout (at::zeros drops the memory format in opts).
  if (tiles == 0 || K == 0 || C == 0) return at::empty({K, C, KH, KW}, opts).zero_();
  const int64_t bytes = P * (ldu + ldv) * static_cast<int64_t>(sizeof(float));
  const int64_t chunk = std::min(tiles, std::max<int64_t>(256, (int64_t{8} << 20) / bytes));
  // Position strides one cache line past a whole number of rows: at a multiple of 4 KB the
  // transforms' P stores of one tile would all fall in one L1 set.
  const int64_t sv = chunk * ldv + L, su = chunk * ldu + L;
  const TrimScratch trim;
  float* vd = scratch.v.get(P * sv);           // V: (P, sv), rows of ldv per tile
  float* ud = scratch.u.get(P * su);           // U: (P, su), rows of ldu per tile
  float* md = scratch.m.get(P * ldu * ldv);    // M_alpha: (P, ldu, ldv)
  const Plane<const float> xp = plane<float>(x), dp = plane<float>(dy);
  const int64_t row_tiles = ldu / kRows, col_vecs = ldv / L;
  std::atomic<bool> finite{true};
  for (int64_t t0 = 0; t0 < tiles; t0 += chunk) {
    const int64_t count = std::min(chunk, tiles - t0);
    at::parallel_for(0, count, 16, [&](int64_t begin, int64_t end) {
      if (!transform_tiles<Tr>(xp, dp, C, K, H, W, Ho, Wo, pad_h, pad_w, th, tw, t0, begin, end, vd, ldv, sv, ud, ldu,
                               su))
        finite = false;
    });
    // One item per (position, row tile): disjoint sums, no reduction between threads.
    at::parallel_for(0, P * row_tiles, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t item = i0; item < i1; ++item) {
        const int64_t a = item / row_tiles, r = item % row_tiles * kRows;
        const float* ua = ud + a * su + r;
        const float* va = vd + a * sv;
        float* ma = md + (a * ldu + r) * ldv;
        int64_t j = 0;
        for (; j + 2 <= col_vecs; j += 2) tn_tile<2>(ua, ldu, va + j * L, ldv, count, ma + j * L, ldv, t0 > 0);
        if (j < col_vecs) tn_tile<1>(ua, ldu, va + j * L, ldv, count, ma + j * L, ldv, t0 > 0);
      }
    });
  }
  at::Tensor out = at::empty({K, C, KH, KW}, opts);
  if (!finite.load()) return out.fill_(std::numeric_limits<float>::quiet_NaN());
  float* od = out.data_ptr<float>();
  at::parallel_for(0, K * C, 1024, [&](int64_t begin, int64_t end) {
    float bad = 0.0f;  // w - w: 0 where finite
    for (int64_t j = begin; j < end; ++j) {
      const int64_t k = j / C, c = j % C;
      float mv[P], w[kTaps];
      for (int64_t a = 0; a < P; ++a) mv[a] = md[(a * ldu + k) * ldv + c];
      Tr::weight_tile(mv, w);
      for (int r = 0; r < kTaps; ++r) bad += w[r] - w[r];
      if (channels_last) {  // (K, KH, KW, C): tap r of (k, c) at k KH KW C + r C + c
        for (int r = 0; r < kTaps; ++r) od[(k * kTaps + r) * C + c] = w[r];
      } else {
        std::memcpy(od + kTaps * j, w, sizeof(w));
      }
    }
    if (bad != 0.0f) finite = false;  // NaN: a transformed sum overflowed
  });
  // Finite inputs whose transformed sums overflow (|values| ~1e18) leave some taps NaN where
  // the direct gradient is finite: all NaN then too, so that the caller reruns it directly.
  if (!finite.load()) out.fill_(std::numeric_limits<float>::quiet_NaN());
  return out;
}

}  // namespace

at::Tensor winograd_weight_grad(const at::Tensor& x, const at::Tensor& grad, int64_t padding, int64_t tile,
                                int64_t kh, int64_t kw, bool channels_last) {
  TORCH_CHECK(x.dim() == 4 && grad.dim() == 4 && x.size(0) == grad.size(0), "winograd_weight_grad: x (N, C, H, W) "
              "and grad (N, K, Ho, Wo) must be 4-D over the same batch, got ", x.sizes(), " and ", grad.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat && grad.scalar_type() == at::kFloat && x.device().is_cpu() &&
                  grad.device().is_cpu(),
              "winograd_weight_grad: x and grad must be float32 CPU tensors, got ", x.scalar_type(), " and ",
              grad.scalar_type());
  const bool square = kh == 3 && kw == 3, row = kh == 1 && kw == 7, column = kh == 7 && kw == 1;
  TORCH_CHECK(square || row || column, "winograd_weight_grad: the filter (kh, kw) must be (3, 3), (1, 7) or (7, 1), "
              "got (", kh, ", ", kw, ")");
  TORCH_CHECK(!square || padding == 0 || padding == 1,
              "winograd_weight_grad: a 3x3's padding must be 1 ('same') or 0, got ", padding);
  TORCH_CHECK(square || padding == 3, "winograd_weight_grad: a 1x7 or 7x1 is padded 3 along its filter ('same'), got ",
              padding);
  TORCH_CHECK(tile == 2 || (square && tile == 4), "winograd_weight_grad: tile must be 2 (F(2x2, 3x3), F(2, 7)) or, "
              "for a 3x3, 4 (F(4x4, 3x3)), got ", tile);
  const int64_t pad_h = row ? 0 : padding, pad_w = column ? 0 : padding;
  const int64_t want_h = x.size(2) + 2 * pad_h - (kh - 1), want_w = x.size(3) + 2 * pad_w - (kw - 1);
  TORCH_CHECK(grad.size(2) == want_h && grad.size(3) == want_w, "winograd_weight_grad: a ", kh, "x", kw,
              " stride-1 convolution with padding (", pad_h, ", ", pad_w, ") maps ", x.size(2), "x", x.size(3),
              " onto ", want_h, "x", want_w, ", but grad is ", grad.size(2), "x", grad.size(3));
  // Channels contiguous (channels_last, or an NHWC buffer's interior), any pixel strides.
  const at::Tensor xc = x.stride(1) == 1 ? x : x.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor gc = grad.stride(1) == 1 ? grad : grad.contiguous(at::MemoryFormat::ChannelsLast);
  const bool cl = channels_last;
  if (row) return weight_grad<Along<F2_7, false>>(xc, gc, pad_h, pad_w, cl);
  if (column) return weight_grad<Along<F2_7, true>>(xc, gc, pad_h, pad_w, cl);
  return tile == 4 ? weight_grad<F4x4_3x3>(xc, gc, pad_h, pad_w, cl) : weight_grad<F2x2_3x3>(xc, gc, pad_h, pad_w, cl);
}

}  // namespace inception_fast
