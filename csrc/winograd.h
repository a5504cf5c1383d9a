// Winograd's minimal filtering for the CPU kernel's fp32 stride-1 convolutions over
// zero-bordered intermediates (Lavin and Gray, "Fast Algorithms for Convolutional Neural
// Networks", CVPR 2016; cuDNN's and NNPACK's 3x3 algorithm):
//   - F(2x2, 3x3) or F(4x4, 3x3) for 3x3 stages (GoogLeNet, Inception-v3's stem, A and E,
//     Inception-ResNet), whichever the weights were packed for (ops/backend.py);
//   - F(2x2, 5x5) for 5x5 stages (GoogLeNet's blocks, Inception-v3's A blocks);
//   - F(2, 7) for the 1x7 and 7x1 stages of Inception-v3's C and D blocks (Mixed_6b-6e,
//     Mixed_7a), Inception-v4's B and Inception-ResNet's Block17, along the axis the filter
//     spans: a 1x2 or 2x1 output tile;
//   - F(2, 3) the same way for the 1x3 and 3x1 stages of Inception-v3's E blocks (Mixed_7b,
//     7c), Inception-v4's C and Inception-ResNet's Block8.
//
// A tile of one (input channel, output channel) pair is Y = A^T [ (G g) . (B^T d) ] over the
// input window d around it (for the 3x3s, both axes: A^T [ (G g G^T) . (B^T d B) ] A).
// Summed over input channels, the elementwise products become independent GEMMs, one per
// position alpha of the transformed window:
//     M_alpha (tiles x cols) = V_alpha (tiles x cin) @ U_alpha (cin x cols),
// run by gemm.h's register-tiled micro-kernel, and the output transform adds the bias,
// applies ReLU and stores into the GEMM's channel slices.
//
//   F(2x2, 3x3): 16 positions for 4 outputs of 9 taps, 2.25x fewer multiply-adds.
//     B^T = [1  0 -1  0]    G = [  1    0    0 ]    A^T = [1  1  1  0]
//           [0  1  1  0]        [1/2  1/2  1/2]          [0  1 -1 -1]
//           [0 -1  1  0]        [1/2 -1/2  1/2]
//           [0  1  0 -1]        [  0    0    1 ]
//   F(4x4, 3x3): 36 positions for 16 outputs, 4x fewer (its matrices at F4x4_3x3 below).
//     ops/backend.py packs a 3x3 for it where 4x4 tiles cover the output grid well
//     (winograd_3x3_tile: the stems, 28x28 and 35x35 blocks), else for F(2x2, 3x3).
//   F(2, 3): 4 positions for 2 outputs of 3 taps, 1.5x fewer: the 1-D form of the above,
//     B^T, G and A^T as written.
//   F(2, 7): 8 positions for 2 outputs of 7 taps, 1.75x fewer. Interpolation points
//     0, 1, -1, 2, -2, 1/2, -1/2 and infinity (the B^T of the common F(6, 3));
//     G (8 x 7) in ops/backend.py, _G7.
//     B^T = [1    0  -21/4    0   21/4    0   -1  0]   A^T = [1  1  1  1  1   1    1   0]
//           [0    1     1 -17/4  -17/4    1    1  0]         [0  1 -1  2 -2 1/2 -1/2   1]
//           [0   -1     1  17/4  -17/4   -1    1  0]
//           [0  1/2   1/4  -5/2   -5/4    2    1  0]
//           [0 -1/2   1/4   5/2   -5/4   -2    1  0]
//           [0    2     4  -5/2     -5  1/2    1  0]
//           [0   -2     4   5/2     -5 -1/2    1  0]
//           [0   -1     0  21/4      0 -21/4   0  1]
//
// B packing (ops/backend.py, pack_winograd): per panel of kNR columns, the U_alpha blocks
// (cin rows each, alpha-major) and then the direct implicit GEMM's taps (cin rows each), so
// (panels, (positions + taps) cin, kNR): 25 cin for a 3x3 (45 as F(4x4, 3x3)), 61 for a 5x5,
// 15 cin for a 1x7 or 7x1, 7 cin for a 1x3 or 3x1. The direct part serves tiles whose
// outputs are not finite: a NaN or inf in a window reaches the whole tile through the
// transforms (inf - inf, 0 * inf), where the direct convolution confines it to the pixels
// whose window holds it. Such tiles are recomputed directly, so non-finite values land
// where eager's convolution puts them; so are tiles where the transforms cancel values far
// larger than the outputs (Transform::kCancellation).
//
// fp32 only (fp16 runs the fp32 kernels): the transforms add a few roundings per output and
// shorten the sums. Against float64, every block measured came out at or below the direct
// GEMM's error (benchmarks/winograd.py). F(2, 7)'s larger constants (21/4, 17/4) cost more
// on one convolution alone: simulated over 192 channels, its largest error was 3.6x the
// direct GEMM's (1.8e-6 against 4.9e-7 of the largest output), still 5x inside the 1e-5
// fp32 tolerance. float64 keeps the direct implicit GEMM, the exact path; bf16 too:
// transformed tiles stored in bf16 would add roundings to every product, against the rule
// that bf16 stays within 2x eager's error (not tried).
#pragma once

#include "gemm.h"

#include <array>
#include <cmath>
#include <cstring>
#include <optional>
#include <vector>

