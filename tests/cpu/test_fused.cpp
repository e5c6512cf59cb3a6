// Fused activations on one process (SYNCBN_ACTIVATION_RELU, _ADD_RELU; the named-argument
// calls): for every dtype, layout and spatial rank, the fused plan's outputs equal bitwise what
// a plan without activation gives followed by the activation done by hand (the elementwise pass
// computes the same value, then applies the activation); values exactly at 0 (relu'(0) = 0);
// the arguments each activation requires and refuses. The fp64 reference of the multi-rank
// scenarios (tests/scenarios.hpp, relu_* and add_relu_*) covers the numbers themselves.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/checked_layer.hpp"
#include "reference.hpp"
#include "syncbn/syncbn.h"
#include "syncbn/syncbn.hpp"

namespace {

using namespace syncbn_test;

using FusedParam = std::tuple<syncbn_dtype_t, syncbn_layout_t, int>;

std::string fused_name(const ::testing::TestParamInfo<FusedParam>& info) {
  return std::string(dtype_name(std::get<0>(info.param))) + "_" +
         layout_name(std::get<1>(info.param)) + "_sp" + std::to_string(std::get<2>(info.param));
}

// One layer's tensors for a forward and a backward through the named-argument calls.
template <class T>
struct Tensors {
  std::vector<T> y, save_mean, save_invstd, dx, dz, dweight, dbias;
  LayerState<T> st;
  std::vector<uint8_t> mask;  // with_mask: the forward's relu mask (else empty)
};

// How backward gets its relu mask: from y, or from the mask the forward wrote (y NULL).
enum class MaskFrom { y, mask };

template <class T>
class Fused {
 public:
  Fused(syncbn_layout_t layout, int sdims, syncbn_activation_t act, uint32_t salt)
      : rng_(test_seed(salt)),
        C_(5),
        g_(make_geometry(layout, sdims == 0 ? 12 : 3, C_, spatial_of_rank(sdims))),
        cfg_(make_cfg(C_, DtypeOf<T>::value, layout, true, true, 0.1)),
        init_(LayerState<T>::random(C_, rng_)) {
    cfg_.activation = act;
    x_ = random_batch<T>(g_, rng_, ChannelDistribution::random(C_, rng_));
    dy_ = random_batch<T>(g_, rng_);
  }

  // forward_training then backward on a fresh plan of activation act; z and y_in (the y given to
  // backward) as the caller chooses (NULL: the plan's own forward output for y_in). With
  // MaskFrom::mask the forward writes its mask (into bytes set to 0xA5 first) and backward
  // reads it, with y NULL.
  Tensors<T> run(syncbn_activation_t act, const T* z, const std::vector<T>& dy,
                 const T* y_for_backward = nullptr, MaskFrom from = MaskFrom::y) {
    syncbn_config_t cfg = cfg_;
    cfg.activation = act;
    syncbn::BatchNorm bn(syncbn::Communicator::self(), cfg);
    const size_t n = x_.size(), C = static_cast<size_t>(C_);
    Tensors<T> t{std::vector<T>(n, T(-7)), std::vector<T>(C), std::vector<T>(C),
                 std::vector<T>(n, T(-7)), std::vector<T>(n, T(-7)), std::vector<T>(C),
                 std::vector<T>(C), init_, {}};
    const bool with_mask = from == MaskFrom::mask;
    if (with_mask) t.mask.assign(n, uint8_t{0xA5});
    const auto shape = g_.shape();
    syncbn_forward_args_t fa{};
    fa.ndim = g_.ndim();
    fa.shape = shape.data();
    fa.x = x_.data();
    fa.z = z;
    fa.weight = t.st.weight.data();
    fa.bias = t.st.bias.data();
    fa.y = t.y.data();
    fa.save_mean = t.save_mean.data();
    fa.save_invstd = t.save_invstd.data();
    fa.running_mean = t.st.running_mean.data();
    fa.running_var = t.st.running_var.data();
    fa.num_batches_tracked = &t.st.num_batches_tracked;
    fa.mask = with_mask ? t.mask.data() : nullptr;
    bn.forward_training(fa);
    syncbn_backward_args_t ba{};
    ba.ndim = g_.ndim();
    ba.shape = shape.data();
    ba.x = x_.data();
    ba.y = act == SYNCBN_ACTIVATION_NONE || with_mask
               ? nullptr
               : (y_for_backward ? y_for_backward : t.y.data());
    ba.mask = with_mask ? t.mask.data() : nullptr;
    ba.dy = dy.data();
    ba.weight = t.st.weight.data();
    ba.save_mean = t.save_mean.data();
    ba.save_invstd = t.save_invstd.data();
    ba.dx = t.dx.data();
    ba.dz = act == SYNCBN_ACTIVATION_ADD_RELU ? t.dz.data() : nullptr;
    ba.dweight = t.dweight.data();
    ba.dbias = t.dbias.data();
    bn.backward(ba);
    return t;
  }

