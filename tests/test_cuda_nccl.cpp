// Multi-process GPU tests over the NCCL communicator, one GPU per rank: the NCCL communicator is
// bootstrapped once from MPI with syncbn_nccl_comm_init_mpi (which makes device local_rank
// current) and shared by the tests. Registered by ctest at the rank
// counts of SYNCBN_TEST_NCCL_RANKS (default 1: one GPU); at more ranks than a node has GPUs the
// tests skip (NCCL needs a GPU per rank).
//
//   - outputs against the fp64 reference over the global batch (tests/scenarios.hpp);
//   - failures the group only finds on the device (an empty global batch, m == 1 with tracking,
//     another rank's bad argument): the call returns SYNCBN_SUCCESS, syncbn_plan_get_async_error
//     reports the status (once), running statistics and num_batches_tracked are untouched and
//     the outputs are NaN;
//   - forward + backward captured in a CUDA graph and replayed, against eager steps;
//   - calls never wait for their stream.
// Without a GPU, syncbn_nccl_comm_init_mpi fails on every rank.
#include <gtest/gtest.h>
#include <mpi.h>
#include <nccl.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "cuda_helpers.hpp"
#include "cuda_scenarios.hpp"
#include "mpi_helpers.hpp"
#include "reference.hpp"
#include "scenarios.hpp"
#include "syncbn/syncbn.h"
#include "syncbn/syncbn_mpi.h"
#include "syncbn/syncbn_nccl.h"
#include "syncbn/syncbn_nccl_mpi.h"

namespace {

using namespace syncbn_test;

constexpr double kCumulative = SYNCBN_MOMENTUM_CUMULATIVE;
const syncbn_dtype_t kAllDtypes[] = {SYNCBN_FLOAT32, SYNCBN_FLOAT64, SYNCBN_FLOAT16,
                                     SYNCBN_BFLOAT16};

// ---- the shared NCCL communicator ---------------------------------------------------------------

ncclComm_t g_nccl = nullptr;
bool g_nccl_tried = false;
int g_device = -1;

// Destroys the shared communicator at the end of RUN_ALL_TESTS (before MPI_Finalize).
class NcclEnvironment : public ::testing::Environment {
 public:
  void TearDown() override {
    if (g_nccl) (void)ncclCommDestroy(g_nccl);
    g_nccl = nullptr;
  }
};
[[maybe_unused]] ::testing::Environment* const kNcclEnvironment =
    ::testing::AddGlobalTestEnvironment(new NcclEnvironment);

// COLLECTIVE: whether two ranks of some node would be on one GPU, device local_rank % (the
// devices a rank sees) as syncbn_nccl_comm_init_mpi picks it, compared by UUID (so that ranks
// with a CUDA_VISIBLE_DEVICES of their own count as apart). The same answer on every rank.
bool some_node_shares_a_gpu() {
  MPI_Comm node = MPI_COMM_NULL;
  MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, world_rank(), MPI_INFO_NULL, &node);
  int local = 0, local_size = 1;
  MPI_Comm_rank(node, &local);
  MPI_Comm_size(node, &local_size);
  cudaUUID_t mine;
  std::memset(&mine, 0, sizeof mine);
  const int n = cuda_device_count();
  cudaDeviceProp prop{};
  if (n > 0 && cudaGetDeviceProperties(&prop, local % n) == cudaSuccess) {
    mine = prop.uuid;
  } else {
    (void)cudaGetLastError();
  }
  std::vector<cudaUUID_t> all(static_cast<size_t>(local_size));
  MPI_Allgather(&mine, static_cast<int>(sizeof mine), MPI_BYTE, all.data(),
                static_cast<int>(sizeof mine), MPI_BYTE, node);
  MPI_Comm_free(&node);
  bool shared = false;
  for (int i = 0; i < local_size; ++i) {
    if (i != local && std::memcmp(&all[static_cast<size_t>(i)], &mine, sizeof mine) == 0) {
      shared = true;
    }
  }
  return !on_every_rank(!shared);
}

// COLLECTIVE: NCCL can run here: every rank sees a GPU and no two ranks of a node share one.
// The same verdict on every rank.
bool nccl_usable(std::string* why) {
  const int n = cuda_device_count();
  if (!on_every_rank(n > 0)) {
    *why = "some rank sees no CUDA device";
    return false;
  }
  if (some_node_shares_a_gpu()) {
    *why = "two ranks of a node would share a GPU (NCCL needs one GPU per rank)";
    return false;
  }
  return true;
}

