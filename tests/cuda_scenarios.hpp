// tests/cuda_scenarios.hpp: multi-process GPU tests' shared parts: which ranks have a GPU (decided
// collectively, so that all ranks skip together), the device of each rank, the correctness
// scenarios of scenarios.hpp on CUDA plans (the one runner, with device memory and the MPI
// processes as the ranks; the communicator is the caller's, MPI or NCCL; every call is followed
// by syncbn_plan_get_async_error, which synchronizes the stream and must report nothing), and
// one rank's buffers for the failure tests.
//
// Rule of the MPI tests (mpi_helpers.hpp): the sequence of collectives never depends on a check's
// outcome; checks between collectives are EXPECT_*, never ASSERT_*.
#ifndef SYNCBN_TESTS_CUDA_SCENARIOS_HPP
#define SYNCBN_TESTS_CUDA_SCENARIOS_HPP

#include <gtest/gtest.h>
#include <mpi.h>

#include <string>
#include <tuple>
#include <vector>

#include "cuda_helpers.hpp"
#include "mpi_helpers.hpp"
#include "reference.hpp"
#include "scenarios.hpp"
#include "syncbn/syncbn.h"

namespace syncbn_test {

// ---- ranks and devices ------------------------------------------------------------------------

// COLLECTIVE over MPI_COMM_WORLD: this rank's index among the ranks of its node, and their number.
inline int node_local_rank(int* local_size = nullptr) {
  MPI_Comm node = MPI_COMM_NULL;
  MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, world_rank(), MPI_INFO_NULL, &node);
  int r = 0, s = 1;
  MPI_Comm_rank(node, &r);
  MPI_Comm_size(node, &s);
  MPI_Comm_free(&node);
  if (local_size) *local_size = s;
  return r;
}

