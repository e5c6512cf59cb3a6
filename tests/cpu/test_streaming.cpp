// Non-temporal stores (src/cpu/memory.hpp, stream_output_bytes): the elementwise passes write
// outputs of at least SYNCBN_CPU_STREAM_BYTES through an L1 staging buffer and streaming stores.
// Streamed outputs must equal bitwise those of ordinary stores, for every dtype, layout and
// activation (and the relu mask the forward writes beside y), outputs at an address that is not
// a vector boundary, channels-first rows longer
// than a stage, and channels-last rows shorter and longer than one. The ordinary path is
// checked against the fp64 reference elsewhere (test_reference.cpp, test_fused.cpp); ctest
// also runs this whole suite with streaming always on (single.stream*).
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "reference.hpp"
#include "syncbn/syncbn.h"
#include "syncbn/syncbn.hpp"

namespace {

using namespace syncbn_test;

// Sets SYNCBN_CPU_STREAM_BYTES for its lifetime (the kernels read it at every call).
class StreamBytes {
 public:
  explicit StreamBytes(const char* value) {
    const char* old = std::getenv(kName);
    if (old != nullptr) old_ = old;
    setenv(kName, value, 1);
  }
  ~StreamBytes() {
    if (old_) {
      setenv(kName, old_->c_str(), 1);
    } else {
      unsetenv(kName);
    }
  }
  StreamBytes(const StreamBytes&) = delete;
  StreamBytes& operator=(const StreamBytes&) = delete;

