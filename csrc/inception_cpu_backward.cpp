// The fused Inception backward on the CPU: ATen GEMMs and convolution backward calls,
// grouped by shared operand (one GEMM for every 1x1 over x), plus one NHWC kernel of our own for the max-pool branch.
//
// On NHWC pixel rows (M = N*H*W rows):
//   1. grad_out masked by y > 0 gives the four branches' ReLU gradients;
//   2. t3, t5 are recomputed (two addmm + ReLU), never stored by the forward;
//   3. convolution_backward of the K3 and K5 stages gives dt3, dt5, masked by t > 0
//      straight into their column blocks of d_red = [g1 | dt3 | dt5];
//   4. one GEMM gives dx of the three 1x1 convolutions that share x (d_red @ W_1x1) and
//      one their weight gradients (d_red^T @ x);
//   5. one pass over x recomputes the 3x3 max pool (values and argmax) and scatters
//      gp @ Wp into dx at the argmax, in place: no index tensor, no zeroed gradient
//      buffer, no separate add, no full-size gp @ Wp tensor.

#include "inception_cpu.h"
#include "max_pool_backward.h"

#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <cstring>

namespace inception_fast {

std::vector<at::Tensor> inception_backward(const at::Tensor& grad_out, const at::Tensor& x_in,
                                           const at::Tensor& y, const std::vector<at::Tensor>& w,
                                           const std::vector<bool>& needs) {
  TORCH_CHECK(w.size() == 12, "weights must be (w1, b1, w3r, b3r, w3, b3, w5r, b5r, w5, b5, wp, bp), got ",
              w.size(), " tensors");
  TORCH_CHECK(needs.size() == 13, "needs must have 13 flags (x and the 12 weights), got ", needs.size());
  TORCH_CHECK(x_in.device().is_cpu() && x_in.dim() == 4, "x must be a 4-D CPU tensor, got ", x_in.sizes());
  // The branches' own biases (w[1], w[5], w[9], w[11]) do not enter the gradients.
  const at::Tensor &w1 = w[0], &w3r = w[2], &b3r = w[3], &w3 = w[4];
  const at::Tensor &w5r = w[6], &b5r = w[7], &w5 = w[8], &wp = w[10];
  const int64_t N = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  const int64_t c1 = w1.size(0), r3 = w3r.size(0), c3 = w3.size(0), r5 = w5r.size(0);
  const int64_t c5 = w5.size(0), cp = wp.size(0), c_out = c1 + c3 + c5 + cp;
  TORCH_CHECK(grad_out.sizes() == y.sizes() && y.size(0) == N && y.size(1) == c_out &&
                  y.size(2) == H && y.size(3) == W,
              "grad_out and y must have shape (", N, ", ", c_out, ", ", H, ", ", W, "), got ",
              grad_out.sizes(), " and ", y.sizes());
  for (const at::Tensor& t : w)
    TORCH_CHECK(t.scalar_type() == x_in.scalar_type() && t.device() == x_in.device(),
                "weights must match x's dtype and device");

  if (N * H * W == 0) {  // an empty batch or image: every gradient is zero
    std::vector<at::Tensor> grads{needs[0] ? at::zeros_like(x_in) : at::Tensor()};
    for (size_t i = 0; i < w.size(); ++i) grads.push_back(needs[i + 1] ? at::zeros_like(w[i]) : at::Tensor());
    return grads;
  }
  const auto cl = at::MemoryFormat::ChannelsLast;
  const at::Tensor x = x_in.contiguous(cl), x_rows = as_rows(x);

  // 1. Each branch's ReLU gradient (none flows where y == 0, as torch.relu), into its own
  //    contiguous rows; the 1x1 branch's straight into its column block of d_red.
  const at::Tensor grad_rows = as_rows(grad_out), y_rows = as_rows(y);
  auto branch_grad = [&](int64_t begin, int64_t width) {
    return at::threshold_backward(grad_rows.narrow(1, begin, width), y_rows.narrow(1, begin, width), 0);
  };
  const at::Tensor d_red = at::empty({N * H * W, c1 + r3 + r5}, x.options());
  at::Tensor g1 = d_red.narrow(1, 0, c1);
  at::threshold_backward_out(g1, grad_rows.narrow(1, 0, c1), y_rows.narrow(1, 0, c1), 0);
  const at::Tensor g3 = branch_grad(c1, c3), g5 = branch_grad(c1 + c3, c5);
  const at::Tensor gp = branch_grad(c1 + c3 + c5, cp);

  // 2. The reductions, recomputed: t = relu(x @ W^T + b).
  auto reduce = [&](const at::Tensor& wr, const at::Tensor& br) {
    return at::addmm(br, x_rows, wr.flatten(1).t()).relu_();
  };
  const at::Tensor t3 = reduce(w3r, b3r), t5 = reduce(w5r, b5r);

  // 3. The spatial stages; their input grads land masked in d_red = [g1 | dt3 | dt5].
  auto spatial = [&](const at::Tensor& g_branch, const at::Tensor& t, const at::Tensor& weight,
                     int64_t d_red_col, bool need_weight) {
    const int64_t k = weight.size(-1);
    auto [d_t, d_w, d_b] = at::convolution_backward(
        as_image(g_branch, N, H, W), as_image(t, N, H, W), weight,
        at::OptionalIntArrayRef(std::vector<int64_t>{weight.size(0)}), {1, 1}, {k / 2, k / 2}, {1, 1},
        false, {0, 0}, 1, {true, need_weight, true});
    at::Tensor d_t_out = d_red.narrow(1, d_red_col, t.size(1));
    at::threshold_backward_out(d_t_out, as_rows(d_t), t, 0);
    return std::make_pair(d_w, d_b);
  };
  auto [dw3, db3] = spatial(g3, t3, w3, c1, needs[5]);
  auto [dw5, db5] = spatial(g5, t5, w5, c1 + r3, needs[9]);

  // 4. The three 1x1 convolutions that share x: one GEMM for dx, one for their weights.
  const at::Tensor dw_red = at::mm(d_red.t(), x_rows);
  const at::Tensor db_red = d_red.sum(0);
  at::Tensor dx;
  if (needs[0]) dx = at::mm(d_red, at::cat({w1.flatten(1), w3r.flatten(1), w5r.flatten(1)}));
  // 5. The pool branch: pooled input recomputed, its scatter added into dx in place.
  const at::Tensor pooled = at::empty({N * H * W, C}, x.options());
  {
    RECORD_FUNCTION("inception_fast::max_pool3x3_backward", std::vector<c10::IValue>());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "max_pool3x3_backward", [&] {
      max_pool3x3_backward<scalar_t>(x.data_ptr<scalar_t>(), gp, wp.flatten(1),
                                     needs[0] ? dx.data_ptr<scalar_t>() : nullptr,
                                     pooled.data_ptr<scalar_t>(), N, H, W, C);
    });
  }
  const at::Tensor dwp = at::mm(gp.t(), pooled);

  // Own storage per gradient (weights are small): a custom op's outputs may not alias.
  auto split = [&](const at::Tensor& t, int64_t begin, int64_t size) {
    return t.narrow(0, begin, size).clone();
  };
  std::vector<at::Tensor> grads{
      needs[0] ? as_image(dx, N, H, W) : at::Tensor(),
      split(dw_red, 0, c1).view(w1.sizes()), split(db_red, 0, c1),
      split(dw_red, c1, r3).view(w3r.sizes()), split(db_red, c1, r3),
      dw3, db3,
      split(dw_red, c1 + r3, r5).view(w5r.sizes()), split(db_red, c1 + r3, r5),
      dw5, db5,
      dwp.view(wp.sizes()), gp.sum(0),
  };
  for (size_t i = 0; i < grads.size(); ++i)
    if (!needs[i]) grads[i] = at::Tensor();
  return grads;
}

}  // namespace inception_fast
