// The single-process suite's shared parts (tests/cpu/test_reference.cpp, test_precision.cpp,
// tests/api/test_c_api.cpp): CheckedLayer, a plan on the self communicator whose every output is
// compared with the fp64 reference of tests/reference.hpp, and the parameter helpers.
#ifndef SYNCBN_TESTS_CPU_CHECKED_LAYER_HPP
#define SYNCBN_TESTS_CPU_CHECKED_LAYER_HPP

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "reference.hpp"
#include "syncbn/syncbn.h"
#include "syncbn/syncbn.hpp"

namespace syncbn_test {

constexpr double kCumulative = SYNCBN_MOMENTUM_CUMULATIVE;
const double kNaN = std::numeric_limits<double>::quiet_NaN();
const double kInf = std::numeric_limits<double>::infinity();

inline std::string momentum_name(double m) {
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


inline std::vector<int64_t> spatial_of_rank(int spatial_dims) {
  switch (spatial_dims) {
    case 0: return {};
    case 1: return {7};
    case 2: return {3, 5};
    default: return {2, 3, 4};
  }
}

using DtypeLayout = std::tuple<syncbn_dtype_t, syncbn_layout_t>;
inline std::string dtype_layout_name(const ::testing::TestParamInfo<DtypeLayout>& info) {
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

}  // namespace syncbn_test

#endif  // SYNCBN_TESTS_CPU_CHECKED_LAYER_HPP
