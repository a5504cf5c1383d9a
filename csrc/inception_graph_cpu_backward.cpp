// The fused backward of a branch-graph Inception block (Inception-v3's InceptionA to E) on
// the CPU: ATen GEMMs and convolution backward calls, grouped, plus NHWC kernels of our
// own for the pool branches. The algorithm is graph_backward_reference's
// (inception_fast/ops/branch_graph.py), which documents it; what this one adds:
//
//   - every gradient column of the shared-x GEMM is written in place into one (M, K0)
//     matrix A: the ReLU masks of the 1x1s over x go straight into their column blocks
//     (threshold_backward_out), and the average-pool branch's avgpool(gp) is pooled by
//     our kernel straight into its block, so the one GEMM for dx (A @ W) and the one for
//     the weights (A^T @ x) read it without a concat;
//   - the gradients of an intermediate's consumers accumulate in place into one buffer,
//     masked once by its ReLU when its producer's turn comes;
//   - the max-pool branch runs max_pool_backward.h's one pass: it recomputes the pool and
//     its argmax and scatters gp @ Wp into the GEMM's dx in place (no index tensor), and
//     leaves the pooled rows for the projection's weight gradient;
//   - the other contributions to dx (a grid reduction's stride-2 convolution over x, its
//     copied max pool) are added in place into the GEMM's result.

#include "gemm.h"
#include "huge_pages.h"
#include "inception_cpu.h"
#include "max_pool_backward.h"
#include "plan.h"

#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <tuple>
#include <utility>
#include <vector>

