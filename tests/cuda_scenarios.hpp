// tests/cuda_scenarios.hpp: multi-process GPU tests' shared parts: which ranks have a GPU (decided
// collectively, so that all ranks skip together), the device of each rank, and the correctness
// scenario of test_mpi_correctness.cpp on CUDA plans: on every rank, y, dx, save_mean,
// save_invstd and the running statistics equal the single-process fp64 reference over the
// group's global batch (the concatenation of every rank's per-channel values), dweight / dbias
// the reference over the rank's own slice (or the group's, with global_param_grads), and the
// statistics are bitwise identical across the ranks of a group. The communicator is the caller's
// (MPI or NCCL); every call is followed by syncbn_plan_get_async_error, which synchronizes the
// stream and must report nothing.
//
// Rule of the MPI tests (mpi_helpers.hpp): the sequence of collectives never depends on a check's
// outcome; checks between collectives are EXPECT_*, never ASSERT_*.
#ifndef SYNCBN_TESTS_CUDA_SCENARIOS_HPP
#define SYNCBN_TESTS_CUDA_SCENARIOS_HPP

#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <ostream>
#include <string>
#include <tuple>
#include <vector>

#include "cuda_helpers.hpp"
#include "mpi_helpers.hpp"
#include "reference.hpp"
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

// ---- the correctness scenario
// --------------------------------------------------------------------

// The local batch of one rank at one step: N and the spatial sizes (C is the layer's).
struct RankBatch {
  int64_t n;
  std::vector<int64_t> spatial;
};

struct CudaScenario {
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
  bool default_stream = false;  // stream NULL (the legacy default stream) instead of our own
};

inline void PrintTo(const CudaScenario& sc, std::ostream* os) { *os << sc.name; }

// `steps` training steps (forward + backward), then one eval step, every output checked on every
// rank against the fp64 reference of the (already rounded) inputs, with the dtype's tolerances
// (cuda_helpers.hpp). Collectives are made unconditionally, in the same order on all ranks.
template <class S>
class CudaScenarioRun {
 public:
  using P = typename CudaType<S>::Param;

  // world: the library communicator over all ranks (MPI or NCCL); the current device is set.
  CudaScenarioRun(const CudaScenario& sc, syncbn_layout_t layout, syncbn_comm_t world)
      : sc_(sc),
        layout_(layout),
        world_(world),
        P_(world_size()),
        rank_(world_rank()),
        k_(sc.group_size ? sc.group_size : P_),
        group_(k_),
        rng_(test_seed()),
        dummy_(4) {}

