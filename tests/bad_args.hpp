// tests/bad_args.hpp: the one table of bad arguments of forward_training, backward and
// forward_inference, each case a valid fp32 channels-first call on (4, 3, 5) (api_calls.hpp's
// CallArgs and CallBuffers; affine, tracking, momentum 0.1 or cumulative) broken in exactly one
// way, with the status and the word of the message expected. Three kinds of suite run it:
//   - one process, CPU plans (api/test_c_api.cpp): every case, status by status;
//   - one rank of a group makes the mistake, the others a correct call (test_mpi_errors.cpp over
//     MPI, test_thread_scenarios.cpp over 1 to 16 thread ranks): every case whose verdict is
//     collective (collective_verdict) fails on every rank alike, the message naming the bad rank
//     and the argument; expect_bad_arg_fails_everywhere below is that test, for any Ranks policy
//     (scenarios.hpp);
//   - CUDA plans, device memory (test_cuda.cpp): the cases marked kOnDevice, through
//     CallBuffersIn (the buffers in the memory of a scenario runner's Memory policy).
#ifndef SYNCBN_TESTS_BAD_ARGS_HPP
#define SYNCBN_TESTS_BAD_ARGS_HPP

#include <gtest/gtest.h>

#include <cstdint>
#include <ostream>
#include <string>
#include <vector>

#include "api_calls.hpp"
#include "reference.hpp"
#include "syncbn/syncbn.h"