namespace inception_fast::winograd {

using gemm::ceil_div;
using gemm::kMR;
using gemm::kNR;

constexpr int64_t kMaxPositions = 36;  // F(4x4, 3x3)'s and F(2x2, 5x5)'s 6x6 transformed tile
// Tiles per block: V and M of one block (positions x tiles x channels each) stay in a 1-2 MB
// L2, and each L1-resident chunk of U_alpha meets 8 register tiles of rows (F(2x2, 3x3)'s
// 16 positions; a transform with more positions takes proportionally fewer tiles, tiles<>,
// one with fewer no more).
constexpr int64_t kMaxTiles = 8 * kMR;
constexpr int64_t kBlockValues = 16 * kMaxTiles;  // positions x tiles of one block
template <typename Tr>
constexpr int64_t tiles() {
  const int64_t t = kBlockValues / Tr::kPositions / kMR * kMR;
  return t < kMR ? kMR : t > kMaxTiles ? kMaxTiles : t;
}

// Fewer tiles than Transform::kMinTiles in a whole call (N x tile rows x tile columns) run the
// direct part of the packed B instead: with few rows the weights dominate the traffic, and U
// is 16/9 (3x3), 8/7 (1x7) or 4/3 (1x3) of them. 3x3: GoogLeNet's 5b at batch 1 (7x7, 16
// tiles) ran 4% slower as Winograd, 4a-4e at batch 1 (14x14, 49 tiles) 16-22% faster. 1x3:
// pytorch-fid's Mixed_7b/7c (8x8) ran 3-5% slower at batch 1 (32 tiles), 8-9% faster at
// batch 2 (64 tiles); F(2, 3) saves only 1.5x the multiplies.

enum class Kind { k3x3, k3x3_4x4, k5x5, k1x7, k7x1, k1x3, k3x1 };

// The cancellation bound's weights (Workspace::output_transform) of a 6x6 transformed tile
// whose 1-D A^T has column maxima 1, 1, 1, m, m, 1 (the points 0, +-a, +-b, infinity):
// max_i |A^T[i][alpha]| of the 2-D transform, per position alpha = 6 r + s.
constexpr std::array<float, 36> weights_6x6(float m) {
  const float c[6] = {1, 1, 1, m, m, 1};
  std::array<float, 36> w{};
  for (int r = 0; r < 6; ++r)
    for (int s = 0; s < 6; ++s) w[6 * r + s] = c[r] * c[s];
  return w;
}

// F(2x2, 3x3) over a 4x4 window: d, out and m are row-major 4x4 (alpha = 4 r + s), y 2x2.
struct F2x2_3x3 {
  static constexpr int kTileH = 2, kTileW = 2, kWinH = 4, kWinW = 4, kPositions = 16, kTaps = 9;
  static constexpr int kPadH = 1, kPadW = 1;
  static constexpr int64_t kMinTiles = 32;
  // max_i |A^T[i][alpha]| per position: the weights of the cancellation bound S.
  static constexpr float kWeight[kPositions] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};
  // A (tile, panel) whose S passes this many times its largest output magnitude (after
  // ReLU, where the stage has one) is
  // recomputed directly (Workspace::output_transform): at most ~16 x a few ulps of error
  // relative to the tile's own outputs. On GoogLeNet's and pytorch-fid's Inception-v3
  // activations (random weights) S stayed below 3.2x the largest output of every (tile, panel).
  static constexpr float kCancellation = 16.0f;

  // out = B^T d B, elementwise over V (a float, or a SIMD vector of channels).
  template <typename V>
  static void input_tile(const V* d, V* out) {
    V t[4][4];
    for (int s = 0; s < 4; ++s) {
      t[0][s] = d[s] - d[8 + s];
      t[1][s] = d[4 + s] + d[8 + s];
      t[2][s] = d[8 + s] - d[4 + s];
      t[3][s] = d[4 + s] - d[12 + s];
    }
    for (int r = 0; r < 4; ++r) {
      out[4 * r + 0] = t[r][0] - t[r][2];
      out[4 * r + 1] = t[r][1] + t[r][2];
      out[4 * r + 2] = t[r][2] - t[r][1];
      out[4 * r + 3] = t[r][1] - t[r][3];
    }
  }

  // y = A^T m A: the tile's 2x2 outputs, y[2 r + s].
  template <typename V>
  static void output_tile(const V* m, V* y) {
    V u[2][4];
    for (int s = 0; s < 4; ++s) {
      u[0][s] = m[s] + m[4 + s] + m[8 + s];
      u[1][s] = m[4 + s] - m[8 + s] - m[12 + s];
    }
    for (int r = 0; r < 2; ++r) {
      y[2 * r + 0] = u[r][0] + u[r][1] + u[r][2];
      y[2 * r + 1] = u[r][1] - u[r][2] - u[r][3];
    }
  }

  // The weight gradient's transforms (winograd_weight_grad.cpp), the transposes of the
  // output and weight transforms: out = A g A^T over a 2x2 tile g of the output gradient
  // (A = [1 0; 1 1; 1 -1; 0 -1]), and w = G^T m G, a 3x3 tap gradient from 4x4 sums m.
  template <typename V>
  static void grad_tile(const V* g, V* out) {
    V t[4][2];
    for (int s = 0; s < 2; ++s) {
      t[0][s] = g[s];
      t[1][s] = g[s] + g[2 + s];
      t[2][s] = g[s] - g[2 + s];
      t[3][s] = -g[2 + s];
    }
    for (int r = 0; r < 4; ++r) {
      out[4 * r + 0] = t[r][0];
      out[4 * r + 1] = t[r][0] + t[r][1];
      out[4 * r + 2] = t[r][0] - t[r][1];
      out[4 * r + 3] = -t[r][1];
    }
  }
  template <typename V>
  static void weight_tile(const V* m, V* w) {
    V u[3][4];
    for (int s = 0; s < 4; ++s) {
      const V p = 0.5f * (m[4 + s] + m[8 + s]);
      u[0][s] = m[s] + p;
      u[1][s] = 0.5f * (m[4 + s] - m[8 + s]);
      u[2][s] = p + m[12 + s];
    }
    for (int r = 0; r < 3; ++r) {
      const V p = 0.5f * (u[r][1] + u[r][2]);
      w[3 * r + 0] = u[r][0] + p;
      w[3 * r + 1] = 0.5f * (u[r][1] - u[r][2]);
      w[3 * r + 2] = p + u[r][3];
    }
  }
};

