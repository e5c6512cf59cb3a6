// Single-process synchronized BN is plain batch norm: every output of every combination of
// dtype, layout, rank, affine, tracking and momentum, of consecutive steps, odd, wide and large
// channel counts and short rows, against the fp64 reference (tests/reference.hpp).
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

using RowWidth = std::tuple<syncbn_dtype_t, syncbn_layout_t, int64_t>;
class ChannelsLastRowWidths : public ::testing::TestWithParam<RowWidth> {};

// Channels-last rows around the widths at which the reduction changes path (src/cpu/kernels.cpp:
// rows of at most kBlockBytes = 64, 128 or 256 bytes by instruction set with their sums in
// registers, the last channels in a block of runtime width; rows of a whole number of block
// pairs under 4 KiB on AVX-512, one pair at a time; other rows through group sums in memory,
// one row at a time under 4 KiB, 4 rows at a time from there): C from 8 to 512 in both dtypes,
// 16-row groups whole and partial, and (> 32768 elements) rows split between threads.
TEST_P(ChannelsLastRowWidths, MatchReference) {
  const auto [dtype, layout, C] = GetParam();
  train_and_eval_each(dtype, layout, C, {{37, {}}, {3, {7, 5}}, {300, {2}}});
}
INSTANTIATE_TEST_SUITE_P(All, ChannelsLastRowWidths,
                         ::testing::Combine(::testing::Values(SYNCBN_FLOAT32, SYNCBN_FLOAT64),
                                            ::testing::Values(SYNCBN_CHANNELS_LAST),
                                            ::testing::Values(8, 16, 31, 32, 33, 48, 63, 64, 65,
                                                              96, 127, 128, 129, 192, 256,
                                                              384, 512)),
                         [](const ::testing::TestParamInfo<RowWidth>& info) {
                           return std::string(dtype_name(std::get<0>(info.param))) + "_" +
                                  layout_name(std::get<1>(info.param)) + "_C" +
                                  std::to_string(std::get<2>(info.param));
                         });

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

}  // namespace
