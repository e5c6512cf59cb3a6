// The C++ API (syncbn/syncbn.hpp) on one process: RAII handles, exceptions carrying the status.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "cpu/checked_layer.hpp"
#include "reference.hpp"
#include "syncbn/syncbn.h"
#include "syncbn/syncbn.hpp"

namespace {

using namespace syncbn_test;

// ---- the C++ API ----------------------------------------------------------------------------

TEST(CppApi, ErrorsCarryTheStatus) {
  const auto comm = syncbn::Communicator::self();
  EXPECT_EQ(comm.rank(), 0);
  EXPECT_EQ(comm.size(), 1);
  syncbn_config_t bad = syncbn::make_config(3);
  bad.eps = 0;
  try {
    syncbn::BatchNorm bn(comm, bad);
    ADD_FAILURE() << "eps = 0 accepted";
  } catch (const syncbn::Error& e) {
    EXPECT_EQ(e.status(), SYNCBN_ERROR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(e.what()).find("eps"), std::string::npos) << e.what();
  }
  try {
    comm.split(2);
    ADD_FAILURE() << "split(2) of a single process accepted";
  } catch (const syncbn::Error& e) {
    EXPECT_EQ(e.status(), SYNCBN_ERROR_INVALID_ARGUMENT);
  }

  syncbn::BatchNorm bn(comm, syncbn::make_config(3));
  EXPECT_TRUE(bn);
  std::vector<float> x(12, 1.f), y(12), w(3, 1.f), b(3, 0.f), rm(3, 0.f), rv(3, 1.f), sm(3), si(3);
  int64_t nbt = 0;
  try {
    bn.forward_training({4, 3}, x.data(), nullptr, b.data(), y.data(), sm.data(), si.data(),
                        rm.data(), rv.data(), &nbt);
    ADD_FAILURE() << "null weight accepted";
  } catch (const syncbn::Error& e) {
    EXPECT_EQ(e.status(), SYNCBN_ERROR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(e.what()).find("weight"), std::string::npos) << e.what();
  }
  try {
    bn.forward_training({0, 3}, nullptr, w.data(), b.data(), nullptr, sm.data(), si.data(),
                        rm.data(), rv.data(), &nbt);
    ADD_FAILURE() << "empty batch accepted";
  } catch (const syncbn::Error& e) {
    EXPECT_EQ(e.status(), SYNCBN_ERROR_BATCH_TOO_SMALL);
  }
  EXPECT_EQ(nbt, 0);
  EXPECT_NO_THROW(bn.forward_training({4, 3}, x.data(), w.data(), b.data(), y.data(), sm.data(),
                                      si.data(), rm.data(), rv.data(), &nbt));
  EXPECT_EQ(nbt, 1);
}

}  // namespace
