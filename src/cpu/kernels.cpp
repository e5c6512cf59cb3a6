#include "cpu/kernels.hpp"

#include <omp.h>

#include <algorithm>

// Compiled once per instruction set (SYNCBN_CPU_ISA names the namespace: generic,
// x86_64_v3, x86_64_v4; see src/CMakeLists.txt); dispatch.cpp picks one at run time.
#ifndef SYNCBN_CPU_ISA
#define SYNCBN_CPU_ISA generic
#endif

namespace syncbn::cpu::SYNCBN_CPU_ISA {
namespace {

// Elements per work item along a channels-first row: long rows are cut so that few channels
// with a large spatial size still spread over every thread.
constexpr std::int64_t kChunk = 16384;
// Independent fp64 accumulators per channels-first reduction: enough vectors in flight to hide
// the add latency (measured best among 8, 16, 32 with SSE2, AVX2 and AVX-512 code).
constexpr int kLanes = 32;
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
// ranges [begin, end):
//   channels-first (inner > 1): pieces of at most kChunk elements of one (n, c) row, channel c;
//   channels-last  (inner == 1): one call for the thread's whole rows of C channels, c = -1.
// Counters advance incrementally: no division per row.
template <class Body>
void for_share(const Geometry& g, int t, int nt, Body&& body) {
  const std::int64_t C = g.channels;
  std::int64_t lo, hi;
  if (g.inner == 1) {
    share(g.outer, t, nt, lo, hi);
    if (lo < hi) body(lo * C, hi * C, std::int64_t{-1});
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

// The two contributions (fp64) of one element to a reduction. Returned by value: an address
// taken inside an "omp simd" loop makes GCC keep the variable in memory, one slot per lane.
struct Pair {
  double u, v;
};

// The two reductions share one traversal. An Op gives, for element i of channel c, the Pair
// whose u and v are summed per channel.
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
        // Channels-last rows, vectorized across channels. (Unrolling over 4 rows per update of
        // the partials measured 2x slower with GCC 12.)
        for (std::int64_t r = begin; r < end; r += C) {
#pragma omp simd
          for (std::int64_t k = 0; k < C; ++k) {
            const Pair p = op(r + k, k);
            pu[k] += p.u;
            pv[k] += p.v;
          }
        }
      } else {
        // Channels-first piece of one channel: kLanes independent accumulators (in registers,
        // vectorized across lanes), so neither the add latency nor a reduction through memory
        // bounds the loop; lanes are summed once per piece.
        double au[kLanes] = {}, av[kLanes] = {};
        std::int64_t i = begin;
        for (; i + kLanes <= end; i += kLanes) {
          for (int k = 0; k < kLanes; ++k) {
            const Pair p = op(i + k, c);
            au[k] += p.u;
            av[k] += p.v;
          }
        }
        for (int k = 0; i < end; ++i, ++k) {
          const Pair p = op(i, c);
          au[k] += p.u;
          av[k] += p.v;
        }
        double su = 0.0, sv = 0.0;
        for (int k = 0; k < kLanes; ++k) {
          su += au[k];
          sv += av[k];
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
                for (std::int64_t r = begin; r < end; r += C) {
#pragma omp simd
                  for (std::int64_t k = 0; k < C; ++k) op(r + k, k);
                }
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
      [x, shift](std::int64_t i, std::int64_t c) {
        const double xi = static_cast<double>(x[i]) - static_cast<double>(shift[c]);
        return Pair{xi, xi * xi};
      },
      sum, sumsq, ws);
}

template <class T>
void reduce_grad(const Geometry& g, const T* x, const T* dy, const T* center, double* sum_g,
                 double* sum_gx, Workspace& ws) {
  reduce_pairs(
      g,
      [x, dy, center](std::int64_t i, std::int64_t c) {
        const double gi = static_cast<double>(dy[i]);
        return Pair{gi, gi * (static_cast<double>(x[i]) - static_cast<double>(center[c]))};
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

SYNCBN_CPU_INSTANTIATE_KERNELS(float)
SYNCBN_CPU_INSTANTIATE_KERNELS(double)

}  // namespace syncbn::cpu::SYNCBN_CPU_ISA
