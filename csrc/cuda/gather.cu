// gather_batch: out[i] = src[index[i]] along N (batch compaction for early exit). Copies
// elements bit for bit, so one kernel per element size serves every dtype.
#include <cstdint>

#include "common.cuh"
#include "msdnet_ops/cuda_kernels.h"

namespace msdnet_ops {
namespace cuda {
namespace detail {

template <typename E, bool CI>
__global__ void __launch_bounds__(kThreads)
gather_kernel(View4 src, View4 out, const int64_t* __restrict__ index, PixelIndexer ix, uint32_t P) {
  int64_t c;
  uint32_t q0, step;
  if (!thread_work<CI>(out.C, c, q0, step)) return;
  const E* __restrict__ sc = static_cast<const E*>(src.ptr) + c * src.sC;
  E* __restrict__ oc = static_cast<E*>(out.ptr) + c * out.sC;
  for (uint32_t q = q0; q < P; q += step) {
    uint32_t i, h, w;
    ix(q, i, h, w);
    oc[pixel_offset(out, i, h, w)] = sc[pixel_offset(src, index[i], h, w)];
  }
}

template <typename E>
void launch_gather(const Plan& p, const View4& src, const View4& out, const int64_t* index,
                   cudaStream_t stream) {
  if (p.channels_inner) {
    gather_kernel<E, true><<<p.grid, p.block, 0, stream>>>(src, out, index, p.ix, p.P);
    check_launch("gather_batch (channels-inner)");
  } else {
    gather_kernel<E, false><<<p.grid, p.block, 0, stream>>>(src, out, index, p.ix, p.P);
    check_launch("gather_batch (planes)");
  }
}

}  // namespace detail

void gather_batch(int element_size, const View4& src_in, const int64_t* index, const View4& out_in,
                  int device, void* stream_ptr) {
  using namespace detail;
  if (out_in.C == 0 || pixels(out_in) == 0) return;
  DeviceGuard guard(device);
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  View4 out = out_in, src = src_in;
  // The plan is made on out's shape (N = len(index)); src shares C, H, W and strides decide.
  View4 src_shaped = src;
  src_shaped.N = out.N;
  View4* views[] = {&out, &src_shaped};
  const Plan p = make_plan("gather_batch", views, 2, false, device);
  src_shaped.N = src.N;
  switch (element_size) {
    case 2: return launch_gather<uint16_t>(p, src_shaped, out, index, stream);
    case 4: return launch_gather<uint32_t>(p, src_shaped, out, index, stream);
    case 8: return launch_gather<uint64_t>(p, src_shaped, out, index, stream);
    default:
      throw std::invalid_argument("msdnet_ops CUDA gather_batch: element size " +
                                  std::to_string(element_size) + " (expected 2, 4 or 8)");
  }
}

}  // namespace cuda
}  // namespace msdnet_ops
