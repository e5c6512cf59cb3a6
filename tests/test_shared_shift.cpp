// The shared shift over several ranks, with threads as the ranks (tests/thread_comm.hpp) at
// P = 2, 3 and 4: the precision goals of tests/cpu/test_precision.cpp (README.md "Precision")
// over a group whose ranks have uneven batches, one of them EMPTY (N = 0) on every call (rank 0
// on the first, the last on the second, rank 1 on the third), on the plan's first call and on
// later ones. The sums of the allreduce are taken around a shift K that must be the same on every
// rank (the previous global mean, or the first call's refined mean), so on every call the running
// statistics, save_mean and save_invstd must be bitwise identical across the ranks, an empty
// rank included; a local inference on some ranks between training calls must not change that.
//
// Every rank's batch is drawn on the main thread before the ranks start (the test's seed), and
// each rank checks its outputs against the exact statistics of the global batch
// (precision_reference.hpp). As in every multi-rank suite, the sequence of collectives never
// depends on a check's outcome (EXPECT_* only).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "precision_reference.hpp"
#include "reference.hpp"
#include "syncbn/syncbn.h"
#include "syncbn/syncbn.hpp"
#include "thread_comm.hpp"

namespace {

using namespace syncbn_test;

constexpr int kCalls = 3;

// The rank whose batch is empty at call k (0-based).
int empty_rank(int P, int call) {
  const int r[] = {0, P - 1, 1 % P};
  return r[call % 3];
}

// Rank r's local batch at call k: uneven N (and, for 2-D data, uneven spatial sizes), N = 0 on
// the empty rank.
Geometry rank_geometry(syncbn_layout_t layout, ShapeKind kind, int64_t C, int P, int call, int r) {
  const bool empty = r == empty_rank(P, call);
  if (kind == ShapeKind::flat)
    return make_geometry(layout, empty ? 0 : 700 + 331 * ((r + call) % 4), C, {});
  return make_geometry(layout, empty ? 0 : 1 + (3 * r + call) % 4, C,
                       {8 + 8 * ((r + call) % 3), 16 + 8 * (r % 2)});
}

// Every rank's batches of a run, [call][rank], and the exact statistics of each call's global
// batch (the concatenation of the ranks' per-channel values).
template <class T>
struct GroupRun {
  std::vector<std::vector<Geometry>> g;
  std::vector<std::vector<std::vector<T>>> x;
  std::vector<ExactStats> ref;

