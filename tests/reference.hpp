// tests/reference.hpp: the fp64 reference batch norm and the helpers shared by every suite
// (single-process, MPI, thread-rank, GPU): tensor geometry in both layouts, seeded data,
// comparisons with clear failure messages (values, bytes, a layer's state, the last error).
//
// The reference works on per-channel lists of values rather than on one tensor, so that the
// global batch of a group of ranks is simply the concatenation of every rank's per-channel
// lists, whatever their N and spatial sizes (docs/design.md section 1). Sums use long double and two
// passes (mean, then centered squares), so the reference is far more precise than what any
// implementation is asked to reach.
#ifndef SYNCBN_TESTS_REFERENCE_HPP
#define SYNCBN_TESTS_REFERENCE_HPP

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <limits>
#include <ostream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "syncbn/syncbn.h"

namespace syncbn_test {

// ---- dtypes ---------------------------------------------------------------------------------

// Data type T <-> syncbn dtype. On the CPU path the parameter type equals the data type.
template <class T>
struct DtypeOf;
template <>
struct DtypeOf<float> {
  static constexpr syncbn_dtype_t value = SYNCBN_FLOAT32;
  static constexpr const char* name = "fp32";
};
template <>
struct DtypeOf<double> {
  static constexpr syncbn_dtype_t value = SYNCBN_FLOAT64;
  static constexpr const char* name = "fp64";
};

inline const char* dtype_name(syncbn_dtype_t d) {
  switch (d) {
    case SYNCBN_FLOAT32: return "fp32";
    case SYNCBN_FLOAT64: return "fp64";
    case SYNCBN_FLOAT16: return "fp16";
    case SYNCBN_BFLOAT16: return "bf16";
    default: break;
  }
  return "dtype?";
}

inline const char* layout_name(syncbn_layout_t l) {
  return l == SYNCBN_CHANNELS_LAST ? "CL" : "CF";
}

inline bool is_cumulative(double momentum) { return std::isnan(momentum); }

// Tolerances by data type: relative, and norm-wise (an absolute floor of rel * max |expected|).
template <class T>
struct Tolerances;
template <>
struct Tolerances<float> {
  static constexpr double data = 1e-5;   // y, dx: relative to the scale of their terms
  static constexpr double stats = 1e-5;  // mean, invstd, running stats
  static constexpr double sums = 1e-5;   // dweight, dbias: relative to sum of |terms|
};
template <>
struct Tolerances<double> {
  static constexpr double data = 1e-10;
  static constexpr double stats = 1e-10;
  static constexpr double sums = 1e-10;
};

// ---- geometry -------------------------------------------------------------------------------

// A dense tensor (N, C, *spatial) channels-first or (N, *spatial, C) channels-last.
struct Geometry {
  syncbn_layout_t layout = SYNCBN_CHANNELS_FIRST;
  int64_t n = 0;
  int64_t c = 0;
  std::vector<int64_t> spatial;

  int64_t spatial_size() const {
    int64_t s = 1;
    for (int64_t d : spatial) s *= d;
    return s;
  }
  int64_t count_per_channel() const { return n * spatial_size(); }
  int64_t numel() const { return n * c * spatial_size(); }
  int ndim() const { return 2 + static_cast<int>(spatial.size()); }

  // The shape as the API takes it.
  std::vector<int64_t> shape() const {
    std::vector<int64_t> s{n};
    if (layout == SYNCBN_CHANNELS_FIRST) {
      s.push_back(c);
      s.insert(s.end(), spatial.begin(), spatial.end());
    } else {
      s.insert(s.end(), spatial.begin(), spatial.end());
      s.push_back(c);
    }
    return s;
  }

  // Flat offset of sample i, channel ch, flattened spatial position p.
  int64_t offset(int64_t i, int64_t ch, int64_t p) const {
    const int64_t S = spatial_size();
    return layout == SYNCBN_CHANNELS_FIRST ? (i * c + ch) * S + p : (i * S + p) * c + ch;
  }

  // Calls f(flat offset) for every element of channel ch, in (sample, position) order.
  template <class F>
  void for_each_in_channel(int64_t ch, F&& f) const {
    const int64_t S = spatial_size();
    for (int64_t i = 0; i < n; ++i)
      for (int64_t p = 0; p < S; ++p) f(offset(i, ch, p));
  }

