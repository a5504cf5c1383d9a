// Python bindings of the CPU kernels: inception_fast._C.
#include "gemm.h"
#include "inception_cpu.h"
#include "nhwc.h"

namespace {

at::Tensor forward(const at::Tensor& x, const at::Tensor& reduce_b, const at::Tensor& reduce_bias,
                   const at::Tensor& conv3_b, const at::Tensor& conv3_bias,
                   const at::Tensor& conv5_b, const at::Tensor& conv5_bias,
                   const at::Tensor& pool_b, const at::Tensor& pool_bias,
                   std::vector<int64_t> dims, std::optional<at::Tensor> out) {
  TORCH_CHECK(dims.size() == 8, "dims must be (c1, r3, r5, c3, c5, cp, k3, k5), got ", dims.size(), " values");
  const inception_fast::InceptionDims d{dims[0], dims[1], dims[2], dims[3], dims[4], dims[5], dims[6], dims[7]};
  return inception_fast::inception_forward(x, reduce_b, reduce_bias, conv3_b, conv3_bias, conv5_b,
                                           conv5_bias, pool_b, pool_bias, d, out);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "inception_fast CPU kernels (NHWC, fused two-stage Inception forward)";
  m.def("inception_forward", &forward,
        "Fused Inception forward; weights pre-packed by inception_fast.ops.inception",
        py::arg("x"), py::arg("reduce_b"), py::arg("reduce_bias"), py::arg("conv3_b"),
        py::arg("conv3_bias"), py::arg("conv5_b"), py::arg("conv5_bias"), py::arg("pool_b"),
        py::arg("pool_bias"), py::arg("dims"), py::arg("out") = py::none());
  m.def("inception_backward", &inception_fast::inception_backward,
        "Fused Inception backward: grads of (x, w1, b1, ..., wp, bp), None where not needed",
        py::arg("grad_out"), py::arg("x"), py::arg("y"), py::arg("weights"), py::arg("needs"));
  m.def("inception_graph_forward", &inception_fast::inception_graph_forward,
        "Fused forward of a branch-graph (Inception-v3) block planned by ops/branch_graph.py",
        py::arg("x"), py::arg("buf_channels"), py::arg("buf_border"), py::arg("gemm_descs"),
        py::arg("b"), py::arg("bias"), py::arg("out_channels"), py::arg("stride"), py::arg("out") = py::none());
  m.def("inception_graph_forward_saving", &inception_fast::inception_graph_forward_saving,
        "inception_graph_forward, also returning the bordered intermediates the backward needs",
        py::arg("x"), py::arg("buf_channels"), py::arg("buf_border"), py::arg("gemm_descs"),
        py::arg("b"), py::arg("bias"), py::arg("out_channels"), py::arg("stride"));
  m.def("inception_graph_backward", &inception_fast::inception_graph_backward,
        "Fused backward of a branch-graph block: [dx, dW_0, db_0, ...], None where not needed",
        py::arg("grad_out"), py::arg("x"), py::arg("y"), py::arg("intermediates"), py::arg("weights"),
        py::arg("needs"), py::arg("plan"));
  m.def("pixel_offset", &inception_fast::pixel_offset,
        "Element offset of pixel (n, h, w) in an NHWC plane, as the kernels compute it",
        py::arg("stride_n"), py::arg("stride_h"), py::arg("stride_w"), py::arg("pad"),
        py::arg("n"), py::arg("h"), py::arg("w"));
  m.def("panel_width", [](at::ScalarType dtype) { return inception_fast::panel_width(dtype); },
        "Columns per packed weight panel for a dtype", py::arg("dtype"));
}
