// CPU kernels (OpenMP). This file is compiled once per instruction set (baseline, AVX2,
// AVX-512) into namespace MSDNET_CPU_ISA; dispatch.cpp picks one at run time.
//
// Traversals, chosen from the strides of all views a call touches (after merging H and W
// where every view allows it):
//   planes          every view has sW == 1 (NCHW buffers and their channel slices): each
//                   (n, c) plane is walked row by row with a unit-stride, vectorized inner
//                   loop. Work units: (plane, chunk of ~4096 elements).
//   channels-inner  every view has sC == 1 (channels_last): the inner loop runs over the
//                   channels of a pixel; per-channel parameters and accumulators are small
//                   arrays. Work units: blocks of ~4096/C pixels.
//   tiled           anything else (mixed layouts, e.g. a channels_last x with an NCHW
//                   gradient): tiles of 16 channels x 64 pixels, so both layouts stay in cache.
// Reductions are deterministic and independent of the thread count: partial results belong to
// work units, or to a fixed partition of the units into at most kGroups groups, and are merged
// in a fixed order.
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "msdnet_ops/cpu_kernels.h"
#include "msdnet_ops/math.h"

#ifndef MSDNET_CPU_ISA
#error "compile with -DMSDNET_CPU_ISA=isa_<name>"
#endif

