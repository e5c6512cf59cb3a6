// Single-process tests: synchronized BN over a communicator of one process is plain batch norm,
// so every output is compared with the fp64 reference of tests/reference.hpp. Then the C API's
// argument checking, status by status, on one process.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "api_calls.hpp"
#include "reference.hpp"
#include "syncbn/syncbn.h"
#include "syncbn/syncbn.hpp"

namespace {

using namespace syncbn_test;

constexpr double kCumulative = SYNCBN_MOMENTUM_CUMULATIVE;
const double kNaN = std::numeric_limits<double>::quiet_NaN();
const double kInf = std::numeric_limits<double>::infinity();

std::string momentum_name(double m) {
  if (is_cumulative(m)) return "cumulative";
  std::string s = std::to_string(m);
  for (auto& ch : s)
    if (ch == '.') ch = 'p';
  while (s.size() > 3 && s.back() == '0') s.pop_back();
  return s;
}

// ---- a layer whose every output is checked against the reference ------------------------------

// Owns a plan on the self communicator, the layer's parameters and statistics (as the library
// updates them) and the reference's copy of the statistics. Inputs the configuration says are
// ignored are passed as NaN-filled buffers, so that using them shows up in the outputs.
template <class T>
class CheckedLayer {
 public:
  CheckedLayer(const syncbn_config_t& cfg, Rng& rng)
      : cfg_(cfg),
        bn_(syncbn::Communicator::self(), cfg),
        st_(LayerState<T>::random(cfg.num_features, rng)),
        ref_(st_),
        nan_(static_cast<size_t>(cfg.num_features), std::numeric_limits<T>::quiet_NaN()),
        unused_mean_(nan_),
        unused_var_(nan_) {}

  const LayerState<T>& state() const { return st_; }
  syncbn::BatchNorm& bn() { return bn_; }

  const T* weight() const { return cfg_.affine ? st_.weight.data() : nan_.data(); }
  const T* bias() const { return cfg_.affine ? st_.bias.data() : nan_.data(); }
  std::vector<double> w_eff() const { return effective_weight(cfg_.affine != 0, st_.weight); }
  std::vector<double> b_eff() const { return effective_bias(cfg_.affine != 0, st_.bias); }

  // One training step (forward + backward) on (x, dy); checks y, save_mean, save_invstd, the
  // running statistics, num_batches_tracked, dx, dweight and dbias.
  void train_step(const Geometry& g, const std::vector<T>& x, const std::vector<T>& dy) {
    SCOPED_TRACE("train step on " + g.str());
    const size_t C = static_cast<size_t>(cfg_.num_features);
    const BatchStats stats = batch_stats(gather(g, x.data()), cfg_.eps);
    const auto shape = g.shape();

    std::vector<T> y(x.size(), T(-777)), save_mean(C, T(-777)), save_invstd(C, T(-777));
    const bool track = cfg_.track_running_stats != 0;
    const std::vector<T> unused_mean_before = unused_mean_, unused_var_before = unused_var_;
    T* rm = track ? st_.running_mean.data() : unused_mean_.data();
    T* rv = track ? st_.running_var.data() : unused_var_.data();
    int64_t* nbt = track ? &st_.num_batches_tracked : nullptr;
    const std::vector<T> rm_before = st_.running_mean;

    ASSERT_EQ(syncbn_forward_training(bn_.get(), g.ndim(), shape.data(), x.data(), weight(),
                                      bias(), y.data(), save_mean.data(), save_invstd.data(), rm,
                                      rv, nbt, nullptr),
              SYNCBN_SUCCESS)
        << syncbn_last_error();

    EXPECT_TRUE(all_close("y", y,
                          normalize(g, x.data(), stats.mean, stats.invstd, w_eff(), b_eff()),
                          Tolerances<T>::data));
    EXPECT_TRUE(
        all_close("save_mean", save_mean, stats.mean, scaled(Tolerances<T>::stats, stats.abs_mean)));
    EXPECT_TRUE(all_close("save_invstd", save_invstd, stats.invstd, Tol{Tolerances<T>::stats, {}}));

    if (track) {
      update_running(ref_, stats, cfg_.momentum);
      std::vector<double> rm_scale;  // |(1-a) old| + |a mean| <= |old| + mean |x|
      for (size_t c = 0; c < C; ++c)
        rm_scale.push_back(std::fabs(static_cast<double>(rm_before[c])) + stats.abs_mean[c]);
      EXPECT_TRUE(all_close("running_mean", st_.running_mean, to_double(ref_.running_mean),
                            scaled(Tolerances<T>::stats, rm_scale)));
      EXPECT_TRUE(all_close("running_var", st_.running_var, to_double(ref_.running_var),
                            Tol{Tolerances<T>::stats, {}}));
      EXPECT_EQ(st_.num_batches_tracked, ref_.num_batches_tracked);
    } else {
      EXPECT_TRUE(bitwise_equal("running_mean (ignored)", unused_mean_, unused_mean_before));
      EXPECT_TRUE(bitwise_equal("running_var (ignored)", unused_var_, unused_var_before));
    }

    // Backward from the statistics the forward saved (the function backward is defined on).
    const std::vector<double> mean = to_double(save_mean), invstd = to_double(save_invstd);
    const GradSums sums = grad_sums(gather(g, x.data()), gather(g, dy.data()), mean);
    const auto dx_want = grad_input(g, x.data(), dy.data(), w_eff(), mean, invstd, sums);
    std::vector<T> dx(x.size(), T(-777)), dweight(C, T(-777)), dbias(C, T(-777));
    T* dw = cfg_.affine ? dweight.data() : nullptr;
    T* db = cfg_.affine ? dbias.data() : nullptr;
    ASSERT_EQ(syncbn_backward(bn_.get(), g.ndim(), shape.data(), x.data(), dy.data(), weight(),
                              save_mean.data(), save_invstd.data(), dx.data(), dw, db, nullptr),
              SYNCBN_SUCCESS)
        << syncbn_last_error();
    EXPECT_TRUE(all_close("dx", dx, dx_want, Tolerances<T>::data));
    if (cfg_.affine) {
      EXPECT_TRUE(all_close("dweight", dweight, grad_weight(sums, invstd),
                            scaled(Tolerances<T>::sums, grad_weight_scale(sums, invstd))));
      EXPECT_TRUE(all_close("dbias", dbias, sums.sum_g, scaled(Tolerances<T>::sums, sums.abs_g)));
    }
  }

  // Eval mode: running statistics when tracked, batch statistics otherwise.
  void eval_step(const Geometry& g, const std::vector<T>& x) {
    SCOPED_TRACE("eval step on " + g.str());
    const bool track = cfg_.track_running_stats != 0;
    std::vector<double> mean, invstd;
    if (track) {
      mean = to_double(st_.running_mean);
      invstd = eval_invstd(st_.running_var, cfg_.eps);
    } else {
      const BatchStats stats = batch_stats(gather(g, x.data()), cfg_.eps);
      mean = stats.mean;
      invstd = stats.invstd;
    }
    const auto want = normalize(g, x.data(), mean, invstd, w_eff(), b_eff());
    const LayerState<T> before = st_;
    std::vector<T> y(x.size(), T(-777));
    const auto shape = g.shape();
    ASSERT_EQ(syncbn_forward_inference(bn_.get(), g.ndim(), shape.data(), x.data(), weight(),
                                       bias(), track ? st_.running_mean.data() : nan_.data(),
                                       track ? st_.running_var.data() : nan_.data(), y.data(),
                                       nullptr),
              SYNCBN_SUCCESS)
        << syncbn_last_error();
    EXPECT_TRUE(all_close("eval y", y, want, Tolerances<T>::data));
    EXPECT_TRUE(bitwise_equal("running_mean after eval", st_.running_mean, before.running_mean));
    EXPECT_TRUE(bitwise_equal("running_var after eval", st_.running_var, before.running_var));
    EXPECT_EQ(st_.num_batches_tracked, before.num_batches_tracked);
  }