// F(4x4, 3x3) over a 6x6 window: 36 positions for 16 outputs of 9 taps, 4x fewer
// multiply-adds (F(2x2, 3x3): 2.25x), and 2.25 transformed values per output where
// F(2x2, 3x3) has 4, so its transforms cost less per output too. Interpolation points 0,
// 2/3, -2/3, 3/2, -3/2 and infinity, the best of the symmetric sets 0, +-a, +-b tried:
// simulated over 32-192 channels of post-ReLU inputs, its error against float64 was
// 0.5-1.1e-6 of the output's norm, against 0.7-1.6e-6 with 0, +-1/2, +-2 and 1.2-2.3e-6 with
// Lavin and Gray's 0, +-1, +-2 (F(2x2, 3x3): 2-4e-7, the direct GEMM 1.6e-7; the fp32
// bound is 1e-5). Its constants are rounded to fp32 (2/3, 4/9, 8/27, 97/36), as simulated.
// G (6 x 3) in ops/backend.py, _G3_F4. Applied along both axes:
//   B^T = [1     0  -97/36     0  1  0]   A^T = [1    1     1     1      1  0]
//         [0  -3/2    -9/4   2/3  1  0]         [0  2/3  -2/3   3/2   -3/2  0]
//         [0   3/2    -9/4  -2/3  1  0]         [0  4/9   4/9   9/4    9/4  0]
//         [0  -2/3    -4/9   3/2  1  0]         [0 8/27 -8/27  27/8  -27/8  1]
//         [0   2/3    -4/9  -3/2  1  0]
//         [0     1       0 -97/36 0  1]
struct F4x4_3x3 {
  static constexpr int kTileH = 4, kTileW = 4, kWinH = 6, kWinW = 6, kPositions = 36, kTaps = 9;
  static constexpr int kPadH = 1, kPadW = 1;
  static constexpr int64_t kMinTiles = 32;
  // max_i |A^T[i][alpha]| per position: 1-D column maxima 1, 1, 1, 27/8, 27/8, 1.
  static constexpr std::array<float, kPositions> kWeight = weights_6x6(3.375f);
  // With weights up to 11.4, S runs ~6x F(2x2, 3x3)'s for the same outputs: on pytorch-fid's
  // Inception-v3 (random weights, 2 images; its stem, a 35x35 and an 8x8 block) the ratio's
  // median was 14-29 and its maximum 70 (F(2x2, 3x3): 2.5-4.5 and 13.5). 128 leaves 1.8x
  // headroom above the largest ratio seen (F(2x2, 3x3)'s 16: 1.2x); a bound that natural
  // activations cross recomputes tiles by the thousand (at 64 with the points 0, +-1/2, +-2,
  // whose ratios ran twice these, the stem ran 25% slower than F(2x2, 3x3)). The error it
  // lets through is then at worst ~128 ulps of the tile's largest output, ~8e-6 of it.
  static constexpr float kCancellation = 128.0f;

  // out[0..6) = B^T d, d and out strided.
  template <typename V>
  static void input_1d(const V* d, int ds, V* out, int os) {
    constexpr float k97_36 = 97.0f / 36.0f, k2_3 = 2.0f / 3.0f, k4_9 = 4.0f / 9.0f;
    const V a = d[4 * ds] - 2.25f * d[2 * ds], b = k2_3 * d[3 * ds] - 1.5f * d[ds];
    const V c = d[4 * ds] - k4_9 * d[2 * ds], e = 1.5f * d[3 * ds] - k2_3 * d[ds];
    out[0] = d[0] - k97_36 * d[2 * ds] + d[4 * ds];
    out[os] = a + b;
    out[2 * os] = a - b;
    out[3 * os] = c + e;
    out[4 * os] = c - e;
    out[5 * os] = d[ds] - k97_36 * d[3 * ds] + d[5 * ds];
  }

  // out = B^T d B over the row-major 6x6 window (alpha = 6 r + s).
  template <typename V>
  static void input_tile(const V* d, V* out) {
    V t[36];
    for (int s = 0; s < 6; ++s) input_1d(d + s, 6, t + s, 6);
    for (int r = 0; r < 6; ++r) input_1d(t + 6 * r, 1, out + 6 * r, 1);
  }

  // y[0..4) = A^T m, m and y strided.
  template <typename V>
  static void output_1d(const V* m, int ms, V* y, int ys) {
    constexpr float k2_3 = 2.0f / 3.0f, k4_9 = 4.0f / 9.0f, k8_27 = 8.0f / 27.0f;
    const V p12 = m[ms] + m[2 * ms], m12 = m[ms] - m[2 * ms];
    const V p34 = m[3 * ms] + m[4 * ms], m34 = m[3 * ms] - m[4 * ms];
    y[0] = m[0] + p12 + p34;
    y[ys] = k2_3 * m12 + 1.5f * m34;
    y[2 * ys] = k4_9 * p12 + 2.25f * p34;
    y[3 * ys] = k8_27 * m12 + 3.375f * m34 + m[5 * ms];
  }

  // y = A^T m A: the tile's 4x4 outputs, y[4 r + s].
  template <typename V>
  static void output_tile(const V* m, V* y) {
    V u[24];  // 4 x 6
    for (int s = 0; s < 6; ++s) output_1d(m + s, 6, u + s, 6);
    for (int r = 0; r < 4; ++r) output_1d(u + 6 * r, 1, y + 4 * r, 1);
  }

  // The weight gradient's transforms (winograd_weight_grad.cpp), the transposes of the
  // output and weight transforms. out[0..6) = A g (A = (A^T)^T, 6 x 4), g and out strided.
  template <typename V>
  static void grad_1d(const V* g, int gs, V* out, int os) {
    constexpr float k2_3 = 2.0f / 3.0f, k4_9 = 4.0f / 9.0f, k8_27 = 8.0f / 27.0f;
    const V e1 = g[0] + k4_9 * g[2 * gs], o1 = k2_3 * g[gs] + k8_27 * g[3 * gs];
    const V e2 = g[0] + 2.25f * g[2 * gs], o2 = 1.5f * g[gs] + 3.375f * g[3 * gs];
    out[0] = g[0];
    out[os] = e1 + o1;
    out[2 * os] = e1 - o1;
    out[3 * os] = e2 + o2;
    out[4 * os] = e2 - o2;
    out[5 * os] = g[3 * gs];
  }
  // out = A g A^T over a 4x4 tile g of the output gradient (row-major), out 6x6.
  template <typename V>
  static void grad_tile(const V* g, V* out) {
    V t[24];  // 6 x 4
    for (int s = 0; s < 4; ++s) grad_1d(g + s, 4, t + s, 4);
    for (int r = 0; r < 6; ++r) grad_1d(t + 4 * r, 1, out + 6 * r, 1);
  }
  // w[0..3) = G^T m, m and w strided; G (6 x 3) is ops/backend.py's _G3_F4.
  template <typename V>
  static void weight_1d(const V* m, int ms, V* w, int ws) {
    constexpr float a = 81.0f / 130.0f, b = 27.0f / 65.0f, c = 18.0f / 65.0f;
    constexpr float d = 8.0f / 65.0f, e = 12.0f / 65.0f;
    const V p12 = m[ms] + m[2 * ms], m12 = m[ms] - m[2 * ms];
    const V p34 = m[3 * ms] + m[4 * ms], m34 = m[3 * ms] - m[4 * ms];
    w[0] = m[0] - a * p12 + d * p34;
    w[ws] = e * m34 - b * m12;
    w[2 * ws] = c * p34 - c * p12 + m[5 * ms];
  }
  // w = G^T m G: a 3x3 tap gradient (row-major) from 6x6 sums m.
  template <typename V>
  static void weight_tile(const V* m, V* w) {
    V u[18];  // 3 x 6
    for (int s = 0; s < 6; ++s) weight_1d(m + s, 6, u + s, 6);
    for (int r = 0; r < 3; ++r) weight_1d(u + 6 * r, 1, w + 3 * r, 1);
  }
};

