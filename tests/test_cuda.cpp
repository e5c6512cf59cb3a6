// Single-process GPU tests: CUDA plans on the self communicator against the CPU implementation
// (a CPU plan on the self communicator, fp32 or fp64, fed the same numbers) and against the fp64
// reference of tests/reference.hpp, for every dtype (fp32, fp64, fp16, bf16), layout and spatial
// rank; empty and one-value batches; misaligned pointers; in-place calls; one channel of 2^26
// values; inputs far from zero; CUDA-graph capture and replay; stream ordering.
//
// Every test that needs a GPU skips (GTEST_SKIP) where cudaGetDeviceCount finds none, so the
// suite passes on machines without one; the no-device behaviour is tested there instead (and
// skipped where a device exists).
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "api_calls.hpp"
#include "bad_args.hpp"
#include "cuda_helpers.hpp"
#include "reference.hpp"
#include "syncbn/syncbn.h"
#include "syncbn/syncbn.hpp"

namespace {

using namespace syncbn_test;

constexpr double kCumulative = SYNCBN_MOMENTUM_CUMULATIVE;

syncbn_config_t cuda_config(int64_t C, syncbn_dtype_t dtype, syncbn_layout_t layout,
                            bool affine = true, bool track = true, double momentum = 0.1,
                            double eps = 1e-5, bool global_grads = false) {
  syncbn_config_t cfg = make_cfg(C, dtype, layout, affine, track, momentum, eps, global_grads);
  cfg.device = SYNCBN_DEVICE_CUDA;
  return cfg;
}

const syncbn_dtype_t kAllDtypes[] = {SYNCBN_FLOAT32, SYNCBN_FLOAT64, SYNCBN_FLOAT16,
                                     SYNCBN_BFLOAT16};

std::string momentum_name(double m) { return is_cumulative(m) ? "cumulative" : "m0p1"; }

// ---- without a GPU ----------------------------------------------------------------------------

// A CUDA plan where no device is usable: SYNCBN_ERROR_INVALID_ARGUMENT naming the device, for
// every dtype, through the C and the C++ API. Runs only where no device is visible.
TEST(CudaNoDevice, PlanCreateFailsNamingTheDevice) {
  if (cuda_device_count() > 0) GTEST_SKIP() << "a CUDA device is visible";
  syncbn_comm_t comm = nullptr;
  ASSERT_EQ(syncbn_comm_create_self(&comm), SYNCBN_SUCCESS);
  for (syncbn_dtype_t dtype : kAllDtypes) {
    SCOPED_TRACE(dtype_name(dtype));
    const syncbn_config_t cfg = cuda_config(3, dtype, SYNCBN_CHANNELS_FIRST);
    syncbn_plan_t plan = nullptr;
    EXPECT_EQ(syncbn_plan_create(comm, &cfg, &plan), SYNCBN_ERROR_INVALID_ARGUMENT)
        << syncbn_last_error();
    EXPECT_EQ(plan, nullptr);
    const std::string msg = syncbn_last_error();
    EXPECT_NE(msg.find("device"), std::string::npos) << "message '" << msg << "'";
    if (plan) syncbn_plan_destroy(plan);
  }
  syncbn_comm_destroy(comm);
  try {
    syncbn::BatchNorm bn(syncbn::Communicator::self(),
                         cuda_config(3, SYNCBN_FLOAT32, SYNCBN_CHANNELS_LAST));
    ADD_FAILURE() << "a CUDA plan without a device was created";
  } catch (const syncbn::Error& e) {
    EXPECT_EQ(e.status(), SYNCBN_ERROR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(e.what()).find("device"), std::string::npos) << e.what();
  }
}

// fp16 and bf16 are CUDA-only: a CPU plan refuses them (with or without a GPU).
TEST(CudaDtypes, SixteenBitOnCpuIsNotSupported) {
  syncbn_comm_t comm = nullptr;
  ASSERT_EQ(syncbn_comm_create_self(&comm), SYNCBN_SUCCESS);
  for (syncbn_dtype_t dtype : {SYNCBN_FLOAT16, SYNCBN_BFLOAT16}) {
    SCOPED_TRACE(dtype_name(dtype));
    syncbn_config_t cfg = syncbn::make_config(3, dtype);
    cfg.device = SYNCBN_DEVICE_CPU;
    syncbn_plan_t plan = nullptr;
    EXPECT_EQ(syncbn_plan_create(comm, &cfg, &plan), SYNCBN_ERROR_NOT_SUPPORTED)
        << syncbn_last_error();
    EXPECT_EQ(plan, nullptr);
    if (plan) syncbn_plan_destroy(plan);
  }
  syncbn_comm_destroy(comm);
}

// A CUDA plan reports the configuration it was made with.
TEST(CudaDtypes, PlanKeepsItsConfig) {
  SYNCBN_SKIP_WITHOUT_CUDA();
  for (syncbn_dtype_t dtype : kAllDtypes) {
    SCOPED_TRACE(dtype_name(dtype));
    syncbn::BatchNorm bn(syncbn::Communicator::self(),
                         cuda_config(7, dtype, SYNCBN_CHANNELS_LAST, false, true, kCumulative));
    const syncbn_config_t got = bn.config();
    EXPECT_EQ(got.device, SYNCBN_DEVICE_CUDA);
    EXPECT_EQ(got.dtype, dtype);
    EXPECT_EQ(got.layout, SYNCBN_CHANNELS_LAST);
    EXPECT_EQ(got.num_features, 7);
    EXPECT_EQ(got.affine, 0);
    EXPECT_TRUE(std::isnan(got.momentum));
  }
}

// ---- a layer run on the GPU and on the CPU side by side ---------------------------------------

struct LayerOptions {
  size_t data_offset = 0;       // elements between the allocation and x, y, dy, dx
  size_t param_offset = 0;      // ... and the parameter and statistics arrays
  bool in_place = false;        // y = x (forward, eval), dx = dy (backward)
  bool default_stream = false;  // stream NULL (the legacy default stream)
};

// A CUDA plan of data type S and a CPU plan of its parameter type P (float, or double for fp64)
// with the same configuration, each with its own copy of the same parameters and statistics
// (the GPU's in device memory). Each step feeds both the same numbers (inputs already rounded to
// S) and compares every GPU output with the CPU's, with tolerances that are the dtype's relative
// tolerance of the magnitude of each output's terms (reference.hpp's scales). Inputs the
// configuration says are ignored are NaN-filled device arrays, so that using them shows.
template <class S>
class GpuVsCpuLayer {
 public:
  using P = typename CudaType<S>::Param;

  GpuVsCpuLayer(const syncbn_config_t& cfg, Rng& rng, const LayerOptions& opt = {})
      : cfg_(cfg), opt_(opt), C_(static_cast<size_t>(cfg.num_features)) {
    syncbn_config_t gcfg = cfg;
    gcfg.dtype = CudaType<S>::dtype;
    gcfg.device = SYNCBN_DEVICE_CUDA;
    syncbn_config_t ccfg = cfg;
    ccfg.dtype = DtypeOf<P>::value;
    ccfg.device = SYNCBN_DEVICE_CPU;
    const auto self = syncbn::Communicator::self();
    gpu_ = syncbn::BatchNorm(self, gcfg);
    cpu_ = syncbn::BatchNorm(self, ccfg);
    st_ = LayerState<P>::random(cfg.num_features, rng);
    dev_ = DeviceLayerState<P>(st_, opt.param_offset);
    nan_.assign(C_, std::numeric_limits<P>::quiet_NaN());
    for (auto* a : {&ign_w_, &ign_b_, &ign_rm_, &ign_rv_})
      *a = DeviceArray<P>(nan_, opt.param_offset);
  }

