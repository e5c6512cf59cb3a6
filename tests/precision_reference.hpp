// tests/precision_reference.hpp: the exact-enough reference and the data of the precision goals
// of the shared shift (README.md "Precision"; tests/cpu/test_precision.cpp, one process, and
// tests/test_shared_shift.cpp, threads as ranks).
//
// The goals ask for a relative error of the variance below 1e-13 for fp64 data with
// mean / std = 1e4, so the reference itself must be good to ~1e-16 or better on every platform.
// reference.hpp's batch_stats (a plain long-double two-pass) is close on x86-64 (measured
// 3e-17 to 5e-17 here: its result is rounded to double, and m / (m - 1) then rounds again), but
// its plain sums are only bounded by ~m * 2^-53 where long double is double (MSVC, Apple arm64).
// So: Neumaier-compensated long-double sums, the mean refined by a second pass (mean +=
// sum(x - mean) / m), the centered squares in a third pass with the corrected two-pass formula
// (Chan, Golub & LeVeque 1983), everything kept in long double until compared. Error: a few
// units of the long double (~1e-19 on x86-64, ~1e-16 where long double is double; the goals'
// bounds are 1e-13 and wider). PrecisionReference.ExactOnIntegerData checks it against integer
// arithmetic.
#ifndef SYNCBN_TESTS_PRECISION_REFERENCE_HPP
#define SYNCBN_TESTS_PRECISION_REFERENCE_HPP

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <ostream>
#include <sstream>
#include <string>
#include <vector>

#include "reference.hpp"

namespace syncbn_test {

// Neumaier's compensated sum, in long double.
class CompensatedSum {
 public:
  void add(long double v) {
    const long double t = s_ + v;
    c_ += std::fabs(s_) >= std::fabs(v) ? (s_ - t) + v : (v - t) + s_;
    s_ = t;
  }
  long double value() const { return s_ + c_; }

 private:
  long double s_ = 0, c_ = 0;
};

// Per channel: the mean and the biased variance of a batch, in long double.
struct ExactStats {
  int64_t count = 0;  // m
  std::vector<long double> mean, var;

  long double unbiased(size_t c) const {
    const long double m = static_cast<long double>(count);
    return var[c] * m / (m - 1);
  }
  long double invstd(size_t c, double eps) const {
    return 1.0L / std::sqrt(var[c] + static_cast<long double>(eps));
  }
};

inline ExactStats exact_stats(const ChannelValues& v) {
  ExactStats r;
  r.count = v.empty() ? 0 : static_cast<int64_t>(v[0].size());
  const long double m = static_cast<long double>(r.count);
  for (const auto& vals : v) {
    CompensatedSum s;
    for (double x : vals) s.add(x);
    long double mean = s.value() / m;
    CompensatedSum d;
    for (double x : vals) d.add(static_cast<long double>(x) - mean);
    mean += d.value() / m;
    CompensatedSum q, e;
    for (double x : vals) {
      const long double t = static_cast<long double>(x) - mean;
      q.add(t * t);
      e.add(t);
    }
    const long double em = e.value() / m;
    r.mean.push_back(mean);
    r.var.push_back(std::max(q.value() / m - em * em, 0.0L));
  }
  return r;
}

// SYNCBN_PRECISION_REPORT set: every checked figure is printed (passing ones too), for a
// reviewer comparing implementations.
inline bool precision_report() {
  static const bool on = std::getenv("SYNCBN_PRECISION_REPORT") != nullptr;
  return on;
}

// The worst |got - want| / |want| over a list of values is at most bound (want != 0).
template <class P>
::testing::AssertionResult rel_error_within(const std::string& what, const std::vector<P>& got,
                                            const std::vector<long double>& want, double bound) {
  if (got.size() != want.size())
    return ::testing::AssertionFailure() << what << ": size " << got.size() << ", want "
                                         << want.size();
  double worst = 0;
  size_t at = 0;
  bool finite = true;
  for (size_t i = 0; i < got.size(); ++i) {
    const long double g = static_cast<long double>(got[i]);
    const double e = static_cast<double>(std::fabs(g - want[i]) / std::fabs(want[i]));
    if (!std::isfinite(e)) finite = false;
    if (!(e <= worst)) {
      worst = e;
      at = i;
    }
  }
  std::ostringstream os;
  os.precision(17);
  os << what << ": max relative error " << worst << " (bound " << bound << ") at [" << at
     << "]: got " << static_cast<double>(got[at]) << ", want " << static_cast<double>(want[at]);
  if (precision_report()) std::printf("[ precision ] %s\n", os.str().c_str());
  if (finite && worst <= bound) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << os.str();
}

// Per element |got - want| <= atol[i]; the message gives the worst excess and the largest error.
template <class T>
::testing::AssertionResult abs_error_within(const std::string& what, const std::vector<T>& got,
                                            const std::vector<long double>& want,
                                            const std::vector<double>& atol) {
  if (got.size() != want.size() || atol.size() != want.size())
    return ::testing::AssertionFailure() << what << ": size " << got.size() << ", want "
                                         << want.size();
  if (got.empty()) return ::testing::AssertionSuccess();  // an empty batch
  size_t bad = 0, at = 0;
  double worst_ratio = 0, max_err = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double err =
        static_cast<double>(std::fabs(static_cast<long double>(got[i]) - want[i]));
    max_err = std::max(max_err, std::isfinite(err) ? err : std::numeric_limits<double>::infinity());
    const double ratio = err / atol[i];
    if (!(err <= atol[i])) ++bad;
    if (!(ratio <= worst_ratio)) {
      worst_ratio = ratio;
      at = i;
    }
  }
  std::ostringstream os;
  os.precision(17);
  os << what << ": " << bad << " of " << got.size() << " out of tolerance; worst at [" << at
     << "]: got " << static_cast<double>(got[at]) << ", want " << static_cast<double>(want[at])
     << ", error " << worst_ratio << " x its tolerance " << atol[at] << "; max abs err "
     << max_err;
  if (precision_report()) std::printf("[ precision ] %s\n", os.str().c_str());
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << os.str();
}

