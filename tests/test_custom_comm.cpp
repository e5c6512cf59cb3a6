// Custom communicators (syncbn_comm_create_custom) in one process: P threads are the ranks, and
// their allreduce is a rendezvous in memory (ThreadGroup, tests/thread_comm.hpp). Every rank's
// outputs are checked against the fp64 reference over the global batch (the concatenation of the
// threads' batches), with uneven and empty per-rank batches; failures of the caller's allreduce
// and split, bad arguments on one rank, the release callback and the C++ wrapper are covered
// too. The same API over MPI (callbacks calling MPI_Allreduce and MPI_Comm_split) runs the whole
// MPI correctness suite in test_mpi_correctness.cpp; the scenario table over 1 to 16 thread
// ranks is test_thread_scenarios.cpp.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "reference.hpp"
#include "syncbn/syncbn.h"
#include "syncbn/syncbn.hpp"
#include "thread_comm.hpp"

namespace {

using namespace syncbn_test;

PlanHandle make_plan(syncbn_comm_t comm, const syncbn_config_t& cfg) {
  syncbn_plan_t p = nullptr;
  EXPECT_EQ(syncbn_plan_create(comm, &cfg, &p), SYNCBN_SUCCESS) << syncbn_last_error();
  return PlanHandle(p);
}

// Every rank's batch of one step, drawn up front by the main thread: rank r has N = r + 1
// samples of spatial size r + 2, except empty_rank, which has none.
template <class T>
struct GlobalBatch {
  std::vector<Geometry> g;
  std::vector<std::vector<T>> x, dy;
  ChannelValues X, DY;

