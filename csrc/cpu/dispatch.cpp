// Runtime choice of the instruction-set variant of the CPU kernels (csrc/cpu/*.cpp are compiled
// once per variant). MSDNET_OPS_CPU_ISA=baseline|avx2|avx512 overrides the automatic choice.
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "msdnet_ops/cpu_kernels.h"

namespace msdnet_ops {
namespace cpu {
namespace {

enum class Isa { kBaseline, kAvx2, kAvx512 };

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
    default: return "baseline";
  }
}

bool compiled(Isa isa) {
  switch (isa) {
    case Isa::kBaseline: return true;
#if defined(MSDNET_OPS_HAVE_AVX2)
    case Isa::kAvx2: return true;
#endif
#if defined(MSDNET_OPS_HAVE_AVX512)
    case Isa::kAvx512: return true;
#endif
    default: return false;
  }
}

bool runs_here(Isa isa) {
  if (!compiled(isa)) return false;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (isa == Isa::kAvx2)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == Isa::kAvx512)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("fma");
#endif
  return isa == Isa::kBaseline;
}

bool parse(const std::string& name, Isa& out) {
  for (Isa isa : {Isa::kBaseline, Isa::kAvx2, Isa::kAvx512})
    if (name == isa_name(isa)) {
      out = isa;
      return true;
    }
  return false;
}

Isa detect() {
  if (const char* env = std::getenv("MSDNET_OPS_CPU_ISA")) {
    Isa isa;
    if (env[0] != '\0' && parse(env, isa) && runs_here(isa)) return isa;
  }
  for (Isa isa : {Isa::kAvx512, Isa::kAvx2})
    if (runs_here(isa)) return isa;
  return Isa::kBaseline;
}

Isa& active() {
  static Isa isa = detect();
  return isa;
}

}  // namespace

std::vector<std::string> compiled_isas() {
  std::vector<std::string> out;
  for (Isa isa : {Isa::kBaseline, Isa::kAvx2, Isa::kAvx512})
    if (compiled(isa)) out.push_back(isa_name(isa));
  return out;
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (Isa isa : {Isa::kBaseline, Isa::kAvx2, Isa::kAvx512})
    if (runs_here(isa)) out.push_back(isa_name(isa));
  return out;
}

std::string current_isa() { return isa_name(active()); }

void set_isa(const std::string& name) {
  Isa isa;
  if (!parse(name, isa))
    throw std::invalid_argument("msdnet_ops: unknown CPU instruction set '" + name +
                                "' (expected baseline, avx2 or avx512)");
  if (!runs_here(isa))
    throw std::invalid_argument("msdnet_ops: instruction set '" + name +
                                "' is not compiled in or not supported by this CPU");
  active() = isa;
}

#if defined(MSDNET_OPS_HAVE_AVX2)
#define MSDNET_CASE_AVX2(call) \
  case Isa::kAvx2: return isa_avx2::call;
#else
#define MSDNET_CASE_AVX2(call)
#endif
#if defined(MSDNET_OPS_HAVE_AVX512)
#define MSDNET_CASE_AVX512(call) \
  case Isa::kAvx512: return isa_avx512::call;
#else
#define MSDNET_CASE_AVX512(call)
#endif
#define MSDNET_DISPATCH(call)              \
  switch (active()) {                      \
    MSDNET_CASE_AVX512(call)               \
    MSDNET_CASE_AVX2(call)                 \
    default: return isa_baseline::call;    \
  }

void channel_stats(int dtype, const View4& x, double eps, VecView mean, VecView invstd,
                   int num_threads) {
  MSDNET_DISPATCH(channel_stats(dtype, x, eps, mean, invstd, num_threads))
}

void channel_stats_backward(int dtype, const View4& x, VecView mean, VecView invstd,
                            VecView grad_mean, VecView grad_invstd, const View4& grad_x,
                            int num_threads) {
  MSDNET_DISPATCH(channel_stats_backward(dtype, x, mean, invstd, grad_mean, grad_invstd, grad_x,
                                         num_threads))
}

void affine_relu(int dtype, const View4& x, VecView scale, VecView shift, const View4& out,
                 int num_threads) {
  MSDNET_DISPATCH(affine_relu(dtype, x, scale, shift, out, num_threads))
}

void affine_relu_backward(int dtype, const View4& x, VecView scale, VecView shift,
                          const View4& grad_z, const View4& grad_x, VecView grad_scale,
                          VecView grad_shift, bool accumulate, int num_threads) {
  MSDNET_DISPATCH(affine_relu_backward(dtype, x, scale, shift, grad_z, grad_x, grad_scale,
                                       grad_shift, accumulate, num_threads))
}

void gather_batch(int element_size, const View4& src, const int64_t* index, const View4& out,
                  int num_threads) {
  MSDNET_DISPATCH(gather_batch(element_size, src, index, out, num_threads))
}

void pointwise_conv(int dtype, const PointwiseRows& x, const void* w, int64_t N,
                    const void* bias, bool relu, const PointwiseRows& y, int num_threads) {
  MSDNET_DISPATCH(pointwise_conv(dtype, x, w, N, bias, relu, y, num_threads))
}

void pointwise_conv_wgrad(int dtype, const PointwiseRows& x, const PointwiseRows& g, void* dw,
                          int num_threads) {
  MSDNET_DISPATCH(pointwise_conv_wgrad(dtype, x, g, dw, num_threads))
}

void direct_conv(int dtype, const View4& x, const void* w, int64_t k, int64_t stride,
                 int64_t pad, const void* bias, bool relu, const View4& y, int num_threads) {
  MSDNET_DISPATCH(direct_conv(dtype, x, w, k, stride, pad, bias, relu, y, num_threads))
}

void bottleneck_direct_conv(int dtype, const View4& x, const void* w1, int64_t mid,
                            const void* b1, const void* w, int64_t k, int64_t stride,
                            int64_t pad, const void* bias, bool relu, const View4& y,
                            int num_threads) {
  MSDNET_DISPATCH(
      bottleneck_direct_conv(dtype, x, w1, mid, b1, w, k, stride, pad, bias, relu, y, num_threads))
}

void direct_wgrad(int dtype, const View4& x, const View4& g, int64_t k, int64_t stride,
                  int64_t pad, void* dw, int num_threads) {
  MSDNET_DISPATCH(direct_wgrad(dtype, x, g, k, stride, pad, dw, num_threads))
}

void direct_dgrad(int dtype, const View4& g, const void* w, int64_t k, int64_t stride,
                  int64_t pad, const View4& dx, int num_threads) {
  MSDNET_DISPATCH(direct_dgrad(dtype, g, w, k, stride, pad, dx, num_threads))
}

}  // namespace cpu
}  // namespace msdnet_ops