  std::string str() const {
    std::ostringstream os;
    os << layout_name(layout) << "(";
    const auto s = shape();
    for (size_t i = 0; i < s.size(); ++i) os << (i ? "," : "") << s[i];
    os << ")";
    return os.str();
  }
};

inline Geometry make_geometry(syncbn_layout_t layout, int64_t n, int64_t c,
                              std::vector<int64_t> spatial) {
  Geometry g;
  g.layout = layout;
  g.n = n;
  g.c = c;
  g.spatial = std::move(spatial);
  return g;
}

// Per channel, the list of values of a batch (the unit the reference works on).
using ChannelValues = std::vector<std::vector<double>>;

template <class T>
ChannelValues gather(const Geometry& g, const T* data) {
  ChannelValues v(static_cast<size_t>(g.c));
  for (int64_t ch = 0; ch < g.c; ++ch) {
    v[ch].reserve(static_cast<size_t>(g.count_per_channel()));
    g.for_each_in_channel(ch, [&](int64_t k) { v[ch].push_back(static_cast<double>(data[k])); });
  }
  return v;
}

// dst += src, channel by channel (the global batch of a group is the concatenation).
inline void append(ChannelValues& dst, const ChannelValues& src) {
  if (dst.empty()) dst.resize(src.size());
  for (size_t ch = 0; ch < src.size(); ++ch)
    dst[ch].insert(dst[ch].end(), src[ch].begin(), src[ch].end());
}

// ---- seeded data ----------------------------------------------------------------------------

// A seed from the running test's full name (FNV-1a), identical on every rank.
inline uint32_t test_seed(uint32_t salt = 0) {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  std::string name = info ? std::string(info->test_suite_name()) + "." + info->name() : "none";
  uint32_t h = 2166136261u ^ salt;
  for (unsigned char ch : name) h = (h ^ ch) * 16777619u;
  return h;
}

class Rng {
 public:
  explicit Rng(uint32_t seed) : gen_(seed) {}
  double uniform(double lo, double hi) { return std::uniform_real_distribution<double>(lo, hi)(gen_); }
  double normal() { return std::normal_distribution<double>(0.0, 1.0)(gen_); }
  std::mt19937& engine() { return gen_; }

 private:
  std::mt19937 gen_;
};

template <class T>
std::vector<T> random_vector(size_t n, Rng& rng, double lo, double hi) {
  std::vector<T> v(n);
  for (auto& e : v) e = static_cast<T>(rng.uniform(lo, hi));
  return v;
}

// Per-channel distribution of a batch: x = mu[c] + sd[c] * N(0, 1).
struct ChannelDistribution {
  std::vector<double> mu, sd;
  static ChannelDistribution random(int64_t C, Rng& rng) {
    ChannelDistribution d;
    for (int64_t c = 0; c < C; ++c) {
      d.mu.push_back(rng.uniform(-2.0, 2.0));
      d.sd.push_back(rng.uniform(0.5, 2.0));
    }
    return d;
  }
  static ChannelDistribution constant(int64_t C, double mu, double sd) {
    ChannelDistribution d;
    d.mu.assign(static_cast<size_t>(C), mu);
    d.sd.assign(static_cast<size_t>(C), sd);
    return d;
  }
};

template <class T>
std::vector<T> random_batch(const Geometry& g, Rng& rng, const ChannelDistribution& dist) {
  std::vector<T> x(static_cast<size_t>(g.numel()));
  // Draw in memory order so that the layout does not change which value lands where first.
  const int64_t S = g.spatial_size();
  for (int64_t i = 0; i < g.n; ++i)
    for (int64_t p = 0; p < S; ++p)
      for (int64_t ch = 0; ch < g.c; ++ch)
        x[g.offset(i, ch, p)] = static_cast<T>(dist.mu[ch] + dist.sd[ch] * rng.normal());
  return x;
}

template <class T>
std::vector<T> random_batch(const Geometry& g, Rng& rng) {
  return random_batch<T>(g, rng, ChannelDistribution::constant(g.c, 0.0, 1.0));
}

// A layer's parameters and statistics in the parameter type P.
template <class P>
struct LayerState {
  std::vector<P> weight, bias, running_mean, running_var;
  int64_t num_batches_tracked = 0;