 private:
  syncbn_config_t cfg_;
  syncbn::BatchNorm bn_;
  LayerState<T> st_;   // what the library reads and writes
  LayerState<T> ref_;  // the reference's running statistics
  std::vector<T> nan_, unused_mean_, unused_var_;
};


std::vector<int64_t> spatial_of_rank(int spatial_dims) {
  switch (spatial_dims) {
    case 0: return {};
    case 1: return {7};
    case 2: return {3, 5};
    default: return {2, 3, 4};
  }
}

// ---- every combination of dtype, layout, rank, affine, tracking and momentum ------------------

using Combo = std::tuple<syncbn_dtype_t, syncbn_layout_t, int, bool, bool, double>;

class Combinations : public ::testing::TestWithParam<Combo> {
 protected:
  template <class T>
  void run() {
    const auto [dtype, layout, sdims, affine, track, momentum] = GetParam();
    (void)dtype;
    const int64_t C = 5;
    Rng rng(test_seed());
    // eps 1e-3 so that a misplaced eps is visible even at fp32 tolerance.
    CheckedLayer<T> layer(make_cfg(C, DtypeOf<T>::value, layout, affine, track, momentum, 1e-3),
                          rng);
    const Geometry g = make_geometry(layout, sdims == 0 ? 8 : 3, C, spatial_of_rank(sdims));
    const auto dist = ChannelDistribution::random(C, rng);
    const auto x = random_batch<T>(g, rng, dist);
    const auto dy = random_batch<T>(g, rng);
    layer.train_step(g, x, dy);
    if (HasFatalFailure()) return;
    layer.eval_step(g, random_batch<T>(g, rng, dist));
  }
};

std::string combo_name(const ::testing::TestParamInfo<Combo>& info) {
  const auto& [dtype, layout, sdims, affine, track, momentum] = info.param;
  return std::string(dtype_name(dtype)) + "_" + layout_name(layout) + "_sp" +
         std::to_string(sdims) + (affine ? "_affine" : "_noaffine") +
         (track ? "_track" : "_notrack") + "_m" + momentum_name(momentum);
}

TEST_P(Combinations, TrainBackwardEvalMatchReference) {
  if (std::get<0>(GetParam()) == SYNCBN_FLOAT32)
    run<float>();
  else
    run<double>();
}

INSTANTIATE_TEST_SUITE_P(
    All, Combinations,
    ::testing::Combine(::testing::Values(SYNCBN_FLOAT32, SYNCBN_FLOAT64),
                       ::testing::Values(SYNCBN_CHANNELS_FIRST, SYNCBN_CHANNELS_LAST),
                       ::testing::Values(0, 1, 2, 3), ::testing::Bool(), ::testing::Bool(),
                       ::testing::Values(0.1, kCumulative)),
    combo_name);

// ---- several steps, odd channel counts, large counts -----------------------------------------

using DtypeLayout = std::tuple<syncbn_dtype_t, syncbn_layout_t>;
std::string dtype_layout_name(const ::testing::TestParamInfo<DtypeLayout>& info) {
  return std::string(dtype_name(std::get<0>(info.param))) + "_" +
         layout_name(std::get<1>(info.param));
}
const auto kAllDtypeLayouts =
    ::testing::Combine(::testing::Values(SYNCBN_FLOAT32, SYNCBN_FLOAT64),
                       ::testing::Values(SYNCBN_CHANNELS_FIRST, SYNCBN_CHANNELS_LAST));

template <class F>
void dispatch(syncbn_dtype_t dtype, F&& f) {
  if (dtype == SYNCBN_FLOAT32)
    f(float{});
  else
    f(double{});
}

class Steps : public ::testing::TestWithParam<DtypeLayout> {};

// Five consecutive steps with fresh data and a batch size that changes every step, in both
// momentum modes: running statistics and num_batches_tracked follow the reference step by step.
TEST_P(Steps, ConsecutiveStepsFollowReference) {
  const auto [dtype, layout] = GetParam();
  dispatch(dtype, [&, layout = layout](auto tag) {
    using T = decltype(tag);
    for (double momentum : {0.1, kCumulative}) {
      SCOPED_TRACE("momentum " + momentum_name(momentum));
      Rng rng(test_seed(is_cumulative(momentum)));
      const int64_t C = 4;
      CheckedLayer<T> layer(make_cfg(C, DtypeOf<T>::value, layout, true, true, momentum), rng);
      const auto dist = ChannelDistribution::random(C, rng);
      for (int step = 0; step < 5; ++step) {
        SCOPED_TRACE("step " + std::to_string(step));
        const Geometry g = make_geometry(layout, 2 + step % 3, C, {3, 4});
        layer.train_step(g, random_batch<T>(g, rng, dist), random_batch<T>(g, rng));
        if (HasFatalFailure()) return;
      }
      layer.eval_step(make_geometry(layout, 2, C, {3, 4}),
                      random_batch<T>(make_geometry(layout, 2, C, {3, 4}), rng, dist));
    }
  });
}
INSTANTIATE_TEST_SUITE_P(All, Steps, kAllDtypeLayouts, dtype_layout_name);

// A batch's shape apart from the channels: N and the spatial dims.
struct BatchShape {
  int64_t n;
  std::vector<int64_t> spatial;
};

// For each batch shape in turn, one training step (random dy) and one eval step of one layer of
// C channels in dtype and layout, every output against the fp64 reference (CheckedLayer).
void train_and_eval_each(syncbn_dtype_t dtype, syncbn_layout_t layout, int64_t C,
                         const std::vector<BatchShape>& batches) {
  dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    Rng rng(test_seed());
    CheckedLayer<T> layer(make_cfg(C, DtypeOf<T>::value, layout, true, true, 0.1), rng);
    const auto dist = ChannelDistribution::random(C, rng);
    for (const BatchShape& b : batches) {
      const Geometry g = make_geometry(layout, b.n, C, b.spatial);
      layer.train_step(g, random_batch<T>(g, rng, dist), random_batch<T>(g, rng));
      if (::testing::Test::HasFatalFailure()) return;
      layer.eval_step(g, random_batch<T>(g, rng, dist));
    }
  });
}

using OddChannels = std::tuple<syncbn_dtype_t, syncbn_layout_t, int64_t>;
class OddChannelCounts : public ::testing::TestWithParam<OddChannels> {};

TEST_P(OddChannelCounts, MatchReference) {
  const auto [dtype, layout, C] = GetParam();
  train_and_eval_each(dtype, layout, C, {{3, {5, 3}}, {5, {}}, {2, {3}}});
}
INSTANTIATE_TEST_SUITE_P(All, OddChannelCounts,
                         ::testing::Combine(::testing::Values(SYNCBN_FLOAT32, SYNCBN_FLOAT64),
                                            ::testing::Values(SYNCBN_CHANNELS_FIRST,
                                                              SYNCBN_CHANNELS_LAST),
                                            ::testing::Values(1, 3, 17)),
                         [](const ::testing::TestParamInfo<OddChannels>& info) {
                           return std::string(dtype_name(std::get<0>(info.param))) + "_" +
                                  layout_name(std::get<1>(info.param)) + "_C" +
                                  std::to_string(std::get<2>(info.param));
                         });

class LargeCount : public ::testing::TestWithParam<DtypeLayout> {};

// 65536 values per channel: enough for the kernels to split a channel across threads; then a
// single sample whose channels-first rows are long (33043, not a multiple of any power of two),
// so that one row is cut into several pieces.
TEST_P(LargeCount, MultithreadedPartialSumsMatchReference) {
  const auto [dtype, layout] = GetParam();
  train_and_eval_each(dtype, layout, 3, {{4, {128, 128}}, {1, {173, 191}}});
}
INSTANTIATE_TEST_SUITE_P(All, LargeCount, kAllDtypeLayouts, dtype_layout_name);

class WideChannels : public ::testing::TestWithParam<DtypeLayout> {};

// Many channels, few values each, and enough elements in all for several threads: the
// channels-last kernels vectorize across channels and split the rows between threads. C = 1031
// makes rows of over 4 KiB in fp32 (swept 4 rows at a time) and 37 or 36 rows are no multiple
// of the 16-row groups.
TEST_P(WideChannels, MatchReference) {
  const auto [dtype, layout] = GetParam();
  train_and_eval_each(dtype, layout, 1031, {{37, {}}, {4, {3, 3}}});
}
INSTANTIATE_TEST_SUITE_P(All, WideChannels, kAllDtypeLayouts, dtype_layout_name);