#define SKIP_UNLESS_NCCL_USABLE()                  \
  do {                                             \
    std::string why_;                              \
    if (!nccl_usable(&why_)) GTEST_SKIP() << why_; \
  } while (0)

// COLLECTIVE (the first time): the NCCL communicator over MPI_COMM_WORLD, made by
// syncbn_nccl_comm_init_mpi; makes its device current. NULL (on every rank) if that failed.
ncclComm_t world_nccl() {
  if (!g_nccl_tried) {
    g_nccl_tried = true;
    int local_rank = -1;
    const syncbn_status_t s = syncbn_nccl_comm_init_mpi(MPI_COMM_WORLD, &g_nccl, &local_rank);
    EXPECT_EQ(s, SYNCBN_SUCCESS) << rank_tag()
                                 << ": syncbn_nccl_comm_init_mpi: " << syncbn_last_error();
    if (s != SYNCBN_SUCCESS) g_nccl = nullptr;
    const int want_local = node_local_rank();
    EXPECT_EQ(local_rank, want_local) << rank_tag() << ": local_rank";
    int dev = -1;
    SYNCBN_CUDA_EXPECT(cudaGetDevice(&dev));
    const int n = cuda_device_count();
    if (n > 0) {
      EXPECT_EQ(dev, want_local % n) << rank_tag() << ": current device after init";
    }
    g_device = dev;
    if (g_nccl) {
      int nr = -1, r = -1;
      EXPECT_EQ(ncclCommCount(g_nccl, &nr), ncclSuccess);
      EXPECT_EQ(ncclCommUserRank(g_nccl, &r), ncclSuccess);
      EXPECT_EQ(nr, world_size()) << rank_tag();
      EXPECT_EQ(r, world_rank()) << rank_tag();
    }
  }
  if (g_device >= 0) SYNCBN_CUDA_EXPECT(cudaSetDevice(g_device));
  return g_nccl;
}

// COLLECTIVE: a library communicator over the shared NCCL communicator; NULL (on every rank) if
// there is none.
CommHandle nccl_world_comm() {
  ncclComm_t nc = world_nccl();
  syncbn_comm_t c = nullptr;
  if (nc) {
    EXPECT_EQ(syncbn_comm_create_nccl(nc, &c), SYNCBN_SUCCESS)
        << rank_tag() << ": " << syncbn_last_error();
  }
  if (!on_every_rank(c != nullptr)) {
    syncbn_comm_destroy(c);
    return CommHandle();
  }
  int r = -1, sz = -1;
  EXPECT_EQ(syncbn_comm_rank(c, &r), SYNCBN_SUCCESS);
  EXPECT_EQ(syncbn_comm_size(c, &sz), SYNCBN_SUCCESS);
  EXPECT_EQ(r, world_rank());
  EXPECT_EQ(sz, world_size());
  return CommHandle(c);
}

// ---- without a GPU, and argument checks -------------------------------------------------------

TEST(CudaNcclNoDevice, InitFailsOnEveryRank) {
  if (!no_rank_has_cuda()) GTEST_SKIP() << "a rank sees a CUDA device";
  ncclComm_t nc = nullptr;
  int local_rank = -1;
  EXPECT_EQ(syncbn_nccl_comm_init_mpi(MPI_COMM_WORLD, &nc, &local_rank),
            SYNCBN_ERROR_INVALID_ARGUMENT)
      << rank_tag() << ": " << syncbn_last_error();
  EXPECT_TRUE(message_names({"rank"}));
}

// Two ranks of a node on one GPU (more ranks than GPUs; NCCL would reject them): every rank
// fails before NCCL is called, the message naming a rank. Runs where every rank sees a GPU and
// some node is oversubscribed (e.g. ctest's cuda_nccl.np2 on a one-GPU machine); ranks with a
// CUDA_VISIBLE_DEVICES of their own are apart and skip it.
TEST(CudaNcclInit, MoreRanksThanGpusFailsOnEveryRank) {
  const int n = cuda_device_count();
  if (!on_every_rank(n > 0)) GTEST_SKIP() << "some rank sees no CUDA device";
  if (!some_node_shares_a_gpu()) GTEST_SKIP() << "no two ranks of a node share a GPU";
  ncclComm_t nc = nullptr;
  EXPECT_EQ(syncbn_nccl_comm_init_mpi(MPI_COMM_WORLD, &nc, nullptr), SYNCBN_ERROR_INVALID_ARGUMENT)
      << rank_tag() << ": " << syncbn_last_error();
  EXPECT_EQ(nc, nullptr);
  EXPECT_TRUE(message_names({"rank"}));
}

