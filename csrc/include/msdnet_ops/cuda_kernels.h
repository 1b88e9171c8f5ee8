// CUDA kernels: host launchers declared without any CUDA header, so the pybind11 bindings are
// compiled by the plain C++ compiler. Streams are passed as void* (a cudaStream_t), devices by
// index. Feature views of one call share N, C, H, W and dtype (gather: C, H, W).
// dtype codes: common.h (float32, float64, float16, bfloat16); per-channel vectors are float64
// for float64 features and float32 otherwise. Every launch is checked: failures throw
// std::runtime_error naming the kernel.
#pragma once

#include <cstdint>
#include <string>

#include "msdnet_ops/tensor_view.h"

namespace msdnet_ops {
namespace cuda {

// Bytes of scratch memory channel_stats / affine_relu_backward need for x on device.
int64_t reduction_workspace_bytes(int dtype, const View4& x, int device);

void channel_stats(int dtype, const View4& x, double eps, VecView mean, VecView invstd,
                   void* workspace, int64_t workspace_bytes, int device, void* stream);

void channel_stats_backward(int dtype, const View4& x, VecView mean, VecView invstd,
                            VecView grad_mean, VecView grad_invstd, const View4& grad_x,
                            int device, void* stream);

void affine_relu(int dtype, const View4& x, VecView scale, VecView shift, const View4& out,
                 int device, void* stream);

// accumulate: grad_x += scale*dpre; else grad_x = scale*dpre (grad_x never read).
void affine_relu_backward(int dtype, const View4& x, VecView scale, VecView shift,
                          const View4& grad_z, const View4& grad_x, VecView grad_scale,
                          VecView grad_shift, bool accumulate, void* workspace,
                          int64_t workspace_bytes, int device, void* stream);

// out[i] = src[index[i]] (index: device int64 array of out.N entries); element_size in bytes.
void gather_batch(int element_size, const View4& src, const int64_t* index, const View4& out,
                  int device, void* stream);

int device_count();                 // 0 when no driver / no device (never throws)
std::string runtime_description();  // CUDA runtime and driver versions, arch list compiled in

}  // namespace cuda
}  // namespace msdnet_ops
