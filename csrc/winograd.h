// Winograd's minimal filtering F(2x2, 3x3) for the CPU kernel's fp32 3x3 stride-1
// convolutions over zero-bordered intermediates (Lavin and Gray, "Fast Algorithms for
// Convolutional Neural Networks", CVPR 2016; cuDNN's and NNPACK's 3x3 algorithm).
//
// A 2x2 output tile of one (input channel, output channel) pair is
//     Y = A^T [ (G g G^T) . (B^T d B) ] A
// over the 4x4 input window d around it (the 3x3 windows of its four pixels): 16 multiplies
// where the direct convolution takes 36, 2.25x fewer multiply-adds. Summed over input
// channels, the 16 elementwise products become 16 independent GEMMs, one per position
// alpha = 4 r + s of the transformed tile:
//     M_alpha (tiles x cols) = V_alpha (tiles x cin) @ U_alpha (cin x cols),
// run by gemm.h's register-tiled micro-kernel, and the output transform A^T M A adds the bias,
// applies ReLU and stores into the GEMM's channel slices.
//
//   B^T = [1  0 -1  0]    G = [  1    0    0 ]    A^T = [1  1  1  0]
//         [0  1  1  0]        [1/2  1/2  1/2]          [0  1 -1 -1]
//         [0 -1  1  0]        [1/2 -1/2  1/2]
//         [0  1  0 -1]        [  0    0    1 ]
//
// B packing (ops/backend.py, pack_winograd): per panel of kNR columns, the 16 U_alpha blocks
// (cin rows each, alpha-major) and then the direct implicit GEMM's 9 taps (9 cin rows), so
// (panels, 25 cin, kNR). The direct part serves tiles whose outputs are not finite: a NaN or
// inf in a 4x4 window reaches all four outputs through the transforms (inf - inf, 0 * inf),
// where the direct convolution confines it to the pixels whose 3x3 window holds it. Such
// tiles are recomputed directly, so non-finite values land where eager's convolution puts
// them; so are tiles where the transforms cancel values far larger than the outputs
// (kCancellation).
//
// fp32 only (fp16 runs the fp32 kernels): the transforms add a few roundings per output and
// shorten the sums, and the error against float64 came out at or below the direct GEMM's on
// every block measured (benchmarks/winograd.py). float64 keeps the direct implicit GEMM, the
// exact path; bf16 too: transformed tiles stored in bf16 would add roundings to every
// product, against the rule that bf16 stays within 2x eager's error (not tried).
#pragma once

#include "gemm.h"

#include <cmath>
#include <cstring>
#include <vector>

namespace inception_fast::winograd {

using gemm::ceil_div;
using gemm::kMR;
using gemm::kNR;

constexpr int64_t kPositions = 16;  // alpha: the 4x4 transformed tile
constexpr int64_t kTaps = 9;        // the direct part of the packed B
// Tiles per block: V and M of one block (16 x tiles x channels each) stay in a 1-2 MB L2,
// and each L1-resident chunk of U_alpha meets 8 register tiles of rows.
constexpr int64_t kMaxTiles = 8 * kMR;

// Fewer tiles than this in a whole call (N x ceil(H/2) x ceil(W/2)) run the direct part of
// the packed B instead: with few rows the weights dominate the traffic, and U is 16/9 of
// them. GoogLeNet's 5b at batch 1 (7x7, 16 tiles) ran 4% slower as Winograd; 4a-4e at
// batch 1 (14x14, 49 tiles) 16-22% faster.
constexpr int64_t kMinTiles = 32;

// A (tile, panel) whose outputs' pre-cancellation magnitude passes this many times its largest
// output after ReLU is recomputed directly (Workspace::output_transform): at most ~16 x a few
// ulps of error relative to the tile's own outputs, and never reached on real activations.
constexpr float kCancellation = 16.0f;

// Whether a GEMM of the plan can run as F(2x2, 3x3): a 3x3, stride 1, padding 1 convolution
// over a zero-bordered buffer (source >= 0). ops/plan.py's GemmStep.winograd says the same.
inline bool eligible(int64_t source, int64_t kh, int64_t kw, int64_t stride, int64_t pad_h, int64_t pad_w) {
  return source >= 0 && kh == 3 && kw == 3 && stride == 1 && pad_h == 1 && pad_w == 1;
}

// out = B^T d B for one 4x4 window, elementwise over V (a float, or a SIMD vector of channels).
template <typename V>
inline void input_tile(const V (&d)[4][4], V (&out)[4][4]) {
  V t[4][4];
  for (int s = 0; s < 4; ++s) {
    t[0][s] = d[0][s] - d[2][s];
    t[1][s] = d[1][s] + d[2][s];
    t[2][s] = d[2][s] - d[1][s];
    t[3][s] = d[1][s] - d[3][s];
  }
  for (int r = 0; r < 4; ++r) {
    out[r][0] = t[r][0] - t[r][2];
    out[r][1] = t[r][1] + t[r][2];
    out[r][2] = t[r][2] - t[r][1];
    out[r][3] = t[r][1] - t[r][3];
  }
}

// y = A^T m A: the tile's 2x2 outputs, elementwise over V.
template <typename V>
inline void output_tile(const V (&m)[4][4], V (&y)[2][2]) {
  V u[2][4];
  for (int s = 0; s < 4; ++s) {
    u[0][s] = m[0][s] + m[1][s] + m[2][s];
    u[1][s] = m[1][s] - m[2][s] - m[3][s];
  }
  for (int r = 0; r < 2; ++r) {
    y[r][0] = u[r][0] + u[r][1] + u[r][2];
    y[r][1] = u[r][1] - u[r][2] - u[r][3];
  }
}

// One F(2x2, 3x3) convolution of the plan: its input, the U blocks of its packed B, and the
// 3x3 implicit GEMM over the direct part of that B (the caller's, with its bias, columns and
// destinations), which also serves the recomputes.
struct Conv {
  Plane<const float> src;  // (N, H + 2 border, W + 2 border, cin), border >= 1, zero border
  int64_t H, W;
  const float* u;           // (panels, 25 cin, kNR): the U_alpha blocks, then direct.b_packed's taps
  gemm::Gemm<float> direct;  // b_packed at the 9 direct taps of each panel, panel_rows 25 cin

