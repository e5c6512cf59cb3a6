// The shared driver's timing statistics, header-only and free of CLI11 and MPI (so that nvcc can
// compile it too): the monotonic clock, the median and minimum of timed rounds, and a loop that
// times warmup + iters calls. bench_driver.hpp includes it.
#ifndef SYNCBN_BENCH_STATS_HPP
#define SYNCBN_BENCH_STATS_HPP

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <limits>
#include <utility>
#include <vector>

namespace bench {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// ---- timing -------------------------------------------------------------------------------------

// Seconds on the monotonic clock (std::chrono::steady_clock) since its epoch.
inline double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// NaN if empty; of an even count, the upper of the two middle values.
inline double median(std::vector<double> v) {
  if (v.empty()) return kNaN;
  const std::size_t mid = v.size() / 2;
  std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(mid), v.end());
  return v[mid];
}

inline double minimum(const std::vector<double>& v) {  // NaN if empty
  return v.empty() ? kNaN : *std::min_element(v.begin(), v.end());
}

// warmup untimed calls of f, then iters timed ones: one call's seconds each, in order.
template <class F>
std::vector<double> sample_seconds(int iters, int warmup, F&& f) {
  for (int i = 0; i < warmup; ++i) f();
  std::vector<double> t;
  t.reserve(static_cast<std::size_t>(iters));
  for (int i = 0; i < iters; ++i) {
    const auto a = std::chrono::steady_clock::now();
    f();
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count());
  }
  return t;
}

template <class F>
double median_seconds(int iters, int warmup, F&& f) {
  return median(sample_seconds(iters, warmup, std::forward<F>(f)));
}

}  // namespace bench

#endif  // SYNCBN_BENCH_STATS_HPP
