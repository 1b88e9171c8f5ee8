// Host helpers of the CUDA module: device properties, scratch sizes, version strings.
#include <mutex>
#include <string>
#include <vector>

#include "common.cuh"
#include "msdnet_ops/cuda_kernels.h"

namespace msdnet_ops {
namespace cuda {
namespace detail {

int sm_count(int device) {
  static std::mutex mu;
  static std::vector<int> cache;
  std::lock_guard<std::mutex> lock(mu);
  if (device < 0) check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  if (device >= static_cast<int>(cache.size())) cache.resize(device + 1, 0);
  if (cache[device] == 0) {
    int n = 0;
    check_cuda(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device),
               "cudaDeviceGetAttribute(MultiProcessorCount)");
    cache[device] = std::max(n, 1);
  }
  return cache[device];
}

}  // namespace detail

int64_t reduction_workspace_bytes(int dtype, const View4& x, int device) {
  // Both mappings are sized (a call's mapping also depends on its other views' strides).
  View4 v = x;
  View4* views[] = {&v};
  detail::merge_views(views, 1);
  const int64_t P = v.N * v.H * v.W;
  const int sms = detail::sm_count(device);
  int64_t splits = 1;
  for (bool ci : {false, true}) {
    const int64_t grid_x = ci ? detail::ceil_div(v.C, detail::kTileC) : v.C;
    splits = std::max(splits, detail::plan_splits(ci, P, grid_x, true, sms));
  }
  const int64_t acc = dtype == kFloat64 ? int64_t(sizeof(double)) : int64_t(sizeof(float));
  return splits * v.C * 3 * acc;  // one Welford<Acc> (or two sums) per (split, channel)
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error state of this thread
    return 0;
  }
  return n;
}

std::string runtime_description() {
  int rt = 0, drv = 0;
  cudaRuntimeGetVersion(&rt);
  if (cudaDriverGetVersion(&drv) != cudaSuccess) drv = 0;
  cudaGetLastError();
  std::string s = "CUDA runtime " + std::to_string(rt / 1000) + "." + std::to_string((rt % 1000) / 10);
  s += drv ? ", driver " + std::to_string(drv / 1000) + "." + std::to_string((drv % 1000) / 10)
           : ", no driver";
#if defined(MSDNET_OPS_CUDA_ARCHS)
  s += ", built for " MSDNET_OPS_CUDA_ARCHS;
#endif
  return s;
}

}  // namespace cuda
}  // namespace msdnet_ops