// Arguments every rank gets wrong alike (no device needed).
TEST(CudaNcclArgs, NullArguments) {
  syncbn_comm_t c = nullptr;
  EXPECT_EQ(syncbn_comm_create_nccl(nullptr, &c), SYNCBN_ERROR_INVALID_ARGUMENT) << rank_tag();
  EXPECT_EQ(c, nullptr);
  EXPECT_EQ(syncbn_nccl_comm_init_mpi(MPI_COMM_WORLD, nullptr, nullptr),
            SYNCBN_ERROR_INVALID_ARGUMENT)
      << rank_tag();
  ncclComm_t nc = nullptr;
  EXPECT_EQ(syncbn_nccl_comm_init_mpi(MPI_COMM_NULL, &nc, nullptr), SYNCBN_ERROR_INVALID_ARGUMENT)
      << rank_tag();
}

// ---- outputs against the reference over the global batch ---------------------------------------

class CudaNcclCorrectness : public ::testing::TestWithParam<CudaScenarioParam> {};

TEST_P(CudaNcclCorrectness, MatchesReferenceOverGlobalBatch) {
  const auto& [dtype, layout, sc] = GetParam();
  SKIP_UNLESS_NCCL_USABLE();
  std::string why;
  if (!split_fits(world_size(), sc.group_size, &why)) GTEST_SKIP() << why;
  CommHandle world = nccl_world_comm();
  if (!world) return;
  run_cuda_scenario(dtype, layout, sc, world.get());
}

INSTANTIATE_TEST_SUITE_P(All, CudaNcclCorrectness,
                         ::testing::Combine(::testing::ValuesIn(kAllDtypes),
                                            ::testing::Values(SYNCBN_CHANNELS_FIRST,
                                                              SYNCBN_CHANNELS_LAST),
                                            ::testing::ValuesIn(scenarios())),
                         cuda_scenario_param_name);

// ---- errors found on the device ----------------------------------------------------------------

// COLLECTIVE: a valid step on every rank succeeds afterwards (nothing is stuck, the call
// sequences are aligned) and counts one batch.
template <class S>
void expect_plan_still_works(syncbn_plan_t plan, void* stream) {
  RankCall<S> ok(2 + world_rank(), {});
  EXPECT_EQ(ok.forward(plan, stream), SYNCBN_SUCCESS) << syncbn_last_error();
  EXPECT_EQ(ok.backward(plan, stream), SYNCBN_SUCCESS) << syncbn_last_error();
  EXPECT_EQ(async_error(plan, stream), SYNCBN_SUCCESS) << syncbn_last_error();
  EXPECT_EQ(ok.dev.download().num_batches_tracked, ok.st.num_batches_tracked + 1);
  for (double v : download_double(ok.y))
    if (!std::isfinite(v)) {
      ADD_FAILURE() << rank_tag() << ": y of a valid step after a failed one is " << v;
      break;
    }
}

class CudaNcclAsyncErrors : public ::testing::TestWithParam<syncbn_dtype_t> {};

