// The elementwise runner shared by channel_stats_backward and affine_relu.
#pragma once

#include "lanes.h"
#include "traversal.h"

namespace msdnet_ops {
namespace cpu {
namespace MSDNET_CPU_ISA {

// Runs an elementwise functor over views that share N, C, H, W, in the traversal the layout
// calls for. The functor is called as f.run<UNIT>(c, rows, count, views) on runs of elements
// of one channel (planes, tiled) or as f.lanes(p, len) on segments of lanes (channels-inner:
// LaneWalk::each_segment in lanes.h; its parameters tiled for `plan`). F::kReads / F::kWrites: bit i
// set when view i is read / written (what the tiled and strided-row copies move).
template <typename T, int K, typename F>
void elementwise(View4 (&v)[K], Layout layout, const LanePlan<T>& plan, int team, const F& f) {
  const View4& x = v[0];
  const int64_t C = x.C;
  if (layout == Layout::kChannelsInner) {
    const PixelBlocks pb(x.N, x.H, x.W, plan.B);
#pragma omp parallel num_threads(team) if (team > 1)
    {
      LaneWalk<T, K> walk(plan, pb, v);
#pragma omp for schedule(static)
      for (int64_t u = 0; u < pb.U; ++u) {
        walk.load(u, F::kReads);
        walk.each_segment([&](T* const* p, int64_t len) { f.lanes(p, len); });
        walk.store(F::kWrites);
      }
    }
  } else if (layout == Layout::kPlanes) {
    const Chunking ch(x.H, x.W);
    const int64_t units = x.N * C * ch.K;
#pragma omp parallel for schedule(static) num_threads(team) if (team > 1)
    for (int64_t u = 0; u < units; ++u) {
      const int64_t p = u / ch.K, k = u % ch.K, n = p / C, c = p % C;
      int64_t h0, h1, w0, w1;
      ch.range(k, h0, h1, w0, w1);
      for (int64_t h = h0; h < h1; ++h) {
        T* r[K];
        for (int i = 0; i < K; ++i) r[i] = at<T>(v[i], n, c, h, w0);
        f.template run<true>(c, r, w1 - w0, v);
      }
    }
  } else {
    const Tiles tl(x.N, x.H, x.W, C);
#pragma omp parallel num_threads(team) if (team > 1)
    {
      std::vector<T> bufs(static_cast<size_t>(K * kTileC * kTileW));
#pragma omp for schedule(static)
      for (int64_t u = 0; u < tl.U; ++u) {
        int64_t n, h, w0, w1, c0, c1;
        tl.range(u, n, h, w0, w1, c0, c1);
        for (int i = 0; i < K; ++i)
          if (F::kReads & (1 << i)) tile_load<T>(v[i], n, h, w0, w1, c0, c1, &bufs[i * kTileC * kTileW]);
        for (int64_t c = c0; c < c1; ++c) {
          T* r[K];
          for (int i = 0; i < K; ++i) r[i] = &bufs[(i * kTileC + (c - c0)) * kTileW];
          f.template run<true>(c, r, w1 - w0, v);
        }
        for (int i = 0; i < K; ++i)
          if (F::kWrites & (1 << i)) tile_store<T>(v[i], n, h, w0, w1, c0, c1, &bufs[i * kTileC * kTileW]);
      }
    }
  }
}

}  // namespace MSDNET_CPU_ISA
}  // namespace cpu
}  // namespace msdnet_ops
