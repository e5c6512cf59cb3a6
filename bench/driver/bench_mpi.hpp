// The shared driver's MPI part (header-only, for the benches that run on MPI ranks): reductions
// of timings over ranks (max, min), the per-round barrier timing of interleaved operations and
// the lockstep time of one of them (all ranks together, per round), and whether every rank is on
// one host (one steady clock). Kept apart from bench_driver.hpp so that a bench without MPI (the
// CUDA one) needs no mpi.h.
#ifndef SYNCBN_BENCH_MPI_HPP
#define SYNCBN_BENCH_MPI_HPP

#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "bench_driver.hpp"

namespace bench {

inline double max_over_ranks(double v, MPI_Comm comm) {
  MPI_Allreduce(MPI_IN_PLACE, &v, 1, MPI_DOUBLE, MPI_MAX, comm);
  return v;
}

// Element-wise maximum over ranks, in place.
inline void max_over_ranks(std::vector<double>& v, MPI_Comm comm) {
  MPI_Allreduce(MPI_IN_PLACE, v.data(), static_cast<int>(v.size()), MPI_DOUBLE, MPI_MAX, comm);
}

inline void min_over_ranks(std::vector<double>& v, MPI_Comm comm) {
  MPI_Allreduce(MPI_IN_PLACE, v.data(), static_cast<int>(v.size()), MPI_DOUBLE, MPI_MIN, comm);
}

inline long min_over_ranks(long v, MPI_Comm comm) {
  MPI_Allreduce(MPI_IN_PLACE, &v, 1, MPI_LONG, MPI_MIN, comm);
  return v;
}

// True if every rank reports the same processor name (MPI_Get_processor_name): one host, so
// that the ranks' steady clocks are one clock. Collective.
inline bool one_host(MPI_Comm comm) {
  char name[MPI_MAX_PROCESSOR_NAME] = {};
  int length = 0;
  MPI_Get_processor_name(name, &length);
  unsigned long h[2];
  h[0] = std::hash<std::string>{}(std::string(name, static_cast<std::size_t>(length)));
  h[1] = ~h[0];
  MPI_Allreduce(MPI_IN_PLACE, h, 2, MPI_UNSIGNED_LONG, MPI_MAX, comm);
  return h[0] == ~h[1];  // max(h) == min(h)
}

// One measured operation of an interleaved timing.
struct Op {
  std::function<void()> run;
  std::vector<double> seconds;  // this rank's time of each timed round, in round order
  std::vector<double> started;  // when each of them started on this rank (now_seconds())
};

// Interleaved timing: warmup untimed rounds, then iters timed rounds, each running every op
// once, every call after an MPI_Barrier. Load from outside (shared machines) then falls on all
// ops alike, and their ratios stay meaningful. Each round runs the ops in a new random order
// (the same on every rank: the generator is seeded with the round number), so that no op
// always follows the same one: what a predecessor leaves in the caches would bias the
// comparison. Returns, per op, the median of one call's wall time on this rank, then the
// maximum over ranks (seconds). The samples stay in op.seconds (their starts in op.started).
// Collective.
inline std::vector<double> time_interleaved(std::vector<Op>& ops, int iters, int warmup,
                                            MPI_Comm comm) {
  std::vector<std::size_t> order(ops.size());
  for (int round = 0; round < warmup + iters; ++round) {
    std::iota(order.begin(), order.end(), std::size_t{0});
    std::mt19937 rng(static_cast<unsigned>(round));
    std::shuffle(order.begin(), order.end(), rng);
    for (const std::size_t j : order) {
      MPI_Barrier(comm);
      const auto a = std::chrono::steady_clock::now();
      ops[j].run();
      const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count();
      if (round >= warmup) {
        ops[j].seconds.push_back(t);
        ops[j].started.push_back(std::chrono::duration<double>(a.time_since_epoch()).count());
      }
    }
  }
  std::vector<double> med;
  for (const Op& op : ops) med.push_back(median(op.seconds));
  max_over_ranks(med, comm);
  return med;
}

// An op of time_interleaved as all ranks ran it together, per timed round (seconds, round
// order; the same on every rank): from the first rank's start to the last rank's end where the
// ranks share one steady clock (one_clock: one host), else the longest rank's time. The
// barrier starts the ranks together, so this is how long the machine took to do every rank's
// share at once, the ranks competing for memory bandwidth as in the other ops. From a common
// start rather than each rank's own: a rank that started late (descheduled after the barrier)
// ran partly alone and faster, and its own time alone would make that round look fast.
// Collective.
inline std::vector<double> lockstep_seconds(const Op& op, bool one_clock, MPI_Comm comm) {
  std::vector<double> t = op.seconds;
  if (!one_clock) {
    max_over_ranks(t, comm);
    return t;
  }
  std::vector<double> start = op.started, end(t.size());
  for (std::size_t i = 0; i < t.size(); ++i) end[i] = start[i] + t[i];
  min_over_ranks(start, comm);
  max_over_ranks(end, comm);
  for (std::size_t i = 0; i < t.size(); ++i) t[i] = end[i] - start[i];
  return t;
}

}  // namespace bench

#endif  // SYNCBN_BENCH_MPI_HPP
