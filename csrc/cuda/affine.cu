// affine_relu (z = relu(scale*x + shift)) and its accumulated backward. The backward's
// per-channel sums are reduced per block, written as (split, channel) partials and added to
// grad_scale / grad_shift in a fixed order by a second kernel: deterministic, no atomics.
#include <type_traits>

#include "common.cuh"
#include "dispatch.cuh"
#include "msdnet_ops/cuda_kernels.h"

namespace msdnet_ops {
namespace cuda {
namespace detail {

template <typename T, bool CI>
__global__ void __launch_bounds__(kThreads)
affine_relu_kernel(View4 x, View4 out, PixelIndexer ix, uint32_t P, VecView scale, VecView shift) {
  using Acc = acc_t<T>;
  int64_t c;
  uint32_t q0, step;
  if (!thread_work<CI>(x.C, c, q0, step)) return;
  const Acc s = vec_get<Acc>(scale, c), b = vec_get<Acc>(shift, c);
  const T* __restrict__ xc = static_cast<const T*>(x.ptr) + c * x.sC;
  T* __restrict__ oc = static_cast<T*>(out.ptr) + c * out.sC;
  for (uint32_t q = q0; q < P; q += step) {
    uint32_t n, h, w;
    ix(q, n, h, w);
    oc[pixel_offset(out, n, h, w)] =
        from_acc<T>(affine_relu_value(to_acc<Acc>(xc[pixel_offset(x, n, h, w)]), s, b));
  }
}

template <typename T, bool CI, bool ACC>
__global__ void __launch_bounds__(kThreads)
affine_relu_backward_kernel(View4 x, View4 gz, View4 gx, PixelIndexer ix, uint32_t P,
                            VecView scale, VecView shift, acc_t<T>* __restrict__ partial) {
  using Acc = acc_t<T>;
  int64_t c;
  uint32_t q0, step;
  const bool active = thread_work<CI>(x.C, c, q0, step);
  Acc ds = Acc(0), dh = Acc(0);
  if (active) {
    const Acc s = vec_get<Acc>(scale, c), b = vec_get<Acc>(shift, c);
    const T* __restrict__ xc = static_cast<const T*>(x.ptr) + c * x.sC;
    const T* __restrict__ zc = static_cast<const T*>(gz.ptr) + c * gz.sC;
    T* __restrict__ gc = static_cast<T*>(gx.ptr) + c * gx.sC;
    for (uint32_t q = q0; q < P; q += step) {
      uint32_t n, h, w;
      ix(q, n, h, w);
      const Acc xv = to_acc<Acc>(xc[pixel_offset(x, n, h, w)]);
      const Acc d = affine_relu_dpre(xv, s, b, to_acc<Acc>(zc[pixel_offset(gz, n, h, w)]));
      T& g = gc[pixel_offset(gx, n, h, w)];
      g = from_acc<T>(ACC ? to_acc<Acc>(g) + s * d : s * d);
      ds += d * xv;
      dh += d;
    }
  }
  block_sum2<CI>(ds, dh);
  if (active && block_result_thread<CI>()) {
    const int64_t i = int64_t(blockIdx.y) * x.C + c;
    partial[2 * i] = ds;
    partial[2 * i + 1] = dh;
  }
}

template <typename Acc>
__global__ void sum_partials_kernel(const Acc* __restrict__ partial, int64_t splits, int64_t C,
                                    VecView grad_scale, VecView grad_shift) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  Acc ds = Acc(0), dh = Acc(0);
  for (int64_t k = 0; k < splits; ++k) {
    ds += partial[2 * (k * C + c)];
    dh += partial[2 * (k * C + c) + 1];
  }
  vec_ref<Acc>(grad_scale, c) += ds;
  vec_ref<Acc>(grad_shift, c) += dh;
}

}  // namespace detail

void affine_relu(int dtype, const View4& x_in, VecView scale, VecView shift, const View4& out_in,
                 int device, void* stream_ptr) {
  using namespace detail;
  if (x_in.C == 0 || pixels(x_in) == 0) return;
  DeviceGuard guard(device);
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  dispatch_float(dtype, "affine_relu", [&](auto tag) {
    using T = typename decltype(tag)::type;
    View4 x = x_in, out = out_in;
    View4* views[] = {&x, &out};
    const Plan p = make_plan("affine_relu", views, 2, false, device);
    if (p.channels_inner) {
      affine_relu_kernel<T, true><<<p.grid, p.block, 0, stream>>>(x, out, p.ix, p.P, scale, shift);
      check_launch("affine_relu (channels-inner)");
    } else {
      affine_relu_kernel<T, false><<<p.grid, p.block, 0, stream>>>(x, out, p.ix, p.P, scale, shift);
      check_launch("affine_relu (planes)");
    }
  });
}

void affine_relu_backward(int dtype, const View4& x_in, VecView scale, VecView shift,
                          const View4& gz_in, const View4& gx_in, VecView grad_scale,
                          VecView grad_shift, bool accumulate, void* workspace,
                          int64_t workspace_bytes, int device, void* stream_ptr) {
  using namespace detail;
  if (x_in.C == 0 || pixels(x_in) == 0) return;
  DeviceGuard guard(device);
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  dispatch_float(dtype, "affine_relu_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using Acc = acc_t<T>;
    View4 x = x_in, gz = gz_in, gx = gx_in;
    View4* views[] = {&x, &gz, &gx};
    const int64_t per_split = x.C * 2 * int64_t(sizeof(Acc));
    const int64_t max_splits = workspace_bytes / per_split;
    if (max_splits < 1)
      throw std::invalid_argument("msdnet_ops CUDA affine_relu_backward: workspace too small");
    const Plan p = make_plan("affine_relu_backward", views, 3, true, device, max_splits);
    Acc* partial = static_cast<Acc*>(workspace);
    const auto launch = [&](auto ci, auto acc) {
      affine_relu_backward_kernel<T, decltype(ci)::value, decltype(acc)::value>
          <<<p.grid, p.block, 0, stream>>>(x, gz, gx, p.ix, p.P, scale, shift, partial);
      check_launch(p.channels_inner ? "affine_relu_backward (channels-inner)"
                                    : "affine_relu_backward (planes)");
    };
    using Yes = std::true_type;
    using No = std::false_type;
    if (p.channels_inner)
      accumulate ? launch(Yes{}, Yes{}) : launch(Yes{}, No{});
    else
      accumulate ? launch(No{}, Yes{}) : launch(No{}, No{});
    const int threads = 128;
    sum_partials_kernel<Acc><<<unsigned(ceil_div(x.C, threads)), threads, 0, stream>>>(
        partial, p.splits, x.C, grad_scale, grad_shift);
    check_launch("affine_relu_backward_sum_partials");
  });
}

}  // namespace cuda
}  // namespace msdnet_ops