// The expected y of a training or batch-statistics forward, in long double from the exact
// statistics, and per element the error a correct implementation may make: the variance's
// relative error `bound` (invstd's is half of it), the mean held in fp64 (its rounding, 2^-53
// |mean|, times |invstd w|: y = (x - center) * scale + shift with the fp32 rounding of center
// carried in shift, so fp32 data pay only fp64's), and a few roundings in T of the terms (shift
// carries up to half an ulp of the mean in T times |invstd w|).
template <class T>
void expected_y(const Geometry& g, const T* x, const ExactStats& st, double eps,
                const std::vector<double>& weight, const std::vector<double>& bias, double bound,
                std::vector<long double>* want, std::vector<double>* atol) {
  const double u = std::numeric_limits<T>::epsilon() / 2;  // T's unit roundoff
  const double u64 = std::numeric_limits<double>::epsilon() / 2;
  want->assign(static_cast<size_t>(g.numel()), 0.0L);
  atol->assign(want->size(), 0.0);
  for (int64_t ch = 0; ch < g.c; ++ch) {
    const long double is = st.invstd(static_cast<size_t>(ch), eps);
    const long double mean = st.mean[static_cast<size_t>(ch)];
    const double a = static_cast<double>(std::fabs(is * weight[ch]));
    g.for_each_in_channel(ch, [&](int64_t k) {
      const long double xm = static_cast<long double>(x[k]) - mean;
      const long double y = xm * is * weight[ch] + bias[ch];
      (*want)[k] = y;
      const double term = static_cast<double>(std::fabs(xm)) * a;
      const double mean_a = std::fabs(static_cast<double>(mean)) * a;
      (*atol)[k] = bound * term + 2 * u64 * mean_a +
                   4 * u * (term + std::fabs(bias[ch]) + static_cast<double>(std::fabs(y)) +
                            u * mean_a) +
                   std::numeric_limits<double>::denorm_min();
    });
  }
}

