#include "cpu/kernels.hpp"

#include <omp.h>

#include <algorithm>

namespace syncbn::cpu {
namespace {

// Elements per work item along a channels-first row: long rows are cut so that few channels
// with a large spatial size still spread over every thread.
constexpr std::int64_t kChunk = 16384;
// Below this many elements a pass runs on one thread (a parallel region costs microseconds).
constexpr std::int64_t kParallelMin = 32768;

int threads_for(std::int64_t elements) {
  return elements < kParallelMin ? 1 : std::max(1, omp_get_max_threads());
}

// Doubles between two threads' partial sums: 2C rounded up to a cache line, plus one line, so
// that no two threads write to the same line.
std::size_t partial_stride(std::int64_t channels) {
  return (static_cast<std::size_t>(2 * channels) + 7) / 8 * 8 + 8;
}

// The static share [lo, hi) of n items for thread t of nt.
void share(std::int64_t n, int t, int nt, std::int64_t& lo, std::int64_t& hi) {
  lo = n / nt * t + std::min<std::int64_t>(t, n % nt);
  hi = lo + n / nt + (t < n % nt ? 1 : 0);
}

// Thread t's share of a layout's work, as calls body(begin, end, c) over contiguous element
// ranges [begin, end) of one channel c:
//   channels-first (inner > 1): pieces of at most kChunk elements of one (n, c) row;
//   channels-last  (inner == 1): whole rows of C channels, as body(row_begin, row_end, -1).
// Counters advance incrementally: no division per row.
template <class Body>
void for_share(const Geometry& g, int t, int nt, Body&& body) {
  const std::int64_t C = g.channels;
  std::int64_t lo, hi;
  if (g.inner == 1) {
    share(g.outer, t, nt, lo, hi);
    for (std::int64_t o = lo; o < hi; ++o) body(o * C, (o + 1) * C, std::int64_t{-1});
    return;
  }
  const std::int64_t pieces = (g.inner + kChunk - 1) / kChunk;
  share(g.outer * C * pieces, t, nt, lo, hi);
  if (lo >= hi) return;
  std::int64_t row = lo / pieces, piece = lo % pieces, c = row % C;
  for (std::int64_t item = lo; item < hi; ++item) {
    const std::int64_t begin = row * g.inner + piece * kChunk;
    body(begin, std::min(begin + kChunk, (row + 1) * g.inner), c);
    if (++piece == pieces) {
      piece = 0;
      ++row;
      if (++c == C) c = 0;
    }
  }
}

// The two reductions share one traversal. An Op gives, for element i of channel c, the two
// contributions u and v (fp64) that are summed per channel.
template <class Op>
void reduce_pairs(const Geometry& g, const Op& op, double* out_u, double* out_v, Workspace& ws) {
  const std::int64_t C = g.channels;
  const int nt = threads_for(g.outer * C * g.inner);
  const std::size_t stride = partial_stride(C);
  ws.assign(static_cast<std::size_t>(nt) * stride, 0.0);  // within reserve_workspace's capacity
  double* const partials = ws.data();

#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    const int t = omp_get_thread_num();
    double* const pu = partials + static_cast<std::size_t>(t) * stride;
    double* const pv = pu + C;
    for_share(g, t, omp_get_num_threads(), [&](std::int64_t begin, std::int64_t end, std::int64_t c) {
      if (c < 0) {
        // Channels-last row: vectorized across channels.
#pragma omp simd
        for (std::int64_t k = 0; k < C; ++k) {
          double u, v;
          op(begin + k, k, u, v);
          pu[k] += u;
          pv[k] += v;
        }
      } else {
        // Channels-first piece of one channel: vectorized along the row.
        double su = 0.0, sv = 0.0;
#pragma omp simd reduction(+ : su, sv)
        for (std::int64_t i = begin; i < end; ++i) {
          double u, v;
          op(i, c, u, v);
          su += u;
          sv += v;
        }
        pu[c] += su;
        pv[c] += sv;
      }
    });
  }

  for (std::int64_t c = 0; c < C; ++c) {
    double su = 0.0, sv = 0.0;
    for (int t = 0; t < nt; ++t) {
      su += partials[static_cast<std::size_t>(t) * stride + c];
      sv += partials[static_cast<std::size_t>(t) * stride + C + c];
    }
    out_u[c] = su;
    out_v[c] = sv;
  }
}

// One elementwise traversal for every output pass: op(i, c) writes element i of channel c.
template <class Op>
void map_elements(const Geometry& g, const Op& op) {
  const std::int64_t C = g.channels;
  const int nt = threads_for(g.outer * C * g.inner);
#pragma omp parallel num_threads(nt) if (nt > 1)
  for_share(g, omp_get_thread_num(), omp_get_num_threads(),
            [&](std::int64_t begin, std::int64_t end, std::int64_t c) {
              if (c < 0) {
#pragma omp simd
                for (std::int64_t k = 0; k < C; ++k) op(begin + k, k);
              } else {
#pragma omp simd
                for (std::int64_t i = begin; i < end; ++i) op(i, c);
              }
            });
}

}  // namespace

void reserve_workspace(Workspace& ws, std::int64_t channels) {
  ws.reserve(static_cast<std::size_t>(std::max(1, omp_get_max_threads())) *
             partial_stride(channels));
}

template <class T>
void reduce_moments(const Geometry& g, const T* x, const T* shift, double* sum, double* sumsq,
                    Workspace& ws) {
  reduce_pairs(
      g,
      [x, shift](std::int64_t i, std::int64_t c, double& u, double& v) {
        const double xi = static_cast<double>(x[i]) - static_cast<double>(shift[c]);
        u = xi;
        v = xi * xi;
      },
      sum, sumsq, ws);
}

template <class T>
void reduce_grad(const Geometry& g, const T* x, const T* dy, const T* center, double* sum_g,
                 double* sum_gx, Workspace& ws) {
  reduce_pairs(
      g,
      [x, dy, center](std::int64_t i, std::int64_t c, double& u, double& v) {
        const double gi = static_cast<double>(dy[i]);
        u = gi;
        v = gi * (static_cast<double>(x[i]) - static_cast<double>(center[c]));
      },
      sum_g, sum_gx, ws);
}

template <class T>
void affine(const Geometry& g, const T* x, const T* center, const T* scale, const T* shift, T* y) {
  map_elements(g, [=](std::int64_t i, std::int64_t c) {
    y[i] = (x[i] - center[c]) * scale[c] + shift[c];
  });
}

template <class T>
void backward_elemt(const Geometry& g, const T* x, const T* dy, const T* center, const T* a,
                    const T* k, const T* d, T* dx) {
  map_elements(g, [=](std::int64_t i, std::int64_t c) {
    dx[i] = a[c] * dy[i] - k[c] * (x[i] - center[c]) + d[c];
  });
}

#define SYNCBN_INSTANTIATE(T)                                                                  \
  template void reduce_moments<T>(const Geometry&, const T*, const T*, double*, double*,       \
                                  Workspace&);                                                 \
  template void reduce_grad<T>(const Geometry&, const T*, const T*, const T*, double*,         \
                               double*, Workspace&);                                            \
  template void affine<T>(const Geometry&, const T*, const T*, const T*, const T*, T*);        \
  template void backward_elemt<T>(const Geometry&, const T*, const T*, const T*, const T*,     \
                                  const T*, const T*, T*);
SYNCBN_INSTANTIATE(float)
SYNCBN_INSTANTIATE(double)
#undef SYNCBN_INSTANTIATE

}  // namespace syncbn::cpu