  Conv(const Plane<const float>& src_, int64_t H_, int64_t W_, const float* u_, gemm::Gemm<float> direct_)
      : src(src_), H(H_), W(W_), u(u_), direct(std::move(direct_)) {
    TORCH_CHECK(direct.panel_rows == (kPositions + kTaps) * direct.k_per_tap && direct.tap_offset.size() == kTaps,
                "winograd: the direct GEMM must be the 3x3 over the direct part of the Winograd panels");
    for (const auto& seg : direct.segments)
      TORCH_CHECK(seg.epilogue == gemm::Epilogue::kRelu, "winograd: a 3x3 convolution stores relu(sum + bias)");
  }
  int64_t cin() const { return direct.k_per_tap; }
  int64_t cols() const { return direct.cols; }
  const float* bias() const { return direct.bias; }
  int64_t panels() const { return direct.panels(); }
};

// One thread's scratch for Conv::run: V and M of a block, the GEMMs' partial sums, row
// pointers and pixel coordinates. Sized for the widest convolution it will run.
class Workspace {
 public:
  Workspace(int64_t max_cin, int64_t max_panels)
      : ldv_(gemm::padded_stride<float>(max_cin)),
        ldm_(gemm::padded_stride<float>(max_panels * kNR<float>)),
        v_(kPositions * kMaxTiles * ldv_),
        m_(kPositions * kMaxTiles * ldm_),
        acc_(ceil_div(kMaxTiles, kMR) * max_panels * kMR * kNR<float>),
        zero_bias_(max_panels * kNR<float>, 0.0f),
        rows_(kMaxTiles),
        pix_(3 * kMaxTiles),
        zeros_(kMaxTiles, 0),
        iota_(kMaxTiles) {
    for (int64_t i = 0; i < kMaxTiles; ++i) iota_[i] = i;
  }

