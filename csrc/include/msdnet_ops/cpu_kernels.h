// CPU kernels (OpenMP). Every function takes raw pointers, sizes and strides (elements) through
// View4 / VecView; all feature views of one call share N, C, H, W (gather: C, H, W).
// dtype: kFloat32 or kFloat64 (per-channel vectors in the same dtype). num_threads <= 0 uses
// OpenMP's default.
#pragma once

#include <string>
#include <vector>

#include "msdnet_ops/tensor_view.h"

#define MSDNET_CPU_KERNEL_DECLS                                                               \
  /* mean[c], invstd[c] of x over (N, H, W): biased variance, invstd = 1/sqrt(var + eps). */  \
  void channel_stats(int dtype, const View4& x, double eps, VecView mean, VecView invstd,     \
                     int num_threads);                                                        \
  /* grad_x += grad_mean/n - grad_invstd*(x-mean)*invstd^3/n. */                              \
  void channel_stats_backward(int dtype, const View4& x, VecView mean, VecView invstd,        \
                              VecView grad_mean, VecView grad_invstd, const View4& grad_x,    \
                              int num_threads);                                               \
  /* out = relu(scale*x + shift). */                                                          \
  void affine_relu(int dtype, const View4& x, VecView scale, VecView shift, const View4& out, \
                   int num_threads);                                                          \
  /* dpre = grad_z*(scale*x+shift > 0): grad_x += scale*dpre (accumulate) or = (not: grad_x  \
     is never read), grad_scale += sum(dpre*x), grad_shift += sum(dpre). */                   \
  void affine_relu_backward(int dtype, const View4& x, VecView scale, VecView shift,          \
                            const View4& grad_z, const View4& grad_x, VecView grad_scale,     \
                            VecView grad_shift, bool accumulate, int num_threads);            \
  /* out[i] = src[index[i]] (out.N = len(index)); element_size in bytes: 1, 2, 4 or 8. */    \
  void gather_batch(int element_size, const View4& src, const int64_t* index,                 \
                    const View4& out, int num_threads);                                       \
  /* y[p, o] = act(sum_k x[p, k] * w[o, k] + bias[o]) for 1 <= N <= 64 outputs; w: [N, K]   \
     dense, bias: [N] or null, act: ReLU (NaN kept) if relu, else identity. */               \
  void pointwise_conv(int dtype, const PointwiseRows& x, const void* w, int64_t N,            \
                      const void* bias, bool relu, const PointwiseRows& y, int num_threads); \
  /* dw[o, k] = sum_p g[p, o] * x[p, k] for 1 <= N <= 32 outputs; dw: [N, K] dense. */        \
  void pointwise_conv_wgrad(int dtype, const PointwiseRows& x, const PointwiseRows& g,        \
                            void* dw, int num_threads);                                       \
  /* y = act(conv2d(x, w, bias, stride, pad)) for a k x k kernel and 1 <= y.C <= 64 outputs;  \
     x, y: channels-inner (NHWC) views; w: [y.C, k, k, x.C] dense, bias: [y.C] or null. */   \
  void direct_conv(int dtype, const View4& x, const void* w, int64_t k, int64_t stride,       \
                   int64_t pad, const void* bias, bool relu, const View4& y, int num_threads); \
  /* The same on relu(conv1x1(x, w1) + b1), 1 <= mid <= 32 bottleneck channels computed as   \
     the rows are needed (never stored): w1: [mid, x.C] dense, b1: [mid]; w: [y.C, k, k, mid]. */ \
  void bottleneck_direct_conv(int dtype, const View4& x, const void* w1, int64_t mid,         \
                              const void* b1, const void* w, int64_t k, int64_t stride,       \
                              int64_t pad, const void* bias, bool relu, const View4& y,       \
                              int num_threads);                                               \
  /* dw[o, ky, kx, c] = sum g[n, oh, ow, o] * x[n, oh*stride-pad+ky, ow*stride-pad+kx, c]:    \
     direct_conv's weight gradient for 1 <= g.C <= 64 outputs; x, g: channels-inner views;   \
     dw: [g.C, k, k, x.C] dense; summed in a fixed order (the same for any thread count). */ \
  void direct_wgrad(int dtype, const View4& x, const View4& g, int64_t k, int64_t stride,     \
                    int64_t pad, void* dw, int num_threads);                                  \
  /* dx = the input gradient of conv2d(x, w, stride, pad) for g (its output's gradient), for \
     1 <= dx.C <= 64 input channels and pad < k; g, dx: channels-inner views (dx written);   \
     w: [g.C, dx.C, k, k] dense. */                                                           \
  void direct_dgrad(int dtype, const View4& g, const void* w, int64_t k, int64_t stride,      \
                    int64_t pad, const View4& dx, int num_threads);

namespace msdnet_ops {
namespace cpu {

// The dispatching entry points (pick the widest instruction set this CPU supports).
MSDNET_CPU_KERNEL_DECLS

// A training-mode BatchNorm then ReLU, one call (csrc/cpu/batchnorm_relu.cpp): stats rows
// (mean, invstd) = batch statistics of y; rows (scale, shift) = weight*invstd, bias-mean*scale
// (weight, bias: [C] or null for 1, 0); out = relu(scale*y+shift). stats, rows: dense [2, C].
void batchnorm_relu(int dtype, const View4& y, double eps, const void* weight, const void* bias,
                    void* stats, void* rows, const View4& out, int num_threads);
// Its backward: grad_y (written, never read) = the whole gradient w.r.t. y for grad_z w.r.t.
// out; grad_params rows (written) = (grad_weight, grad_bias). grad_params: dense [2, C].
void batchnorm_relu_backward(int dtype, const View4& y, const void* stats, const void* rows,
                             const void* weight, const View4& grad_z, const View4& grad_y,
                             void* grad_params, int num_threads);

// Instruction-set variants compiled into this module, the one in use, and a switch (tests).
std::vector<std::string> compiled_isas();
std::vector<std::string> supported_isas();  // compiled and runnable on this CPU
std::string current_isa();
void set_isa(const std::string& name);      // throws std::invalid_argument if unsupported

namespace isa_baseline { MSDNET_CPU_KERNEL_DECLS }
#if defined(MSDNET_OPS_HAVE_AVX2)
namespace isa_avx2 { MSDNET_CPU_KERNEL_DECLS }
#endif
#if defined(MSDNET_OPS_HAVE_AVX512)
namespace isa_avx512 { MSDNET_CPU_KERNEL_DECLS }
#endif

}  // namespace cpu
}  // namespace msdnet_ops
