// Multi-process GPU tests over the MPI communicator: every rank makes device
// (node-local rank) % (device count) current, so that at 2, 3, 4 ranks on a one-GPU machine
// several processes share the GPU. On every rank the outputs of CUDA plans (fp32, fp64, fp16,
// bf16; both layouts) equal the single-process fp64 reference over the concatenated global batch
// (tests/scenarios.hpp), with uneven N per rank and ranks with N = 0. An empty global batch
// (and m == 1 with tracking) fails in the call itself on every rank, as on the CPU, and changes
// nothing; so does one rank's bad argument.
//
// Every GPU test skips on every rank where some rank sees no CUDA device (decided collectively);
// the no-device behaviour is tested where no rank sees one. Run by ctest under mpiexec; the
// shared main (mpi_main.cpp) reduces the verdict.
#include <gtest/gtest.h>
#include <mpi.h>
#if __has_include(<mpi-ext.h>)
#include <mpi-ext.h>  // Open MPI: MPIX_CUDA_AWARE_SUPPORT, MPIX_Query_cuda_support
#endif

#include <cstdlib>

#include <string>
#include <tuple>
#include <vector>

#include "cuda_helpers.hpp"
#include "cuda_scenarios.hpp"
#include "mpi_helpers.hpp"
#include "reference.hpp"
#include "scenarios.hpp"
#include "syncbn/syncbn.h"
#include "syncbn/syncbn_mpi.h"

