// channel_stats: per-channel mean and invstd over (N, H, W). Exact two-pass statistics per
// L1-sized chunk, merged with Chan's formula in a fixed order (deterministic).
#include <limits>

#include "lanes.h"

namespace msdnet_ops {
namespace cpu {
namespace MSDNET_CPU_ISA {
namespace {

// Exact statistics of one chunk (two passes over L1-resident data).
template <typename T, bool UNIT>
Welford<T> chunk_stats(const T* plane, int64_t sH, int64_t sW, int64_t h0, int64_t h1,
                       int64_t w0, int64_t w1) {
  const int64_t len = w1 - w0;
  T sum = 0;
  for (int64_t h = h0; h < h1; ++h) {
    const T* r = plane + h * sH + w0 * sW;
    T s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < len; ++i) s += r[UNIT ? i : i * sW];
    sum += s;
  }
  Welford<T> st;
  st.n = static_cast<T>((h1 - h0) * len);
  st.mean = sum / st.n;
  const T m = st.mean;
  T m2 = 0;
  for (int64_t h = h0; h < h1; ++h) {
    const T* r = plane + h * sH + w0 * sW;
    T q = 0;
#pragma omp simd reduction(+ : q)
    for (int64_t i = 0; i < len; ++i) {
      const T d = r[UNIT ? i : i * sW] - m;
      q += d * d;
    }
    m2 += q;
  }
  st.m2 = m2;
  return st;
}

template <typename T, bool UNIT>
void stats_planes(const View4& x, T eps, VecView mean, VecView invstd, int team) {
  const Chunking ch(x.H, x.W);
  const int64_t C = x.C, K = ch.K, units = x.N * C * K;
  std::vector<Welford<T>> part(static_cast<size_t>(units));
#pragma omp parallel for schedule(static) num_threads(team) if (team > 1)
  for (int64_t u = 0; u < units; ++u) {
    const int64_t p = u / K, k = u % K;
    int64_t h0, h1, w0, w1;
    ch.range(k, h0, h1, w0, w1);
    part[u] = chunk_stats<T, UNIT>(at<const T>(x, p / C, p % C, 0, 0), x.sH, x.sW, h0, h1, w0, w1);
  }
  // Per-channel merges in a fixed order (n, then chunk): parallel over channels when many.
#pragma omp parallel for schedule(static) num_threads(team) if (team > 1 && units >= 4096)
  for (int64_t c = 0; c < C; ++c) {
    Welford<T> s = welford_empty<T>();
    for (int64_t n = 0; n < x.N; ++n)
      for (int64_t k = 0; k < K; ++k) s = welford_merge(s, part[(n * C + c) * K + k]);
    vec_ref<T>(mean, c) = welford_mean(s);
    vec_ref<T>(invstd, c) = invstd_from_m2(s.m2, s.n, eps);
  }
}

// acc[l0 + l] += the sum of lane l0 + l over segments (a LaneWalk op, lanes.h).
template <typename T>
struct LaneSum {
  T* acc;
  template <typename Len>
  void operator()(T* const* p, const int64_t* step, int64_t nseg, int64_t l0, Len len) const {
    T r[block_lanes<T>()];
    for (int64_t l = 0; l < len; ++l) r[l] = acc[l0 + l];
    for (int64_t s = 0; s < nseg; ++s) {
      const T* __restrict__ px = p[0] + s * step[0];
#pragma omp simd
      for (int64_t l = 0; l < len; ++l) r[l] += px[l];
    }
    for (int64_t l = 0; l < len; ++l) acc[l0 + l] = r[l];
  }
};

// acc[l0 + l] += the sum of (x - mean[l0 + l])^2 of lane l0 + l over segments.
template <typename T>
struct LaneSquares {
  T* acc;
  const T* mean;
  template <typename Len>
  void operator()(T* const* p, const int64_t* step, int64_t nseg, int64_t l0, Len len) const {
    T r[block_lanes<T>()], m[block_lanes<T>()];
    for (int64_t l = 0; l < len; ++l) {
      r[l] = acc[l0 + l];
      m[l] = mean[l0 + l];
    }
    for (int64_t s = 0; s < nseg; ++s) {
      const T* __restrict__ px = p[0] + s * step[0];
#pragma omp simd
      for (int64_t l = 0; l < len; ++l) {
        const T d = px[l] - m[l];
        r[l] += d * d;
      }
    }
    for (int64_t l = 0; l < len; ++l) acc[l0 + l] = r[l];
  }
};

// Channels-inner (lanes.h): per unit, exact two-pass statistics of each channel from lane sums
// (the unit is L1-resident for the second pass), merged into the unit's group with Chan's
// formula; groups merged in order at the end.
template <typename T>
void stats_channels_inner(View4 x, T eps, VecView mean, VecView invstd, int team) {
  const int64_t C = x.C;
  View4* views[] = {&x};
  const LanePlan<T> plan(views, 1);
  const PixelBlocks pb(x.N, x.H, x.W, plan.B);
  const Groups gr(pb.U);
  const int64_t M = plan.M;
  std::vector<T> g_mean(static_cast<size_t>(gr.G * C)), g_m2(static_cast<size_t>(gr.G * C));
  std::vector<T> g_n(static_cast<size_t>(gr.G));
#pragma omp parallel num_threads(team) if (team > 1)
  {
    const View4 v[1] = {x};
    LaneWalk<T, 1> walk(plan, pb, v);
    std::vector<T> acc_v(M), lmean_v(M), cmean_v(C), cm2_v(C);
    T* __restrict__ acc = acc_v.data();
    T* __restrict__ lmean = lmean_v.data();
    T* __restrict__ cmean = cmean_v.data();
    T* __restrict__ cm2 = cm2_v.data();
#pragma omp for schedule(static)
    for (int64_t g = 0; g < gr.G; ++g) {
      T* __restrict__ tm = g_mean.data() + g * C;
      T* __restrict__ tq = g_m2.data() + g * C;
      T tn = 0;
      std::fill(tm, tm + C, T(0));
      std::fill(tq, tq + C, T(0));
      for (int64_t u = gr.begin(g); u < gr.end(g); ++u) {
        walk.load(u, 1);
        std::fill(acc, acc + M, T(0));
        walk.run(LaneSum<T>{acc});
        fold_lanes(acc, plan, cmean);
        const T cnt = static_cast<T>(walk.pixels());
        for (int64_t c = 0; c < C; ++c) cmean[c] /= cnt;
        tile_lanes(cmean, plan, lmean);
        std::fill(acc, acc + M, T(0));
        walk.run(LaneSquares<T>{acc, lmean});
        fold_lanes(acc, plan, cm2);
        const T f = chan_weight(tn, cnt);
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) chan_update(tm[c], tq[c], cmean[c], cm2[c], tn, f);
        tn += cnt;
      }
      g_n[g] = tn;
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    Welford<T> s = welford_empty<T>();
    for (int64_t g = 0; g < gr.G; ++g) {
      Welford<T> b;
      b.n = g_n[g];
      b.mean = g_mean[g * C + c];
      b.m2 = g_m2[g * C + c];
      s = welford_merge(s, b);
    }
    vec_ref<T>(mean, c) = welford_mean(s);
    vec_ref<T>(invstd, c) = invstd_from_m2(s.m2, s.n, eps);
  }
}

template <typename T>
void channel_stats_t(View4 x, double eps, VecView mean, VecView invstd, int num_threads) {
  if (x.C == 0) return;
  if (pixels(x) == 0) {
    for (int64_t c = 0; c < x.C; ++c) {
      vec_ref<T>(mean, c) = std::numeric_limits<T>::quiet_NaN();
      vec_ref<T>(invstd, c) = std::numeric_limits<T>::quiet_NaN();
    }
    return;
  }
  View4* views[] = {&x};
  const Layout layout = prepare(views, 1);
  const int team = team_size(x.N * x.C * x.H * x.W, num_threads);
  if (layout == Layout::kChannelsInner)
    stats_channels_inner<T>(x, static_cast<T>(eps), mean, invstd, team);
  else if (all_unit_w(views, 1))
    stats_planes<T, true>(x, static_cast<T>(eps), mean, invstd, team);
  else
    stats_planes<T, false>(x, static_cast<T>(eps), mean, invstd, team);
}

}  // namespace

void channel_stats(int dtype, const View4& x, double eps, VecView mean, VecView invstd,
                   int num_threads) {
  dispatch_float(dtype, "channel_stats", [&](auto t) {
    channel_stats_t<decltype(t)>(x, eps, mean, invstd, num_threads);
  });
}

}  // namespace MSDNET_CPU_ISA
}  // namespace cpu
}  // namespace msdnet_ops
