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
#include "bad_args.hpp"
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

// The one table of bad arguments (tests/bad_args.hpp), every case: a valid fp32 channels-first
// call on shape (4, 3, 5), affine and tracking, momentum 0.1 (or cumulative), broken in one way
// (CallArgs, CallBuffers: tests/api_calls.hpp), on the self communicator.
class ArgChecks : public ::testing::TestWithParam<ArgCase> {
 protected:
  void SetUp() override {
    ASSERT_EQ(syncbn_comm_create_self(&comm_), SYNCBN_SUCCESS);
    const syncbn_config_t cfg = arg_case_config(GetParam());
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

INSTANTIATE_TEST_SUITE_P(All, ArgChecks, ::testing::ValuesIn(arg_cases()), arg_case_name);

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
  EXPECT_EQ(syncbn_forward_training(plan, 2, bad_args::kShapeOne2d, x, w, b, y, sm, si, nullptr, nullptr,
                                    nullptr, nullptr),
            SYNCBN_SUCCESS)
      << syncbn_last_error();
  EXPECT_EQ(syncbn_forward_training(plan, 3, bad_args::kShapeEmptyN, nullptr, w, b, nullptr, sm, si,
                                    nullptr, nullptr, nullptr, nullptr),
            SYNCBN_ERROR_BATCH_TOO_SMALL);
  // Eval without tracking normalizes with this rank's own batch statistics: an empty local batch
  // has nothing to normalize, and that is a success (as torch's eval-mode BatchNorm on N = 0).
  EXPECT_EQ(syncbn_forward_inference(plan, 3, bad_args::kShapeEmptyN, nullptr, w, b, nullptr, nullptr,
                                     nullptr, nullptr),
            SYNCBN_SUCCESS)
      << syncbn_last_error();
  syncbn_plan_destroy(plan);
  syncbn_comm_destroy(comm);
}

}  // namespace