  // Tiles (tn, th, tw)[i] of `conv` (output pixels (2 th, 2 tw) to (2 th + 1, 2 tw + 1) of
  // image tn, those inside H x W), for column part `part` of `parts` (a contiguous range of
  // weight panels, as gemm::run_gemm cuts them).
  void run(const Conv& conv, const int64_t* tn, const int64_t* th, const int64_t* tw, int64_t tiles, int64_t part,
           int64_t parts) {
    const int64_t panels = conv.panels();
    const int64_t p_begin = panels * part / parts, p_end = panels * (part + 1) / parts;
    if (p_begin == p_end) return;
    // The alpha GEMMs store M's sums as they are (kLinear, a zero bias): all their panels,
    // padding columns included (zero in B), so that every panel stores from registers.
    gemm::Gemm<float> g{nullptr, zero_bias_.data(), conv.cols(), conv.cin(), {0}, {}, {}};
    g.panel_rows = conv.direct.panel_rows;
    g.segments.push_back({0, panels * kNR<float>, Plane<float>{nullptr, 0, 0, ldm_, 0}, 0, gemm::Epilogue::kLinear});
    gemm::plan_chunks(g);
    for (int64_t t0 = 0; t0 < tiles; t0 += kMaxTiles) {
      const int64_t count = std::min(kMaxTiles, tiles - t0);
      input_transform(conv, tn + t0, th + t0, tw + t0, count);
      for (int64_t a = 0; a < kPositions; ++a) {
        g.b_packed = conv.u + a * conv.cin() * kNR<float>;
        g.segments[0].dst.data = m_.data() + a * kMaxTiles * ldm_;
        const float* v = v_.data() + a * kMaxTiles * ldv_;
        for (int64_t i = 0; i < count; ++i) rows_[i] = v + i * ldv_;
        gemm::run_gemm(g, rows_.data(), zeros_.data(), zeros_.data(), iota_.data(), count, acc_.data(), part, parts);
      }
      output_transform(conv, tn + t0, th + t0, tw + t0, count, p_begin, p_end);
    }
  }

 private:
  // V_alpha's row i = (B^T d B)[alpha] of tile i's window, which starts one pixel up and left
  // of the tile, in the zero border. Window rows or columns past the border (odd H or W with a
  // one-pixel border) read as zeros.
  void input_transform(const Conv& conv, const int64_t* tn, const int64_t* th, const int64_t* tw, int64_t count) {
    using Vec = Simd<float>::Vec;
    constexpr int L = Simd<float>::kLanes;
    const int64_t last_h = conv.H - 1 + conv.src.pad, last_w = conv.W - 1 + conv.src.pad, C = conv.cin();
    const int64_t a_stride = kMaxTiles * ldv_;
    for (int64_t i = 0; i < count; ++i) {
      const float* p[4][4];
      for (int r = 0; r < 4; ++r)
        for (int s = 0; s < 4; ++s) {
          const int64_t h = 2 * th[i] - 1 + r, w = 2 * tw[i] - 1 + s;
          p[r][s] = h <= last_h && w <= last_w ? conv.src.interior_row(tn[i], h, w) : nullptr;
        }
      float* out = v_.data() + i * ldv_;
      int64_t c = 0;
      for (; c + L <= C; c += L) {
        Vec d[4][4], o[4][4];
        for (int r = 0; r < 4; ++r)
          for (int s = 0; s < 4; ++s) {
            if (p[r][s] != nullptr) std::memcpy(&d[r][s], p[r][s] + c, sizeof(Vec));
            else d[r][s] = Vec{};
          }
        input_tile(d, o);
        for (int r = 0; r < 4; ++r)
          for (int s = 0; s < 4; ++s) std::memcpy(out + (4 * r + s) * a_stride + c, &o[r][s], sizeof(Vec));
      }
      for (; c < C; ++c) {
        float d[4][4], o[4][4];
        for (int r = 0; r < 4; ++r)
          for (int s = 0; s < 4; ++s) d[r][s] = p[r][s] != nullptr ? p[r][s][c] : 0.0f;
        input_tile(d, o);
        for (int r = 0; r < 4; ++r)
          for (int s = 0; s < 4; ++s) out[(4 * r + s) * a_stride + c] = o[r][s];
      }
    }
  }

