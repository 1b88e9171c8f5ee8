// A training-mode BatchNorm followed by ReLU (a post-activation unit's epilogue) and its
// backward, each one call composed from the dispatching kernels: on the CPU the Python glue
// between the small per-unit steps (statistics, the BatchNorm's vectors, the transform; and
// back) cost more than the steps' arithmetic. Compiled once: the elementwise passes dispatch
// to the instruction-set variants themselves; the per-channel vector math here is O(C).
#include <vector>

#include "msdnet_ops/cpu_kernels.h"

namespace msdnet_ops {
namespace cpu {
namespace {

template <typename T>
VecView row(void* rows, int64_t r, int64_t C) {
  return VecView{static_cast<T*>(rows) + r * C, 1};
}

template <typename T>
T value_or(const void* v, int64_t c, T otherwise) {
  return v ? static_cast<const T*>(v)[c] : otherwise;
}

template <typename T>
void batchnorm_relu_t(int dtype, const View4& y, double eps, const void* weight, const void* bias,
                      void* stats, void* rows, const View4& out, int num_threads) {
  const int64_t C = y.C;
  const VecView mean = row<T>(stats, 0, C), invstd = row<T>(stats, 1, C);
  const VecView scale = row<T>(rows, 0, C), shift = row<T>(rows, 1, C);
  channel_stats(dtype, y, eps, mean, invstd, num_threads);
  for (int64_t c = 0; c < C; ++c) {  // as reference.bn_scale_shift_into
    const T s = value_or<T>(weight, c, T(1)) * vec_get<T>(invstd, c);
    vec_ref<T>(scale, c) = s;
    vec_ref<T>(shift, c) = value_or<T>(bias, c, T(0)) - vec_get<T>(mean, c) * s;
  }
  affine_relu(dtype, y, scale, shift, out, num_threads);
}

template <typename T>
void batchnorm_relu_backward_t(int dtype, const View4& y, const void* stats, const void* rows,
                               const void* weight, const View4& grad_z, const View4& grad_y,
                               void* grad_params, int num_threads) {
  const int64_t C = y.C;
  void* st = const_cast<void*>(stats);
  void* ro = const_cast<void*>(rows);
  const VecView mean = row<T>(st, 0, C), invstd = row<T>(st, 1, C);
  // (grad_scale, grad_shift), accumulated into; the statistics' (grad_mean, grad_invstd)
  std::vector<T> grads(2 * C, T(0)), stats_grads(2 * C);
  const VecView grad_scale = row<T>(grads.data(), 0, C), grad_shift = row<T>(grads.data(), 1, C);
  affine_relu_backward(dtype, y, row<T>(ro, 0, C), row<T>(ro, 1, C), grad_z, grad_y, grad_scale,
                       grad_shift, /*accumulate=*/false, num_threads);
  const VecView grad_mean = row<T>(stats_grads.data(), 0, C),
                grad_invstd = row<T>(stats_grads.data(), 1, C);
  const VecView grad_weight = row<T>(grad_params, 0, C), grad_bias = row<T>(grad_params, 1, C);
  for (int64_t c = 0; c < C; ++c) {  // as reference.bn_scale_shift_backward_ (written)
    const T m = vec_get<T>(mean, c), is = vec_get<T>(invstd, c);
    const T gs = vec_get<T>(grad_scale, c), gb = vec_get<T>(grad_shift, c);
    const T w = value_or<T>(weight, c, T(1));
    const T centred = gs - gb * m;
    vec_ref<T>(grad_weight, c) = is * centred;
    vec_ref<T>(grad_bias, c) = gb;
    vec_ref<T>(grad_invstd, c) = w * centred;
    vec_ref<T>(grad_mean, c) = -(gb * (w * is));
  }
  channel_stats_backward(dtype, y, mean, invstd, grad_mean, grad_invstd, grad_y, num_threads);
}

}  // namespace

void batchnorm_relu(int dtype, const View4& y, double eps, const void* weight, const void* bias,
                    void* stats, void* rows, const View4& out, int num_threads) {
  if (dtype == kFloat64)
    batchnorm_relu_t<double>(dtype, y, eps, weight, bias, stats, rows, out, num_threads);
  else
    batchnorm_relu_t<float>(dtype, y, eps, weight, bias, stats, rows, out, num_threads);
}

void batchnorm_relu_backward(int dtype, const View4& y, const void* stats, const void* rows,
                             const void* weight, const View4& grad_z, const View4& grad_y,
                             void* grad_params, int num_threads) {
  if (dtype == kFloat64)
    batchnorm_relu_backward_t<double>(dtype, y, stats, rows, weight, grad_z, grad_y, grad_params,
                                      num_threads);
  else
    batchnorm_relu_backward_t<float>(dtype, y, stats, rows, weight, grad_z, grad_y, grad_params,
                                     num_threads);
}

}  // namespace cpu
}  // namespace msdnet_ops