// N = 0 on every rank: forward_training and backward return SYNCBN_SUCCESS (the host cannot know
// the global count), syncbn_plan_get_async_error reports SYNCBN_ERROR_BATCH_TOO_SMALL once (then
// nothing), running statistics and num_batches_tracked are untouched, and save_mean,
// save_invstd, dweight, dbias are NaN.
TEST_P(CudaNcclAsyncErrors, EmptyGlobalBatch) {
  SKIP_UNLESS_NCCL_USABLE();
  CommHandle world = nccl_world_comm();
  if (!world) return;
  const syncbn_dtype_t dtype = GetParam();
  dispatch_cuda_dtype(dtype, [&](auto tag) {
    using S = decltype(tag);
    PlanHandle plan = make_cuda_plan(world.get(), dtype);
    Stream stream;
    SCOPED_TRACE(rank_tag());
    RankCall<S> rc(0, {});
    EXPECT_EQ(rc.forward(plan.get(), stream.handle()), SYNCBN_SUCCESS) << syncbn_last_error();
    EXPECT_EQ(async_error(plan.get(), stream.handle()), SYNCBN_ERROR_BATCH_TOO_SMALL);
    EXPECT_FALSE(std::string(syncbn_last_error()).empty()) << "no message for the async error";
    EXPECT_EQ(async_error(plan.get(), stream.handle()), SYNCBN_SUCCESS)
        << "the error is reported once";
    EXPECT_TRUE(state_unchanged("after an empty global batch", rc.dev, rc.st));
    EXPECT_TRUE(all_nan("save_mean after a failed forward", to_double(rc.sm.download())));
    EXPECT_TRUE(all_nan("save_invstd after a failed forward", to_double(rc.si.download())));

    EXPECT_EQ(rc.backward(plan.get(), stream.handle()), SYNCBN_SUCCESS) << syncbn_last_error();
    EXPECT_EQ(async_error(plan.get(), stream.handle()), SYNCBN_ERROR_BATCH_TOO_SMALL);
    EXPECT_EQ(async_error(plan.get(), stream.handle()), SYNCBN_SUCCESS);
    EXPECT_TRUE(all_nan("dweight after a failed backward", to_double(rc.dw.download())));
    EXPECT_TRUE(all_nan("dbias after a failed backward", to_double(rc.db.download())));
    EXPECT_TRUE(state_unchanged("after an empty backward", rc.dev, rc.st));

    expect_plan_still_works<S>(plan.get(), stream.handle());
  });
}

// One value in the global batch with tracking (shape (1, C) on rank 0, (0, C) elsewhere):
// SYNCBN_SUCCESS from the call, SYNCBN_ERROR_BATCH_TOO_SMALL asynchronously, y NaN on rank 0,
// save_* NaN everywhere, running statistics and num_batches_tracked untouched.
TEST_P(CudaNcclAsyncErrors, OneValueWithTracking) {
  SKIP_UNLESS_NCCL_USABLE();
  CommHandle world = nccl_world_comm();
  if (!world) return;
  const syncbn_dtype_t dtype = GetParam();
  dispatch_cuda_dtype(dtype, [&](auto tag) {
    using S = decltype(tag);
    PlanHandle plan = make_cuda_plan(world.get(), dtype);
    Stream stream;
    SCOPED_TRACE(rank_tag());
    RankCall<S> rc(world_rank() == 0 ? 1 : 0, {});
    EXPECT_EQ(rc.forward(plan.get(), stream.handle()), SYNCBN_SUCCESS) << syncbn_last_error();
    EXPECT_EQ(async_error(plan.get(), stream.handle()), SYNCBN_ERROR_BATCH_TOO_SMALL);
    EXPECT_TRUE(state_unchanged("after a batch of one value", rc.dev, rc.st));
    EXPECT_TRUE(all_nan("y after a failed forward", download_double(rc.y)));
    EXPECT_TRUE(all_nan("save_mean after a failed forward", to_double(rc.sm.download())));
    EXPECT_TRUE(all_nan("save_invstd after a failed forward", to_double(rc.si.download())));
    expect_plan_still_works<S>(plan.get(), stream.handle());
  });
}

