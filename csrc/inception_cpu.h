// The fused branch-graph op on the CPU: declarations shared by the kernels and their bindings.
#pragma once

#include <torch/extension.h>

#include <string>
#include <vector>

namespace inception_fast {

// Logical (N, C, H, W) over NHWC pixel rows (N*H*W, C): a view (the backward kernels').
inline at::Tensor as_image(const at::Tensor& rows, int64_t N, int64_t H, int64_t W) {
  return rows.view({N, H, W, rows.size(1)}).permute({0, 3, 1, 2});
}

// NHWC pixel rows (N*H*W, C) of an image: a view when it is channels_last already.
inline at::Tensor as_rows(const at::Tensor& image) {
  return image.contiguous(at::MemoryFormat::ChannelsLast).permute({0, 2, 3, 1}).reshape({-1, image.size(1)});
}

// Which channels of the output (plan::kDestOut) and of each buffer a plan writes. The
// forward and the backward both require every channel written exactly once: nothing they
// return or read is left unwritten, and no slice is written twice.
class ChannelCoverage {
 public:
  ChannelCoverage(int64_t out_channels, at::IntArrayRef buf_channels) : written_(buf_channels.size() + 1) {
    written_[0].assign(out_channels, 0);
    for (size_t k = 0; k < buf_channels.size(); ++k) written_[k + 1].assign(buf_channels[k], 0);
  }

  // Channels [channel, channel + width) of destination `dest` (-1: the output); errors name
  // the writer as `who` followed by `index` (none when index < 0).
  void mark(int64_t dest, int64_t channel, int64_t width, const char* who, int64_t index) {
    auto& w = written_[dest + 1];
    const auto channels = static_cast<int64_t>(w.size());
    const std::string writer = index >= 0 ? std::string(who) + " " + std::to_string(index) : std::string(who);
    TORCH_CHECK(channel >= 0 && channel <= channels - width, writer, " writes past the ", channels,
                " channels of its destination");
    for (int64_t c = channel; c < channel + width; ++c) {
      TORCH_CHECK(w[c] == 0, writer, " writes channel ", c, " of ", name(dest), ", which is written twice");
      w[c] = 1;
    }
  }

  // Raises, naming `plan`, when a channel was never written.
  void check_complete(const char* plan) const {
    for (size_t k = 0; k < written_.size(); ++k)
      for (size_t c = 0; c < written_[k].size(); ++c)
        TORCH_CHECK(written_[k][c], plan, ": channel ", c, " of ", name(static_cast<int64_t>(k) - 1),
                    " is never written");
  }

