// The per-channel math of synchronized batch norm, written once for every backend: plain inline
// functions of scalars, callable from host code and (through SYNCBN_HD) from CUDA kernels.
// Every function works in fp64; the backends round the results to the parameter type.
//
// Source: Ioffe & Szegedy 2015, Algorithm 1 (forward) and section 3 (backward); running
// statistics as PyTorch's BatchNorm (unbiased variance, momentum = weight of the new value).
#ifndef SYNCBN_CORE_FINALIZE_HPP
#define SYNCBN_CORE_FINALIZE_HPP

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "core/hd.hpp"

namespace syncbn::core {

// The shared shift. Every reduction sums each channel around a shift K that is the same on every
// rank of the group: s = sum (x - K), q = sum (x - K)^2 over the group's m values. The plan keeps
// K as its previous call's mean rounded to the data type (bitwise identical on every rank: each
// derived it from the same sums), so that x - K is exact near the mean (Sterbenz) and nothing
// cancels in q / m - (s / m)^2: the variance loses log10(1 + (mean - K)^2 / var) digits, not
// log10(mean^2 / var) (Chan, Golub & LeVeque 1983, "Algorithms for computing the sample
// variance", shifted data). A call whose sums show K far from its batch mean redoes them around
// that mean (refined_shift); a plan's first call starts from K = 0.

// Batch statistics of one channel from the group's sums.
struct Moments {
  double mean;    // K + s / m
  double var;     // biased: max(q / m - (s / m)^2, 0); NaN stays NaN
  double invstd;  // 1 / sqrt(var + eps)
};

// s = sum (x - K), q = sum (x - K)^2, m = count (> 0), over every rank of the group.
SYNCBN_HD inline Moments moments_from_sums(double s, double q, double m, double K, double eps) {
  const double d = s / m;
  double var = q / m - d * d;
  var = var < 0.0 ? 0.0 : var;  // rounding can make it slightly negative; NaN passes
  return {K + d, var, 1.0 / sqrt(var + eps)};
}

// The shift is stale when the batch mean lies more than kStaleShift standard deviations from it
// (|mean - K| > kStaleShift sqrt(var), or a variance the sums cannot give, NaN): the variance
// would lose more than log10(1 + kStaleShift^2) = 0.7 digits.
constexpr double kStaleShift = 2.0;

// The shift a redone reduction of one channel uses, from the sums around K (as in
// moments_from_sums): the mean rounded to P where K is stale and that mean is finite (a channel
// of NaN or Inf keeps K, so that it never poisons the shift), else K. Returns whether it moved.
template <class P>
SYNCBN_HD inline bool refined_shift(double s, double q, double m, P K, P& out) {
  const double d = s / m;
  const double var = q / m - d * d;
  const P mean = static_cast<P>(static_cast<double>(K) + d);
  // |d| against sqrt(var), not d^2 against var: squares of tiny values underflow to 0.
  const bool moved = !(fabs(d) <= kStaleShift * sqrt(var > 0.0 ? var : 0.0)) &&
                     mean - mean == P(0) && mean != K;
  out = moved ? mean : K;
  return moved;
}

// Weight of the new batch in the running statistics: momentum, or the cumulative average
// 1 / num_batches_tracked (num_batches_tracked already counting this batch) when momentum is
// unset (NaN).
SYNCBN_HD inline double running_factor(double momentum, long long num_batches_tracked) {
  return momentum == momentum ? momentum : 1.0 / static_cast<double>(num_batches_tracked);
}

// running_mean = (1 - a) running_mean + a mean;
// running_var  = (1 - a) running_var  + a var m / (m - 1)   (m > 1, the GLOBAL count).
template <class P>
SYNCBN_HD inline void update_running(P& running_mean, P& running_var, const Moments& mo,
                                     double m, double a) {
  running_mean = static_cast<P>((1.0 - a) * static_cast<double>(running_mean) + a * mo.mean);
  running_var = static_cast<P>((1.0 - a) * static_cast<double>(running_var) +
                               a * mo.var * (m / (m - 1.0)));
}

// y = (x - center) * scale + shift, the one elementwise form of every forward.
//
// center is the mean rounded to the data type T, so that x - center is exact in T for x near
// the mean (Sterbenz); the rounding error of center moves into shift, computed in fp64:
//   y = (x - mean) * invstd * w + b = (x - center) * scale + (b - (mean - center) * scale).
// This keeps fp32 outputs accurate for inputs whose mean is large against their spread.
template <class T>
struct AffineCoefficients {
  T center, scale, shift;
};

template <class T>
SYNCBN_HD inline AffineCoefficients<T> affine_coefficients(double mean, double invstd,
                                                           double weight, double bias) {
  const T center = static_cast<T>(mean);
  const double scale = invstd * weight;
  return {center, static_cast<T>(scale),
          static_cast<T>(bias - (mean - static_cast<double>(center)) * scale)};
}

// Backward: dx = a * dy - k * (x - center) + d, with the group's sums
//   sum_g  = sum dy,  sum_gx = sum dy * (x - center),  m = count,
// center = the saved mean, invstd = the saved 1 / sqrt(var + eps):
//   dx = w * invstd * (dy - sum_g / m - (x - center) * invstd^2 * sum_gx / m).
template <class T>
struct BackwardCoefficients {
  T center, a, k, d;
};

template <class T>
SYNCBN_HD inline BackwardCoefficients<T> backward_coefficients(double center, double invstd,
                                                               double weight, double sum_g,
                                                               double sum_gx, double m) {
  const double a = weight * invstd;
  return {static_cast<T>(center), static_cast<T>(a),
          static_cast<T>(a * invstd * invstd * sum_gx / m), static_cast<T>(-a * sum_g / m)};
}

// A plan's coefficients live as arrays of C values, one per coefficient, in one block of 4C
// (struct of arrays, so that the elementwise passes read each coefficient contiguously):
// forward [center | scale | shift], backward [center | a | k | d]. P may be const.
template <class P>
struct AffineArrays {
  P* center;
  P* scale;
  P* shift;
};
template <class P>
struct BackwardArrays {
  P* center;
  P* a;
  P* k;
  P* d;
};

template <class P>
SYNCBN_HD inline AffineArrays<P> affine_arrays(P* block, std::int64_t C) {
  return {block, block + C, block + 2 * C};
}
template <class P>
SYNCBN_HD inline BackwardArrays<P> backward_arrays(P* block, std::int64_t C) {
  return {block, block + C, block + 2 * C, block + 3 * C};
}

template <class P, class T>
SYNCBN_HD inline void store(const AffineArrays<P>& to, std::int64_t c,
                            const AffineCoefficients<T>& co) {
  to.center[c] = co.center;
  to.scale[c] = co.scale;
  to.shift[c] = co.shift;
}
template <class P, class T>
SYNCBN_HD inline void store(const BackwardArrays<P>& to, std::int64_t c,
                            const BackwardCoefficients<T>& co) {
  to.center[c] = co.center;
  to.a[c] = co.a;
  to.k[c] = co.k;
  to.d[c] = co.d;
}
template <class P>
SYNCBN_HD inline AffineCoefficients<std::remove_const_t<P>> load(const AffineArrays<P>& from,
                                                                 std::int64_t c) {
  return {from.center[c], from.scale[c], from.shift[c]};
}
template <class P>
SYNCBN_HD inline BackwardCoefficients<std::remove_const_t<P>> load(const BackwardArrays<P>& from,
                                                                   std::int64_t c) {
  return {from.center[c], from.a[c], from.k[c], from.d[c]};
}

// ---- the per-channel finalize of each direction, called by the CPU loop (src/cpu/backend.cpp)
// and the CUDA kernels (src/cuda/kernels.cu) alike ---------------------------------------------

// A forward call's options and the caller's per-channel arrays (parameter type P, C values;
// docs/design.md 1.1, steps 4-7).
struct ForwardFinalize {
  int group_size = 1;       // the verdict's group (the CUDA kernel evaluates it)
  bool track = false;       // update the running statistics
  double momentum = 0.0;    // NaN: cumulative
  double eps = 1e-5;
  bool affine = false;
  const void* weight = nullptr;  // when affine
  const void* bias = nullptr;    // when affine
  void* save_mean = nullptr;     // may be NULL
  void* save_invstd = nullptr;   // may be NULL
  void* running_mean = nullptr;  // when track
  void* running_var = nullptr;   // when track
  long long* num_batches_tracked = nullptr;  // may be NULL (CUDA: device memory)
  std::uint32_t op = 0;          // core::Op, for the CUDA async record
};

// A backward call's (docs/design.md 1.3, steps 4-5).
struct BackwardFinalize {
  int group_size = 1;
  bool affine = false;
  bool global_param_grads = false;
  const void* weight = nullptr;  // when affine
  const void* save_mean = nullptr;
  const void* save_invstd = nullptr;
  void* dweight = nullptr;  // may be NULL
  void* dbias = nullptr;    // may be NULL
  std::uint32_t op = 0;
};

template <class P>
SYNCBN_HD inline double parameter(const void* p, std::int64_t c, bool present, double otherwise) {
  return present ? static_cast<double>(static_cast<const P*>(p)[c]) : otherwise;
}

// Channel c of a forward from the group's sums [s (C) | q (C)] around shift (core's shared
// shift, see moments_from_sums) and count m: saved statistics, the coefficients (affine_arrays
// of coefficients), with f.track the running statistics with weight a (running_factor), and with
// next_shift (may be NULL; may be shift) the shift of the plan's next call: the mean rounded to
// P, unless it is not finite (then shift is kept).
template <class P>
SYNCBN_HD inline void finalize_forward_channel(const ForwardFinalize& f, const double* sums,
                                               std::int64_t C, std::int64_t c, double m, double a,
                                               const P* shift, P* next_shift, P* coefficients) {
  const Moments mo = moments_from_sums(sums[c], sums[C + c], m, shift[c], f.eps);
  if (f.save_mean) static_cast<P*>(f.save_mean)[c] = static_cast<P>(mo.mean);
  if (f.save_invstd) static_cast<P*>(f.save_invstd)[c] = static_cast<P>(mo.invstd);
  const AffineCoefficients<P> co =
      affine_coefficients<P>(mo.mean, mo.invstd, parameter<P>(f.weight, c, f.affine, 1.0),
                             parameter<P>(f.bias, c, f.affine, 0.0));
  store(affine_arrays(coefficients, C), c, co);
  if (f.track) {
    update_running(static_cast<P*>(f.running_mean)[c], static_cast<P*>(f.running_var)[c], mo, m, a);
  }
  if (next_shift != nullptr && co.center - co.center == P(0)) next_shift[c] = co.center;
}

// Channel c of an inference with running statistics: the coefficients (affine_arrays).
template <class P>
SYNCBN_HD inline void finalize_running_channel(double eps, bool affine, const void* weight,
                                               const void* bias, const P* running_mean,
                                               const P* running_var, std::int64_t C,
                                               std::int64_t c, P* coefficients) {
  const double invstd = 1.0 / sqrt(static_cast<double>(running_var[c]) + eps);
  store(affine_arrays(coefficients, C), c,
        affine_coefficients<P>(running_mean[c], invstd, parameter<P>(weight, c, affine, 1.0),
                               parameter<P>(bias, c, affine, 0.0)));
}

// Channel c of a backward from the group's sums [sum_g (C) | sum_gx (C)] and m: the
// coefficients (backward_arrays of coefficients), and dweight / dbias (when affine and given) from
// the group's sums with f.global_param_grads, else from this rank's (local).
template <class P>
SYNCBN_HD inline void finalize_backward_channel(const BackwardFinalize& f, const double* sums,
                                                const double* local, std::int64_t C,
                                                std::int64_t c, double m, P* coefficients) {
  const P* save_mean = static_cast<const P*>(f.save_mean);
  const P* save_invstd = static_cast<const P*>(f.save_invstd);
  store(backward_arrays(coefficients, C), c,
        backward_coefficients<P>(save_mean[c], save_invstd[c],
                                 parameter<P>(f.weight, c, f.affine, 1.0), sums[c], sums[C + c],
                                 m));
  if (!f.affine) return;
  const double* src = f.global_param_grads ? sums : local;
  if (f.dweight) {
    static_cast<P*>(f.dweight)[c] = static_cast<P>(src[C + c] * static_cast<double>(save_invstd[c]));
  }
  if (f.dbias) static_cast<P*>(f.dbias)[c] = static_cast<P>(src[c]);
}

}  // namespace syncbn::core

#endif  // SYNCBN_CORE_FINALIZE_HPP