namespace inception_fast {
namespace {
using namespace plan;

struct ConvRecord {
  int64_t source, dest, channel, kh, kw, stride, pad_h, pad_w;
  // Its output grid over an H x W input (plan.h's conv_grid).
  std::pair<int64_t, int64_t> grid(int64_t H, int64_t W) const {
    return conv_grid(H, W, kh, kw, stride, pad_h, pad_w);
  }
  bool shared() const {
    return (source == kSourceX && kh == 1 && kw == 1 && stride == 1) || source == kSourceAvgPool ||
           source == kSourceAvgPoolExcludePad;
  }
};

// dst rows (row stride ld) = the 3x3/1 average (or sum) pool of g's NHWC rows ((N*H*W, C),
// contiguous): gemm.h's pooled-row loop, the forward's, one image row per work item.
template <typename T>
void avg_pool3x3_into(const T* g, T* dst, int64_t ld, int64_t N, int64_t H, int64_t W, int64_t C,
                      gemm::PoolDivisor divisor) {
  const Plane<const T> plane{g, H * W * C, W * C, C, 0};
  at::parallel_for(0, N * H, 1, [&](int64_t r0, int64_t r1) {
    std::vector<int64_t> pix(3 * W);  // (n, h, w) of one image row's pixels
    int64_t *pn = pix.data(), *ph = pn + W, *pw = ph + W;
    for (int64_t r = r0; r < r1; ++r) {
      gemm::pixel_coords(r * W, W, H, W, pn, ph, pw);
      gemm::avg_pool_rows(plane, H, W, C, pn, ph, pw, W, dst + r * W * ld, ld, divisor);
    }
  });
}

// (H*W, 1): the in-bounds pixels of each pixel's 3x3 window, the divisor of an average pool
// without count_include_pad.
at::Tensor window_counts(int64_t H, int64_t W, const at::TensorOptions& options) {
  auto rows = at::full({H}, 3, options);
  auto cols = at::full({W}, 3, options);
  rows[0] = rows[0] - 1;
  rows[H - 1] = rows[H - 1] - 1;
  cols[0] = cols[0] - 1;
  cols[W - 1] = cols[W - 1] - 1;
  return at::outer(rows, cols).reshape({H * W, 1});
}

}  // namespace

std::vector<at::Tensor> inception_graph_backward(const at::Tensor& grad_out_in, const at::Tensor& x_in,
                                                 const at::Tensor& y_in, at::TensorList intermediates,
                                                 at::TensorList weights, bool needs_x, bool needs_weights,
                                                 at::IntArrayRef flat /* GraphPlan.backward_flat() */) {
  TORCH_CHECK(x_in.device().is_cpu() && x_in.dim() == 4, "x must be a 4-D CPU tensor, got ", x_in.sizes());
  const bool needs[2] = {needs_x, needs_weights};
  const auto size = static_cast<int64_t>(flat.size());
  TORCH_CHECK(size >= 5, "backward plan too short");
  const int64_t stride = flat[1], copy_channel = flat[2], buffers = flat[3];
  // Counts checked against the length first, so that no sum below can overflow.
  TORCH_CHECK(buffers >= 0 && buffers <= size - 5 && flat[4 + buffers] >= 0 &&
                  flat[4 + buffers] == (size - 5 - buffers) / kConvRecord &&
                  (size - 5 - buffers) % kConvRecord == 0,
              "backward plan: ", size, " values do not match its counts");
  TORCH_CHECK(stride == 1 || stride == 2, "backward plan: stride must be 1 or 2, got ", stride);
  TORCH_CHECK(copy_channel >= -1 && (copy_channel < 0 || stride == 2),
              "backward plan: a max-pool copy channel (", copy_channel, ") only in a stride-2 block");
  const int64_t convs = flat[4 + buffers];
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == convs, "one weight per convolution: need ", convs, ", got ",
              weights.size());
  TORCH_CHECK(static_cast<int64_t>(intermediates.size()) == buffers, "one intermediate per buffer: need ", buffers,
              ", got ", intermediates.size());
  const int64_t N = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3), M = N * H * W;
  // The output grid: that of the convolutions into it (a grid reduction's, or unpadded ones'
  // smaller), or the grid reduction's when only its max-pool copy writes it.
  int64_t Ho = stride == 1 ? H : (H - 3) / 2 + 1, Wo = stride == 1 ? W : (W - 3) / 2 + 1;
  for (int64_t i = 0; i < flat[4 + buffers]; ++i) {
    const int64_t* r = flat.data() + 5 + buffers + kConvRecord * i;
    if (r[1] != kDestOut) continue;
    const ConvRecord t{r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]};
    TORCH_CHECK(t.stride >= 1, "backward plan: convolution ", i, " has stride ", t.stride);
    std::tie(Ho, Wo) = t.grid(H, W);
    break;
  }
  TORCH_CHECK(grad_out_in.sizes() == y_in.sizes() && y_in.dim() == 4 && y_in.size(0) == N && y_in.size(1) == flat[0] &&
                  y_in.size(2) == Ho && y_in.size(3) == Wo,
              "grad_out and y must have shape (", N, ", ", flat[0], ", ", Ho, ", ", Wo, "), got ", grad_out_in.sizes(),
              " and ", y_in.sizes());
  for (int64_t k = 0; k < buffers; ++k)
    TORCH_CHECK(intermediates[k].dim() == 4 && intermediates[k].size(0) == N && intermediates[k].size(1) == H &&
                    intermediates[k].size(2) == W && intermediates[k].size(3) == flat[4 + k],
                "intermediate ", k, " must be (", N, ", ", H, ", ", W, ", ", flat[4 + k], ") NHWC, got ",
                intermediates[k].sizes());
  std::vector<ConvRecord> table;
  for (int64_t i = 0; i < convs; ++i) {
    const int64_t* r = flat.data() + 5 + buffers + kConvRecord * i;
    table.push_back({r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]});
    const ConvRecord& t = table.back();
    TORCH_CHECK(!residual_destination(t.dest), "convolution ", i, " ends in a residual epilogue: "
                "the backward has none (plan_with_residual is for inference; under autograd the tail runs as ATen ops)");
    TORCH_CHECK(t.source >= kSourceAvgPoolExcludePad && t.source != kSourceMaxPoolCopy && t.source < buffers && t.dest >= kDestOut && t.dest < buffers,
                "convolution ", i, ": source ", t.source, " or destination ", t.dest, " out of range");
    TORCH_CHECK(weights[i].dim() == 4 && weights[i].size(2) == t.kh && weights[i].size(3) == t.kw &&
                    weights[i].scalar_type() == x_in.scalar_type(),
                "weight ", i, " must be a (cout, cin, ", t.kh, ", ", t.kw, ") tensor of x's dtype, got ",
                weights[i].sizes());
    // The fused max-pool pass below reads x through the pool, one 1x1 over all its channels.
    TORCH_CHECK(t.source != kSourceMaxPool || (t.kh == 1 && t.kw == 1 && t.stride == 1 && weights[i].size(1) == C),
                "convolution ", i, " over the max-pooled x must be a stride-1 1x1 over its ", C, " channels");
    TORCH_CHECK((t.stride == 1 || t.stride == 2) && 0 <= t.pad_h && t.pad_h < t.kh && 0 <= t.pad_w && t.pad_w < t.kw &&
                    weights[i].size(1) == (t.source >= 0 ? flat[4 + t.source] : C) &&
                    (t.dest == kDestOut ? t.stride == stride : t.stride == 1) &&
                    t.grid(H, W) == (t.dest == kDestOut ? std::make_pair(Ho, Wo) : std::make_pair(H, W)),
                "convolution ", i, ": a ", t.kh, "x", t.kw, " stride-", t.stride, " record with padding (", t.pad_h,
                ", ", t.pad_w, ") does not fit its weight ", weights[i].sizes(), " and source");
  }
  // Every channel of the output and of each buffer comes from exactly one convolution (or,
  // for the output, the max-pool copy): the layout the forward wrote, which these
  // gradients slice.
  {
    ChannelCoverage written(flat[0], flat.slice(4, buffers));
    for (int64_t i = 0; i < convs; ++i)
      written.mark(table[i].dest, table[i].channel, weights[i].size(0), "backward plan: convolution", i);
    if (copy_channel >= 0) written.mark(kDestOut, copy_channel, C, "backward plan: the max-pool copy", -1);
    written.check_complete("backward plan");
  }

  const auto cl = at::MemoryFormat::ChannelsLast;
  const at::Tensor x = x_in.contiguous(cl), x_rows = as_rows(x);
  const at::Tensor grad_rows = as_rows(grad_out_in), y_rows = as_rows(y_in);
  std::vector<at::Tensor> inter_rows, d_inter(buffers);
  for (const at::Tensor& t : intermediates) inter_rows.push_back(t.reshape({-1, t.size(3)}));

  // Column blocks of A, the shared-x GEMM's gradient matrix, in spec order.
  std::vector<int64_t> column(convs, -1);
  int64_t k0 = 0;
  std::vector<at::Tensor> shared_weights;
  for (int64_t i = 0; i < convs; ++i)
    if (table[i].shared()) {
      column[i] = k0;
      k0 += weights[i].size(0);
      shared_weights.push_back(weights[i].flatten(1));
    }
  const at::Tensor a = empty_large({M, k0}, x.options());

  std::vector<at::Tensor> d_weights(convs), d_biases(convs), dx_terms;
  int64_t max_pool_conv = -1;  // its scatter waits for dx: the shared GEMM runs after this loop
  at::Tensor max_pool_g;
  for (int64_t i = convs - 1; i >= 0; --i) {
    const ConvRecord& t = table[i];
    const at::Tensor& weight = weights[i];
    const int64_t co = weight.size(0);
    // The ReLU gradient, straight into A for the 1x1s over x.
    const at::Tensor& g_in = t.dest < 0 ? grad_rows.narrow(1, t.channel, co) : d_inter[t.dest];
    const at::Tensor& relu_out = t.dest < 0 ? y_rows.narrow(1, t.channel, co) : inter_rows[t.dest];
    TORCH_CHECK(g_in.defined(), "intermediate ", t.dest, " has no consumer in the plan");
    at::Tensor g;
    if (t.source == kSourceX && t.shared()) {
      g = a.narrow(1, column[i], co);
      at::threshold_backward_out(g, g_in, relu_out, 0);
    } else {
      g = at::threshold_backward(g_in, relu_out, 0).contiguous();
    }
    d_biases[i] = g.sum(0);
    if (t.source == kSourceAvgPool || t.source == kSourceAvgPoolExcludePad) {
      // With count_include_pad the pool is self-adjoint: its A block is avgpool(gp). Without,
      // it is S(x) / count, S the (self-adjoint) 3x3 sum pool: the block is S(gp / count).
      const bool include_pad = t.source == kSourceAvgPool;
      const at::Tensor src = include_pad ? g : (g / window_counts(H, W, x.options()).repeat({N, 1})).contiguous();
      RECORD_FUNCTION("inception_fast::avg_pool3x3_into", std::vector<c10::IValue>());
      AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "avg_pool3x3_into", [&] {
        avg_pool3x3_into<scalar_t>(src.data_ptr<scalar_t>(), a.data_ptr<scalar_t>() + column[i], k0, N, H, W, co,
                                   include_pad ? gemm::PoolDivisor::kNine : gemm::PoolDivisor::kNone);
      });
    } else if (t.source == kSourceMaxPool) {
      TORCH_CHECK(max_pool_conv < 0, "the plan has more than one convolution over the max-pooled x");
      max_pool_conv = i;
      max_pool_g = g;
    } else if (!t.shared()) {
      const auto [gh, gw] = t.grid(H, W);
      const at::Tensor src = t.source == kSourceX ? x : intermediates[t.source].permute({0, 3, 1, 2});
      const bool need_input = t.source >= 0 || needs[0];
      auto [d_src, d_w, d_b] = at::convolution_backward(
          as_image(g, N, gh, gw), src, weight, std::nullopt, {t.stride, t.stride}, {t.pad_h, t.pad_w}, {1, 1}, false,
          {0, 0}, 1, {need_input, needs[1], false});
      d_weights[i] = d_w;
      if (t.source >= 0) {
        const at::Tensor d_rows = as_rows(d_src);
        if (d_inter[t.source].defined())
          d_inter[t.source].add_(d_rows);
        else
          d_inter[t.source] = d_rows.is_contiguous() ? d_rows : d_rows.contiguous();
      } else if (need_input) {
        dx_terms.push_back(d_src);
      }
    }
  }

  // The shared-x GEMMs: weight gradients of every 1x1 over x (and the average-pool
  // projection's), then dx as (M, C) NHWC rows, into which every other contribution is
  // added in place.
  // fp32 runs these GEMMs as 1x1 convolutions' backward, which is oneDNN's: on AMD's Zen 5,
  // at::mm (MKL's sgemm) ran these shapes at ~105 GMAC/s on 2 threads and oneDNN's 1x1
  // convolution at ~220 (GoogLeNet's 5b at batch 32: 15.1 against 7.1 ms for the shared
  // pair). bf16 and fp64 keep at::mm.
  const bool onednn = x.scalar_type() == at::kFloat;
  at::Tensor d_shared, dx_rows;
  if (k0 > 0 && onednn && (needs[0] || needs[1])) {
    // Both as one 1x1 convolution's backward, A the gradient of its K0 output channels.
    auto [d_x, d_w, d_b] = at::convolution_backward(
        as_image(a, N, H, W), x, at::cat(shared_weights).view({k0, C, 1, 1}), std::nullopt, {1, 1}, {0, 0}, {1, 1},
        false, {0, 0}, 1, {needs[0], needs[1], false});
    if (needs[1]) d_shared = d_w.reshape({k0, C});
    if (needs[0]) dx_rows = as_rows(d_x.contiguous(cl));
  } else if (k0 > 0) {
    if (needs[1]) d_shared = at::mm(a.t(), x_rows);
    if (needs[0]) dx_rows = at::mm(a, at::cat(shared_weights));
  }
  if (needs[1] && k0 > 0)
    for (int64_t i = 0; i < convs; ++i)
      if (column[i] >= 0) d_weights[i] = d_shared.narrow(0, column[i], weights[i].size(0)).view(weights[i].sizes()).clone();
  if (needs[0] && k0 == 0) dx_rows = empty_large({M, C}, x.options()).zero_();
  // The max-pool branch: one pass recomputes the pool and its argmax, scatters g @ Wp into
  // dx_rows in place, and leaves the pooled rows for dW = g^T @ pooled (made even when
  // only the weights need gradients).
  if (max_pool_conv >= 0 && (needs[0] || needs[1])) {
    const at::Tensor pooled = empty_large({M, C}, x.options());
    const at::Tensor& weight = weights[max_pool_conv];
    const at::Tensor gp_image = as_image(max_pool_g, N, H, W);  // max_pool_g: contiguous (M, cp) rows
    at::Tensor dp_full;  // fp32: d_pooled = gp @ Wp in full, as the 1x1's data gradient
    if (needs[0] && onednn) {
      dp_full = as_rows(std::get<0>(at::convolution_backward(gp_image, x, weight, std::nullopt, {1, 1}, {0, 0}, {1, 1},
                                                             false, {0, 0}, 1, {true, false, false})));
    }
    {
      RECORD_FUNCTION("inception_fast::max_pool3x3_backward", std::vector<c10::IValue>());
      AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "max_pool3x3_backward", [&] {
        max_pool3x3_backward<scalar_t>(x.data_ptr<scalar_t>(), max_pool_g, weight.flatten(1),
                                       needs[0] ? dx_rows.data_ptr<scalar_t>() : nullptr, pooled.data_ptr<scalar_t>(),
                                       N, H, W, C, dp_full.defined() ? dp_full.data_ptr<scalar_t>() : nullptr);
      });
    }
    if (needs[1] && onednn) {
      d_weights[max_pool_conv] = std::get<1>(at::convolution_backward(
          gp_image, as_image(pooled, N, H, W), weight, std::nullopt, {1, 1}, {0, 0}, {1, 1}, false, {0, 0}, 1,
          {false, true, false})).contiguous();
    } else if (needs[1]) {
      d_weights[max_pool_conv] = at::mm(max_pool_g.t(), pooled).view(weight.sizes());
    }
  }
  at::Tensor dx;
  if (needs[0]) {
    dx = as_image(dx_rows, N, H, W);
    for (const at::Tensor& term : dx_terms) dx.add_(term);
    if (copy_channel >= 0) {
      auto [pooled, indices] = at::max_pool2d_with_indices(x, {3, 3}, {2, 2}, {0, 0});
      dx.add_(at::max_pool2d_with_indices_backward(grad_out_in.narrow(1, copy_channel, C), x, {3, 3}, {2, 2}, {0, 0},
                                                   {1, 1}, false, indices));
    }
  }
  // An operator's Tensor[] holds no undefined tensors: a gradient not needed is empty. The
  // layouts are the fake kernel's: channels_last dx, contiguous biases' gradients, and each
  // weight's gradient in its weight's layout (ops/backend.py's weight_layout: channels_last
  // for a channels_last weight, else contiguous), which AccumulateGrad keeps without a copy.
  const at::Tensor none = at::empty({0}, x_in.options());
  std::vector<at::Tensor> grads{needs[0] ? dx.contiguous(at::MemoryFormat::ChannelsLast) : none};
  for (int64_t i = 0; i < convs; ++i) {
    const at::Tensor& w = weights[i];
    const bool w_cl = w.is_contiguous(at::MemoryFormat::ChannelsLast) && !w.is_contiguous();
    grads.push_back(needs[1] ? d_weights[i].contiguous(w_cl ? at::MemoryFormat::ChannelsLast
                                                            : at::MemoryFormat::Contiguous)
                             : none);
    grads.push_back(needs[1] ? d_biases[i].contiguous() : none);
  }
  return grads;
}

