// Multi-process correctness: on every rank, y, dx, save_mean, save_invstd and the running
// statistics equal those of the single-process fp64 reference BN over the group's global batch
// (the concatenation of every rank's per-channel values), dweight / dbias equal the reference
// over the rank's own slice with the global statistics (and sum to the global ones), and the
// running statistics stay bitwise identical across the ranks of a group after every step.
//
// Every rank generates the whole global batch from a seed shared by all ranks (the test's name)
// and keeps its own slice, so no data travels outside the library. Run by ctest at 1, 2, 3 and 4
// ranks; the shared main (mpi_main.cpp) reduces the verdict.
#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <ostream>
#include <string>
#include <tuple>
#include <vector>

#include "mpi_helpers.hpp"
#include "reference.hpp"
#include "syncbn/syncbn.h"
#include "syncbn/syncbn_mpi.h"
#include "syncbn/syncbn_mpi.hpp"

namespace {

using namespace syncbn_test;

constexpr double kCumulative = SYNCBN_MOMENTUM_CUMULATIVE;

// The local batch of one rank at one step: N and the spatial sizes (C is the layer's).
struct RankBatch {
  int64_t n;
  std::vector<int64_t> spatial;
};

struct Scenario {
  const char* name;
  RankBatch (*batch)(int rank, int step);
  int group_size = 0;  // 0: the whole world; k: syncbn_comm_split(world, k)
  bool affine = true;
  bool track = true;
  double momentum = 0.1;
  bool global_grads = false;
  bool null_empty = false;  // empty local batches pass NULL data pointers (else valid ones)
  int steps = 2;
  int64_t channels = 3;
  double offset = 0;  // added to every channel's mean (mean / std of ~1e4 tests precision)
  // Relative tolerance of the statistics, when looser than the dtype's: sums of x and x^2 in
  // one allreduce lose log10(mean^2 / var) digits in var = q / m - mean^2 (docs/design.md section 3), so
  // far from zero even fp64 data only reaches what the design promises, 1e-5.
  double stats_rel = 0;
};

void PrintTo(const Scenario& sc, std::ostream* os) { *os << sc.name; }

// Runs a scenario: `steps` training steps (forward + backward), then one eval step, every output
// checked on every rank. Collectives are made unconditionally, in the same order on all ranks.
template <class T>
class ScenarioRun {
 public:
  ScenarioRun(const Scenario& sc, syncbn_layout_t layout, CommKind kind)
      : sc_(sc),
        layout_(layout),
        kind_(kind),
        P_(world_size()),
        rank_(world_rank()),
        k_(sc.group_size ? sc.group_size : P_),
        group_(k_),
        rng_(test_seed()) {}

  void run() {
    CommHandle world = world_comm(kind_);
    CommHandle sub;
    const syncbn_comm_t comm = scenario_comm(world.get(), sc_.group_size, sub);
    cfg_ = scenario_config(sc_, DtypeOf<T>::value, layout_);
    syncbn_plan_t p = nullptr;
    EXPECT_EQ(syncbn_plan_create(comm, &cfg_, &p), SYNCBN_SUCCESS)
        << rank_tag() << ": " << syncbn_last_error();
    PlanHandle plan(p);

    const int64_t C = sc_.channels;
    st_ = LayerState<T>::random(C, rng_);  // identical on every rank
    ref_ = st_;
    dist_ = ChannelDistribution::random(C, rng_);
    for (double& mu : dist_.mu) mu += sc_.offset;
    nan_.assign(static_cast<size_t>(C), std::numeric_limits<T>::quiet_NaN());

    for (int step = 0; step < sc_.steps; ++step) {
      SCOPED_TRACE(rank_tag() + " of " + std::to_string(P_) + ", step " + std::to_string(step));
      train_step(plan.get(), step);
    }
    SCOPED_TRACE(rank_tag() + " of " + std::to_string(P_) + ", eval");
    eval_step(plan.get());
  }

 private:
  bool in_group(int r) const {
    return r >= group_.first_world_rank() && r < group_.first_world_rank() + k_;
  }