class ShortRows : public ::testing::TestWithParam<DtypeLayout> {};

// Channels-first rows of fewer than 256 values read (forward: x; backward: x and dy, so rows
// under 128) are reduced channel by channel, all rows of a channel into 16 accumulators; longer
// rows piece by piece. Row lengths 7 x 7, 15, 16, 17, 127 (tails of every size, and none), 128
// and 255 (channel by channel forward only), 256 (row by row both ways); 5 channels shared
// between threads unevenly; enough elements (> 32768) for several threads.
TEST_P(ShortRows, MatchReference) {
  const auto [dtype, layout] = GetParam();
  train_and_eval_each(dtype, layout, 5,
                      {{160, {7, 7}}, {440, {15}}, {410, {16}}, {390, {17}}, {60, {127}},
                       {60, {128}}, {26, {255}}, {26, {16, 16}}});
}
INSTANTIATE_TEST_SUITE_P(All, ShortRows, kAllDtypeLayouts, dtype_layout_name);

// momentum 0 leaves the running statistics exactly as they were (num_batches_tracked still
// counts the batch); momentum 1 replaces them with the batch's (unbiased variance).
TEST(Momentum, ZeroAndOne) {
  Rng rng(test_seed());
  const int64_t C = 3;
  const Geometry g = make_geometry(SYNCBN_CHANNELS_FIRST, 4, C, {5});
  const auto x = random_batch<double>(g, rng, ChannelDistribution::random(C, rng));
  const BatchStats ref = batch_stats(gather(g, x.data()), 1e-5);
  for (double momentum : {0.0, 1.0}) {
    SCOPED_TRACE("momentum " + momentum_name(momentum));
    syncbn::BatchNorm bn(syncbn::Communicator::self(),
                         make_cfg(C, SYNCBN_FLOAT64, SYNCBN_CHANNELS_FIRST, true, true, momentum));
    auto st = LayerState<double>::random(C, rng);
    const auto before = st;
    std::vector<double> y(x.size());
    bn.forward_training(g.shape(), x.data(), st.weight.data(), st.bias.data(), y.data(), nullptr,
                        nullptr, st.running_mean.data(), st.running_var.data(),
                        &st.num_batches_tracked);
    EXPECT_EQ(st.num_batches_tracked, before.num_batches_tracked + 1);
    if (momentum == 0.0) {
      EXPECT_TRUE(bitwise_equal("running_mean", st.running_mean, before.running_mean));
      EXPECT_TRUE(bitwise_equal("running_var", st.running_var, before.running_var));
    } else {
      const double m = static_cast<double>(ref.count);
      std::vector<double> unbiased;
      for (double v : ref.var) unbiased.push_back(v * m / (m - 1));
      EXPECT_TRUE(all_close("running_mean", st.running_mean, ref.mean,
                            scaled(1e-12, ref.abs_mean)));
      EXPECT_TRUE(all_close("running_var", st.running_var, unbiased, Tol{1e-12, {}}));
    }
  }
}

// ---- precision: fp32 input far from zero -----------------------------------------------------

class Fp32LargeMean : public ::testing::TestWithParam<syncbn_layout_t> {};

// One forward_training of fp32 data x through bn (momentum 1: running_var becomes the unbiased
// batch variance) on a random layer state, with the fp64 reference statistics of x.
struct Fp32Forward {
  LayerState<float> st;
  std::vector<float> y, save_mean, save_invstd;
  BatchStats ref;
  std::vector<double> unbiased;  // ref.var * m / (m - 1)
};

Fp32Forward fp32_forward(syncbn::BatchNorm& bn, const syncbn_config_t& cfg, const Geometry& g,
                         const std::vector<float>& x, Rng& rng) {
  const int64_t C = cfg.num_features;
  Fp32Forward f{LayerState<float>::random(C, rng), std::vector<float>(x.size()),
                std::vector<float>(C), std::vector<float>(C), {}, {}};
  bn.forward_training(g.shape(), x.data(), f.st.weight.data(), f.st.bias.data(), f.y.data(),
                      f.save_mean.data(), f.save_invstd.data(), f.st.running_mean.data(),
                      f.st.running_var.data(), &f.st.num_batches_tracked);
  f.ref = batch_stats(gather(g, x.data()), cfg.eps);
  const double m = static_cast<double>(f.ref.count);
  for (double v : f.ref.var) f.unbiased.push_back(v * m / (m - 1));
  return f;
}

// mean / std = 1e4 with 65536 values per channel: plain fp32 sums (or an fp32 E[x^2] - E[x]^2)
// lose the variance entirely; fp64 accumulation keeps it to ~1e-8.
TEST_P(Fp32LargeMean, VarianceIsPrecise) {
  const syncbn_layout_t layout = GetParam();
  Rng rng(test_seed());
  const int64_t C = 3;
  // momentum 1: running_var is exactly the unbiased batch variance.
  const syncbn_config_t cfg = make_cfg(C, SYNCBN_FLOAT32, layout, true, true, 1.0);
  syncbn::BatchNorm bn(syncbn::Communicator::self(), cfg);
  const Geometry g = make_geometry(layout, 16, C, {64, 64});
  ChannelDistribution dist = ChannelDistribution::constant(C, 1e4, 1.0);
  dist.mu[1] = -1e4;
  dist.sd[2] = 3.0;
  dist.mu[2] = 3e4;
  const auto x = random_batch<float>(g, rng, dist);
  const Fp32Forward f = fp32_forward(bn, cfg, g, x, rng);
  const auto& [st, y, save_mean, save_invstd, ref, unbiased] = f;
  EXPECT_TRUE(all_close("running_var (= unbiased batch variance)", st.running_var, unbiased,
                        Tol{1e-5, {}}));
  EXPECT_TRUE(all_close("save_invstd", save_invstd, ref.invstd, Tol{1e-5, {}}));
  EXPECT_TRUE(all_close("save_mean", save_mean, ref.mean, Tol{1e-6, {}}));
  // y is held to the same norm-wise fp32 accuracy as everywhere else. (x - mean) must not be
  // formed with the mean rounded to fp32: that alone costs ulp(3e4) / 2 * |invstd * w| ~ 5e-4.
  const auto y_want = normalize(g, x.data(), ref.mean, ref.invstd, to_double(st.weight),
                                to_double(st.bias))
                          .value;
  EXPECT_TRUE(all_close("y", y, y_want, normwise(2e-5, y_want)));
}
INSTANTIATE_TEST_SUITE_P(All, Fp32LargeMean,
                         ::testing::Values(SYNCBN_CHANNELS_FIRST, SYNCBN_CHANNELS_LAST),
                         [](const ::testing::TestParamInfo<syncbn_layout_t>& info) {
                           return std::string(layout_name(info.param));
                         });

// fp32 data near 1e19 (std 5e18): squares of the values overflow fp32, so the 16-row fp32 group
// sums of inner-size-1 data (channels-last, or (N, C)) would be infinite; the kernels redo those
// sums in fp64, and the statistics stay finite and precise.
TEST_P(Fp32LargeMean, HugeValuesDoNotOverflow) {
  const syncbn_layout_t layout = GetParam();
  Rng rng(test_seed());
  const int64_t C = 3;
  const syncbn_config_t cfg = make_cfg(C, SYNCBN_FLOAT32, layout, true, true, 1.0);
  syncbn::BatchNorm bn(syncbn::Communicator::self(), cfg);
  for (const Geometry& g : {make_geometry(layout, 8, C, {16, 16}), make_geometry(layout, 999, C, {})}) {
    const auto x = random_batch<float>(g, rng, ChannelDistribution::constant(C, 1e19, 5e18));
    const Fp32Forward f = fp32_forward(bn, cfg, g, x, rng);
    EXPECT_TRUE(all_close("running_var", f.st.running_var, f.unbiased, Tol{1e-5, {}}));
    EXPECT_TRUE(all_close("save_invstd", f.save_invstd, f.ref.invstd, Tol{1e-5, {}}));
    EXPECT_TRUE(all_close("save_mean", f.save_mean, f.ref.mean, Tol{1e-5, {}}));
  }
}

// ---- special values, aliasing, modes ---------------------------------------------------------

class SpecialValues : public ::testing::TestWithParam<DtypeLayout> {};

