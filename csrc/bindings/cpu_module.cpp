// pybind11 module msdnet_ops._cpu_kernels: thin wrappers over the CPU kernels (no torch).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <utility>
#include <vector>

#include "msdnet_ops/cpu_kernels.h"
#include "msdnet_ops/indexing.h"
#include "msdnet_ops/math.h"
#include "views.h"

namespace py = pybind11;
using namespace msdnet_ops;
using bindings::to_vec;
using bindings::RowsArg;
using bindings::to_rows;
using bindings::to_view;
using bindings::VecArg;
using bindings::ViewArg;

PYBIND11_MODULE(_cpu_kernels, m) {
  m.doc() = "msdnet_ops CPU kernels (OpenMP). Views are (ptr, N, C, H, W, sN, sC, sH, sW) "
            "tuples, per-channel vectors (ptr, stride); dtype codes: 0 float32, 1 float64.";

  m.def("channel_stats",
        [](int dtype, ViewArg x, double eps, VecArg mean, VecArg invstd, int num_threads) {
          const View4 xv = to_view(x, "x");
          py::gil_scoped_release nogil;
          cpu::channel_stats(dtype, xv, eps, to_vec(mean), to_vec(invstd), num_threads);
        },
        py::arg("dtype"), py::arg("x"), py::arg("eps"), py::arg("mean"), py::arg("invstd"),
        py::arg("num_threads") = 0);

  m.def("channel_stats_backward",
        [](int dtype, ViewArg x, VecArg mean, VecArg invstd, VecArg grad_mean, VecArg grad_invstd,
           ViewArg grad_x, int num_threads) {
          const View4 xv = to_view(x, "x"), gv = to_view(grad_x, "grad_x");
          py::gil_scoped_release nogil;
          cpu::channel_stats_backward(dtype, xv, to_vec(mean), to_vec(invstd), to_vec(grad_mean),
                                      to_vec(grad_invstd), gv, num_threads);
        },
        py::arg("dtype"), py::arg("x"), py::arg("mean"), py::arg("invstd"), py::arg("grad_mean"),
        py::arg("grad_invstd"), py::arg("grad_x"), py::arg("num_threads") = 0);

  m.def("affine_relu",
        [](int dtype, ViewArg x, VecArg scale, VecArg shift, ViewArg out, int num_threads) {
          const View4 xv = to_view(x, "x"), ov = to_view(out, "out");
          py::gil_scoped_release nogil;
          cpu::affine_relu(dtype, xv, to_vec(scale), to_vec(shift), ov, num_threads);
        },
        py::arg("dtype"), py::arg("x"), py::arg("scale"), py::arg("shift"), py::arg("out"),
        py::arg("num_threads") = 0);

  m.def("affine_relu_backward",
        [](int dtype, ViewArg x, VecArg scale, VecArg shift, ViewArg grad_z, ViewArg grad_x,
           VecArg grad_scale, VecArg grad_shift, bool accumulate, int num_threads) {
          const View4 xv = to_view(x, "x"), zv = to_view(grad_z, "grad_z"),
                      gv = to_view(grad_x, "grad_x");
          py::gil_scoped_release nogil;
          cpu::affine_relu_backward(dtype, xv, to_vec(scale), to_vec(shift), zv, gv,
                                    to_vec(grad_scale), to_vec(grad_shift), accumulate,
                                    num_threads);
        },
        py::arg("dtype"), py::arg("x"), py::arg("scale"), py::arg("shift"), py::arg("grad_z"),
        py::arg("grad_x"), py::arg("grad_scale"), py::arg("grad_shift"),
        py::arg("accumulate") = true, py::arg("num_threads") = 0);

  m.def("batchnorm_relu",
        [](int dtype, ViewArg y, double eps, int64_t weight_ptr, int64_t bias_ptr,
           int64_t stats_ptr, int64_t rows_ptr, ViewArg out, int num_threads) {
          const View4 yv = to_view(y, "y"), ov = to_view(out, "out");
          py::gil_scoped_release nogil;
          cpu::batchnorm_relu(dtype, yv, eps, bindings::to_ptr(weight_ptr),
                              bindings::to_ptr(bias_ptr), bindings::to_ptr(stats_ptr),
                              bindings::to_ptr(rows_ptr), ov, num_threads);
        },
        py::arg("dtype"), py::arg("y"), py::arg("eps"), py::arg("weight"), py::arg("bias"),
        py::arg("stats"), py::arg("rows"), py::arg("out"), py::arg("num_threads") = 0);

  m.def("batchnorm_relu_backward",
        [](int dtype, ViewArg y, int64_t stats_ptr, int64_t rows_ptr, int64_t weight_ptr,
           ViewArg grad_z, ViewArg grad_y, int64_t grad_params_ptr, int num_threads) {
          const View4 yv = to_view(y, "y"), zv = to_view(grad_z, "grad_z"),
                      gv = to_view(grad_y, "grad_y");
          py::gil_scoped_release nogil;
          cpu::batchnorm_relu_backward(dtype, yv, bindings::to_ptr(stats_ptr),
                                       bindings::to_ptr(rows_ptr), bindings::to_ptr(weight_ptr),
                                       zv, gv, bindings::to_ptr(grad_params_ptr), num_threads);
        },
        py::arg("dtype"), py::arg("y"), py::arg("stats"), py::arg("rows"), py::arg("weight"),
        py::arg("grad_z"), py::arg("grad_y"), py::arg("grad_params"),
        py::arg("num_threads") = 0);

  m.def("gather_batch",
        [](int element_size, ViewArg src, int64_t index_ptr, ViewArg out, int num_threads) {
          const View4 sv = to_view(src, "src"), ov = to_view(out, "out");
          const int64_t* index = reinterpret_cast<const int64_t*>(static_cast<uintptr_t>(index_ptr));
          py::gil_scoped_release nogil;
          cpu::gather_batch(element_size, sv, index, ov, num_threads);
        },
        py::arg("element_size"), py::arg("src"), py::arg("index"), py::arg("out"),
        py::arg("num_threads") = 0);

  m.def("pointwise_conv",
        [](int dtype, RowsArg x, int64_t w_ptr, int64_t n_out, int64_t bias_ptr, bool relu,
           RowsArg y, int num_threads) {
          const PointwiseRows xv = to_rows(x, "x"), yv = to_rows(y, "y");
          const void* w = reinterpret_cast<const void*>(static_cast<uintptr_t>(w_ptr));
          const void* bias = reinterpret_cast<const void*>(static_cast<uintptr_t>(bias_ptr));
          py::gil_scoped_release nogil;
          cpu::pointwise_conv(dtype, xv, w, n_out, bias, relu, yv, num_threads);
        },
        py::arg("dtype"), py::arg("x"), py::arg("w"), py::arg("n_out"), py::arg("bias"),
        py::arg("relu"), py::arg("y"), py::arg("num_threads") = 0);

  m.def("pointwise_conv_wgrad",
        [](int dtype, RowsArg x, RowsArg g, int64_t dw_ptr, int num_threads) {
          const PointwiseRows xv = to_rows(x, "x"), gv = to_rows(g, "g");
          void* dw = reinterpret_cast<void*>(static_cast<uintptr_t>(dw_ptr));
          py::gil_scoped_release nogil;
          cpu::pointwise_conv_wgrad(dtype, xv, gv, dw, num_threads);
        },
        py::arg("dtype"), py::arg("x"), py::arg("g"), py::arg("dw"), py::arg("num_threads") = 0);

  m.def("direct_conv",
        [](int dtype, ViewArg x, int64_t w_ptr, int64_t k, int64_t stride, int64_t pad,
           int64_t bias_ptr, bool relu, ViewArg y, int num_threads) {
          const View4 xv = to_view(x, "x"), yv = to_view(y, "y");
          const void* w = reinterpret_cast<const void*>(static_cast<uintptr_t>(w_ptr));
          const void* bias = reinterpret_cast<const void*>(static_cast<uintptr_t>(bias_ptr));
          py::gil_scoped_release nogil;
          cpu::direct_conv(dtype, xv, w, k, stride, pad, bias, relu, yv, num_threads);
        },
        py::arg("dtype"), py::arg("x"), py::arg("w"), py::arg("k"), py::arg("stride"),
        py::arg("pad"), py::arg("bias"), py::arg("relu"), py::arg("y"), py::arg("num_threads") = 0);

  m.def("bottleneck_direct_conv",
        [](int dtype, ViewArg x, int64_t w1_ptr, int64_t mid, int64_t b1_ptr, int64_t w_ptr,
           int64_t k, int64_t stride, int64_t pad, int64_t bias_ptr, bool relu, ViewArg y,
           int num_threads) {
          const View4 xv = to_view(x, "x"), yv = to_view(y, "y");
          auto ptr = [](int64_t p) { return reinterpret_cast<const void*>(static_cast<uintptr_t>(p)); };
          py::gil_scoped_release nogil;
          cpu::bottleneck_direct_conv(dtype, xv, ptr(w1_ptr), mid, ptr(b1_ptr), ptr(w_ptr), k,
                                      stride, pad, ptr(bias_ptr), relu, yv, num_threads);
        },
        py::arg("dtype"), py::arg("x"), py::arg("w1"), py::arg("mid"), py::arg("b1"),
        py::arg("w"), py::arg("k"), py::arg("stride"), py::arg("pad"), py::arg("bias"),
        py::arg("relu"), py::arg("y"), py::arg("num_threads") = 0);

  m.def("direct_wgrad",
        [](int dtype, ViewArg x, ViewArg g, int64_t k, int64_t stride, int64_t pad, int64_t dw_ptr,
           int num_threads) {
          const View4 xv = to_view(x, "x"), gv = to_view(g, "g");
          void* dw = reinterpret_cast<void*>(static_cast<uintptr_t>(dw_ptr));
          py::gil_scoped_release nogil;
          cpu::direct_wgrad(dtype, xv, gv, k, stride, pad, dw, num_threads);
        },
        py::arg("dtype"), py::arg("x"), py::arg("g"), py::arg("k"), py::arg("stride"),
        py::arg("pad"), py::arg("dw"), py::arg("num_threads") = 0);

  m.def("direct_dgrad",
        [](int dtype, ViewArg g, int64_t w_ptr, int64_t k, int64_t stride, int64_t pad, ViewArg dx,
           int num_threads) {
          const View4 gv = to_view(g, "g"), dxv = to_view(dx, "dx");
          const void* w = reinterpret_cast<const void*>(static_cast<uintptr_t>(w_ptr));
          py::gil_scoped_release nogil;
          cpu::direct_dgrad(dtype, gv, w, k, stride, pad, dxv, num_threads);
        },
        py::arg("dtype"), py::arg("g"), py::arg("w"), py::arg("k"), py::arg("stride"),
        py::arg("pad"), py::arg("dx"), py::arg("num_threads") = 0);

  m.def("compiled_isas", &cpu::compiled_isas, "instruction-set variants compiled in");
  m.def("supported_isas", &cpu::supported_isas, "variants compiled in that this CPU runs");
  m.def("current_isa", &cpu::current_isa, "the variant in use");
  m.def("set_isa", &cpu::set_isa, py::arg("name"), "use another variant (tests, benchmarks)");

  // The host-device helpers the CUDA kernels use, exposed so CPU tests cover them.
  m.def("_fastdivmod",
        [](uint32_t divisor, const std::vector<uint32_t>& xs) {
          const FastDivmod fd(divisor);
          std::vector<std::pair<uint32_t, uint32_t>> out;
          out.reserve(xs.size());
          for (uint32_t x : xs) {
            uint32_t q, r;
            fd.divmod(x, q, r);
            out.emplace_back(q, r);
          }
          return out;
        },
        py::arg("divisor"), py::arg("xs"));
  m.def("_pixel_index",
        [](uint32_t H, uint32_t W, const std::vector<uint32_t>& qs) {
          const PixelIndexer ix(H, W);
          std::vector<std::array<uint32_t, 3>> out;
          for (uint32_t q : qs) {
            uint32_t n, h, w;
            ix(q, n, h, w);
            out.push_back({n, h, w});
          }
          return out;
        },
        py::arg("H"), py::arg("W"), py::arg("qs"));
  m.def("_welford",
        [](const std::vector<double>& values, size_t split) {
          // Welford over values[:split] and values[split:], merged with Chan's formula, in the
          // float accumulation the GPU uses for float32/float16/bfloat16 and in double.
          Welford<float> af = welford_empty<float>(), bf = welford_empty<float>();
          Welford<double> ad = welford_empty<double>(), bd = welford_empty<double>();
          for (size_t i = 0; i < values.size(); ++i) {
            welford_push(i < split ? af : bf, static_cast<float>(values[i]));
            welford_push(i < split ? ad : bd, values[i]);
          }
          const Welford<float> f = welford_merge(af, bf);
          const Welford<double> d = welford_merge(ad, bd);
          return std::make_pair(std::array<double, 3>{f.n, f.mean, f.m2},
                                std::array<double, 3>{d.n, d.mean, d.m2});
        },
        py::arg("values"), py::arg("split"));
}
