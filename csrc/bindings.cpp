// Python bindings of the CPU kernels: inception_fast._C.
#include "gemm.h"
#include "inception_cpu.h"
#include "nhwc.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "inception_fast CPU kernels (NHWC): the fused branch-graph forward and backward";
  m.def("inception_graph_forward", &inception_fast::inception_graph_forward,
        "Fused forward of a branch-graph block planned by inception_fast/ops/plan.py",
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