namespace syncbn_test {

// Where a case runs besides the single-process CPU suite (which runs every case).
enum class Reach {
  kHost,      // CPU plans; and one rank of a group, where its verdict is collective
  kOnDevice,  // CUDA plans as well
  kLocal,     // a NULL plan: only the calling rank can know, its peers would wait
};

struct ArgCase {
  const char* name;
  Op op;
  void (*mutate)(CallArgs&);
  syncbn_status_t want;  // in one process
  const char* names;     // substring the message must contain (besides the bad rank's "rank r")
  Reach reach = Reach::kHost;
  bool cumulative = false;  // the plan's momentum is SYNCBN_MOMENTUM_CUMULATIVE
};

inline void PrintTo(const ArgCase& tc, std::ostream* os) { *os << tc.name; }

// A case one rank of a group can get wrong and every rank must reject alike (forward_inference
// is local: its errors stay on their rank).
inline bool collective_verdict(const ArgCase& tc) {
  return tc.want == SYNCBN_ERROR_INVALID_ARGUMENT && tc.op != Op::kInference &&
         tc.reach != Reach::kLocal;
}

namespace bad_args {

// Shapes that break one rule each (the valid one is (4, 3, 5)).
inline const int64_t kShapeWrongC[] = {4, 4, 5};
inline const int64_t kShapeWrongCLastAxis[] = {4, 5, 3};  // channels-first plan: C is axis 1
inline const int64_t kShapeNegN[] = {-1, 3, 5};
inline const int64_t kShapeNegSpatial[] = {4, 3, -5};
inline const int64_t kShapeEmptyN[] = {0, 3, 5};
inline const int64_t kShapeEmptySpatial[] = {4, 3, 0};
inline const int64_t kShapeOne[] = {1, 3, 1};
inline const int64_t kShapeOne2d[] = {1, 3};
inline const int64_t kShape6d[] = {4, 3, 1, 1, 1, 5};
inline const int64_t kShapeOverflow[] = {int64_t{1} << 40, 3, int64_t{1} << 40};

constexpr auto kInvalid = SYNCBN_ERROR_INVALID_ARGUMENT;
constexpr auto kTooSmall = SYNCBN_ERROR_BATCH_TOO_SMALL;
constexpr auto kHost = Reach::kHost;
constexpr auto kOnDevice = Reach::kOnDevice;
constexpr auto kLocal = Reach::kLocal;
inline int64_t g_negative_count = -1;  // a corrupted num_batches_tracked

}  // namespace bad_args

inline const std::vector<ArgCase>& arg_cases() {
  using namespace bad_args;
  static const std::vector<ArgCase> list = {
      // forward, training
      {"fwd_valid", Op::kForward, [](CallArgs&) {}, SYNCBN_SUCCESS, ""},
      {"fwd_null_plan", Op::kForward, [](CallArgs& a) { a.plan = nullptr; }, kInvalid, "plan",
       kLocal},
      {"fwd_null_x", Op::kForward, [](CallArgs& a) { a.x = nullptr; }, kInvalid, "x", kOnDevice},
      {"fwd_null_y", Op::kForward, [](CallArgs& a) { a.y = nullptr; }, kInvalid, "y", kOnDevice},
      {"fwd_null_weight", Op::kForward, [](CallArgs& a) { a.weight = nullptr; }, kInvalid, "weight",
       kOnDevice},
      {"fwd_null_bias", Op::kForward, [](CallArgs& a) { a.bias = nullptr; }, kInvalid, "bias",
       kOnDevice},
      {"fwd_null_running_mean", Op::kForward, [](CallArgs& a) { a.running_mean = nullptr; },
       kInvalid, "running_mean", kOnDevice},
      {"fwd_null_running_var", Op::kForward, [](CallArgs& a) { a.running_var = nullptr; }, kInvalid,
       "running_var", kOnDevice},
      {"fwd_null_num_batches_tracked_cumulative", Op::kForward,
       [](CallArgs& a) { a.num_batches_tracked = nullptr; }, kInvalid, "num_batches_tracked", kHost,
       /*cumulative=*/true},
      {"fwd_null_num_batches_tracked_momentum_ok", Op::kForward,
       [](CallArgs& a) { a.num_batches_tracked = nullptr; }, SYNCBN_SUCCESS, ""},
      {"fwd_negative_num_batches_tracked", Op::kForward,
       [](CallArgs& a) { a.num_batches_tracked = &g_negative_count; }, kInvalid,
       "num_batches_tracked"},
      {"fwd_null_save_stats_ok", Op::kForward,
       [](CallArgs& a) { a.save_mean = a.save_invstd = nullptr; }, SYNCBN_SUCCESS, ""},
      {"fwd_null_shape", Op::kForward, [](CallArgs& a) { a.shape = nullptr; }, kInvalid, "shape",
       kOnDevice},
      {"fwd_wrong_C", Op::kForward, [](CallArgs& a) { a.shape = kShapeWrongC; }, kInvalid, "",
       kOnDevice},
      {"fwd_C_on_wrong_axis", Op::kForward, [](CallArgs& a) { a.shape = kShapeWrongCLastAxis; },
       kInvalid, ""},
      {"fwd_ndim_1", Op::kForward, [](CallArgs& a) { a.ndim = 1; }, kInvalid, "ndim", kOnDevice},
      {"fwd_ndim_0", Op::kForward, [](CallArgs& a) { a.ndim = 0; }, kInvalid, "ndim"},
      {"fwd_ndim_6", Op::kForward,
       [](CallArgs& a) {
         a.ndim = 6;
         a.shape = kShape6d;
       },
       kInvalid, "ndim", kOnDevice},
      {"fwd_negative_N", Op::kForward, [](CallArgs& a) { a.shape = kShapeNegN; }, kInvalid, "",
       kOnDevice},
      {"fwd_negative_spatial", Op::kForward, [](CallArgs& a) { a.shape = kShapeNegSpatial; },
       kInvalid, ""},
      {"fwd_shape_overflows_int64", Op::kForward, [](CallArgs& a) { a.shape = kShapeOverflow; },
       kInvalid, "shape"},
      {"fwd_stream_on_cpu", Op::kForward,
       [](CallArgs& a) { a.stream = reinterpret_cast<void*>(uintptr_t{0x1000}); }, kInvalid,
       "stream"},
      {"fwd_empty_batch", Op::kForward, [](CallArgs& a) { a.shape = kShapeEmptyN; }, kTooSmall, ""},
      {"fwd_empty_batch_null_data", Op::kForward,
       [](CallArgs& a) {
         a.shape = kShapeEmptyN;
         a.x = nullptr;
         a.y = nullptr;
       },
       kTooSmall, ""},
      {"fwd_empty_spatial", Op::kForward, [](CallArgs& a) { a.shape = kShapeEmptySpatial; },
       kTooSmall, ""},
      {"fwd_count_one_tracking", Op::kForward, [](CallArgs& a) { a.shape = kShapeOne; }, kTooSmall,
       ""},
      {"fwd_count_one_tracking_2d", Op::kForward,
       [](CallArgs& a) {
         a.ndim = 2;
         a.shape = kShapeOne2d;
       },
       kTooSmall, ""},
      // backward
      {"bwd_valid", Op::kBackward, [](CallArgs&) {}, SYNCBN_SUCCESS, ""},
      {"bwd_null_param_grads_ok", Op::kBackward, [](CallArgs& a) { a.dweight = a.dbias = nullptr; },
       SYNCBN_SUCCESS, ""},
      {"bwd_null_plan", Op::kBackward, [](CallArgs& a) { a.plan = nullptr; }, kInvalid, "plan",
       kLocal},
      {"bwd_null_x", Op::kBackward, [](CallArgs& a) { a.x = nullptr; }, kInvalid, "x"},
      {"bwd_null_dy", Op::kBackward, [](CallArgs& a) { a.dy = nullptr; }, kInvalid, "dy",
       kOnDevice},
      {"bwd_null_dx", Op::kBackward, [](CallArgs& a) { a.dx = nullptr; }, kInvalid, "dx",
       kOnDevice},
      {"bwd_null_weight", Op::kBackward, [](CallArgs& a) { a.weight = nullptr; }, kInvalid,
       "weight", kOnDevice},
      {"bwd_null_save_mean", Op::kBackward, [](CallArgs& a) { a.bsave_mean = nullptr; }, kInvalid,
       "save_mean", kOnDevice},
      {"bwd_null_save_invstd", Op::kBackward, [](CallArgs& a) { a.bsave_invstd = nullptr; },
       kInvalid, "save_invstd", kOnDevice},
      {"bwd_wrong_C", Op::kBackward, [](CallArgs& a) { a.shape = kShapeWrongC; }, kInvalid, "",
       kOnDevice},
      {"bwd_ndim_1", Op::kBackward, [](CallArgs& a) { a.ndim = 1; }, kInvalid, "ndim"},
      {"bwd_negative_spatial", Op::kBackward, [](CallArgs& a) { a.shape = kShapeNegSpatial; },
       kInvalid, ""},
      {"bwd_stream_on_cpu", Op::kBackward,
       [](CallArgs& a) { a.stream = reinterpret_cast<void*>(uintptr_t{0x1000}); }, kInvalid,
       "stream"},
      {"bwd_empty_batch", Op::kBackward,
       [](CallArgs& a) {
         a.shape = kShapeEmptyN;
         a.x = a.dy = nullptr;
         a.dx = nullptr;
       },
       kTooSmall, ""},
      // forward, eval (tracking on: local)
      {"eval_valid", Op::kInference, [](CallArgs&) {}, SYNCBN_SUCCESS, ""},
      {"eval_null_plan", Op::kInference, [](CallArgs& a) { a.plan = nullptr; }, kInvalid, "plan",
       kLocal},
      {"eval_null_x", Op::kInference, [](CallArgs& a) { a.x = nullptr; }, kInvalid, "x", kOnDevice},
      {"eval_null_y", Op::kInference, [](CallArgs& a) { a.y = nullptr; }, kInvalid, "y"},
      {"eval_null_weight", Op::kInference, [](CallArgs& a) { a.weight = nullptr; }, kInvalid,
       "weight"},
      {"eval_null_bias", Op::kInference, [](CallArgs& a) { a.bias = nullptr; }, kInvalid, "bias"},
      {"eval_null_running_mean", Op::kInference, [](CallArgs& a) { a.running_mean = nullptr; },
       kInvalid, "running_mean"},
      {"eval_null_running_var", Op::kInference, [](CallArgs& a) { a.running_var = nullptr; },
       kInvalid, "running_var", kOnDevice},
      {"eval_wrong_C", Op::kInference, [](CallArgs& a) { a.shape = kShapeWrongC; }, kInvalid, "",
       kOnDevice},
      {"eval_ndim_6", Op::kInference,
       [](CallArgs& a) {
         a.ndim = 6;
         a.shape = kShape6d;
       },
       kInvalid, "ndim"},
      {"eval_stream_on_cpu", Op::kInference,
       [](CallArgs& a) { a.stream = reinterpret_cast<void*>(uintptr_t{0x1000}); }, kInvalid,
       "stream"},
  };
  return list;
}

// The cases of one suite kind: those whose verdict is collective, or those for CUDA plans.
inline std::vector<ArgCase> collective_arg_cases() {
  std::vector<ArgCase> v;
  for (const ArgCase& tc : arg_cases())
    if (collective_verdict(tc)) v.push_back(tc);
  return v;
}
inline std::vector<ArgCase> device_arg_cases() {
  std::vector<ArgCase> v;
  for (const ArgCase& tc : arg_cases())
    if (tc.reach == Reach::kOnDevice) v.push_back(tc);
  return v;
}

inline std::string arg_case_name(const ::testing::TestParamInfo<ArgCase>& info) {
  return info.param.name;
}

// The config every case's plan has: C = 3 fp32 channels-first, affine, tracking (unless not
// track), momentum 0.1 or cumulative.
inline syncbn_config_t arg_case_config(const ArgCase& tc, bool track = true) {
  syncbn_config_t cfg;
  syncbn_config_init(&cfg, 3, SYNCBN_FLOAT32);
  cfg.track_running_stats = track;
  if (tc.cumulative) cfg.momentum = SYNCBN_MOMENTUM_CUMULATIVE;
  return cfg;
}

// ---- a host CallBuffers' contents in another memory
// ----------------------------------------------

// The buffers of a CallBuffers in the memory of a Memory policy M (scenarios.hpp: HostMemory,
// DeviceMemory), for a call on M's plans: args() points into them, download() brings them back
// as a CallBuffers (to compare with unchanged_since).
template <class M>
struct CallBuffersIn {
  template <class X>
  using Array = typename M::template Array<X>;
  CallBuffers host;
  Array<float> x, dy, y, dx, save_mean, save_invstd, dweight, dbias, bsave_mean, bsave_invstd;
  Array<float> weight, bias, running_mean, running_var;
  Array<int64_t> num_batches_tracked;