at::Tensor max_pool3x3_scatter(const at::Tensor& x, const std::optional<at::Tensor>& d_pooled,
                               const std::optional<at::Tensor>& dx) {
  const auto cl = at::MemoryFormat::ChannelsLast;
  TORCH_CHECK(x.dim() == 4 && x.device().is_cpu() && x.is_contiguous(cl),
              "max_pool3x3_scatter: x must be a channels_last 4-D CPU tensor, got ", x.sizes());
  TORCH_CHECK(d_pooled.has_value() == dx.has_value(), "max_pool3x3_scatter: d_pooled and dx come together");
  for (const auto* t : {&d_pooled, &dx})
    TORCH_CHECK(!t->has_value() || ((*t)->sizes() == x.sizes() && (*t)->scalar_type() == x.scalar_type() &&
                                    (*t)->is_contiguous(cl) && (*t)->device().is_cpu()),
                "max_pool3x3_scatter: d_pooled and dx must be channels_last like x ", x.sizes(), " of ",
                x.scalar_type());
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  at::Tensor pooled = empty_large(x.sizes(), x.options().memory_format(cl));
  if (x.numel() == 0) return pooled;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "max_pool3x3_scatter", [&] {
    max_pool3x3_backward<scalar_t>(x.data_ptr<scalar_t>(), at::Tensor(), at::Tensor(),
                                   dx.has_value() ? dx->data_ptr<scalar_t>() : nullptr, pooled.data_ptr<scalar_t>(), N,
                                   H, W, C, d_pooled.has_value() ? d_pooled->data_ptr<scalar_t>() : nullptr);
  });
  return pooled;
}

}  // namespace inception_fast