// COLLECTIVE: ok on every rank.
inline bool on_every_rank(bool ok) {
  int v = ok ? 1 : 0;
  MPI_Allreduce(MPI_IN_PLACE, &v, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  return v != 0;
}

// COLLECTIVE: every rank sees a CUDA device.
inline bool every_rank_has_cuda() { return on_every_rank(cuda_device_count() > 0); }

// COLLECTIVE: no rank sees a CUDA device.
inline bool no_rank_has_cuda() { return on_every_rank(cuda_device_count() == 0); }

// COLLECTIVE: makes device (node-local rank) % (device count) current, so that the ranks of a
// node share its GPUs round-robin (several ranks per GPU where there are more ranks than GPUs).
inline void select_device_for_rank() {
  const int local = node_local_rank();
  const int n = cuda_device_count();
  if (n > 0) SYNCBN_CUDA_EXPECT(cudaSetDevice(local % n));
}

// ---- the correctness scenarios (scenarios.hpp) on CUDA plans ----------------------------------

// Parameters of the correctness suites: dtype x layout x scenario, and their test names.
using CudaScenarioParam = std::tuple<syncbn_dtype_t, syncbn_layout_t, Scenario>;
inline std::string cuda_scenario_param_name(
    const ::testing::TestParamInfo<CudaScenarioParam>& info) {
  return scenario_name(std::get<2>(info.param), std::get<0>(info.param), std::get<1>(info.param));
}

// Runs a scenario on CUDA plans (device memory, DeviceMemory of cuda_helpers.hpp) over world,
// the MPI processes as the ranks, for the dtype of the test's parameter.
inline void run_cuda_scenario(syncbn_dtype_t dtype, syncbn_layout_t layout, const Scenario& sc,
                              syncbn_comm_t world) {
  const MpiRanks ranks;
  dispatch_cuda_dtype(dtype, [&](auto tag) {
    ScenarioRun<DeviceMemory<decltype(tag)>, MpiRanks>(sc, layout, world, ranks).run();
  });
}

// The buffers of one rank for a call on (n, C, *spatial) channels-first, C = 3: parameters and
// statistics from the test's seed (identical on every rank), data from seed and rank, outputs
// filled with a sentinel. Device memory throughout.
template <class S>
struct RankCall {
  using P = typename CudaType<S>::Param;
  static constexpr int64_t kC = 3;
  Geometry g;
  std::vector<int64_t> shape;
  LayerState<P> st;
  DeviceLayerState<P> dev;
  std::vector<S> out_n;
  std::vector<P> out_c;
  DeviceArray<S> x, dy, y, dx;
  DeviceArray<P> sm, si, dw, db;

  RankCall(int64_t n, std::vector<int64_t> spatial) {
    Rng common(test_seed());
    st = LayerState<P>::random(kC, common);
    dev = DeviceLayerState<P>(st);
    Rng local(test_seed() + 7919u * static_cast<uint32_t>(world_rank() + 1));
    g = make_geometry(SYNCBN_CHANNELS_FIRST, n, kC, spatial);
    shape = g.shape();
    x = DeviceArray<S>(to_storage<S>(random_batch<P>(g, local)));
    dy = DeviceArray<S>(to_storage<S>(random_batch<P>(g, local)));
    out_n.assign(static_cast<size_t>(g.numel()), CudaType<S>::from_double(-777));
    out_c.assign(static_cast<size_t>(kC), P(-777));
    y = DeviceArray<S>(out_n);
    dx = DeviceArray<S>(out_n);
    for (auto* a : {&sm, &si, &dw, &db}) *a = DeviceArray<P>(out_c);
  }

  syncbn_status_t forward(syncbn_plan_t plan, void* stream, bool null_weight = false) {
    return syncbn_forward_training(plan, g.ndim(), shape.data(), x.data(),
                                   null_weight ? nullptr : dev.weight.data(), dev.bias.data(),
                                   y.data(), sm.data(), si.data(), dev.running_mean.data(),
                                   dev.running_var.data(), dev.num_batches_tracked.data(), stream);
  }
  syncbn_status_t backward(syncbn_plan_t plan, void* stream) {
    return syncbn_backward(plan, g.ndim(), shape.data(), x.data(), dy.data(), dev.weight.data(),
                           sm.data(), si.data(), dx.data(), dw.data(), db.data(), stream);
  }

  // Outputs and state as they were before the failed call.
  void expect_unchanged(const std::string& when) const {
    EXPECT_TRUE(state_unchanged(when, dev, st));
    EXPECT_TRUE(same_bytes("y " + when, y.download(), out_n));
    EXPECT_TRUE(same_bytes("dx " + when, dx.download(), out_n));
    EXPECT_TRUE(same_bytes("save_mean " + when, sm.download(), out_c));
    EXPECT_TRUE(same_bytes("save_invstd " + when, si.download(), out_c));
    EXPECT_TRUE(same_bytes("dweight " + when, dw.download(), out_c));
    EXPECT_TRUE(same_bytes("dbias " + when, db.download(), out_c));
  }
};

// Synchronizes stream; the error the device recorded (SYNCBN_SUCCESS if none).
inline syncbn_status_t async_error(syncbn_plan_t plan, void* stream) {
  syncbn_status_t async = SYNCBN_ERROR_INTERNAL;
  EXPECT_EQ(syncbn_plan_get_async_error(plan, stream, &async), SYNCBN_SUCCESS)
      << rank_tag() << ": " << syncbn_last_error();
  return async;
}

// COLLECTIVE: a CUDA plan (C = 3, channels-first, tracking, momentum 0.1) on comm.
inline PlanHandle make_cuda_plan(syncbn_comm_t comm, syncbn_dtype_t dtype) {
  syncbn_config_t cfg;
  syncbn_config_init(&cfg, 3, dtype);
  cfg.device = SYNCBN_DEVICE_CUDA;
  syncbn_plan_t p = nullptr;
  EXPECT_EQ(syncbn_plan_create(comm, &cfg, &p), SYNCBN_SUCCESS)
      << rank_tag() << ": " << syncbn_last_error();
  return PlanHandle(p);
}

}  // namespace syncbn_test

#endif  // SYNCBN_TESTS_CUDA_SCENARIOS_HPP