// The last rank passes a null weight. That rank's call returns SYNCBN_ERROR_INVALID_ARGUMENT
// itself (and it is not reported again asynchronously); the others' calls return SYNCBN_SUCCESS
// and syncbn_plan_get_async_error reports SYNCBN_ERROR_INVALID_ARGUMENT naming the bad rank and
// the argument, with y and save_* NaN. Running statistics are untouched on every rank.
TEST_P(CudaNcclAsyncErrors, BadArgumentOnLastRank) {
  SKIP_UNLESS_NCCL_USABLE();
  CommHandle world = nccl_world_comm();
  if (!world) return;
  const syncbn_dtype_t dtype = GetParam();
  const int bad = world_size() - 1;
  const bool me_bad = world_rank() == bad;
  dispatch_cuda_dtype(dtype, [&](auto tag) {
    using S = decltype(tag);
    PlanHandle plan = make_cuda_plan(world.get(), dtype);
    Stream stream;
    SCOPED_TRACE(rank_tag() + ", bad rank " + std::to_string(bad));
    RankCall<S> rc(2 + world_rank(), {});
    const syncbn_status_t s = rc.forward(plan.get(), stream.handle(), me_bad);
    if (me_bad) {
      EXPECT_EQ(s, SYNCBN_ERROR_INVALID_ARGUMENT) << syncbn_last_error();
      EXPECT_TRUE(message_names({"weight"}));
      EXPECT_EQ(async_error(plan.get(), stream.handle()), SYNCBN_SUCCESS)
          << "an error the call returned is reported again asynchronously: " << syncbn_last_error();
    } else {
      EXPECT_EQ(s, SYNCBN_SUCCESS) << syncbn_last_error();
      EXPECT_EQ(async_error(plan.get(), stream.handle()), SYNCBN_ERROR_INVALID_ARGUMENT);
      EXPECT_TRUE(message_names({"rank " + std::to_string(bad), "weight"}));
      EXPECT_TRUE(all_nan("y after a failed forward", download_double(rc.y)));
      EXPECT_TRUE(all_nan("save_mean after a failed forward", to_double(rc.sm.download())));
      EXPECT_TRUE(all_nan("save_invstd after a failed forward", to_double(rc.si.download())));
    }
    EXPECT_TRUE(state_unchanged("after a rejected call", rc.dev, rc.st));
    expect_plan_still_works<S>(plan.get(), stream.handle());
  });
}

INSTANTIATE_TEST_SUITE_P(All, CudaNcclAsyncErrors, ::testing::ValuesIn(kAllDtypes),
                         [](const ::testing::TestParamInfo<syncbn_dtype_t>& info) {
                           return std::string(dtype_name(info.param));
                         });

// ---- CUDA graphs
// ---------------------------------------------------------------------------------

// forward_training + backward over NCCL (the allreduce included) captured once in thread-local
// mode, replayed 10 times with new data each time: every step equals the eager step (and, in a
// group of one, the CPU plan's); num_batches_tracked reaches 10 (cuda_helpers.hpp).
using GraphParam = std::tuple<double, std::tuple<syncbn_dtype_t, syncbn_layout_t>>;
class CudaNcclGraph : public ::testing::TestWithParam<GraphParam> {};

TEST_P(CudaNcclGraph, ReplayMatchesEagerSteps) {
  SKIP_UNLESS_NCCL_USABLE();
  CommHandle world = nccl_world_comm();
  if (!world) return;
  GraphCheck o;
  o.mode = cudaStreamCaptureModeThreadLocal;
  o.momentum = std::get<0>(GetParam());
  o.layout = std::get<1>(std::get<1>(GetParam()));
  o.seed = test_seed();
  o.rank = world_rank();
  o.steps = 10;
  o.compare_with_cpu = world_size() == 1;
  o.all_agree = [](bool ok) { return on_every_rank(ok); };
  dispatch_cuda_dtype(std::get<0>(std::get<1>(GetParam())),
                      [&](auto tag) { check_graph_replay<decltype(tag)>(world.get(), o); });
}

INSTANTIATE_TEST_SUITE_P(
    All, CudaNcclGraph,
    ::testing::Combine(::testing::Values(0.1, kCumulative),
                       ::testing::Values(std::make_tuple(SYNCBN_FLOAT32, SYNCBN_CHANNELS_FIRST),
                                         std::make_tuple(SYNCBN_BFLOAT16, SYNCBN_CHANNELS_LAST))),
    [](const ::testing::TestParamInfo<GraphParam>& info) {
      const auto dl = std::get<1>(info.param);
      return std::string(is_cumulative(std::get<0>(info.param)) ? "cumulative" : "m0p1") + "_" +
             dtype_name(std::get<0>(dl)) + "_" + layout_name(std::get<1>(dl));
    });