  const std::vector<T>& x() const { return x_; }
  const std::vector<T>& dy() const { return dy_; }
  Rng& rng() { return rng_; }
  const Geometry& geometry() const { return g_; }

 private:
  Rng rng_;
  int64_t C_;
  Geometry g_;
  syncbn_config_t cfg_;
  LayerState<T> init_;
  std::vector<T> x_, dy_;
};

template <class T>
std::vector<T> relu_of(std::vector<T> v) {
  for (T& e : v) e = e < T(0) ? T(0) : e;
  return v;
}

template <class T>
std::vector<T> masked_by(const std::vector<T>& dy, const std::vector<T>& y) {
  std::vector<T> g(dy.size());
  for (size_t i = 0; i < dy.size(); ++i) g[i] = y[i] > T(0) ? dy[i] : T(0);
  return g;
}

class FusedCpu : public ::testing::TestWithParam<FusedParam> {
 protected:
  template <class T>
  void relu() {
    Fused<T> f(std::get<1>(GetParam()), std::get<2>(GetParam()), SYNCBN_ACTIVATION_RELU, 1);
    const Tensors<T> plain = f.run(SYNCBN_ACTIVATION_NONE, nullptr, f.dy());
    const Tensors<T> fused = f.run(SYNCBN_ACTIVATION_RELU, nullptr, f.dy());
    // Forward: statistics untouched by the activation, y = max(bn(x), 0) bitwise.
    EXPECT_TRUE(bitwise_equal("save_mean", fused.save_mean, plain.save_mean));
    EXPECT_TRUE(bitwise_equal("save_invstd", fused.save_invstd, plain.save_invstd));
    EXPECT_TRUE(bitwise_equal("running_var", fused.st.running_var, plain.st.running_var));
    EXPECT_TRUE(bitwise_equal("y", fused.y, relu_of(plain.y)));
    // Backward: bn's backward of g = dy (y > 0), bitwise.
    const Tensors<T> want = f.run(SYNCBN_ACTIVATION_NONE, nullptr, masked_by(f.dy(), fused.y));
    EXPECT_TRUE(bitwise_equal("dx", fused.dx, want.dx));
    EXPECT_TRUE(bitwise_equal("dweight", fused.dweight, want.dweight));
    EXPECT_TRUE(bitwise_equal("dbias", fused.dbias, want.dbias));
    // Some outputs are clamped (the mask matters), some pass.
    size_t zeros = 0;
    for (T v : fused.y) zeros += v == T(0);
    EXPECT_GT(zeros, 0u);
    EXPECT_LT(zeros, fused.y.size());
  }

