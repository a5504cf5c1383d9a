// One-pass packing of fp32 convolution weights into the Winograd panels that winograd.h's
// GEMMs read (ops/backend.py's pack_winograd builds the same tensor from ATen ops, the
// differentiable path): per panel of `width` output channels, the transformed blocks U
// (positions x cin rows) and then the direct taps (taps x cin rows), each row `width` lanes:
//     U[co][ci][p] = sum_t T[p][t] w[co][ci][t],
// T the (positions, taps) transform (kron(G, G) for a 3x3), summed in double and rounded
// once, as the ATen path does. Training repacks every step, and that path's fp64 copies and
// fresh buffers cost 1.3 ms for GoogLeNet 4e's 3x3 (320 x 160; this: 0.6), about 8% of its step at
// batch 16; its data gradient repacks the flipped, transposed weight too.
#include "inception_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

namespace inception_fast {

at::Tensor pack_winograd_cpu(const at::Tensor& w, const at::Tensor& transform, int64_t width, bool flip) {
  TORCH_CHECK(w.dim() == 4 && w.scalar_type() == at::kFloat && w.device().is_cpu(),
              "pack_winograd_cpu: w must be a (cout, cin, kh, kw) float32 CPU tensor, got ", w.sizes(), " ",
              w.scalar_type());
  const int64_t cout = w.size(0), cin = w.size(1), kh = w.size(2), kw = w.size(3), taps = kh * kw;
  TORCH_CHECK(transform.dim() == 2 && transform.size(1) == taps && transform.scalar_type() == at::kDouble,
              "pack_winograd_cpu: transform must be a (positions, ", taps, ") float64 tensor, got ",
              transform.sizes(), " ", transform.scalar_type());
  TORCH_CHECK(width > 0 && width <= 64, "pack_winograd_cpu: width must be in [1, 64], got ", width);
  // (Checked against the scratch rows below: at most 64 lanes.)
  const at::Tensor t = transform.contiguous();
  const int64_t P = t.size(0), panels = (cout + width - 1) / width, rows = (P + taps) * cin;
  at::Tensor out = at::empty({panels, rows, width}, w.options().memory_format(at::MemoryFormat::Contiguous));
  const float* wd = w.data_ptr<float>();
  const double* td = t.data_ptr<double>();
  float* od = out.data_ptr<float>();
  const int64_t s0 = w.stride(0), s1 = w.stride(1), s2 = w.stride(2), s3 = w.stride(3);
  // One item per (panel, input channel): its taps for every lane gathered once (lanes past
  // cout zero), then each of its P + taps rows written whole.
  constexpr int64_t kMaxWidth = 64, kMaxTaps = 25;  // a 5x5
  TORCH_CHECK(taps <= kMaxTaps, "pack_winograd_cpu: at most ", kMaxTaps, " taps, got ", kh, "x", kw);
  at::parallel_for(0, panels * cin, 16, [&](int64_t i0, int64_t i1) {
    alignas(64) double g[kMaxTaps][kMaxWidth];
    alignas(64) double u[kMaxWidth];
    alignas(64) float row[kMaxWidth];
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t p = item / cin, ci = item % cin, lanes = std::min(width, cout - p * width);
      for (int64_t tap = 0; tap < taps; ++tap) {
        const int64_t src = flip ? taps - 1 - tap : tap;  // the data gradient's flipped filter
        const float* col = wd + p * width * s0 + ci * s1 + src / kw * s2 + src % kw * s3;
        double* __restrict__ gt = g[tap];
        for (int64_t lane = 0; lane < lanes; ++lane) gt[lane] = static_cast<double>(col[lane * s0]);
        for (int64_t lane = lanes; lane < width; ++lane) gt[lane] = 0.0;
      }
      float* panel = od + p * rows * width;
      for (int64_t a = 0; a < P; ++a) {
        double* __restrict__ ua = u;
        for (int64_t lane = 0; lane < width; ++lane) ua[lane] = 0.0;
        for (int64_t tap = 0; tap < taps; ++tap) {
          const double c = td[a * taps + tap];  // zeros too: 0 * NaN stays NaN, as in ATen's product
          const double* __restrict__ gt = g[tap];
          for (int64_t lane = 0; lane < width; ++lane) ua[lane] += c * gt[lane];
        }
        for (int64_t lane = 0; lane < width; ++lane) row[lane] = static_cast<float>(ua[lane]);
        std::memcpy(panel + (a * cin + ci) * width, row, width * sizeof(float));
      }
      for (int64_t tap = 0; tap < taps; ++tap) {
        for (int64_t lane = 0; lane < width; ++lane) row[lane] = static_cast<float>(g[tap][lane]);
        std::memcpy(panel + ((P + tap) * cin + ci) * width, row, width * sizeof(float));
      }
    }
  });
  return out;
}

}  // namespace inception_fast
