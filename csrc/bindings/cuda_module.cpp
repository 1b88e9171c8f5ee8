// pybind11 module msdnet_ops._cuda_kernels: thin wrappers over the CUDA launchers. Compiled by
// the plain C++ compiler (no CUDA or torch headers); streams arrive as integers
// (torch.cuda.current_stream().cuda_stream), devices as indices.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "msdnet_ops/cuda_kernels.h"
#include "views.h"

namespace py = pybind11;
using namespace msdnet_ops;
using bindings::to_vec;
using bindings::to_view;
using bindings::VecArg;
using bindings::ViewArg;

namespace {
void* as_ptr(uintptr_t v) { return reinterpret_cast<void*>(v); }
}  // namespace

PYBIND11_MODULE(_cuda_kernels, m) {
  m.doc() = "msdnet_ops CUDA kernels. Views are (ptr, N, C, H, W, sN, sC, sH, sW) tuples, "
            "per-channel vectors (ptr, stride); dtype codes: 0 float32, 1 float64, 2 float16, "
            "3 bfloat16; stream: a cudaStream_t as an integer.";

  m.def("reduction_workspace_bytes",
        [](int dtype, ViewArg x, int device) {
          return cuda::reduction_workspace_bytes(dtype, to_view(x, "x"), device);
        },
        py::arg("dtype"), py::arg("x"), py::arg("device"));

  m.def("channel_stats",
        [](int dtype, ViewArg x, double eps, VecArg mean, VecArg invstd, uintptr_t workspace,
           int64_t workspace_bytes, int device, uintptr_t stream) {
          const View4 xv = to_view(x, "x");
          py::gil_scoped_release nogil;
          cuda::channel_stats(dtype, xv, eps, to_vec(mean), to_vec(invstd), as_ptr(workspace),
                              workspace_bytes, device, as_ptr(stream));
        },
        py::arg("dtype"), py::arg("x"), py::arg("eps"), py::arg("mean"), py::arg("invstd"),
        py::arg("workspace"), py::arg("workspace_bytes"), py::arg("device"), py::arg("stream"));

  m.def("channel_stats_backward",
        [](int dtype, ViewArg x, VecArg mean, VecArg invstd, VecArg grad_mean, VecArg grad_invstd,
           ViewArg grad_x, int device, uintptr_t stream) {
          const View4 xv = to_view(x, "x"), gv = to_view(grad_x, "grad_x");
          py::gil_scoped_release nogil;
          cuda::channel_stats_backward(dtype, xv, to_vec(mean), to_vec(invstd), to_vec(grad_mean),
                                       to_vec(grad_invstd), gv, device, as_ptr(stream));
        },
        py::arg("dtype"), py::arg("x"), py::arg("mean"), py::arg("invstd"), py::arg("grad_mean"),
        py::arg("grad_invstd"), py::arg("grad_x"), py::arg("device"), py::arg("stream"));

  m.def("affine_relu",
        [](int dtype, ViewArg x, VecArg scale, VecArg shift, ViewArg out, int device,
           uintptr_t stream) {
          const View4 xv = to_view(x, "x"), ov = to_view(out, "out");
          py::gil_scoped_release nogil;
          cuda::affine_relu(dtype, xv, to_vec(scale), to_vec(shift), ov, device, as_ptr(stream));
        },
        py::arg("dtype"), py::arg("x"), py::arg("scale"), py::arg("shift"), py::arg("out"),
        py::arg("device"), py::arg("stream"));

  m.def("affine_relu_backward",
        [](int dtype, ViewArg x, VecArg scale, VecArg shift, ViewArg grad_z, ViewArg grad_x,
           VecArg grad_scale, VecArg grad_shift, bool accumulate, uintptr_t workspace,
           int64_t workspace_bytes, int device, uintptr_t stream) {
          const View4 xv = to_view(x, "x"), zv = to_view(grad_z, "grad_z"),
                      gv = to_view(grad_x, "grad_x");
          py::gil_scoped_release nogil;
          cuda::affine_relu_backward(dtype, xv, to_vec(scale), to_vec(shift), zv, gv,
                                     to_vec(grad_scale), to_vec(grad_shift), accumulate,
                                     as_ptr(workspace), workspace_bytes, device, as_ptr(stream));
        },
        py::arg("dtype"), py::arg("x"), py::arg("scale"), py::arg("shift"), py::arg("grad_z"),
        py::arg("grad_x"), py::arg("grad_scale"), py::arg("grad_shift"), py::arg("accumulate"),
        py::arg("workspace"), py::arg("workspace_bytes"), py::arg("device"), py::arg("stream"));

  m.def("gather_batch",
        [](int element_size, ViewArg src, uintptr_t index, ViewArg out, int device,
           uintptr_t stream) {
          const View4 sv = to_view(src, "src"), ov = to_view(out, "out");
          py::gil_scoped_release nogil;
          cuda::gather_batch(element_size, sv, static_cast<const int64_t*>(as_ptr(index)), ov,
                             device, as_ptr(stream));
        },
        py::arg("element_size"), py::arg("src"), py::arg("index"), py::arg("out"),
        py::arg("device"), py::arg("stream"));

  m.def("device_count", &cuda::device_count, "CUDA devices visible (0 without a driver)");
  m.def("runtime_description", &cuda::runtime_description);
}
