#include "cpu/kernels.hpp"
#include "cpu/memory.hpp"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

// Compiled once per instruction set (SYNCBN_CPU_ISA names the namespace: generic,
// x86_64_v3, x86_64_v4; see src/CMakeLists.txt); dispatch.cpp picks one at run time.
#ifndef SYNCBN_CPU_ISA
#define SYNCBN_CPU_ISA generic
#endif
#include "cpu/work_split.hpp"  // share, for_share, kChunk: in this instruction set's namespace

namespace syncbn::cpu::SYNCBN_CPU_ISA {
namespace {

// Independent fp64 accumulators per channels-first reduction: enough vectors in flight to hide
// the add latency (measured best among 8, 16, 32 with SSE2, AVX2 and AVX-512 code).
constexpr int kLanes = 32;
// Channels-first rows whose elements, over the tensors a reduction reads, number fewer than this
// (7 x 7 and 14 x 14 maps forward, 7 x 7 backward) are reduced channel by channel, every row of a
// channel into the same accumulators: the lanes are summed once per channel instead of once per
// row, where that sum and the scalar tail cost as much as the row. With more, the strided walk
// down a channel of two tensors measured slower than row by row (14 x 14 backward on AMD EPYC:
// 1.1-1.2x the time), and forward 7 x 7 at a third of the time, backward at half.
constexpr std::int64_t kShortRow = 256;
// Accumulators of that path: fewer than kLanes, so that the tail of a short row is short too.
constexpr int kShortLanes = 16;
// Below this many elements a pass runs on one thread (a parallel region costs microseconds).
constexpr std::int64_t kParallelMin = 32768;
// Channels-last rows summed in the data type before one fp64 merge (docs/design.md section 3:
// "blocked partials merged in fp64"): 16 rows measured best among 4, 8, 16 for C = 64 to 2048.
constexpr std::int64_t kGroupRows = 16;
// Channels-last rows at least this many bytes long are swept 4 at a time (a quarter of the
// traffic to the group sums); shorter rows one at a time (4 concurrent streams 1 to 2 KiB apart
// measured up to 2x slower than one on AMD EPYC).
constexpr std::int64_t kMultiRowBytes = 4096;

int threads_for(std::int64_t elements) {
  return elements < kParallelMin ? 1 : std::max(1, omp_get_max_threads());
}

// Loads and stores whose addresses agree in their low 12 bits look dependent to the CPU ("4K
// aliasing"): the load waits for the store.
constexpr std::uintptr_t kAliasPeriod = 4096;

// Elements of `bytes` bytes between two threads' scratch arrays of n elements (`slack` bytes of
// room for placement before them): rounded up to a cache line, plus one line, so that no two
// threads write to the same line.
std::size_t thread_stride(std::size_t n, std::size_t bytes, std::size_t slack) {
  const std::size_t line = 64 / bytes;
  return (n + slack / bytes + line - 1) / line * line + line;
}

// The fp64 partial sums: 2C per thread.
std::size_t sums_stride(std::int64_t C) { return thread_stride(2 * C, sizeof(double), 0); }

// The group sums of type A: 2C per thread, after up to kAliasPeriod of room for placement.
template <class A>
std::size_t groups_stride(std::int64_t C) {
  return thread_stride(2 * C, sizeof(A), kAliasPeriod);
}


// The group sums gu[C], gv[C] of type A, in a thread's group scratch `room` (kAliasPeriod bytes
// of room, then 2C elements; reduce_rows stores to them for every vector it loads). Addresses
// of a channels-last row's element k repeat modulo the period p = gcd(C * sizeof(A), 4096) from
// row to row; gu is put at the residue modulo p farthest from those of the other arrays the
// loop touches (`loaded`: the tensors and per-channel values the op reads, at most 3; and the
// fp64 sums pu, pv = pu + C), and gv = gu + C, congruent to gu, so that no store to them
// 4K-aliases a load of a nearby element. (Group sums 4 KiB after pu measured 1.5x slower than
// other placements for C = 256 fp32 on AMD EPYC.)
template <class A>
struct GroupSums {
  A* gu = nullptr;
  A* gv = nullptr;
};

template <class A>
GroupSums<A> place_group_sums(A* room, const double* pu, std::int64_t C,
                              std::initializer_list<const void*> loaded) {
  const std::uintptr_t row = static_cast<std::uintptr_t>(C) * sizeof(A);
  std::uintptr_t p = kAliasPeriod;
  while (row % p != 0) p /= 2;  // p >= sizeof(A): row is a multiple of it
  std::uintptr_t residue[4] = {reinterpret_cast<std::uintptr_t>(pu) % p};
  std::size_t n = 1;
  for (const void* a : loaded) {
    if (n < 4) residue[n++] = reinterpret_cast<std::uintptr_t>(a) % p;
  }
  for (std::size_t i = 1; i < n; ++i) {  // sort (std::sort trips GCC 12's -Warray-bounds here)
    for (std::size_t j = i; j > 0 && residue[j - 1] > residue[j]; --j) {
      std::swap(residue[j - 1], residue[j]);
    }
  }
  std::uintptr_t target = residue[0] + p / 2, widest = 0;
  for (std::size_t i = 0; i < n; ++i) {  // the middle of the widest gap between residues
    const std::uintptr_t next = i + 1 < n ? residue[i + 1] : residue[0] + p;
    if (next - residue[i] > widest) {
      widest = next - residue[i];
      target = residue[i] + widest / 2;
    }
  }
  target = target % p / sizeof(A);  // in whole elements (room is A-aligned)
  const std::uintptr_t at = reinterpret_cast<std::uintptr_t>(room) % p / sizeof(A);
  A* const gu = room + (target + p / sizeof(A) - at) % (p / sizeof(A));
  return {gu, gu + C};
}


// The relu's backward of one element: dy where keep is 1, 0 where it is 0 (keep = y > 0, NaN in
// y: 0; or the forward's mask byte is not 0), as a bitwise AND with a mask made from keep: a select
// written as `y > 0 ? dy : 0` compiles to a branch inside the reductions' unrolled lane loops
// (measured 2x slower on AVX-512).
template <class T>
inline T gate(unsigned keep, T dy) {
  using U = std::conditional_t<sizeof(T) == 8, std::uint64_t, std::uint32_t>;
  U bits;
  std::memcpy(&bits, &dy, sizeof bits);
  bits &= U(0) - static_cast<U>(keep);
  T g;
  std::memcpy(&g, &bits, sizeof g);
  return g;
}

// Where a backward's relu mask comes from: none (no activation), the forward's output y, or the
// forward's mask bytes (MaskByte, one per element).
enum class Gate { none, y, mask };
template <Gate G>
using GateTag = std::integral_constant<Gate, G>;

// g of element i: dy[i], gated by y[i] > 0 or by mask[i].
template <Gate G, class T>
inline T gated(const T* dy, const T* y, const MaskByte* mask, std::int64_t i) {
  if constexpr (G == Gate::y) {
    return gate(static_cast<unsigned>(y[i] > T(0)), dy[i]);
  } else if constexpr (G == Gate::mask) {
    return gate(static_cast<unsigned>(mask[i] != MaskByte{0}), dy[i]);
  } else {
    return dy[i];
  }
}

// Calls body(GateTag<...>{}) for the gate that y and mask give (mask first).
template <class Body>
void with_gate(const void* y, const MaskByte* mask, const Body& body) {
  if (mask != nullptr) {
    body(GateTag<Gate::mask>{});
  } else if (y != nullptr) {
    body(GateTag<Gate::y>{});
  } else {
    body(GateTag<Gate::none>{});
  }
}

// The two contributions of one element to a reduction, in type A. Returned by value: an address
// taken inside an "omp simd" loop makes GCC keep the variable in memory, one slot per lane.
template <class A, class B = A>
struct Pair {
  A u;
  B v;
};

// Channels-last rows [r_begin, r_end) of C channels, added into the fp64 sums pu[C], pv[C]. Each
// group of kGroupRows rows is first summed in type A into gu[C], gv[C] (vectorized across
// channels, M rows per sweep), then merged into pu, pv: the fp64 sums are touched once per group.
template <int M, class A, class Op>
void reduce_rows(const Op& op, std::int64_t C, std::int64_t r_begin, std::int64_t r_end,
                 A* const gu, A* const gv, double* pu, double* pv) {
  for (std::int64_t r0 = r_begin; r0 < r_end; r0 += kGroupRows) {
    const std::int64_t r1 = std::min(r0 + kGroupRows, r_end);
#pragma omp simd
    for (std::int64_t k = 0; k < C; ++k) {
      gu[k] = A(0);
      gv[k] = A(0);
    }
    std::int64_t r = r0;
    for (; r + M <= r1; r += M) {
#pragma omp simd
      for (std::int64_t k = 0; k < C; ++k) {
        A su = gu[k], sv = gv[k];
        for (int m = 0; m < M; ++m) {
          const Pair<A> p = op(A{}, (r + m) * C + k, k);
          su += p.u;
          sv += p.v;
        }
        gu[k] = su;
        gv[k] = sv;
      }
    }
    for (; r < r1; ++r) {
#pragma omp simd
      for (std::int64_t k = 0; k < C; ++k) {
        const Pair<A> p = op(A{}, r * C + k, k);
        gu[k] += p.u;
        gv[k] += p.v;
      }
    }
#pragma omp simd
    for (std::int64_t k = 0; k < C; ++k) {
      pu[k] += static_cast<double>(gu[k]);
      pv[k] += static_cast<double>(gv[k]);
    }
  }
}

// Channels-last rows of at most this many bytes keep their group sums in registers
// (reduce_rows_blocked): 4 vectors of the widest instruction set compiled for, so that the two
// sums and the values they are formed from fit in its registers.
#if defined(__AVX512F__)
constexpr std::int64_t kBlockBytes = 256;
#elif defined(__AVX2__)
constexpr std::int64_t kBlockBytes = 128;
#else
constexpr std::int64_t kBlockBytes = 64;
#endif

// reduce_rows for rows of at most kBlockBytes: every row of a group of kGroupRows rows is added
// into W pairs of accumulators held in registers, merged into pu, pv once per group. The same
// additions in the same order as reduce_rows (bitwise the same sums), without its load and store
// of the group sums for every row: for C = 16 to 64 fp32 on AVX-512 (AMD EPYC) 0.79-0.90x the
// forward time of reduce_rows<1>. (Wider rows swept this way block by block, a strided walk
// down the group, measured up to 1.25x slower than reduce_rows.) Written for any C: channels
// past the last whole block of W take a block of their own, of runtime width.
template <class A, class Op>
void reduce_rows_blocked(const Op& op, std::int64_t C, std::int64_t r_begin, std::int64_t r_end,
                         double* pu, double* pv) {
  constexpr int W = static_cast<int>(kBlockBytes / static_cast<std::int64_t>(sizeof(A)));
  const std::int64_t full = C / W * W;
  // Rows [r0, r1) of channels [k0, k0 + width) into a block of accumulators, then merged. A
  // whole block passes its width as a compile-time constant: a loop of known length over
  // arrays of known size is what GCC keeps in registers.
  auto block = [&](std::int64_t r0, std::int64_t r1, std::int64_t k0, auto width) {
    A au[W] = {}, av[W] = {};
    for (std::int64_t r = r0; r < r1; ++r) {
      const std::int64_t base = r * C + k0;
      for (int k = 0; k < static_cast<int>(width); ++k) {
        const Pair<A> p = op(A{}, base + k, k0 + k);
        au[k] += p.u;
        av[k] += p.v;
      }
    }
    for (int k = 0; k < static_cast<int>(width); ++k) {
      pu[k0 + k] += static_cast<double>(au[k]);
      pv[k0 + k] += static_cast<double>(av[k]);
    }
  };
  for (std::int64_t r0 = r_begin; r0 < r_end; r0 += kGroupRows) {
    const std::int64_t r1 = std::min(r0 + kGroupRows, r_end);
    for (std::int64_t k0 = 0; k0 < full; k0 += W) {
      block(r0, r1, k0, std::integral_constant<int, W>{});
    }
    if (full < C) block(r0, r1, full, static_cast<int>(C - full));
  }
}

// Channels-last rows of a whole number of block pairs (2 kBlockBytes each) shorter than
// kMultiRowBytes also keep their group sums in registers where there are 32 vector registers
// (AVX-512; other instruction sets take reduce_rows<1>): each group of kGroupRows rows is swept
// one pair of blocks at a time, with two accumulator sets, one per block (the second and later
// pairs re-read the group's rows from L1 or L2). The same additions in the same order as
// reduce_rows<1> (the same sums, where the compiler contracts both alike). One array of 2W
// accumulators is not kept in registers by GCC 12 (measured 1.5-2.1x slower than reduce_rows);
// two arrays of W are: 0.79-0.85x the forward time of reduce_rows<1> for C = 128 fp32 (the AMD
// EPYC VM of 2026-12-03). For longer rows reduce_rows<1> stores and reloads 2C group sums per
// row, and on AMD EPYC (Zen 5) its loads of x then ran at half the channels-first rate (4K
// aliasing against those stores is the likely cause): the pair sweep took 0.54-0.62x (C = 256
// fp32) and 0.68-0.69x (C = 512) of its time forward and backward (one thread, in-process A/B
// of the reductions alone; C = 640-896, measured with the machine loaded, 0.25-0.88x), and
// 1.08-1.13x at 4 KiB rows, which keep reduce_rows<4>. Whole passes with kernel_bench
// (bench/results/2026-12-06-kernel_bench-nhwc-pairs-{before,after}.txt, two alternated rounds):
// forward 0.68-0.92x, backward 0.68-0.86x for 256x56x56, 512x28x28, 512x14x14 and 512x7x7.
#if defined(__AVX512F__)
constexpr bool kTwoBlocks = true;
#else
constexpr bool kTwoBlocks = false;
#endif

template <class A, class Op>
void reduce_rows_two_blocks(const Op& op, std::int64_t C, std::int64_t r_begin,
                            std::int64_t r_end, double* pu, double* pv) {
  constexpr int W = static_cast<int>(kBlockBytes / static_cast<std::int64_t>(sizeof(A)));
  for (std::int64_t r0 = r_begin; r0 < r_end; r0 += kGroupRows) {
    const std::int64_t r1 = std::min(r0 + kGroupRows, r_end);
    for (std::int64_t k0 = 0; k0 < C; k0 += 2 * W) {
      A au[W] = {}, av[W] = {}, bu[W] = {}, bv[W] = {};
      for (std::int64_t r = r0; r < r1; ++r) {
        const std::int64_t base = r * C + k0;
        for (int k = 0; k < W; ++k) {
          const Pair<A> p = op(A{}, base + k, k0 + k);
          au[k] += p.u;
          av[k] += p.v;
        }
        for (int k = 0; k < W; ++k) {
          const Pair<A> p = op(A{}, base + W + k, k0 + W + k);
          bu[k] += p.u;
          bv[k] += p.v;
        }
      }
      for (int k = 0; k < W; ++k) {
        pu[k0 + k] += static_cast<double>(au[k]);
        pv[k0 + k] += static_cast<double>(av[k]);
        pu[k0 + W + k] += static_cast<double>(bu[k]);
        pv[k0 + W + k] += static_cast<double>(bv[k]);
      }
    }
  }
}

// The two reductions share one traversal. An Op gives, for element i of channel c, the Pair<B>
// whose u and v are summed per channel, computed in type B (op(B{}, i, c)). Channels-first
// pieces take fp64 pairs (exact for fp32 data) into fp64 accumulators; channels-last rows take
// pairs in A (the data type) into group sums merged in fp64 (reduce_rows).
//
// `loaded` (at most 3) are the arrays the op reads, for place_group_sums; `streams` of them are
// tensors (the others are per-channel values).
template <class A, class Op>
void reduce_pairs(const Geometry& g, const Op& op, std::initializer_list<const void*> loaded,
                  int streams, double* out_u, double* out_v, Workspace& ws) {
  const std::int64_t C = g.channels;
  const int nt = threads_for(g.outer * C * g.inner);
  const std::size_t stride = sums_stride(C), gstride = groups_stride<A>(C);
  // Within reserve_workspace's capacity unless the thread count grew.
  double* const partials = zeroed_sums(ws, static_cast<std::size_t>(nt) * stride);
  // The group sums need no zeroing here: reduce_rows zeroes them at the start of every group.
  A* const groups =
      g.inner == 1 ? group_room(ws, static_cast<std::size_t>(nt) * gstride, static_cast<A*>(nullptr))
                   : nullptr;

  // Short channels-first rows, channel by channel (see kShortRow): thread t takes whole
  // channels, all of their rows.
  const bool by_channel = g.inner > 1 && g.inner * streams < kShortRow && C >= nt;

#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    const int t = omp_get_thread_num();
    double* const pu = partials + static_cast<std::size_t>(t) * stride;
    double* const pv = pu + C;
    if (by_channel) {
      std::int64_t c_lo, c_hi;
      share(C, t, omp_get_num_threads(), c_lo, c_hi);
      const std::int64_t S = g.inner, row_stride = C * S;
      for (std::int64_t c = c_lo; c < c_hi; ++c) {
        // The loop of the row-by-row path below, with kShortLanes (written out twice: a shared
        // helper taking the accumulators by reference measured 1.2-1.6x slower here).
        double au[kShortLanes] = {}, av[kShortLanes] = {};
        for (std::int64_t n = 0, base = c * S; n < g.outer; ++n, base += row_stride) {
          std::int64_t i = 0;
          for (; i + kShortLanes <= S; i += kShortLanes) {
            for (int k = 0; k < kShortLanes; ++k) {
              const Pair<double> p = op(0.0, base + i + k, c);
              au[k] += p.u;
              av[k] += p.v;
            }
          }
          for (int k = 0; i < S; ++i, ++k) {
            const Pair<double> p = op(0.0, base + i, c);
            au[k] += p.u;
            av[k] += p.v;
          }
        }
        double su = 0.0, sv = 0.0;
        for (int k = 0; k < kShortLanes; ++k) {
          su += au[k];
          sv += av[k];
        }
        pu[c] = su;
        pv[c] = sv;
      }
    } else {
      const GroupSums<A> gs =
          g.inner == 1 ? place_group_sums<A>(groups + static_cast<std::size_t>(t) * gstride,
                                             pu, C, loaded)
                       : GroupSums<A>{};
      for_share(g, t, omp_get_num_threads(),
                [&](std::int64_t begin, std::int64_t end, std::int64_t c) {
        if (c < 0) {
          const std::int64_t row_bytes = C * static_cast<std::int64_t>(sizeof(A));
          if (row_bytes <= kBlockBytes) {
            reduce_rows_blocked<A>(op, C, begin / C, end / C, pu, pv);
          } else if (kTwoBlocks && row_bytes % (2 * kBlockBytes) == 0 &&
                     row_bytes < kMultiRowBytes) {
            reduce_rows_two_blocks<A>(op, C, begin / C, end / C, pu, pv);
          } else if (row_bytes >= kMultiRowBytes) {
            reduce_rows<4>(op, C, begin / C, end / C, gs.gu, gs.gv, pu, pv);
          } else {
            reduce_rows<1>(op, C, begin / C, end / C, gs.gu, gs.gv, pu, pv);
          }
        } else {
          // Channels-first piece of one channel: kLanes independent accumulators (in registers,
          // vectorized across lanes), so neither the add latency nor a reduction through memory
          // bounds the loop; lanes are summed once per piece.
          double au[kLanes] = {}, av[kLanes] = {};
          std::int64_t i = begin;
          for (; i + kLanes <= end; i += kLanes) {
            for (int k = 0; k < kLanes; ++k) {
              const Pair<double> p = op(0.0, i + k, c);
              au[k] += p.u;
              av[k] += p.v;
            }
          }
          for (int k = 0; i < end; ++i, ++k) {
            const Pair<double> p = op(0.0, i, c);
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

// Non-temporal stores of the widest vectors this instruction set has (none off x86-64): they
// write whole lines to memory without first reading them into the cache.
#if defined(__AVX512F__)
constexpr std::size_t kStreamVector = 64;
inline void stream_vector(float* p, const float* s) { _mm512_stream_ps(p, _mm512_loadu_ps(s)); }
inline void stream_vector(double* p, const double* s) { _mm512_stream_pd(p, _mm512_loadu_pd(s)); }
inline void stream_vector(MaskByte* p, const MaskByte* s) {
  _mm512_stream_si512(reinterpret_cast<__m512i*>(p), _mm512_loadu_si512(s));
}
#elif defined(__AVX__)
constexpr std::size_t kStreamVector = 32;
inline void stream_vector(float* p, const float* s) { _mm256_stream_ps(p, _mm256_loadu_ps(s)); }
inline void stream_vector(double* p, const double* s) { _mm256_stream_pd(p, _mm256_loadu_pd(s)); }
inline void stream_vector(MaskByte* p, const MaskByte* s) {
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p),
                      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s)));
}
#elif defined(__SSE2__)
constexpr std::size_t kStreamVector = 16;
inline void stream_vector(float* p, const float* s) { _mm_stream_ps(p, _mm_loadu_ps(s)); }
inline void stream_vector(double* p, const double* s) { _mm_stream_pd(p, _mm_loadu_pd(s)); }
inline void stream_vector(MaskByte* p, const MaskByte* s) {
  _mm_stream_si128(reinterpret_cast<__m128i*>(p), _mm_loadu_si128(reinterpret_cast<const __m128i*>(s)));
}
#else
constexpr std::size_t kStreamVector = 0;
#endif

// Orders this thread's non-temporal stores (weakly ordered) before its later stores, so that they
// are visible to the other threads after the parallel region's barrier.
inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// dst[0, n) = src[0, n): ordinary stores up to dst's first vector boundary and after its last,
// non-temporal ones between (a dst not aligned to T takes ordinary stores throughout).
template <class T>
void stream_out(T* dst, const T* src, std::int64_t n) {
  std::int64_t i = 0;
  if constexpr (kStreamVector != 0) {
    constexpr std::int64_t V = static_cast<std::int64_t>(kStreamVector / sizeof(T));
    const auto at = reinterpret_cast<std::uintptr_t>(dst);
    if (at % sizeof(T) == 0) {
      const auto head = static_cast<std::int64_t>((kStreamVector - at % kStreamVector) %
                                                  kStreamVector / sizeof(T));
      for (; i < std::min(head, n); ++i) dst[i] = src[i];
      for (; i + V <= n; i += V) stream_vector(dst + i, src + i);
    }
  }
  for (; i < n; ++i) dst[i] = src[i];
}

// Bytes of each of a thread's staging buffers (one per output): an elementwise pass that streams
// computes this much of its output into the L1-resident buffer, then streams it out.
constexpr std::int64_t kStageBytes = 4096;
// Channels-last passes stage less of y0 at a time: kStageBytesLast, twice that with a mask as
// second output (whose stage is then a quarter of y0's in fp32). Their per-channel parameters
// are vectors loaded beside x, and with 4 KiB stages these passes ran at half the channels-first
// speed on AMD EPYC (Zen 5), varying 1.7x with where the parameter arrays lay: 4K aliasing of
// those loads against the stage's recent stores is the likely cause. Measured there with
// kernel_bench (bench/results/2026-12-06-kernel_bench-nhwc-stage-{before,after}.txt), fp32,
// one thread, the four shapes above the LLC (C = 64 to 512): backward 0.68-0.81x and forward
// 0.63-0.95x of the time they took with 4 KiB stages. An in-process A/B of the passes alone
// put 512 B at 0.82-0.94x of 1 KiB without a mask and 1.05-1.21x with one.
constexpr std::int64_t kStageBytesLast = 512;

// One elementwise traversal for every output pass: op(i, c) returns the output of element i of
// channel c, a T for y0, or a Pair<T, T1> (u for y0, v for y1). Outputs of at least
// stream_output_bytes() (both together) are staged and written with non-temporal stores.
template <class T, class T1, class Op>
void map_elements(const Geometry& g, T* y0, T1* y1, const Op& op) {
  using R = decltype(op(std::int64_t{}, std::int64_t{}));
  constexpr bool kTwo = std::is_same_v<R, Pair<T, T1>>;
  const std::int64_t C = g.channels, count = g.outer * C * g.inner;
  const bool stream =
      kStreamVector != 0 &&
      static_cast<std::size_t>(count) * (sizeof(T) + (kTwo ? sizeof(T1) : 0)) >=
          stream_output_bytes();
  const int nt = threads_for(count);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    for_share(g, omp_get_thread_num(), omp_get_num_threads(),
              [&](std::int64_t begin, std::int64_t end, std::int64_t c) {
      if (!stream) {
        auto put = [&](std::int64_t i, std::int64_t k) {
          const R r = op(i, k);
          if constexpr (kTwo) {
            y0[i] = r.u;
            y1[i] = r.v;
          } else {
            y0[i] = r;
          }
        };
        if (c < 0) {
          for (std::int64_t r = begin; r < end; r += C) {
#pragma omp simd
            for (std::int64_t k = 0; k < C; ++k) put(r + k, k);
          }
        } else {
#pragma omp simd
          for (std::int64_t i = begin; i < end; ++i) put(i, c);
        }
        return;
      }
      constexpr std::int64_t S = kStageBytes / static_cast<std::int64_t>(sizeof(T));
      alignas(64) T b0[S];
      constexpr std::int64_t SL =
          kStageBytesLast * (std::is_same_v<T1, MaskByte> && kTwo ? 2 : 1) /
          static_cast<std::int64_t>(sizeof(T));
      alignas(64) T1 b1[kTwo ? S : 1];
      // Streams the staged elements [i0, i0 + n) out: part of one channel's row (channels-first),
      // or whole rows or part of one (channels-last).
      auto flush = [&](std::int64_t i0, std::int64_t n) {
        stream_out(y0 + i0, b0, n);
        if constexpr (kTwo) stream_out(y1 + i0, b1, n);
      };
      auto stage = [&](std::int64_t j, std::int64_t i, std::int64_t k) {
        const R r = op(i, k);
        if constexpr (kTwo) {
          b0[j] = r.u;
          b1[j] = r.v;
        } else {
          b0[j] = r;
        }
      };
      if (c >= 0) {
        for (std::int64_t i0 = begin; i0 < end; i0 += S) {
          const std::int64_t n = std::min(S, end - i0);
#pragma omp simd
          for (std::int64_t j = 0; j < n; ++j) stage(j, i0 + j, c);
          flush(i0, n);
        }
      } else if (C <= SL) {
        const std::int64_t rows = SL / C;  // whole rows per stage
        for (std::int64_t i0 = begin; i0 < end; i0 += rows * C) {
          const std::int64_t n = std::min(rows * C, end - i0);
          for (std::int64_t j0 = 0; j0 < n; j0 += C) {
#pragma omp simd
            for (std::int64_t k = 0; k < C; ++k) stage(j0 + k, i0 + j0 + k, k);
          }
          flush(i0, n);
        }
      } else {
        for (std::int64_t r = begin; r < end; r += C) {
          for (std::int64_t k0 = 0; k0 < C; k0 += SL) {
            const std::int64_t n = std::min(SL, C - k0);
#pragma omp simd
            for (std::int64_t j = 0; j < n; ++j) stage(j, r + k0 + j, k0 + j);
            flush(r + k0, n);
          }
        }
      }
    });
    if (stream) stream_fence();
  }
}

}  // namespace

void reserve_workspace(Workspace& ws, std::int64_t channels) {
  const auto nt = static_cast<std::size_t>(std::max(1, omp_get_max_threads()));
  reserve_memory(ws, nt * sums_stride(channels), nt * groups_stride<float>(channels),
                 nt * groups_stride<double>(channels));
}

namespace {

// Whether all C of u and v are finite.
bool all_finite(const double* u, const double* v, std::int64_t C) {
  bool ok = true;
  for (std::int64_t c = 0; c < C; ++c) ok &= std::isfinite(u[c]) && std::isfinite(v[c]);
  return ok;
}

// reduce_pairs in the data type T; for fp32 data whose group sums came out non-finite (an fp32
// overflow, or non-finite data), again in fp64, so that only non-finite data give non-finite
// sums, as in the channels-first path.
template <class T, class Op>
void reduce_data(const Geometry& g, const Op& op, std::initializer_list<const void*> loaded,
                 int streams, double* out_u, double* out_v, Workspace& ws) {
  reduce_pairs<T>(g, op, loaded, streams, out_u, out_v, ws);
  if (std::is_same_v<T, float> && g.inner == 1 && !all_finite(out_u, out_v, g.channels)) {
    reduce_pairs<double>(g, op, loaded, streams, out_u, out_v, ws);
  }
}

}  // namespace

template <class T>
void reduce_moments(const Geometry& g, const T* x, const T* shift, double* sum, double* sumsq,
                    Workspace& ws) {
  reduce_data<T>(
      g,
      [x, shift](auto b, std::int64_t i, std::int64_t c) {
        using B = decltype(b);
        const B xi = static_cast<B>(x[i]) - static_cast<B>(shift[c]);
        return Pair<B>{xi, xi * xi};
      },
      {x, shift}, 1, sum, sumsq, ws);
}

template <class T>
void reduce_grad(const Geometry& g, const T* x, const T* dy, const T* y, const MaskByte* mask,
                 const T* center, double* sum_g, double* sum_gx, Workspace& ws) {
  // g = dy, or dy gated by y > 0 or by the mask (the activation's backward, in the same
  // traversal).
  with_gate(y, mask, [&](auto gate_tag) {
    constexpr Gate G = decltype(gate_tag)::value;
    const void* const third = G == Gate::y      ? static_cast<const void*>(y)
                              : G == Gate::mask ? static_cast<const void*>(mask)
                                                : static_cast<const void*>(center);
    reduce_data<T>(
        g,
        [x, dy, y, mask, center](auto b, std::int64_t i, std::int64_t c) {
          using B = decltype(b);
          const B gi = static_cast<B>(gated<G>(dy, y, mask, i));
          return Pair<B>{gi, gi * (static_cast<B>(x[i]) - static_cast<B>(center[c]))};
        },
        {x, dy, third}, G == Gate::none ? 2 : 3, sum_g, sum_gx, ws);
  });
}

template <class T>
void normalize(const Geometry& g, const T* x, const T* z, const T* center, const T* scale,
               const T* shift, bool relu, T* y, MaskByte* mask) {
  // v = (x - center) scale + shift [+ z], then max(v, 0) with relu (NaN stays NaN, as torch.relu),
  // and mask = v > 0 where asked for.
  auto pass = [&](auto add, auto rectify, auto masked) {
    constexpr bool kAdd = decltype(add)::value, kRelu = decltype(rectify)::value;
    constexpr bool kMask = decltype(masked)::value;
    map_elements(g, y, mask, [=](std::int64_t i, std::int64_t c) {
      T v = (x[i] - center[c]) * scale[c] + shift[c];
      if constexpr (kAdd) v += z[i];
      // max(v, 0) > 0 exactly where v > 0 (NaN: neither). Taken from v before the relu: the
      // comparison of the relu's result stops GCC 12 from vectorizing the loop.
      const auto keep = static_cast<MaskByte>(v > T(0));
      if constexpr (kRelu) v = v < T(0) ? T(0) : v;
      if constexpr (kMask) {
        return Pair<T, MaskByte>{v, keep};
      } else {
        (void)keep;
        return v;
      }
    });
  };
  using Yes = std::true_type;
  using No = std::false_type;
  if (z != nullptr && mask != nullptr) {
    pass(Yes{}, Yes{}, Yes{});  // add is always followed by relu
  } else if (z != nullptr) {
    pass(Yes{}, Yes{}, No{});
  } else if (relu && mask != nullptr) {
    pass(No{}, Yes{}, Yes{});
  } else if (relu) {
    pass(No{}, Yes{}, No{});
  } else {
    pass(No{}, No{}, No{});
  }
}

template <class T>
void backward_elemt(const Geometry& g, const T* x, const T* dy, const T* y, const MaskByte* mask,
                    const T* center, const T* a, const T* k, const T* d, T* dx, T* dz) {
  // g = dy, or dy gated by y > 0 or by the mask; dx = a g - k (x - center) + d; dz = g.
  with_gate(y, mask, [&](auto gate_tag) {
    constexpr Gate G = decltype(gate_tag)::value;
    auto pass = [&](auto residual) {
      constexpr bool kResidual = decltype(residual)::value;
      map_elements(g, dx, dz, [=](std::int64_t i, std::int64_t c) {
        const T gi = gated<G>(dy, y, mask, i);
        const T dxi = a[c] * gi - k[c] * (x[i] - center[c]) + d[c];
        if constexpr (kResidual) {
          return Pair<T>{dxi, gi};
        } else {
          return dxi;
        }
      });
    };
    if constexpr (G == Gate::none) {
      pass(std::false_type{});  // dz needs an activation
    } else if (dz != nullptr) {
      pass(std::true_type{});
    } else {
      pass(std::false_type{});
    }
  });
}

SYNCBN_CPU_INSTANTIATE_KERNELS(float)
SYNCBN_CPU_INSTANTIATE_KERNELS(double)

}  // namespace syncbn::cpu::SYNCBN_CPU_ISA