// An empty batch on the last rank inside a captured step (N = 0 there, 3 or 4 elsewhere): every
// replay equals the eager step, bit for bit. Needs two ranks (one GPU each).
TEST(CudaNcclGraph, EmptyBatchOnOneRankReplaysBitwise) {
  SKIP_UNLESS_NCCL_USABLE();
  if (world_size() < 2) GTEST_SKIP() << "needs two ranks";
  CommHandle world = nccl_world_comm();
  if (!world) return;
  GraphCheck o;
  o.mode = cudaStreamCaptureModeThreadLocal;
  o.seed = test_seed();
  o.rank = world_rank();
  o.steps = 4;
  o.compare_with_cpu = false;
  o.all_agree = [](bool ok) { return on_every_rank(ok); };
  const int last = world_size() - 1;
  o.batch = [last](int rank) { return rank == last ? int64_t{0} : int64_t{3} + rank % 2; };
  o.bitwise = true;
  check_graph_replay<float>(world.get(), o);
}

// ---- the call sequence counted on the device ---------------------------------------------------

// Two plans P and Q of the same shape (so that their allreduces have the same length). Rank 0
// calls P twice; the others call Q, then P. The first allreduce pairs P's call #0 with Q's
// (another plan), the second P's call #1 with P's call #0 (another call of the sequence, which
// only the counter on the device can tell): every failed call is reported by
// syncbn_plan_get_async_error as SYNCBN_ERROR_CALL_MISMATCH, and nothing is updated.
TEST(CudaNcclCallMismatch, TheDeviceCounterCatchesASkippedCall) {
  SKIP_UNLESS_NCCL_USABLE();
  if (world_size() < 2) GTEST_SKIP() << "needs two ranks";
  CommHandle world = nccl_world_comm();
  if (!world) return;
  PlanHandle p = make_cuda_plan(world.get(), SYNCBN_FLOAT32);
  PlanHandle q = make_cuda_plan(world.get(), SYNCBN_FLOAT32);
  if (!on_every_rank(p && q)) return;
  Stream stream;
  SCOPED_TRACE(rank_tag());
  RankCall<float> first(3, {4}), second(3, {4});
  const bool zero = world_rank() == 0;
  EXPECT_EQ(first.forward(zero ? p.get() : q.get(), stream.handle()), SYNCBN_SUCCESS)
      << syncbn_last_error();
  EXPECT_EQ(second.forward(p.get(), stream.handle()), SYNCBN_SUCCESS) << syncbn_last_error();
  EXPECT_EQ(async_error(p.get(), stream.handle()), SYNCBN_ERROR_CALL_MISMATCH);
  EXPECT_TRUE(message_names({"call mismatch"}));
  EXPECT_EQ(async_error(q.get(), stream.handle()),
            zero ? SYNCBN_SUCCESS : SYNCBN_ERROR_CALL_MISMATCH);
  EXPECT_TRUE(state_unchanged("after a mismatched first call", first.dev, first.st));
  EXPECT_TRUE(state_unchanged("after a mismatched second call", second.dev, second.st));
  EXPECT_TRUE(all_nan("save_mean of the mismatched call", to_double(second.sm.download())));
}

// ---- CPU plans on an NCCL communicator ------------------------------------------------------------

// A CPU plan whose packed buffer (2C + 18 doubles) is larger than the NCCL communicator's
// staging at creation (C = 300): creation makes room for it, and the statistics are the group's
// (every rank the same data here, so the group's mean is the local one).
TEST(CudaNcclCpuPlan, WideLayerOnHostData) {
  SKIP_UNLESS_NCCL_USABLE();
  CommHandle world = nccl_world_comm();
  if (!world) return;
  const int64_t C = 300;
  syncbn_config_t cfg;
  syncbn_config_init(&cfg, C, SYNCBN_FLOAT64);
  syncbn_plan_t raw = nullptr;
  EXPECT_EQ(syncbn_plan_create(world.get(), &cfg, &raw), SYNCBN_SUCCESS) << syncbn_last_error();
  PlanHandle plan(raw);
  if (!on_every_rank(plan != nullptr)) return;
  Rng common(test_seed());
  const Geometry g = make_geometry(SYNCBN_CHANNELS_FIRST, 2, C, {3});
  const std::vector<double> x = random_batch<double>(g, common);
  LayerState<double> st = LayerState<double>::random(C, common);
  const size_t n = static_cast<size_t>(g.numel()), c = static_cast<size_t>(C);
  std::vector<double> y(n), sm(c), si(c);
  const auto shape = g.shape();
  EXPECT_EQ(syncbn_forward_training(plan.get(), g.ndim(), shape.data(), x.data(),
                                    st.weight.data(), st.bias.data(), y.data(), sm.data(),
                                    si.data(), st.running_mean.data(), st.running_var.data(),
                                    &st.num_batches_tracked, nullptr),
            SYNCBN_SUCCESS)
      << rank_tag() << ": " << syncbn_last_error();
  double worst = 0;
  for (int64_t ch = 0; ch < C; ++ch) {  // channels-first (2, C, 3): 6 values a channel
    double mean = 0;
    for (int64_t i = 0; i < 2; ++i)
      for (int64_t k = 0; k < 3; ++k) mean += x[static_cast<size_t>((i * C + ch) * 3 + k)];
    mean /= 6;
    worst = std::max(worst, std::abs(sm[static_cast<size_t>(ch)] - mean) /
                                std::max(1.0, std::abs(mean)));
  }
  EXPECT_LT(worst, 1e-12) << rank_tag();
}