  void run() {
    CommHandle sub;
    const syncbn_comm_t comm = scenario_comm(world_, sc_.group_size, sub);
    cfg_ = scenario_config(sc_, CudaType<S>::dtype, layout_);
    cfg_.device = SYNCBN_DEVICE_CUDA;
    syncbn_plan_t p = nullptr;
    EXPECT_EQ(syncbn_plan_create(comm, &cfg_, &p), SYNCBN_SUCCESS)
        << rank_tag() << ": " << syncbn_last_error();
    PlanHandle plan(p);

    const int64_t C = sc_.channels;
    st_ = LayerState<P>::random(C, rng_);  // identical on every rank
    ref_ = st_;
    dev_ = DeviceLayerState<P>(st_);
    dist_ = ChannelDistribution::random(C, rng_);
    nan_.assign(static_cast<size_t>(C), std::numeric_limits<P>::quiet_NaN());
    for (auto* a : {&ign_w_, &ign_b_, &ign_rm_, &ign_rv_}) *a = DeviceArray<P>(nan_);

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

  // Draws every rank's batch of this step (the same draws on every rank), rounded to S: keeps
  // this rank's slice and the group's per-channel values.
  void draw(int step, bool with_grad) {
    X_.clear();
    DY_.clear();
    for (int r = 0; r < P_; ++r) {
      const RankBatch b = sc_.batch(r, step);
      const Geometry g = make_geometry(layout_, b.n, sc_.channels, b.spatial);
      auto x = rounded_to<S>(random_batch<P>(g, rng_, dist_));
      auto dy = with_grad ? rounded_to<S>(random_batch<P>(g, rng_)) : std::vector<P>(x.size());
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
  S* data(const DeviceArray<S>& a) const {
    if (a.size() != 0) return a.data();
    return sc_.null_empty ? nullptr : dummy_.data();
  }
  const P* weight() const { return sc_.affine ? dev_.weight.data() : ign_w_.data(); }
  const P* bias() const { return sc_.affine ? dev_.bias.data() : ign_b_.data(); }
  std::vector<double> w_eff() const { return effective_weight(sc_.affine, st_.weight); }
  std::vector<double> b_eff() const { return effective_bias(sc_.affine, st_.bias); }
  void* stream() const { return sc_.default_stream ? nullptr : stream_.handle(); }

  // Waits for the call's work; the device must have recorded no error.
  void finish(syncbn_plan_t plan, const char* what) {
    syncbn_status_t async = SYNCBN_ERROR_INTERNAL;
    EXPECT_EQ(syncbn_plan_get_async_error(plan, stream(), &async), SYNCBN_SUCCESS)
        << what << ": " << syncbn_last_error();
    EXPECT_EQ(async, SYNCBN_SUCCESS) << what << ": asynchronous error " << syncbn_last_error();
    SYNCBN_CUDA_EXPECT(cudaStreamSynchronize(static_cast<cudaStream_t>(stream())));
  }

  void train_step(syncbn_plan_t plan, int step) {
    draw(step, true);
    SCOPED_TRACE("local batch " + g_.str());
    const size_t C = static_cast<size_t>(sc_.channels), n = x_.size();
    const BatchStats stats = batch_stats(X_, cfg_.eps);
    const auto shape = g_.shape();
    MPI_Comm gcomm = group_.comm();
    const S sentinel = CudaType<S>::from_double(-777);
    const std::vector<P> out_c(C, P(-777));

    // ---- forward
    DeviceArray<S> xd(to_storage<S>(x_), 0), yd(n);
    yd.fill(sentinel);
    DeviceArray<P> smd(out_c), sid(out_c);
    const std::vector<P> rm_before = dev_.running_mean.download();
    const syncbn_status_t fs = syncbn_forward_training(
        plan, g_.ndim(), shape.data(), data(xd), weight(), bias(), data(yd), smd.data(), sid.data(),
        sc_.track ? dev_.running_mean.data() : ign_rm_.data(),
        sc_.track ? dev_.running_var.data() : ign_rv_.data(),
        sc_.track ? dev_.num_batches_tracked.data() : nullptr, stream());
    EXPECT_EQ(fs, SYNCBN_SUCCESS) << syncbn_last_error();
    finish(plan, "forward_training");

    const std::vector<P> save_mean = smd.download(), save_invstd = sid.download();
    const auto y_want = normalize(g_, x_.data(), stats.mean, stats.invstd, w_eff(), b_eff());
    EXPECT_TRUE(all_close("y", download_double(yd), y_want, CudaType<S>::data));
    EXPECT_TRUE(
        all_close("save_mean", save_mean, stats.mean, scaled(CudaType<S>::stats, stats.abs_mean)));
    EXPECT_TRUE(all_close("save_invstd", save_invstd, stats.invstd, Tol{CudaType<S>::stats, {}}));
    EXPECT_TRUE(same_as_rank0("save_mean", save_mean, gcomm));
    EXPECT_TRUE(same_as_rank0("save_invstd", save_invstd, gcomm));
    if (sc_.track) {
      update_running(ref_, stats, sc_.momentum);
      const LayerState<P> now = dev_.download();
      std::vector<double> rm_scale;
      for (size_t c = 0; c < C; ++c)
        rm_scale.push_back(std::fabs(static_cast<double>(rm_before[c])) + stats.abs_mean[c]);
      EXPECT_TRUE(all_close("running_mean", now.running_mean, to_double(ref_.running_mean),
                            scaled(CudaType<S>::stats, rm_scale)));
      EXPECT_TRUE(all_close("running_var", now.running_var, to_double(ref_.running_var),
                            Tol{CudaType<S>::stats, {}}));
      EXPECT_EQ(now.num_batches_tracked, ref_.num_batches_tracked);
      EXPECT_TRUE(same_as_rank0("running_mean", now.running_mean, gcomm));
      EXPECT_TRUE(same_as_rank0("running_var", now.running_var, gcomm));
    } else {
      EXPECT_TRUE(same_bytes("running_mean (ignored)", ign_rm_.download(), nan_));
      EXPECT_TRUE(same_bytes("running_var (ignored)", ign_rv_.download(), nan_));
    }

    // ---- backward, from the statistics the forward saved
    const std::vector<double> mean = to_double(save_mean), invstd = to_double(save_invstd);
    const GradSums global = grad_sums(X_, DY_, mean);
    const GradSums local = grad_sums(gather(g_, x_.data()), gather(g_, dy_.data()), mean);
    const auto dx_want = grad_input(g_, x_.data(), dy_.data(), w_eff(), mean, invstd, global);
    DeviceArray<S> dyd(to_storage<S>(dy_), 0), dxd(n);
    dxd.fill(sentinel);
    DeviceArray<P> dwd(out_c), dbd(out_c);
    const syncbn_status_t bs = syncbn_backward(
        plan, g_.ndim(), shape.data(), data(xd), data(dyd), weight(), smd.data(), sid.data(),
        data(dxd), sc_.affine ? dwd.data() : nullptr, sc_.affine ? dbd.data() : nullptr, stream());
    EXPECT_EQ(bs, SYNCBN_SUCCESS) << syncbn_last_error();
    finish(plan, "backward");
    EXPECT_TRUE(all_close("dx", download_double(dxd), dx_want, CudaType<S>::data));

    // Collectives below run on every rank whatever the configuration.
    const std::vector<P> dweight = dwd.download(), dbias = dbd.download();
    const std::vector<double> dw_sum = sum_over_ranks(dweight, gcomm);
    const std::vector<double> db_sum = sum_over_ranks(dbias, gcomm);
    const ::testing::AssertionResult dw_same = same_as_rank0("dweight", dweight, gcomm);
    const ::testing::AssertionResult db_same = same_as_rank0("dbias", dbias, gcomm);
    if (!sc_.affine) return;
    const GradSums& mine = sc_.global_grads ? global : local;
    const char* kind = sc_.global_grads ? " (global)" : " (local)";
    EXPECT_TRUE(all_close(std::string("dweight") + kind, dweight, grad_weight(mine, invstd),
                          scaled(CudaType<S>::sums, grad_weight_scale(mine, invstd))));
    EXPECT_TRUE(all_close(std::string("dbias") + kind, dbias, mine.sum_g,
                          scaled(CudaType<S>::sums, mine.abs_g)));
    if (sc_.global_grads) {
      EXPECT_TRUE(dw_same) << "(global parameter gradients)";
      EXPECT_TRUE(db_same) << "(global parameter gradients)";
    } else {
      // The trainer's sum of the local gradients is the gradient of the global batch.
      EXPECT_TRUE(all_close("sum over ranks of dweight", dw_sum, grad_weight(global, invstd),
                            scaled(CudaType<S>::sums, grad_weight_scale(global, invstd))));
      EXPECT_TRUE(all_close("sum over ranks of dbias", db_sum, global.sum_g,
                            scaled(CudaType<S>::sums, global.abs_g)));
    }
  }

  // Eval, local either way: running statistics when tracked, else this rank's own batch
  // statistics; an empty local batch is a success with nothing to write.
  void eval_step(syncbn_plan_t plan) {
    draw(sc_.steps, false);
    SCOPED_TRACE("local batch " + g_.str());
    std::vector<double> mean, invstd;
    const LayerState<P> before = dev_.download();
    if (sc_.track) {
      mean = to_double(before.running_mean);
      invstd = eval_invstd(before.running_var, cfg_.eps);
    } else if (!x_.empty()) {
      const BatchStats stats = batch_stats(gather(g_, x_.data()), cfg_.eps);
      mean = stats.mean;
      invstd = stats.invstd;
    }
    const auto want = normalize(g_, x_.data(), mean, invstd, w_eff(), b_eff());
    DeviceArray<S> xd(to_storage<S>(x_), 0), yd(x_.size());
    yd.fill(CudaType<S>::from_double(-777));
    EXPECT_EQ(syncbn_forward_inference(
                  plan, g_.ndim(), g_.shape().data(), data(xd), weight(), bias(),
                  sc_.track ? dev_.running_mean.data() : ign_rm_.data(),
                  sc_.track ? dev_.running_var.data() : ign_rv_.data(), data(yd), stream()),
              SYNCBN_SUCCESS)
        << syncbn_last_error();
    finish(plan, "forward_inference");
    EXPECT_TRUE(all_close("eval y", download_double(yd), want, CudaType<S>::data));
    EXPECT_TRUE(state_unchanged("after eval", dev_, before));
  }

  CudaScenario sc_;
  syncbn_layout_t layout_;
  syncbn_comm_t world_;
  int P_, rank_, k_;
  TestGroup group_;
  Rng rng_;
  syncbn_config_t cfg_{};
  LayerState<P> st_, ref_;  // st_: the initial parameters (the library never changes them)
  DeviceLayerState<P> dev_;
  ChannelDistribution dist_;
  std::vector<P> nan_;
  DeviceArray<P> ign_w_, ign_b_, ign_rm_, ign_rv_;
  DeviceArray<S> dummy_;
  Stream stream_;
  // This step's local slice and the group's per-channel values.
  Geometry g_;
  std::vector<P> x_, dy_;
  ChannelValues X_, DY_;
};

// The scenarios both multi-process GPU suites run (MPI and NCCL communicators): uneven N per
// rank, ranks with N = 0 (NULL or valid pointers), different spatial sizes, affine and tracking
// off, cumulative momentum, global parameter gradients, subgroups, odd and wide channel counts,
// the legacy default stream.
inline const std::vector<CudaScenario>& cuda_scenarios() {
  static const std::vector<CudaScenario> list = {
      {"equal_0d",
       [](int, int) {
         return RankBatch{4, {}};
       }},
      {"equal_3d",
       [](int, int) {
         return RankBatch{2, {2, 2, 3}};
       }},
      {"uneven_n",
       [](int r, int) {
         return RankBatch{r + 1, {3, 2}};
       }},
      {"empty_rank1",
       [](int r, int) {
         return RankBatch{r == 1 ? 0 : 3, {5}};
       }},
      {"empty_rank1_null_pointers",
       [](int r, int) {
         return RankBatch{r == 1 ? 0 : 3, {5}};
       },
       0, true, true, 0.1, false, /*null_empty=*/true},
      {"only_rank0_has_data",
       [](int r, int) {
         return RankBatch{r == 0 ? 4 : 0, {2}};
       },
       0, true, true, 0.1, false, true},
      {"different_spatial",
       [](int r, int) {
         return RankBatch{2, {r + 2, 3}};
       }},
      {"no_affine_no_track",
       [](int r, int) {
         return RankBatch{r + 2, {4}};
       },
       0, false, false},
      {"no_affine_cumulative",
       [](int r, int) {
         return RankBatch{2, {r + 1, 2}};
       },
       0, false, true, SYNCBN_MOMENTUM_CUMULATIVE, false, false, 3},
      {"global_param_grads_empty_rank1",
       [](int r, int) {
         return RankBatch{r == 1 ? 0 : 2, {3}};
       },
       0, true, true, 0.1, true},
      {"split1",
       [](int r, int) {
         return RankBatch{r + 2, {3}};
       },
       1},
      {"split2",
       [](int, int) {
         return RankBatch{2, {3, 2}};
       },
       2},
      // Batch sizes change every step, some ranks empty at some steps (rank 0 never).
      {"six_steps_cumulative",
       [](int r, int s) {
         return RankBatch{r == 0 ? 1 + s % 2 : (r + s) % 3, {2, 2}};
       },
       0, true, true, SYNCBN_MOMENTUM_CUMULATIVE, false, false, 6},
      // Odd channel count and spatial size, an empty rank (vector-load tails).
      {"c129_odd_spatial",
       [](int r, int) {
         return RankBatch{r == 1 ? 0 : r + 1, {7, 7}};
       },
       0, true, true, 0.1, false, false, 2, 129},
      {"c1000_0d_default_stream",
       [](int r, int) {
         return RankBatch{r + 3, {}};
       },
       0, true, true, 0.1, false, false, 1, 1000, /*default_stream=*/true},
      {"one_channel_long_rows",
       [](int r, int) {
         return RankBatch{r + 1, {4099}};
       },
       0, true, true, 0.1, false, false, 2, 1},
  };
  return list;
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

// Parameters of the correctness suites: dtype x layout x scenario, and their test names.
using CudaScenarioParam = std::tuple<syncbn_dtype_t, syncbn_layout_t, CudaScenario>;
inline std::string cuda_scenario_param_name(
    const ::testing::TestParamInfo<CudaScenarioParam>& info) {
  return std::string(std::get<2>(info.param).name) + "_" + dtype_name(std::get<0>(info.param)) +
         "_" + layout_name(std::get<1>(info.param));
}

// Runs a scenario for the dtype of the test's parameter.
inline void run_cuda_scenario(syncbn_dtype_t dtype, syncbn_layout_t layout, const CudaScenario& sc,
                              syncbn_comm_t world) {
  dispatch_cuda_dtype(dtype,
                      [&](auto tag) { CudaScenarioRun<decltype(tag)>(sc, layout, world).run(); });
}

}  // namespace syncbn_test

#endif  // SYNCBN_TESTS_CUDA_SCENARIOS_HPP