  void add_call() {
    g.emplace_back();
    x.emplace_back();
  }
  void add_batch(const Geometry& geom, std::vector<T> data) {
    g.back().push_back(geom);
    x.back().push_back(std::move(data));
  }
  void finish_call() {
    ChannelValues all;
    for (size_t r = 0; r < g.back().size(); ++r) append(all, gather(g.back()[r], x.back()[r].data()));
    ref.push_back(exact_stats(all));
  }
};

// One rank's outputs of one forward_training.
template <class T>
struct RankOutputs {
  std::vector<T> y, save_mean, save_invstd;
};

// Runs the plan cfg on P thread ranks over run's calls (forward_training, momentum as in cfg,
// the layer state init on every rank). After each call, on each rank: check(call, rank, state,
// outputs), then the bitwise comparison of the statistics with rank 0, then between(call, rank,
// plan) (a local inference, say).
template <class T>
void run_group(int P, const syncbn_config_t& cfg, const LayerState<T>& init,
               const GroupRun<T>& run,
               const std::function<void(int, int, const LayerState<T>&, const RankOutputs<T>&)>&
                   check,
               const std::function<void(int, int, syncbn::BatchNorm&)>& between = nullptr) {
  auto world = std::make_shared<ThreadGroup>(P);
  auto checks = std::make_shared<ThreadGroup>(P);
  const size_t C = static_cast<size_t>(cfg.num_features);
  const bool track = cfg.track_running_stats != 0;
  on_threads(P, [&](int rank) {
    CommHandle handle = member_comm(world, rank);
    const ThreadRanks ranks{checks, rank};
    const ThreadRanks::Group group(ranks, P);
    const std::string tag = "rank " + std::to_string(rank) + " of " + std::to_string(P);
    syncbn::BatchNorm bn;
    try {
      bn = syncbn::BatchNorm(syncbn::Communicator(handle.release()), cfg);
    } catch (const syncbn::Error& e) {
      ADD_FAILURE() << tag << ": plan creation: " << e.what();
      return;  // every rank fails alike (the plan's verdict is collective)
    }
    LayerState<T> st = init;
    for (int call = 0; call < kCalls; ++call) {
      const Geometry& g = run.g[call][rank];
      const std::vector<T>& x = run.x[call][rank];
      RankOutputs<T> o{std::vector<T>(x.size()), std::vector<T>(C), std::vector<T>(C)};
      try {
        bn.forward_training(g.shape(), x.data(), cfg.affine ? st.weight.data() : nullptr,
                            cfg.affine ? st.bias.data() : nullptr, o.y.data(),
                            o.save_mean.data(), o.save_invstd.data(),
                            track ? st.running_mean.data() : nullptr,
                            track ? st.running_var.data() : nullptr,
                            track ? &st.num_batches_tracked : nullptr);
      } catch (const syncbn::Error& e) {
        ADD_FAILURE() << tag << ", call " << call + 1 << ": " << e.what();
      }
      {
        SCOPED_TRACE(tag + ", call " + std::to_string(call + 1) + " (" + g.str() + ")");
        check(call, rank, st, o);
      }
      const std::string when = tag + ", call " + std::to_string(call + 1) + ": ";
      EXPECT_TRUE(group.same_as_rank0(when + "save_mean", o.save_mean));
      EXPECT_TRUE(group.same_as_rank0(when + "save_invstd", o.save_invstd));
      EXPECT_TRUE(group.same_as_rank0(when + "running_mean", st.running_mean));
      EXPECT_TRUE(group.same_as_rank0(when + "running_var", st.running_var));
      EXPECT_TRUE(group.same_as_rank0(when + "num_batches_tracked",
                                      std::vector<int64_t>{st.num_batches_tracked}));
      if (between) between(call, rank, bn);
    }
  });
}

std::string when(int call, int rank, int P) {
  return "call " + std::to_string(call + 1) + ", rank " + std::to_string(rank) + " of " +
         std::to_string(P);
}

// The checks of goals 1 and 2 on one rank: the group's statistics to the bound, and this rank's
// y (expected_y, from the global statistics).
template <class T>
void expect_rank_to_goal(const syncbn_config_t& cfg, const GroupRun<T>& run, int call, int rank,
                         int P, const LayerState<T>& st, const RankOutputs<T>& o, double bound) {
  const ExactStats& ref = run.ref[call];
  const std::string w = when(call, rank, P);
  expect_statistics(w, ref, cfg.eps, bound, st.running_var, o.save_mean, o.save_invstd);
  const Geometry& g = run.g[call][rank];
  std::vector<long double> y_want;
  std::vector<double> y_tol;
  expected_y(g, run.x[call][rank].data(), ref, cfg.eps,
             effective_weight(cfg.affine != 0, st.weight), effective_bias(cfg.affine != 0, st.bias),
             bound, &y_want, &y_tol);
  EXPECT_TRUE(abs_error_within(w + ": y", o.y, y_want, y_tol));
}

std::string group_name(int P, syncbn_layout_t layout, ShapeKind kind) {
  return "P" + std::to_string(P) + "_" + layout_name(layout) + "_" + shape_kind_name(kind);
}

// ---- goal 1 (fp64) over a group ---------------------------------------------------------------

using Fp64GroupParam = std::tuple<int, syncbn_layout_t, ShapeKind, double>;
class SharedShiftFp64 : public ::testing::TestWithParam<Fp64GroupParam> {};

// Goals 1 and 5: fp64 data with mean / std = 1e4 (1e6), uneven batches and an empty rank: the
// variance to < 1e-13 (1e-10) relative on every rank and call, statistics bitwise alike. Shifts
// of each rank's own first value, turned back into plain sums, lose (mean / std)^2 * 2^-53.
TEST_P(SharedShiftFp64, VarianceToGoalOnEveryCall) {
  const int P = std::get<0>(GetParam());
  const syncbn_layout_t layout = std::get<1>(GetParam());
  const ShapeKind kind = std::get<2>(GetParam());
  const double ratio = std::get<3>(GetParam());
  const double bound = ratio >= 1e6 ? 1e-10 : 1e-13;
  Rng rng(test_seed());
  const int64_t C = 4;
  const syncbn_config_t cfg = make_cfg(C, SYNCBN_FLOAT64, layout, true, true, 1.0);
  const ChannelDistribution dist = ratio_distribution(C, ratio);
  GroupRun<double> run;
  for (int call = 0; call < kCalls; ++call) {
    run.add_call();
    for (int r = 0; r < P; ++r) {
      const Geometry g = rank_geometry(layout, kind, C, P, call, r);
      run.add_batch(g, random_batch<double>(g, rng, dist));
    }
    run.finish_call();
  }
  const auto init = LayerState<double>::random(C, rng);
  run_group<double>(P, cfg, init, run,
                    [&](int call, int rank, const LayerState<double>& st,
                        const RankOutputs<double>& o) {
                      expect_rank_to_goal(cfg, run, call, rank, P, st, o, bound);
                    });
}
INSTANTIATE_TEST_SUITE_P(
    All, SharedShiftFp64,
    ::testing::Combine(::testing::Values(2, 3, 4),
                       ::testing::Values(SYNCBN_CHANNELS_FIRST, SYNCBN_CHANNELS_LAST),
                       ::testing::Values(ShapeKind::spatial2d, ShapeKind::flat),
                       ::testing::Values(1e4, 1e6)),
    [](const ::testing::TestParamInfo<Fp64GroupParam>& info) {
      return group_name(std::get<0>(info.param), std::get<1>(info.param),
                        std::get<2>(info.param)) +
             (std::get<3>(info.param) >= 1e6 ? "_ratio1e6" : "_ratio1e4");
    });

// ---- goal 2 (fp32, a far first row) over a group -----------------------------------------------

using GroupParam = std::tuple<int, syncbn_layout_t, ShapeKind>;
class SharedShiftFp32 : public ::testing::TestWithParam<GroupParam> {};

// Goals 2 and 5: fp32 data with mean / std = 1e4 whose first row on every non-empty rank lies
// 300 std above the mean: the variance to <= 1e-6 relative on every rank and call, statistics
// bitwise alike. (Each rank's first value as its shift is 300 std off.)
TEST_P(SharedShiftFp32, FarFirstRowKeepsVariance) {
  const int P = std::get<0>(GetParam());
  const syncbn_layout_t layout = std::get<1>(GetParam());
  const ShapeKind kind = std::get<2>(GetParam());
  Rng rng(test_seed());
  const int64_t C = 3;
  const syncbn_config_t cfg = make_cfg(C, SYNCBN_FLOAT32, layout, true, true, 1.0);
  ChannelDistribution dist = ChannelDistribution::constant(C, 1e4, 1.0);
  dist.mu[1] = -1e4;
  dist.mu[2] = 3e4;
  dist.sd[2] = 3.0;
  GroupRun<float> run;
  for (int call = 0; call < kCalls; ++call) {
    run.add_call();
    for (int r = 0; r < P; ++r) {
      const Geometry g = rank_geometry(layout, kind, C, P, call, r);
      auto x = random_batch<float>(g, rng, dist);
      move_first_row(g, dist, 300.0, x);
      run.add_batch(g, std::move(x));
    }
    run.finish_call();
  }
  const auto init = LayerState<float>::random(C, rng);
  run_group<float>(P, cfg, init, run,
                   [&](int call, int rank, const LayerState<float>& st,
                       const RankOutputs<float>& o) {
                     expect_rank_to_goal(cfg, run, call, rank, P, st, o, 1e-6);
                   });
}
INSTANTIATE_TEST_SUITE_P(
    All, SharedShiftFp32,
    ::testing::Combine(::testing::Values(2, 3, 4),
                       ::testing::Values(SYNCBN_CHANNELS_FIRST, SYNCBN_CHANNELS_LAST),
                       ::testing::Values(ShapeKind::spatial2d, ShapeKind::flat)),
    [](const ::testing::TestParamInfo<GroupParam>& info) {
      return group_name(std::get<0>(info.param), std::get<1>(info.param),
                        std::get<2>(info.param));
    });

// ---- goal 4 (constant channels) over a group ---------------------------------------------------

using ConstantGroupParam = std::tuple<int, syncbn_dtype_t, syncbn_layout_t>;
class SharedShiftConstant : public ::testing::TestWithParam<ConstantGroupParam> {};

// Goals 4 and 5: channels constant over the whole group (fp32 1e-30 to 1e30, fp64 also 1e-300
// to 1e150), the constants changing sign on the second call: every y exactly 0 (or its bias),
// save_mean == c, variance exactly 0 (running_var == 0, save_invstd == 1 / sqrt(eps)), on every
// rank, statistics bitwise alike.
template <class T>
void constant_channels_over_group(int P, syncbn_layout_t layout, bool affine) {
  Rng rng(test_seed(affine ? 1u : 0u));
  std::vector<T> consts{T(1e-30), T(1.5), T(-3e5), T(1e7 + 1), T(1e20), T(1e30)};
  if (std::is_same_v<T, double>)
    for (const double c : {1e-300, 1e15 + 1, -1e100, 1e150}) consts.push_back(static_cast<T>(c));
  const int64_t C = static_cast<int64_t>(consts.size());
  const syncbn_config_t cfg = make_cfg(C, DtypeOf<T>::value, layout, affine, true, 1.0);
  for (const ShapeKind kind : {ShapeKind::spatial2d, ShapeKind::flat}) {
    GroupRun<T> run;
    std::vector<std::vector<T>> call_consts;
    for (int call = 0; call < kCalls; ++call) {
      std::vector<T> c = consts;
      if (call == 1)
        for (T& v : c) v = -v;
      call_consts.push_back(c);
      run.add_call();
      for (int r = 0; r < P; ++r) {
        const Geometry g = rank_geometry(layout, kind, C, P, call, r);
        std::vector<T> x(static_cast<size_t>(g.numel()));
        for (int64_t ch = 0; ch < C; ++ch)
          g.for_each_in_channel(ch, [&](int64_t k) { x[k] = c[ch]; });
        run.add_batch(g, std::move(x));
      }
      run.finish_call();
    }
    const auto init = LayerState<T>::random(C, rng);
    const T invstd = static_cast<T>(1.0 / std::sqrt(cfg.eps));
    run_group<T>(P, cfg, init, run,
                 [&](int call, int rank, const LayerState<T>& st, const RankOutputs<T>& o) {
                   const Geometry& g = run.g[call][rank];
                   const std::vector<T>& c = call_consts[call];
                   for (int64_t ch = 0; ch < C; ++ch) {
                     const std::string tag = when(call, rank, P) + ", channel " +
                                             std::to_string(ch) + " (c = " +
                                             fmt17(static_cast<double>(c[ch])) + ")";
                     EXPECT_EQ(o.save_mean[ch], c[ch])
                         << tag << ": save_mean " << fmt17(o.save_mean[ch]);
                     EXPECT_EQ(st.running_mean[ch], c[ch])
                         << tag << ": running_mean " << fmt17(st.running_mean[ch]);
                     EXPECT_EQ(st.running_var[ch], T(0))
                         << tag << ": running_var (variance) " << fmt17(st.running_var[ch]);
                     EXPECT_NEAR(o.save_invstd[ch], invstd,
                                 2 * std::numeric_limits<T>::epsilon() * invstd)
                         << tag << ": save_invstd " << fmt17(o.save_invstd[ch]);
                     const T want = affine ? st.bias[ch] : T(0);
                     size_t bad = 0;
                     g.for_each_in_channel(ch, [&](int64_t k) { bad += !(o.y[k] == want); });
                     EXPECT_EQ(bad, 0u) << tag << ": y != " << fmt17(want) << " at " << bad << " of "
                                        << g.count_per_channel() << " elements";
                   }
                 });
  }
}

TEST_P(SharedShiftConstant, ExactlyZero) {
  const int P = std::get<0>(GetParam());
  const syncbn_dtype_t dtype = std::get<1>(GetParam());
  const syncbn_layout_t layout = std::get<2>(GetParam());
  for (const bool affine : {false, true}) {
    SCOPED_TRACE(affine ? "affine" : "affine off");
    if (dtype == SYNCBN_FLOAT32)
      constant_channels_over_group<float>(P, layout, affine);
    else
      constant_channels_over_group<double>(P, layout, affine);
  }
}
INSTANTIATE_TEST_SUITE_P(
    All, SharedShiftConstant,
    ::testing::Combine(::testing::Values(2, 3, 4),
                       ::testing::Values(SYNCBN_FLOAT32, SYNCBN_FLOAT64),
                       ::testing::Values(SYNCBN_CHANNELS_FIRST, SYNCBN_CHANNELS_LAST)),
    [](const ::testing::TestParamInfo<ConstantGroupParam>& info) {
      return "P" + std::to_string(std::get<0>(info.param)) + "_" +
             dtype_name(std::get<1>(info.param)) + "_" + layout_name(std::get<2>(info.param));
    });

// ---- goal 6 (a jumping distribution) over a group ----------------------------------------------

using JumpParam = std::tuple<int, syncbn_dtype_t, syncbn_layout_t>;
class SharedShiftJump : public ::testing::TestWithParam<JumpParam> {};

// Goals 6 and 5: channel means 0, then 1e6 std, then -1e4 std, over a group with an empty rank:
// every call to its goal (fp64 1e-13, 1e-10 on the 1e6 call; fp32 1e-6), statistics bitwise
// alike. The stale shift must be noticed alike on every rank, the empty one included.
template <class T>
void jumps_over_group(int P, syncbn_layout_t layout) {
  const bool fp64 = std::is_same_v<T, double>;
  Rng rng(test_seed());
  const int64_t C = 3;
  const syncbn_config_t cfg = make_cfg(C, DtypeOf<T>::value, layout, true, true, 1.0);
  const double centers[] = {0.0, 1e6, -1e4};
  for (const ShapeKind kind : {ShapeKind::spatial2d, ShapeKind::flat}) {
    GroupRun<T> run;
    for (int call = 0; call < kCalls; ++call) {
      ChannelDistribution dist = ChannelDistribution::constant(C, 0.0, 1.0);
      dist.sd = {1.0, 1e-3, 1e3};
      for (int64_t ch = 0; ch < C; ++ch) dist.mu[ch] = centers[call] * dist.sd[ch];
      run.add_call();
      for (int r = 0; r < P; ++r) {
        const Geometry g = rank_geometry(layout, kind, C, P, call, r);
        run.add_batch(g, random_batch<T>(g, rng, dist));
      }
      run.finish_call();
    }
    const auto init = LayerState<T>::random(C, rng);
    run_group<T>(P, cfg, init, run,
                 [&](int call, int rank, const LayerState<T>& st, const RankOutputs<T>& o) {
                   const double bound =
                       fp64 ? (std::fabs(centers[call]) >= 1e6 ? 1e-10 : 1e-13) : 1e-6;
                   expect_rank_to_goal(cfg, run, call, rank, P, st, o, bound);
                 });
  }
}

TEST_P(SharedShiftJump, StaleShiftIsNoticed) {
  const int P = std::get<0>(GetParam());
  if (std::get<1>(GetParam()) == SYNCBN_FLOAT32)
    jumps_over_group<float>(P, std::get<2>(GetParam()));
  else
    jumps_over_group<double>(P, std::get<2>(GetParam()));
}
INSTANTIATE_TEST_SUITE_P(
    All, SharedShiftJump,
    ::testing::Combine(::testing::Values(2, 3, 4),
                       ::testing::Values(SYNCBN_FLOAT32, SYNCBN_FLOAT64),
                       ::testing::Values(SYNCBN_CHANNELS_FIRST, SYNCBN_CHANNELS_LAST)),
    [](const ::testing::TestParamInfo<JumpParam>& info) {
      return "P" + std::to_string(std::get<0>(info.param)) + "_" +
             dtype_name(std::get<1>(info.param)) + "_" + layout_name(std::get<2>(info.param));
    });

// ---- goal 7 (local inference between training calls) over a group ------------------------------

class SharedShiftInference : public ::testing::TestWithParam<GroupParam> {};

// Goal 7: without running statistics, training (fp64, mean / std 1e4), then a local inference on
// the even ranks only, with different data (mean / std -1e6, 1e6 std from the training data,
// other shapes), then training again:
// every training call to goal 1 (1e-13) and save_mean / save_invstd bitwise alike across ranks;
// each inference to goal 1 over its own batch (1e-10 at 1e6; the variance seen through y's
// slope against x, and y).
// A rank whose shift took its inference's mean would sum around a K of its own.
TEST_P(SharedShiftInference, LocalInferenceDoesNotDisturbTraining) {
  const int P = std::get<0>(GetParam());
  const syncbn_layout_t layout = std::get<1>(GetParam());
  const ShapeKind kind = std::get<2>(GetParam());
  Rng rng(test_seed());
  const int64_t C = 4;
  const syncbn_config_t cfg = make_cfg(C, SYNCBN_FLOAT64, layout, true, false, 0.1);
  const ChannelDistribution dist = ratio_distribution(C, 1e4);
  ChannelDistribution far = dist;
  for (int64_t ch = 0; ch < C; ++ch) far.mu[ch] = -1e6 * dist.sd[ch];
  GroupRun<double> run;
  std::vector<std::vector<Geometry>> gi(kCalls);                // [call][rank]: the inference
  std::vector<std::vector<std::vector<double>>> xi(kCalls);
  for (int call = 0; call < kCalls; ++call) {
    run.add_call();
    for (int r = 0; r < P; ++r) {
      const Geometry g = rank_geometry(layout, kind, C, P, call, r);
      run.add_batch(g, random_batch<double>(g, rng, dist));
      const Geometry g2 = kind == ShapeKind::flat ? make_geometry(layout, 513 + 100 * r, C, {})
                                                  : make_geometry(layout, 2 + r, C, {7, 9});
      gi[call].push_back(g2);
      xi[call].push_back(random_batch<double>(g2, rng, far));
    }
    run.finish_call();
  }
  const auto init = LayerState<double>::random(C, rng);
  run_group<double>(
      P, cfg, init, run,
      [&](int call, int rank, const LayerState<double>& st, const RankOutputs<double>& o) {
        const ExactStats& ref = run.ref[call];
        std::vector<long double> inv;
        for (size_t c = 0; c < static_cast<size_t>(C); ++c) inv.push_back(ref.invstd(c, cfg.eps));
        EXPECT_TRUE(rel_error_within(when(call, rank, P) + ": save_invstd", o.save_invstd, inv,
                                     1e-13));
        std::vector<long double> y_want;
        std::vector<double> y_tol;
        expected_y(run.g[call][rank], run.x[call][rank].data(), ref, cfg.eps,
                   to_double(st.weight), to_double(st.bias), 1e-13, &y_want, &y_tol);
        EXPECT_TRUE(abs_error_within(when(call, rank, P) + ": y", o.y, y_want, y_tol));
      },
      [&](int call, int rank, syncbn::BatchNorm& bn) {
        if (rank % 2 != 0) return;
        const Geometry& g = gi[call][rank];
        const std::vector<double>& x = xi[call][rank];
        std::vector<double> y(x.size());
        try {
          bn.forward_inference(g.shape(), x.data(), init.weight.data(), init.bias.data(),
                               nullptr, nullptr, y.data());
        } catch (const syncbn::Error& e) {
          ADD_FAILURE() << when(call, rank, P) << ": inference: " << e.what();
        }
        const ExactStats ref = exact_stats(gather(g, x.data()));
        const std::vector<long double> slope = slope_of_y(g, x, y);
        std::vector<long double> var_seen;
        for (size_t c = 0; c < static_cast<size_t>(C); ++c) {
          const long double is = slope[c] / init.weight[c];
          var_seen.push_back(1.0L / (is * is) - cfg.eps);
        }
        EXPECT_TRUE(rel_error_within(when(call, rank, P) + ": inference variance (slope of y)",
                                     var_seen, ref.var, 1e-10));
        std::vector<long double> y_want;
        std::vector<double> y_tol;
        expected_y(g, x.data(), ref, cfg.eps, to_double(init.weight), to_double(init.bias),
                   1e-10, &y_want, &y_tol);
        EXPECT_TRUE(abs_error_within(when(call, rank, P) + ": inference y", y, y_want, y_tol));
      });
}
INSTANTIATE_TEST_SUITE_P(
    All, SharedShiftInference,
    ::testing::Combine(::testing::Values(2, 3, 4),
                       ::testing::Values(SYNCBN_CHANNELS_FIRST, SYNCBN_CHANNELS_LAST),
                       ::testing::Values(ShapeKind::spatial2d, ShapeKind::flat)),
    [](const ::testing::TestParamInfo<GroupParam>& info) {
      return group_name(std::get<0>(info.param), std::get<1>(info.param),
                        std::get<2>(info.param));
    });

}  // namespace
