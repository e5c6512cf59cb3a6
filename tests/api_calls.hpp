// tests/api_calls.hpp: one C API call of forward, backward or eval as a value (CallArgs) that a
// negative test breaks in exactly one way, and a set of valid buffers for it (CallBuffers) that
// can say whether a failed call left everything as it was. The one bad-argument table
// (bad_args.hpp) is made of them, for the single-process, MPI, thread-rank and CUDA suites.
#ifndef SYNCBN_TESTS_API_CALLS_HPP
#define SYNCBN_TESTS_API_CALLS_HPP

#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "reference.hpp"
#include "syncbn/syncbn.h"

namespace syncbn_test {

enum class Op { kForward, kBackward, kInference };

inline const char* op_name(Op op) {
  switch (op) {
    case Op::kForward: return "forward_training";
    case Op::kBackward: return "backward";
    case Op::kInference: return "forward_inference";
  }
  return "?";
}

// The union of the arguments of the three calls.
struct CallArgs {
  syncbn_plan_t plan;
  int ndim;
  const int64_t* shape;
  const void* x;
  const void* dy;
  const void* weight;
  const void* bias;
  void* y;
  void* save_mean;  // forward's outputs
  void* save_invstd;
  void* running_mean;
  void* running_var;
  int64_t* num_batches_tracked;
  const void* bsave_mean;  // backward's inputs
  const void* bsave_invstd;
  void* dx;
  void* dweight;
  void* dbias;
  void* stream;
};

inline syncbn_status_t call(Op op, const CallArgs& a) {
  switch (op) {
    case Op::kForward:
      return syncbn_forward_training(a.plan, a.ndim, a.shape, a.x, a.weight, a.bias, a.y,
                                     a.save_mean, a.save_invstd, a.running_mean, a.running_var,
                                     a.num_batches_tracked, a.stream);
    case Op::kBackward:
      return syncbn_backward(a.plan, a.ndim, a.shape, a.x, a.dy, a.weight, a.bsave_mean,
                             a.bsave_invstd, a.dx, a.dweight, a.dbias, a.stream);
    case Op::kInference:
      return syncbn_forward_inference(a.plan, a.ndim, a.shape, a.x, a.weight, a.bias,
                                      a.running_mean, a.running_var, a.y, a.stream);
  }
  return SYNCBN_ERROR_INTERNAL;
}

// Valid fp32 buffers for a call on shape (n, C, L), channels-first. Parameters and statistics
// come from `seed` alone (identical on every rank); data from seed and rank. Outputs are filled
// with a sentinel.
struct CallBuffers {
  Geometry g;
  std::vector<int64_t> shape;
  std::vector<float> x, dy, y, dx, save_mean, save_invstd, dweight, dbias, bsave_mean,
      bsave_invstd;
  LayerState<float> st;

  CallBuffers(int64_t n, int64_t C, int64_t L, uint32_t seed, int rank = 0) {
    Rng common(seed);
    st = LayerState<float>::random(C, common);
    bsave_mean = random_vector<float>(static_cast<size_t>(C), common, -1, 1);
    bsave_invstd = random_vector<float>(static_cast<size_t>(C), common, 0.5, 2);
    Rng local(seed + 7919u * static_cast<uint32_t>(rank + 1));
    g = make_geometry(SYNCBN_CHANNELS_FIRST, n, C, {L});
    shape = g.shape();
    x = random_batch<float>(g, local);
    dy = random_batch<float>(g, local);
    y.assign(x.size(), -777.f);
    dx.assign(x.size(), -777.f);
    save_mean.assign(static_cast<size_t>(C), -777.f);
    save_invstd.assign(static_cast<size_t>(C), -777.f);
    dweight.assign(static_cast<size_t>(C), -777.f);
    dbias.assign(static_cast<size_t>(C), -777.f);
  }

  // NULL for an empty local tensor.
  template <class V>
  static auto ptr(V& v) {
    return v.empty() ? nullptr : v.data();
  }

  CallArgs args(syncbn_plan_t plan) {
    return CallArgs{plan,
                    g.ndim(),
                    shape.data(),
                    ptr(x),
                    ptr(dy),
                    st.weight.data(),
                    st.bias.data(),
                    ptr(y),
                    save_mean.data(),
                    save_invstd.data(),
                    st.running_mean.data(),
                    st.running_var.data(),
                    &st.num_batches_tracked,
                    bsave_mean.data(),
                    bsave_invstd.data(),
                    ptr(dx),
                    dweight.data(),
                    dbias.data(),
                    nullptr};
  }

  // Every output and every piece of state equals, byte for byte, that of `before`.
  ::testing::AssertionResult unchanged_since(const CallBuffers& before) const {
    for (const auto& [what, now, then] :
         {std::make_tuple("running_mean", &st.running_mean, &before.st.running_mean),
          std::make_tuple("running_var", &st.running_var, &before.st.running_var),
          std::make_tuple("y", &y, &before.y), std::make_tuple("dx", &dx, &before.dx),
          std::make_tuple("save_mean", &save_mean, &before.save_mean),
          std::make_tuple("save_invstd", &save_invstd, &before.save_invstd),
          std::make_tuple("dweight", &dweight, &before.dweight),
          std::make_tuple("dbias", &dbias, &before.dbias)}) {
      auto r = bitwise_equal(std::string(what) + " after a failed call", *now, *then);
      if (!r) return r;
    }
    if (st.num_batches_tracked != before.st.num_batches_tracked)
      return ::testing::AssertionFailure()
             << "num_batches_tracked after a failed call: " << st.num_batches_tracked
             << ", was " << before.st.num_batches_tracked;
    return ::testing::AssertionSuccess();
  }
};

}  // namespace syncbn_test

#endif  // SYNCBN_TESTS_API_CALLS_HPP