// F(2x2, 5x5) over a 6x6 window: 36 positions for 4 outputs of 25 taps, 2.78x fewer
// multiply-adds, for the 5x5 stages of GoogLeNet's blocks and Inception-v3's A blocks
// (Mixed_5b-5d, pytorch-fid's too). The interpolation points are F(4x4, 3x3)'s, 0, +-2/3,
// +-3/2 and infinity, so B^T is the same matrix and input_tile is F4x4_3x3's. Simulated over
// 16-192 channels of post-ReLU inputs (benchmarks/winograd_points.py: fp32 against float64,
// output norm): 0.5-1.2e-6 with these points, against 0.7-1.9e-6 with 0, +-1/2, +-2 and
// 0.9-2.7e-6 with 0, +-1, +-2 (the direct GEMM: 2.3-2.5e-7). G (6 x 5) in ops/backend.py,
// _G5. Applied along both axes:
//   A^T = [1    1     1    1     1  0]
//         [0  2/3  -2/3  3/2  -3/2  1]
// No weight gradient form: its transforms write 9 values per output and channel (F(4x4, 3x3):
// 2.25), and as winograd_weight_grad.cpp's GEMMs over them it ran 0.4-0.8x oneDNN's direct
// weight gradient on GoogLeNet's and Inception-v3's 5x5s (16-48 -> 32-128 channels).
struct F2x2_5x5 {
  static constexpr int kTileH = 2, kTileW = 2, kWinH = 6, kWinW = 6, kPositions = 36, kTaps = 25;
  static constexpr int kPadH = 2, kPadW = 2;
  static constexpr int64_t kMinTiles = 32;
  // max_i |A^T[i][alpha]| per position: 1-D column maxima 1, 1, 1, 3/2, 3/2, 1.
  static constexpr std::array<float, kPositions> kWeight = weights_6x6(1.5f);
  // On random post-ReLU inputs and weights (16-192 channels in, 32-128 out;
  // benchmarks/winograd_points.py) S's ratio to the largest output of a (tile, panel) had a
  // median of 19-20 and a maximum of 40: F(4x4, 3x3)'s range, with the same points. Its
  // bound, for the same reasons.
  static constexpr float kCancellation = 128.0f;

  template <typename V>
  static void input_tile(const V* d, V* out) {
    F4x4_3x3::input_tile(d, out);
  }

  // y[0..2) = A^T m, m and y strided.
  template <typename V>
  static void output_1d(const V* m, int ms, V* y, int ys) {
    constexpr float k2_3 = 2.0f / 3.0f;
    y[0] = m[0] + m[ms] + m[2 * ms] + m[3 * ms] + m[4 * ms];
    y[ys] = k2_3 * (m[ms] - m[2 * ms]) + 1.5f * (m[3 * ms] - m[4 * ms]) + m[5 * ms];
  }
  // y = A^T m A: the tile's 2x2 outputs, y[2 r + s].
  template <typename V>
  static void output_tile(const V* m, V* y) {
    V u[12];  // 2 x 6
    for (int s = 0; s < 6; ++s) output_1d(m + s, 6, u + s, 6);
    for (int r = 0; r < 2; ++r) output_1d(u + 6 * r, 1, y + 2 * r, 1);
  }
};

// The 1-D algorithms, over a flat window along the filter's axis (Along places them).
// F(2, 3): a 4-pixel window, 2 outputs of 3 taps, 4 multiplies where direct takes 6 (1.5x);
// the 1-D form of F(2x2, 3x3), with its B^T, G and A^T.
struct F2_3 {
  static constexpr int kPositions = 4, kTaps = 3, kPad = 1;
  static constexpr int64_t kMinTiles = 64;
  static constexpr float kWeight[kPositions] = {1, 1, 1, 1};
  static constexpr float kCancellation = 16.0f;  // F(2x2, 3x3)'s: the 1-D ratio is no larger

  template <typename V>
  static void input_tile(const V* d, V* out) {
    out[0] = d[0] - d[2];
    out[1] = d[1] + d[2];
    out[2] = d[2] - d[1];
    out[3] = d[1] - d[3];
  }

  template <typename V>
  static void output_tile(const V* m, V* y) {
    y[0] = m[0] + m[1] + m[2];
    y[1] = m[1] - m[2] - m[3];
  }
};

// F(2, 7): an 8-pixel window, 2 outputs of 7 taps, 8 multiplies where direct takes 14.
struct F2_7 {
  static constexpr int kPositions = 8, kTaps = 7, kPad = 3;
  static constexpr int64_t kMinTiles = 32;
  static constexpr float kWeight[kPositions] = {1, 1, 1, 2, 2, 1, 1, 1};
  // The transforms' constants make S larger for the same outputs: on random post-ReLU inputs
  // and weights the ratio's median was 10 and its maximum 25 (3x3: 2 and 5), so the 3x3's 16
  // would recompute a few % of tiles. On pytorch-fid's Inception-v3 (random weights, 4
  // images) 89% of (tile, panel)s stayed below 4, and all of 93520 below 32. 64 bounds the
  // error at ~4x the 3x3's bound.
  static constexpr float kCancellation = 64.0f;