 private:
  static constexpr const char* kName = "SYNCBN_CPU_STREAM_BYTES";
  std::optional<std::string> old_;
};

// An output of n elements at `offset` elements past a 64-byte boundary, guard values around it.
template <class T>
struct Placed {
  std::vector<T> room;
  size_t offset;
  Placed(size_t n, size_t off) : room(n + off + 64 / sizeof(T) + 16, T(-7)), offset(off) {
    const auto at = reinterpret_cast<std::uintptr_t>(room.data());
    offset += (64 - at % 64) % 64 / sizeof(T);
  }
  T* data() { return room.data() + offset; }
  // The n elements written, and whether every element around them still holds the guard.
  std::vector<T> written(size_t n) const {
    return std::vector<T>(room.begin() + static_cast<std::ptrdiff_t>(offset),
                          room.begin() + static_cast<std::ptrdiff_t>(offset + n));
  }
  bool guards_intact(size_t n) const {
    for (size_t i = 0; i < room.size(); ++i) {
      if ((i < offset || i >= offset + n) && room[i] != T(-7)) return false;
    }
    return true;
  }
};

template <class T>
struct Outputs {
  std::vector<T> y, dx, dz;
  std::vector<uint8_t> mask;  // with an activation
  bool guards = false;
  std::vector<T> save_mean, save_invstd, dweight, dbias;
};

template <class T>
Outputs<T> run(const Geometry& g, syncbn_activation_t act, size_t offset, const char* stream,
               const std::vector<T>& x, const std::vector<T>& z, const std::vector<T>& dy) {
  StreamBytes env(stream);
  syncbn_config_t cfg = make_cfg(g.c, DtypeOf<T>::value, g.layout, true, true, 0.1);
  cfg.activation = act;
  syncbn::BatchNorm bn(syncbn::Communicator::self(), cfg);
  const auto n = static_cast<size_t>(g.numel()), C = static_cast<size_t>(g.c);
  Placed<T> y(n, offset), dx(n, offset), dz(n, offset);
  Placed<uint8_t> mask(n, offset);
  std::vector<T> weight(C), bias(C), running_mean(C, T(0)), running_var(C, T(1));
  for (size_t c = 0; c < C; ++c) {
    weight[c] = T(0.5) + T(c % 7) / T(4);
    bias[c] = T(c % 5) / T(3) - T(0.5);
  }
  Outputs<T> out{{}, {}, {}, {}, false, std::vector<T>(C), std::vector<T>(C), std::vector<T>(C),
                 std::vector<T>(C)};
  int64_t num_batches_tracked = 0;
  const auto shape = g.shape();
  syncbn_forward_args_t fa{};
  fa.ndim = g.ndim();
  fa.shape = shape.data();
  fa.x = x.data();
  fa.z = act == SYNCBN_ACTIVATION_ADD_RELU ? z.data() : nullptr;
  fa.weight = weight.data();
  fa.bias = bias.data();
  fa.y = y.data();
  fa.save_mean = out.save_mean.data();
  fa.save_invstd = out.save_invstd.data();
  fa.running_mean = running_mean.data();
  fa.running_var = running_var.data();
  fa.num_batches_tracked = &num_batches_tracked;
  fa.mask = act == SYNCBN_ACTIVATION_NONE ? nullptr : mask.data();
  bn.forward_training(fa);
  syncbn_backward_args_t ba{};
  ba.ndim = g.ndim();
  ba.shape = shape.data();
  ba.x = x.data();
  ba.y = act == SYNCBN_ACTIVATION_NONE ? nullptr : y.data();
  ba.dy = dy.data();
  ba.weight = weight.data();
  ba.save_mean = out.save_mean.data();
  ba.save_invstd = out.save_invstd.data();
  ba.dx = dx.data();
  ba.dz = act == SYNCBN_ACTIVATION_ADD_RELU ? dz.data() : nullptr;
  ba.dweight = out.dweight.data();
  ba.dbias = out.dbias.data();
  bn.backward(ba);
  out.y = y.written(n);
  out.dx = dx.written(n);
  out.dz = dz.written(n);
  out.mask = mask.written(n);
  out.guards = y.guards_intact(n) && dx.guards_intact(n) && dz.guards_intact(n) &&
               (act == SYNCBN_ACTIVATION_NONE ? mask.guards_intact(0) : mask.guards_intact(n));
  return out;
}

using StreamParam = std::tuple<syncbn_dtype_t, syncbn_layout_t, syncbn_activation_t, int>;

std::string stream_name(const ::testing::TestParamInfo<StreamParam>& info) {
  const syncbn_activation_t act = std::get<2>(info.param);
  return std::string(dtype_name(std::get<0>(info.param))) + "_" +
         layout_name(std::get<1>(info.param)) + "_" +
         (act == SYNCBN_ACTIVATION_NONE ? "none" : act == SYNCBN_ACTIVATION_RELU ? "relu"
                                                                                 : "add_relu") +
         "_off" + std::to_string(std::get<3>(info.param));
}

class Streaming : public ::testing::TestWithParam<StreamParam> {
 protected:
  template <class T>
  void check() {
    const auto [dtype, layout, act, offset] = GetParam();
    (void)dtype;
    Rng rng(test_seed());
    // A channels-first stage is 4 KiB: 1024 fp32 or 512 fp64 elements; a channels-last one
    // 512 B (128 fp32, 64 fp64), 1 KiB with a mask. Channels-first: rows of 1200 (two stages,
    // the second partial) and of 45; channels-last: rows of 3 channels (many rows per stage;
    // the last stage partial except in fp64 without a mask, 315 rows of 63 elements in 15
    // stages), of 200 (one row per stage with a mask in fp32, else cut into 2 to 4 stages, the
    // last partial) and of 1100 (a row cut into several stages, the last partial). The first
    // and last have more than 32768 elements: split among the OpenMP threads.
    const std::vector<Geometry> shapes = {
        make_geometry(layout, 6, 5, {40, 30}),
        make_geometry(layout, 7, 3, {9, 5}),
        make_geometry(layout, 9, 200, {7}),
        make_geometry(layout, 7, 1100, {5}),
    };
    for (const Geometry& g : shapes) {
      SCOPED_TRACE(g.str());
      const std::vector<T> x = random_batch<T>(g, rng, ChannelDistribution::random(g.c, rng));
      const std::vector<T> z = random_batch<T>(g, rng);
      const std::vector<T> dy = random_batch<T>(g, rng);
      const Outputs<T> plain = run<T>(g, act, static_cast<size_t>(offset), "999999999999999", x, z, dy);
      const Outputs<T> streamed = run<T>(g, act, static_cast<size_t>(offset), "0", x, z, dy);
      EXPECT_TRUE(plain.guards) << "a write outside y, dx, dz or mask";
      EXPECT_TRUE(streamed.guards) << "a streamed write outside y, dx, dz or mask";
      EXPECT_EQ(streamed.y, plain.y) << "y";
      EXPECT_EQ(streamed.mask, plain.mask) << "mask";
      if (act != SYNCBN_ACTIVATION_NONE) {
        for (size_t i = 0; i < plain.y.size(); ++i) {
          ASSERT_EQ(plain.mask[i], plain.y[i] > T(0) ? 1 : 0) << "mask[" << i << "]";
        }
      }
      EXPECT_EQ(streamed.dx, plain.dx) << "dx";
      EXPECT_EQ(streamed.dz, plain.dz) << "dz";
      EXPECT_EQ(streamed.save_mean, plain.save_mean);
      EXPECT_EQ(streamed.save_invstd, plain.save_invstd);
      EXPECT_EQ(streamed.dweight, plain.dweight);
      EXPECT_EQ(streamed.dbias, plain.dbias);
    }
  }
};

TEST_P(Streaming, BitwiseEqualToOrdinaryStores) {
  if (std::get<0>(GetParam()) == SYNCBN_FLOAT32) {
    check<float>();
  } else {
    check<double>();
  }
}

INSTANTIATE_TEST_SUITE_P(
    All, Streaming,
    ::testing::Combine(::testing::Values(SYNCBN_FLOAT32, SYNCBN_FLOAT64),
                       ::testing::Values(SYNCBN_CHANNELS_FIRST, SYNCBN_CHANNELS_LAST),
                       ::testing::Values(SYNCBN_ACTIVATION_NONE, SYNCBN_ACTIVATION_RELU,
                                         SYNCBN_ACTIVATION_ADD_RELU),
                       ::testing::Values(0, 1, 3)),
    stream_name);

}  // namespace
