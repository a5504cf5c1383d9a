// The fused branch-graph op on the CPU: declarations shared by the kernels and their bindings.
#pragma once

#include <torch/extension.h>

namespace inception_fast {

// Logical (N, C, H, W) over NHWC pixel rows (N*H*W, C): a view (the backward kernels').
inline at::Tensor as_image(const at::Tensor& rows, int64_t N, int64_t H, int64_t W) {
  return rows.view({N, H, W, rows.size(1)}).permute({0, 3, 1, 2});
}

// NHWC pixel rows (N*H*W, C) of an image: a view when it is channels_last already.
inline at::Tensor as_rows(const at::Tensor& image) {
  return image.contiguous(at::MemoryFormat::ChannelsLast).permute({0, 2, 3, 1}).reshape({-1, image.size(1)});
}

// The forward of a branch-graph block (GoogLeNet's module, Inception-v3's blocks), as
// stages of GEMMs planned by inception_fast/ops/plan.py. x: (N, C, H, W) in any memory
// format; returns (N, out_channels, H', W') channels_last. flat_plan = GraphPlan.flat():
// (buffers, buf_channels..., buf_border..., out_channels, stride, gemms, then per GEMM its
// record length and record (stage, source, kh, kw, stride, pad_h, pad_w, cols, segments,
// then (begin, end, destination, channel) per segment)), codes of plan.h (k >= 0: buffer
// k). Buffer k is an (N, H + 2 border, W + 2 border, channels) NHWC intermediate with a
// zero border. b[g] is B = W^T packed in panels of panel_width(dtype) columns,
// (ceil(cols / width), K, width), zero-padded, K index (dy * kw + dx) * source_channels + c.
// stride 2: a grid-reduction block, whose output grid is (H - 3) / 2 + 1.
at::Tensor inception_graph_forward(const at::Tensor& x, at::TensorList b, at::TensorList bias,
                                   at::IntArrayRef flat_plan);

// inception_graph_forward into `out`: that shape and dtype, channels_last.
at::Tensor& inception_graph_forward_out(const at::Tensor& x, at::TensorList b, at::TensorList bias,
                                        at::IntArrayRef flat_plan, at::Tensor& out);

// inception_graph_forward, also returning its buffers (the intermediates the backward
// needs), with their borders.
std::tuple<at::Tensor, std::vector<at::Tensor>> inception_graph_forward_saving(const at::Tensor& x, at::TensorList b,
                                                                               at::TensorList bias,
                                                                               at::IntArrayRef flat_plan);

// Gradients [dx, dW_0, db_0, dW_1, db_1, ...] of a branch-graph block (weights in Conv2d
// layout, spec order), empty where not needed, from the saved x, output y and
// intermediates ((N, H, W, channels) NHWC, any strides). plan = GraphPlan.backward_flat():
// (out_channels, stride, pool_copy_channel, buffers, buf_channels..., convs, then per
// convolution (source, destination, channel, kh, kw, stride, pad_h, pad_w)).
std::vector<at::Tensor> inception_graph_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& y,
                                                 at::TensorList intermediates, at::TensorList weights, bool needs_x,
                                                 bool needs_weights, at::IntArrayRef plan);

}  // namespace inception_fast
