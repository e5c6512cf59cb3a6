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

// Plain sums from shifted ones: with s' = sum (x - K), q' = sum (x - K)^2 over m values,
// sum x = s' + m K and sum x^2 = q' + K (2 s' + m K). Each rank shifts by its own K (a value of
// its own data, near the mean), so its local sums carry no cancellation; only these few fp64
// operations round at the scale of sum x^2 (Chan, Golub & LeVeque 1983, shifted data).
SYNCBN_HD inline void unshift_moments(double& s, double& q, double m, double K) {
  if (m == 0.0) return;
  const double s_shifted = s;
  s = s_shifted + m * K;
  q = q + K * (2.0 * s_shifted + m * K);
}

// Batch statistics of one channel from the group's sums.
struct Moments {
  double mean;    // s / m
  double var;     // biased: max(q / m - mean^2, 0); NaN stays NaN
  double invstd;  // 1 / sqrt(var + eps)
};

// s = sum x, q = sum x^2, m = count (> 0), over every rank of the group.
SYNCBN_HD inline Moments moments_from_sums(double s, double q, double m, double eps) {
  const double mean = s / m;
  double var = q / m - mean * mean;
  var = var < 0.0 ? 0.0 : var;  // cancellation can make it slightly negative; NaN passes
  return {mean, var, 1.0 / std::sqrt(var + eps)};
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

// Channel c of a forward from the group's sums [s (C) | q (C)] and count m: saved statistics,
// the coefficients (affine_arrays of coefficients), and with f.track the running statistics
// with weight a (running_factor).
template <class P>
SYNCBN_HD inline void finalize_forward_channel(const ForwardFinalize& f, const double* sums,
                                               std::int64_t C, std::int64_t c, double m, double a,
                                               P* coefficients) {
  const Moments mo = moments_from_sums(sums[c], sums[C + c], m, f.eps);
  if (f.save_mean) static_cast<P*>(f.save_mean)[c] = static_cast<P>(mo.mean);
  if (f.save_invstd) static_cast<P*>(f.save_invstd)[c] = static_cast<P>(mo.invstd);
  store(affine_arrays(coefficients, C), c,
        affine_coefficients<P>(mo.mean, mo.invstd, parameter<P>(f.weight, c, f.affine, 1.0),
                               parameter<P>(f.bias, c, f.affine, 0.0)));
  if (f.track) {
    update_running(static_cast<P*>(f.running_mean)[c], static_cast<P*>(f.running_var)[c], mo, m, a);
  }
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