namespace {

using namespace syncbn_test;

const syncbn_dtype_t kAllDtypes[] = {SYNCBN_FLOAT32, SYNCBN_FLOAT64, SYNCBN_FLOAT16,
                                     SYNCBN_BFLOAT16};

// ctest's cuda_mpi_aware.npP runs this suite with SYNCBN_MPI_CUDA_AWARE=1, forcing the
// device-buffer exchange (MPI_Allreduce on device memory once the stream is done). That needs an
// MPI that takes device pointers: where this one says it does not (Open MPI's
// MPIX_Query_cuda_support), the GPU tests skip instead of handing MPI device memory.
bool forced_cuda_aware_without_support() {
  const char* env = std::getenv("SYNCBN_MPI_CUDA_AWARE");
  if (env == nullptr || std::string(env) != "1") return false;
#if defined(MPIX_CUDA_AWARE_SUPPORT) && MPIX_CUDA_AWARE_SUPPORT
  return MPIX_Query_cuda_support() != 1;
#else
  return true;
#endif
}

// In a TEST body, on every rank alike.
#define SKIP_UNLESS_EVERY_RANK_HAS_CUDA()                                        \
  do {                                                                           \
    if (!every_rank_has_cuda()) GTEST_SKIP() << "some rank sees no CUDA device"; \
    if (!on_every_rank(!forced_cuda_aware_without_support()))                    \
      GTEST_SKIP() << "SYNCBN_MPI_CUDA_AWARE=1, and this MPI is not CUDA-aware"; \
  } while (0)

// ---- without a GPU ----------------------------------------------------------------------------

// A CUDA plan on an MPI communicator where no device is usable: SYNCBN_ERROR_INVALID_ARGUMENT
// naming the device, on every rank (nobody is left waiting).
TEST(CudaMpiNoDevice, PlanCreateFailsOnEveryRank) {
  if (!no_rank_has_cuda()) GTEST_SKIP() << "a rank sees a CUDA device";
  CommHandle world = world_comm();
  for (syncbn_dtype_t dtype : kAllDtypes) {
    SCOPED_TRACE(std::string(dtype_name(dtype)) + ", " + rank_tag());
    syncbn_config_t cfg;
    syncbn_config_init(&cfg, 3, dtype);
    cfg.device = SYNCBN_DEVICE_CUDA;
    syncbn_plan_t plan = nullptr;
    EXPECT_EQ(syncbn_plan_create(world.get(), &cfg, &plan), SYNCBN_ERROR_INVALID_ARGUMENT)
        << syncbn_last_error();
    EXPECT_TRUE(message_names({"device"}));
    EXPECT_EQ(plan, nullptr);
    PlanHandle keep(plan);
  }
}

// ---- outputs against the reference over the global batch ---------------------------------------

class CudaMpiCorrectness : public ::testing::TestWithParam<CudaScenarioParam> {};

TEST_P(CudaMpiCorrectness, MatchesReferenceOverGlobalBatch) {
  const auto& [dtype, layout, sc] = GetParam();
  SKIP_UNLESS_EVERY_RANK_HAS_CUDA();
  std::string why;
  if (!split_fits(world_size(), sc.group_size, &why)) GTEST_SKIP() << why;
  select_device_for_rank();
  CommHandle world = world_comm();
  run_cuda_scenario(dtype, layout, sc, world.get());
}

INSTANTIATE_TEST_SUITE_P(All, CudaMpiCorrectness,
                         ::testing::Combine(::testing::ValuesIn(kAllDtypes),
                                            ::testing::Values(SYNCBN_CHANNELS_FIRST,
                                                              SYNCBN_CHANNELS_LAST),
                                            ::testing::ValuesIn(scenarios())),
                         cuda_scenario_param_name);

// ---- failures: returned by the call on every rank, nothing changed ------------------------------

class CudaMpiErrors : public ::testing::TestWithParam<syncbn_dtype_t> {};

// N = 0 on every rank (m == 0: forward and backward), then m == 1 with tracking (shape (1, C) on
// rank 0, (0, C) elsewhere): every rank's call returns SYNCBN_ERROR_BATCH_TOO_SMALL and changes
// nothing (outputs, running statistics, num_batches_tracked); no asynchronous error follows;
// afterwards a valid step succeeds everywhere (the call sequences are still aligned).
TEST_P(CudaMpiErrors, GlobalBatchTooSmallFailsInTheCall) {
  SKIP_UNLESS_EVERY_RANK_HAS_CUDA();
  select_device_for_rank();
  CommHandle world = world_comm();
  const syncbn_dtype_t dtype = GetParam();
  dispatch_cuda_dtype(dtype, [&](auto tag) {
    using S = decltype(tag);
    using P = typename CudaType<S>::Param;
    PlanHandle plan = make_cuda_plan(world.get(), dtype);
    Stream stream;
    {
      SCOPED_TRACE(rank_tag() + ": empty global batch");
      RankCall<S> rc(0, {5});
      EXPECT_EQ(rc.forward(plan.get(), stream.handle()), SYNCBN_ERROR_BATCH_TOO_SMALL)
          << syncbn_last_error();
      EXPECT_EQ(rc.backward(plan.get(), stream.handle()), SYNCBN_ERROR_BATCH_TOO_SMALL)
          << syncbn_last_error();
      EXPECT_EQ(async_error(plan.get(), stream.handle()), SYNCBN_SUCCESS)  // MPI: all sync
          << rank_tag() << ": " << syncbn_last_error();
      rc.expect_unchanged("after an empty global batch");
    }
    {
      SCOPED_TRACE(rank_tag() + ": one value in the global batch, tracking");
      const int64_t C = RankCall<S>::kC;
      const Geometry g = make_geometry(SYNCBN_CHANNELS_FIRST, world_rank() == 0 ? 1 : 0, C, {});
      const auto shape = g.shape();
      RankCall<S> rc(0, {5});
      Rng rng(test_seed());
      DeviceArray<S> x(to_storage<S>(random_batch<P>(g, rng)));
      const std::vector<S> y_before(static_cast<size_t>(g.numel()), CudaType<S>::from_double(-777));
      DeviceArray<S> y(y_before);
      EXPECT_EQ(syncbn_forward_training(plan.get(), g.ndim(), shape.data(), x.data(),
                                        rc.dev.weight.data(), rc.dev.bias.data(), y.data(),
                                        rc.sm.data(), rc.si.data(), rc.dev.running_mean.data(),
                                        rc.dev.running_var.data(),
                                        rc.dev.num_batches_tracked.data(), stream.handle()),
                SYNCBN_ERROR_BATCH_TOO_SMALL)
          << syncbn_last_error();
      EXPECT_EQ(async_error(plan.get(), stream.handle()), SYNCBN_SUCCESS)  // MPI: all sync
          << rank_tag() << ": " << syncbn_last_error();
      EXPECT_TRUE(same_bytes("y after m == 1", y.download(), y_before));
      rc.expect_unchanged("after m == 1");
    }
    {
      SCOPED_TRACE(rank_tag() + ": a valid step afterwards");
      RankCall<S> rc(2 + world_rank(), {5});
      EXPECT_EQ(rc.forward(plan.get(), stream.handle()), SYNCBN_SUCCESS) << syncbn_last_error();
      EXPECT_EQ(rc.backward(plan.get(), stream.handle()), SYNCBN_SUCCESS) << syncbn_last_error();
      EXPECT_EQ(async_error(plan.get(), stream.handle()), SYNCBN_SUCCESS)  // MPI: all sync
          << rank_tag() << ": " << syncbn_last_error();
      EXPECT_EQ(rc.dev.download().num_batches_tracked, rc.st.num_batches_tracked + 1);
      EXPECT_TRUE(same_as_rank0("running_mean", rc.dev.download().running_mean, MPI_COMM_WORLD));
    }
  });
}

// The last rank passes a null weight: every rank's call returns SYNCBN_ERROR_INVALID_ARGUMENT
// naming that rank and the argument, and nothing changes anywhere; then the plan still works.
TEST_P(CudaMpiErrors, BadArgumentOnLastRankFailsEverywhere) {
  SKIP_UNLESS_EVERY_RANK_HAS_CUDA();
  select_device_for_rank();
  CommHandle world = world_comm();
  const syncbn_dtype_t dtype = GetParam();
  const int bad = world_size() - 1;
  dispatch_cuda_dtype(dtype, [&](auto tag) {
    using S = decltype(tag);
    PlanHandle plan = make_cuda_plan(world.get(), dtype);
    Stream stream;
    SCOPED_TRACE(rank_tag() + ", bad rank " + std::to_string(bad));
    RankCall<S> rc(2 + world_rank(), {5});
    EXPECT_EQ(rc.forward(plan.get(), stream.handle(), world_rank() == bad),
              SYNCBN_ERROR_INVALID_ARGUMENT)
        << syncbn_last_error();
    EXPECT_TRUE(message_names({"rank " + std::to_string(bad), "weight"}));
    EXPECT_EQ(async_error(plan.get(), stream.handle()), SYNCBN_SUCCESS)  // MPI: all sync
        << rank_tag() << ": " << syncbn_last_error();
    rc.expect_unchanged("after a rejected call");
    EXPECT_EQ(rc.forward(plan.get(), stream.handle()), SYNCBN_SUCCESS) << syncbn_last_error();
    EXPECT_EQ(async_error(plan.get(), stream.handle()), SYNCBN_SUCCESS)  // MPI: all sync
        << rank_tag() << ": " << syncbn_last_error();
    EXPECT_EQ(rc.dev.download().num_batches_tracked, rc.st.num_batches_tracked + 1);
  });
}

INSTANTIATE_TEST_SUITE_P(All, CudaMpiErrors, ::testing::ValuesIn(kAllDtypes),
                         [](const ::testing::TestParamInfo<syncbn_dtype_t>& info) {
                           return std::string(dtype_name(info.param));
                         });

}  // namespace