  static LayerState random(int64_t C, Rng& rng) {
    LayerState s;
    const size_t n = static_cast<size_t>(C);
    s.weight = random_vector<P>(n, rng, 0.5, 1.5);
    for (auto& w : s.weight)
      if (rng.uniform(0.0, 1.0) < 0.25) w = -w;  // some negative gammas
    s.bias = random_vector<P>(n, rng, -1.0, 1.0);
    s.running_mean = random_vector<P>(n, rng, -1.0, 1.0);
    s.running_var = random_vector<P>(n, rng, 0.5, 2.0);
    s.num_batches_tracked = static_cast<int64_t>(rng.uniform(0.0, 5.0));
    return s;
  }
};

template <class T>
std::vector<double> to_double(const T* p, size_t n) {
  std::vector<double> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<double>(p[i]);
  return v;
}
template <class T>
std::vector<double> to_double(const std::vector<T>& v) {
  return to_double(v.data(), v.size());
}

// ---- the reference batch norm ---------------------------------------------------------------

// Batch statistics per channel (docs/design.md 1.1, step 4).
struct BatchStats {
  int64_t count = 0;             // m, values per channel
  std::vector<double> mean;      // (1/m) sum x
  std::vector<double> var;       // biased
  std::vector<double> invstd;    // 1 / sqrt(var + eps)
  std::vector<double> abs_mean;  // (1/m) sum |x|: the scale of the mean, for tolerances
};

inline BatchStats batch_stats(const ChannelValues& v, double eps) {
  BatchStats b;
  b.count = v.empty() ? 0 : static_cast<int64_t>(v[0].size());
  for (const auto& vals : v) {
    const long double m = static_cast<long double>(vals.size());
    long double s = 0, a = 0;
    for (double x : vals) {
      s += x;
      a += std::fabs(x);
    }
    const long double mean = s / m;
    long double q = 0;
    for (double x : vals) q += (x - mean) * (x - mean);
    const long double var = q / m;
    b.mean.push_back(static_cast<double>(mean));
    b.var.push_back(static_cast<double>(var));
    b.invstd.push_back(static_cast<double>(1.0L / std::sqrt(var + static_cast<long double>(eps))));
    b.abs_mean.push_back(static_cast<double>(a / m));
  }
  return b;
}

// Running statistics update (docs/design.md 1.1, step 6), in the parameter type P as the library stores them.
template <class P>
void update_running(LayerState<P>& st, const BatchStats& b, double momentum) {
  st.num_batches_tracked += 1;
  const double a = is_cumulative(momentum) ? 1.0 / static_cast<double>(st.num_batches_tracked)
                                           : momentum;
  const double m = static_cast<double>(b.count);
  for (size_t c = 0; c < b.mean.size(); ++c) {
    st.running_mean[c] =
        static_cast<P>((1.0 - a) * static_cast<double>(st.running_mean[c]) + a * b.mean[c]);
    st.running_var[c] = static_cast<P>((1.0 - a) * static_cast<double>(st.running_var[c]) +
                                       a * b.var[c] * m / (m - 1.0));
  }
}

// The effective weight / bias: the layer's parameters, or 1 / 0 when affine is off.
template <class P>
std::vector<double> effective_weight(bool affine, const std::vector<P>& w) {
  return affine ? to_double(w) : std::vector<double>(w.size(), 1.0);
}
template <class P>
std::vector<double> effective_bias(bool affine, const std::vector<P>& b) {
  return affine ? to_double(b) : std::vector<double>(b.size(), 0.0);
}

// An expected tensor, with per element the magnitude of the terms it is computed from: the
// rounding error of any evaluation order is a small multiple of eps * scale (so outputs that
// cancel to nearly zero are not held to a relative tolerance they cannot meet).
struct Expected {
  std::vector<double> value;
  std::vector<double> scale;
};

// y = (x - mean) * invstd * weight + bias, elementwise in the tensor's own order. Scale:
// (|x| + |mean|) |invstd weight| + |bias| (covers x * a + b as well as (x - mean) * a + bias).
template <class T>
Expected normalize(const Geometry& g, const T* x, const std::vector<double>& mean,
                   const std::vector<double>& invstd, const std::vector<double>& weight,
                   const std::vector<double>& bias) {
  Expected e;
  e.value.resize(static_cast<size_t>(g.numel()));
  e.scale.resize(e.value.size());
  for (int64_t ch = 0; ch < g.c; ++ch) {
    g.for_each_in_channel(ch, [&](int64_t k) {
      const long double xm = static_cast<long double>(x[k]) - mean[ch];
      e.value[k] = static_cast<double>(xm * invstd[ch] * weight[ch] + bias[ch]);
      e.scale[k] = (std::fabs(static_cast<double>(x[k])) + std::fabs(mean[ch])) *
                       std::fabs(invstd[ch] * weight[ch]) +
                   std::fabs(bias[ch]);
    });
  }
  return e;
}

// The fused activation on an expected forward output e: max(e + z, 0), or max(e, 0) without a
// residual z (NULL). Scale: e's plus |z|.
template <class T>
Expected activate(Expected e, const T* z) {
  for (size_t k = 0; k < e.value.size(); ++k) {
    const double zk = z != nullptr ? static_cast<double>(z[k]) : 0.0;
    const double v = e.value[k] + zk;
    e.value[k] = v < 0.0 ? 0.0 : v;
    e.scale[k] += std::fabs(zk);
  }
  return e;
}

// The relu's backward of dy given the forward's output y: dy where y > 0, else 0.
template <class T>
std::vector<T> relu_masked(const std::vector<T>& dy, const std::vector<double>& y) {
  std::vector<T> g(dy.size());
  for (size_t k = 0; k < dy.size(); ++k) g[k] = y[k] > 0.0 ? dy[k] : T(0);
  return g;
}

// 1 / sqrt(running_var + eps): the eval-mode invstd.
template <class P>
std::vector<double> eval_invstd(const std::vector<P>& running_var, double eps) {
  std::vector<double> r;
  for (P v : running_var)
    r.push_back(static_cast<double>(1.0L / std::sqrt(static_cast<long double>(v) + eps)));
  return r;
}

// Backward sums per channel over a set of values (docs/design.md 1.3, step 1), with the sums of
// absolute terms that bound the rounding error of any summation order.
struct GradSums {
  int64_t count = 0;
  std::vector<double> sum_g, sum_gx, abs_g, abs_gx;
};

inline GradSums grad_sums(const ChannelValues& x, const ChannelValues& dy,
                          const std::vector<double>& mean) {
  GradSums r;
  r.count = x.empty() ? 0 : static_cast<int64_t>(x[0].size());
  for (size_t ch = 0; ch < x.size(); ++ch) {
    long double sg = 0, sgx = 0, ag = 0, agx = 0;
    for (size_t i = 0; i < x[ch].size(); ++i) {
      const long double g = dy[ch][i];
      const long double gx = g * (static_cast<long double>(x[ch][i]) - mean[ch]);
      sg += g;
      sgx += gx;
      ag += std::fabs(g);
      agx += std::fabs(gx);
    }
    r.sum_g.push_back(static_cast<double>(sg));
    r.sum_gx.push_back(static_cast<double>(sgx));
    r.abs_g.push_back(static_cast<double>(ag));
    r.abs_gx.push_back(static_cast<double>(agx));
  }
  return r;
}

// dx = weight * invstd * (dy - sum_g / m - (x - mean) * invstd^2 * sum_gx / m), with the sums
// and m of the whole group. Scale: |weight invstd| (|dy| + |sum_g / m| + (|x| + |mean|)
// invstd^2 |sum_gx / m|).
template <class T>
Expected grad_input(const Geometry& g, const T* x, const T* dy, const std::vector<double>& weight,
                    const std::vector<double>& mean, const std::vector<double>& invstd,
                    const GradSums& global) {
  Expected e;
  e.value.resize(static_cast<size_t>(g.numel()));
  e.scale.resize(e.value.size());
  const long double m = static_cast<long double>(global.count);
  for (int64_t ch = 0; ch < g.c; ++ch) {
    const long double is = invstd[ch];
    const long double mg = global.sum_g[ch] / m, mgx = global.sum_gx[ch] / m;
    const double a = std::fabs(weight[ch] * invstd[ch]);
    g.for_each_in_channel(ch, [&](int64_t k) {
      const long double xm = static_cast<long double>(x[k]) - mean[ch];
      e.value[k] = static_cast<double>(weight[ch] * is * (dy[k] - mg - xm * is * is * mgx));
      e.scale[k] = a * (std::fabs(static_cast<double>(dy[k])) + std::fabs(static_cast<double>(mg)) +
                        (std::fabs(static_cast<double>(x[k])) + std::fabs(mean[ch])) *
                            static_cast<double>(is * is * std::fabs(mgx)));
    });
  }
  return e;
}

// dweight = sum_gx * invstd, dbias = sum_g (over whichever values the sums cover).
inline std::vector<double> grad_weight(const GradSums& s, const std::vector<double>& invstd) {
  std::vector<double> r;
  for (size_t c = 0; c < s.sum_gx.size(); ++c) r.push_back(s.sum_gx[c] * invstd[c]);
  return r;
}
inline std::vector<double> grad_weight_scale(const GradSums& s, const std::vector<double>& invstd) {
  std::vector<double> r;
  for (size_t c = 0; c < s.abs_gx.size(); ++c) r.push_back(s.abs_gx[c] * std::fabs(invstd[c]));
  return r;
}

// ---- comparisons ----------------------------------------------------------------------------

// |got - want| <= atol[i] + rtol * |want|, NaN matching NaN.
struct Tol {
  double rtol = 0;
  std::vector<double> atol;  // one per element, or one for all (size 1), or none (0)
  double atol_at(size_t i) const {
    if (atol.empty()) return 0.0;
    return atol.size() == 1 ? atol[0] : atol[i];
  }
};

inline double max_abs(const std::vector<double>& v) {
  double m = 0;
  for (double e : v)
    if (std::isfinite(e)) m = std::max(m, std::fabs(e));
  return m;
}

// Relative tolerance rel, with an absolute floor rel * max |want| (norm-wise).
inline Tol normwise(double rel, const std::vector<double>& want) {
  return Tol{rel, {rel * std::max(max_abs(want), 1e-300)}};
}
// Relative tolerance rel, with a per-element absolute floor rel * scale[i].
inline Tol scaled(double rel, const std::vector<double>& scale) {
  Tol t{rel, {}};
  for (double s : scale) t.atol.push_back(rel * s);
  return t;
}

template <class T>
::testing::AssertionResult all_close(const std::string& what, const T* got,
                                     const std::vector<double>& want, const Tol& tol) {
  if (want.empty()) return ::testing::AssertionSuccess();
  if (got == nullptr) return ::testing::AssertionFailure() << what << ": output pointer is null";
  size_t bad = 0, worst = 0;
  double worst_excess = -1, max_abs_err = 0, max_rel_err = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double g = static_cast<double>(got[i]), w = want[i];
    if (std::isnan(w) || std::isnan(g)) {
      if (std::isnan(w) != std::isnan(g)) {
        ++bad;
        if (worst_excess < std::numeric_limits<double>::infinity()) {
          worst_excess = std::numeric_limits<double>::infinity();
          worst = i;
        }
      }
      continue;
    }
    const double err = std::fabs(g - w);
    const double bound = tol.atol_at(i) + tol.rtol * std::fabs(w);
    max_abs_err = std::max(max_abs_err, err);
    if (w != 0) max_rel_err = std::max(max_rel_err, err / std::fabs(w));
    if (!(err <= bound)) {
      ++bad;
      const double excess = bound > 0 ? err / bound : std::numeric_limits<double>::infinity();
      if (excess > worst_excess) {
        worst_excess = excess;
        worst = i;
      }
    }
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  std::ostringstream os;
  os.precision(17);
  os << what << ": " << bad << " of " << want.size() << " elements out of tolerance; worst at ["
     << worst << "]: got " << static_cast<double>(got[worst]) << ", want " << want[worst]
     << " (tol " << tol.atol_at(worst) + tol.rtol * std::fabs(want[worst]) << "); max abs err "
     << max_abs_err << ", max rel err " << max_rel_err;
  return ::testing::AssertionFailure() << os.str();
}

template <class T>
::testing::AssertionResult all_close(const std::string& what, const std::vector<T>& got,
                                     const std::vector<double>& want, const Tol& tol) {
  if (got.size() != want.size())
    return ::testing::AssertionFailure()
           << what << ": size " << got.size() << ", want " << want.size();
  return all_close(what, got.data(), want, tol);
}

// got against an Expected: relative tolerance rel of each element's scale.
template <class V>
::testing::AssertionResult all_close(const std::string& what, const V& got, const Expected& want,
                                     double rel) {
  return all_close(what, got, want.value, scaled(rel, want.scale));
}

// Bytewise equality of two buffers (state that must not change, or must agree across ranks).
template <class T>
::testing::AssertionResult bitwise_equal(const std::string& what, const std::vector<T>& got,
                                         const std::vector<T>& want) {
  if (got.size() != want.size())
    return ::testing::AssertionFailure()
           << what << ": size " << got.size() << ", want " << want.size();
  if (got.empty() || std::memcmp(got.data(), want.data(), got.size() * sizeof(T)) == 0)
    return ::testing::AssertionSuccess();
  size_t i = 0;
  while (std::memcmp(&got[i], &want[i], sizeof(T)) == 0) ++i;
  std::ostringstream os;
  os.precision(17);
  os << what << ": differs bitwise, first at [" << i << "]: " << got[i] << " vs " << want[i];
  return ::testing::AssertionFailure() << os.str();
}

// Byte equality that prints no values (fp16 / bf16 have no unambiguous operator<<).
template <class T>
::testing::AssertionResult same_bytes(const std::string& what, const std::vector<T>& got,
                                      const std::vector<T>& want) {
  if (got.size() != want.size())
    return ::testing::AssertionFailure()
           << what << ": size " << got.size() << ", want " << want.size();
  for (size_t i = 0; i < got.size(); ++i)
    if (std::memcmp(&got[i], &want[i], sizeof(T)) != 0)
      return ::testing::AssertionFailure()
             << what << ": changed, first at [" << i << "] of " << got.size();
  return ::testing::AssertionSuccess();
}

// The running statistics and num_batches_tracked of a layer's state in any memory (State:
// HostLayerState, DeviceLayerState, anything whose download() gives a LayerState<P>) equal,
// byte for byte, `before`.
template <class State, class P>
::testing::AssertionResult state_unchanged(const std::string& when, const State& state,
                                           const LayerState<P>& before) {
  const LayerState<P> now = state.download();
  auto r = same_bytes("running_mean " + when, now.running_mean, before.running_mean);
  if (!r) return r;
  r = same_bytes("running_var " + when, now.running_var, before.running_var);
  if (!r) return r;
  if (now.num_batches_tracked != before.num_batches_tracked)
    return ::testing::AssertionFailure()
           << "num_batches_tracked " << when << ": " << now.num_batches_tracked << ", was "
           << before.num_batches_tracked;
  return ::testing::AssertionSuccess();
}

// The message of the last error names every word (tag: who is asking, for the failure's text).
inline ::testing::AssertionResult last_error_names(const std::string& tag,
                                                   const std::vector<std::string>& words) {
  const std::string msg = syncbn_last_error();
  for (const auto& w : words)
    if (msg.find(w) == std::string::npos)
      return ::testing::AssertionFailure()
             << tag << ": message '" << msg << "' does not contain '" << w << "'";
  return ::testing::AssertionSuccess();
}

// The plan recorded no error for later (syncbn_plan_get_async_error on stream: SYNCBN_SUCCESS,
// and nothing to report); what: the call it follows.
inline void expect_no_async_error(syncbn_plan_t plan, void* stream, const char* what) {
  syncbn_status_t async = SYNCBN_ERROR_INTERNAL;
  EXPECT_EQ(syncbn_plan_get_async_error(plan, stream, &async), SYNCBN_SUCCESS)
      << what << ": " << syncbn_last_error();
  EXPECT_EQ(async, SYNCBN_SUCCESS) << what << ": asynchronous error " << syncbn_last_error();
}

// Owning handles for the C API.
struct CommDeleter {
  void operator()(syncbn_comm_s* c) const { syncbn_comm_destroy(c); }
};
struct PlanDeleter {
  void operator()(syncbn_plan_s* p) const { syncbn_plan_destroy(p); }
};
using CommHandle = std::unique_ptr<syncbn_comm_s, CommDeleter>;
using PlanHandle = std::unique_ptr<syncbn_plan_s, PlanDeleter>;

// A layer configuration: C channels of dtype in layout with the given options; the rest at
// syncbn_config_init's defaults (CPU).
inline syncbn_config_t make_cfg(int64_t C, syncbn_dtype_t dtype, syncbn_layout_t layout,
                                bool affine, bool track, double momentum, double eps = 1e-5,
                                bool global_grads = false) {
  syncbn_config_t cfg;
  EXPECT_EQ(syncbn_config_init(&cfg, C, dtype), SYNCBN_SUCCESS) << syncbn_last_error();
  cfg.layout = layout;
  cfg.affine = affine;
  cfg.track_running_stats = track;
  cfg.momentum = momentum;
  cfg.eps = eps;
  cfg.global_param_grads = global_grads;
  return cfg;
}

}  // namespace syncbn_test

// gtest prints statuses by name (found by ADL: the enum lives in the global namespace).
inline void PrintTo(syncbn_status_t s, std::ostream* os) { *os << syncbn_status_string(s); }

#endif  // SYNCBN_TESTS_REFERENCE_HPP
