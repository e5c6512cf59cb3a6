// Precision and special values on one process: fp32 input far from zero, huge values, NaN and
// Inf in a channel, in-place calls, inference without tracking, global parameter gradients, a
// batch of one value.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "cpu/checked_layer.hpp"
#include "reference.hpp"
#include "syncbn/syncbn.h"
#include "syncbn/syncbn.hpp"

namespace {

using namespace syncbn_test;

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

}  // namespace