// A NaN (or an Inf) in one channel makes that channel's outputs non-finite; the other channels
// are untouched and the call succeeds.
TEST_P(SpecialValues, NonFiniteInputStaysInItsChannel) {
  const auto [dtype, layout] = GetParam();
  dispatch(dtype, [&, layout = layout](auto tag) {
    using T = decltype(tag);
    for (const T bad : {std::numeric_limits<T>::quiet_NaN(), std::numeric_limits<T>::infinity()}) {
      SCOPED_TRACE(std::isnan(bad) ? "NaN" : "Inf");
      Rng rng(test_seed());
      const int64_t C = 3, poisoned = 1;
      const syncbn_config_t cfg = make_cfg(C, DtypeOf<T>::value, layout, true, true, 0.1);
      syncbn::BatchNorm bn(syncbn::Communicator::self(), cfg);
      const Geometry g = make_geometry(layout, 3, C, {4, 2});
      auto x = random_batch<T>(g, rng, ChannelDistribution::random(C, rng));
      x[g.offset(1, poisoned, 5)] = bad;
      auto st = LayerState<T>::random(C, rng);
      auto ref_st = st;
      std::vector<T> y(x.size()), save_mean(C), save_invstd(C);
      const auto shape = g.shape();
      ASSERT_EQ(syncbn_forward_training(bn.get(), g.ndim(), shape.data(), x.data(),
                                        st.weight.data(), st.bias.data(), y.data(),
                                        save_mean.data(), save_invstd.data(),
                                        st.running_mean.data(), st.running_var.data(),
                                        &st.num_batches_tracked, nullptr),
                SYNCBN_SUCCESS)
          << syncbn_last_error();
      const BatchStats ref = batch_stats(gather(g, x.data()), cfg.eps);
      update_running(ref_st, ref, cfg.momentum);
      const auto want = normalize(g, x.data(), ref.mean, ref.invstd, to_double(st.weight),
                                  to_double(st.bias));
      for (int64_t c = 0; c < C; ++c) {
        std::vector<T> got_c;
        Expected want_c;
        g.for_each_in_channel(c, [&](int64_t k) {
          got_c.push_back(y[k]);
          want_c.value.push_back(want.value[k]);
          want_c.scale.push_back(want.scale[k]);
        });
        if (c == poisoned) {
          for (size_t i = 0; i < got_c.size(); ++i)
            EXPECT_FALSE(std::isfinite(got_c[i])) << "y of the poisoned channel, element " << i;
          EXPECT_FALSE(std::isfinite(save_mean[c]));
          EXPECT_FALSE(std::isfinite(st.running_mean[c]));
        } else {
          EXPECT_TRUE(
              all_close("y channel " + std::to_string(c), got_c, want_c, Tolerances<T>::data));
          EXPECT_NEAR(st.running_mean[c], ref_st.running_mean[c],
                      Tolerances<T>::stats * (1 + std::fabs(ref_st.running_mean[c])));
          EXPECT_NEAR(st.running_var[c], ref_st.running_var[c],
                      Tolerances<T>::stats * std::fabs(ref_st.running_var[c]));
        }
      }
    }
  });
}

// y may be x, and dx may be dy.
TEST_P(SpecialValues, InPlace) {
  const auto [dtype, layout] = GetParam();
  dispatch(dtype, [&, layout = layout](auto tag) {
    using T = decltype(tag);
    Rng rng(test_seed());
    const int64_t C = 3;
    const syncbn_config_t cfg = make_cfg(C, DtypeOf<T>::value, layout, true, false, 0.1);
    syncbn::BatchNorm bn(syncbn::Communicator::self(), cfg);
    const Geometry g = make_geometry(layout, 4, C, {3, 3});
    const auto x = random_batch<T>(g, rng, ChannelDistribution::random(C, rng));
    const auto dy = random_batch<T>(g, rng);
    const auto st = LayerState<T>::random(C, rng);
    const BatchStats ref = batch_stats(gather(g, x.data()), cfg.eps);

    std::vector<T> buf = x, save_mean(C), save_invstd(C);
    bn.forward_training(g.shape(), buf.data(), st.weight.data(), st.bias.data(), buf.data(),
                        save_mean.data(), save_invstd.data(), nullptr, nullptr, nullptr);
    const auto y_want = normalize(g, x.data(), ref.mean, ref.invstd, to_double(st.weight),
                                  to_double(st.bias));
    EXPECT_TRUE(all_close("y (in place over x)", buf, y_want, Tolerances<T>::data));

    const auto mean = to_double(save_mean), invstd = to_double(save_invstd);
    const GradSums sums = grad_sums(gather(g, x.data()), gather(g, dy.data()), mean);
    const auto dx_want = grad_input(g, x.data(), dy.data(), to_double(st.weight), mean, invstd, sums);
    std::vector<T> grad = dy, dweight(C), dbias(C);
    bn.backward(g.shape(), x.data(), grad.data(), st.weight.data(), save_mean.data(),
                save_invstd.data(), grad.data(), dweight.data(), dbias.data());
    EXPECT_TRUE(all_close("dx (in place over dy)", grad, dx_want, Tolerances<T>::data));
    EXPECT_TRUE(all_close("dbias", dbias, sums.sum_g, scaled(Tolerances<T>::sums, sums.abs_g)));
  });
}

// Without running statistics, eval mode normalizes with the batch statistics; running_mean and
// running_var may be NULL then.
TEST_P(SpecialValues, InferenceWithoutTrackingUsesBatchStatistics) {
  const auto [dtype, layout] = GetParam();
  dispatch(dtype, [&, layout = layout](auto tag) {
    using T = decltype(tag);
    Rng rng(test_seed());
    const int64_t C = 3;
    syncbn::BatchNorm bn(syncbn::Communicator::self(),
                         make_cfg(C, DtypeOf<T>::value, layout, true, false, 0.1));
    const Geometry g = make_geometry(layout, 3, C, {5});
    const auto x = random_batch<T>(g, rng, ChannelDistribution::random(C, rng));
    const auto st = LayerState<T>::random(C, rng);
    const BatchStats ref = batch_stats(gather(g, x.data()), 1e-5);
    std::vector<T> y(x.size());
    bn.forward_inference(g.shape(), x.data(), st.weight.data(), st.bias.data(), nullptr, nullptr,
                         y.data());
    const auto want = normalize(g, x.data(), ref.mean, ref.invstd, to_double(st.weight),
                                to_double(st.bias));
    EXPECT_TRUE(all_close("eval y (batch statistics)", y, want, Tolerances<T>::data));
  });
}

// On one process the group's parameter gradients are the local ones.
TEST_P(SpecialValues, GlobalParamGradsEqualLocalOnOneProcess) {
  const auto [dtype, layout] = GetParam();
  dispatch(dtype, [&, layout = layout](auto tag) {
    using T = decltype(tag);
    Rng rng(test_seed());
    const int64_t C = 4;
    syncbn_config_t cfg = make_cfg(C, DtypeOf<T>::value, layout, true, true, 0.1);
    const auto comm = syncbn::Communicator::self();
    syncbn::BatchNorm local(comm, cfg);
    cfg.global_param_grads = 1;
    syncbn::BatchNorm global(comm, cfg);
    const Geometry g = make_geometry(layout, 3, C, {2, 3});
    const auto x = random_batch<T>(g, rng, ChannelDistribution::random(C, rng));
    const auto dy = random_batch<T>(g, rng);
    auto st = LayerState<T>::random(C, rng);
    std::vector<T> y(x.size()), mean(C), invstd(C);
    local.forward_training(g.shape(), x.data(), st.weight.data(), st.bias.data(), y.data(),
                           mean.data(), invstd.data(), st.running_mean.data(),
                           st.running_var.data(), &st.num_batches_tracked);
    std::vector<T> dx_l(x.size()), dw_l(C), db_l(C), dx_g(x.size()), dw_g(C), db_g(C);
    local.backward(g.shape(), x.data(), dy.data(), st.weight.data(), mean.data(), invstd.data(),
                   dx_l.data(), dw_l.data(), db_l.data());
    global.backward(g.shape(), x.data(), dy.data(), st.weight.data(), mean.data(), invstd.data(),
                    dx_g.data(), dw_g.data(), db_g.data());
    const Tol tight{1e-12, {}};
    EXPECT_TRUE(all_close("dweight global vs local", dw_g, to_double(dw_l), tight));
    EXPECT_TRUE(all_close("dbias global vs local", db_g, to_double(db_l), tight));
    EXPECT_TRUE(all_close("dx global vs local", dx_g, to_double(dx_l), tight));
  });
}