  // Draws every rank's batch of this step (the same draws on every rank): keeps this rank's
  // slice, and the group's per-channel values.
  void draw(int step, bool with_grad) {
    X_.clear();
    DY_.clear();
    for (int r = 0; r < P_; ++r) {
      const RankBatch b = sc_.batch(r, step);
      const Geometry g = make_geometry(layout_, b.n, sc_.channels, b.spatial);
      auto x = random_batch<T>(g, rng_, dist_);
      auto dy = with_grad ? random_batch<T>(g, rng_) : std::vector<T>(x.size());
      if (in_group(r)) {
        append(X_, gather(g, x.data()));
        append(DY_, gather(g, dy.data()));
      }
      if (r == rank_) {
        g_ = g;
        x_ = std::move(x);
        dy_ = std::move(dy);
      }
    }
  }

  // Data pointer for a local tensor: NULL or a valid dummy where it is empty.
  T* data(std::vector<T>& v) {
    if (!v.empty()) return v.data();
    return sc_.null_empty ? nullptr : dummy_;
  }
  double stats_rel() const { return std::max(Tolerances<T>::stats, sc_.stats_rel); }
  const T* weight() const { return sc_.affine ? st_.weight.data() : nan_.data(); }
  const T* bias() const { return sc_.affine ? st_.bias.data() : nan_.data(); }
  std::vector<double> w_eff() const { return effective_weight(sc_.affine, st_.weight); }
  std::vector<double> b_eff() const { return effective_bias(sc_.affine, st_.bias); }

  void train_step(syncbn_plan_t plan, int step) {
    draw(step, true);
    SCOPED_TRACE("local batch " + g_.str());
    const size_t C = static_cast<size_t>(sc_.channels);
    const BatchStats stats = batch_stats(X_, cfg_.eps);
    const auto shape = g_.shape();
    MPI_Comm gcomm = group_.comm();

    // ---- forward
    std::vector<T> y(x_.size(), T(-777)), save_mean(C, T(-777)), save_invstd(C, T(-777));
    std::vector<T> unused_rm = nan_, unused_rv = nan_;
    const std::vector<T> rm_before = st_.running_mean;
    const syncbn_status_t fs = syncbn_forward_training(
        plan, g_.ndim(), shape.data(), data(x_), weight(), bias(), data(y), save_mean.data(),
        save_invstd.data(), sc_.track ? st_.running_mean.data() : unused_rm.data(),
        sc_.track ? st_.running_var.data() : unused_rv.data(),
        sc_.track ? &st_.num_batches_tracked : nullptr, nullptr);
    EXPECT_EQ(fs, SYNCBN_SUCCESS) << syncbn_last_error();

    const auto y_want = normalize(g_, x_.data(), stats.mean, stats.invstd, w_eff(), b_eff());
    EXPECT_TRUE(all_close("y", y, y_want, Tolerances<T>::data));
    EXPECT_TRUE(all_close("save_mean", save_mean, stats.mean,
                          scaled(Tolerances<T>::stats, stats.abs_mean)));
    EXPECT_TRUE(all_close("save_invstd", save_invstd, stats.invstd, Tol{stats_rel(), {}}));
    EXPECT_TRUE(same_as_rank0("save_mean", save_mean, gcomm));
    EXPECT_TRUE(same_as_rank0("save_invstd", save_invstd, gcomm));
    if (sc_.track) {
      update_running(ref_, stats, sc_.momentum);
      std::vector<double> rm_scale;
      for (size_t c = 0; c < C; ++c)
        rm_scale.push_back(std::fabs(static_cast<double>(rm_before[c])) + stats.abs_mean[c]);
      EXPECT_TRUE(all_close("running_mean", st_.running_mean, to_double(ref_.running_mean),
                            scaled(Tolerances<T>::stats, rm_scale)));
      EXPECT_TRUE(all_close("running_var", st_.running_var, to_double(ref_.running_var),
                            Tol{stats_rel(), {}}));
      EXPECT_EQ(st_.num_batches_tracked, ref_.num_batches_tracked);
      EXPECT_TRUE(same_as_rank0("running_mean", st_.running_mean, gcomm));
      EXPECT_TRUE(same_as_rank0("running_var", st_.running_var, gcomm));
    } else {
      EXPECT_TRUE(bitwise_equal("running_mean (ignored)", unused_rm, nan_));
      EXPECT_TRUE(bitwise_equal("running_var (ignored)", unused_rv, nan_));
    }

    // ---- backward, from the statistics the forward saved
    const std::vector<double> mean = to_double(save_mean), invstd = to_double(save_invstd);
    const GradSums global = grad_sums(X_, DY_, mean);
    const GradSums local = grad_sums(gather(g_, x_.data()), gather(g_, dy_.data()), mean);
    const auto dx_want = grad_input(g_, x_.data(), dy_.data(), w_eff(), mean, invstd, global);
    std::vector<T> dx(x_.size(), T(-777)), dweight(C, T(-777)), dbias(C, T(-777));
    const syncbn_status_t bs = syncbn_backward(
        plan, g_.ndim(), shape.data(), data(x_), data(dy_), weight(), save_mean.data(),
        save_invstd.data(), data(dx), sc_.affine ? dweight.data() : nullptr,
        sc_.affine ? dbias.data() : nullptr, nullptr);
    EXPECT_EQ(bs, SYNCBN_SUCCESS) << syncbn_last_error();
    EXPECT_TRUE(all_close("dx", dx, dx_want, Tolerances<T>::data));
    if (!sc_.affine) return;

    const GradSums& mine = sc_.global_grads ? global : local;
    const char* kind = sc_.global_grads ? " (global)" : " (local)";
    EXPECT_TRUE(all_close(std::string("dweight") + kind, dweight, grad_weight(mine, invstd),
                          scaled(Tolerances<T>::sums, grad_weight_scale(mine, invstd))));
    EXPECT_TRUE(all_close(std::string("dbias") + kind, dbias, mine.sum_g,
                          scaled(Tolerances<T>::sums, mine.abs_g)));
    if (sc_.global_grads) {
      EXPECT_TRUE(same_as_rank0("dweight (global)", dweight, gcomm));
      EXPECT_TRUE(same_as_rank0("dbias (global)", dbias, gcomm));
    } else {
      // The trainer's sum of the local gradients is the gradient of the global batch.
      EXPECT_TRUE(all_close("sum over ranks of dweight", sum_over_ranks(dweight, gcomm),
                            grad_weight(global, invstd),
                            scaled(Tolerances<T>::sums, grad_weight_scale(global, invstd))));
      EXPECT_TRUE(all_close("sum over ranks of dbias", sum_over_ranks(dbias, gcomm),
                            global.sum_g, scaled(Tolerances<T>::sums, global.abs_g)));
    }
  }