  // One training step: forward_training then backward, every output against the CPU plan's.
  void train_step(const Geometry& g, const std::vector<P>& x, const std::vector<P>& dy) {
    SCOPED_TRACE("train step on " + g.str());
    const bool track = cfg_.track_running_stats != 0, affine = cfg_.affine != 0;
    const auto shape = g.shape();
    const size_t n = x.size();
    const BatchStats stats = batch_stats(gather(g, x.data()), cfg_.eps);
    const auto w_eff = effective_weight(affine, st_.weight);
    const auto b_eff = effective_bias(affine, st_.bias);
    const S sentinel = CudaType<S>::from_double(-777);

    // ---- forward, CPU
    std::vector<P> y_c(n), sm_c(C_), si_c(C_);
    const std::vector<P> rm_before = st_.running_mean;
    cpu_.forward_training(
        shape, x.data(), affine ? st_.weight.data() : nullptr, affine ? st_.bias.data() : nullptr,
        y_c.data(), sm_c.data(), si_c.data(), track ? st_.running_mean.data() : nullptr,
        track ? st_.running_var.data() : nullptr, track ? &st_.num_batches_tracked : nullptr);

    // ---- forward, GPU
    DeviceArray<S> xd(to_storage<S>(x), opt_.data_offset), yd(n, opt_.data_offset);
    if (!opt_.in_place) yd.fill(sentinel);
    S* y_ptr = opt_.in_place ? xd.data() : yd.data();
    DeviceArray<P> smd(C_, opt_.param_offset), sid(C_, opt_.param_offset);
    smd.fill(P(-777));
    sid.fill(P(-777));
    const LayerState<P> dev_before = dev_.download();
    ASSERT_EQ(syncbn_forward_training(gpu_.get(), g.ndim(), shape.data(), xd.data(), weight(),
                                      bias(), y_ptr, smd.data(), sid.data(),
                                      track ? dev_.running_mean.data() : ign_rm_.data(),
                                      track ? dev_.running_var.data() : ign_rv_.data(),
                                      dev_.num_batches_tracked.data(), stream()),
              SYNCBN_SUCCESS)
        << syncbn_last_error();
    sync();

    Expected y_want = normalize(g, x.data(), stats.mean, stats.invstd, w_eff, b_eff);
    y_want.value = to_double(y_c);
    EXPECT_TRUE(
        all_close("y", download_double(opt_.in_place ? xd : yd), y_want, CudaType<S>::data));
    EXPECT_TRUE(all_close("save_mean", to_double(smd.download()), to_double(sm_c),
                          scaled(CudaType<S>::stats, stats.abs_mean)));
    EXPECT_TRUE(all_close("save_invstd", to_double(sid.download()), to_double(si_c),
                          Tol{CudaType<S>::stats, {}}));
    const LayerState<P> dev_now = dev_.download();
    if (track) {
      std::vector<double> rm_scale;  // |(1-a) old| + |a mean| <= |old| + mean |x|
      for (size_t c = 0; c < C_; ++c)
        rm_scale.push_back(std::fabs(static_cast<double>(rm_before[c])) + stats.abs_mean[c]);
      EXPECT_TRUE(all_close("running_mean", to_double(dev_now.running_mean),
                            to_double(st_.running_mean), scaled(CudaType<S>::stats, rm_scale)));
      EXPECT_TRUE(all_close("running_var", to_double(dev_now.running_var),
                            to_double(st_.running_var), Tol{CudaType<S>::stats, {}}));
    } else {
      EXPECT_TRUE(same_bytes("running_mean (ignored)", ign_rm_.download(), nan_));
      EXPECT_TRUE(same_bytes("running_var (ignored)", ign_rv_.download(), nan_));
      EXPECT_TRUE(
          same_bytes("running_mean (not passed)", dev_now.running_mean, dev_before.running_mean));
    }
    // Incremented when tracking; ignored (unchanged) otherwise, like the CPU plan's.
    EXPECT_EQ(dev_now.num_batches_tracked, st_.num_batches_tracked);

    // ---- backward, from the statistics each forward saved
    std::vector<P> dx_c(n), dw_c(C_), db_c(C_);
    cpu_.backward(shape, x.data(), dy.data(), affine ? st_.weight.data() : nullptr, sm_c.data(),
                  si_c.data(), dx_c.data(), affine ? dw_c.data() : nullptr,
                  affine ? db_c.data() : nullptr);
    const std::vector<double> mean = to_double(sm_c), invstd = to_double(si_c);
    const GradSums sums = grad_sums(gather(g, x.data()), gather(g, dy.data()), mean);
    Expected dx_want = grad_input(g, x.data(), dy.data(), w_eff, mean, invstd, sums);
    dx_want.value = to_double(dx_c);

    DeviceArray<S> x_again;  // in place, the forward overwrote x
    if (opt_.in_place) x_again = DeviceArray<S>(to_storage<S>(x), opt_.data_offset);
    const S* xb = opt_.in_place ? x_again.data() : xd.data();
    DeviceArray<S> dyd(to_storage<S>(dy), opt_.data_offset), dxd(n, opt_.data_offset);
    if (!opt_.in_place) dxd.fill(sentinel);
    S* dx_ptr = opt_.in_place ? dyd.data() : dxd.data();
    DeviceArray<P> dwd(C_, opt_.param_offset), dbd(C_, opt_.param_offset);
    dwd.fill(P(-777));
    dbd.fill(P(-777));
    ASSERT_EQ(syncbn_backward(gpu_.get(), g.ndim(), shape.data(), xb, dyd.data(), weight(),
                              smd.data(), sid.data(), dx_ptr, affine ? dwd.data() : nullptr,
                              affine ? dbd.data() : nullptr, stream()),
              SYNCBN_SUCCESS)
        << syncbn_last_error();
    sync();
    EXPECT_TRUE(
        all_close("dx", download_double(opt_.in_place ? dyd : dxd), dx_want, CudaType<S>::data));
    if (affine) {
      EXPECT_TRUE(all_close("dweight", to_double(dwd.download()), to_double(dw_c),
                            scaled(CudaType<S>::sums, grad_weight_scale(sums, invstd))));
      EXPECT_TRUE(all_close("dbias", to_double(dbd.download()), to_double(db_c),
                            scaled(CudaType<S>::sums, sums.abs_g)));
    }
  }

  // Eval mode: running statistics when tracked, batch statistics otherwise; nothing changes.
  void eval_step(const Geometry& g, const std::vector<P>& x) {
    SCOPED_TRACE("eval step on " + g.str());
    const bool track = cfg_.track_running_stats != 0, affine = cfg_.affine != 0;
    const auto shape = g.shape();
    std::vector<double> mean, invstd;
    if (track) {
      mean = to_double(st_.running_mean);
      invstd = eval_invstd(st_.running_var, cfg_.eps);
    } else {
      const BatchStats stats = batch_stats(gather(g, x.data()), cfg_.eps);
      mean = stats.mean;
      invstd = stats.invstd;
    }
    Expected want = normalize(g, x.data(), mean, invstd, effective_weight(affine, st_.weight),
                              effective_bias(affine, st_.bias));
    std::vector<P> y_c(x.size());
    cpu_.forward_inference(shape, x.data(), affine ? st_.weight.data() : nullptr,
                           affine ? st_.bias.data() : nullptr,
                           track ? st_.running_mean.data() : nullptr,
                           track ? st_.running_var.data() : nullptr, y_c.data());
    want.value = to_double(y_c);

    DeviceArray<S> xd(to_storage<S>(x), opt_.data_offset), yd(x.size(), opt_.data_offset);
    if (!opt_.in_place) yd.fill(CudaType<S>::from_double(-777));
    const LayerState<P> before = dev_.download();
    ASSERT_EQ(syncbn_forward_inference(gpu_.get(), g.ndim(), shape.data(), xd.data(), weight(),
                                       bias(), track ? dev_.running_mean.data() : ign_rm_.data(),
                                       track ? dev_.running_var.data() : ign_rv_.data(),
                                       opt_.in_place ? xd.data() : yd.data(), stream()),
              SYNCBN_SUCCESS)
        << syncbn_last_error();
    sync();
    EXPECT_TRUE(
        all_close("eval y", download_double(opt_.in_place ? xd : yd), want, CudaType<S>::data));
    EXPECT_TRUE(state_unchanged("after eval", dev_, before));
  }

 private:
  const P* weight() const { return cfg_.affine ? dev_.weight.data() : ign_w_.data(); }
  const P* bias() const { return cfg_.affine ? dev_.bias.data() : ign_b_.data(); }
  void* stream() const { return opt_.default_stream ? nullptr : stream_.handle(); }
  void sync() const {
    if (opt_.default_stream)
      SYNCBN_CUDA_EXPECT(cudaStreamSynchronize(nullptr));
    else
      stream_.sync();
  }

