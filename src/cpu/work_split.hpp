// src/cpu: how a kernel's work is split among OpenMP threads, statically (every thread computes
// its own share, no scheduling): contiguous shares of n items that differ by at most one, and a
// layout's elements cut into items along channels-first rows. Included by kernels.cpp inside the
// instruction set's namespace (SYNCBN_CPU_ISA, default generic), so every compilation of the
// kernels has its own copy; tests/core includes it alone.
#ifndef SYNCBN_CPU_WORK_SPLIT_HPP
#define SYNCBN_CPU_WORK_SPLIT_HPP

#include <algorithm>
#include <cstdint>

#include "core/geometry.hpp"

#ifndef SYNCBN_CPU_ISA
#define SYNCBN_CPU_ISA generic
#endif

namespace syncbn::cpu::SYNCBN_CPU_ISA {
namespace {

using core::Geometry;

// Elements per work item along a channels-first row: long rows are cut so that few channels
// with a large spatial size still spread over every thread.
constexpr std::int64_t kChunk = 16384;

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

}  // namespace
}  // namespace syncbn::cpu::SYNCBN_CPU_ISA

#endif  // SYNCBN_CPU_WORK_SPLIT_HPP