  template <class T>
  void add_relu() {
    Fused<T> f(std::get<1>(GetParam()), std::get<2>(GetParam()), SYNCBN_ACTIVATION_ADD_RELU, 2);
    const std::vector<T> z = random_batch<T>(f.geometry(), f.rng());
    const Tensors<T> plain = f.run(SYNCBN_ACTIVATION_NONE, nullptr, f.dy());
    const Tensors<T> fused = f.run(SYNCBN_ACTIVATION_ADD_RELU, z.data(), f.dy());
    std::vector<T> sum(z.size());
    for (size_t i = 0; i < z.size(); ++i) sum[i] = plain.y[i] + z[i];  // rounded to T, as fused
    EXPECT_TRUE(bitwise_equal("save_mean", fused.save_mean, plain.save_mean));
    EXPECT_TRUE(bitwise_equal("y", fused.y, relu_of(sum)));
    const std::vector<T> g = masked_by(f.dy(), fused.y);
    const Tensors<T> want = f.run(SYNCBN_ACTIVATION_NONE, nullptr, g);
    EXPECT_TRUE(bitwise_equal("dx", fused.dx, want.dx));
    EXPECT_TRUE(bitwise_equal("dz", fused.dz, g));
    EXPECT_TRUE(bitwise_equal("dweight", fused.dweight, want.dweight));
    EXPECT_TRUE(bitwise_equal("dbias", fused.dbias, want.dbias));
  }

  // z = -bn(x): every output is exactly 0, so the mask is all false: dx, dz, dweight and dbias
  // are exactly 0 (relu'(0) = 0, as torch's threshold_backward).
  template <class T>
  void exactly_zero() {
    Fused<T> f(std::get<1>(GetParam()), std::get<2>(GetParam()), SYNCBN_ACTIVATION_ADD_RELU, 3);
    const Tensors<T> plain = f.run(SYNCBN_ACTIVATION_NONE, nullptr, f.dy());
    std::vector<T> z(plain.y.size());
    for (size_t i = 0; i < z.size(); ++i) z[i] = -plain.y[i];
    const Tensors<T> fused = f.run(SYNCBN_ACTIVATION_ADD_RELU, z.data(), f.dy());
    const std::vector<T> zeros(z.size(), T(0)), czeros(fused.dweight.size(), T(0));
    for (size_t i = 0; i < z.size(); ++i) {
      ASSERT_EQ(fused.y[i], T(0)) << "y[" << i << "]";
      ASSERT_EQ(fused.dx[i], T(0)) << "dx[" << i << "]";
      ASSERT_EQ(fused.dz[i], T(0)) << "dz[" << i << "]";
    }
    for (size_t c = 0; c < czeros.size(); ++c) {
      EXPECT_EQ(fused.dweight[c], T(0));
      EXPECT_EQ(fused.dbias[c], T(0));
    }
  }

  // The forward's mask is y > 0 byte for byte (1 or 0), y and the statistics are as without
  // it, and a backward from the mask equals the one from y bitwise.
  template <class T>
  void mask(syncbn_activation_t act, bool exactly_zero) {
    Fused<T> f(std::get<1>(GetParam()), std::get<2>(GetParam()), act, 4);
    std::vector<T> z;
    if (act == SYNCBN_ACTIVATION_ADD_RELU) {
      z = random_batch<T>(f.geometry(), f.rng());
      if (exactly_zero) {  // half the outputs exactly 0: z = -bn(x) at even elements
        const Tensors<T> plain = f.run(SYNCBN_ACTIVATION_NONE, nullptr, f.dy());
        for (size_t i = 0; i < z.size(); i += 2) z[i] = -plain.y[i];
      }
    }
    const T* zp = z.empty() ? nullptr : z.data();
    const Tensors<T> from_y = f.run(act, zp, f.dy());
    const Tensors<T> from_mask = f.run(act, zp, f.dy(), nullptr, MaskFrom::mask);
    EXPECT_TRUE(bitwise_equal("y", from_mask.y, from_y.y));
    EXPECT_TRUE(bitwise_equal("save_mean", from_mask.save_mean, from_y.save_mean));
    EXPECT_TRUE(bitwise_equal("running_var", from_mask.st.running_var, from_y.st.running_var));
    size_t ones = 0;
    for (size_t i = 0; i < from_y.y.size(); ++i) {
      ASSERT_EQ(from_mask.mask[i], from_y.y[i] > T(0) ? 1 : 0) << "mask[" << i << "]";
      ones += from_mask.mask[i];
    }
    EXPECT_GT(ones, 0u);
    EXPECT_LT(ones, from_y.y.size());
    EXPECT_TRUE(bitwise_equal("dx", from_mask.dx, from_y.dx));
    if (act == SYNCBN_ACTIVATION_ADD_RELU) {
      EXPECT_TRUE(bitwise_equal("dz", from_mask.dz, from_y.dz));
    }
    EXPECT_TRUE(bitwise_equal("dweight", from_mask.dweight, from_y.dweight));
    EXPECT_TRUE(bitwise_equal("dbias", from_mask.dbias, from_y.dbias));
  }