INSTANTIATE_TEST_SUITE_P(All, SpecialValues, kAllDtypeLayouts, dtype_layout_name);

// A batch of one value per channel is fine without running statistics (variance 0, y = bias),
// and backward gives dx = 0.
TEST(SmallBatch, CountOneWithoutTrackingIsDefined) {
  const int64_t C = 3;
  syncbn::BatchNorm bn(syncbn::Communicator::self(),
                       make_cfg(C, SYNCBN_FLOAT64, SYNCBN_CHANNELS_FIRST, true, false, 0.1));
  const std::vector<double> x{1.5, -2.0, 7.0}, w{2.0, 3.0, -1.0}, b{0.25, -0.5, 1.0};
  std::vector<double> y(3), mean(C), invstd(C);
  bn.forward_training({1, C}, x.data(), w.data(), b.data(), y.data(), mean.data(), invstd.data(),
                      nullptr, nullptr, nullptr);
  for (int c = 0; c < C; ++c) {
    EXPECT_DOUBLE_EQ(y[c], b[c]) << "channel " << c;
    EXPECT_DOUBLE_EQ(mean[c], x[c]) << "channel " << c;
    EXPECT_NEAR(invstd[c], 1.0 / std::sqrt(1e-5), 1e-9) << "channel " << c;
  }
  const std::vector<double> dy{0.5, 1.0, -3.0};
  std::vector<double> dx(3, -7.0), dw(C), db(C);
  bn.backward({1, C}, x.data(), dy.data(), w.data(), mean.data(), invstd.data(), dx.data(),
              dw.data(), db.data());
  for (int c = 0; c < C; ++c) {
    EXPECT_NEAR(dx[c], 0.0, 1e-12) << "channel " << c;
    EXPECT_DOUBLE_EQ(db[c], dy[c]) << "channel " << c;
    EXPECT_NEAR(dw[c], 0.0, 1e-12) << "channel " << c;
  }
}

// ---- the C API: handles, configs, defaults --------------------------------------------------

TEST(CApi, StatusStrings) {
  EXPECT_STREQ(syncbn_status_string(SYNCBN_SUCCESS), "SYNCBN_SUCCESS");
  EXPECT_STREQ(syncbn_status_string(SYNCBN_ERROR_INVALID_ARGUMENT),
               "SYNCBN_ERROR_INVALID_ARGUMENT");
  EXPECT_STREQ(syncbn_status_string(SYNCBN_ERROR_BATCH_TOO_SMALL), "SYNCBN_ERROR_BATCH_TOO_SMALL");
  EXPECT_STREQ(syncbn_status_string(SYNCBN_ERROR_CALL_MISMATCH), "SYNCBN_ERROR_CALL_MISMATCH");
  EXPECT_STREQ(syncbn_status_string(SYNCBN_ERROR_CONFIG_MISMATCH), "SYNCBN_ERROR_CONFIG_MISMATCH");
  for (int s = 0; s <= 9; ++s)
    EXPECT_NE(syncbn_status_string(static_cast<syncbn_status_t>(s)), nullptr) << s;
  EXPECT_NE(syncbn_status_string(static_cast<syncbn_status_t>(12345)), nullptr);
  EXPECT_NE(syncbn_last_error(), nullptr);
}

// The version the loaded library reports is the headers' (both come from CMake's project()).
TEST(CApi, VersionMatchesTheHeaders) {
  int version = -1;
  ASSERT_EQ(syncbn_get_version(&version), SYNCBN_SUCCESS);
  EXPECT_EQ(version, SYNCBN_VERSION_CODE);
  EXPECT_EQ(version, SYNCBN_VERSION_MAJOR * 10000 + SYNCBN_VERSION_MINOR * 100 + SYNCBN_VERSION_PATCH);
  EXPECT_EQ(syncbn::version(), version);
  EXPECT_EQ(syncbn_get_version(nullptr), SYNCBN_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(syncbn_last_error()).find("version is null"), std::string::npos);
}

// The last-error message is per thread: a failure on another thread does not replace this one's.
TEST(CApi, LastErrorIsPerThread) {
  syncbn_config_t cfg;
  syncbn_config_init(&cfg, 3, SYNCBN_FLOAT32);
  cfg.eps = -1;
  syncbn_comm_t comm = nullptr;
  ASSERT_EQ(syncbn_comm_create_self(&comm), SYNCBN_SUCCESS);
  syncbn_plan_t plan = nullptr;
  ASSERT_EQ(syncbn_plan_create(comm, &cfg, &plan), SYNCBN_ERROR_INVALID_ARGUMENT);
  const std::string mine = syncbn_last_error();
  EXPECT_NE(mine.find("eps"), std::string::npos) << mine;
  std::string theirs;
  std::thread([&] {
    syncbn_config_t bad;
    syncbn_config_init(&bad, 0, SYNCBN_FLOAT32);
    syncbn_plan_t p = nullptr;
    EXPECT_EQ(syncbn_plan_create(comm, &bad, &p), SYNCBN_ERROR_INVALID_ARGUMENT);
    theirs = syncbn_last_error();
  }).join();
  EXPECT_NE(theirs.find("num_features"), std::string::npos) << theirs;
  EXPECT_EQ(std::string(syncbn_last_error()), mine);
  syncbn_comm_destroy(comm);
}

TEST(CApi, ConfigDefaults) {
  syncbn_config_t cfg;
  std::memset(&cfg, 0xab, sizeof cfg);
  ASSERT_EQ(syncbn_config_init(&cfg, 7, SYNCBN_FLOAT64), SYNCBN_SUCCESS);
  EXPECT_EQ(cfg.num_features, 7);
  EXPECT_EQ(cfg.dtype, SYNCBN_FLOAT64);
  EXPECT_EQ(cfg.layout, SYNCBN_CHANNELS_FIRST);
  EXPECT_EQ(cfg.device, SYNCBN_DEVICE_CPU);
  EXPECT_EQ(cfg.eps, 1e-5);
  EXPECT_EQ(cfg.momentum, 0.1);
  EXPECT_NE(cfg.affine, 0);
  EXPECT_NE(cfg.track_running_stats, 0);
  EXPECT_EQ(cfg.global_param_grads, 0);
  EXPECT_EQ(syncbn_config_init(nullptr, 7, SYNCBN_FLOAT64), SYNCBN_ERROR_INVALID_ARGUMENT);
}

