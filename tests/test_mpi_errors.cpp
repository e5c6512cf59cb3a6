// Multi-process failure handling (docs/design.md section 4): a rank that rejects its arguments still
// takes part in the collective, so that every rank returns the same status and a message naming
// the rank and the argument, and nothing changes anywhere; disagreeing configurations fail
// plan creation everywhere; divergent call sequences fail every call that met them.
//
// Every collective call is matched on all ranks (the number of library collectives per rank is
// the same whatever any check says), so a buggy library fails by assertion or, at worst, by the
// ctest TIMEOUT (and the watchdog of mpi_main.cpp names the test that hung). Tests that need 2+
// ranks skip at 1, decided from the world size alone, identically on every rank. The tests that
// make ranks call different plans or operations run last (a parameterized suite defined last):
// after such a mismatch a test stops using its plans.
#include <gtest/gtest.h>
#include <mpi.h>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <ostream>
#include <string>
#include <tuple>
#include <vector>

#include "api_calls.hpp"
#include "bad_args.hpp"
#include "mpi_helpers.hpp"
#include "reference.hpp"
#include "syncbn/syncbn.h"
#include "syncbn/syncbn_mpi.h"

namespace {

using namespace syncbn_test;

constexpr int64_t kC = 3;
constexpr double kCumulative = SYNCBN_MOMENTUM_CUMULATIVE;

// COLLECTIVE: a plan on comm; failure is recorded, not thrown.
PlanHandle make_plan(syncbn_comm_t comm, const syncbn_config_t& cfg) {
  syncbn_plan_t p = nullptr;
  const syncbn_status_t s = syncbn_plan_create(comm, &cfg, &p);
  EXPECT_EQ(s, SYNCBN_SUCCESS) << rank_tag() << ": syncbn_plan_create: " << syncbn_last_error();
  return PlanHandle(s == SYNCBN_SUCCESS ? p : nullptr);
}

syncbn_config_t default_config(bool track = true) {
  syncbn_config_t cfg;
  syncbn_config_init(&cfg, kC, SYNCBN_FLOAT32);
  cfg.track_running_stats = track;
  return cfg;
}

// Local batch sizes that differ per rank: 2 + rank samples of length 4.
CallBuffers rank_buffers() { return CallBuffers(2 + world_rank(), kC, 4, test_seed(), world_rank()); }

// COLLECTIVE: a correct call of op on every rank succeeds, after whatever failed before
// (bad_args.hpp).
void expect_plan_still_works(syncbn_plan_t plan, Op op) {
  syncbn_test::expect_plan_still_works(plan, op, MpiRanks{});
}

// ---- one rank's bad argument fails the call on every rank ------------------------------------

// Every case of the one table (bad_args.hpp) whose verdict is collective, on the first and on
// the last rank.
enum class Which { kFirst, kLast };
void PrintTo(Which w, std::ostream* os) { *os << (w == Which::kFirst ? "first" : "last"); }
using BadArgParam = std::tuple<ArgCase, Which>;

class BadArgOnOneRank : public ::testing::TestWithParam<BadArgParam> {};

TEST_P(BadArgOnOneRank, FailsEverywhereNamingRankAndArgument) {
  const auto& [tc, which] = GetParam();
  const int bad = which == Which::kFirst ? 0 : world_size() - 1;
  CommHandle comm = world_comm();
  expect_bad_arg_fails_everywhere(tc, bad, comm.get(), MpiRanks{});
}

INSTANTIATE_TEST_SUITE_P(All, BadArgOnOneRank,
                         ::testing::Combine(::testing::ValuesIn(collective_arg_cases()),
                                            ::testing::Values(Which::kFirst, Which::kLast)),
                         [](const ::testing::TestParamInfo<BadArgParam>& info) {
                           return std::string(std::get<0>(info.param).name) +
                                  (std::get<1>(info.param) == Which::kFirst ? "_on_first_rank"
                                                                            : "_on_last_rank");
                         });

// Every rank has a bad argument of its own: still one status everywhere.
TEST(BadArgs, OnEveryRank) {
  CommHandle comm = world_comm();
  PlanHandle plan = make_plan(comm.get(), default_config());
  CallBuffers buf = rank_buffers();
  const CallBuffers before = buf;
  CallArgs args = buf.args(plan.get());
  const bool even = world_rank() % 2 == 0;
  if (even)
    args.weight = nullptr;
  else
    args.running_var = nullptr;
  EXPECT_EQ(call(Op::kForward, args), SYNCBN_ERROR_INVALID_ARGUMENT) << rank_tag();
  // The message format for several bad ranks is the library's; it must name this rank's own.
  EXPECT_TRUE(message_names({even ? "weight" : "running_var"}));
  EXPECT_TRUE(buf.unchanged_since(before)) << rank_tag();
  expect_plan_still_works(plan.get(), Op::kForward);
}

// Eval is local with and without running statistics: a bad argument fails that rank only.
TEST(BadArgs, EvalIsLocal) {
  const int P = world_size();
  CommHandle comm = world_comm();
  for (const bool track : {true, false}) {
    SCOPED_TRACE(track ? "tracking" : "not tracking");
    PlanHandle plan = make_plan(comm.get(), default_config(track));
    CallBuffers buf = rank_buffers();
    const CallBuffers before = buf;
    CallArgs args = buf.args(plan.get());
    const bool bad = world_rank() == P - 1;
    if (bad) (track ? args.running_var : args.y) = nullptr;
    EXPECT_EQ(call(Op::kInference, args), bad ? SYNCBN_ERROR_INVALID_ARGUMENT : SYNCBN_SUCCESS)
        << rank_tag() << ": " << syncbn_last_error();
    if (bad) {
      EXPECT_TRUE(message_names({"rank " + std::to_string(P - 1), track ? "running_var" : "y"}));
      EXPECT_TRUE(buf.unchanged_since(before)) << rank_tag();
    }
    expect_plan_still_works(plan.get(), Op::kForward);
  }
}

// One rank evaluates alone, a few times, between two training calls of the group: nothing waits,
// and the plan's call sequence stays in step (the next collective call succeeds everywhere).
TEST(BadArgs, EvalOnOneRankAloneKeepsTheSequence) {
  CommHandle comm = world_comm();
  for (const bool track : {true, false}) {
    SCOPED_TRACE(track ? "tracking" : "not tracking");
    PlanHandle plan = make_plan(comm.get(), default_config(track));
    expect_plan_still_works(plan.get(), Op::kForward);
    if (world_rank() == 0) {
      for (int i = 0; i < 3; ++i) {
        CallBuffers buf = rank_buffers();
        EXPECT_EQ(call(Op::kInference, buf.args(plan.get())), SYNCBN_SUCCESS)
            << rank_tag() << ": " << syncbn_last_error();
      }
    }
    expect_plan_still_works(plan.get(), Op::kForward);
    expect_plan_still_works(plan.get(), Op::kBackward);
  }
}

// A binding that found an argument wrong which the C API cannot see (a tensor's dtype or
// device) rejects the call on that rank: every rank fails it alike, naming the rank, the
// argument and the problem, and only that rank's message carries its detail. Nothing changes;
// the sequence stays in step. Forward inference is local: only the rejecting rank fails.
struct Rejection {
  Op op;
  syncbn_call_t call;
  const char* argument;
  syncbn_problem_t problem;
  const char* words;  // what every rank's message must say
};
const Rejection kRejections[] = {
    {Op::kForward, SYNCBN_CALL_FORWARD_TRAINING, "x", SYNCBN_PROBLEM_DTYPE, "x is not of the plan's dtype"},
    {Op::kForward, SYNCBN_CALL_FORWARD_TRAINING, "weight", SYNCBN_PROBLEM_DEVICE,
     "weight is not in the memory of the plan's device"},
    {Op::kBackward, SYNCBN_CALL_BACKWARD, "dy", SYNCBN_PROBLEM_SHAPE, "dy has a shape other than"},
    {Op::kBackward, SYNCBN_CALL_BACKWARD, "no such name", SYNCBN_PROBLEM_LAYOUT,
     "an argument is not dense in the plan's layout"},
    {Op::kForward, SYNCBN_CALL_FORWARD_TRAINING, "x", static_cast<syncbn_problem_t>(99),
     "x was rejected by the caller"},
};

TEST(BadArgs, RejectedCallFailsEverywhere) {
  const int P = world_size(), rank = world_rank();
  CommHandle comm = world_comm();
  PlanHandle plan = make_plan(comm.get(), default_config());
  for (const Rejection& r : kRejections) {
    for (const int bad : {0, P - 1}) {
      SCOPED_TRACE(std::string(op_name(r.op)) + " " + r.words + ", bad rank " + std::to_string(bad));
      CallBuffers buf = rank_buffers();
      const CallBuffers before = buf;
      const syncbn_status_t s =
          rank == bad ? syncbn_plan_reject_call(plan.get(), r.call, r.argument, r.problem,
                                                "detail of the bad rank", nullptr)
                      : call(r.op, buf.args(plan.get()));
      EXPECT_EQ(s, SYNCBN_ERROR_INVALID_ARGUMENT) << rank_tag() << ": " << syncbn_last_error();
      EXPECT_TRUE(message_names({"rank " + std::to_string(bad), r.words}));
      const bool has_detail = std::string(syncbn_last_error()).find("detail of the bad rank") !=
                              std::string::npos;
      EXPECT_EQ(has_detail, rank == bad) << rank_tag() << ": " << syncbn_last_error();
      EXPECT_TRUE(buf.unchanged_since(before)) << rank_tag();
      expect_plan_still_works(plan.get(), r.op);
    }
  }
  // Inference is local: only the rejecting rank fails, and nobody waits.
  if (rank == P - 1) {
    EXPECT_EQ(syncbn_plan_reject_call(plan.get(), SYNCBN_CALL_FORWARD_INFERENCE, "x",
                                      SYNCBN_PROBLEM_DTYPE, nullptr, nullptr),
              SYNCBN_ERROR_INVALID_ARGUMENT);
    EXPECT_TRUE(message_names({"rank " + std::to_string(P - 1), "x is not of the plan's dtype"}));
  }
  EXPECT_EQ(syncbn_plan_reject_call(plan.get(), static_cast<syncbn_call_t>(0), "x",
                                    SYNCBN_PROBLEM_DTYPE, nullptr, nullptr),
            SYNCBN_ERROR_INVALID_ARGUMENT);  // not a call: local, at once
  EXPECT_TRUE(message_names({"call is not a syncbn_call_t"}));
  EXPECT_EQ(syncbn_plan_reject_call(nullptr, SYNCBN_CALL_FORWARD_TRAINING, "x",
                                    SYNCBN_PROBLEM_DTYPE, nullptr, nullptr),
            SYNCBN_ERROR_INVALID_ARGUMENT);
  expect_plan_still_works(plan.get(), Op::kForward);
}

// No communicator from MPI_COMM_NULL, nor without a place for the handle (every rank alike).
TEST(CommCreate, BadArguments) {
  syncbn_comm_t c = nullptr;
  EXPECT_EQ(syncbn_comm_create_mpi(MPI_COMM_NULL, &c), SYNCBN_ERROR_INVALID_ARGUMENT)
      << rank_tag();
  EXPECT_EQ(c, nullptr) << rank_tag();
  EXPECT_EQ(syncbn_comm_create_mpi(MPI_COMM_WORLD, nullptr), SYNCBN_ERROR_INVALID_ARGUMENT)
      << rank_tag();
  CommHandle comm = world_comm();  // and a good one still works afterwards
  PlanHandle plan = make_plan(comm.get(), default_config());
  expect_plan_still_works(plan.get(), Op::kForward);
}

// Ranks whose MPI differs in CUDA-awareness would sum a CUDA plan's buffer with different
// collectives and never meet: the communicator is refused on every rank, naming the setting.
// Runs in ctest mpi_errors.cuda_aware_differs.np2, which sets SYNCBN_MPI_CUDA_AWARE=1 on rank 1
// only (and SYNCBN_TEST_CUDA_AWARE_DIFFERS on every rank); skips elsewhere.
TEST(CommCreate, CudaAwarenessMustAgree) {
  if (std::getenv("SYNCBN_TEST_CUDA_AWARE_DIFFERS") == nullptr) {
    GTEST_SKIP() << "needs ranks that differ in SYNCBN_MPI_CUDA_AWARE";
  }
  syncbn_comm_t c = nullptr;
  EXPECT_EQ(syncbn_comm_create_mpi(MPI_COMM_WORLD, &c), SYNCBN_ERROR_INVALID_ARGUMENT)
      << rank_tag() << ": " << syncbn_last_error();
  EXPECT_EQ(c, nullptr);
  EXPECT_TRUE(message_names({"CUDA-aware", "SYNCBN_MPI_CUDA_AWARE"}));
  syncbn_comm_destroy(c);
}

// ---- plan creation --------------------------------------------------------------------------

struct ConfigChange {
  const char* name;
  void (*mutate)(syncbn_config_t&);
  const char* field;  // what the message must name
};
void PrintTo(const ConfigChange& c, std::ostream* os) { *os << c.name; }

const ConfigChange kMismatches[] = {
    {"num_features", [](syncbn_config_t& c) { c.num_features += 1; }, "num_features"},
    {"eps", [](syncbn_config_t& c) { c.eps = 1e-3; }, "eps"},
    {"layout", [](syncbn_config_t& c) { c.layout = SYNCBN_CHANNELS_LAST; }, "layout"},
    {"dtype", [](syncbn_config_t& c) { c.dtype = SYNCBN_FLOAT64; }, "dtype"},
    {"momentum", [](syncbn_config_t& c) { c.momentum = 0.2; }, "momentum"},
    {"momentum_cumulative", [](syncbn_config_t& c) { c.momentum = kCumulative; }, "momentum"},
    {"affine", [](syncbn_config_t& c) { c.affine = 0; }, "affine"},
    {"track_running_stats", [](syncbn_config_t& c) { c.track_running_stats = 0; },
     "track_running_stats"},
    {"global_param_grads", [](syncbn_config_t& c) { c.global_param_grads = 1; },
     "global_param_grads"},
};

// COLLECTIVE: plan creation with tc's change on the last rank only returns `status` on every
// rank with a message naming `words`; a good plan on the same communicator then still works.
void expect_change_on_last_rank_fails(const ConfigChange& tc, syncbn_status_t status,
                                      const std::vector<std::string>& words) {
  CommHandle comm = world_comm();
  syncbn_config_t cfg = default_config();
  if (world_rank() == world_size() - 1) tc.mutate(cfg);
  syncbn_plan_t p = nullptr;
  const syncbn_status_t s = syncbn_plan_create(comm.get(), &cfg, &p);
  PlanHandle bad(s == SYNCBN_SUCCESS ? p : nullptr);
  EXPECT_EQ(s, status) << rank_tag() << ": " << syncbn_last_error();
  EXPECT_TRUE(message_names(words));

  PlanHandle good = make_plan(comm.get(), default_config());
  expect_plan_still_works(good.get(), Op::kForward);
}

class ConfigMismatch : public ::testing::TestWithParam<ConfigChange> {};

// The last rank's configuration differs in one field: CONFIG_MISMATCH on every rank.
TEST_P(ConfigMismatch, FailsEverywhereNamingTheField) {
  const int P = world_size();
  if (P < 2) GTEST_SKIP() << "needs 2 or more ranks";
  const ConfigChange& tc = GetParam();
  expect_change_on_last_rank_fails(tc, SYNCBN_ERROR_CONFIG_MISMATCH, {tc.field});
}
INSTANTIATE_TEST_SUITE_P(All, ConfigMismatch, ::testing::ValuesIn(kMismatches),
                         [](const ::testing::TestParamInfo<ConfigChange>& info) {
                           return std::string(info.param.name);
                         });

// NaN (cumulative momentum) on every rank is agreement, not a mismatch.
TEST(ConfigAgreement, CumulativeMomentumOnEveryRank) {
  CommHandle comm = world_comm();
  syncbn_config_t cfg = default_config();
  cfg.momentum = kCumulative;
  cfg.layout = SYNCBN_CHANNELS_LAST;
  cfg.eps = 1e-3;
  PlanHandle plan = make_plan(comm.get(), cfg);
  EXPECT_NE(plan, nullptr) << rank_tag();
}

const ConfigChange kInvalidConfigs[] = {
    {"C_zero", [](syncbn_config_t& c) { c.num_features = 0; }, "num_features"},
    {"C_negative", [](syncbn_config_t& c) { c.num_features = -1; }, "num_features"},
    {"eps_zero", [](syncbn_config_t& c) { c.eps = 0; }, "eps"},
    {"eps_nan", [](syncbn_config_t& c) { c.eps = std::numeric_limits<double>::quiet_NaN(); },
     "eps"},
    {"momentum_2", [](syncbn_config_t& c) { c.momentum = 2; }, "momentum"},
    {"momentum_negative", [](syncbn_config_t& c) { c.momentum = -0.5; }, "momentum"},
};

class InvalidConfigOnOneRank : public ::testing::TestWithParam<ConfigChange> {};

// The last rank's configuration is invalid: INVALID_ARGUMENT on every rank, naming rank and field.
TEST_P(InvalidConfigOnOneRank, FailsEverywhereNamingRankAndField) {
  const ConfigChange& tc = GetParam();
  expect_change_on_last_rank_fails(tc, SYNCBN_ERROR_INVALID_ARGUMENT,
                                   {"rank " + std::to_string(world_size() - 1), tc.field});
}
INSTANTIATE_TEST_SUITE_P(All, InvalidConfigOnOneRank, ::testing::ValuesIn(kInvalidConfigs),
                         [](const ::testing::TestParamInfo<ConfigChange>& info) {
                           return std::string(info.param.name);
                         });

// ---- global batch too small -----------------------------------------------------------------

// Every rank has N = 0: m == 0 for forward and backward; eval without tracking is local and
// has nothing to normalize, a success that writes nothing.
TEST(BatchTooSmall, GlobalCountZero) {
  CommHandle comm = world_comm();
  PlanHandle plan = make_plan(comm.get(), default_config(true));
  PlanHandle notrack = make_plan(comm.get(), default_config(false));
  CallBuffers buf(0, kC, 4, test_seed(), world_rank());
  const CallBuffers before = buf;
  for (Op op : {Op::kForward, Op::kBackward}) {
    EXPECT_EQ(call(op, buf.args(plan.get())), SYNCBN_ERROR_BATCH_TOO_SMALL)
        << rank_tag() << ", " << op_name(op) << ": " << syncbn_last_error();
    EXPECT_TRUE(buf.unchanged_since(before)) << rank_tag() << ", " << op_name(op);
  }
  EXPECT_EQ(call(Op::kForward, buf.args(notrack.get())), SYNCBN_ERROR_BATCH_TOO_SMALL)
      << rank_tag() << ", forward without tracking";
  EXPECT_EQ(call(Op::kInference, buf.args(notrack.get())), SYNCBN_SUCCESS)
      << rank_tag() << ", eval without tracking: " << syncbn_last_error();
  EXPECT_TRUE(buf.unchanged_since(before)) << rank_tag();
  expect_plan_still_works(plan.get(), Op::kForward);
}

// One value per channel over the whole group (on the last rank): too small in training with
// running statistics (the unbiased variance is undefined), fine without them.
TEST(BatchTooSmall, GlobalCountOne) {
  const int P = world_size(), rank = world_rank();
  CommHandle comm = world_comm();
  PlanHandle plan = make_plan(comm.get(), default_config(true));
  PlanHandle notrack = make_plan(comm.get(), default_config(false));
  CallBuffers buf(rank == P - 1 ? 1 : 0, kC, 1, test_seed(), rank);
  const CallBuffers before = buf;
  EXPECT_EQ(call(Op::kForward, buf.args(plan.get())), SYNCBN_ERROR_BATCH_TOO_SMALL)
      << rank_tag() << ": " << syncbn_last_error();
  EXPECT_TRUE(buf.unchanged_since(before)) << rank_tag();

  // Without tracking: mean = the one value, variance 0, y = bias.
  EXPECT_EQ(call(Op::kForward, buf.args(notrack.get())), SYNCBN_SUCCESS)
      << rank_tag() << ": " << syncbn_last_error();
  const CallBuffers last(1, kC, 1, test_seed(), P - 1);  // the last rank's data, on every rank
  for (int64_t c = 0; c < kC; ++c) {
    SCOPED_TRACE(rank_tag() + ", channel " + std::to_string(c));
    if (rank == P - 1) {
      EXPECT_FLOAT_EQ(buf.y[c], buf.st.bias[c]) << "y";
    }
    EXPECT_FLOAT_EQ(buf.save_mean[c], last.x[c]) << "save_mean";
    EXPECT_NEAR(buf.save_invstd[c], 1.0 / std::sqrt(1e-5), 1e-2) << "save_invstd";
  }
  expect_plan_still_works(plan.get(), Op::kForward);
}

// ---- split ----------------------------------------------------------------------------------

// A group size that does not divide the world, or is not positive: INVALID_ARGUMENT everywhere.
TEST(Split, BadGroupSizeFailsEverywhere) {
  const int P = world_size();
  CommHandle comm = world_comm();
  const int not_dividing = P == 4 ? 3 : P == 3 ? 2 : P + 1;
  for (int k : {not_dividing, 0, -1}) {
    syncbn_comm_t sub = nullptr;
    const syncbn_status_t s = syncbn_comm_split(comm.get(), k, &sub);
    CommHandle owned(s == SYNCBN_SUCCESS ? sub : nullptr);
    EXPECT_EQ(s, SYNCBN_ERROR_INVALID_ARGUMENT)
        << rank_tag() << ", split(" << k << ") of " << P << ": " << syncbn_last_error();
  }
  syncbn_comm_t one = nullptr;
  EXPECT_EQ(syncbn_comm_split(comm.get(), 1, &one), SYNCBN_SUCCESS) << rank_tag();
  CommHandle owned(one);
}

// Ranks passing different (each valid) group sizes: INVALID_ARGUMENT everywhere.
TEST(Split, DisagreeingGroupSizesFailEverywhere) {
  const int P = world_size();
  if (P < 2) GTEST_SKIP() << "needs 2 or more ranks";
  CommHandle comm = world_comm();
  const int k = world_rank() == 0 ? 1 : P;
  syncbn_comm_t sub = nullptr;
  const syncbn_status_t s = syncbn_comm_split(comm.get(), k, &sub);
  CommHandle owned(s == SYNCBN_SUCCESS ? sub : nullptr);
  EXPECT_EQ(s, SYNCBN_ERROR_INVALID_ARGUMENT) << rank_tag() << ", split(" << k << ")";
  PlanHandle plan = make_plan(comm.get(), default_config());
  expect_plan_still_works(plan.get(), Op::kForward);
}

// Groups are independent: a bad argument in one group fails that group only.
TEST(Split, ErrorStaysInItsGroup) {
  const int P = world_size(), rank = world_rank();
  if (P < 4 || P % 2 != 0) GTEST_SKIP() << "needs an even world of 4 or more ranks";
  CommHandle world = world_comm();
  syncbn_comm_t s = nullptr;
  EXPECT_EQ(syncbn_comm_split(world.get(), 2, &s), SYNCBN_SUCCESS) << rank_tag();
  CommHandle pairs(s);
  PlanHandle plan = make_plan(pairs.get(), default_config());
  CallBuffers buf = rank_buffers();
  CallArgs args = buf.args(plan.get());
  if (rank == P - 1) args.weight = nullptr;
  const bool in_bad_group = rank / 2 == (P - 1) / 2;
  EXPECT_EQ(call(Op::kForward, args),
            in_bad_group ? SYNCBN_ERROR_INVALID_ARGUMENT : SYNCBN_SUCCESS)
      << rank_tag() << ": " << syncbn_last_error();
  if (in_bad_group) {
    EXPECT_TRUE(message_names({"weight"}));
  }
  CallBuffers again = rank_buffers();
  EXPECT_EQ(call(Op::kForward, again.args(plan.get())), SYNCBN_SUCCESS)
      << rank_tag() << ": " << syncbn_last_error();
}

// ---- divergent call sequences ----------------------------------------------------------------

// Rank 1 makes another call than its peers. A parameterized suite, so that it runs after the
// plain TESTs and the suites above (a library that hangs here loses no other result). After the
// mismatch the test stops using its plans. (A rank in eval mode while its peers train makes no
// collective at all, so it is not a mismatch this check can see: its peers wait.)
enum class Divergence {
  kForwardMeetsBackward,      // rank 1 skips a forward and goes straight to backward
  kAnotherPlanSameConfig,     // rank 1 calls another layer's forward (same configuration)
  kAnotherPlanOtherEps,       // ... a layer that differs in eps only (same buffer size)
  kAnotherPlanAfterGoodStep,  // after one good step: rank 1 calls B's first, peers A's second
};

void PrintTo(Divergence d, std::ostream* os) { *os << static_cast<int>(d); }

class CallMismatch : public ::testing::TestWithParam<Divergence> {};

TEST_P(CallMismatch, FailsEveryRankThatTookPart) {
  if (world_size() < 2) GTEST_SKIP() << "needs 2 or more ranks";
  const Divergence d = GetParam();
  const bool odd_one = world_rank() == 1;
  CommHandle comm = world_comm();
  syncbn_config_t cfg_a = default_config();
  syncbn_config_t cfg_b = cfg_a;
  if (d == Divergence::kAnotherPlanOtherEps) cfg_b.eps = 1e-3;
  PlanHandle a = make_plan(comm.get(), cfg_a);
  PlanHandle b = make_plan(comm.get(), cfg_b);
  if (d == Divergence::kAnotherPlanAfterGoodStep) expect_plan_still_works(a.get(), Op::kForward);

  Op op = Op::kForward;
  syncbn_plan_t plan = a.get();
  switch (d) {
    case Divergence::kForwardMeetsBackward:
      if (odd_one) op = Op::kBackward;
      break;
    default:
      if (odd_one) plan = b.get();
      break;
  }
  CallBuffers buf = rank_buffers();
  const CallBuffers before = buf;
  EXPECT_EQ(call(op, buf.args(plan)), SYNCBN_ERROR_CALL_MISMATCH)
      << rank_tag() << ", " << op_name(op) << ": " << syncbn_last_error();
  EXPECT_TRUE(buf.unchanged_since(before)) << rank_tag();
}

INSTANTIATE_TEST_SUITE_P(All, CallMismatch,
                         ::testing::Values(Divergence::kForwardMeetsBackward,
                                           Divergence::kAnotherPlanSameConfig,
                                           Divergence::kAnotherPlanOtherEps,
                                           Divergence::kAnotherPlanAfterGoodStep),
                         [](const ::testing::TestParamInfo<Divergence>& info) {
                           switch (info.param) {
                             case Divergence::kForwardMeetsBackward: return "ForwardMeetsBackward";
                             case Divergence::kAnotherPlanSameConfig: return "AnotherPlanSameConfig";
                             case Divergence::kAnotherPlanOtherEps: return "AnotherPlanOtherEps";
                             case Divergence::kAnotherPlanAfterGoodStep:
                               return "AnotherPlanAfterGoodStep";
                           }
                           return "unknown";
                         });

}  // namespace