  // out = B^T d over the 8-pixel window.
  template <typename V>
  static void input_tile(const V* d, V* out) {
    const V odd1 = d[1] + d[5] - 4.25f * d[3], even1 = d[2] + d[6] - 4.25f * d[4];
    const V odd2 = 0.5f * d[1] - 2.5f * d[3] + 2.0f * d[5], even2 = 0.25f * d[2] - 1.25f * d[4] + d[6];
    const V odd3 = 2.0f * d[1] - 2.5f * d[3] + 0.5f * d[5], even3 = 4.0f * d[2] - 5.0f * d[4] + d[6];
    out[0] = d[0] - d[6] + 5.25f * (d[4] - d[2]);
    out[1] = even1 + odd1;
    out[2] = even1 - odd1;
    out[3] = even2 + odd2;
    out[4] = even2 - odd2;
    out[5] = even3 + odd3;
    out[6] = even3 - odd3;
    out[7] = d[7] - d[1] + 5.25f * (d[3] - d[5]);
  }

  // y = A^T m: the tile's 2 outputs.
  template <typename V>
  static void output_tile(const V* m, V* y) {
    const V s12 = m[1] + m[2], s34 = m[3] + m[4], s56 = m[5] + m[6];
    y[0] = m[0] + s12 + s34 + s56;
    y[1] = (m[1] - m[2]) + 2.0f * (m[3] - m[4]) + 0.5f * (m[5] - m[6]) + m[7];
  }

  // The weight gradient's transforms (winograd_weight_grad.cpp), the transposes of the
  // output and weight transforms: out = A g over a 2-output tile g of the output gradient,
  // and w = G^T m, the 7 taps' gradients from 8 sums.
  template <typename V>
  static void grad_tile(const V* g, V* out) {
    out[0] = g[0];
    out[1] = g[0] + g[1];
    out[2] = g[0] - g[1];
    out[3] = g[0] + 2.0f * g[1];
    out[4] = g[0] - 2.0f * g[1];
    out[5] = g[0] + 0.5f * g[1];
    out[6] = g[0] - 0.5f * g[1];
    out[7] = g[1];
  }
  template <typename V>
  static void weight_tile(const V* m, V* w) {
    for (int k = 0; k < kTaps; ++k) {
      V sum = kG[0][k] * m[0];
      for (int a = 1; a < kPositions; ++a) sum += kG[a][k] * m[a];
      w[k] = sum;
    }
  }
  // G (positions x taps), as _G7 in ops/backend.py, rounded to float.
  static constexpr float kG[kPositions][kTaps] = {
      {1, 0, 0, 0, 0, 0, 0},
      {-2.f / 9, -2.f / 9, -2.f / 9, -2.f / 9, -2.f / 9, -2.f / 9, -2.f / 9},
      {-2.f / 9, 2.f / 9, -2.f / 9, 2.f / 9, -2.f / 9, 2.f / 9, -2.f / 9},
      {1.f / 90, 2.f / 90, 4.f / 90, 8.f / 90, 16.f / 90, 32.f / 90, 64.f / 90},
      {1.f / 90, -2.f / 90, 4.f / 90, -8.f / 90, 16.f / 90, -32.f / 90, 64.f / 90},
      {64.f / 90, 32.f / 90, 16.f / 90, 8.f / 90, 4.f / 90, 2.f / 90, 1.f / 90},
      {64.f / 90, -32.f / 90, 16.f / 90, -8.f / 90, 4.f / 90, -2.f / 90, 1.f / 90},
      {0, 0, 0, 0, 0, 0, 1}};
};

// A 1-D algorithm along one axis: horizontal (1xK, padding (0, K/2), 1x2 tiles) or vertical
// (Kx1, padding (K/2, 0), 2x1 tiles); the flat window and tile run along that axis either way.
template <typename D, bool kVertical>
struct Along : D {
  static constexpr int kTileH = kVertical ? 2 : 1, kTileW = kVertical ? 1 : 2;
  static constexpr int kWinH = kVertical ? D::kPositions : 1, kWinW = kVertical ? 1 : D::kPositions;
  static constexpr int kPadH = kVertical ? D::kPad : 0, kPadW = kVertical ? 0 : D::kPad;
};

// The Winograd form of a GEMM of the plan, a stride-1 convolution over a zero-bordered
// buffer (source >= 0) or x (-1; bordered by the kernel when padded): 3x3 with padding 1 or
// none ('valid': the same tiles over a smaller grid), 5x5 with padding 2 or none, or 1xK /
// Kx1 (K = 3, 7) with padding K/2 along the filter. ops/plan.py's GemmStep.winograd_tile says the same.
inline std::optional<Kind> kind_of(int64_t source, int64_t kh, int64_t kw, int64_t stride, int64_t pad_h,
                                   int64_t pad_w) {
  if (source < -1 || stride != 1) return std::nullopt;
  if (kh == 3 && kw == 3 && pad_h == pad_w && (pad_h == 1 || pad_h == 0)) return Kind::k3x3;
  if (kh == 5 && kw == 5 && pad_h == pad_w && (pad_h == 2 || pad_h == 0)) return Kind::k5x5;
  if (kh == 1 && kw == 7 && pad_h == 0 && pad_w == 3) return Kind::k1x7;
  if (kh == 7 && kw == 1 && pad_h == 3 && pad_w == 0) return Kind::k7x1;
  if (kh == 1 && kw == 3 && pad_h == 0 && pad_w == 1) return Kind::k1x3;
  if (kh == 3 && kw == 1 && pad_h == 1 && pad_w == 0) return Kind::k3x1;
  return std::nullopt;
}

// Calls f with the Transform type of `kind`.
template <typename Fn>
decltype(auto) visit(Kind kind, Fn&& f) {
  switch (kind) {
    case Kind::k1x7: return f(Along<F2_7, false>{});
    case Kind::k7x1: return f(Along<F2_7, true>{});
    case Kind::k1x3: return f(Along<F2_3, false>{});
    case Kind::k3x1: return f(Along<F2_3, true>{});
    case Kind::k3x3_4x4: return f(F4x4_3x3{});
    case Kind::k5x5: return f(F2x2_5x5{});
    default: return f(F2x2_3x3{});
  }
}

