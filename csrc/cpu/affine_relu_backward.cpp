// affine_relu_backward: dpre = grad_z*(scale*x+shift > 0); grad_x += scale*dpre (ACC; else
// grad_x = scale*dpre, its old values never read: a sole consumer's gradient needs no
// zero-filled buffer), grad_scale += sum(dpre*x), grad_shift += sum(dpre). Per-channel sums
// per work unit or group, added in a fixed order (deterministic).
#include "lanes.h"

namespace msdnet_ops {
namespace cpu {
namespace MSDNET_CPU_ISA {
namespace {

// One run of one channel: grad_x (+)= s*dpre; returns (sum dpre*x, sum dpre) through ds, dh.
template <typename T, bool UNIT, bool ACC>
void affine_relu_backward_run(const T* __restrict__ xr, const T* __restrict__ zr,
                              T* __restrict__ gr, int64_t len, int64_t sx, int64_t sz, int64_t sg,
                              T sc, T bc, T& ds, T& dh) {
  T rs = 0, rh = 0;
#pragma omp simd reduction(+ : rs, rh)
  for (int64_t i = 0; i < len; ++i) {
    const T xv = xr[UNIT ? i : i * sx];
    const T d = affine_relu_dpre(xv, sc, bc, zr[UNIT ? i : i * sz]);
    T& g = gr[UNIT ? i : i * sg];
    g = ACC ? g + sc * d : sc * d;
    rs += d * xv;
    rh += d;
  }
  ds += rs;
  dh += rh;
}

template <typename T, bool ACC>
void affine_relu_backward_planes(const View4& x, const View4& gz, const View4& gx,
                                 const std::vector<T>& s, const std::vector<T>& b,
                                 VecView grad_scale, VecView grad_shift, int team) {
  const Chunking ch(x.H, x.W);
  const int64_t C = x.C, K = ch.K, units = x.N * C * K;
  std::vector<T> part(static_cast<size_t>(2 * units));
#pragma omp parallel for schedule(static) num_threads(team) if (team > 1)
  for (int64_t u = 0; u < units; ++u) {
    const int64_t p = u / K, k = u % K, n = p / C, c = p % C;
    int64_t h0, h1, w0, w1;
    ch.range(k, h0, h1, w0, w1);
    T ds = 0, dh = 0;
    for (int64_t h = h0; h < h1; ++h)
      affine_relu_backward_run<T, true, ACC>(at<const T>(x, n, c, h, w0),
                                             at<const T>(gz, n, c, h, w0), at<T>(gx, n, c, h, w0),
                                             w1 - w0, 1, 1, 1, s[c], b[c], ds, dh);
    part[2 * u] = ds;
    part[2 * u + 1] = dh;
  }
#pragma omp parallel for schedule(static) num_threads(team) if (team > 1 && units >= 4096)
  for (int64_t c = 0; c < C; ++c) {
    T ds = 0, dh = 0;
    for (int64_t n = 0; n < x.N; ++n)
      for (int64_t k = 0; k < K; ++k) {
        const int64_t u = (n * C + c) * K + k;
        ds += part[2 * u];
        dh += part[2 * u + 1];
      }
    vec_ref<T>(grad_scale, c) += ds;
    vec_ref<T>(grad_shift, c) += dh;
  }
}

// Channels-inner and tiled: units add their per-channel sums into their group's; groups are
// added in order at the end. make_unit() gives each thread its unit(u, tds, tdh) (scratch).
template <typename T, typename MakeUnit>
void grouped_sums(int64_t U, int64_t C, VecView grad_scale, VecView grad_shift, int team,
                  const MakeUnit& make_unit) {
  const Groups gr(U);
  std::vector<T> g_ds(static_cast<size_t>(gr.G * C), T(0)), g_dh(static_cast<size_t>(gr.G * C), T(0));
#pragma omp parallel num_threads(team) if (team > 1)
  {
    auto unit = make_unit();
#pragma omp for schedule(static)
    for (int64_t g = 0; g < gr.G; ++g)
      for (int64_t u = gr.begin(g); u < gr.end(g); ++u) unit(u, g_ds.data() + g * C, g_dh.data() + g * C);
  }
  for (int64_t c = 0; c < C; ++c) {
    T ds = 0, dh = 0;
    for (int64_t g = 0; g < gr.G; ++g) {
      ds += g_ds[g * C + c];
      dh += g_dh[g * C + c];
    }
    vec_ref<T>(grad_scale, c) += ds;
    vec_ref<T>(grad_shift, c) += dh;
  }
}

// One channels-inner unit (lanes.h): lane sums over its segments, folded into channels.
template <typename T, bool ACC>
struct LanesUnit {
  const LanePlan<T>& plan;
  const T* sl;  // scale, shift per lane
  const T* bl;
  LaneWalk<T, 3> walk;  // views {x, grad_z, grad_x}
  std::vector<T> lds, ldh, cds, cdh;

  LanesUnit(const LanePlan<T>& p, const PixelBlocks& pb, const View4 (&v)[3], const T* s, const T* b)
      : plan(p), sl(s), bl(b), walk(p, pb, v), lds(p.M), ldh(p.M), cds(p.C), cdh(p.C) {}

