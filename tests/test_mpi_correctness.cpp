// Multi-process correctness on CPU plans: the scenarios of scenarios.hpp (one runner and one
// table, shared with the GPU and the thread suites) over syncbn's MPI communicator and over a
// custom communicator whose callbacks call MPI. On every rank, y, dx, save_mean, save_invstd and
// the running statistics equal those of the single-process fp64 reference BN over the group's
// global batch, dweight / dbias equal the reference over the rank's own slice with the global
// statistics (and sum to the global ones), and the running statistics stay bitwise identical
// across the ranks of a group after every step. Also the C++ API's MPI communicator.
//
// Run by ctest at 1, 2, 3 and 4 ranks; the shared main (mpi_main.cpp) reduces the verdict.
#include <gtest/gtest.h>
#include <mpi.h>

#include <cmath>
#include <string>
#include <tuple>
#include <vector>

#include "mpi_helpers.hpp"
#include "reference.hpp"
#include "scenarios.hpp"
#include "syncbn/syncbn.h"
#include "syncbn/syncbn_mpi.h"
#include "syncbn/syncbn_mpi.hpp"

namespace {

using namespace syncbn_test;

// Every scenario over syncbn's MPI communicator and over a custom communicator whose callbacks
// call MPI (syncbn_comm_create_custom, with a split function): the same numbers either way.
using Param = std::tuple<syncbn_dtype_t, syncbn_layout_t, Scenario, CommKind>;

class MpiCorrectness : public ::testing::TestWithParam<Param> {};

TEST_P(MpiCorrectness, MatchesReferenceOverGlobalBatch) {
  const auto& [dtype, layout, sc, kind] = GetParam();
  std::string why;
  if (!split_fits(world_size(), sc.group_size, &why)) GTEST_SKIP() << why;
  CommHandle world = world_comm(kind);
  const MpiRanks ranks;
  if (dtype == SYNCBN_FLOAT32)
    run_host_scenario<float>(sc, layout, world.get(), ranks);
  else
    run_host_scenario<double>(sc, layout, world.get(), ranks);
}

INSTANTIATE_TEST_SUITE_P(
    All, MpiCorrectness,
    ::testing::Combine(::testing::Values(SYNCBN_FLOAT32, SYNCBN_FLOAT64),
                       ::testing::Values(SYNCBN_CHANNELS_FIRST, SYNCBN_CHANNELS_LAST),
                       ::testing::ValuesIn(scenarios()),
                       ::testing::Values(CommKind::mpi, CommKind::custom)),
    [](const ::testing::TestParamInfo<Param>& info) {
      return scenario_name(std::get<2>(info.param), std::get<0>(info.param),
                           std::get<1>(info.param)) +
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
