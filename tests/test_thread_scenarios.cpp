// Threads as ranks, in one process, for every group size P = 1 to 16 (as Gloo's tests sweep
// theirs): CPU plans over a custom communicator whose allreduce is a rendezvous in memory
// (tests/thread_comm.hpp), each rank thread on one OpenMP thread.
//   - the scenario table of scenarios.hpp, with the one runner the MPI and GPU suites use: on
//     every rank the outputs equal the fp64 reference over the group's global batch, and the
//     statistics are bitwise alike across the ranks of a group;
//   - collective verdicts (bad_args.hpp's table, as the MPI suite runs it): one rank's bad
//     argument fails the call on every rank with the same status and a message naming that rank
//     and the argument, nothing changes anywhere, and the plan still works afterwards.
#include <gtest/gtest.h>
#include <omp.h>

#include <memory>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "bad_args.hpp"
#include "reference.hpp"
#include "scenarios.hpp"
#include "syncbn/syncbn.h"
#include "thread_comm.hpp"

namespace {

using namespace syncbn_test;

constexpr int kMaxRanks = 16;
constexpr int kAllPairsUpTo = 4;  // group sizes run in every dtype and layout

// Each rank thread runs its OpenMP regions on one thread (on_threads), whatever
// OMP_NUM_THREADS says: 16 ranks must not start 16 full teams.
TEST(ThreadRanks, EachRankRunsOneOpenMPThread) {
  on_threads(kMaxRanks, [](int rank) { EXPECT_EQ(omp_get_max_threads(), 1) << "rank " << rank; });
}

// ---- the scenarios --------------------------------------------------------------------------

using ScenarioParam = std::tuple<int, syncbn_dtype_t, syncbn_layout_t, Scenario>;

class ThreadScenarios : public ::testing::TestWithParam<ScenarioParam> {};

TEST_P(ThreadScenarios, MatchesReferenceOverGlobalBatch) {
  // Named copies, not structured bindings: lambdas capture those only from C++20 on.
  const int P = std::get<0>(GetParam());
  const syncbn_dtype_t dtype = std::get<1>(GetParam());
  const syncbn_layout_t layout = std::get<2>(GetParam());
  const Scenario& sc = std::get<3>(GetParam());
  std::string why;
  if (!split_fits(P, sc.group_size, &why)) GTEST_SKIP() << why;
  auto world = std::make_shared<ThreadGroup>(P);          // the library's allreduce
  auto checks = std::make_shared<ThreadGroup>(P);         // the test's own exchange
  auto shared = std::make_shared<ThreadRanks::Shared>();  // the draws, made once
  on_threads(P, [&](int rank) {
    CommHandle comm = member_comm(world, rank);
    const ThreadRanks ranks{checks, rank, shared};
    if (dtype == SYNCBN_FLOAT32)
      run_host_scenario<float>(sc, layout, comm.get(), ranks);
    else
      run_host_scenario<double>(sc, layout, comm.get(), ranks);
  });
}

// Every scenario at every P. Up to 4 ranks, each in both dtypes and both layouts; above, one
// (dtype, layout) pair per P in turn, so that each pair still meets every scenario at three
// group sizes from 5 to 16 while the suite stays within seconds (each rank draws the whole
// global batch, so a run costs about P^2).
std::vector<ScenarioParam> scenario_params() {
  const std::pair<syncbn_dtype_t, syncbn_layout_t> pairs[] = {
      {SYNCBN_FLOAT32, SYNCBN_CHANNELS_FIRST},
      {SYNCBN_FLOAT64, SYNCBN_CHANNELS_LAST},
      {SYNCBN_FLOAT32, SYNCBN_CHANNELS_LAST},
      {SYNCBN_FLOAT64, SYNCBN_CHANNELS_FIRST}};
  std::vector<ScenarioParam> list;
  for (int P = 1; P <= kMaxRanks; ++P)
    for (size_t i = 0; i < 4; ++i) {
      if (P > kAllPairsUpTo && i != static_cast<size_t>(P) % 4) continue;
      for (const Scenario& sc : scenarios())
        list.emplace_back(P, pairs[i].first, pairs[i].second, sc);
    }
  return list;
}

INSTANTIATE_TEST_SUITE_P(All, ThreadScenarios, ::testing::ValuesIn(scenario_params()),
                         [](const ::testing::TestParamInfo<ScenarioParam>& info) {
                           return "P" + std::to_string(std::get<0>(info.param)) + "_" +
                                  scenario_name(std::get<3>(info.param), std::get<1>(info.param),
                                                std::get<2>(info.param));
                         });

// ---- collective verdicts: one rank's bad argument ------------------------------------------

using BadArgParam = std::tuple<int, ArgCase, bool>;  // P, the case, on the last rank (else first)

class ThreadVerdicts : public ::testing::TestWithParam<BadArgParam> {};

TEST_P(ThreadVerdicts, BadArgumentOnOneRankFailsEverywhere) {
  const int P = std::get<0>(GetParam());
  const ArgCase& tc = std::get<1>(GetParam());
  const int bad = std::get<2>(GetParam()) ? P - 1 : 0;
  auto world = std::make_shared<ThreadGroup>(P);
  auto checks = std::make_shared<ThreadGroup>(P);
  on_threads(P, [&](int rank) {
    CommHandle comm = member_comm(world, rank);
    expect_bad_arg_fails_everywhere(tc, bad, comm.get(), ThreadRanks{checks, rank});
  });
}

INSTANTIATE_TEST_SUITE_P(All, ThreadVerdicts,
                         ::testing::Combine(::testing::Range(1, kMaxRanks + 1),
                                            ::testing::ValuesIn(collective_arg_cases()),
                                            ::testing::Bool()),
                         [](const ::testing::TestParamInfo<BadArgParam>& info) {
                           return "P" + std::to_string(std::get<0>(info.param)) + "_" +
                                  std::get<1>(info.param).name +
                                  (std::get<2>(info.param) ? "_on_last_rank" : "_on_first_rank");
                         });

}  // namespace