// Transformed positions and direct taps of `kind`'s packed panels: (positions + taps) cin rows.
inline int64_t positions(Kind kind) {
  return visit(kind, [](auto t) { return int64_t{decltype(t)::kPositions}; });
}
inline int64_t taps(Kind kind) {
  return visit(kind, [](auto t) { return int64_t{decltype(t)::kTaps}; });
}
// Rows per panel of `kind`'s packed B over cin channels: the U blocks, then the direct taps.
inline int64_t packed_rows(Kind kind, int64_t cin) { return (positions(kind) + taps(kind)) * cin; }
// The kinds a convolution of kind_of's `kind` may come packed for: a 3x3 for F(2x2, 3x3) or
// F(4x4, 3x3) (ops/backend.py picks by the grid), the others for their one transform.
inline std::vector<Kind> packings(Kind kind) {
  return kind == Kind::k3x3 ? std::vector<Kind>{Kind::k3x3, Kind::k3x3_4x4} : std::vector<Kind>{kind};
}
// The kind that panels of `rows` rows over `cin` channels are packed for (25 cin rows for
// F(2x2, 3x3), 45 for F(4x4, 3x3), ...), or none when the rows match no Winograd layout of
// the convolution (the direct implicit GEMM's panels).
inline std::optional<Kind> packed_kind(Kind kind, int64_t rows, int64_t cin) {
  for (const Kind k : packings(kind))
    if (rows == packed_rows(k, cin)) return k;
  return std::nullopt;
}
// The output tile of `kind`: rows x columns of pixels.
inline std::pair<int64_t, int64_t> tile(Kind kind) {
  return visit(kind, [](auto t) { return std::make_pair(int64_t{decltype(t)::kTileH}, int64_t{decltype(t)::kTileW}); });
}

// d[i] = the SIMD vector at channel c of pixel row p[i], zeros where p[i] is null (a window
// pixel outside the source, or a tile pixel outside the grid).
template <int n>
inline void load_rows(const float* const* p, int64_t c, Simd<float>::Vec* d) {
  for (int i = 0; i < n; ++i) {
    if (p[i] != nullptr) std::memcpy(&d[i], p[i] + c, sizeof(Simd<float>::Vec));
    else d[i] = Simd<float>::Vec{};
  }
}

// Whether a Winograd stage of `kind` over an Ho x Wo output grid and N images runs as
// Winograd (Transform::kMinTiles), rather than as the direct GEMM over its direct taps.
inline bool worth_it(Kind kind, int64_t N, int64_t Ho, int64_t Wo) {
  return visit(kind, [&](auto t) {
    using Tr = decltype(t);
    return N * ceil_div(Ho, int64_t{Tr::kTileH}) * ceil_div(Wo, int64_t{Tr::kTileW}) >= Tr::kMinTiles;
  });
}

// One Winograd convolution of the plan: its kind, its input, the U blocks of its packed B,
// and the implicit GEMM over the direct part of that B (the caller's, with its bias, columns
// and destinations), which also serves the recomputes.
struct Conv {
  Kind kind;
  // (N, H + 2 border, W + 2 border, cin). A border narrower than the padding (x itself, which
  // the stem's 'same' 3x3s read unbordered): window pixels outside read as zeros, and the
  // recomputes run over a zero-padded copy of the window (patch_direct).
  Plane<const float> src;
  int64_t H, W;              // the input grid
  int64_t Ho, Wo;            // the output grid: H x W for 'same' padding, smaller unpadded
  int64_t pad_h, pad_w;      // the transform's own padding, or 0 ('valid')
  const float* u;            // (panels, (positions + taps) cin, kNR): the U_alpha blocks, then the taps
  gemm::Gemm<float> direct;  // b_packed at the direct taps of each panel, panel_rows (positions + taps) cin
  gemm::Gemm<float> patch_direct;  // direct, its taps offset within a (kWinH, kWinW, cin) window copy
  bool relu = true;                // the epilogue: relu(sum + bias), or sum + bias (Epilogue::kLinear)

  Conv(Kind kind_, const Plane<const float>& src_, int64_t H_, int64_t W_, int64_t Ho_, int64_t Wo_, int64_t pad_h_,
       int64_t pad_w_, const float* u_, gemm::Gemm<float> direct_)
      : kind(kind_), src(src_), H(H_), W(W_), Ho(Ho_), Wo(Wo_), pad_h(pad_h_), pad_w(pad_w_), u(u_),
        direct(std::move(direct_)), patch_direct(direct) {
    TORCH_CHECK(direct.panel_rows == packed_rows(kind, direct.k_per_tap) &&
                    static_cast<int64_t>(direct.tap_offset.size()) == taps(kind),
                "winograd: the direct GEMM must run over the direct part of the Winograd panels");
    // relu(sum + bias), or sum + bias as it is (the pre-BN sums of a train-mode forward).
    relu = direct.segments.empty() || direct.segments[0].epilogue == gemm::Epilogue::kRelu;
    for (const auto& seg : direct.segments)
      TORCH_CHECK(seg.epilogue == (relu ? gemm::Epilogue::kRelu : gemm::Epilogue::kLinear),
                  "winograd: a convolution stage stores relu(sum + bias) or sum + bias, the same for every segment");
    visit(kind, [&](auto t) {
      using Tr = decltype(t);
      TORCH_CHECK((pad_h == Tr::kPadH || pad_h == 0) && (pad_w == Tr::kPadW || pad_w == 0) && src.pad >= 0 &&
                      Ho == H + 2 * pad_h - (Tr::kWinH - Tr::kTileH) && Wo == W + 2 * pad_w - (Tr::kWinW - Tr::kTileW),
                  "winograd: padding (", pad_h, ", ", pad_w, ") does not map ", H, "x", W, " onto ", Ho, "x", Wo);
      const int64_t taps_w = Tr::kWinW - Tr::kTileW + 1;  // the filter's width
      for (size_t t = 0; t < patch_direct.tap_offset.size(); ++t)
        patch_direct.tap_offset[t] = (static_cast<int64_t>(t) / taps_w * Tr::kWinW + static_cast<int64_t>(t) % taps_w) *
                                     cin();
    });
  }
  int64_t cin() const { return direct.k_per_tap; }
  int64_t cols() const { return direct.cols; }
  const float* bias() const { return direct.bias; }
  int64_t panels() const { return direct.panels(); }
  // Whether the source's border covers the padding: every window pixel an in-bounds load.
  bool bordered() const { return src.pad >= std::max(pad_h, pad_w); }
};

