// channel_stats_backward (finalize): grad_x += grad_mean/n - grad_invstd*(x-mean)*invstd^3/n.
#include "elementwise.h"

namespace msdnet_ops {
namespace cpu {
namespace MSDNET_CPU_ISA {
namespace {

template <typename T>
struct StatsBackwardOp {
  static constexpr int kReads = 3, kWrites = 2;  // reads x, grad_x; writes grad_x
  const T* a;  // per channel
  const T* b;
  const T* mu;
  const T* al;  // per lane (channels-inner)
  const T* bl;
  const T* mul;
  // v = {x, grad_x}
  template <bool UNIT>
  void run(int64_t c, T* const* r, int64_t len, const View4 (&v)[2]) const {
    const T* __restrict__ xr = r[0];
    T* __restrict__ gr = r[1];
    const T ac = a[c], bc = b[c], mc = mu[c];
    const int64_t sx = v[0].sW, sg = v[1].sW;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i)
      gr[UNIT ? i : i * sg] += stats_backward_value(xr[UNIT ? i : i * sx], ac, bc, mc);
  }
  template <typename Len>
  void lanes(T* const* p, Len len) const {
    const T* __restrict__ px = p[0];
    T* __restrict__ pg = p[1];
    const T* __restrict__ pa = al;
    const T* __restrict__ pb = bl;
    const T* __restrict__ pm = mul;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) pg[i] += stats_backward_value(px[i], pa[i], pb[i], pm[i]);
  }
};

template <typename T>
void channel_stats_backward_t(View4 x, VecView mean, VecView invstd, VecView grad_mean,
                              VecView grad_invstd, View4 gx, int num_threads) {
  const int64_t C = x.C, count = pixels(x);
  if (C == 0 || count == 0) return;
  std::vector<T> a(C), b(C), mu(C);
  for (int64_t c = 0; c < C; ++c) {
    const StatsBackwardCoef<T> k = stats_backward_coef<T>(
        vec_get<T>(mean, c), vec_get<T>(invstd, c), vec_get<T>(grad_mean, c),
        vec_get<T>(grad_invstd, c), static_cast<T>(count));
    a[c] = k.a;
    b[c] = k.b;
    mu[c] = k.mean;
  }
  View4 v[2] = {x, gx};
  View4* views[] = {&v[0], &v[1]};
  const Layout layout = prepare(views, 2);
  const int team = team_size(x.N * C * x.H * x.W, num_threads);
  const LanePlan<T> plan(views, 2);
  const bool ci = layout == Layout::kChannelsInner;
  const std::vector<T> al = tile_lanes(a, plan, ci), bl = tile_lanes(b, plan, ci),
                       mul = tile_lanes(mu, plan, ci);
  elementwise<T>(v, layout, plan, team,
                 StatsBackwardOp<T>{a.data(), b.data(), mu.data(), al.data(), bl.data(), mul.data()});
}

}  // namespace

void channel_stats_backward(int dtype, const View4& x, VecView mean, VecView invstd,
                            VecView grad_mean, VecView grad_invstd, const View4& grad_x,
                            int num_threads) {
  dispatch_float(dtype, "channel_stats_backward", [&](auto t) {
    channel_stats_backward_t<decltype(t)>(x, mean, invstd, grad_mean, grad_invstd, grad_x,
                                          num_threads);
  });
}

}  // namespace MSDNET_CPU_ISA
}  // namespace cpu
}  // namespace msdnet_ops
