// The fused Inception op on the CPU: declarations shared by the kernels and their bindings.
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

// Shapes of one module, read off the packed weights by the Python host wrapper.
struct InceptionDims {
  int64_t c1, r3, r5, c3, c5, cp, k3, k5;
};

// x: (N, Cin, H, W) in any memory format. Returns (N, c1+c3+c5+cp, H, W), channels_last:
// `out` when given (it must already be that shape, dtype and layout), else a new tensor.
//   reduce_b  (panels, Cin, width)        [W1 | W3r | W5r] as B = W^T, packed
//   reduce_bias (c1 + r3 + r5,)           [b1 | b3r | b5r]
//   conv3_b   (panels, k3*k3*r3, width)   K index = (dy*k3 + dx)*r3 + c
//   conv5_b   (panels, k5*k5*r5, width)
//   pool_b    (panels, Cin, width)        Wp^T, packed
at::Tensor inception_forward(const at::Tensor& x, const at::Tensor& reduce_b,
                             const at::Tensor& reduce_bias, const at::Tensor& conv3_b,
                             const at::Tensor& conv3_bias, const at::Tensor& conv5_b,
                             const at::Tensor& conv5_bias, const at::Tensor& pool_b,
                             const at::Tensor& pool_bias, const InceptionDims& dims,
                             const std::optional<at::Tensor>& out);

// Gradients of (x, w1, b1, w3r, b3r, w3, b3, w5r, b5r, w5, b5, wp, bp), each undefined
// where needs[i] is false, from the saved input x and output y. Weights in Conv2d layout.
std::vector<at::Tensor> inception_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                           const at::Tensor& y, const std::vector<at::Tensor>& w,
                                           const std::vector<bool>& needs);

// The forward of a branch-graph block (Inception-v3), as stages of GEMMs planned by
// inception_fast/ops/branch_graph.py. Buffer k is an (N, H + 2 border, W + 2 border,
// channels) NHWC intermediate with a zero border. gemm_descs[g] = (stage, source, kh, kw,
// stride, pad_h, pad_w, cols, segments, then (begin, end, destination, channel) per
// segment); source -1 is x, -2 its 3x3/1 average pool (count_include_pad), -3 its 3x3/1 max
// pool, -4 its 3x3/2 max pool copied into one output slice (no weights), k >= 0 buffer k;
// destination -1 is the output, k >= 0 buffer k. b[g] is B packed in panels as for
// inception_forward, K index (dy * kw + dx) * source_channels + c. stride 2: a
// grid-reduction block, whose output grid is (H - 3) / 2 + 1.
at::Tensor inception_graph_forward(const at::Tensor& x, const std::vector<int64_t>& buf_channels,
                                   const std::vector<int64_t>& buf_border,
                                   const std::vector<std::vector<int64_t>>& gemm_descs,
                                   const std::vector<at::Tensor>& b, const std::vector<at::Tensor>& bias,
                                   int64_t out_channels, int64_t stride, const std::optional<at::Tensor>& out);

// inception_graph_forward into a new tensor, also returning its buffers (the intermediates
// the backward needs), with their borders.
std::tuple<at::Tensor, std::vector<at::Tensor>> inception_graph_forward_saving(
    const at::Tensor& x, const std::vector<int64_t>& buf_channels, const std::vector<int64_t>& buf_border,
    const std::vector<std::vector<int64_t>>& gemm_descs, const std::vector<at::Tensor>& b,
    const std::vector<at::Tensor>& bias, int64_t out_channels, int64_t stride);

// Gradients [dx, dW_0, db_0, dW_1, db_1, ...] of a branch-graph block (weights in Conv2d
// layout, spec order), undefined where not needed (needs = (x, weights)), from the saved x,
// output y and intermediates ((N, H, W, channels) NHWC, any strides). plan =
// GraphPlan.backward_flat(): (out_channels, stride, pool_copy_channel, buffers,
// buf_channels..., convs, then per convolution (source, destination, channel, kh, kw,
// stride, pad_h, pad_w)).
std::vector<at::Tensor> inception_graph_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& y,
                                                 const std::vector<at::Tensor>& intermediates,
                                                 const std::vector<at::Tensor>& weights, const std::vector<bool>& needs,
                                                 const std::vector<int64_t>& plan);

}  // namespace inception_fast