  template <class T>
  void masks() {
    mask<T>(SYNCBN_ACTIVATION_RELU, false);
    mask<T>(SYNCBN_ACTIVATION_ADD_RELU, false);
    mask<T>(SYNCBN_ACTIVATION_ADD_RELU, true);
  }
};

TEST_P(FusedCpu, MaskIsYAboveZeroAndBackwardFromItEqualsBackwardFromY) {
  if (std::get<0>(GetParam()) == SYNCBN_FLOAT32) masks<float>(); else masks<double>();
}

TEST_P(FusedCpu, ReluIsBatchNormThenRelu) {
  if (std::get<0>(GetParam()) == SYNCBN_FLOAT32) relu<float>(); else relu<double>();
}
TEST_P(FusedCpu, AddReluIsBatchNormThenAddThenRelu) {
  if (std::get<0>(GetParam()) == SYNCBN_FLOAT32) add_relu<float>(); else add_relu<double>();
}
TEST_P(FusedCpu, OutputsExactlyZeroPassNoGradient) {
  if (std::get<0>(GetParam()) == SYNCBN_FLOAT32) exactly_zero<float>(); else exactly_zero<double>();
}

INSTANTIATE_TEST_SUITE_P(All, FusedCpu,
                         ::testing::Combine(::testing::Values(SYNCBN_FLOAT32, SYNCBN_FLOAT64),
                                            ::testing::Values(SYNCBN_CHANNELS_FIRST,
                                                              SYNCBN_CHANNELS_LAST),
                                            ::testing::Values(0, 1, 2, 3)),
                         fused_name);

// ---- arguments -----------------------------------------------------------------------------

struct ArgCase {
  const char* name;
  syncbn_activation_t activation;
  bool backward;  // else forward_training
  void (*edit)(syncbn_forward_args_t&, syncbn_backward_args_t&);
  const char* message;  // in syncbn_last_error()
};

class FusedArgs : public ::testing::TestWithParam<ArgCase> {};

TEST_P(FusedArgs, RejectedWithItsNameAndNothingWritten) {
  const ArgCase& ac = GetParam();
  syncbn_config_t cfg = make_cfg(3, SYNCBN_FLOAT32, SYNCBN_CHANNELS_FIRST, true, true, 0.1);
  cfg.activation = ac.activation;
  syncbn::BatchNorm bn(syncbn::Communicator::self(), cfg);
  const std::vector<int64_t> shape = {2, 3, 4};
  std::vector<float> x(24, 1.5f), z(24, 0.25f), y(24, -7.f), dy(24, 1.f), dx(24, -7.f),
      dz(24, -7.f), c3(3, 1.f), rm(3, 0.f), rv(3, 1.f), sm(3, 0.f), si(3, 1.f);
  x[3] = 4.f;
  int64_t nbt = 0;
  syncbn_forward_args_t fa{};
  fa.ndim = 3;
  fa.shape = shape.data();
  fa.x = x.data();
  fa.z = ac.activation == SYNCBN_ACTIVATION_ADD_RELU ? z.data() : nullptr;
  fa.weight = fa.bias = c3.data();
  fa.y = y.data();
  fa.save_mean = sm.data();
  fa.save_invstd = si.data();
  fa.running_mean = rm.data();
  fa.running_var = rv.data();
  fa.num_batches_tracked = &nbt;
  syncbn_backward_args_t ba{};
  ba.ndim = 3;
  ba.shape = shape.data();
  ba.x = x.data();
  ba.y = ac.activation == SYNCBN_ACTIVATION_NONE ? nullptr : x.data();
  ba.dy = dy.data();
  ba.weight = c3.data();
  ba.save_mean = sm.data();
  ba.save_invstd = si.data();
  ba.dx = dx.data();
  ba.dz = ac.activation == SYNCBN_ACTIVATION_ADD_RELU ? dz.data() : nullptr;
  ac.edit(fa, ba);
  const syncbn_status_t s = ac.backward ? syncbn_backward_ex(bn.get(), &ba)
                                        : syncbn_forward_training_ex(bn.get(), &fa);
  EXPECT_EQ(s, SYNCBN_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(syncbn_last_error()).find(ac.message), std::string::npos)
      << syncbn_last_error();
  EXPECT_EQ(y, std::vector<float>(24, -7.f));
  EXPECT_EQ(dx, std::vector<float>(24, -7.f));
  EXPECT_EQ(rm, std::vector<float>(3, 0.f));
  EXPECT_EQ(nbt, 0);
}

using FA = syncbn_forward_args_t;
using BA = syncbn_backward_args_t;
const ArgCase kArgCases[] = {
    {"add_relu_without_z", SYNCBN_ACTIVATION_ADD_RELU, false,
     [](FA& f, BA&) { f.z = nullptr; }, "rank 0: z is null"},
    {"z_without_add", SYNCBN_ACTIVATION_RELU, false,
     [](FA& f, BA&) { f.z = f.x; }, "rank 0: z must be NULL"},
    {"z_without_activation", SYNCBN_ACTIVATION_NONE, false,
     [](FA& f, BA&) { f.z = f.x; }, "rank 0: z must be NULL"},
    {"relu_backward_without_y", SYNCBN_ACTIVATION_RELU, true,
     [](FA&, BA& b) { b.y = nullptr; }, "rank 0: y is null"},
    {"y_without_activation", SYNCBN_ACTIVATION_NONE, true,
     [](FA&, BA& b) { b.y = b.x; }, "rank 0: y must be NULL"},
    {"dz_without_add", SYNCBN_ACTIVATION_RELU, true,
     [](FA&, BA& b) { b.dz = b.dx; }, "rank 0: dz must be NULL"},
    {"dz_is_dx", SYNCBN_ACTIVATION_ADD_RELU, true,
     [](FA&, BA& b) { b.dz = b.dx; }, "rank 0: dz must not be the same memory as dx"},
    {"mask_without_activation", SYNCBN_ACTIVATION_NONE, false,
     [](FA& f, BA&) { f.mask = f.y; }, "rank 0: mask must be NULL"},
    {"backward_mask_without_activation", SYNCBN_ACTIVATION_NONE, true,
     [](FA&, BA& b) { b.mask = b.x; }, "rank 0: mask must be NULL"},
    {"backward_y_and_mask", SYNCBN_ACTIVATION_RELU, true,
     [](FA&, BA& b) { b.mask = b.x; }, "rank 0: y must be NULL when mask is given"},
    {"backward_neither_y_nor_mask", SYNCBN_ACTIVATION_ADD_RELU, true,
     [](FA&, BA& b) { b.y = nullptr; }, "rank 0: y is null"},
    {"mask_is_y", SYNCBN_ACTIVATION_RELU, false,
     [](FA& f, BA&) { f.mask = f.y; }, "rank 0: mask must not be the same memory as x, y or z"},
    {"mask_is_z", SYNCBN_ACTIVATION_ADD_RELU, false,
     [](FA& f, BA&) { f.mask = const_cast<void*>(f.z); }, "rank 0: mask must not be the same"},
    {"backward_mask_is_dx", SYNCBN_ACTIVATION_RELU, true,
     [](FA&, BA& b) { b.y = nullptr; b.mask = b.dx; }, "rank 0: mask must not be the same"},
};

INSTANTIATE_TEST_SUITE_P(All, FusedArgs, ::testing::ValuesIn(kArgCases),
                         [](const ::testing::TestParamInfo<ArgCase>& info) {
                           return std::string(info.param.name);
                         });

TEST(FusedArgsNull, NullArgsStructFailsNamingIt) {
  syncbn::BatchNorm bn(syncbn::Communicator::self(),
                       make_cfg(3, SYNCBN_FLOAT32, SYNCBN_CHANNELS_FIRST, true, true, 0.1));
  EXPECT_EQ(syncbn_forward_training_ex(bn.get(), nullptr), SYNCBN_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(syncbn_last_error()).find("rank 0: args is null"), std::string::npos)
      << syncbn_last_error();
  EXPECT_EQ(syncbn_forward_inference_ex(bn.get(), nullptr), SYNCBN_ERROR_INVALID_ARGUMENT);
  EXPECT_EQ(syncbn_backward_ex(bn.get(), nullptr), SYNCBN_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(syncbn_last_error()).find("args is null"), std::string::npos);
}

// A binding that finds the mask wrong (a tensor on another device, say) names it.
TEST(FusedArgsNull, RejectCallNamesTheMask) {
  syncbn_config_t cfg = make_cfg(3, SYNCBN_FLOAT32, SYNCBN_CHANNELS_FIRST, true, true, 0.1);
  cfg.activation = SYNCBN_ACTIVATION_RELU;
  syncbn::BatchNorm bn(syncbn::Communicator::self(), cfg);
  EXPECT_EQ(syncbn_plan_reject_call(bn.get(), SYNCBN_CALL_BACKWARD, "mask", SYNCBN_PROBLEM_DEVICE,
                                    nullptr, nullptr),
            SYNCBN_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(syncbn_last_error())
                .find("rank 0: mask is not in the memory of the plan's device"),
            std::string::npos)
      << syncbn_last_error();
}

TEST(FusedConfig, ActivationOutsideTheEnumerationIsRejected) {
  syncbn_config_t cfg = make_cfg(3, SYNCBN_FLOAT32, SYNCBN_CHANNELS_FIRST, true, true, 0.1);
  cfg.activation = static_cast<syncbn_activation_t>(3);
  syncbn_plan_t plan = nullptr;
  syncbn_comm_t self = nullptr;
  ASSERT_EQ(syncbn_comm_create_self(&self), SYNCBN_SUCCESS);
  EXPECT_EQ(syncbn_plan_create(self, &cfg, &plan), SYNCBN_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(syncbn_last_error()).find("activation is not a valid enumeration value"),
            std::string::npos)
      << syncbn_last_error();
  EXPECT_EQ(plan, nullptr);
  syncbn_comm_destroy(self);
}

// The positional calls are the named ones without z and y: on a RELU plan forward applies the
// relu, and backward asks for y.
TEST(FusedPositional, ForwardAppliesTheActivationBackwardWantsY) {
  syncbn_config_t cfg = make_cfg(2, SYNCBN_FLOAT64, SYNCBN_CHANNELS_LAST, false, false, 0.1);
  cfg.activation = SYNCBN_ACTIVATION_RELU;
  syncbn::BatchNorm bn(syncbn::Communicator::self(), cfg);
  const std::vector<double> x = {1, 10, 3, 20};  // (N=2, C=2) channels-last
  std::vector<double> y(4), sm(2), si(2), dx(4);
  bn.forward_training({2, 2}, x.data(), nullptr, nullptr, y.data(), sm.data(), si.data(),
                      nullptr, nullptr, nullptr);
  EXPECT_EQ(y[0], 0.0);  // (1 - 2) / 1 < 0: clamped
  EXPECT_GT(y[2], 0.0);
  EXPECT_THROW(bn.backward({2, 2}, x.data(), x.data(), nullptr, sm.data(), si.data(), dx.data(),
                           nullptr, nullptr),
               syncbn::Error);
  EXPECT_NE(std::string(syncbn_last_error()).find("y is null"), std::string::npos);
}

}  // namespace
