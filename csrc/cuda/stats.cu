// channel_stats (Welford per thread, Chan merges in a fixed order: deterministic) and its
// backward (elementwise, accumulated into grad_x).
#include "common.cuh"
#include "dispatch.cuh"
#include "msdnet_ops/cuda_kernels.h"

namespace msdnet_ops {
namespace cuda {
namespace detail {

// Per (split, channel) statistics of the pixels this block visits.
template <typename T, bool CI>
__global__ void __launch_bounds__(kThreads)
stats_partial_kernel(View4 x, PixelIndexer ix, uint32_t P, Welford<acc_t<T>>* __restrict__ partial) {
  using Acc = acc_t<T>;
  int64_t c;
  uint32_t q0, step;
  const bool active = thread_work<CI>(x.C, c, q0, step);
  Welford<Acc> st = welford_empty<Acc>();
  if (active) {
    const T* __restrict__ xc = static_cast<const T*>(x.ptr) + c * x.sC;
    for (uint32_t q = q0; q < P; q += step) {
      uint32_t n, h, w;
      ix(q, n, h, w);
      welford_push(st, to_acc<Acc>(xc[pixel_offset(x, n, h, w)]));
    }
  }
  st = block_merge<CI>(st);
  if (active && block_result_thread<CI>()) partial[int64_t(blockIdx.y) * x.C + c] = st;
}

// Merges the splits of each channel in order; writes mean and invstd.
template <typename Acc>
__global__ void stats_finalize_kernel(const Welford<Acc>* __restrict__ partial, int64_t splits,
                                      int64_t C, Acc eps, VecView mean, VecView invstd) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  Welford<Acc> s = welford_empty<Acc>();
  for (int64_t k = 0; k < splits; ++k) s = welford_merge(s, partial[k * C + c]);
  vec_ref<Acc>(mean, c) = welford_mean(s);
  vec_ref<Acc>(invstd, c) = invstd_from_m2(s.m2, s.n, eps);
}

template <typename T, bool CI>
__global__ void __launch_bounds__(kThreads)
stats_backward_kernel(View4 x, View4 gx, PixelIndexer ix, uint32_t P, VecView mean, VecView invstd,
                      VecView grad_mean, VecView grad_invstd, acc_t<T> count) {
  using Acc = acc_t<T>;
  int64_t c;
  uint32_t q0, step;
  if (!thread_work<CI>(x.C, c, q0, step)) return;
  const StatsBackwardCoef<Acc> k = stats_backward_coef<Acc>(
      vec_get<Acc>(mean, c), vec_get<Acc>(invstd, c), vec_get<Acc>(grad_mean, c),
      vec_get<Acc>(grad_invstd, c), count);
  const T* __restrict__ xc = static_cast<const T*>(x.ptr) + c * x.sC;
  T* __restrict__ gc = static_cast<T*>(gx.ptr) + c * gx.sC;
  for (uint32_t q = q0; q < P; q += step) {
    uint32_t n, h, w;
    ix(q, n, h, w);
    T& g = gc[pixel_offset(gx, n, h, w)];
    const Acc v = stats_backward_value(to_acc<Acc>(xc[pixel_offset(x, n, h, w)]), k.a, k.b, k.mean);
    g = from_acc<T>(to_acc<Acc>(g) + v);
  }
}

}  // namespace detail

void channel_stats(int dtype, const View4& x_in, double eps, VecView mean, VecView invstd,
                   void* workspace, int64_t workspace_bytes, int device, void* stream_ptr) {
  using namespace detail;
  if (x_in.C == 0) return;
  DeviceGuard guard(device);
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  dispatch_float(dtype, "channel_stats", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using Acc = acc_t<T>;
    View4 x = x_in;
    View4* views[] = {&x};
    const int64_t per_split = x.C * int64_t(sizeof(Welford<Acc>));
    const int64_t max_splits = workspace_bytes / per_split;
    if (max_splits < 1)
      throw std::invalid_argument("msdnet_ops CUDA channel_stats: workspace too small");
    const Plan p = make_plan("channel_stats", views, 1, true, device, max_splits);
    auto* partial = static_cast<Welford<Acc>*>(workspace);
    int64_t splits = p.splits;
    if (p.P == 0) {
      splits = 0;
    } else if (p.channels_inner) {
      stats_partial_kernel<T, true><<<p.grid, p.block, 0, stream>>>(x, p.ix, p.P, partial);
      check_launch("channel_stats_partial (channels-inner)");
    } else {
      stats_partial_kernel<T, false><<<p.grid, p.block, 0, stream>>>(x, p.ix, p.P, partial);
      check_launch("channel_stats_partial (planes)");
    }
    const int threads = 128;
    stats_finalize_kernel<Acc><<<unsigned(ceil_div(x.C, threads)), threads, 0, stream>>>(
        partial, splits, x.C, static_cast<Acc>(eps), mean, invstd);
    check_launch("channel_stats_finalize");
  });
}

void channel_stats_backward(int dtype, const View4& x_in, VecView mean, VecView invstd,
                            VecView grad_mean, VecView grad_invstd, const View4& gx_in,
                            int device, void* stream_ptr) {
  using namespace detail;
  if (x_in.C == 0 || pixels(x_in) == 0) return;
  DeviceGuard guard(device);
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  dispatch_float(dtype, "channel_stats_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    using Acc = acc_t<T>;
    View4 x = x_in, gx = gx_in;
    View4* views[] = {&x, &gx};
    const Plan p = make_plan("channel_stats_backward", views, 2, false, device);
    const Acc count = static_cast<Acc>(p.P);
    if (p.channels_inner) {
      stats_backward_kernel<T, true><<<p.grid, p.block, 0, stream>>>(
          x, gx, p.ix, p.P, mean, invstd, grad_mean, grad_invstd, count);
      check_launch("channel_stats_backward (channels-inner)");
    } else {
      stats_backward_kernel<T, false><<<p.grid, p.block, 0, stream>>>(
          x, gx, p.ix, p.P, mean, invstd, grad_mean, grad_invstd, count);
      check_launch("channel_stats_backward (planes)");
    }
  });
}

}  // namespace cuda
}  // namespace msdnet_ops