TEST(CApi, SelfCommunicator) {
  EXPECT_EQ(syncbn_comm_create_self(nullptr), SYNCBN_ERROR_INVALID_ARGUMENT);
  syncbn_comm_t comm = nullptr;
  ASSERT_EQ(syncbn_comm_create_self(&comm), SYNCBN_SUCCESS) << syncbn_last_error();
  ASSERT_NE(comm, nullptr);
  int rank = -1, size = -1;
  EXPECT_EQ(syncbn_comm_rank(comm, &rank), SYNCBN_SUCCESS);
  EXPECT_EQ(syncbn_comm_size(comm, &size), SYNCBN_SUCCESS);
  EXPECT_EQ(rank, 0);
  EXPECT_EQ(size, 1);
  EXPECT_EQ(syncbn_comm_rank(nullptr, &rank), SYNCBN_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(syncbn_comm_rank(comm, nullptr), SYNCBN_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(syncbn_comm_size(nullptr, &size), SYNCBN_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(syncbn_comm_size(comm, nullptr), SYNCBN_ERROR_INVALID_ARGUMENT);

  syncbn_comm_t sub = nullptr;
  ASSERT_EQ(syncbn_comm_split(comm, 1, &sub), SYNCBN_SUCCESS) << syncbn_last_error();
  EXPECT_EQ(syncbn_comm_size(sub, &size), SYNCBN_SUCCESS);
  EXPECT_EQ(size, 1);
  EXPECT_EQ(syncbn_comm_destroy(sub), SYNCBN_SUCCESS);
  for (int bad : {0, -1, 2}) {
    syncbn_comm_t s = nullptr;
    EXPECT_EQ(syncbn_comm_split(comm, bad, &s), SYNCBN_ERROR_INVALID_ARGUMENT) << "group " << bad;
  }
  EXPECT_EQ(syncbn_comm_split(nullptr, 1, &sub), SYNCBN_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(syncbn_comm_split(comm, 1, nullptr), SYNCBN_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(syncbn_comm_destroy(comm), SYNCBN_SUCCESS);
  EXPECT_EQ(syncbn_comm_destroy(nullptr), SYNCBN_SUCCESS);
  EXPECT_EQ(syncbn_plan_destroy(nullptr), SYNCBN_SUCCESS);
}

// A plan keeps its communicator alive after the caller's handle is destroyed.
TEST(CApi, PlanOutlivesCommunicatorHandle) {
  syncbn_comm_t comm = nullptr;
  ASSERT_EQ(syncbn_comm_create_self(&comm), SYNCBN_SUCCESS);
  syncbn_config_t cfg;
  syncbn_config_init(&cfg, 2, SYNCBN_FLOAT64);
  cfg.track_running_stats = 0;
  syncbn_plan_t plan = nullptr;
  ASSERT_EQ(syncbn_plan_create(comm, &cfg, &plan), SYNCBN_SUCCESS) << syncbn_last_error();
  ASSERT_EQ(syncbn_comm_destroy(comm), SYNCBN_SUCCESS);
  const int64_t shape[2] = {2, 2};
  const double x[4] = {1, 2, 3, 5}, w[2] = {1, 1}, b[2] = {0, 0};
  double y[4], mean[2], invstd[2];
  ASSERT_EQ(syncbn_forward_training(plan, 2, shape, x, w, b, y, mean, invstd, nullptr, nullptr,
                                    nullptr, nullptr),
            SYNCBN_SUCCESS)
      << syncbn_last_error();
  EXPECT_DOUBLE_EQ(mean[0], 2.0);
  EXPECT_DOUBLE_EQ(mean[1], 3.5);
  EXPECT_EQ(syncbn_plan_destroy(plan), SYNCBN_SUCCESS);
}

TEST(CApi, PlanGetConfigRoundTrips) {
  auto comm = syncbn::Communicator::self();
  syncbn_config_t cfg = make_cfg(9, SYNCBN_FLOAT64, SYNCBN_CHANNELS_LAST, false, true,
                                 kCumulative, 3e-4);
  cfg.global_param_grads = 1;
  syncbn::BatchNorm bn(comm, cfg);
  const syncbn_config_t got = bn.config();
  EXPECT_EQ(got.num_features, 9);
  EXPECT_EQ(got.dtype, SYNCBN_FLOAT64);
  EXPECT_EQ(got.layout, SYNCBN_CHANNELS_LAST);
  EXPECT_EQ(got.device, SYNCBN_DEVICE_CPU);
  EXPECT_EQ(got.eps, 3e-4);
  EXPECT_TRUE(std::isnan(got.momentum));
  EXPECT_EQ(got.affine, 0);
  EXPECT_NE(got.track_running_stats, 0);
  EXPECT_NE(got.global_param_grads, 0);
  syncbn_config_t out;
  EXPECT_EQ(syncbn_plan_get_config(nullptr, &out), SYNCBN_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(syncbn_plan_get_config(bn.get(), nullptr), SYNCBN_ERROR_INVALID_ARGUMENT);
}

// ---- the C API: syncbn_plan_create validation -----------------------------------------------

struct ConfigCase {
  const char* name;
  void (*mutate)(syncbn_config_t&);
  syncbn_status_t want;
  const char* names;  // substring the message must contain ("" for success)
};

class PlanCreate : public ::testing::TestWithParam<ConfigCase> {};

TEST_P(PlanCreate, Status) {
  const ConfigCase& tc = GetParam();
  syncbn_comm_t comm = nullptr;
  ASSERT_EQ(syncbn_comm_create_self(&comm), SYNCBN_SUCCESS);
  syncbn_config_t cfg;
  ASSERT_EQ(syncbn_config_init(&cfg, 3, SYNCBN_FLOAT32), SYNCBN_SUCCESS);
  tc.mutate(cfg);
  syncbn_plan_t plan = nullptr;
  const syncbn_status_t got = syncbn_plan_create(comm, &cfg, &plan);
  EXPECT_EQ(got, tc.want) << syncbn_last_error();
  if (tc.want == SYNCBN_SUCCESS) {
    EXPECT_NE(plan, nullptr);
  } else {
    const std::string msg = syncbn_last_error();
    EXPECT_NE(msg.find(tc.names), std::string::npos)
        << "message '" << msg << "' does not name '" << tc.names << "'";
  }
  if (got == SYNCBN_SUCCESS) syncbn_plan_destroy(plan);
  syncbn_comm_destroy(comm);
}

const ConfigCase kConfigCases[] = {
    {"C_zero", [](syncbn_config_t& c) { c.num_features = 0; }, SYNCBN_ERROR_INVALID_ARGUMENT,
     "num_features"},
    {"C_negative", [](syncbn_config_t& c) { c.num_features = -3; }, SYNCBN_ERROR_INVALID_ARGUMENT,
     "num_features"},
    {"eps_zero", [](syncbn_config_t& c) { c.eps = 0; }, SYNCBN_ERROR_INVALID_ARGUMENT, "eps"},
    {"eps_negative", [](syncbn_config_t& c) { c.eps = -1e-5; }, SYNCBN_ERROR_INVALID_ARGUMENT,
     "eps"},
    {"eps_nan", [](syncbn_config_t& c) { c.eps = kNaN; }, SYNCBN_ERROR_INVALID_ARGUMENT, "eps"},
    {"eps_inf", [](syncbn_config_t& c) { c.eps = kInf; }, SYNCBN_ERROR_INVALID_ARGUMENT, "eps"},
    {"momentum_negative", [](syncbn_config_t& c) { c.momentum = -0.1; },
     SYNCBN_ERROR_INVALID_ARGUMENT, "momentum"},
    {"momentum_above_one", [](syncbn_config_t& c) { c.momentum = 1.5; },
     SYNCBN_ERROR_INVALID_ARGUMENT, "momentum"},
    {"momentum_inf", [](syncbn_config_t& c) { c.momentum = kInf; }, SYNCBN_ERROR_INVALID_ARGUMENT,
     "momentum"},
    {"momentum_minus_inf", [](syncbn_config_t& c) { c.momentum = -kInf; },
     SYNCBN_ERROR_INVALID_ARGUMENT, "momentum"},
    {"fp16_on_cpu", [](syncbn_config_t& c) { c.dtype = SYNCBN_FLOAT16; },
     SYNCBN_ERROR_NOT_SUPPORTED, ""},
#ifndef SYNCBN_TEST_HAVE_CUDA  // with CUDA: tests/test_cuda.cpp
    {"cuda_device_without_cuda", [](syncbn_config_t& c) { c.device = SYNCBN_DEVICE_CUDA; },
     SYNCBN_ERROR_NOT_SUPPORTED, ""},
#endif
    {"momentum_zero_ok", [](syncbn_config_t& c) { c.momentum = 0; }, SYNCBN_SUCCESS, ""},
    {"momentum_one_ok", [](syncbn_config_t& c) { c.momentum = 1; }, SYNCBN_SUCCESS, ""},
    {"momentum_cumulative_ok", [](syncbn_config_t& c) { c.momentum = kCumulative; },
     SYNCBN_SUCCESS, ""},
    {"tiny_eps_ok", [](syncbn_config_t& c) { c.eps = 1e-300; }, SYNCBN_SUCCESS, ""},
    {"fp64_channels_last_ok",
     [](syncbn_config_t& c) {
       c.dtype = SYNCBN_FLOAT64;
       c.layout = SYNCBN_CHANNELS_LAST;
     },
     SYNCBN_SUCCESS, ""},
};

INSTANTIATE_TEST_SUITE_P(All, PlanCreate, ::testing::ValuesIn(kConfigCases),
                         [](const ::testing::TestParamInfo<ConfigCase>& info) {
                           return std::string(info.param.name);
                         });

TEST(PlanCreateNulls, NullHandlesAndPointers) {
  syncbn_comm_t comm = nullptr;
  ASSERT_EQ(syncbn_comm_create_self(&comm), SYNCBN_SUCCESS);
  syncbn_config_t cfg;
  syncbn_config_init(&cfg, 3, SYNCBN_FLOAT32);
  syncbn_plan_t plan = nullptr;
  EXPECT_EQ(syncbn_plan_create(nullptr, &cfg, &plan), SYNCBN_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(syncbn_plan_create(comm, nullptr, &plan), SYNCBN_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(syncbn_plan_create(comm, &cfg, nullptr), SYNCBN_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(plan, nullptr);
  syncbn_comm_destroy(comm);
}

// ---- the C API: argument checking of forward, backward and inference -------------------------

// A valid fp32 channels-first call on shape (4, 3, 5), affine and tracking, momentum 0.1 (or
// cumulative), that each case breaks in one way (CallArgs, CallBuffers: tests/api_calls.hpp).
struct ArgCase {
  const char* name;
  Op op;
  void (*mutate)(CallArgs&);
  syncbn_status_t want;
  const char* names;  // substring the message must contain
  bool cumulative = false;
};

class ArgChecks : public ::testing::TestWithParam<ArgCase> {
 protected:
  void SetUp() override {
    ASSERT_EQ(syncbn_comm_create_self(&comm_), SYNCBN_SUCCESS);
    syncbn_config_t cfg;
    syncbn_config_init(&cfg, 3, SYNCBN_FLOAT32);
    if (GetParam().cumulative) cfg.momentum = kCumulative;
    ASSERT_EQ(syncbn_plan_create(comm_, &cfg, &plan_), SYNCBN_SUCCESS) << syncbn_last_error();
  }
  void TearDown() override {
    syncbn_plan_destroy(plan_);
    syncbn_comm_destroy(comm_);
  }

  syncbn_comm_t comm_ = nullptr;
  syncbn_plan_t plan_ = nullptr;
};

TEST_P(ArgChecks, ExactStatusAndNothingChanged) {
  const ArgCase& tc = GetParam();
  CallBuffers buf(4, 3, 5, test_seed());
  const CallBuffers before = buf;
  CallArgs a = buf.args(plan_);
  tc.mutate(a);

  const syncbn_status_t got = call(tc.op, a);
  ASSERT_EQ(got, tc.want) << op_name(tc.op) << ", message: " << syncbn_last_error();
  if (tc.want == SYNCBN_SUCCESS) return;

  const std::string msg = syncbn_last_error();
  EXPECT_FALSE(msg.empty()) << "no message for a failed call";
  EXPECT_NE(msg.find(tc.names), std::string::npos)
      << "message '" << msg << "' does not name '" << tc.names << "'";
  EXPECT_TRUE(buf.unchanged_since(before));
}

// Shapes that break one rule each (the valid one is (4, 3, 5)).
const int64_t kShapeWrongC[] = {4, 4, 5};
const int64_t kShapeWrongCLastAxis[] = {4, 5, 3};  // channels-first plan: C is axis 1
const int64_t kShapeNegN[] = {-1, 3, 5};
const int64_t kShapeNegSpatial[] = {4, 3, -5};
const int64_t kShapeEmptyN[] = {0, 3, 5};
const int64_t kShapeEmptySpatial[] = {4, 3, 0};
const int64_t kShapeOne[] = {1, 3, 1};
const int64_t kShapeOne2d[] = {1, 3};
const int64_t kShape6d[] = {4, 3, 1, 1, 1, 5};
const int64_t kShapeOverflow[] = {int64_t{1} << 40, 3, int64_t{1} << 40};

constexpr auto kInvalid = SYNCBN_ERROR_INVALID_ARGUMENT;
constexpr auto kTooSmall = SYNCBN_ERROR_BATCH_TOO_SMALL;
int64_t g_negative_count = -1;  // a corrupted num_batches_tracked

const ArgCase kArgCases[] = {
    // forward, training
    {"fwd_valid", Op::kForward, [](CallArgs&) {}, SYNCBN_SUCCESS, ""},
    {"fwd_null_plan", Op::kForward, [](CallArgs& a) { a.plan = nullptr; }, kInvalid, "plan"},
    {"fwd_null_x", Op::kForward, [](CallArgs& a) { a.x = nullptr; }, kInvalid, "x"},
    {"fwd_null_y", Op::kForward, [](CallArgs& a) { a.y = nullptr; }, kInvalid, "y"},
    {"fwd_null_weight", Op::kForward, [](CallArgs& a) { a.weight = nullptr; }, kInvalid, "weight"},
    {"fwd_null_bias", Op::kForward, [](CallArgs& a) { a.bias = nullptr; }, kInvalid, "bias"},
    {"fwd_null_running_mean", Op::kForward, [](CallArgs& a) { a.running_mean = nullptr; },
     kInvalid, "running_mean"},
    {"fwd_null_running_var", Op::kForward, [](CallArgs& a) { a.running_var = nullptr; },
     kInvalid, "running_var"},
    {"fwd_null_num_batches_tracked_cumulative", Op::kForward,
     [](CallArgs& a) { a.num_batches_tracked = nullptr; }, kInvalid, "num_batches_tracked", true},
    {"fwd_null_num_batches_tracked_momentum_ok", Op::kForward,
     [](CallArgs& a) { a.num_batches_tracked = nullptr; }, SYNCBN_SUCCESS, ""},
    {"fwd_negative_num_batches_tracked", Op::kForward,
     [](CallArgs& a) { a.num_batches_tracked = &g_negative_count; }, kInvalid,
     "num_batches_tracked"},
    {"fwd_null_save_stats_ok", Op::kForward,
     [](CallArgs& a) { a.save_mean = a.save_invstd = nullptr; }, SYNCBN_SUCCESS, ""},
    {"fwd_null_shape", Op::kForward, [](CallArgs& a) { a.shape = nullptr; }, kInvalid, "shape"},
    {"fwd_wrong_C", Op::kForward, [](CallArgs& a) { a.shape = kShapeWrongC; }, kInvalid, ""},
    {"fwd_C_on_wrong_axis", Op::kForward, [](CallArgs& a) { a.shape = kShapeWrongCLastAxis; },
     kInvalid, ""},
    {"fwd_ndim_1", Op::kForward, [](CallArgs& a) { a.ndim = 1; }, kInvalid, "ndim"},
    {"fwd_ndim_0", Op::kForward, [](CallArgs& a) { a.ndim = 0; }, kInvalid, "ndim"},
    {"fwd_ndim_6", Op::kForward,
     [](CallArgs& a) {
       a.ndim = 6;
       a.shape = kShape6d;
     },
     kInvalid, "ndim"},
    {"fwd_negative_N", Op::kForward, [](CallArgs& a) { a.shape = kShapeNegN; }, kInvalid, ""},
    {"fwd_negative_spatial", Op::kForward, [](CallArgs& a) { a.shape = kShapeNegSpatial; },
     kInvalid, ""},
    {"fwd_shape_overflows_int64", Op::kForward, [](CallArgs& a) { a.shape = kShapeOverflow; },
     kInvalid, "shape"},
    {"fwd_stream_on_cpu", Op::kForward,
     [](CallArgs& a) { a.stream = reinterpret_cast<void*>(uintptr_t{0x1000}); }, kInvalid,
     "stream"},
    {"fwd_empty_batch", Op::kForward, [](CallArgs& a) { a.shape = kShapeEmptyN; }, kTooSmall, ""},
    {"fwd_empty_batch_null_data", Op::kForward,
     [](CallArgs& a) {
       a.shape = kShapeEmptyN;
       a.x = nullptr;
       a.y = nullptr;
     },
     kTooSmall, ""},
    {"fwd_empty_spatial", Op::kForward, [](CallArgs& a) { a.shape = kShapeEmptySpatial; },
     kTooSmall, ""},
    {"fwd_count_one_tracking", Op::kForward, [](CallArgs& a) { a.shape = kShapeOne; }, kTooSmall,
     ""},
    {"fwd_count_one_tracking_2d", Op::kForward,
     [](CallArgs& a) {
       a.ndim = 2;
       a.shape = kShapeOne2d;
     },
     kTooSmall, ""},
    // backward
    {"bwd_valid", Op::kBackward, [](CallArgs&) {}, SYNCBN_SUCCESS, ""},
    {"bwd_null_param_grads_ok", Op::kBackward,
     [](CallArgs& a) { a.dweight = a.dbias = nullptr; }, SYNCBN_SUCCESS, ""},
    {"bwd_null_plan", Op::kBackward, [](CallArgs& a) { a.plan = nullptr; }, kInvalid, "plan"},
    {"bwd_null_x", Op::kBackward, [](CallArgs& a) { a.x = nullptr; }, kInvalid, "x"},
    {"bwd_null_dy", Op::kBackward, [](CallArgs& a) { a.dy = nullptr; }, kInvalid, "dy"},
    {"bwd_null_dx", Op::kBackward, [](CallArgs& a) { a.dx = nullptr; }, kInvalid, "dx"},
    {"bwd_null_weight", Op::kBackward, [](CallArgs& a) { a.weight = nullptr; }, kInvalid,
     "weight"},
    {"bwd_null_save_mean", Op::kBackward, [](CallArgs& a) { a.bsave_mean = nullptr; }, kInvalid,
     "save_mean"},
    {"bwd_null_save_invstd", Op::kBackward, [](CallArgs& a) { a.bsave_invstd = nullptr; },
     kInvalid, "save_invstd"},
    {"bwd_wrong_C", Op::kBackward, [](CallArgs& a) { a.shape = kShapeWrongC; }, kInvalid, ""},
    {"bwd_ndim_1", Op::kBackward, [](CallArgs& a) { a.ndim = 1; }, kInvalid, "ndim"},
    {"bwd_negative_spatial", Op::kBackward, [](CallArgs& a) { a.shape = kShapeNegSpatial; },
     kInvalid, ""},
    {"bwd_stream_on_cpu", Op::kBackward,
     [](CallArgs& a) { a.stream = reinterpret_cast<void*>(uintptr_t{0x1000}); }, kInvalid,
     "stream"},
    {"bwd_empty_batch", Op::kBackward,
     [](CallArgs& a) {
       a.shape = kShapeEmptyN;
       a.x = a.dy = nullptr;
       a.dx = nullptr;
     },
     kTooSmall, ""},
    // forward, eval (tracking on: local)
    {"eval_valid", Op::kInference, [](CallArgs&) {}, SYNCBN_SUCCESS, ""},
    {"eval_null_plan", Op::kInference, [](CallArgs& a) { a.plan = nullptr; }, kInvalid, "plan"},
    {"eval_null_x", Op::kInference, [](CallArgs& a) { a.x = nullptr; }, kInvalid, "x"},
    {"eval_null_y", Op::kInference, [](CallArgs& a) { a.y = nullptr; }, kInvalid, "y"},
    {"eval_null_weight", Op::kInference, [](CallArgs& a) { a.weight = nullptr; }, kInvalid,
     "weight"},
    {"eval_null_bias", Op::kInference, [](CallArgs& a) { a.bias = nullptr; }, kInvalid, "bias"},
    {"eval_null_running_mean", Op::kInference, [](CallArgs& a) { a.running_mean = nullptr; },
     kInvalid, "running_mean"},
    {"eval_null_running_var", Op::kInference, [](CallArgs& a) { a.running_var = nullptr; },
     kInvalid, "running_var"},
    {"eval_wrong_C", Op::kInference, [](CallArgs& a) { a.shape = kShapeWrongC; }, kInvalid, ""},
    {"eval_ndim_6", Op::kInference,
     [](CallArgs& a) {
       a.ndim = 6;
       a.shape = kShape6d;
     },
     kInvalid, "ndim"},
    {"eval_stream_on_cpu", Op::kInference,
     [](CallArgs& a) { a.stream = reinterpret_cast<void*>(uintptr_t{0x1000}); }, kInvalid,
     "stream"},
};

INSTANTIATE_TEST_SUITE_P(All, ArgChecks, ::testing::ValuesIn(kArgCases),
                         [](const ::testing::TestParamInfo<ArgCase>& info) {
                           return std::string(info.param.name);
                         });

// Without running statistics, a count of one is fine in training; count 0 is not.
TEST(BatchTooSmall, WithoutTracking) {
  syncbn_comm_t comm = nullptr;
  ASSERT_EQ(syncbn_comm_create_self(&comm), SYNCBN_SUCCESS);
  syncbn_config_t cfg;
  syncbn_config_init(&cfg, 3, SYNCBN_FLOAT32);
  cfg.track_running_stats = 0;
  syncbn_plan_t plan = nullptr;
  ASSERT_EQ(syncbn_plan_create(comm, &cfg, &plan), SYNCBN_SUCCESS);
  const float x[3] = {1, 2, 3}, w[3] = {1, 1, 1}, b[3] = {0, 0, 0};
  float y[3], sm[3], si[3];
  EXPECT_EQ(syncbn_forward_training(plan, 2, kShapeOne2d, x, w, b, y, sm, si, nullptr, nullptr,
                                    nullptr, nullptr),
            SYNCBN_SUCCESS)
      << syncbn_last_error();
  EXPECT_EQ(syncbn_forward_training(plan, 3, kShapeEmptyN, nullptr, w, b, nullptr, sm, si,
                                    nullptr, nullptr, nullptr, nullptr),
            SYNCBN_ERROR_BATCH_TOO_SMALL);
  // Eval without tracking normalizes with this rank's own batch statistics: an empty local batch
  // has nothing to normalize, and that is a success (as torch's eval-mode BatchNorm on N = 0).
  EXPECT_EQ(syncbn_forward_inference(plan, 3, kShapeEmptyN, nullptr, w, b, nullptr, nullptr,
                                     nullptr, nullptr),
            SYNCBN_SUCCESS)
      << syncbn_last_error();
  syncbn_plan_destroy(plan);
  syncbn_comm_destroy(comm);
}

// ---- the C++ API ----------------------------------------------------------------------------

TEST(CppApi, ErrorsCarryTheStatus) {
  const auto comm = syncbn::Communicator::self();
  EXPECT_EQ(comm.rank(), 0);
  EXPECT_EQ(comm.size(), 1);
  syncbn_config_t bad = syncbn::make_config(3);
  bad.eps = 0;
  try {
    syncbn::BatchNorm bn(comm, bad);
    ADD_FAILURE() << "eps = 0 accepted";
  } catch (const syncbn::Error& e) {
    EXPECT_EQ(e.status(), SYNCBN_ERROR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(e.what()).find("eps"), std::string::npos) << e.what();
  }
  try {
    comm.split(2);
    ADD_FAILURE() << "split(2) of a single process accepted";
  } catch (const syncbn::Error& e) {
    EXPECT_EQ(e.status(), SYNCBN_ERROR_INVALID_ARGUMENT);
  }

  syncbn::BatchNorm bn(comm, syncbn::make_config(3));
  EXPECT_TRUE(bn);
  std::vector<float> x(12, 1.f), y(12), w(3, 1.f), b(3, 0.f), rm(3, 0.f), rv(3, 1.f), sm(3), si(3);
  int64_t nbt = 0;
  try {
    bn.forward_training({4, 3}, x.data(), nullptr, b.data(), y.data(), sm.data(), si.data(),
                        rm.data(), rv.data(), &nbt);
    ADD_FAILURE() << "null weight accepted";
  } catch (const syncbn::Error& e) {
    EXPECT_EQ(e.status(), SYNCBN_ERROR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(e.what()).find("weight"), std::string::npos) << e.what();
  }
  try {
    bn.forward_training({0, 3}, nullptr, w.data(), b.data(), nullptr, sm.data(), si.data(),
                        rm.data(), rv.data(), &nbt);
    ADD_FAILURE() << "empty batch accepted";
  } catch (const syncbn::Error& e) {
    EXPECT_EQ(e.status(), SYNCBN_ERROR_BATCH_TOO_SMALL);
  }
  EXPECT_EQ(nbt, 0);
  EXPECT_NO_THROW(bn.forward_training({4, 3}, x.data(), w.data(), b.data(), y.data(), sm.data(),
                                      si.data(), rm.data(), rv.data(), &nbt));
  EXPECT_EQ(nbt, 1);
}

}  // namespace