// One thread's scratch for Conv::run: V and M of a block, the GEMMs' partial sums, row
// pointers and pixel coordinates. Sized for the widest convolution it will run.
class Workspace {
 public:
  Workspace(int64_t max_cin, int64_t max_panels)
      : ldv_(gemm::padded_stride<float>(max_cin)),
        ldm_(gemm::padded_stride<float>(max_panels * kNR<float>)),
        v_(kBlockValues * ldv_),
        m_(kBlockValues * ldm_),
        acc_(ceil_div(kMaxTiles, kMR) * max_panels * kMR * kNR<float>),
        zero_bias_(max_panels * kNR<float>, 0.0f),
        rows_(kMaxTiles),
        pix_(3 * kMaxTiles),
        zeros_(kMaxTiles, 0),
        iota_(kMaxTiles),
        patch_(kMaxPositions * max_cin) {
    for (int64_t i = 0; i < kMaxTiles; ++i) iota_[i] = i;
  }

  // Tiles (tn, th, tw)[i] of `conv` (output pixels from (tile_h th, tile_w tw) on, those
  // inside H x W, of image tn), for column part `part` of `parts` (a contiguous range of
  // weight panels, as gemm::run_gemm cuts them).
  void run(const Conv& conv, const int64_t* tn, const int64_t* th, const int64_t* tw, int64_t tiles, int64_t part,
           int64_t parts) {
    visit(conv.kind, [&](auto t) { run_tiles<decltype(t)>(conv, tn, th, tw, tiles, part, parts); });
  }

 private:
  template <typename Tr>
  void run_tiles(const Conv& conv, const int64_t* tn, const int64_t* th, const int64_t* tw, int64_t tiles,
                 int64_t part, int64_t parts) {
    const int64_t panels = conv.panels();
    const int64_t p_begin = panels * part / parts, p_end = panels * (part + 1) / parts;
    if (p_begin == p_end) return;
    // The alpha GEMMs store M's sums as they are (kLinear, a zero bias): all their panels,
    // padding columns included (zero in B), so that every panel stores from registers.
    gemm::Gemm<float> g{nullptr, zero_bias_.data(), conv.cols(), conv.cin(), {0}, {}, {}};
    g.panel_rows = conv.direct.panel_rows;
    g.segments.push_back({0, panels * kNR<float>, Plane<float>{nullptr, 0, 0, ldm_, 0}, 0, gemm::Epilogue::kLinear});
    gemm::plan_chunks(g);
    constexpr int64_t block = winograd::tiles<Tr>();
    for (int64_t t0 = 0; t0 < tiles; t0 += block) {
      const int64_t count = std::min(block, tiles - t0);
      input_transform<Tr>(conv, tn + t0, th + t0, tw + t0, count);
      for (int64_t a = 0; a < Tr::kPositions; ++a) {
        g.b_packed = conv.u + a * conv.cin() * kNR<float>;
        g.segments[0].dst.data = m_.data() + a * block * ldm_;
        const float* v = v_.data() + a * block * ldv_;
        for (int64_t i = 0; i < count; ++i) rows_[i] = v + i * ldv_;
        gemm::run_gemm(g, rows_.data(), zeros_.data(), zeros_.data(), iota_.data(), count, acc_.data(), part, parts);
      }
      output_transform<Tr>(conv, tn + t0, th + t0, tw + t0, count, p_begin, p_end);
    }
  }

  // V_alpha's row i = the transformed window of tile i, which starts (pad_h, pad_w) pixels up
  // and left of the tile (in the zero border; unpadded, at the tile). Window pixels past the
  // input's last row or column plus its border (a grid that the tile does not divide) read
  // as zeros: they reach only outputs past the grid, which are not stored.
  template <typename Tr>
  void input_transform(const Conv& conv, const int64_t* tn, const int64_t* th, const int64_t* tw, int64_t count) {
    using Vec = Simd<float>::Vec;
    constexpr int L = Simd<float>::kLanes, P = Tr::kPositions;
    const int64_t last_h = conv.H - 1 + conv.src.pad, last_w = conv.W - 1 + conv.src.pad, C = conv.cin();
    const int64_t first = -conv.src.pad;  // above and left of the border: x read unbordered
    const int64_t a_stride = winograd::tiles<Tr>() * ldv_;
    for (int64_t i = 0; i < count; ++i) {
      const float* p[P];
      for (int r = 0; r < Tr::kWinH; ++r)
        for (int s = 0; s < Tr::kWinW; ++s) {
          const int64_t h = Tr::kTileH * th[i] - conv.pad_h + r, w = Tr::kTileW * tw[i] - conv.pad_w + s;
          p[r * Tr::kWinW + s] = h >= first && w >= first && h <= last_h && w <= last_w
                                     ? conv.src.interior_row(tn[i], h, w)
                                     : nullptr;
        }
      float* out = v_.data() + i * ldv_;
      int64_t c = 0;
      for (; c + L <= C; c += L) {
        Vec d[P], o[P];
        load_rows<P>(p, c, d);
        Tr::input_tile(d, o);
        for (int a = 0; a < P; ++a) std::memcpy(out + a * a_stride + c, &o[a], sizeof(Vec));
      }
      for (; c < C; ++c) {
        float d[P], o[P];
        for (int a = 0; a < P; ++a) d[a] = p[a] != nullptr ? p[a][c] : 0.0f;
        Tr::input_tile(d, o);
        for (int a = 0; a < P; ++a) out[a * a_stride + c] = o[a];
      }
    }
  }