// ---- calls never wait for their stream ----------------------------------------------------------

// With each rank's stream held by a host function, forward_training and backward over NCCL
// return without waiting for it, and none of their work has run yet; released, the step
// completes and matches an ordinary step on the same batch. (After one warm-up step.)
TEST(CudaNcclStream, CallsDoNotWaitForTheStream) {
  SKIP_UNLESS_NCCL_USABLE();
  CommHandle world = nccl_world_comm();
  if (!world) return;
  PlanHandle plan = make_cuda_plan(world.get(), SYNCBN_FLOAT32);
  Stream stream, peek;
  RankCall<float> rc(64 + world_rank(), {});
  const size_t n = static_cast<size_t>(rc.g.numel());
  EXPECT_EQ(rc.forward(plan.get(), stream.handle()), SYNCBN_SUCCESS) << syncbn_last_error();
  EXPECT_EQ(rc.backward(plan.get(), stream.handle()), SYNCBN_SUCCESS) << syncbn_last_error();
  EXPECT_EQ(async_error(plan.get(), stream.handle()), SYNCBN_SUCCESS);
  const std::vector<double> y_first = to_double(rc.y.download());
  const std::vector<double> dx_first = to_double(rc.dx.download());
  const std::vector<float> sentinel(n, -777.f);
  rc.y.upload(sentinel);
  rc.dx.upload(sentinel);
  const int64_t nbt_before = rc.dev.download().num_batches_tracked;

  float* pinned = nullptr;
  SYNCBN_CUDA_EXPECT(cudaMallocHost(reinterpret_cast<void**>(&pinned), n * sizeof(float)));
  StreamGate gate;
  SYNCBN_CUDA_EXPECT(cudaLaunchHostFunc(stream.get(), &StreamGate::wait, &gate));
  EXPECT_EQ(rc.forward(plan.get(), stream.handle()), SYNCBN_SUCCESS) << syncbn_last_error();
  EXPECT_EQ(rc.backward(plan.get(), stream.handle()), SYNCBN_SUCCESS) << syncbn_last_error();
  EXPECT_FALSE(gate.gave_up.load())
      << rank_tag() << ": the calls returned only after the held stream gave up: they waited";
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  if (pinned) {
    for (const auto* a : {&rc.y, &rc.dx}) {
      SYNCBN_CUDA_EXPECT(cudaMemcpyAsync(pinned, a->data(), n * sizeof(float),
                                         cudaMemcpyDeviceToHost, peek.get()));
      peek.sync();
      EXPECT_TRUE(same_bytes("output while the stream is held",
                             std::vector<float>(pinned, pinned + n), sentinel))
          << rank_tag() << ": work of the calls ran before the work queued ahead of it";
    }
  }
  gate.open = true;
  EXPECT_EQ(async_error(plan.get(), stream.handle()), SYNCBN_SUCCESS);
  EXPECT_TRUE(gate.entered.load());
  if (pinned) SYNCBN_CUDA_EXPECT(cudaFreeHost(pinned));
  const auto y_now = to_double(rc.y.download()), dx_now = to_double(rc.dx.download());
  EXPECT_TRUE(all_close("y after release", y_now, y_first, normwise(1e-6, y_first)));
  EXPECT_TRUE(all_close("dx after release", dx_now, dx_first, normwise(1e-6, dx_first)));
  EXPECT_EQ(rc.dev.download().num_batches_tracked, nbt_before + 1);
}

}  // namespace