  // The tiles' outputs for panels [p_begin, p_end): A^T M A + bias, ReLU, stored through the
  // segments into the pixels inside the grid. Each (tile, panel) whose Winograd result cannot
  // be trusted is recomputed by the direct GEMM for that panel alone, so that the decision,
  // like every value, does not depend on how threads split the panels:
  //   - an output that is not finite (before ReLU, which would hide -inf): the transforms
  //     spread a NaN or inf to the whole tile;
  //   - cancellation: S = sum over alpha of |M_alpha|, a bound on the magnitudes that each
  //     output sums before the output transform cancels them (each sums 9 of the 16 with
  //     coefficients +-1), above kCancellation times the largest output after ReLU.
  //     Winograd's rounding error is a few ulps of S, the direct GEMM's a few ulps of the
  //     terms that each output actually sums. They part when one window value dwarfs the
  //     outputs it should not touch (a 1e6 pixel next to zero weights, its own output cut by
  //     ReLU): that error reached 2e-4 of the output's norm. On GoogLeNet's and pytorch-fid's
  //     Inception-v3 activations (random weights) S stayed below 3.2x the largest output of
  //     every (tile, panel).
  //   The first check rides on the second: |y| <= S, so a finite S means finite outputs.
  void output_transform(const Conv& conv, const int64_t* tn, const int64_t* th, const int64_t* tw, int64_t count,
                        int64_t p_begin, int64_t p_end) {
    using Vec = Simd<float>::Vec;
    constexpr int L = Simd<float>::kLanes;
    constexpr int NR = kNR<float>;
    const int64_t a_stride = kMaxTiles * ldm_, panels = conv.panels();
    int64_t* pn = pix_.data();
    int64_t* ph = pn + kMaxTiles;
    int64_t* pw = ph + kMaxTiles;
    for (int64_t i = 0; i < count; ++i) {
      const int64_t rows = std::min<int64_t>(2, conv.H - 2 * th[i]), cols = std::min<int64_t>(2, conv.W - 2 * tw[i]);
      const float* m = m_.data() + i * ldm_;
      for (int64_t p = p_begin; p < p_end; ++p) {
        Vec bad{}, s_max{}, y_max{};  // bad: S - S, 0 where finite, NaN where not
        float bad1 = 0.0f, s_max1 = 0.0f, y_max1 = 0.0f;
        for (const auto& seg : conv.direct.segments) {
          const int64_t lo = std::max(p * NR, seg.begin), hi = std::min({(p + 1) * NR, seg.end, conv.cols()});
          if (lo >= hi) continue;
          float* dst[2][2];
          for (int r = 0; r < rows; ++r)
            for (int s = 0; s < cols; ++s)
              dst[r][s] = seg.dst.interior_row(tn[i], 2 * th[i] + r, 2 * tw[i] + s) + seg.channel - seg.begin;
          int64_t j = lo;
          for (; j + L <= hi; j += L) {
            Vec mv[4][4], y[2][2], bias, sum{};
            for (int r = 0; r < 4; ++r)
              for (int s = 0; s < 4; ++s) {
                std::memcpy(&mv[r][s], m + (4 * r + s) * a_stride + j, sizeof(Vec));
                sum += mv[r][s] < 0 ? -mv[r][s] : mv[r][s];
              }
            std::memcpy(&bias, conv.bias() + j, sizeof(Vec));
            output_tile(mv, y);
            bad += sum - sum;  // |y| <= sum: a finite sum means finite outputs
            s_max = sum > s_max ? sum : s_max;
            const Vec zero{};
            for (int r = 0; r < rows; ++r)
              for (int s = 0; s < cols; ++s) {
                Vec v = y[r][s] + bias;
                v = v < zero ? zero : v;  // keeps NaN, like torch.relu
                y_max = v > y_max ? v : y_max;
                std::memcpy(dst[r][s] + j, &v, sizeof(Vec));
              }
          }
          for (; j < hi; ++j) {
            float mv[4][4], y[2][2], sum = 0.0f;
            for (int r = 0; r < 4; ++r)
              for (int s = 0; s < 4; ++s) {
                mv[r][s] = m[(4 * r + s) * a_stride + j];
                sum += std::fabs(mv[r][s]);
              }
            output_tile(mv, y);
            bad1 += sum - sum;
            s_max1 = std::max(s_max1, sum);
            for (int r = 0; r < rows; ++r)
              for (int s = 0; s < cols; ++s) {
                const float v = gemm::relu(y[r][s] + conv.bias()[j]);
                y_max1 = std::max(y_max1, v);
                dst[r][s][j] = v;
              }
          }
        }
        bool trusted = bad1 == 0.0f;
        float y_top = y_max1, s_top = s_max1;
        for (int l = 0; l < L; ++l) {
          trusted = trusted && bad[l] == 0.0f;
          y_top = std::max(y_top, y_max[l]);
          s_top = std::max(s_top, s_max[l]);
        }
        if (trusted && s_top <= kCancellation * y_top) continue;
        int64_t n = 0;
        for (int r = 0; r < rows; ++r)
          for (int s = 0; s < cols; ++s, ++n) {
            pn[n] = tn[i];
            ph[n] = 2 * th[i] + r;
            pw[n] = 2 * tw[i] + s;
            rows_[n] = conv.src.interior_row(tn[i], ph[n] - 1, pw[n] - 1);  // the 3x3 window's corner
          }
        gemm::run_gemm(conv.direct, rows_.data(), pn, ph, pw, n, acc_.data(), p, panels);
      }
    }
  }

  int64_t ldv_, ldm_;  // row strides of V_alpha and M_alpha, clear of 4 KB set conflicts
  std::vector<float> v_, m_, acc_, zero_bias_;
  std::vector<const float*> rows_;
  std::vector<int64_t> pix_, zeros_, iota_;
};

}  // namespace inception_fast::winograd