  explicit CallBuffersIn(const CallBuffers& h)
      : host(h),
        x(h.x),
        dy(h.dy),
        y(h.y),
        dx(h.dx),
        save_mean(h.save_mean),
        save_invstd(h.save_invstd),
        dweight(h.dweight),
        dbias(h.dbias),
        bsave_mean(h.bsave_mean),
        bsave_invstd(h.bsave_invstd),
        weight(h.st.weight),
        bias(h.st.bias),
        running_mean(h.st.running_mean),
        running_var(h.st.running_var),
        num_batches_tracked(std::vector<int64_t>{h.st.num_batches_tracked}) {}

  CallArgs args(syncbn_plan_t plan, void* stream) const {
    return CallArgs{plan,
                    host.g.ndim(),
                    host.shape.data(),
                    x.data(),
                    dy.data(),
                    weight.data(),
                    bias.data(),
                    y.data(),
                    save_mean.data(),
                    save_invstd.data(),
                    running_mean.data(),
                    running_var.data(),
                    num_batches_tracked.data(),
                    bsave_mean.data(),
                    bsave_invstd.data(),
                    dx.data(),
                    dweight.data(),
                    dbias.data(),
                    stream};
  }

  CallBuffers download() const {
    CallBuffers b = host;
    b.y = y.download();
    b.dx = dx.download();
    b.save_mean = save_mean.download();
    b.save_invstd = save_invstd.download();
    b.dweight = dweight.download();
    b.dbias = dbias.download();
    b.st.running_mean = running_mean.download();
    b.st.running_var = running_var.download();
    const auto n = num_batches_tracked.download();
    b.st.num_batches_tracked = n.empty() ? -1 : n[0];
    return b;
  }
};

// ---- one rank's bad argument, in a group
// ---------------------------------------------------------

// COLLECTIVE over plan's communicator (ranks: its Ranks policy): a correct call of op on every
// rank succeeds, after whatever failed before: nobody is stuck and the call sequences are still
// aligned. Forward also updates the running statistics identically everywhere (when the plan
// tracks them). Each rank calls on (2 + rank, 3, 4), its own data.
template <class R>
void expect_plan_still_works(syncbn_plan_t plan, Op op, const R& ranks) {
  CallBuffers buf(2 + ranks.rank(), 3, 4, test_seed(), ranks.rank());
  const int64_t nbt = buf.st.num_batches_tracked;
  const syncbn_status_t s = call(op, buf.args(plan));
  EXPECT_EQ(s, SYNCBN_SUCCESS) << ranks.tag() << ": a correct " << op_name(op)
                               << " after the failure: " << syncbn_last_error();
  syncbn_config_t cfg{};
  syncbn_plan_get_config(plan, &cfg);
  const typename R::Group all(ranks, ranks.size());
  if (op == Op::kForward && cfg.track_running_stats) {
    EXPECT_EQ(buf.st.num_batches_tracked, nbt + 1) << ranks.tag();
    EXPECT_TRUE(all.same_as_rank0("running_mean", buf.st.running_mean)) << ranks.tag();
    EXPECT_TRUE(all.same_as_rank0("running_var", buf.st.running_var)) << ranks.tag();
  }
}

// COLLECTIVE over comm (all ranks of ranks): rank `bad` makes tc's mistake, every other rank
// a correct call on its own (2 + rank, 3, 4) batch. Every rank returns
// SYNCBN_ERROR_INVALID_ARGUMENT with a message naming the bad rank and tc's argument, nothing
// changed on any rank, and the plan works afterwards.
template <class R>
void expect_bad_arg_fails_everywhere(const ArgCase& tc, int bad, syncbn_comm_t comm,
                                     const R& ranks) {
  const int rank = ranks.rank();
  const syncbn_config_t cfg = arg_case_config(tc);
  syncbn_plan_t p = nullptr;
  const syncbn_status_t made = syncbn_plan_create(comm, &cfg, &p);
  EXPECT_EQ(made, SYNCBN_SUCCESS) << ranks.tag() << ": syncbn_plan_create: " << syncbn_last_error();
  PlanHandle plan(made == SYNCBN_SUCCESS ? p : nullptr);

  CallBuffers buf(2 + rank, 3, 4, test_seed(), rank);
  const CallBuffers before = buf;
  CallArgs args = buf.args(plan.get());
  if (rank == bad) tc.mutate(args);
  const syncbn_status_t s = call(tc.op, args);

  SCOPED_TRACE(ranks.tag() + " of " + std::to_string(ranks.size()) + ", bad rank " +
               std::to_string(bad));
  EXPECT_EQ(s, SYNCBN_ERROR_INVALID_ARGUMENT) << syncbn_last_error();
  EXPECT_TRUE(last_error_names(ranks.tag(), {"rank " + std::to_string(bad), tc.names}));
  EXPECT_TRUE(buf.unchanged_since(before));

  expect_plan_still_works(plan.get(), tc.op, ranks);
}

}  // namespace syncbn_test

#endif  // SYNCBN_TESTS_BAD_ARGS_HPP