 private:
  static std::string name(int64_t dest) { return dest < 0 ? "the output" : "buffer " + std::to_string(dest); }
  std::vector<std::vector<int8_t>> written_;  // [0]: the output, [k + 1]: buffer k
};

// The forward of a branch-graph block (GoogLeNet's module, Inception-v3's blocks), as
// stages of GEMMs planned by inception_fast/ops/plan.py. x: (N, C, H, W) in any memory
// format; returns (N, out_channels, H', W') channels_last. flat_plan = GraphPlan.flat():
// (buffers, buf_channels..., buf_border..., out_channels, stride, gemms, then per GEMM its
// record length and record (stage, source, kh, kw, stride, pad_h, pad_w, cols, segments,
// then (begin, end, destination, channel) per segment), then x's channel count), codes of
// plan.h (k >= 0: buffer k). Buffer k is an (N, H + 2 border, W + 2 border, channels) NHWC
// intermediate with a zero border. b[g] is B = W^T packed in panels of panel_width(dtype)
// columns, (ceil(cols / width), K, width), zero-padded, K index (dy * kw + dx) *
// source_channels + c; or, for an fp32 stride-1 3x3 (1xK, Kx1) GEMM, Winograd panels
// (ceil(cols / width), (positions + taps) * source_channels, width) (winograd.h).
// Each GEMM runs over its convolution's output grid over H x W (F.conv2d's); the output's
// grid is that of the GEMMs writing it: x's, (H - 3) / 2 + 1 for a grid reduction
// (stride 2), H - kh + 1 for unpadded stride-1 convolutions. dtypes: float32,
// float64, bfloat16 (fp32 biases, VNNI-paired B: gemm.h), float16 (computed in fp32: B,
// biases and the intermediates fp32, the output fp16).
at::Tensor inception_graph_forward(const at::Tensor& x, at::TensorList b, at::TensorList bias,
                                   at::IntArrayRef flat_plan);

// inception_graph_forward with every epilogue sum + bias, no ReLU. A one-convolution plan
// over a stride-1 convolution's output gradient, with its flipped, transposed weight, is
// that convolution's data gradient ('same' for a 'same' one; unpadded over the gradient
// with a (kh - 1, kw - 1) zero border for an unpadded one): the fp32 Winograd forms then
// serve the backward too (ops/branch_graph_bn_train.py). No residual epilogue.
at::Tensor inception_graph_forward_linear(const at::Tensor& x, at::TensorList b, at::TensorList bias,
                                          at::IntArrayRef flat_plan);

// inception_graph_forward into `out`: that shape and dtype, channels_last.
at::Tensor& inception_graph_forward_out(const at::Tensor& x, at::TensorList b, at::TensorList bias,
                                        at::IntArrayRef flat_plan, at::Tensor& out);

// inception_graph_forward, also returning its buffers (the intermediates the backward
// needs), with their borders.
std::tuple<at::Tensor, std::vector<at::Tensor>> inception_graph_forward_saving(const at::Tensor& x, at::TensorList b,
                                                                               at::TensorList bias,
                                                                               at::IntArrayRef flat_plan);

// inception_graph_forward with train-mode batch norm after every convolution (Conv2d, then
// BatchNorm2d on batch statistics, then ReLU): b and bias the unfolded convolutions' (bias
// zeros without one); bn_params per destination, the output first, then each buffer: a
// (3, channels) tensor of x's dtype, rows gamma, beta, eps, in the destination's channel
// order. The stages run one after another with each one's statistics in between
// (batch_norm_train.h). Returns (output, each buffer's normalised (N, H, W, channels)
// interior, contiguous (the backward's input; a bordered buffer is left behind), z (the pre-BN sums
// of each GEMM segment with weights, in plan order: (N, grid, segment channels) NHWC,
// contiguous), stats (per destination (5, channels): mean, biased var, invstd, and the
// normalisation's alpha = gamma invstd and shift = beta - mean alpha)). float32 and
// float64 only; no residual epilogue.
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>
inception_graph_forward_bn_train(const at::Tensor& x, at::TensorList b, at::TensorList bias,
                                 at::TensorList bn_params, at::IntArrayRef flat_plan);

// The backward of relu(BN(z)) on batch statistics (batch_norm_train.h, relu_bn_backward):
// grad, y (the ReLU's output, its mask) and z as (M, channels) rows with contiguous
// channels, any row stride; mean, invstd and weight (None without affine) per channel;
// without y, the mask is z * alpha + shift > 0 (the forward's stats rows 3 and 4).
// Returns (dz (M, channels) contiguous, d_gamma, d_beta). float32 and float64.
std::tuple<at::Tensor, at::Tensor, at::Tensor> relu_batch_norm_backward(
    const at::Tensor& grad, const std::optional<at::Tensor>& y, const at::Tensor& z, const at::Tensor& mean,
    const at::Tensor& invstd, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& alpha,
    const std::optional<at::Tensor>& shift);
// The same with dz written into `out` ((M, channels), channels contiguous, any row stride:
// a column slice of the walk's shared-x gradient matrix). Returns (d_gamma, d_beta).
std::tuple<at::Tensor, at::Tensor> relu_batch_norm_backward_out(
    const at::Tensor& grad, const std::optional<at::Tensor>& y, const at::Tensor& z, const at::Tensor& mean,
    const at::Tensor& invstd, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& alpha,
    const std::optional<at::Tensor>& shift, at::Tensor& out);

// A 3x3/1 max pool (padding 1) of x and, given d_pooled, its backward scattered into dx in
// place: each output pixel's d_pooled goes to its window's first maximum in a row-major
// scan, torch's rule (max_pool_backward.h, one pass, no index tensor). x, d_pooled and dx
// (N, C, H, W) channels_last. Returns the pooled x.
at::Tensor max_pool3x3_scatter(const at::Tensor& x, const std::optional<at::Tensor>& d_pooled,
                               const std::optional<at::Tensor>& dx);

// fp32 weights (cout, cin, kh, kw), any strides, -> the Winograd panels (ceil(cout / width),
// (positions + kh kw) cin, width) that winograd.h reads: U = transform (positions, kh kw,
// float64) applied to each filter's taps in double, rounded once, then the taps
// (pack_winograd.cpp). flip reverses each filter's taps (with w the transposed weight: the
// data gradient's filter).
at::Tensor pack_winograd_cpu(const at::Tensor& w, const at::Tensor& transform, int64_t width, bool flip);

// The weight gradient (cout, cin, kh, kw) of a stride-1 convolution from its input x (N, cin,
// H, W) and output gradient grad (N, cout, Ho, Wo), float32, channels contiguous (else copied
// channels_last), by Winograd (winograd_weight_grad.cpp): a 3x3 with padding 1 or 0 as
// F(tile x tile, 3x3), tile 2 or 4; a 1x7 or 7x1 padded 3 along its filter as F(2, 7).
// Returned channels_last where `channels_last` (a channels_last parameter's layout, so that
// AccumulateGrad keeps it without a copy), else contiguous. NaN throughout where an input
// was not finite or a transformed sum overflowed (the caller then runs the direct
// gradient). Keeps its U, V and M scratch per calling thread between calls (up to 16 MB
// each; ~10 MB in all at GoogLeNet's sizes).
at::Tensor winograd_weight_grad(const at::Tensor& x, const at::Tensor& grad, int64_t padding, int64_t tile,
                                int64_t kh, int64_t kw, bool channels_last);

// Gradients [dx, dW_0, db_0, dW_1, db_1, ...] of a branch-graph block (weights in Conv2d
// layout, spec order), empty where not needed, from the saved x, output y and
// intermediates ((N, H, W, channels) NHWC, any strides). plan = GraphPlan.backward_flat():
// (out_channels, stride, pool_copy_channel, buffers, buf_channels..., convs, then per
// convolution (source, destination, channel, kh, kw, stride, pad_h, pad_w)).
std::vector<at::Tensor> inception_graph_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& y,
                                                 at::TensorList intermediates, at::TensorList weights, bool needs_x,
                                                 bool needs_weights, at::IntArrayRef plan);

}  // namespace inception_fast
