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

// The two reductions share one traversal. An Op gives, for element i of channel c, the two
// contributions u and v (fp64) that are summed per channel.
template <class Op>
void reduce_pairs(const Geometry& g, const Op& op, double* out_u, double* out_v, Workspace& ws) {
  const std::int64_t C = g.channels;
  const int nt = threads_for(g.outer * C * g.inner);
  ws.assign(static_cast<std::size_t>(nt) * 2 * static_cast<std::size_t>(C), 0.0);
  double* const partials = ws.data();

#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    double* const pu = partials + static_cast<std::size_t>(omp_get_thread_num()) * 2 * C;
    double* const pv = pu + C;
    if (g.inner == 1) {
      // Channels-last: rows of C contiguous values, vectorized across channels.
#pragma omp for schedule(static)
      for (std::int64_t o = 0; o < g.outer; ++o) {
        const std::int64_t base = o * C;
#pragma omp simd
        for (std::int64_t c = 0; c < C; ++c) {
          double u, v;
          op(base + c, c, u, v);
          pu[c] += u;
          pv[c] += v;
        }
      }
    } else {
      // Channels-first: contiguous pieces of one channel's row, vectorized along the row.
      const std::int64_t pieces = (g.inner + kChunk - 1) / kChunk;
      const std::int64_t items = g.outer * C * pieces;
#pragma omp for schedule(static)
      for (std::int64_t item = 0; item < items; ++item) {
        const std::int64_t row = item / pieces;
        const std::int64_t c = row % C;
        const std::int64_t begin = row * g.inner + (item % pieces) * kChunk;
        const std::int64_t end = std::min(begin + kChunk, (row + 1) * g.inner);
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
    }
  }

  for (std::int64_t c = 0; c < C; ++c) {
    double su = 0.0, sv = 0.0;
    for (int t = 0; t < nt; ++t) {
      su += partials[static_cast<std::size_t>(t) * 2 * C + c];
      sv += partials[static_cast<std::size_t>(t) * 2 * C + C + c];
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
  if (g.inner == 1) {
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (std::int64_t o = 0; o < g.outer; ++o) {
      const std::int64_t base = o * C;
#pragma omp simd
      for (std::int64_t c = 0; c < C; ++c) op(base + c, c);
    }
  } else {
    const std::int64_t pieces = (g.inner + kChunk - 1) / kChunk;
    const std::int64_t items = g.outer * C * pieces;
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (std::int64_t item = 0; item < items; ++item) {
      const std::int64_t row = item / pieces;
      const std::int64_t c = row % C;
      const std::int64_t begin = row * g.inner + (item % pieces) * kChunk;
      const std::int64_t end = std::min(begin + kChunk, (row + 1) * g.inner);
#pragma omp simd
      for (std::int64_t i = begin; i < end; ++i) op(i, c);
    }
  }
}

}  // namespace

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
