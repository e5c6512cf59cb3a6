// The C API on one process: status strings, the version, handles, configs and defaults, plan
// creation's validation, and the argument checking of forward, backward and inference, status by
// status, with nothing changed by a rejected call.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "api_calls.hpp"
#include "cpu/checked_layer.hpp"
#include "reference.hpp"
#include "syncbn/syncbn.h"
#include "syncbn/syncbn.hpp"

namespace {

using namespace syncbn_test;

// ---- the C API: handles, configs, defaults --------------------------------------------------

TEST(CApi, StatusStrings) {
  EXPECT_STREQ(syncbn_status_string(SYNCBN_SUCCESS), "SYNCBN_SUCCESS");
  EXPECT_STREQ(syncbn_status_string(SYNCBN_ERROR_INVALID_ARGUMENT),
               "SYNCBN_ERROR_INVALID_ARGUMENT");
  EXPECT_STREQ(syncbn_status_string(SYNCBN_ERROR_BATCH_TOO_SMALL), "SYNCBN_ERROR_BATCH_TOO_SMALL");
  EXPECT_STREQ(syncbn_status_string(SYNCBN_ERROR_CALL_MISMATCH), "SYNCBN_ERROR_CALL_MISMATCH");
  EXPECT_STREQ(syncbn_status_string(SYNCBN_ERROR_CONFIG_MISMATCH), "SYNCBN_ERROR_CONFIG_MISMATCH");
  for (int s = 0; s <= 9; ++s)
    EXPECT_NE(syncbn_status_string(static_cast<syncbn_status_t>(s)), nullptr) << s;
  EXPECT_NE(syncbn_status_string(static_cast<syncbn_status_t>(12345)), nullptr);
  EXPECT_NE(syncbn_last_error(), nullptr);
}

// The version the loaded library reports is the headers' (both come from CMake's project()).
TEST(CApi, VersionMatchesTheHeaders) {
  int version = -1;
  ASSERT_EQ(syncbn_get_version(&version), SYNCBN_SUCCESS);
  EXPECT_EQ(version, SYNCBN_VERSION_CODE);
  EXPECT_EQ(version, SYNCBN_VERSION_MAJOR * 10000 + SYNCBN_VERSION_MINOR * 100 + SYNCBN_VERSION_PATCH);
  EXPECT_EQ(syncbn::version(), version);
  EXPECT_EQ(syncbn_get_version(nullptr), SYNCBN_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(syncbn_last_error()).find("version is null"), std::string::npos);
}

// The last-error message is per thread: a failure on another thread does not replace this one's.
TEST(CApi, LastErrorIsPerThread) {
  syncbn_config_t cfg;
  syncbn_config_init(&cfg, 3, SYNCBN_FLOAT32);
  cfg.eps = -1;
  syncbn_comm_t comm = nullptr;
  ASSERT_EQ(syncbn_comm_create_self(&comm), SYNCBN_SUCCESS);
  syncbn_plan_t plan = nullptr;
  ASSERT_EQ(syncbn_plan_create(comm, &cfg, &plan), SYNCBN_ERROR_INVALID_ARGUMENT);
  const std::string mine = syncbn_last_error();
  EXPECT_NE(mine.find("eps"), std::string::npos) << mine;
  std::string theirs;
  std::thread([&] {
    syncbn_config_t bad;
    syncbn_config_init(&bad, 0, SYNCBN_FLOAT32);
    syncbn_plan_t p = nullptr;
    EXPECT_EQ(syncbn_plan_create(comm, &bad, &p), SYNCBN_ERROR_INVALID_ARGUMENT);
    theirs = syncbn_last_error();
  }).join();
  EXPECT_NE(theirs.find("num_features"), std::string::npos) << theirs;
  EXPECT_EQ(std::string(syncbn_last_error()), mine);
  syncbn_comm_destroy(comm);
}

TEST(CApi, ConfigDefaults) {
  syncbn_config_t cfg;
  std::memset(&cfg, 0xab, sizeof cfg);
  ASSERT_EQ(syncbn_config_init(&cfg, 7, SYNCBN_FLOAT64), SYNCBN_SUCCESS);
  EXPECT_EQ(cfg.num_features, 7);
  EXPECT_EQ(cfg.dtype, SYNCBN_FLOAT64);
  EXPECT_EQ(cfg.layout, SYNCBN_CHANNELS_FIRST);
  EXPECT_EQ(cfg.device, SYNCBN_DEVICE_CPU);
  EXPECT_EQ(cfg.eps, 1e-5);
  EXPECT_EQ(cfg.momentum, 0.1);
  EXPECT_NE(cfg.affine, 0);
  EXPECT_NE(cfg.track_running_stats, 0);
  EXPECT_EQ(cfg.global_param_grads, 0);
  EXPECT_EQ(syncbn_config_init(nullptr, 7, SYNCBN_FLOAT64), SYNCBN_ERROR_INVALID_ARGUMENT);
}

TEST(CApi, SelfCommunicator) {
  EXPECT_EQ(syncbn_comm_create_self(nullptr), SYNCBN_ERROR_INVALID_ARGUMENT);
  syncbn_comm_t comm = nullptr;
  ASSERT_EQ(syncbn_comm_create_self(&comm), SYNCBN_SUCCESS) << syncbn_last_error();
  ASSERT_NE(comm, nullptr);
  int rank = -1, size = -1;
  EXPECT_EQ(syncbn_comm_rank(comm, &rank), SYNCBN_SUCCESS);
  EXPECT_EQ(syncbn_comm_size(comm, &size), SYNCBN_SUCCESS);
  EXPECT_EQ(rank, 0);
  EXPECT_EQ(size, 1);
  EXPECT_EQ(syncbn_comm_rank(nullptr, &rank), SYNCBN_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(syncbn_comm_rank(comm, nullptr), SYNCBN_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(syncbn_comm_size(nullptr, &size), SYNCBN_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(syncbn_comm_size(comm, nullptr), SYNCBN_ERROR_INVALID_ARGUMENT);

  syncbn_comm_t sub = nullptr;
  ASSERT_EQ(syncbn_comm_split(comm, 1, &sub), SYNCBN_SUCCESS) << syncbn_last_error();
  EXPECT_EQ(syncbn_comm_size(sub, &size), SYNCBN_SUCCESS);
  EXPECT_EQ(size, 1);
  EXPECT_EQ(syncbn_comm_destroy(sub), SYNCBN_SUCCESS);
  for (int bad : {0, -1, 2}) {
    syncbn_comm_t s = nullptr;
    EXPECT_EQ(syncbn_comm_split(comm, bad, &s), SYNCBN_ERROR_INVALID_ARGUMENT) << "group " << bad;
  }
  EXPECT_EQ(syncbn_comm_split(nullptr, 1, &sub), SYNCBN_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(syncbn_comm_split(comm, 1, nullptr), SYNCBN_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(syncbn_comm_destroy(comm), SYNCBN_SUCCESS);
  EXPECT_EQ(syncbn_comm_destroy(nullptr), SYNCBN_SUCCESS);
  EXPECT_EQ(syncbn_plan_destroy(nullptr), SYNCBN_SUCCESS);
}

// A plan keeps its communicator alive after the caller's handle is destroyed.
TEST(CApi, PlanOutlivesCommunicatorHandle) {
  syncbn_comm_t comm = nullptr;
  ASSERT_EQ(syncbn_comm_create_self(&comm), SYNCBN_SUCCESS);
  syncbn_config_t cfg;
  syncbn_config_init(&cfg, 2, SYNCBN_FLOAT64);
  cfg.track_running_stats = 0;
  syncbn_plan_t plan = nullptr;
  ASSERT_EQ(syncbn_plan_create(comm, &cfg, &plan), SYNCBN_SUCCESS) << syncbn_last_error();
  ASSERT_EQ(syncbn_comm_destroy(comm), SYNCBN_SUCCESS);
  const int64_t shape[2] = {2, 2};
  const double x[4] = {1, 2, 3, 5}, w[2] = {1, 1}, b[2] = {0, 0};
  double y[4], mean[2], invstd[2];
  ASSERT_EQ(syncbn_forward_training(plan, 2, shape, x, w, b, y, mean, invstd, nullptr, nullptr,
                                    nullptr, nullptr),
            SYNCBN_SUCCESS)
      << syncbn_last_error();
  EXPECT_DOUBLE_EQ(mean[0], 2.0);
  EXPECT_DOUBLE_EQ(mean[1], 3.5);
  EXPECT_EQ(syncbn_plan_destroy(plan), SYNCBN_SUCCESS);
}

TEST(CApi, PlanGetConfigRoundTrips) {
  auto comm = syncbn::Communicator::self();
  syncbn_config_t cfg = make_cfg(9, SYNCBN_FLOAT64, SYNCBN_CHANNELS_LAST, false, true,
                                 kCumulative, 3e-4);
  cfg.global_param_grads = 1;
  syncbn::BatchNorm bn(comm, cfg);
  const syncbn_config_t got = bn.config();
  EXPECT_EQ(got.num_features, 9);
  EXPECT_EQ(got.dtype, SYNCBN_FLOAT64);
  EXPECT_EQ(got.layout, SYNCBN_CHANNELS_LAST);
  EXPECT_EQ(got.device, SYNCBN_DEVICE_CPU);
  EXPECT_EQ(got.eps, 3e-4);
  EXPECT_TRUE(std::isnan(got.momentum));
  EXPECT_EQ(got.affine, 0);
  EXPECT_NE(got.track_running_stats, 0);
  EXPECT_NE(got.global_param_grads, 0);
  syncbn_config_t out;
  EXPECT_EQ(syncbn_plan_get_config(nullptr, &out), SYNCBN_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(syncbn_plan_get_config(bn.get(), nullptr), SYNCBN_ERROR_INVALID_ARGUMENT);
}

// ---- the C API: syncbn_plan_create validation -----------------------------------------------

struct ConfigCase {
  const char* name;
  void (*mutate)(syncbn_config_t&);
  syncbn_status_t want;
  const char* names;  // substring the message must contain ("" for success)
};

class PlanCreate : public ::testing::TestWithParam<ConfigCase> {};

TEST_P(PlanCreate, Status) {
  const ConfigCase& tc = GetParam();
  syncbn_comm_t comm = nullptr;
  ASSERT_EQ(syncbn_comm_create_self(&comm), SYNCBN_SUCCESS);
  syncbn_config_t cfg;
  ASSERT_EQ(syncbn_config_init(&cfg, 3, SYNCBN_FLOAT32), SYNCBN_SUCCESS);
  tc.mutate(cfg);
  syncbn_plan_t plan = nullptr;
  const syncbn_status_t got = syncbn_plan_create(comm, &cfg, &plan);
  EXPECT_EQ(got, tc.want) << syncbn_last_error();
  if (tc.want == SYNCBN_SUCCESS) {
    EXPECT_NE(plan, nullptr);
  } else {
    const std::string msg = syncbn_last_error();
    EXPECT_NE(msg.find(tc.names), std::string::npos)
        << "message '" << msg << "' does not name '" << tc.names << "'";
  }
  if (got == SYNCBN_SUCCESS) syncbn_plan_destroy(plan);
  syncbn_comm_destroy(comm);
}

const ConfigCase kConfigCases[] = {
    {"C_zero", [](syncbn_config_t& c) { c.num_features = 0; }, SYNCBN_ERROR_INVALID_ARGUMENT,
     "num_features"},
    {"C_negative", [](syncbn_config_t& c) { c.num_features = -3; }, SYNCBN_ERROR_INVALID_ARGUMENT,
     "num_features"},
    {"eps_zero", [](syncbn_config_t& c) { c.eps = 0; }, SYNCBN_ERROR_INVALID_ARGUMENT, "eps"},
    {"eps_negative", [](syncbn_config_t& c) { c.eps = -1e-5; }, SYNCBN_ERROR_INVALID_ARGUMENT,
     "eps"},
    {"eps_nan", [](syncbn_config_t& c) { c.eps = kNaN; }, SYNCBN_ERROR_INVALID_ARGUMENT, "eps"},
    {"eps_inf", [](syncbn_config_t& c) { c.eps = kInf; }, SYNCBN_ERROR_INVALID_ARGUMENT, "eps"},
    {"momentum_negative", [](syncbn_config_t& c) { c.momentum = -0.1; },
     SYNCBN_ERROR_INVALID_ARGUMENT, "momentum"},
    {"momentum_above_one", [](syncbn_config_t& c) { c.momentum = 1.5; },
     SYNCBN_ERROR_INVALID_ARGUMENT, "momentum"},
    {"momentum_inf", [](syncbn_config_t& c) { c.momentum = kInf; }, SYNCBN_ERROR_INVALID_ARGUMENT,
     "momentum"},
    {"momentum_minus_inf", [](syncbn_config_t& c) { c.momentum = -kInf; },
     SYNCBN_ERROR_INVALID_ARGUMENT, "momentum"},
    {"fp16_on_cpu", [](syncbn_config_t& c) { c.dtype = SYNCBN_FLOAT16; },
     SYNCBN_ERROR_NOT_SUPPORTED, ""},
#ifndef SYNCBN_TEST_HAVE_CUDA  // with CUDA: tests/test_cuda.cpp
    {"cuda_device_without_cuda", [](syncbn_config_t& c) { c.device = SYNCBN_DEVICE_CUDA; },
     SYNCBN_ERROR_NOT_SUPPORTED, ""},
#endif
    {"momentum_zero_ok", [](syncbn_config_t& c) { c.momentum = 0; }, SYNCBN_SUCCESS, ""},
    {"momentum_one_ok", [](syncbn_config_t& c) { c.momentum = 1; }, SYNCBN_SUCCESS, ""},
    {"momentum_cumulative_ok", [](syncbn_config_t& c) { c.momentum = kCumulative; },
     SYNCBN_SUCCESS, ""},
    {"tiny_eps_ok", [](syncbn_config_t& c) { c.eps = 1e-300; }, SYNCBN_SUCCESS, ""},
    {"fp64_channels_last_ok",
     [](syncbn_config_t& c) {
       c.dtype = SYNCBN_FLOAT64;
       c.layout = SYNCBN_CHANNELS_LAST;
     },
     SYNCBN_SUCCESS, ""},
};

INSTANTIATE_TEST_SUITE_P(All, PlanCreate, ::testing::ValuesIn(kConfigCases),
                         [](const ::testing::TestParamInfo<ConfigCase>& info) {
                           return std::string(info.param.name);
                         });

TEST(PlanCreateNulls, NullHandlesAndPointers) {
  syncbn_comm_t comm = nullptr;
  ASSERT_EQ(syncbn_comm_create_self(&comm), SYNCBN_SUCCESS);
  syncbn_config_t cfg;
  syncbn_config_init(&cfg, 3, SYNCBN_FLOAT32);
  syncbn_plan_t plan = nullptr;
  EXPECT_EQ(syncbn_plan_create(nullptr, &cfg, &plan), SYNCBN_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(syncbn_plan_create(comm, nullptr, &plan), SYNCBN_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(syncbn_plan_create(comm, &cfg, nullptr), SYNCBN_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(plan, nullptr);
  syncbn_comm_destroy(comm);
}

// ---- the C API: argument checking of forward, backward and inference -------------------------

// A valid fp32 channels-first call on shape (4, 3, 5), affine and tracking, momentum 0.1 (or
// cumulative), that each case breaks in one way (CallArgs, CallBuffers: tests/api_calls.hpp).
struct ArgCase {
  const char* name;
  Op op;
  void (*mutate)(CallArgs&);
  syncbn_status_t want;
  const char* names;  // substring the message must contain
  bool cumulative = false;
};

class ArgChecks : public ::testing::TestWithParam<ArgCase> {
 protected:
  void SetUp() override {
    ASSERT_EQ(syncbn_comm_create_self(&comm_), SYNCBN_SUCCESS);
    syncbn_config_t cfg;
    syncbn_config_init(&cfg, 3, SYNCBN_FLOAT32);
    if (GetParam().cumulative) cfg.momentum = kCumulative;
    ASSERT_EQ(syncbn_plan_create(comm_, &cfg, &plan_), SYNCBN_SUCCESS) << syncbn_last_error();
  }
  void TearDown() override {
    syncbn_plan_destroy(plan_);
    syncbn_comm_destroy(comm_);
  }

  syncbn_comm_t comm_ = nullptr;
  syncbn_plan_t plan_ = nullptr;
};

TEST_P(ArgChecks, ExactStatusAndNothingChanged) {
  const ArgCase& tc = GetParam();
  CallBuffers buf(4, 3, 5, test_seed());
  const CallBuffers before = buf;
  CallArgs a = buf.args(plan_);
  tc.mutate(a);

  const syncbn_status_t got = call(tc.op, a);
  ASSERT_EQ(got, tc.want) << op_name(tc.op) << ", message: " << syncbn_last_error();
  if (tc.want == SYNCBN_SUCCESS) return;

  const std::string msg = syncbn_last_error();
  EXPECT_FALSE(msg.empty()) << "no message for a failed call";
  EXPECT_NE(msg.find(tc.names), std::string::npos)
      << "message '" << msg << "' does not name '" << tc.names << "'";
  EXPECT_TRUE(buf.unchanged_since(before));
}

// Shapes that break one rule each (the valid one is (4, 3, 5)).
const int64_t kShapeWrongC[] = {4, 4, 5};
const int64_t kShapeWrongCLastAxis[] = {4, 5, 3};  // channels-first plan: C is axis 1
const int64_t kShapeNegN[] = {-1, 3, 5};
const int64_t kShapeNegSpatial[] = {4, 3, -5};
const int64_t kShapeEmptyN[] = {0, 3, 5};
const int64_t kShapeEmptySpatial[] = {4, 3, 0};
const int64_t kShapeOne[] = {1, 3, 1};
const int64_t kShapeOne2d[] = {1, 3};
const int64_t kShape6d[] = {4, 3, 1, 1, 1, 5};
const int64_t kShapeOverflow[] = {int64_t{1} << 40, 3, int64_t{1} << 40};

constexpr auto kInvalid = SYNCBN_ERROR_INVALID_ARGUMENT;
constexpr auto kTooSmall = SYNCBN_ERROR_BATCH_TOO_SMALL;
int64_t g_negative_count = -1;  // a corrupted num_batches_tracked

const ArgCase kArgCases[] = {
    // forward, training
    {"fwd_valid", Op::kForward, [](CallArgs&) {}, SYNCBN_SUCCESS, ""},
    {"fwd_null_plan", Op::kForward, [](CallArgs& a) { a.plan = nullptr; }, kInvalid, "plan"},
    {"fwd_null_x", Op::kForward, [](CallArgs& a) { a.x = nullptr; }, kInvalid, "x"},
    {"fwd_null_y", Op::kForward, [](CallArgs& a) { a.y = nullptr; }, kInvalid, "y"},
    {"fwd_null_weight", Op::kForward, [](CallArgs& a) { a.weight = nullptr; }, kInvalid, "weight"},
    {"fwd_null_bias", Op::kForward, [](CallArgs& a) { a.bias = nullptr; }, kInvalid, "bias"},
    {"fwd_null_running_mean", Op::kForward, [](CallArgs& a) { a.running_mean = nullptr; },
     kInvalid, "running_mean"},
    {"fwd_null_running_var", Op::kForward, [](CallArgs& a) { a.running_var = nullptr; },
     kInvalid, "running_var"},
    {"fwd_null_num_batches_tracked_cumulative", Op::kForward,
     [](CallArgs& a) { a.num_batches_tracked = nullptr; }, kInvalid, "num_batches_tracked", true},
    {"fwd_null_num_batches_tracked_momentum_ok", Op::kForward,
     [](CallArgs& a) { a.num_batches_tracked = nullptr; }, SYNCBN_SUCCESS, ""},
    {"fwd_negative_num_batches_tracked", Op::kForward,
     [](CallArgs& a) { a.num_batches_tracked = &g_negative_count; }, kInvalid,
     "num_batches_tracked"},
    {"fwd_null_save_stats_ok", Op::kForward,
     [](CallArgs& a) { a.save_mean = a.save_invstd = nullptr; }, SYNCBN_SUCCESS, ""},
    {"fwd_null_shape", Op::kForward, [](CallArgs& a) { a.shape = nullptr; }, kInvalid, "shape"},
    {"fwd_wrong_C", Op::kForward, [](CallArgs& a) { a.shape = kShapeWrongC; }, kInvalid, ""},
    {"fwd_C_on_wrong_axis", Op::kForward, [](CallArgs& a) { a.shape = kShapeWrongCLastAxis; },
     kInvalid, ""},
    {"fwd_ndim_1", Op::kForward, [](CallArgs& a) { a.ndim = 1; }, kInvalid, "ndim"},
    {"fwd_ndim_0", Op::kForward, [](CallArgs& a) { a.ndim = 0; }, kInvalid, "ndim"},
    {"fwd_ndim_6", Op::kForward,
     [](CallArgs& a) {
       a.ndim = 6;
       a.shape = kShape6d;
     },
     kInvalid, "ndim"},
    {"fwd_negative_N", Op::kForward, [](CallArgs& a) { a.shape = kShapeNegN; }, kInvalid, ""},
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
    {"bwd_null_param_grads_ok", Op::kBackward,
     [](CallArgs& a) { a.dweight = a.dbias = nullptr; }, SYNCBN_SUCCESS, ""},
    {"bwd_null_plan", Op::kBackward, [](CallArgs& a) { a.plan = nullptr; }, kInvalid, "plan"},
    {"bwd_null_x", Op::kBackward, [](CallArgs& a) { a.x = nullptr; }, kInvalid, "x"},
    {"bwd_null_dy", Op::kBackward, [](CallArgs& a) { a.dy = nullptr; }, kInvalid, "dy"},
    {"bwd_null_dx", Op::kBackward, [](CallArgs& a) { a.dx = nullptr; }, kInvalid, "dx"},
    {"bwd_null_weight", Op::kBackward, [](CallArgs& a) { a.weight = nullptr; }, kInvalid,
     "weight"},
    {"bwd_null_save_mean", Op::kBackward, [](CallArgs& a) { a.bsave_mean = nullptr; }, kInvalid,
     "save_mean"},
    {"bwd_null_save_invstd", Op::kBackward, [](CallArgs& a) { a.bsave_invstd = nullptr; },
     kInvalid, "save_invstd"},
    {"bwd_wrong_C", Op::kBackward, [](CallArgs& a) { a.shape = kShapeWrongC; }, kInvalid, ""},
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
    {"eval_null_plan", Op::kInference, [](CallArgs& a) { a.plan = nullptr; }, kInvalid, "plan"},
    {"eval_null_x", Op::kInference, [](CallArgs& a) { a.x = nullptr; }, kInvalid, "x"},
    {"eval_null_y", Op::kInference, [](CallArgs& a) { a.y = nullptr; }, kInvalid, "y"},
    {"eval_null_weight", Op::kInference, [](CallArgs& a) { a.weight = nullptr; }, kInvalid,
     "weight"},
    {"eval_null_bias", Op::kInference, [](CallArgs& a) { a.bias = nullptr; }, kInvalid, "bias"},
    {"eval_null_running_mean", Op::kInference, [](CallArgs& a) { a.running_mean = nullptr; },
     kInvalid, "running_mean"},
    {"eval_null_running_var", Op::kInference, [](CallArgs& a) { a.running_var = nullptr; },
     kInvalid, "running_var"},
    {"eval_wrong_C", Op::kInference, [](CallArgs& a) { a.shape = kShapeWrongC; }, kInvalid, ""},
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

INSTANTIATE_TEST_SUITE_P(All, ArgChecks, ::testing::ValuesIn(kArgCases),
                         [](const ::testing::TestParamInfo<ArgCase>& info) {
                           return std::string(info.param.name);
                         });

// Without running statistics, a count of one is fine in training; count 0 is not.
TEST(BatchTooSmall, WithoutTracking) {
  syncbn_comm_t comm = nullptr;
  ASSERT_EQ(syncbn_comm_create_self(&comm), SYNCBN_SUCCESS);
  syncbn_config_t cfg;
  syncbn_config_init(&cfg, 3, SYNCBN_FLOAT32);
  cfg.track_running_stats = 0;
  syncbn_plan_t plan = nullptr;
  ASSERT_EQ(syncbn_plan_create(comm, &cfg, &plan), SYNCBN_SUCCESS);
  const float x[3] = {1, 2, 3}, w[3] = {1, 1, 1}, b[3] = {0, 0, 0};
  float y[3], sm[3], si[3];
  EXPECT_EQ(syncbn_forward_training(plan, 2, kShapeOne2d, x, w, b, y, sm, si, nullptr, nullptr,
                                    nullptr, nullptr),
            SYNCBN_SUCCESS)
      << syncbn_last_error();
  EXPECT_EQ(syncbn_forward_training(plan, 3, kShapeEmptyN, nullptr, w, b, nullptr, sm, si,
                                    nullptr, nullptr, nullptr, nullptr),
            SYNCBN_ERROR_BATCH_TOO_SMALL);
  // Eval without tracking normalizes with this rank's own batch statistics: an empty local batch
  // has nothing to normalize, and that is a success (as torch's eval-mode BatchNorm on N = 0).
  EXPECT_EQ(syncbn_forward_inference(plan, 3, kShapeEmptyN, nullptr, w, b, nullptr, nullptr,
                                     nullptr, nullptr),
            SYNCBN_SUCCESS)
      << syncbn_last_error();
  syncbn_plan_destroy(plan);
  syncbn_comm_destroy(comm);
}

}  // namespace