  // Eval, local either way: running statistics when tracked, else this rank's own batch
  // statistics (as torch's BatchNorm and SyncBatchNorm in eval mode); an empty local batch is
  // a success with nothing to write.
  void eval_step(syncbn_plan_t plan) {
    draw(sc_.steps, false);
    SCOPED_TRACE("local batch " + g_.str());
    std::vector<double> mean, invstd;
    if (sc_.track) {
      mean = to_double(st_.running_mean);
      invstd = eval_invstd(st_.running_var, cfg_.eps);
    } else if (!x_.empty()) {
      const BatchStats stats = batch_stats(gather(g_, x_.data()), cfg_.eps);
      mean = stats.mean;
      invstd = stats.invstd;
    }
    const auto want = normalize(g_, x_.data(), mean, invstd, w_eff(), b_eff());
    std::vector<T> y(x_.size(), T(-777));
    const auto shape = g_.shape();
    EXPECT_EQ(syncbn_forward_inference(plan, g_.ndim(), shape.data(), data(x_), weight(), bias(),
                                       sc_.track ? st_.running_mean.data() : nan_.data(),
                                       sc_.track ? st_.running_var.data() : nan_.data(), data(y),
                                       nullptr),
              SYNCBN_SUCCESS)
        << syncbn_last_error();
    EXPECT_TRUE(all_close("eval y", y, want, Tolerances<T>::data));
  }