  GlobalBatch(int P, int64_t C, syncbn_layout_t layout, int empty_rank, Rng& rng) {
    for (int r = 0; r < P; ++r) {
      g.push_back(make_geometry(layout, r == empty_rank ? 0 : r + 1, C, {r + 2}));
      x.push_back(random_batch<T>(g.back(), rng));
      dy.push_back(random_batch<T>(g.back(), rng));
    }
  }
  // The per-channel values of ranks [first, first + k).
  void gather_group(int first, int k) {
    X.clear();
    DY.clear();
    for (int r = first; r < first + k; ++r) {
      append(X, gather(g[r], x[r].data()));
      append(DY, gather(g[r], dy[r].data()));
    }
  }
};

// One training step on P thread-ranks, split into consecutive groups of k (k == P: no split),
// checked on every rank against the fp64 reference over its group's global batch.
template <class T>
void run_step(int P, int k, syncbn_layout_t layout) {
  const int64_t C = 5;
  const size_t c = static_cast<size_t>(C);
  Rng rng(test_seed(static_cast<uint32_t>(P * 10 + k)));
  GlobalBatch<T> batch(P, C, layout, k >= 2 ? 1 : -1, rng);  // rank 1 empty, never alone
  const LayerState<T> start = LayerState<T>::random(C, rng);
  const syncbn_config_t cfg = make_cfg(C, DtypeOf<T>::value, layout, true, true, 0.1);
  auto world = std::make_shared<ThreadGroup>(P);
  std::vector<LayerState<T>> after(static_cast<size_t>(P));
  std::vector<std::vector<T>> dweight(static_cast<size_t>(P)), dbias(static_cast<size_t>(P));

  on_threads(P, [&](int rank) {
    SCOPED_TRACE("rank " + std::to_string(rank) + " of " + std::to_string(P) + ", groups of " +
                 std::to_string(k));
    CommHandle comm = member_comm(world, rank);
    CommHandle sub;
    if (k != P) {
      syncbn_comm_t s = nullptr;
      ASSERT_EQ(syncbn_comm_split(comm.get(), k, &s), SYNCBN_SUCCESS) << syncbn_last_error();
      sub.reset(s);
      int sub_rank = -1, sub_size = -1;
      syncbn_comm_rank(s, &sub_rank);
      syncbn_comm_size(s, &sub_size);
      EXPECT_EQ(sub_rank, rank % k);
      EXPECT_EQ(sub_size, k);
    }
    PlanHandle plan = make_plan(k != P ? sub.get() : comm.get(), cfg);
    const Geometry& g = batch.g[rank];
    const auto shape = g.shape();
    LayerState<T> st = start;
    std::vector<T> y(batch.x[rank].size()), dx(y.size()), mean(c), invstd(c), dw(c), db(c);
    ASSERT_EQ(syncbn_forward_training(plan.get(), g.ndim(), shape.data(), batch.x[rank].data(),
                                      st.weight.data(), st.bias.data(), y.data(), mean.data(),
                                      invstd.data(), st.running_mean.data(),
                                      st.running_var.data(), &st.num_batches_tracked, nullptr),
              SYNCBN_SUCCESS)
        << syncbn_last_error();
    ASSERT_EQ(syncbn_backward(plan.get(), g.ndim(), shape.data(), batch.x[rank].data(),
                              batch.dy[rank].data(), st.weight.data(), mean.data(), invstd.data(),
                              dx.data(), dw.data(), db.data(), nullptr),
              SYNCBN_SUCCESS)
        << syncbn_last_error();

    GlobalBatch<T> mine = batch;  // the reference over this rank's group
    mine.gather_group(rank / k * k, k);
    const BatchStats stats = batch_stats(mine.X, cfg.eps);
    const auto w = to_double(st.weight), b = to_double(st.bias);
    EXPECT_TRUE(all_close("save_mean", mean, stats.mean,
                          scaled(Tolerances<T>::stats, stats.abs_mean)));
    EXPECT_TRUE(all_close("save_invstd", invstd, stats.invstd, normwise(Tolerances<T>::stats, stats.invstd)));
    EXPECT_TRUE(all_close("y", y, normalize(g, batch.x[rank].data(), stats.mean, stats.invstd, w, b),
                          Tolerances<T>::data));
    const GradSums global = grad_sums(mine.X, mine.DY, stats.mean);
    EXPECT_TRUE(all_close("dx", dx,
                          grad_input(g, batch.x[rank].data(), batch.dy[rank].data(), w, stats.mean,
                                     stats.invstd, global),
                          Tolerances<T>::data));
    LayerState<T> want = start;
    update_running(want, stats, cfg.momentum);
    EXPECT_TRUE(all_close("running_mean", st.running_mean, to_double(want.running_mean),
                          normwise(Tolerances<T>::stats, to_double(want.running_mean))));
    EXPECT_TRUE(all_close("running_var", st.running_var, to_double(want.running_var),
                          normwise(Tolerances<T>::stats, to_double(want.running_var))));
    EXPECT_EQ(st.num_batches_tracked, start.num_batches_tracked + 1);
    after[static_cast<size_t>(rank)] = st;
    dweight[static_cast<size_t>(rank)] = dw;
    dbias[static_cast<size_t>(rank)] = db;
  });

  for (int first = 0; first < P; first += k) {
    SCOPED_TRACE("group of ranks from " + std::to_string(first));
    std::vector<double> sum_dw(c, 0.0), sum_db(c, 0.0);
    for (int r = first; r < first + k; ++r) {
      // The same reduced numbers on every rank of a group: bitwise equal running statistics.
      EXPECT_TRUE(bitwise_equal("running_mean", after[r].running_mean, after[first].running_mean));
      EXPECT_TRUE(bitwise_equal("running_var", after[r].running_var, after[first].running_var));
      for (size_t i = 0; i < c; ++i) {
        sum_dw[i] += static_cast<double>(dweight[r][i]);
        sum_db[i] += static_cast<double>(dbias[r][i]);
      }
    }
    batch.gather_group(first, k);
    const BatchStats stats = batch_stats(batch.X, cfg.eps);
    const GradSums global = grad_sums(batch.X, batch.DY, stats.mean);
    EXPECT_TRUE(all_close("sum over ranks of dweight", sum_dw, grad_weight(global, stats.invstd),
                          scaled(Tolerances<T>::sums, grad_weight_scale(global, stats.invstd))));
    EXPECT_TRUE(all_close("sum over ranks of dbias", sum_db, global.sum_g,
                          scaled(Tolerances<T>::sums, global.abs_g)));
  }
}

using StepParam = std::tuple<int, syncbn_dtype_t, syncbn_layout_t>;
class CustomThreads : public ::testing::TestWithParam<StepParam> {};

TEST_P(CustomThreads, MatchesReferenceOverGlobalBatch) {
  const auto [P, dtype, layout] = GetParam();
  if (dtype == SYNCBN_FLOAT32)
    run_step<float>(P, P, layout);
  else
    run_step<double>(P, P, layout);
}

// Statistics over the consecutive subgroups that the split function made.
TEST_P(CustomThreads, SplitMatchesReferenceOverEachGroup) {
  const auto [P, dtype, layout] = GetParam();
  for (int k = 1; k < P; ++k) {
    if (P % k != 0) continue;
    SCOPED_TRACE("groups of " + std::to_string(k));
    if (dtype == SYNCBN_FLOAT32)
      run_step<float>(P, k, layout);
    else
      run_step<double>(P, k, layout);
  }
}

INSTANTIATE_TEST_SUITE_P(
    All, CustomThreads,
    ::testing::Combine(::testing::Values(1, 2, 3, 4), ::testing::Values(SYNCBN_FLOAT32, SYNCBN_FLOAT64),
                       ::testing::Values(SYNCBN_CHANNELS_FIRST, SYNCBN_CHANNELS_LAST)),
    [](const ::testing::TestParamInfo<StepParam>& info) {
      return "P" + std::to_string(std::get<0>(info.param)) + "_" +
             dtype_name(std::get<1>(info.param)) + "_" + layout_name(std::get<2>(info.param));
    });

// ---- failures --------------------------------------------------------------------------------

constexpr int64_t kC = 3;

// A small forward on rank r's own buffers, remembering what it started from.
struct RankCall {
  explicit RankCall(int rank) {
    Rng rng(test_seed(static_cast<uint32_t>(rank)));
    start = LayerState<float>::random(kC, rng);
    st = start;
    x = random_vector<float>(static_cast<size_t>(2 * kC), rng, -1.0, 1.0);
    y.assign(x.size(), -777.0f);
  }
  syncbn_status_t forward(syncbn_plan_t plan) {
    const int64_t shape[2] = {2, kC};
    return syncbn_forward_training(plan, 2, shape, x.data(), null_weight ? nullptr : st.weight.data(), st.bias.data(),
                                   y.data(), mean, invstd, st.running_mean.data(),
                                   st.running_var.data(), &st.num_batches_tracked, nullptr);
  }
  ::testing::AssertionResult unchanged() const {
    if (st.num_batches_tracked != start.num_batches_tracked)
      return ::testing::AssertionFailure() << "num_batches_tracked changed";
    for (const auto& [what, got, want] :
         {std::make_tuple("running_mean", &st.running_mean, &start.running_mean),
          std::make_tuple("running_var", &st.running_var, &start.running_var)}) {
      const auto r = bitwise_equal(what, *got, *want);
      if (!r) return r;
    }
    for (float v : y)
      if (v != -777.0f) return ::testing::AssertionFailure() << "y was written";
    return ::testing::AssertionSuccess();
  }
  LayerState<float> start, st;
  bool null_weight = false;
  std::vector<float> x, y;
  float mean[kC], invstd[kC];
};

syncbn_config_t small_config() { return make_cfg(kC, SYNCBN_FLOAT32, SYNCBN_CHANNELS_FIRST, true, true, 0.1); }

// The transport fails on every rank: every rank returns SYNCBN_ERROR_COMM naming the code, and
// nothing changed anywhere.
TEST(CustomFailures, TransportFailingEverywhere) {
  const int P = 3;
  auto group = std::make_shared<ThreadGroup>(P);
  group->fault = ThreadGroup::Fault::everywhere;
  group->fault_from = 1;  // after plan creation
  on_threads(P, [&](int rank) {
    CommHandle comm = member_comm(group, rank);
    PlanHandle plan = make_plan(comm.get(), small_config());
    RankCall call(rank);
    EXPECT_EQ(call.forward(plan.get()), SYNCBN_ERROR_COMM) << "rank " << rank;
    EXPECT_NE(std::string(syncbn_last_error()).find("custom allreduce returned 5"), std::string::npos)
        << syncbn_last_error();
    EXPECT_TRUE(call.unchanged()) << "rank " << rank;
    // The transport failed: the communicator is broken, later calls fail at once.
    EXPECT_EQ(call.forward(plan.get()), SYNCBN_ERROR_COMM_BROKEN) << "rank " << rank;
    EXPECT_NE(std::string(syncbn_last_error()).find("the transport failed"), std::string::npos)
        << syncbn_last_error();
  });
}

// One rank's allreduce reports a failure after taking part in the sum: that rank returns
// SYNCBN_ERROR_COMM with its state untouched; the others, whose sums completed, succeed.
TEST(CustomFailures, FailureReportedOnOneRank) {
  const int P = 3;
  auto group = std::make_shared<ThreadGroup>(P);
  group->fault = ThreadGroup::Fault::one_rank_late;
  group->fault_from = 1;
  group->fault_rank = P - 1;
  on_threads(P, [&](int rank) {
    CommHandle comm = member_comm(group, rank);
    PlanHandle plan = make_plan(comm.get(), small_config());
    RankCall call(rank);
    const syncbn_status_t s = call.forward(plan.get());
    if (rank == P - 1) {
      EXPECT_EQ(s, SYNCBN_ERROR_COMM);
      EXPECT_NE(std::string(syncbn_last_error()).find("returned 7 (rank 2)"), std::string::npos)
          << syncbn_last_error();
      EXPECT_TRUE(call.unchanged());
    } else {
      EXPECT_EQ(s, SYNCBN_SUCCESS) << "rank " << rank << ": " << syncbn_last_error();
    }
  });
}

// The deadline through the callback's return code: rank 1 leaves after plan creation, rank 0's
// transport gives up and returns SYNCBN_ERROR_TIMEOUT. Rank 0 gets SYNCBN_ERROR_TIMEOUT naming
// the plan and the call, nothing written, and from then on SYNCBN_ERROR_COMM_BROKEN at once.
TEST(CustomFailures, TimeoutFromTheCallbackBreaksTheCommunicator) {
  const int P = 2;
  auto group = std::make_shared<ThreadGroup>(P);
  group->wait_limit_seconds = 0.2;
  on_threads(P, [&](int rank) {
    CommHandle comm = member_comm(group, rank);
    double timeout = -1;
    EXPECT_EQ(syncbn_comm_get_timeout(comm.get(), &timeout), SYNCBN_SUCCESS);
    EXPECT_EQ(timeout, 600.0);  // the default (SYNCBN_TIMEOUT_S is not set in this test)
    EXPECT_EQ(syncbn_comm_set_timeout(comm.get(), 0.2), SYNCBN_SUCCESS);
    EXPECT_EQ(syncbn_comm_set_timeout(comm.get(), -1.0), SYNCBN_ERROR_INVALID_ARGUMENT);
    PlanHandle plan = make_plan(comm.get(), small_config());
    if (rank == 1) return;  // leaves the loop
    EXPECT_EQ(syncbn_plan_set_name(plan.get(), "head.bn"), SYNCBN_SUCCESS);
    RankCall call(rank);
    EXPECT_EQ(call.forward(plan.get()), SYNCBN_ERROR_TIMEOUT);
    const std::string message = syncbn_last_error();
    EXPECT_NE(message.find("plan 'head.bn': forward_training call #0: the custom allreduce"),
              std::string::npos) << message;
    EXPECT_NE(message.find("reported a timeout"), std::string::npos) << message;
    EXPECT_TRUE(call.unchanged());
    EXPECT_EQ(call.forward(plan.get()), SYNCBN_ERROR_COMM_BROKEN);
    EXPECT_NE(std::string(syncbn_last_error()).find("plan 'head.bn': the communicator is broken"),
              std::string::npos) << syncbn_last_error();
    EXPECT_TRUE(call.unchanged());
    syncbn_comm_t sub = nullptr;
    EXPECT_EQ(syncbn_comm_split(comm.get(), 1, &sub), SYNCBN_ERROR_COMM_BROKEN);
    EXPECT_EQ(syncbn_comm_abort(comm.get()), SYNCBN_SUCCESS);  // custom: nothing to end, returns
  });
}

// A bad argument on one rank fails the call on every rank of a custom communicator, as over MPI.
TEST(CustomFailures, BadArgumentOnOneRankFailsEverywhere) {
  const int P = 4;
  auto group = std::make_shared<ThreadGroup>(P);
  on_threads(P, [&](int rank) {
    CommHandle comm = member_comm(group, rank);
    PlanHandle plan = make_plan(comm.get(), small_config());
    RankCall call(rank);
    call.null_weight = rank == 2;
    EXPECT_EQ(call.forward(plan.get()), SYNCBN_ERROR_INVALID_ARGUMENT) << "rank " << rank;
    EXPECT_NE(std::string(syncbn_last_error()).find("rank 2: weight is null"), std::string::npos)
        << syncbn_last_error();
    if (rank != 2) {
      EXPECT_TRUE(call.unchanged()) << "rank " << rank;
    }
    RankCall again(rank);  // and the sequence is still in step
    EXPECT_EQ(again.forward(plan.get()), SYNCBN_SUCCESS) << "rank " << rank << ": " << syncbn_last_error();
  });
}

// Without a split function, a bad group_size, or a split function that fails on one rank:
// every rank returns the same status.
TEST(CustomFailures, SplitFailuresAreCommon) {
  const int P = 4;
  for (const bool with_split : {false, true}) {
    auto group = std::make_shared<ThreadGroup>(P);
    group->split_fault_rank = with_split ? 1 : -1;
    auto healthy = std::make_shared<ThreadGroup>(P);
    on_threads(P, [&](int rank) {
      CommHandle comm = member_comm(group, rank, with_split);
      syncbn_comm_t sub = nullptr;
      EXPECT_EQ(syncbn_comm_split(comm.get(), 3, &sub), SYNCBN_ERROR_INVALID_ARGUMENT);
      EXPECT_EQ(sub, nullptr);
      if (!with_split) {
        EXPECT_EQ(syncbn_comm_split(comm.get(), 2, &sub), SYNCBN_ERROR_NOT_SUPPORTED);
        EXPECT_NE(std::string(syncbn_last_error()).find("without a split function"), std::string::npos)
            << syncbn_last_error();
        return;
      }
      EXPECT_EQ(syncbn_comm_split(comm.get(), 2, &sub), SYNCBN_ERROR_COMM) << "rank " << rank;
      EXPECT_NE(std::string(syncbn_last_error()).find("rank 1: sub: the communicator failed"),
                std::string::npos)
          << syncbn_last_error();
      EXPECT_EQ(sub, nullptr);
      CommHandle good = member_comm(healthy, rank);
      ASSERT_EQ(syncbn_comm_split(good.get(), 2, &sub), SYNCBN_SUCCESS) << syncbn_last_error();
      syncbn_comm_destroy(sub);
    });
  }
}

// ---- construction and lifetime ------------------------------------------------------------------

TEST(CustomComm, CreateRejectsBadArguments) {
  auto fn = [](double*, size_t, syncbn_device_t, void*, void*) { return 0; };
  syncbn_comm_t c = nullptr;
  const int before = released_count().load();
  EXPECT_EQ(syncbn_comm_create_custom(0, 1, nullptr, nullptr, &Member::release, nullptr, &c),
            SYNCBN_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(syncbn_last_error()).find("allreduce is null"), std::string::npos);
  EXPECT_EQ(syncbn_comm_create_custom(0, 0, fn, nullptr, nullptr, nullptr, &c),
            SYNCBN_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(syncbn_last_error()).find("size must be >= 1"), std::string::npos);
  EXPECT_EQ(syncbn_comm_create_custom(2, 2, fn, nullptr, nullptr, nullptr, &c),
            SYNCBN_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(syncbn_last_error()).find("rank must be in [0, size)"), std::string::npos);
  EXPECT_EQ(syncbn_comm_create_custom(0, 1, fn, nullptr, nullptr, nullptr, nullptr),
            SYNCBN_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(c, nullptr);
  EXPECT_EQ(released_count().load(), before);  // release is not called for a communicator never made
}

// release runs once, when the handle and the last plan on it are gone.
TEST(CustomComm, ReleaseAfterLastReference) {
  auto group = std::make_shared<ThreadGroup>(1);
  const int before = released_count().load();
  CommHandle comm = member_comm(group, 0);
  PlanHandle plan = make_plan(comm.get(), small_config());
  comm.reset();
  EXPECT_EQ(released_count().load(), before);
  RankCall call(0);
  EXPECT_EQ(call.forward(plan.get()), SYNCBN_SUCCESS) << syncbn_last_error();
  plan.reset();
  EXPECT_EQ(released_count().load(), before + 1);
}

// The C++ wrapper: a lambda as the allreduce; one allreduce per plan creation and per call once
// the plan's shared shift is near the data (its first call may redo its sums around the batch
// mean: a second allreduce); an exception in it becomes SYNCBN_ERROR_COMM.
TEST(CustomComm, CppWrapper) {
  int calls = 0;
  bool throw_next = false;
  auto comm = syncbn::custom_communicator(0, 1, [&](double*, std::size_t count, syncbn_device_t device, void*) {
    ++calls;
    if (throw_next) throw std::runtime_error("transport down");
    return device == SYNCBN_DEVICE_CPU && count > 0 ? 0 : 1;
  });
  EXPECT_EQ(comm.rank(), 0);
  EXPECT_EQ(comm.size(), 1);
  syncbn::BatchNorm bn(comm, small_config());
  EXPECT_EQ(calls, 1);
  RankCall call(0);
  EXPECT_EQ(call.forward(bn.get()), SYNCBN_SUCCESS) << syncbn_last_error();
  const int first = calls - 1;
  EXPECT_TRUE(first == 1 || first == 2) << first;
  RankCall again(0);
  EXPECT_EQ(again.forward(bn.get()), SYNCBN_SUCCESS) << syncbn_last_error();
  EXPECT_EQ(calls, 1 + first + 1);
  throw_next = true;
  RankCall failing(0);
  EXPECT_EQ(failing.forward(bn.get()), SYNCBN_ERROR_COMM);
  EXPECT_NE(std::string(syncbn_last_error()).find("returned -1"), std::string::npos);
  EXPECT_TRUE(failing.unchanged());
  EXPECT_THROW(comm.split(1), syncbn::Error);  // no split function
}

}  // namespace