namespace msdnet_ops {
namespace cpu {
namespace MSDNET_CPU_ISA {
namespace {

constexpr int64_t kChunk = 4096;           // elements per work unit / statistics chunk (L1-sized)
constexpr int64_t kSerialBelow = 1 << 15;  // fewer elements than this: no thread team
constexpr int64_t kGroups = 64;            // reduction groups (fixed: results do not depend on threads)
constexpr int64_t kTileW = 64, kTileC = 16;

int team_size(int64_t work, int num_threads) {
  if (num_threads <= 0) num_threads = omp_get_max_threads();
  if (work < kSerialBelow || num_threads < 1) return 1;
  return num_threads;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

enum class Layout { kPlanes, kChannelsInner, kTiled };

// Merges H and W of every view when all allow it, then picks the traversal.
Layout prepare(View4* const* views, int k) {
  bool mergeable = true;
  for (int i = 0; i < k; ++i) mergeable = mergeable && hw_mergeable(*views[i]);
  if (mergeable)
    for (int i = 0; i < k; ++i) *views[i] = merge_hw(*views[i]);
  const View4& v0 = *views[0];
  bool unit_w = v0.W > 1;
  for (int i = 0; i < k; ++i) unit_w = unit_w && views[i]->sW == 1;
  if (unit_w) return Layout::kPlanes;
  bool unit_c = v0.C > 1;
  for (int i = 0; i < k; ++i) unit_c = unit_c && views[i]->sC == 1;
  if (unit_c) return Layout::kChannelsInner;
  bool trivial_w = v0.W == 1;  // one pixel per row (after merging): planes of single elements
  return trivial_w && k == 1 ? Layout::kPlanes : Layout::kTiled;
}

bool all_unit_w(View4* const* views, int k) {
  for (int i = 0; i < k; ++i)
    if (views[i]->sW != 1 && views[i]->W > 1) return false;
  return true;
}

// Planes traversal: plane (n, c) split into K chunks of whole rows (or row pieces when a row
// is longer than kChunk). Unit u = (n * C + c) * K + k.
struct Chunking {
  int64_t H, W, rows_per, w_per, w_blocks, K;
  Chunking(int64_t H_, int64_t W_) : H(H_), W(W_) {
    if (W >= kChunk) {
      w_per = kChunk;
      w_blocks = ceil_div(W, kChunk);
      rows_per = 1;
      K = H * w_blocks;
    } else {
      w_per = W;
      w_blocks = 1;
      rows_per = std::max<int64_t>(1, kChunk / std::max<int64_t>(W, 1));
      K = ceil_div(H, rows_per);
    }
  }
  void range(int64_t k, int64_t& h0, int64_t& h1, int64_t& w0, int64_t& w1) const {
    h0 = (k / w_blocks) * rows_per;
    h1 = std::min(H, h0 + rows_per);
    w0 = (k % w_blocks) * w_per;
    w1 = std::min(W, w0 + w_per);
  }
};

// Channels-inner traversal: unit u = (n, h, block of P pixels along W).
struct PixelBlocks {
  int64_t N, H, W, P, WB, U;
  PixelBlocks(int64_t N_, int64_t H_, int64_t W_, int64_t C) : N(N_), H(H_), W(W_) {
    P = std::max<int64_t>(1, kChunk / std::max<int64_t>(C, 1));
    WB = ceil_div(W, P);
    U = N * H * WB;
  }
  void range(int64_t u, int64_t& n, int64_t& h, int64_t& w0, int64_t& w1) const {
    n = u / (H * WB);
    const int64_t r = u % (H * WB);
    h = r / WB;
    w0 = (r % WB) * P;
    w1 = std::min(W, w0 + P);
  }
};

// Tiled traversal: unit u = (row n*H+h, block of kTileW pixels, block of kTileC channels).
struct Tiles {
  int64_t H, W, C, WB, CB, U;
  Tiles(int64_t N, int64_t H_, int64_t W_, int64_t C_) : H(H_), W(W_), C(C_) {
    WB = ceil_div(W, kTileW);
    CB = ceil_div(C, kTileC);
    U = N * H * WB * CB;
  }
  void range(int64_t u, int64_t& n, int64_t& h, int64_t& w0, int64_t& w1, int64_t& c0,
             int64_t& c1) const {
    const int64_t cb = u % CB, rest = u / CB, wb = rest % WB, row = rest / WB;
    n = row / H;
    h = row % H;
    w0 = wb * kTileW;
    w1 = std::min(W, w0 + kTileW);
    c0 = cb * kTileC;
    c1 = std::min(C, c0 + kTileC);
  }
};

// Tiles are copied through a small [kTileC][kTileW] buffer, read and written in each view's
// own fast order, so the arithmetic runs on unit-stride rows whatever the layouts.
template <typename T>
void tile_load(const View4& v, int64_t n, int64_t h, int64_t w0, int64_t w1, int64_t c0,
               int64_t c1, T* __restrict__ buf) {
  const T* base = static_cast<const T*>(v.ptr) + elem_offset(v, n, c0, h, w0);
  const int64_t nc = c1 - c0, nw = w1 - w0;
  if (v.sC == 1 && nc == kTileC) {  // full channels_last tile: fixed-size transposes
    for (int64_t w = 0; w < nw; ++w) {
      const T* __restrict__ px = base + w * v.sW;
#pragma omp simd
      for (int64_t c = 0; c < kTileC; ++c) buf[c * kTileW + w] = px[c];
    }
  } else if (v.sC < v.sW && v.sC > 0) {
    for (int64_t w = 0; w < nw; ++w)
      for (int64_t c = 0; c < nc; ++c) buf[c * kTileW + w] = base[w * v.sW + c * v.sC];
  } else {
    for (int64_t c = 0; c < nc; ++c)
      for (int64_t w = 0; w < nw; ++w) buf[c * kTileW + w] = base[w * v.sW + c * v.sC];
  }
}

template <typename T>
void tile_store(const View4& v, int64_t n, int64_t h, int64_t w0, int64_t w1, int64_t c0,
                int64_t c1, const T* __restrict__ buf) {
  T* base = static_cast<T*>(v.ptr) + elem_offset(v, n, c0, h, w0);
  const int64_t nc = c1 - c0, nw = w1 - w0;
  if (v.sC == 1 && nc == kTileC) {
    for (int64_t w = 0; w < nw; ++w) {
      T* __restrict__ px = base + w * v.sW;
#pragma omp simd
      for (int64_t c = 0; c < kTileC; ++c) px[c] = buf[c * kTileW + w];
    }
  } else if (v.sC < v.sW && v.sC > 0) {
    for (int64_t w = 0; w < nw; ++w)
      for (int64_t c = 0; c < nc; ++c) base[w * v.sW + c * v.sC] = buf[c * kTileW + w];
  } else {
    for (int64_t c = 0; c < nc; ++c)
      for (int64_t w = 0; w < nw; ++w) base[w * v.sW + c * v.sC] = buf[c * kTileW + w];
  }
}

// A fixed partition of U units into G contiguous groups.
struct Groups {
  int64_t U, G;
  explicit Groups(int64_t U_) : U(U_), G(std::max<int64_t>(1, std::min(U_, kGroups))) {}
  int64_t begin(int64_t g) const { return g * U / G; }
  int64_t end(int64_t g) const { return (g + 1) * U / G; }
};

template <typename T>
std::vector<T> load_vec(const VecView& v, int64_t C) {
  std::vector<T> out(static_cast<size_t>(C));
  for (int64_t c = 0; c < C; ++c) out[c] = vec_get<T>(v, c);
  return out;
}

template <typename T>
T* at(const View4& v, int64_t n, int64_t c, int64_t h, int64_t w) {
  return static_cast<T*>(v.ptr) + elem_offset(v, n, c, h, w);
}

// ============================================================================ channel_stats

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

template <typename T>
void stats_channels_inner(const View4& x, T eps, VecView mean, VecView invstd, int team) {
  const int64_t C = x.C;
  const PixelBlocks pb(x.N, x.H, x.W, C);
  const Groups gr(pb.U);
  std::vector<T> g_mean(static_cast<size_t>(gr.G * C)), g_m2(static_cast<size_t>(gr.G * C));
  std::vector<T> g_n(static_cast<size_t>(gr.G));
#pragma omp parallel num_threads(team) if (team > 1)
  {
    std::vector<T> cmean_v(C), cm2_v(C);
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
        int64_t n, h, w0, w1;
        pb.range(u, n, h, w0, w1);
        const T* row = at<const T>(x, n, 0, h, 0);
        std::fill(cmean, cmean + C, T(0));
        std::fill(cm2, cm2 + C, T(0));
        for (int64_t w = w0; w < w1; ++w) {
          const T* __restrict__ px = row + w * x.sW;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) cmean[c] += px[c];
        }
        const T cnt = static_cast<T>(w1 - w0);
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) cmean[c] /= cnt;
        for (int64_t w = w0; w < w1; ++w) {
          const T* __restrict__ px = row + w * x.sW;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const T d = px[c] - cmean[c];
            cm2[c] += d * d;
          }
        }
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

// ============================================================================ elementwise ops

// Runs an elementwise functor over views that share N, C, H, W, in the traversal the layout
// calls for. The functor is called as f(c, pointers..., count, strides...) on runs of
// elements of one channel (planes, tiled) or as f.pixel(pointers...) on the C channels of one
// pixel (channels-inner).
template <typename T, int K, typename F>
void elementwise(View4 (&v)[K], Layout layout, int team, const F& f) {
  const View4& x = v[0];
  const int64_t C = x.C;
  if (layout == Layout::kChannelsInner) {
    const PixelBlocks pb(x.N, x.H, x.W, C);
#pragma omp parallel for schedule(static) num_threads(team) if (team > 1)
    for (int64_t u = 0; u < pb.U; ++u) {
      int64_t n, h, w0, w1;
      pb.range(u, n, h, w0, w1);
      for (int64_t w = w0; w < w1; ++w) {
        T* p[K];
        for (int i = 0; i < K; ++i) p[i] = at<T>(v[i], n, 0, h, w);
        f.pixel(p, C);
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

// ---------------------------------------------------------------------------- channel_stats_backward

template <typename T>
struct StatsBackwardOp {
  static constexpr int kReads = 3, kWrites = 2;  // reads x, grad_x; writes grad_x
  const T* a;
  const T* b;
  const T* mu;
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
  void pixel(T* const* p, int64_t C) const {
    const T* __restrict__ px = p[0];
    T* __restrict__ pg = p[1];
    const T* __restrict__ pa = a;
    const T* __restrict__ pb = b;
    const T* __restrict__ pm = mu;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) pg[c] += stats_backward_value(px[c], pa[c], pb[c], pm[c]);
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
  elementwise<T>(v, layout, team, StatsBackwardOp<T>{a.data(), b.data(), mu.data()});
}

// ---------------------------------------------------------------------------- affine_relu

template <typename T>
struct AffineReluOp {
  static constexpr int kReads = 1, kWrites = 2;  // reads x; writes out
  const T* s;
  const T* b;
  // v = {x, out}
  template <bool UNIT>
  void run(int64_t c, T* const* r, int64_t len, const View4 (&v)[2]) const {
    const T* __restrict__ xr = r[0];
    T* __restrict__ orow = r[1];
    const T sc = s[c], bc = b[c];
    const int64_t sx = v[0].sW, so = v[1].sW;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i)
      orow[UNIT ? i : i * so] = affine_relu_value(xr[UNIT ? i : i * sx], sc, bc);
  }
  void pixel(T* const* p, int64_t C) const {
    const T* __restrict__ px = p[0];
    T* __restrict__ po = p[1];
    const T* __restrict__ ps = s;
    const T* __restrict__ pb = b;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) po[c] = affine_relu_value(px[c], ps[c], pb[c]);
  }
};

template <typename T>
void affine_relu_t(View4 x, VecView scale, VecView shift, View4 out, int num_threads) {
  const int64_t C = x.C;
  if (C == 0 || pixels(x) == 0) return;
  const std::vector<T> s = load_vec<T>(scale, C), b = load_vec<T>(shift, C);
  View4 v[2] = {x, out};
  View4* views[] = {&v[0], &v[1]};
  const Layout layout = prepare(views, 2);
  const int team = team_size(x.N * C * x.H * x.W, num_threads);
  elementwise<T>(v, layout, team, AffineReluOp<T>{s.data(), b.data()});
}

// ============================================================================ affine_relu_backward

// One run of one channel: grad_x += s*dpre; returns (sum dpre*x, sum dpre) through ds, dh.
template <typename T, bool UNIT>
void affine_relu_backward_run(const T* __restrict__ xr, const T* __restrict__ zr,
                              T* __restrict__ gr, int64_t len, int64_t sx, int64_t sz, int64_t sg,
                              T sc, T bc, T& ds, T& dh) {
  T rs = 0, rh = 0;
#pragma omp simd reduction(+ : rs, rh)
  for (int64_t i = 0; i < len; ++i) {
    const T xv = xr[UNIT ? i : i * sx];
    const T d = affine_relu_dpre(xv, sc, bc, zr[UNIT ? i : i * sz]);
    gr[UNIT ? i : i * sg] += sc * d;
    rs += d * xv;
    rh += d;
  }
  ds += rs;
  dh += rh;
}

template <typename T>
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
      affine_relu_backward_run<T, true>(at<const T>(x, n, c, h, w0), at<const T>(gz, n, c, h, w0),
                                        at<T>(gx, n, c, h, w0), w1 - w0, 1, 1, 1, s[c], b[c], ds, dh);
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

// Channels-inner and tiled: per-group, per-channel sums.
template <typename T>
void affine_relu_backward_grouped(Layout layout, const View4& x, const View4& gz, const View4& gx,
                                  const std::vector<T>& s, const std::vector<T>& b,
                                  VecView grad_scale, VecView grad_shift, int team) {
  const int64_t C = x.C;
  const PixelBlocks pb(x.N, x.H, x.W, C);
  const Tiles tl(x.N, x.H, x.W, C);
  const bool ci = layout == Layout::kChannelsInner;
  const Groups gr(ci ? pb.U : tl.U);
  std::vector<T> g_ds(static_cast<size_t>(gr.G * C), T(0)), g_dh(static_cast<size_t>(gr.G * C), T(0));
  const T* __restrict__ ps = s.data();
  const T* __restrict__ pbv = b.data();
#pragma omp parallel num_threads(team) if (team > 1)
  {
    std::vector<T> cds_v(C), cdh_v(C), tile(ci ? 0 : static_cast<size_t>(3 * kTileC * kTileW));
    T* __restrict__ cds = cds_v.data();
    T* __restrict__ cdh = cdh_v.data();
#pragma omp for schedule(static)
    for (int64_t g = 0; g < gr.G; ++g) {
      T* __restrict__ tds = g_ds.data() + g * C;
      T* __restrict__ tdh = g_dh.data() + g * C;
      for (int64_t u = gr.begin(g); u < gr.end(g); ++u) {
        if (ci) {
          int64_t n, h, w0, w1;
          pb.range(u, n, h, w0, w1);
          std::fill(cds, cds + C, T(0));
          std::fill(cdh, cdh + C, T(0));
          for (int64_t w = w0; w < w1; ++w) {
            const T* __restrict__ px = at<const T>(x, n, 0, h, w);
            const T* __restrict__ pz = at<const T>(gz, n, 0, h, w);
            T* __restrict__ pg = at<T>(gx, n, 0, h, w);
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
              const T xv = px[c];
              const T d = affine_relu_dpre(xv, ps[c], pbv[c], pz[c]);
              pg[c] += ps[c] * d;
              cds[c] += d * xv;
              cdh[c] += d;
            }
          }
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            tds[c] += cds[c];
            tdh[c] += cdh[c];
          }
        } else {
          int64_t n, h, w0, w1, c0, c1;
          tl.range(u, n, h, w0, w1, c0, c1);
          T* bx = tile.data();
          T* bz = bx + kTileC * kTileW;
          T* bg = bz + kTileC * kTileW;
          tile_load<T>(x, n, h, w0, w1, c0, c1, bx);
          tile_load<T>(gz, n, h, w0, w1, c0, c1, bz);
          tile_load<T>(gx, n, h, w0, w1, c0, c1, bg);
          for (int64_t c = c0; c < c1; ++c) {
            const int64_t o = (c - c0) * kTileW;
            affine_relu_backward_run<T, true>(bx + o, bz + o, bg + o, w1 - w0, 1, 1, 1, ps[c],
                                              pbv[c], tds[c], tdh[c]);
          }
          tile_store<T>(gx, n, h, w0, w1, c0, c1, bg);
        }
      }
    }
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

template <typename T>
void affine_relu_backward_t(View4 x, VecView scale, VecView shift, View4 gz, View4 gx,
                            VecView grad_scale, VecView grad_shift, int num_threads) {
  const int64_t C = x.C;
  if (C == 0 || pixels(x) == 0) return;
  const std::vector<T> s = load_vec<T>(scale, C), b = load_vec<T>(shift, C);
  View4* views[] = {&x, &gz, &gx};
  const Layout layout = prepare(views, 3);
  const int team = team_size(x.N * C * x.H * x.W, num_threads);
  if (layout == Layout::kPlanes)
    affine_relu_backward_planes<T>(x, gz, gx, s, b, grad_scale, grad_shift, team);
  else
    affine_relu_backward_grouped<T>(layout, x, gz, gx, s, b, grad_scale, grad_shift, team);
}

// ============================================================================ gather_batch

// The [C, H, W] block of one sample is dense (a permutation of a contiguous block).
bool sample_block_dense(const View4& v) {
  std::pair<int64_t, int64_t> dims[3] = {{v.sC, v.C}, {v.sH, v.H}, {v.sW, v.W}};  // (stride, size)
  std::sort(dims, dims + 3);
  int64_t expected = 1;
  for (const auto& d : dims) {
    if (d.second == 1) continue;
    if (d.first != expected) return false;
    expected *= d.second;
  }
  return true;
}

bool same_sample_layout(const View4& a, const View4& b) {
  return (a.C == 1 || a.sC == b.sC) && (a.H == 1 || a.sH == b.sH) && (a.W == 1 || a.sW == b.sW);
}

template <typename E>
void gather_t(View4 src, const int64_t* index, View4 out, int num_threads) {
  const int64_t M = out.N, C = out.C, per_sample = C * out.H * out.W;
  if (M == 0 || per_sample == 0) return;
  const int team = team_size(M * per_sample, num_threads);
  const E* s = static_cast<const E*>(src.ptr);
  E* o = static_cast<E*>(out.ptr);
  if (sample_block_dense(src) && sample_block_dense(out) && same_sample_layout(src, out)) {
    // Both blocks start at their lowest address (non-negative strides): one memcpy per sample.
#pragma omp parallel for schedule(static) num_threads(team) if (team > 1 && M > 1)
    for (int64_t i = 0; i < M; ++i)
      std::memcpy(o + i * out.sN, s + index[i] * src.sN, static_cast<size_t>(per_sample) * sizeof(E));
    return;
  }
  if (hw_mergeable(src) && hw_mergeable(out)) {
    src = merge_hw(src);
    out = merge_hw(out);
  }
  const bool channels_inner = (src.W == 1 || src.sW != 1 || out.sW != 1) && C > 1 &&
                              src.sC == 1 && out.sC == 1;
  if (channels_inner) {
    const int64_t H = out.H, W = out.W;
#pragma omp parallel for schedule(static) num_threads(team) if (team > 1)
    for (int64_t r = 0; r < M * H; ++r) {
      const int64_t i = r / H, h = r % H;
      const E* srow = s + index[i] * src.sN + h * src.sH;
      E* orow = o + i * out.sN + h * out.sH;
      for (int64_t w = 0; w < W; ++w)
        std::memcpy(orow + w * out.sW, srow + w * src.sW, static_cast<size_t>(C) * sizeof(E));
    }
    return;
  }
  const int64_t H = out.H, W = out.W;
  const bool unit = (W == 1) || (src.sW == 1 && out.sW == 1);
#pragma omp parallel for schedule(static) num_threads(team) if (team > 1)
  for (int64_t p = 0; p < M * C; ++p) {
    const int64_t i = p / C, c = p % C;
    const E* splane = s + index[i] * src.sN + c * src.sC;
    E* oplane = o + i * out.sN + c * out.sC;
    for (int64_t h = 0; h < H; ++h) {
      const E* sr = splane + h * src.sH;
      E* orow = oplane + h * out.sH;
      if (unit) {
        std::memcpy(orow, sr, static_cast<size_t>(W) * sizeof(E));
      } else {
        for (int64_t w = 0; w < W; ++w) orow[w * out.sW] = sr[w * src.sW];
      }
    }
  }
}

[[noreturn]] void bad_dtype(const char* op, int dtype) {
  throw std::invalid_argument(std::string("msdnet_ops CPU kernel ") + op +
                              ": unsupported dtype " + dtype_name(dtype) +
                              " (the CPU kernels run float32 and float64)");
}

}  // namespace

// ============================================================================ entry points

void channel_stats(int dtype, const View4& x, double eps, VecView mean, VecView invstd,
                   int num_threads) {
  if (dtype == kFloat32) return channel_stats_t<float>(x, eps, mean, invstd, num_threads);
  if (dtype == kFloat64) return channel_stats_t<double>(x, eps, mean, invstd, num_threads);
  bad_dtype("channel_stats", dtype);
}

void channel_stats_backward(int dtype, const View4& x, VecView mean, VecView invstd,
                            VecView grad_mean, VecView grad_invstd, const View4& grad_x,
                            int num_threads) {
  if (dtype == kFloat32)
    return channel_stats_backward_t<float>(x, mean, invstd, grad_mean, grad_invstd, grad_x, num_threads);
  if (dtype == kFloat64)
    return channel_stats_backward_t<double>(x, mean, invstd, grad_mean, grad_invstd, grad_x, num_threads);
  bad_dtype("channel_stats_backward", dtype);
}

void affine_relu(int dtype, const View4& x, VecView scale, VecView shift, const View4& out,
                 int num_threads) {
  if (dtype == kFloat32) return affine_relu_t<float>(x, scale, shift, out, num_threads);
  if (dtype == kFloat64) return affine_relu_t<double>(x, scale, shift, out, num_threads);
  bad_dtype("affine_relu", dtype);
}

void affine_relu_backward(int dtype, const View4& x, VecView scale, VecView shift,
                          const View4& grad_z, const View4& grad_x, VecView grad_scale,
                          VecView grad_shift, int num_threads) {
  if (dtype == kFloat32)
    return affine_relu_backward_t<float>(x, scale, shift, grad_z, grad_x, grad_scale, grad_shift, num_threads);
  if (dtype == kFloat64)
    return affine_relu_backward_t<double>(x, scale, shift, grad_z, grad_x, grad_scale, grad_shift, num_threads);
  bad_dtype("affine_relu_backward", dtype);
}

void gather_batch(int element_size, const View4& src, const int64_t* index, const View4& out,
                  int num_threads) {
  switch (element_size) {
    case 1: return gather_t<uint8_t>(src, index, out, num_threads);
    case 2: return gather_t<uint16_t>(src, index, out, num_threads);
    case 4: return gather_t<uint32_t>(src, index, out, num_threads);
    case 8: return gather_t<uint64_t>(src, index, out, num_threads);
    default:
      throw std::invalid_argument("msdnet_ops CPU kernel gather_batch: element size " +
                                  std::to_string(element_size) + " (expected 1, 2, 4 or 8)");
  }
}

}  // namespace MSDNET_CPU_ISA
}  // namespace cpu
}  // namespace msdnet_ops