  void operator()(int64_t u, T* __restrict__ tds, T* __restrict__ tdh) {
    T* __restrict__ ads = lds.data();
    T* __restrict__ adh = ldh.data();
    const T* __restrict__ ps = sl;
    const T* __restrict__ pb = bl;
    std::fill(ads, ads + plan.M, T(0));
    std::fill(adh, adh + plan.M, T(0));
    walk.load(u, ACC ? 7 : 3);  // grad_x is read only to be added to
    walk.run([&](T* const* p, const int64_t* step, int64_t nseg, int64_t l0, auto len) {
      T rs[block_lanes<T>()], rb[block_lanes<T>()], rds[block_lanes<T>()], rdh[block_lanes<T>()];
      for (int64_t l = 0; l < len; ++l) {
        rs[l] = ps[l0 + l];
        rb[l] = pb[l0 + l];
        rds[l] = ads[l0 + l];
        rdh[l] = adh[l0 + l];
      }
      for (int64_t s = 0; s < nseg; ++s) {
        const T* __restrict__ px = p[0] + s * step[0];
        const T* __restrict__ pz = p[1] + s * step[1];
        T* __restrict__ pg = p[2] + s * step[2];
#pragma omp simd
        for (int64_t l = 0; l < len; ++l) {
          const T xv = px[l];
          const T d = affine_relu_dpre(xv, rs[l], rb[l], pz[l]);
          pg[l] = ACC ? pg[l] + rs[l] * d : rs[l] * d;
          rds[l] += d * xv;
          rdh[l] += d;
        }
      }
      for (int64_t l = 0; l < len; ++l) {
        ads[l0 + l] = rds[l];
        adh[l0 + l] = rdh[l];
      }
    });
    walk.store(4);
    fold_lanes(ads, plan, cds.data());
    fold_lanes(adh, plan, cdh.data());
    for (int64_t c = 0; c < plan.C; ++c) {
      tds[c] += cds[c];
      tdh[c] += cdh[c];
    }
  }
};

template <typename T, bool ACC>
void affine_relu_backward_lanes(View4 x, View4 gz, View4 gx, const std::vector<T>& s,
                                const std::vector<T>& b, VecView grad_scale, VecView grad_shift,
                                int team) {
  View4 v[3] = {x, gz, gx};
  View4* views[] = {&v[0], &v[1], &v[2]};
  const LanePlan<T> plan(views, 3);
  const PixelBlocks pb(x.N, x.H, x.W, plan.B);
  const std::vector<T> sl = tile_lanes(s, plan, true), bl = tile_lanes(b, plan, true);
  grouped_sums<T>(pb.U, x.C, grad_scale, grad_shift, team,
                  [&] { return LanesUnit<T, ACC>(plan, pb, v, sl.data(), bl.data()); });
}

// Tiled: each tile of kTileC channels x kTileW pixels copied through a buffer (traversal.h).
template <typename T, bool ACC>
void affine_relu_backward_tiled(const View4& x, const View4& gz, const View4& gx,
                                const std::vector<T>& s, const std::vector<T>& b,
                                VecView grad_scale, VecView grad_shift, int team) {
  const Tiles tl(x.N, x.H, x.W, x.C);
  grouped_sums<T>(tl.U, x.C, grad_scale, grad_shift, team, [&] {
    return [&, tile = std::vector<T>(static_cast<size_t>(3 * kTileC * kTileW))](
               int64_t u, T* tds, T* tdh) mutable {
      int64_t n, h, w0, w1, c0, c1;
      tl.range(u, n, h, w0, w1, c0, c1);
      T* bx = tile.data();
      T* bz = bx + kTileC * kTileW;
      T* bg = bz + kTileC * kTileW;
      tile_load<T>(x, n, h, w0, w1, c0, c1, bx);
      tile_load<T>(gz, n, h, w0, w1, c0, c1, bz);
      if (ACC) tile_load<T>(gx, n, h, w0, w1, c0, c1, bg);
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t o = (c - c0) * kTileW;
        affine_relu_backward_run<T, true, ACC>(bx + o, bz + o, bg + o, w1 - w0, 1, 1, 1, s[c],
                                               b[c], tds[c], tdh[c]);
      }
      tile_store<T>(gx, n, h, w0, w1, c0, c1, bg);
    };
  });
}

template <typename T, bool ACC>
void affine_relu_backward_t(View4 x, VecView scale, VecView shift, View4 gz, View4 gx,
                            VecView grad_scale, VecView grad_shift, int num_threads) {
  const int64_t C = x.C;
  if (C == 0 || pixels(x) == 0) return;
  const std::vector<T> s = load_vec<T>(scale, C), b = load_vec<T>(shift, C);
  View4* views[] = {&x, &gz, &gx};
  const Layout layout = prepare(views, 3);
  const int team = team_size(x.N * C * x.H * x.W, num_threads);
  if (layout == Layout::kPlanes)
    affine_relu_backward_planes<T, ACC>(x, gz, gx, s, b, grad_scale, grad_shift, team);
  else if (layout == Layout::kChannelsInner)
    affine_relu_backward_lanes<T, ACC>(x, gz, gx, s, b, grad_scale, grad_shift, team);
  else
    affine_relu_backward_tiled<T, ACC>(x, gz, gx, s, b, grad_scale, grad_shift, team);
}

}  // namespace

void affine_relu_backward(int dtype, const View4& x, VecView scale, VecView shift,
                          const View4& grad_z, const View4& grad_x, VecView grad_scale,
                          VecView grad_shift, bool accumulate, int num_threads) {
  dispatch_float(dtype, "affine_relu_backward", [&](auto t) {
    using T = decltype(t);
    if (accumulate)
      affine_relu_backward_t<T, true>(x, scale, shift, grad_z, grad_x, grad_scale, grad_shift,
                                      num_threads);
    else
      affine_relu_backward_t<T, false>(x, scale, shift, grad_z, grad_x, grad_scale, grad_shift,
                                       num_threads);
  });
}

}  // namespace MSDNET_CPU_ISA
}  // namespace cpu
}  // namespace msdnet_ops
