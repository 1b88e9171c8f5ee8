// Per-element and per-channel arithmetic of every kernel, shared by the CPU and CUDA code so
// that the CPU tests exercise the math the GPU runs. Semantics: msdnet_ops/reference.py.
//
// Acc is the accumulation ("stats") type: double for float64 features, float otherwise.
#pragma once

#include <cmath>

#include "msdnet_ops/common.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace msdnet_ops {

// ------------------------------------------------------------------ types and conversions

template <typename T> struct AccTypeOf { using type = T; };
#if defined(__CUDACC__)
template <> struct AccTypeOf<__half> { using type = float; };
template <> struct AccTypeOf<__nv_bfloat16> { using type = float; };
#endif
template <typename T> using acc_t = typename AccTypeOf<T>::type;

template <typename Acc, typename T> MSDNET_HDI Acc to_acc(T v) { return static_cast<Acc>(v); }
template <typename T, typename Acc> MSDNET_HDI T from_acc(Acc v) { return static_cast<T>(v); }
#if defined(__CUDACC__)
template <> MSDNET_HDI float to_acc<float, __half>(__half v) { return __half2float(v); }
template <> MSDNET_HDI float to_acc<float, __nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> MSDNET_HDI __half from_acc<__half, float>(float v) { return __float2half_rn(v); }
template <> MSDNET_HDI __nv_bfloat16 from_acc<__nv_bfloat16, float>(float v) { return __float2bfloat16_rn(v); }
#endif

// ------------------------------------------------------------------ statistics (Welford / Chan)

// Running statistics of a set of values: count, mean, sum of squared deviations (M2).
template <typename Acc>
struct Welford {
  Acc n;
  Acc mean;
  Acc m2;
};

template <typename Acc>
MSDNET_HDI Welford<Acc> welford_empty() {
  Welford<Acc> s;
  s.n = Acc(0);
  s.mean = Acc(0);
  s.m2 = Acc(0);
  return s;
}

// Welford's update with one value.
template <typename Acc>
MSDNET_HDI void welford_push(Welford<Acc>& s, Acc x) {
  s.n += Acc(1);
  const Acc d = x - s.mean;
  s.mean += d / s.n;
  s.m2 += d * (x - s.mean);
}

// Chan et al.'s merge of the statistics of two disjoint sets a (count na) and b (count nb):
// f = nb / (na + nb) is the weight of b; chan_update works on components so vectorized CPU
// loops over channels (same counts for every channel) share it with the GPU code.
template <typename Acc>
MSDNET_HDI Acc chan_weight(Acc na, Acc nb) {
  const Acc n = na + nb;
  return n > Acc(0) ? nb / n : Acc(0);
}

template <typename Acc>
MSDNET_HDI void chan_update(Acc& mean, Acc& m2, Acc mean_b, Acc m2_b, Acc na, Acc f) {
  const Acc d = mean_b - mean;
  mean += d * f;
  m2 += m2_b + d * d * na * f;
}

template <typename Acc>
MSDNET_HDI Welford<Acc> welford_merge(Welford<Acc> a, const Welford<Acc>& b) {
  if (b.n == Acc(0)) return a;
  if (a.n == Acc(0)) return b;
  chan_update(a.mean, a.m2, b.mean, b.m2, a.n, chan_weight(a.n, b.n));
  a.n += b.n;
  return a;
}

template <typename Acc> MSDNET_HDI Acc quiet_nan();
template <> MSDNET_HDI float quiet_nan<float>() { return ::nanf(""); }
template <> MSDNET_HDI double quiet_nan<double>() { return ::nan(""); }

// Mean of a finished statistic (NaN for an empty set, as torch.var_mean).
template <typename Acc>
MSDNET_HDI Acc welford_mean(const Welford<Acc>& s) { return s.n > Acc(0) ? s.mean : quiet_nan<Acc>(); }

// 1/sqrt(var + eps) from the biased variance m2 / n (BatchNorm's normalizer).
template <typename Acc>
MSDNET_HDI Acc invstd_from_m2(Acc m2, Acc n, Acc eps) {
  Acc var = m2 / n;
  if (var < Acc(0)) var = Acc(0);
  return Acc(1) / std::sqrt(var + eps);
}

// ------------------------------------------------------------------ transform z = relu(s*x+b)

template <typename Acc>
MSDNET_HDI Acc affine_pre(Acc x, Acc scale, Acc shift) { return x * scale + shift; }

// relu that propagates NaN (as torch.relu).
template <typename Acc>
MSDNET_HDI Acc relu(Acc v) { return v < Acc(0) ? Acc(0) : v; }

template <typename Acc>
MSDNET_HDI Acc affine_relu_value(Acc x, Acc scale, Acc shift) {
  return relu(affine_pre(x, scale, shift));
}

// d(relu)/d(pre) * grad_z, with derivative 0 at pre == 0 (as torch.relu's backward).
template <typename Acc>
MSDNET_HDI Acc relu_backward(Acc pre, Acc grad_z) { return pre > Acc(0) ? grad_z : Acc(0); }

// One element of affine_relu_backward_: returns dpre; the caller adds scale*dpre to grad_x,
// dpre*x to grad_scale and dpre to grad_shift.
template <typename Acc>
MSDNET_HDI Acc affine_relu_dpre(Acc x, Acc scale, Acc shift, Acc grad_z) {
  return relu_backward(affine_pre(x, scale, shift), grad_z);
}

// ------------------------------------------------------------------ channel_stats backward

// grad_x += grad_mean/n - grad_invstd * (x - mean) * invstd^3 / n, per channel written as
// grad_x += a - b * (x - mean).
template <typename Acc>
struct StatsBackwardCoef {
  Acc a;
  Acc b;
  Acc mean;
};

template <typename Acc>
MSDNET_HDI StatsBackwardCoef<Acc> stats_backward_coef(Acc mean, Acc invstd, Acc grad_mean,
                                                      Acc grad_invstd, Acc n) {
  StatsBackwardCoef<Acc> k;
  k.a = grad_mean / n;
  k.b = grad_invstd * (invstd * invstd * invstd) / n;
  k.mean = mean;
  return k;
}

template <typename Acc>
MSDNET_HDI Acc stats_backward_value(Acc x, Acc a, Acc b, Acc mean) {
  return a - b * (x - mean);
}

}  // namespace msdnet_ops