  syncbn_config_t cfg_;
  LayerOptions opt_;
  size_t C_;
  syncbn::BatchNorm gpu_, cpu_;
  LayerState<P> st_;         // the CPU plan's parameters and statistics
  DeviceLayerState<P> dev_;  // the GPU plan's
  std::vector<P> nan_;
  DeviceArray<P> ign_w_, ign_b_, ign_rm_, ign_rv_;  // NaN: passed where ignored
  Stream stream_;
};

// ---- 1. every kernel against the CPU: dtype x layout x spatial rank x C ------------------------

// Local batches per (spatial rank, C): few channels get many values each (several blocks per
// channel), many channels few; sizes that are not multiples of 4 or 8. step changes N.
Geometry combo_geometry(syncbn_layout_t layout, int sdims, int64_t C, int step) {
  const bool few = C <= 3;
  switch (sdims) {
    case 0:
      return make_geometry(layout, (few ? 1000 : C < 1000 ? 67 : 17) + step, C, {});
    case 1:
      return make_geometry(layout, (few ? 5 : 3) + step, C, {few ? 1001 : 5});
    case 2:
      return make_geometry(layout, (few ? 3 : 2) + step, C,
                           few ? std::vector<int64_t>{37, 41} : std::vector<int64_t>{7, 7});
    default:
      return make_geometry(layout, 2 + step, C,
                           few ? std::vector<int64_t>{9, 10, 11} : std::vector<int64_t>{3, 2, 5});
  }
}

// Three layers on the same kind of batch:
//   A: affine, tracking, momentum 0.1, eps 1e-3 (a misplaced eps shows): two steps with
//      different N, then eval with the running statistics;
//   B: no affine, tracking, cumulative momentum, on the legacy default stream: one step, eval;
//   C: affine, no tracking, global parameter gradients: one step, eval with batch statistics.
template <class S>
void run_kernel_combo(syncbn_layout_t layout, int sdims, int64_t C) {
  using P = typename CudaType<S>::Param;
  Rng rng(test_seed());
  const auto dist = ChannelDistribution::random(C, rng);
  auto batch = [&](const Geometry& g) { return rounded_to<S>(random_batch<P>(g, rng, dist)); };
  auto grad = [&](const Geometry& g) { return rounded_to<S>(random_batch<P>(g, rng)); };
  const Geometry g0 = combo_geometry(layout, sdims, C, 0), g1 = combo_geometry(layout, sdims, C, 1);
  const syncbn_dtype_t dt = CudaType<S>::dtype;
  {
    SCOPED_TRACE("A: affine, tracking, momentum 0.1");
    GpuVsCpuLayer<S> layer(cuda_config(C, dt, layout, true, true, 0.1, 1e-3), rng);
    for (const Geometry* g : {&g0, &g1}) {
      layer.train_step(*g, batch(*g), grad(*g));
      if (::testing::Test::HasFatalFailure()) return;
    }
    layer.eval_step(g0, batch(g0));
    if (::testing::Test::HasFatalFailure()) return;
  }
  {
    SCOPED_TRACE("B: no affine, tracking, cumulative momentum, default stream");
    LayerOptions opt;
    opt.default_stream = true;
    GpuVsCpuLayer<S> layer(cuda_config(C, dt, layout, false, true, kCumulative), rng, opt);
    layer.train_step(g1, batch(g1), grad(g1));
    if (::testing::Test::HasFatalFailure()) return;
    layer.eval_step(g0, batch(g0));
    if (::testing::Test::HasFatalFailure()) return;
  }
  {
    SCOPED_TRACE("C: affine, no tracking, global parameter gradients");
    GpuVsCpuLayer<S> layer(cuda_config(C, dt, layout, true, false, 0.1, 1e-5, true), rng);
    layer.train_step(g0, batch(g0), grad(g0));
    if (::testing::Test::HasFatalFailure()) return;
    layer.eval_step(g1, batch(g1));
  }
}

using KernelParam = std::tuple<syncbn_dtype_t, syncbn_layout_t, int, int64_t>;
class CudaKernels : public ::testing::TestWithParam<KernelParam> {};

TEST_P(CudaKernels, MatchCpuPlan) {
  SYNCBN_SKIP_WITHOUT_CUDA();
  const syncbn_dtype_t dtype = std::get<0>(GetParam());
  const syncbn_layout_t layout = std::get<1>(GetParam());
  const int sdims = std::get<2>(GetParam());
  const int64_t C = std::get<3>(GetParam());
  dispatch_cuda_dtype(dtype, [&](auto tag) { run_kernel_combo<decltype(tag)>(layout, sdims, C); });
}

INSTANTIATE_TEST_SUITE_P(
    All, CudaKernels,
    ::testing::Combine(::testing::ValuesIn(kAllDtypes),
                       ::testing::Values(SYNCBN_CHANNELS_FIRST, SYNCBN_CHANNELS_LAST),
                       ::testing::Values(0, 1, 2, 3), ::testing::Values<int64_t>(1, 3, 129, 1000)),
    [](const ::testing::TestParamInfo<KernelParam>& info) {
      return std::string(dtype_name(std::get<0>(info.param))) + "_" +
             layout_name(std::get<1>(info.param)) + "_sp" +
             std::to_string(std::get<2>(info.param)) + "_C" +
             std::to_string(std::get<3>(info.param));
    });

using DtypeLayout = std::tuple<syncbn_dtype_t, syncbn_layout_t>;
std::string dtype_layout_name(const ::testing::TestParamInfo<DtypeLayout>& info) {
  return std::string(dtype_name(std::get<0>(info.param))) + "_" +
         layout_name(std::get<1>(info.param));
}
const auto kAllDtypeLayouts =
    ::testing::Combine(::testing::ValuesIn(kAllDtypes),
                       ::testing::Values(SYNCBN_CHANNELS_FIRST, SYNCBN_CHANNELS_LAST));

// ---- empty and one-value batches ---------------------------------------------------------------

// The global batch of the self communicator is the local one. m == 0 (N = 0, or a spatial size
// of 0), with NULL or valid data pointers: forward_training and backward return
// SYNCBN_ERROR_BATCH_TOO_SMALL from the call itself and change nothing (running statistics,
// num_batches_tracked, save_*, dweight, dbias); eval succeeds with nothing to do, with tracking
// and without (this rank's own batch statistics: an empty batch has nothing to normalize).
// m == 1 in training with tracking (unbiased variance undefined): too small, nothing changed;
// without tracking it is fine (y = bias) and matches the CPU.
template <class S>
void run_empty_batches(syncbn_layout_t layout) {
  using P = typename CudaType<S>::Param;
  const int64_t C = 3;
  const size_t c = static_cast<size_t>(C);
  Rng rng(test_seed());
  Stream stream;
  const std::vector<P> sentinel(c, P(-777));
  for (const bool track : {true, false}) {
    SCOPED_TRACE(track ? "tracking" : "not tracking");
    syncbn::BatchNorm bn(syncbn::Communicator::self(),
                         cuda_config(C, CudaType<S>::dtype, layout, true, track, 0.1));
    const LayerState<P> st = LayerState<P>::random(C, rng);
    DeviceLayerState<P> dev(st);
    DeviceArray<S> dummy(8);  // a valid device pointer for an empty tensor
    DeviceArray<P> sm(sentinel), si(sentinel), dw(sentinel), db(sentinel);
    for (const Geometry& g :
         {make_geometry(layout, 0, C, {}), make_geometry(layout, 0, C, {4, 5}),
          make_geometry(layout, 3, C, {0}), make_geometry(layout, 2, C, {3, 0, 2})}) {
      for (const bool null_data : {true, false}) {
        SCOPED_TRACE(g.str() + (null_data ? ", NULL data" : ", valid data pointers"));
        S* data = null_data ? nullptr : dummy.data();
        const auto shape = g.shape();
        EXPECT_EQ(syncbn_forward_training(bn.get(), g.ndim(), shape.data(), data, dev.weight.data(),
                                          dev.bias.data(), data, sm.data(), si.data(),
                                          dev.running_mean.data(), dev.running_var.data(),
                                          dev.num_batches_tracked.data(), stream.handle()),
                  SYNCBN_ERROR_BATCH_TOO_SMALL)
            << syncbn_last_error();
        stream.sync();
        EXPECT_TRUE(state_unchanged("after an empty forward", dev, st));
        EXPECT_TRUE(same_bytes("save_mean after an empty forward", sm.download(), sentinel));
        EXPECT_TRUE(same_bytes("save_invstd after an empty forward", si.download(), sentinel));
        EXPECT_EQ(
            syncbn_backward(bn.get(), g.ndim(), shape.data(), data, data, dev.weight.data(),
                            sm.data(), si.data(), data, dw.data(), db.data(), stream.handle()),
            SYNCBN_ERROR_BATCH_TOO_SMALL)
            << syncbn_last_error();
        stream.sync();
        EXPECT_TRUE(same_bytes("dweight after an empty backward", dw.download(), sentinel));
        EXPECT_TRUE(same_bytes("dbias after an empty backward", db.download(), sentinel));
        EXPECT_EQ(syncbn_forward_inference(
                      bn.get(), g.ndim(), shape.data(), data, dev.weight.data(), dev.bias.data(),
                      dev.running_mean.data(), dev.running_var.data(), data, stream.handle()),
                  SYNCBN_SUCCESS)
            << syncbn_last_error();
        stream.sync();
        EXPECT_TRUE(state_unchanged("after an empty eval", dev, st));
        // Errors the call returned are not reported again as asynchronous ones.
        syncbn_status_t async = SYNCBN_ERROR_INTERNAL;
        EXPECT_EQ(syncbn_plan_get_async_error(bn.get(), stream.handle(), &async), SYNCBN_SUCCESS);
        EXPECT_EQ(async, SYNCBN_SUCCESS) << syncbn_last_error();
      }
    }
    if (!track) continue;
    // m == 1 with tracking.
    for (const Geometry& g :
         {make_geometry(layout, 1, C, {}), make_geometry(layout, 1, C, {1, 1})}) {
      SCOPED_TRACE(g.str());
      const auto shape = g.shape();
      DeviceArray<S> x(to_storage<S>(rounded_to<S>(random_batch<P>(g, rng)))), y(c);
      const std::vector<S> y_before(c, CudaType<S>::from_double(-777));
      y.upload(y_before);
      EXPECT_EQ(syncbn_forward_training(bn.get(), g.ndim(), shape.data(), x.data(),
                                        dev.weight.data(), dev.bias.data(), y.data(), sm.data(),
                                        si.data(), dev.running_mean.data(), dev.running_var.data(),
                                        dev.num_batches_tracked.data(), stream.handle()),
                SYNCBN_ERROR_BATCH_TOO_SMALL)
          << syncbn_last_error();
      stream.sync();
      EXPECT_TRUE(state_unchanged("after a forward of one value", dev, st));
      EXPECT_TRUE(same_bytes("y after a forward of one value", y.download(), y_before));
      EXPECT_TRUE(same_bytes("save_mean after a forward of one value", sm.download(), sentinel));
    }
  }
  // m == 1 without tracking: y = bias, dx = 0; as the CPU does.
  GpuVsCpuLayer<S> layer(cuda_config(C, CudaType<S>::dtype, layout, true, false, 0.1), rng);
  for (const Geometry& g : {make_geometry(layout, 1, C, {}), make_geometry(layout, 1, C, {1})}) {
    layer.train_step(g, rounded_to<S>(random_batch<P>(g, rng)),
                     rounded_to<S>(random_batch<P>(g, rng)));
    if (::testing::Test::HasFatalFailure()) return;
  }
}

class CudaEmptyBatch : public ::testing::TestWithParam<DtypeLayout> {};
TEST_P(CudaEmptyBatch, TooSmallAndNothingChanged) {
  SYNCBN_SKIP_WITHOUT_CUDA();
  const syncbn_layout_t layout = std::get<1>(GetParam());
  dispatch_cuda_dtype(std::get<0>(GetParam()),
                      [&](auto tag) { run_empty_batches<decltype(tag)>(layout); });
}
INSTANTIATE_TEST_SUITE_P(All, CudaEmptyBatch, kAllDtypeLayouts, dtype_layout_name);

// ---- odd alignments, in place ------------------------------------------------------------------

// Every data, parameter and statistics pointer one element past an aligned address, with channel
// counts and spatial sizes that are not multiples of 4 or 8: the kernels' vector loads must fall
// back (or peel) correctly.
template <class S>
void run_misaligned(syncbn_layout_t layout) {
  using P = typename CudaType<S>::Param;
  Rng rng(test_seed());
  LayerOptions opt;
  opt.data_offset = 1;
  opt.param_offset = 1;
  for (const int64_t C : {3, 8, 129}) {
    SCOPED_TRACE("C = " + std::to_string(C));
    const auto dist = ChannelDistribution::random(C, rng);
    GpuVsCpuLayer<S> layer(cuda_config(C, CudaType<S>::dtype, layout, true, true, 0.1), rng, opt);
    for (const Geometry& g :
         {make_geometry(layout, 3, C, {7, 7}), make_geometry(layout, 5, C, {5}),
          make_geometry(layout, 2, C, {3, 5, 7}), make_geometry(layout, 13, C, {})}) {
      layer.train_step(g, rounded_to<S>(random_batch<P>(g, rng, dist)),
                       rounded_to<S>(random_batch<P>(g, rng)));
      if (::testing::Test::HasFatalFailure()) return;
      layer.eval_step(g, rounded_to<S>(random_batch<P>(g, rng, dist)));
      if (::testing::Test::HasFatalFailure()) return;
    }
  }
}

class CudaMisaligned : public ::testing::TestWithParam<DtypeLayout> {};
TEST_P(CudaMisaligned, PointersOffsetByOneElement) {
  SYNCBN_SKIP_WITHOUT_CUDA();
  const syncbn_layout_t layout = std::get<1>(GetParam());
  dispatch_cuda_dtype(std::get<0>(GetParam()),
                      [&](auto tag) { run_misaligned<decltype(tag)>(layout); });
}
INSTANTIATE_TEST_SUITE_P(All, CudaMisaligned, kAllDtypeLayouts, dtype_layout_name);

// y may equal x (forward, eval) and dx may equal dy (backward).
template <class S>
void run_in_place(syncbn_layout_t layout) {
  using P = typename CudaType<S>::Param;
  Rng rng(test_seed());
  LayerOptions opt;
  opt.in_place = true;
  const int64_t C = 6;
  const auto dist = ChannelDistribution::random(C, rng);
  GpuVsCpuLayer<S> layer(cuda_config(C, CudaType<S>::dtype, layout, true, true, 0.1), rng, opt);
  for (const Geometry& g : {make_geometry(layout, 4, C, {8, 8}), make_geometry(layout, 9, C, {})}) {
    layer.train_step(g, rounded_to<S>(random_batch<P>(g, rng, dist)),
                     rounded_to<S>(random_batch<P>(g, rng)));
    if (::testing::Test::HasFatalFailure()) return;
    layer.eval_step(g, rounded_to<S>(random_batch<P>(g, rng, dist)));
    if (::testing::Test::HasFatalFailure()) return;
  }
}

class CudaInPlace : public ::testing::TestWithParam<DtypeLayout> {};
TEST_P(CudaInPlace, OutputOverInput) {
  SYNCBN_SKIP_WITHOUT_CUDA();
  const syncbn_layout_t layout = std::get<1>(GetParam());
  dispatch_cuda_dtype(std::get<0>(GetParam()),
                      [&](auto tag) { run_in_place<decltype(tag)>(layout); });
}
INSTANTIATE_TEST_SUITE_P(All, CudaInPlace, kAllDtypeLayouts, dtype_layout_name);

// ---- 2. one channel of 2^26 values
// ---------------------------------------------------------------

// |got[i] - want(i)| <= rel * scale(i) for every i, without materializing want (2^26 values).
template <class F>
::testing::AssertionResult streaming_close(const std::string& what, const std::vector<float>& got,
                                           F&& want_and_scale, double rel) {
  size_t bad = 0, worst = 0;
  double worst_ratio = 0, worst_want = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const std::pair<double, double> ws = want_and_scale(i);
    const double err = std::fabs(static_cast<double>(got[i]) - ws.first);
    const double bound = rel * ws.second;
    if (!(err <= bound)) {
      ++bad;
      const double ratio = bound > 0 ? err / bound : std::numeric_limits<double>::infinity();
      if (!(ratio <= worst_ratio)) {
        worst_ratio = ratio;
        worst = i;
        worst_want = ws.first;
      }
    }
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << what << ": " << bad << " of " << got.size() << " out of tolerance; worst at [" << worst
         << "]: got " << got[worst] << ", want " << worst_want << " (" << worst_ratio
         << " x the tolerance)";
}

// fp32, C = 1, m = 2^26 in one channel, in shapes that cut the channel differently (one long
// spatial plane, many samples, a 2-d batch, a long 1-d sequence): mean, variance, invstd and the
// running statistics against an fp64 (long double) host reference, then y, dx, dweight, dbias.
// Plain fp32 running sums over 2^26 values would be off by far more than the 1e-5 asked.
TEST(CudaHugeChannel, TwoToThe26ValuesInOneChannel) {
  SYNCBN_SKIP_WITHOUT_CUDA();
  const int64_t M = int64_t{1} << 26;
  size_t free_bytes = 0, total_bytes = 0;
  SYNCBN_CUDA_ASSERT(cudaMemGetInfo(&free_bytes, &total_bytes));
  if (free_bytes < (size_t{3} << 29))
    GTEST_SKIP() << "needs 1.5 GiB of free device memory, " << free_bytes << " bytes free";

  // With C = 1 every layout stores the channel's values in the same order: one draw serves all.
  std::mt19937_64 gen(test_seed());
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<float> x(static_cast<size_t>(M)), dy(static_cast<size_t>(M));
  for (auto& v : x) v = static_cast<float>(3.0 + 2.0 * normal(gen));
  for (auto& v : dy) v = static_cast<float>(normal(gen) - 0.25);

  long double s = 0, a = 0;
  for (float v : x) {
    s += v;
    a += std::fabs(v);
  }
  const long double mean_l = s / M;
  long double q = 0;
  for (float v : x) q += (v - mean_l) * (v - mean_l);
  const double mean = static_cast<double>(mean_l), abs_mean = static_cast<double>(a / M);
  const double var = static_cast<double>(q / M), eps = 1e-5;
  const double invstd = 1.0 / std::sqrt(var + eps);
  const double unbiased = var * static_cast<double>(M) / static_cast<double>(M - 1);
  const double w = 1.25, b = -0.5;
  constexpr double kTol = 1e-5;

  DeviceArray<float> xd(x), dyd(dy), yd(static_cast<size_t>(M)), dxd(static_cast<size_t>(M));
  Stream stream;
  struct Case {
    const char* name;
    syncbn_layout_t layout;
    std::vector<int64_t> shape;
  };
  const Case cases[] = {
      {"NCHW (1, 1, 8192, 8192)", SYNCBN_CHANNELS_FIRST, {1, 1, 8192, 8192}},
      {"NHWC (16, 2048, 2048, 1)", SYNCBN_CHANNELS_LAST, {16, 2048, 2048, 1}},
      {"(N, C) = (2^26, 1)", SYNCBN_CHANNELS_FIRST, {M, 1}},
      {"NLC (4, 2^24, 1)", SYNCBN_CHANNELS_LAST, {4, int64_t{1} << 24, 1}},
  };
  for (const Case& tc : cases) {
    SCOPED_TRACE(tc.name);
    syncbn_config_t cfg = cuda_config(1, SYNCBN_FLOAT32, tc.layout, true, true, 1.0, eps);
    syncbn::BatchNorm bn(syncbn::Communicator::self(), cfg);
    LayerState<float> st;
    st.weight = {static_cast<float>(w)};
    st.bias = {static_cast<float>(b)};
    st.running_mean = {0.f};
    st.running_var = {1.f};
    st.num_batches_tracked = 0;
    DeviceLayerState<float> dev(st);
    DeviceArray<float> sm(1), si(1), dw(1), db(1);
    const int ndim = static_cast<int>(tc.shape.size());
    ASSERT_EQ(syncbn_forward_training(bn.get(), ndim, tc.shape.data(), xd.data(), dev.weight.data(),
                                      dev.bias.data(), yd.data(), sm.data(), si.data(),
                                      dev.running_mean.data(), dev.running_var.data(),
                                      dev.num_batches_tracked.data(), stream.handle()),
              SYNCBN_SUCCESS)
        << syncbn_last_error();
    stream.sync();
    const double save_mean = sm.download()[0], save_invstd = si.download()[0];
    const LayerState<float> now = dev.download();
    EXPECT_NEAR(save_mean, mean, kTol * abs_mean);
    EXPECT_NEAR(save_invstd, invstd, kTol * invstd);
    EXPECT_NEAR(now.running_mean[0], mean, kTol * abs_mean) << "momentum 1: the batch mean";
    EXPECT_NEAR(now.running_var[0], unbiased, kTol * unbiased)
        << "momentum 1: the unbiased batch variance";
    EXPECT_EQ(now.num_batches_tracked, 1);
    const std::vector<float> y = yd.download();
    EXPECT_TRUE(streaming_close(
        "y", y,
        [&](size_t i) {
          const double xi = x[i];
          return std::make_pair(
              (xi - mean) * invstd * w + b,
              (std::fabs(xi) + std::fabs(mean)) * std::fabs(invstd * w) + std::fabs(b));
        },
        kTol));

    // Backward from the saved statistics.
    ASSERT_EQ(
        syncbn_backward(bn.get(), ndim, tc.shape.data(), xd.data(), dyd.data(), dev.weight.data(),
                        sm.data(), si.data(), dxd.data(), dw.data(), db.data(), stream.handle()),
        SYNCBN_SUCCESS)
        << syncbn_last_error();
    stream.sync();
    long double sg = 0, sgx = 0, ag = 0, agx = 0;
    for (size_t i = 0; i < x.size(); ++i) {
      const long double gx = static_cast<long double>(dy[i]) * (x[i] - save_mean);
      sg += dy[i];
      sgx += gx;
      ag += std::fabs(dy[i]);
      agx += std::fabs(gx);
    }
    EXPECT_NEAR(db.download()[0], static_cast<double>(sg), kTol * static_cast<double>(ag));
    EXPECT_NEAR(dw.download()[0], static_cast<double>(sgx) * save_invstd,
                kTol * static_cast<double>(agx) * save_invstd);
    const double mg = static_cast<double>(sg / M), mgx = static_cast<double>(sgx / M);
    const std::vector<float> dx = dxd.download();
    EXPECT_TRUE(streaming_close(
        "dx", dx,
        [&](size_t i) {
          const double xm = static_cast<double>(x[i]) - save_mean;
          const double is = save_invstd;
          return std::make_pair(w * is * (dy[i] - mg - xm * is * is * mgx),
                                std::fabs(w * is) * (std::fabs(dy[i]) + std::fabs(mg) +
                                                     (std::fabs(x[i]) + std::fabs(save_mean)) * is *
                                                         is * std::fabs(mgx)));
        },
        kTol));
  }
}

// ---- 3. inputs far from zero -------------------------------------------------------------------

// mean / std = 1e4 in fp32 (x = 1e4 + N(0, 1); channels at -1e4 and 3e4 with std 3), and
// mean / std = 50 in fp16 / bf16, 65536 values per channel: the variance (running_var with
// momentum 1 is exactly the unbiased batch variance) and invstd against the fp64 reference of the
// (rounded) inputs to 1e-4; y to fp32 accuracy norm-wise for fp32 (the mean must not be rounded
// to fp32 before x - mean), to the dtype's rounding for 16-bit.
template <class S>
void run_large_mean(syncbn_layout_t layout) {
  using P = typename CudaType<S>::Param;
  const bool fp32 = CudaType<S>::dtype == SYNCBN_FLOAT32;
  const double mu = fp32 ? 1e4 : 50.0;
  constexpr double kStatsTol = 1e-4;
  const double y_tol = fp32 ? 2e-5 : CudaType<S>::data;
  Rng rng(test_seed());
  const int64_t C = 3;
  const size_t c = static_cast<size_t>(C);
  const Geometry g = make_geometry(layout, 16, C, {64, 64});
  ChannelDistribution dist = ChannelDistribution::constant(C, mu, 1.0);
  dist.mu[1] = -mu;
  dist.mu[2] = 3 * mu;
  dist.sd[2] = 3.0;
  const std::vector<P> x = rounded_to<S>(random_batch<P>(g, rng, dist));
  const LayerState<P> st = LayerState<P>::random(C, rng);
  const syncbn_config_t cfg = cuda_config(C, CudaType<S>::dtype, layout, true, true, 1.0);
  syncbn::BatchNorm bn(syncbn::Communicator::self(), cfg);
  DeviceLayerState<P> dev(st);
  DeviceArray<S> xd(to_storage<S>(x)), yd(x.size());
  DeviceArray<P> sm(c), si(c);
  Stream stream;
  const auto shape = g.shape();
  ASSERT_EQ(syncbn_forward_training(bn.get(), g.ndim(), shape.data(), xd.data(), dev.weight.data(),
                                    dev.bias.data(), yd.data(), sm.data(), si.data(),
                                    dev.running_mean.data(), dev.running_var.data(),
                                    dev.num_batches_tracked.data(), stream.handle()),
            SYNCBN_SUCCESS)
      << syncbn_last_error();
  stream.sync();

  const BatchStats ref = batch_stats(gather(g, x.data()), cfg.eps);
  const double m = static_cast<double>(ref.count);
  std::vector<double> unbiased;
  for (double v : ref.var) unbiased.push_back(v * m / (m - 1));
  const LayerState<P> now = dev.download();
  EXPECT_TRUE(all_close("running_var (= unbiased batch variance)", to_double(now.running_var),
                        unbiased, Tol{kStatsTol, {}}));
  EXPECT_TRUE(all_close("save_invstd", to_double(si.download()), ref.invstd, Tol{kStatsTol, {}}));
  EXPECT_TRUE(all_close("save_mean", to_double(sm.download()), ref.mean, Tol{1e-6, {}}));
  EXPECT_TRUE(all_close("running_mean (= batch mean)", to_double(now.running_mean), ref.mean,
                        Tol{1e-6, {}}));
  const auto y_want =
      normalize(g, x.data(), ref.mean, ref.invstd, to_double(st.weight), to_double(st.bias)).value;
  EXPECT_TRUE(all_close("y", download_double(yd), y_want, normwise(y_tol, y_want)));
}

using LargeMeanParam = std::tuple<syncbn_dtype_t, syncbn_layout_t>;
class CudaLargeMean : public ::testing::TestWithParam<LargeMeanParam> {};
TEST_P(CudaLargeMean, VarianceIsPrecise) {
  SYNCBN_SKIP_WITHOUT_CUDA();
  const syncbn_layout_t layout = std::get<1>(GetParam());
  dispatch_cuda_dtype(std::get<0>(GetParam()),
                      [&](auto tag) { run_large_mean<decltype(tag)>(layout); });
}
INSTANTIATE_TEST_SUITE_P(
    All, CudaLargeMean,
    ::testing::Combine(::testing::Values(SYNCBN_FLOAT32, SYNCBN_FLOAT16, SYNCBN_BFLOAT16),
                       ::testing::Values(SYNCBN_CHANNELS_FIRST, SYNCBN_CHANNELS_LAST)),
    dtype_layout_name);

// ---- 4. CUDA graphs
// -------------------------------------------------------------------------------

// forward_training + backward captured once (global or thread-local capture mode) on a
// non-default stream and replayed 10 times with new data each time: every step equals the same
// step run eagerly and the CPU plan's; running statistics evolve each step (momentum 0.1 and
// the cumulative average, whose weight 1 / num_batches_tracked must be read on the device at
// every replay, not frozen at capture); num_batches_tracked reaches 10.
using GraphParam = std::tuple<cudaStreamCaptureMode, double, DtypeLayout>;
class CudaGraph : public ::testing::TestWithParam<GraphParam> {};

TEST_P(CudaGraph, ReplayMatchesEagerSteps) {
  SYNCBN_SKIP_WITHOUT_CUDA();
  GraphCheck o;
  o.mode = std::get<0>(GetParam());
  o.momentum = std::get<1>(GetParam());
  o.layout = std::get<1>(std::get<2>(GetParam()));
  o.seed = test_seed();
  o.steps = 10;
  o.compare_with_cpu = true;
  const syncbn::Communicator self = syncbn::Communicator::self();
  dispatch_cuda_dtype(std::get<0>(std::get<2>(GetParam())),
                      [&](auto tag) { check_graph_replay<decltype(tag)>(self.get(), o); });
}

INSTANTIATE_TEST_SUITE_P(
    All, CudaGraph,
    ::testing::Combine(::testing::Values(cudaStreamCaptureModeGlobal,
                                         cudaStreamCaptureModeThreadLocal),
                       ::testing::Values(0.1, kCumulative),
                       ::testing::Values(DtypeLayout{SYNCBN_FLOAT32, SYNCBN_CHANNELS_FIRST},
                                         DtypeLayout{SYNCBN_FLOAT16, SYNCBN_CHANNELS_LAST},
                                         DtypeLayout{SYNCBN_FLOAT64, SYNCBN_CHANNELS_LAST})),
    [](const ::testing::TestParamInfo<GraphParam>& info) {
      const auto dl = std::get<2>(info.param);
      return std::string(std::get<0>(info.param) == cudaStreamCaptureModeGlobal ? "global"
                                                                                : "threadlocal") +
             "_" + momentum_name(std::get<1>(info.param)) + "_" + dtype_name(std::get<0>(dl)) +
             "_" + layout_name(std::get<1>(dl));
    });

// ---- stream order
// --------------------------------------------------------------------------------

// With the stream held by a host function: forward_training and backward return without waiting
// for the stream (no host synchronization: over the self communicator the calls only enqueue),
// and none of their work has run (it is queued behind the held host function on the given
// stream, not on the default stream or an unordered stream of the library's). Released, the
// stream produces the same outputs as an ordinary call. (After one warm-up step, so that
// one-time setup does not count.)
TEST(CudaStreamOrder, CallsOnlyEnqueueOnTheGivenStream) {
  SYNCBN_SKIP_WITHOUT_CUDA();
  const int64_t C = 4;
  const size_t c = static_cast<size_t>(C);
  Rng rng(test_seed());
  const Geometry g = make_geometry(SYNCBN_CHANNELS_FIRST, 8, C, {16, 16});
  const auto shape = g.shape();
  const size_t n = static_cast<size_t>(g.numel());
  syncbn::BatchNorm bn(syncbn::Communicator::self(),
                       cuda_config(C, SYNCBN_FLOAT32, SYNCBN_CHANNELS_FIRST));
  const LayerState<float> st = LayerState<float>::random(C, rng);
  DeviceLayerState<float> dev(st);
  DeviceArray<float> x(random_batch<float>(g, rng, ChannelDistribution::random(C, rng))),
      dy(random_batch<float>(g, rng)), y(n), dx(n), sm(c), si(c), dw(c), db(c);
  Stream stream, peek;
  auto step = [&](syncbn_status_t* fs, syncbn_status_t* bs) {
    *fs = syncbn_forward_training(bn.get(), g.ndim(), shape.data(), x.data(), dev.weight.data(),
                                  dev.bias.data(), y.data(), sm.data(), si.data(),
                                  dev.running_mean.data(), dev.running_var.data(),
                                  dev.num_batches_tracked.data(), stream.handle());
    *bs = syncbn_backward(bn.get(), g.ndim(), shape.data(), x.data(), dy.data(), dev.weight.data(),
                          sm.data(), si.data(), dx.data(), dw.data(), db.data(), stream.handle());
  };
  syncbn_status_t fs, bs;
  step(&fs, &bs);
  ASSERT_EQ(fs, SYNCBN_SUCCESS) << syncbn_last_error();
  ASSERT_EQ(bs, SYNCBN_SUCCESS) << syncbn_last_error();
  stream.sync();
  const std::vector<double> y_first = to_double(y.download()), dx_first = to_double(dx.download());
  const std::vector<float> sentinel(n, -777.f);
  y.upload(sentinel);
  dx.upload(sentinel);
  const int64_t nbt_before = dev.download().num_batches_tracked;

  float* pinned = nullptr;
  SYNCBN_CUDA_ASSERT(cudaMallocHost(reinterpret_cast<void**>(&pinned), n * sizeof(float)));
  StreamGate gate;
  SYNCBN_CUDA_ASSERT(cudaLaunchHostFunc(stream.get(), &StreamGate::wait, &gate));
  step(&fs, &bs);
  EXPECT_FALSE(gate.gave_up.load())
      << "the calls returned only after the held stream gave up: they waited for the stream";
  EXPECT_EQ(fs, SYNCBN_SUCCESS) << syncbn_last_error();
  EXPECT_EQ(bs, SYNCBN_SUCCESS) << syncbn_last_error();
  // While the stream is held, look at y and dx through another stream.
  for (const auto* a : {&y, &dx}) {
    SYNCBN_CUDA_EXPECT(
        cudaMemcpyAsync(pinned, a->data(), n * sizeof(float), cudaMemcpyDeviceToHost, peek.get()));
    peek.sync();
    EXPECT_TRUE(same_bytes(a == &y ? "y while the stream is held" : "dx while the stream is held",
                           std::vector<float>(pinned, pinned + n), sentinel))
        << "work of the calls ran before the work queued ahead of it on their stream";
  }
  gate.open = true;
  stream.sync();
  EXPECT_TRUE(gate.entered.load());
  SYNCBN_CUDA_EXPECT(cudaFreeHost(pinned));
  // Training-mode outputs depend on the batch only: the same as the first step's.
  const auto y_now = to_double(y.download()), dx_now = to_double(dx.download());
  EXPECT_TRUE(all_close("y after release", y_now, y_first, normwise(1e-6, y_first)));
  EXPECT_TRUE(all_close("dx after release", dx_now, dx_first, normwise(1e-6, dx_first)));
  EXPECT_EQ(dev.download().num_batches_tracked, nbt_before + 1);
}

// ---- argument checks of CUDA plans -------------------------------------------------------------

// The cases of the one table (tests/bad_args.hpp) marked for device memory: a valid fp32
// channels-first call on (4, 3, 5) with device buffers (CallBuffersIn, DeviceMemory), broken one
// way per case: SYNCBN_ERROR_INVALID_ARGUMENT from the call, a message naming the argument,
// nothing changed (running statistics, num_batches_tracked, outputs), nothing reported
// asynchronously later; the plan still works afterwards.
class CudaArgChecks : public ::testing::TestWithParam<ArgCase> {};

TEST_P(CudaArgChecks, InvalidArgumentAndNothingChanged) {
  SYNCBN_SKIP_WITHOUT_CUDA();
  const ArgCase& tc = GetParam();
  ASSERT_EQ(tc.want, SYNCBN_ERROR_INVALID_ARGUMENT) << "a case for device memory";
  syncbn::BatchNorm bn(syncbn::Communicator::self(),
                       cuda_config(3, SYNCBN_FLOAT32, SYNCBN_CHANNELS_FIRST));
  const CallBuffers before(4, 3, 5, test_seed());
  const CallBuffersIn<DeviceMemory<float>> dev(before);
  Stream stream;
  const CallArgs valid = dev.args(bn.get(), stream.handle());
  CallArgs a = valid;
  tc.mutate(a);
  ASSERT_EQ(call(tc.op, a), SYNCBN_ERROR_INVALID_ARGUMENT)
      << op_name(tc.op) << ": " << syncbn_last_error();
  const std::string msg = syncbn_last_error();
  EXPECT_NE(msg.find(tc.names), std::string::npos)
      << "message '" << msg << "' does not name '" << tc.names << "'";
  syncbn_status_t async = SYNCBN_ERROR_INTERNAL;
  EXPECT_EQ(syncbn_plan_get_async_error(bn.get(), stream.handle(), &async), SYNCBN_SUCCESS);
  EXPECT_EQ(async, SYNCBN_SUCCESS) << "an error the call returned is not reported again";
  EXPECT_TRUE(dev.download().unchanged_since(before)) << "after a rejected call";
  // The plan still works.
  EXPECT_EQ(call(tc.op, valid), SYNCBN_SUCCESS) << syncbn_last_error();
  stream.sync();
}

INSTANTIATE_TEST_SUITE_P(All, CudaArgChecks, ::testing::ValuesIn(device_arg_cases()),
                         arg_case_name);

// ---- the orchestration's own defects (docs/design.md section 5: src/cuda/backend.cpp) ---------

// One forward_training of plan on stream; the outputs (y, save_mean, save_invstd) as bytes.
struct ForwardOutputs {
  std::vector<float> y, save_mean, save_invstd;
};

ForwardOutputs run_forward(syncbn_plan_t plan, const Geometry& g, const DeviceArray<float>& x,
                           DeviceLayerState<float>& dev, const Stream& stream) {
  const auto shape = g.shape();
  const size_t c = static_cast<size_t>(g.c);
  DeviceArray<float> y(static_cast<size_t>(g.numel())), sm(c), si(c);
  EXPECT_EQ(syncbn_forward_training(plan, g.ndim(), shape.data(), x.data(), dev.weight.data(),
                                    dev.bias.data(), y.data(), sm.data(), si.data(),
                                    dev.running_mean.data(), dev.running_var.data(),
                                    dev.num_batches_tracked.data(), stream.handle()),
            SYNCBN_SUCCESS)
      << syncbn_last_error();
  stream.sync();
  return {y.download(), sm.download(), si.download()};
}

// Two calls of one plan on two streams the caller did not order (the plan orders them, and the
// merge counters of its cross-block reductions are zeroed before each reduction): the next call
// equals, bit for bit, the same call on a fresh plan. Few channels and many values
// per channel, so that each channel's sums are split over many blocks and merged by the last.
TEST(CudaMergeCounter, OverlappingCallsDoNotPoisonLaterOnes) {
  SYNCBN_SKIP_WITHOUT_CUDA();
  const int64_t C = 2;
  Rng rng(test_seed());
  const Geometry g = make_geometry(SYNCBN_CHANNELS_FIRST, 64, C, {128, 128});
  const LayerState<float> st = LayerState<float>::random(C, rng);
  DeviceArray<float> x(random_batch<float>(g, rng, ChannelDistribution::random(C, rng)));
  const syncbn_config_t cfg = cuda_config(C, SYNCBN_FLOAT32, SYNCBN_CHANNELS_FIRST);
  syncbn::BatchNorm fresh(syncbn::Communicator::self(), cfg), used(syncbn::Communicator::self(), cfg);
  Stream a, b;
  DeviceLayerState<float> dev_a(st), dev_b(st), dev_used(st), dev_fresh(st);
  const auto shape = g.shape();
  const size_t n = static_cast<size_t>(g.numel()), c = static_cast<size_t>(C);
  DeviceArray<float> ya(n), yb(n), sma(c), sia(c), smb(c), sib(c);
  for (int round = 0; round < 4; ++round) {
    EXPECT_EQ(syncbn_forward_training(used.get(), g.ndim(), shape.data(), x.data(),
                                      dev_a.weight.data(), dev_a.bias.data(), ya.data(), sma.data(),
                                      sia.data(), dev_a.running_mean.data(),
                                      dev_a.running_var.data(), dev_a.num_batches_tracked.data(),
                                      a.handle()),
              SYNCBN_SUCCESS);
    EXPECT_EQ(syncbn_forward_training(used.get(), g.ndim(), shape.data(), x.data(),
                                      dev_b.weight.data(), dev_b.bias.data(), yb.data(), smb.data(),
                                      sib.data(), dev_b.running_mean.data(),
                                      dev_b.running_var.data(), dev_b.num_batches_tracked.data(),
                                      b.handle()),
              SYNCBN_SUCCESS);
  }
  a.sync();
  b.sync();
  const ForwardOutputs want = run_forward(fresh.get(), g, x, dev_fresh, a);
  const ForwardOutputs got = run_forward(used.get(), g, x, dev_used, a);
  EXPECT_TRUE(same_bytes("save_mean after overlapping calls", got.save_mean, want.save_mean));
  EXPECT_TRUE(same_bytes("save_invstd after overlapping calls", got.save_invstd, want.save_invstd));
  EXPECT_TRUE(same_bytes("y after overlapping calls", got.y, want.y));
}

// A negative num_batches_tracked lives in device memory, so the device finds it: over the self
// communicator the call returns SUCCESS (it never waits for the device), then
// syncbn_plan_get_async_error reports SYNCBN_ERROR_INVALID_ARGUMENT naming num_batches_tracked,
// once; running statistics and num_batches_tracked are untouched; the plan still works after.
TEST(CudaNumBatchesTracked, NegativeIsFoundOnTheDevice) {
  SYNCBN_SKIP_WITHOUT_CUDA();
  const int64_t C = 3;
  Rng rng(test_seed());
  const Geometry g = make_geometry(SYNCBN_CHANNELS_LAST, 4, C, {5, 5});
  LayerState<float> st = LayerState<float>::random(C, rng);
  st.num_batches_tracked = -1;
  DeviceLayerState<float> dev(st);
  DeviceArray<float> x(random_batch<float>(g, rng));
  syncbn::BatchNorm bn(syncbn::Communicator::self(),
                       cuda_config(C, SYNCBN_FLOAT32, SYNCBN_CHANNELS_LAST, true, true,
                                   kCumulative));
  Stream stream;
  const auto shape = g.shape();
  const size_t n = static_cast<size_t>(g.numel()), c = static_cast<size_t>(C);
  DeviceArray<float> y(n), sm(c), si(c);
  const syncbn_status_t s = syncbn_forward_training(
      bn.get(), g.ndim(), shape.data(), x.data(), dev.weight.data(), dev.bias.data(), y.data(),
      sm.data(), si.data(), dev.running_mean.data(), dev.running_var.data(),
      dev.num_batches_tracked.data(), stream.handle());
  EXPECT_EQ(s, SYNCBN_SUCCESS) << syncbn_last_error();
  syncbn_status_t async = SYNCBN_SUCCESS;
  EXPECT_EQ(syncbn_plan_get_async_error(bn.get(), stream.handle(), &async), SYNCBN_SUCCESS);
  EXPECT_EQ(async, SYNCBN_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(syncbn_last_error()).find("num_batches_tracked is negative"),
            std::string::npos)
      << syncbn_last_error();
  EXPECT_TRUE(state_unchanged("after a negative num_batches_tracked", dev, st));
  EXPECT_EQ(syncbn_plan_get_async_error(bn.get(), stream.handle(), &async), SYNCBN_SUCCESS);
  EXPECT_EQ(async, SYNCBN_SUCCESS) << "reported once";
  st.num_batches_tracked = 0;
  DeviceLayerState<float> good(st);
  run_forward(bn.get(), g, x, good, stream);
  EXPECT_EQ(good.download().num_batches_tracked, 1);
}

// A stream of another device, with the current device right: the call fails on this rank with
// SYNCBN_ERROR_INVALID_ARGUMENT naming the device, and the plan still works on its own device.
// Needs two GPUs.
TEST(CudaStreamDevice, StreamOfAnotherDeviceIsRejected) {
  if (cuda_device_count() < 2) GTEST_SKIP() << "needs two CUDA devices";
  const int64_t C = 3;
  Rng rng(test_seed());
  const Geometry g = make_geometry(SYNCBN_CHANNELS_FIRST, 2, C, {4, 4});
  const LayerState<float> st = LayerState<float>::random(C, rng);
  SYNCBN_CUDA_EXPECT(cudaSetDevice(0));
  DeviceLayerState<float> dev(st);
  DeviceArray<float> x(random_batch<float>(g, rng));
  syncbn::BatchNorm bn(syncbn::Communicator::self(),
                       cuda_config(C, SYNCBN_FLOAT32, SYNCBN_CHANNELS_FIRST));
  SYNCBN_CUDA_EXPECT(cudaSetDevice(1));
  Stream other;  // on device 1
  SYNCBN_CUDA_EXPECT(cudaSetDevice(0));
  const auto shape = g.shape();
  const size_t n = static_cast<size_t>(g.numel()), c = static_cast<size_t>(C);
  DeviceArray<float> y(n), sm(c), si(c);
  EXPECT_EQ(syncbn_forward_training(bn.get(), g.ndim(), shape.data(), x.data(), dev.weight.data(),
                                    dev.bias.data(), y.data(), sm.data(), si.data(),
                                    dev.running_mean.data(), dev.running_var.data(),
                                    dev.num_batches_tracked.data(), other.handle()),
            SYNCBN_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(syncbn_last_error()).find("device"), std::string::npos)
      << syncbn_last_error();
  EXPECT_TRUE(state_unchanged("after a stream of another device", dev, st));
  Stream mine;  // on device 0
  run_forward(bn.get(), g, x, dev, mine);
}


// ---- CUDA graphs: the cross-block merge replayed, a failure and a recovery inside a replay --

// Channels of 64 x 64 x 32 values: every channel's reduction is split over many blocks, whose
// last block merges the partials (merge counters, partial sums) at every replay. The replays
// equal the eager steps bit for bit.
TEST(CudaGraphMultiSplit, ReplayEqualsEagerStepsBitwise) {
  SYNCBN_SKIP_WITHOUT_CUDA();
  for (const DtypeLayout& dl : {DtypeLayout{SYNCBN_FLOAT32, SYNCBN_CHANNELS_FIRST},
                               DtypeLayout{SYNCBN_BFLOAT16, SYNCBN_CHANNELS_LAST}}) {
    SCOPED_TRACE(std::string(dtype_name(std::get<0>(dl))) + " " + layout_name(std::get<1>(dl)));
    GraphCheck o;
    o.layout = std::get<1>(dl);
    o.seed = test_seed();
    o.steps = 4;
    o.channels = 3;
    o.batch = [](int) { return int64_t{32}; };
    o.spatial = {64, 64};
    o.bitwise = true;
    const syncbn::Communicator self = syncbn::Communicator::self();
    dispatch_cuda_dtype(std::get<0>(dl),
                        [&](auto tag) { check_graph_replay<decltype(tag)>(self.get(), o); });
  }
}

// forward_training + backward captured once; the second replay finds num_batches_tracked
// negative on the device: syncbn_plan_get_async_error reports SYNCBN_ERROR_INVALID_ARGUMENT
// naming it, once; the running statistics are those of the first replay and the outputs NaN.
// With the counter repaired, the third replay succeeds and its running statistics equal, bit
// for bit, those of two eager steps on the same data (the failed replay changed nothing).
TEST(CudaGraphFailure, ReplayFailsOnTheDeviceThenRecovers) {
  SYNCBN_SKIP_WITHOUT_CUDA();
  const int64_t C = 3;
  Rng rng(test_seed());
  const Geometry g = make_geometry(SYNCBN_CHANNELS_FIRST, 8, C, {16, 16});
  const LayerState<float> st = LayerState<float>::random(C, rng);
  DeviceArray<float> x(random_batch<float>(g, rng)), dy(random_batch<float>(g, rng));
  const syncbn_config_t cfg = cuda_config(C, SYNCBN_FLOAT32, SYNCBN_CHANNELS_FIRST);
  syncbn::BatchNorm captured(syncbn::Communicator::self(), cfg),
      eager(syncbn::Communicator::self(), cfg);
  const auto shape = g.shape();
  const size_t n = static_cast<size_t>(g.numel()), c = static_cast<size_t>(C);
  struct Step {
    DeviceLayerState<float> dev;
    DeviceArray<float> y, dx, sm, si, dw, db;
    Step(const LayerState<float>& st, size_t n, size_t c)
        : dev(st), y(n), dx(n), sm(c), si(c), dw(c), db(c) {}
  };
  Stream stream;
  auto enqueue = [&](syncbn_plan_t plan, Step& t) {
    EXPECT_EQ(syncbn_forward_training(plan, g.ndim(), shape.data(), x.data(), t.dev.weight.data(),
                                      t.dev.bias.data(), t.y.data(), t.sm.data(), t.si.data(),
                                      t.dev.running_mean.data(), t.dev.running_var.data(),
                                      t.dev.num_batches_tracked.data(), stream.handle()),
              SYNCBN_SUCCESS)
        << syncbn_last_error();
    EXPECT_EQ(syncbn_backward(plan, g.ndim(), shape.data(), x.data(), dy.data(),
                              t.dev.weight.data(), t.sm.data(), t.si.data(), t.dx.data(),
                              t.dw.data(), t.db.data(), stream.handle()),
              SYNCBN_SUCCESS)
        << syncbn_last_error();
  };
  auto async = [&](syncbn_plan_t plan) {
    syncbn_status_t a = SYNCBN_ERROR_INTERNAL;
    EXPECT_EQ(syncbn_plan_get_async_error(plan, stream.handle(), &a), SYNCBN_SUCCESS)
        << syncbn_last_error();
    stream.sync();
    return a;
  };

  Step want(st, n, c);  // two eager steps
  enqueue(eager.get(), want);
  enqueue(eager.get(), want);
  EXPECT_EQ(async(eager.get()), SYNCBN_SUCCESS);

  Step t(st, n, c);
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  SYNCBN_CUDA_ASSERT(cudaStreamBeginCapture(stream.get(), cudaStreamCaptureModeGlobal));
  enqueue(captured.get(), t);
  SYNCBN_CUDA_ASSERT(cudaStreamEndCapture(stream.get(), &graph));
  SYNCBN_CUDA_ASSERT(cudaGraphInstantiate(&exec, graph, 0));

  SYNCBN_CUDA_EXPECT(cudaGraphLaunch(exec, stream.get()));
  EXPECT_EQ(async(captured.get()), SYNCBN_SUCCESS) << syncbn_last_error();
  LayerState<float> after_first = t.dev.download();
  EXPECT_EQ(after_first.num_batches_tracked, 1);

  t.dev.num_batches_tracked.upload({-5});
  after_first.num_batches_tracked = -5;
  SYNCBN_CUDA_EXPECT(cudaGraphLaunch(exec, stream.get()));
  EXPECT_EQ(async(captured.get()), SYNCBN_ERROR_INVALID_ARGUMENT);
  EXPECT_NE(std::string(syncbn_last_error()).find("num_batches_tracked"), std::string::npos)
      << syncbn_last_error();
  EXPECT_EQ(async(captured.get()), SYNCBN_SUCCESS) << "reported once";
  EXPECT_TRUE(state_unchanged("after the failed replay", t.dev, after_first));
  EXPECT_TRUE(all_nan("y of the failed replay", to_double(t.y.download())));
  EXPECT_TRUE(all_nan("save_mean of the failed replay", to_double(t.sm.download())));

  t.dev.num_batches_tracked.upload({1});
  SYNCBN_CUDA_EXPECT(cudaGraphLaunch(exec, stream.get()));
  EXPECT_EQ(async(captured.get()), SYNCBN_SUCCESS) << syncbn_last_error();
  const LayerState<float> got = t.dev.download(), expected = want.dev.download();
  EXPECT_EQ(got.num_batches_tracked, 2);
  EXPECT_TRUE(same_bytes("running_mean after recovery", got.running_mean, expected.running_mean));
  EXPECT_TRUE(same_bytes("running_var after recovery", got.running_var, expected.running_var));
  EXPECT_TRUE(same_bytes("y after recovery", t.y.download(), want.y.download()));
  EXPECT_TRUE(same_bytes("dx after recovery", t.dx.download(), want.dx.download()));
  if (exec) (void)cudaGraphExecDestroy(exec);
  if (graph) (void)cudaGraphDestroy(graph);
}

// ---- a plan's calls run in call order, whatever their streams -------------------------------

// forward_training on stream a, held by a host function, then forward_inference on stream b with
// no ordering by the caller: the inference waits for the training call (it is not done while a
// is held) and normalizes with the running statistics that call updated: its output equals, bit
// for bit, the same two calls on one stream.
TEST(CudaCallOrder, CallOnAnotherStreamWaitsForThePreviousCall) {
  SYNCBN_SKIP_WITHOUT_CUDA();
  const int64_t C = 4;
  Rng rng(test_seed());
  const Geometry g = make_geometry(SYNCBN_CHANNELS_LAST, 6, C, {7, 7});
  const LayerState<float> st = LayerState<float>::random(C, rng);
  DeviceArray<float> x1(random_batch<float>(g, rng)), x2(random_batch<float>(g, rng));
  const syncbn_config_t cfg = cuda_config(C, SYNCBN_FLOAT32, SYNCBN_CHANNELS_LAST);
  syncbn::BatchNorm two_streams(syncbn::Communicator::self(), cfg),
      one_stream(syncbn::Communicator::self(), cfg);
  const auto shape = g.shape();
  const size_t n = static_cast<size_t>(g.numel()), c = static_cast<size_t>(C);
  Stream a, b;
  auto calls = [&](syncbn_plan_t plan, DeviceLayerState<float>& dev, DeviceArray<float>& y2,
                   const Stream& first, const Stream& second) {
    DeviceArray<float> y1(n), sm(c), si(c);
    EXPECT_EQ(syncbn_forward_training(plan, g.ndim(), shape.data(), x1.data(), dev.weight.data(),
                                      dev.bias.data(), y1.data(), sm.data(), si.data(),
                                      dev.running_mean.data(), dev.running_var.data(),
                                      dev.num_batches_tracked.data(), first.handle()),
              SYNCBN_SUCCESS)
        << syncbn_last_error();
    EXPECT_EQ(syncbn_forward_inference(plan, g.ndim(), shape.data(), x2.data(), dev.weight.data(),
                                       dev.bias.data(), dev.running_mean.data(),
                                       dev.running_var.data(), y2.data(), second.handle()),
              SYNCBN_SUCCESS)
        << syncbn_last_error();
  };
  DeviceLayerState<float> dev_want(st), dev_got(st);
  DeviceArray<float> want(n), got(n);
  calls(one_stream.get(), dev_want, want, a, a);
  a.sync();

  StreamGate gate;
  SYNCBN_CUDA_EXPECT(cudaLaunchHostFunc(a.get(), &StreamGate::wait, &gate));
  calls(two_streams.get(), dev_got, got, a, b);
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_EQ(cudaStreamQuery(b.get()), cudaErrorNotReady)
      << "the call on stream b ran while the plan's previous call on stream a was held";
  gate.open = true;
  a.sync();
  b.sync();
  EXPECT_FALSE(gate.gave_up.load());
  EXPECT_TRUE(same_bytes("inference after training on another stream", got.download(),
                         want.download()));
}

}  // namespace