// The invstd that y = (x - center) * invstd + shift was formed with per channel
// (invstd * weight with affine):
// the least-squares slope of y against x, in long double. Independent of the mean's rounding
// (it moves the intercept only), exact to ~2^-53.
template <class T>
std::vector<long double> slope_of_y(const Geometry& g, const std::vector<T>& x,
                                    const std::vector<T>& y) {
  std::vector<long double> slopes;
  for (int64_t ch = 0; ch < g.c; ++ch) {
    long double sx = 0, sy = 0;
    const long double m = static_cast<long double>(g.count_per_channel());
    g.for_each_in_channel(ch, [&](int64_t k) {
      sx += x[k];
      sy += y[k];
    });
    const long double mx = sx / m, my = sy / m;
    long double sxy = 0, sxx = 0;
    g.for_each_in_channel(ch, [&](int64_t k) {
      const long double dx = x[k] - mx;
      sxy += dx * (y[k] - my);
      sxx += dx * dx;
    });
    slopes.push_back(sxy / sxx);
  }
  return slopes;
}

// ---- the data of the goals ---------------------------------------------------------------------

// x = mu[c] + sd[c] * N(0, 1) with |mu[c]| / sd[c] = ratio for every channel, at several scales
// and signs: (ratio, 1), (-ratio * 1e-3, 1e-3), (-ratio * 1e3, 1e3), (ratio * 3, 3), ...
inline ChannelDistribution ratio_distribution(int64_t C, double ratio) {
  static const double sds[] = {1.0, 1e-3, 1e3, 3.0};
  static const double signs[] = {1.0, -1.0, -1.0, 1.0};
  ChannelDistribution d;
  for (int64_t c = 0; c < C; ++c) {
    const double sd = sds[c % 4], sign = signs[c % 4];
    d.sd.push_back(sd);
    d.mu.push_back(sign * ratio * sd);
  }
  return d;
}

// The first value of every channel (outer index 0: sample 0, spatial position 0; the value a
// per-rank shift "first value" would pick) moved `far` standard deviations above the mean.
template <class T>
void move_first_row(const Geometry& g, const ChannelDistribution& d, double far,
                    std::vector<T>& x) {
  if (g.n == 0 || g.spatial_size() == 0) return;
  for (int64_t ch = 0; ch < g.c; ++ch)
    x[static_cast<size_t>(g.offset(0, ch, 0))] = static_cast<T>(d.mu[ch] + far * d.sd[ch]);
}

// v with 17 significant digits (the messages of the exact checks).
inline std::string fmt17(double v) {
  std::ostringstream os;
  os.precision(17);
  os << v;
  return os.str();
}

// The shapes the goals run on: 2-D spatial (N, C, H, W) / (N, H, W, C), and (N, C).
enum class ShapeKind { spatial2d, flat };
inline const char* shape_kind_name(ShapeKind k) { return k == ShapeKind::flat ? "NC" : "2d"; }
inline void PrintTo(ShapeKind k, std::ostream* os) { *os << shape_kind_name(k); }

// About 16384 values per channel.
inline Geometry goal_geometry(syncbn_layout_t layout, ShapeKind kind, int64_t C) {
  return kind == ShapeKind::flat ? make_geometry(layout, 16384, C, {})
                                 : make_geometry(layout, 16, C, {32, 32});
}

// The statistics of one forward_training with momentum 1 (running_var becomes var * m / (m - 1)
// exactly, up to the parameter type's rounding) against the exact ones: the variance and
// save_invstd to relative error `bound`, save_mean to 4 units of P of |mean| plus bound * std.
template <class P>
void expect_statistics(const std::string& when, const ExactStats& ref, double eps, double bound,
                       const std::vector<P>& running_var, const std::vector<P>& save_mean,
                       const std::vector<P>& save_invstd) {
  std::vector<long double> unbiased, invstd;
  std::vector<double> mean_tol;
  for (size_t c = 0; c < ref.mean.size(); ++c) {
    unbiased.push_back(ref.unbiased(c));
    invstd.push_back(ref.invstd(c, eps));
    mean_tol.push_back(4 * std::numeric_limits<P>::epsilon() *
                           static_cast<double>(std::fabs(ref.mean[c])) +
                       bound * static_cast<double>(std::sqrt(ref.var[c])));
  }
  EXPECT_TRUE(rel_error_within(when + ": variance (running_var = var m / (m - 1))", running_var,
                               unbiased, bound));
  EXPECT_TRUE(rel_error_within(when + ": save_invstd", save_invstd, invstd, bound));
  EXPECT_TRUE(abs_error_within(when + ": save_mean", save_mean, ref.mean, mean_tol));
}

}  // namespace syncbn_test

#endif  // SYNCBN_TESTS_PRECISION_REFERENCE_HPP