  Scenario sc_;
  syncbn_layout_t layout_;
  CommKind kind_;
  int P_, rank_, k_;
  TestGroup group_;
  Rng rng_;
  syncbn_config_t cfg_{};
  LayerState<T> st_, ref_;
  ChannelDistribution dist_;
  std::vector<T> nan_;
  T dummy_[1] = {T(0)};
  // This step's local slice and the group's per-channel values.
  Geometry g_;
  std::vector<T> x_, dy_;
  ChannelValues X_, DY_;
};

const Scenario kScenarios[] = {
    {"equal_1d", [](int, int) { return RankBatch{3, {4}}; }},
    {"equal_0d", [](int, int) { return RankBatch{4, {}}; }},
    {"equal_2d", [](int, int) { return RankBatch{2, {3, 3}}; }},
    {"equal_3d", [](int, int) { return RankBatch{2, {2, 2, 3}}; }},
    {"uneven_n", [](int r, int) { return RankBatch{r + 1, {3, 2}}; }},
    {"empty_rank1", [](int r, int) { return RankBatch{r == 1 ? 0 : 3, {5}}; }},
    {"empty_rank1_null_pointers", [](int r, int) { return RankBatch{r == 1 ? 0 : 3, {5}}; }, 0,
     true, true, 0.1, false, /*null_empty=*/true},
    {"only_rank0_has_data", [](int r, int) { return RankBatch{r == 0 ? 4 : 0, {2}}; }, 0, true,
     true, 0.1, false, true},
    {"different_spatial", [](int r, int) { return RankBatch{2, {r + 2, 3}}; }},
    {"different_n_and_spatial",
     [](int r, int) { return RankBatch{r % 2 + 1, {2 * r + 2}}; }},
    {"no_affine_no_track", [](int r, int) { return RankBatch{r + 2, {4}}; }, 0, false, false},
    {"no_affine_cumulative", [](int r, int) { return RankBatch{2, {r + 1, 2}}; }, 0, false, true,
     kCumulative, false, false, 3},
    {"global_param_grads", [](int r, int) { return RankBatch{r + 1, {3}}; }, 0, true, true, 0.1,
     true},
    {"global_param_grads_empty_rank1", [](int r, int) { return RankBatch{r == 1 ? 0 : 2, {3}}; },
     0, true, true, 0.1, true},
    {"split1", [](int r, int) { return RankBatch{r + 2, {3}}; }, 1},
    {"split2", [](int, int) { return RankBatch{2, {3, 2}}; }, 2},
    {"split2_uneven_global_grads", [](int r, int) { return RankBatch{r + 1, {r + 1}}; }, 2, true,
     true, 0.1, true},
    {"twenty_steps", [](int r, int s) { return RankBatch{1 + (r + s) % 3, {3}}; }, 0, true, true,
     0.1, false, false, 20},
    {"twenty_steps_cumulative", [](int r, int s) { return RankBatch{1 + (r + s) % 3, {2, 2}}; },
     0, true, true, kCumulative, false, false, 20},
    {"channels_17", [](int r, int) { return RankBatch{2, {r + 1}}; }, 0, true, true, 0.1, false,
     false, 2, 17},
    // Running variance and invstd to 1e-5 (relative) although mean / std is ~1e4.
    {"mean_1e4", [](int r, int) { return RankBatch{r + 3, {16, 8}}; }, 0, true, true, 0.1, false,
     false, 1, 3, 1e4, 1e-5},
};

// Every scenario over syncbn's MPI communicator and over a custom communicator whose callbacks
// call MPI (syncbn_comm_create_custom, with a split function): the same numbers either way.
using Param = std::tuple<syncbn_dtype_t, syncbn_layout_t, Scenario, CommKind>;

class MpiCorrectness : public ::testing::TestWithParam<Param> {};

TEST_P(MpiCorrectness, MatchesReferenceOverGlobalBatch) {
  const auto& [dtype, layout, sc, kind] = GetParam();
  std::string why;
  if (!split_fits(sc.group_size, &why)) GTEST_SKIP() << why;
  if (dtype == SYNCBN_FLOAT32)
    ScenarioRun<float>(sc, layout, kind).run();
  else
    ScenarioRun<double>(sc, layout, kind).run();
}

INSTANTIATE_TEST_SUITE_P(
    All, MpiCorrectness,
    ::testing::Combine(::testing::Values(SYNCBN_FLOAT32, SYNCBN_FLOAT64),
                       ::testing::Values(SYNCBN_CHANNELS_FIRST, SYNCBN_CHANNELS_LAST),
                       ::testing::ValuesIn(kScenarios),
                       ::testing::Values(CommKind::mpi, CommKind::custom)),
    [](const ::testing::TestParamInfo<Param>& info) {
      return std::string(std::get<2>(info.param).name) + "_" +
             dtype_name(std::get<0>(info.param)) + "_" + layout_name(std::get<1>(info.param)) +
             "_" + comm_kind_name(std::get<3>(info.param));
    });

// The C++ API over MPI: mpi_communicator, split, rank and size.
TEST(MpiCommunicator, CppApiRankSizeSplit) {
  const int P = world_size(), r = world_rank();
  syncbn::Communicator world = syncbn::mpi_communicator(MPI_COMM_WORLD);
  EXPECT_EQ(world.size(), P);
  EXPECT_EQ(world.rank(), r);
  syncbn::Communicator one = world.split(1);
  EXPECT_EQ(one.size(), 1);
  EXPECT_EQ(one.rank(), 0);
  syncbn::Communicator all = world.split(P);
  EXPECT_EQ(all.size(), P);
  EXPECT_EQ(all.rank(), r);
  if (P % 2 == 0) {
    syncbn::Communicator pairs = world.split(2);
    EXPECT_EQ(pairs.size(), 2);
    EXPECT_EQ(pairs.rank(), r % 2);
  }
}

// A plan keeps its communicator (and the duplicated MPI communicator) alive after the caller's
// handle is destroyed.
TEST(MpiCommunicator, PlanOutlivesCommunicatorHandle) {
  const int P = world_size();
  syncbn_plan_t p = nullptr;
  {
    CommHandle comm = world_comm();
    syncbn_config_t cfg;
    syncbn_config_init(&cfg, 2, SYNCBN_FLOAT64);
    EXPECT_EQ(syncbn_plan_create(comm.get(), &cfg, &p), SYNCBN_SUCCESS) << rank_tag();
  }
  PlanHandle plan(p);
  // Rank r holds (r, 10 r) and (r + 1, 10 r + 10): the global mean of channel c is
  // (P / 2) * 10^c, whatever P.
  const double r = world_rank();
  const int64_t shape[2] = {2, 2};
  const double x[4] = {r, 10 * r, r + 1, 10 * r + 10}, w[2] = {1, 1}, b[2] = {0, 0};
  double y[4], mean[2], invstd[2], rm[2] = {0, 0}, rv[2] = {1, 1};
  int64_t nbt = 0;
  EXPECT_EQ(syncbn_forward_training(plan.get(), 2, shape, x, w, b, y, mean, invstd, rm, rv, &nbt,
                                    nullptr),
            SYNCBN_SUCCESS)
      << rank_tag() << ": " << syncbn_last_error();
  EXPECT_DOUBLE_EQ(mean[0], P / 2.0) << rank_tag();
  EXPECT_DOUBLE_EQ(mean[1], 10 * P / 2.0) << rank_tag();
}

// A communicator over MPI_COMM_SELF is a group of one on every rank: plain local batch norm.
TEST(MpiCommunicator, OverMpiCommSelf) {
  syncbn::Communicator self = syncbn::mpi_communicator(MPI_COMM_SELF);
  EXPECT_EQ(self.size(), 1);
  EXPECT_EQ(self.rank(), 0);
  syncbn_config_t cfg = syncbn::make_config(1, SYNCBN_FLOAT64);
  cfg.track_running_stats = 0;
  cfg.affine = 0;
  syncbn::BatchNorm bn(self, cfg);
  const double r = world_rank();
  const std::vector<double> x{r, r + 2};
  std::vector<double> y(2), mean(1), invstd(1);
  bn.forward_training({2, 1}, x.data(), nullptr, nullptr, y.data(), mean.data(), invstd.data(),
                      nullptr, nullptr, nullptr);
  EXPECT_DOUBLE_EQ(mean[0], r + 1) << rank_tag();
  EXPECT_NEAR(invstd[0], 1 / std::sqrt(1 + 1e-5), 1e-12) << rank_tag();
}

}  // namespace
