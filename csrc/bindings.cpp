// The CPU kernels as PyTorch operators (TORCH_LIBRARY), so that the dispatcher, torch.compile,
// torch.export and AOTInductor packages call them by name (an AOTInductor package needs
// only this library loaded: `import inception_fast` or torch.ops.load_library), and the
// Python module inception_fast._C that loads them, with two helpers the tests use.
//
// Schemas are the contract with inception_fast/ops/branch_graph.py, which registers the
// fake (meta) kernels, the autograd formulas and the FLOP counts over these names.
#include "gemm.h"
#include "inception_cpu.h"
#include "nhwc.h"

#include <torch/library.h>

TORCH_LIBRARY(inception_fast, m) {
  // Where the fake kernels live: torch imports it when it needs them and it is not loaded.
  m.set_python_module("inception_fast.ops.branch_graph");
  m.def("graph_forward(Tensor x, Tensor[] b, Tensor[] bias, int[] flat_plan) -> Tensor");
  m.def("graph_forward.out(Tensor x, Tensor[] b, Tensor[] bias, int[] flat_plan, *, Tensor(a!) out) -> Tensor(a!)");
  m.def("graph_forward_linear(Tensor x, Tensor[] b, Tensor[] bias, int[] flat_plan) -> Tensor");
  m.def("graph_forward_saving(Tensor x, Tensor[] b, Tensor[] bias, int[] flat_plan) -> (Tensor, Tensor[])");
  m.def("graph_forward_bn_train(Tensor x, Tensor[] b, Tensor[] bias, Tensor[] bn_params, int[] flat_plan) -> "
        "(Tensor, Tensor[], Tensor[], Tensor[])");
  m.def("relu_batch_norm_backward(Tensor grad, Tensor? y, Tensor z, Tensor mean, Tensor invstd, Tensor? weight, "
        "Tensor? alpha=None, Tensor? shift=None) -> (Tensor, Tensor, Tensor)");
  m.def("relu_batch_norm_backward_into(Tensor grad, Tensor? y, Tensor z, Tensor mean, Tensor invstd, "
        "Tensor? weight, Tensor? alpha, Tensor? shift, Tensor(a!) out) -> (Tensor, Tensor)");
  m.def("max_pool3x3_scatter(Tensor x, Tensor? d_pooled, Tensor(a!)? dx) -> Tensor");
  m.def("pack_winograd_cpu(Tensor w, Tensor transform, int width, bool flip) -> Tensor");
  m.def("winograd_weight_grad(Tensor x, Tensor grad, int padding, int tile, int kh=3, int kw=3, "
        "bool channels_last=False) -> Tensor");
  m.def("graph_backward_cpu(Tensor grad_out, Tensor x, Tensor y, Tensor[] intermediates, Tensor[] weights, "
        "bool needs_x, bool needs_weights, int[] backward_plan) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(inception_fast, CPU, m) {
  m.impl("graph_forward", &inception_fast::inception_graph_forward);
  m.impl("graph_forward.out", &inception_fast::inception_graph_forward_out);
  m.impl("graph_forward_linear", &inception_fast::inception_graph_forward_linear);
  m.impl("graph_forward_saving", &inception_fast::inception_graph_forward_saving);
  m.impl("graph_forward_bn_train", &inception_fast::inception_graph_forward_bn_train);
  m.impl("relu_batch_norm_backward", &inception_fast::relu_batch_norm_backward);
  m.impl("relu_batch_norm_backward_into", &inception_fast::relu_batch_norm_backward_out);
  m.impl("max_pool3x3_scatter", &inception_fast::max_pool3x3_scatter);
  m.impl("pack_winograd_cpu", &inception_fast::pack_winograd_cpu);
  m.impl("winograd_weight_grad", &inception_fast::winograd_weight_grad);
  m.impl("graph_backward_cpu", &inception_fast::inception_graph_backward);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "inception_fast CPU kernels (NHWC); the operators are torch.ops.inception_fast.*";
  m.def("pixel_offset", &inception_fast::pixel_offset,
        "Element offset of pixel (n, h, w) in an NHWC plane, as the kernels compute it",
        py::arg("stride_n"), py::arg("stride_h"), py::arg("stride_w"), py::arg("pad"),
        py::arg("n"), py::arg("h"), py::arg("w"));
  m.def("panel_width", [](at::ScalarType dtype) { return inception_fast::panel_width(dtype); },
        "Columns per packed weight panel for a dtype", py::arg("dtype"));
  m.def("bf16_path", [] { return std::string(inception_fast::bf16::kPath); },
        "How this build's bf16 GEMM multiplies: AVX512-BF16 dot products or widened fp32 FMAs");
}