  // The tiles' outputs for panels [p_begin, p_end): A^T M (A) + bias, ReLU, stored through the
  // segments into the pixels inside the grid. Each (tile, panel) whose Winograd result cannot
  // be trusted is recomputed by the direct GEMM for that panel alone, so that the decision,
  // like every value, does not depend on how threads split the panels:
  //   - an output that is not finite (before ReLU, which would hide -inf): the transforms
  //     spread a NaN or inf to the whole tile;
  //   - cancellation: S = sum over alpha of w_alpha |M_alpha|, with w_alpha = max_i
  //     |A^T[i][alpha]| (Tr::kWeight), a bound on the magnitudes that each output sums before
  //     the output transform cancels them, above Tr::kCancellation times the largest output
  //     magnitude (after ReLU, where the stage has one). Winograd's rounding error is a few ulps of S, the direct GEMM's a few ulps
  //     of the terms that each output actually sums. They part when one window value dwarfs
  //     the outputs it should not touch (a 1e6 pixel next to zero weights, its own output cut
  //     by ReLU): that error reached 2e-4 of the output's norm.
  //   The first check rides on the second: |y| <= S, so a finite S means finite outputs.
  template <typename Tr>
  void output_transform(const Conv& conv, const int64_t* tn, const int64_t* th, const int64_t* tw, int64_t count,
                        int64_t p_begin, int64_t p_end) {
    using Vec = Simd<float>::Vec;
    constexpr int L = Simd<float>::kLanes, P = Tr::kPositions, TH = Tr::kTileH, TW = Tr::kTileW;
    constexpr int NR = kNR<float>;
    const int64_t a_stride = winograd::tiles<Tr>() * ldm_, panels = conv.panels();
    int64_t* pn = pix_.data();
    int64_t* ph = pn + kMaxTiles;
    int64_t* pw = ph + kMaxTiles;
    for (int64_t i = 0; i < count; ++i) {
      const int64_t h0 = TH * th[i], w0 = TW * tw[i];
      const int64_t rows = std::min<int64_t>(TH, conv.Ho - h0), cols = std::min<int64_t>(TW, conv.Wo - w0);
      const float* m = m_.data() + i * ldm_;
      for (int64_t p = p_begin; p < p_end; ++p) {
        Vec bad{}, s_max{}, y_max{};  // bad: S - S, 0 where finite, NaN where not
        float bad1 = 0.0f, s_max1 = 0.0f, y_max1 = 0.0f;
        for (const auto& seg : conv.direct.segments) {
          const int64_t lo = std::max(p * NR, seg.begin), hi = std::min({(p + 1) * NR, seg.end, conv.cols()});
          if (lo >= hi) continue;
          float* dst[TH * TW];
          for (int r = 0; r < rows; ++r)
            for (int s = 0; s < cols; ++s)
              dst[r * TW + s] = seg.dst.interior_row(tn[i], h0 + r, w0 + s) + seg.channel - seg.begin;
          int64_t j = lo;
          for (; j + L <= hi; j += L) {
            Vec mv[P], y[TH * TW], bias, sum{};
            for (int a = 0; a < P; ++a) {
              std::memcpy(&mv[a], m + a * a_stride + j, sizeof(Vec));
              const Vec mag = mv[a] < 0 ? -mv[a] : mv[a];
              sum += Tr::kWeight[a] * mag;
            }
            std::memcpy(&bias, conv.bias() + j, sizeof(Vec));
            Tr::output_tile(mv, y);
            bad += sum - sum;  // |y| <= sum: a finite sum means finite outputs
            s_max = sum > s_max ? sum : s_max;
            const Vec zero{};
            for (int r = 0; r < rows; ++r)
              for (int s = 0; s < cols; ++s) {
                Vec v = y[r * TW + s] + bias;
                if (conv.relu) v = v < zero ? zero : v;  // keeps NaN, like torch.relu
                const Vec mag = v < zero ? -v : v;  // the largest output's magnitude, after any ReLU
                y_max = mag > y_max ? mag : y_max;
                std::memcpy(dst[r * TW + s] + j, &v, sizeof(Vec));
              }
          }
          for (; j < hi; ++j) {
            float mv[P], y[TH * TW], sum = 0.0f;
            for (int a = 0; a < P; ++a) {
              mv[a] = m[a * a_stride + j];
              sum += Tr::kWeight[a] * std::fabs(mv[a]);
            }
            Tr::output_tile(mv, y);
            bad1 += sum - sum;
            s_max1 = std::max(s_max1, sum);
            for (int r = 0; r < rows; ++r)
              for (int s = 0; s < cols; ++s) {
                const float sum_bias = y[r * TW + s] + conv.bias()[j];
                const float v = conv.relu ? gemm::relu(sum_bias) : sum_bias;
                y_max1 = std::max(y_max1, std::fabs(v));
                dst[r * TW + s][j] = v;
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
        if (trusted && s_top <= Tr::kCancellation * y_top) continue;
        // Unbordered: the tile's window copied with zeros outside the source, each pixel's
        // taps at its corner in the copy.
        if (!conv.bordered()) window_patch<Tr>(conv, tn[i], h0 - conv.pad_h, w0 - conv.pad_w);
        int64_t n = 0;
        for (int r = 0; r < rows; ++r)
          for (int s = 0; s < cols; ++s, ++n) {
            pn[n] = tn[i];
            ph[n] = h0 + r;
            pw[n] = w0 + s;
            rows_[n] = conv.bordered() ? conv.src.interior_row(tn[i], ph[n] - conv.pad_h, pw[n] - conv.pad_w)
                                       : patch_.data() + (r * Tr::kWinW + s) * conv.cin();  // the window's corner
          }
        gemm::run_gemm(conv.bordered() ? conv.direct : conv.patch_direct, rows_.data(), pn, ph, pw, n, acc_.data(), p,
                       panels);
      }
    }
  }

  // patch_ = the (kWinH, kWinW, cin) window of image n from (h, w) on, zeros outside the source.
  template <typename Tr>
  void window_patch(const Conv& conv, int64_t n, int64_t h, int64_t w) {
    const int64_t C = conv.cin();
    for (int r = 0; r < Tr::kWinH; ++r)
      for (int s = 0; s < Tr::kWinW; ++s) {
        float* dst = patch_.data() + (r * Tr::kWinW + s) * C;
        const int64_t y = h + r, x = w + s;
        if (y >= -conv.src.pad && x >= -conv.src.pad && y < conv.H + conv.src.pad && x < conv.W + conv.src.pad)
          std::memcpy(dst, conv.src.interior_row(n, y, x), C * sizeof(float));
        else
          std::fill(dst, dst + C, 0.0f);
      }
  }

  int64_t ldv_, ldm_;  // row strides of V_alpha and M_alpha, clear of 4 KB set conflicts
  std::vector<float> v_, m_, acc_, zero_bias_;
  std::vector<const float*> rows_;
  std::vector<int64_t> pix_, zeros_, iota_;
  std::vector<float> patch_;
};

}  // namespace inception_fast::winograd
