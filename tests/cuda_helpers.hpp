// tests/cuda_helpers.hpp: what the GPU tests share: whether a CUDA device is visible (tests skip
// where none is), the four data types on the host (fp16 / bf16 through cuda_fp16.h and
// cuda_bf16.h) with their tolerances, device buffers and streams, a layer's parameters and
// statistics in device memory, DeviceMemory (the scenario runner's Memory policy for CUDA plans,
// scenarios.hpp), and the CUDA-graph check (capture forward + backward once, replay
// it step by step, compare with the same steps run eagerly) that the single-process and the NCCL
// tests both run.
//
// The tests are plain C++ linking CUDA::cudart; they launch no kernel of their own.
#ifndef SYNCBN_TESTS_CUDA_HELPERS_HPP
#define SYNCBN_TESTS_CUDA_HELPERS_HPP

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "reference.hpp"
#include "syncbn/syncbn.h"
#include "syncbn/syncbn.hpp"

namespace syncbn_test {

// ---- is there a GPU? --------------------------------------------------------------------------

// The number of visible CUDA devices; 0 when the runtime reports an error (no driver, no device,
// CUDA_VISIBLE_DEVICES empty). Clears the error it may leave behind.
inline int cuda_device_count() {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n > 0 ? n : 0;
}

// In a TEST body: skip where no CUDA device is visible.
#define SYNCBN_SKIP_WITHOUT_CUDA()                                   \
  do {                                                               \
    if (::syncbn_test::cuda_device_count() == 0)                     \
      GTEST_SKIP() << "no CUDA device visible (cudaGetDeviceCount)"; \
  } while (0)

inline ::testing::AssertionResult cuda_ok(cudaError_t e, const char* expr) {
  if (e == cudaSuccess) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << expr << ": " << cudaGetErrorName(e) << " (" << cudaGetErrorString(e) << ")";
}

// A CUDA runtime call that must succeed (statement macros: safe in an unbraced if / else).
#define SYNCBN_CUDA_EXPECT(call)                        \
  do {                                                  \
    EXPECT_TRUE(::syncbn_test::cuda_ok((call), #call)); \
  } while (0)
#define SYNCBN_CUDA_ASSERT(call)                        \
  do {                                                  \
    ASSERT_TRUE(::syncbn_test::cuda_ok((call), #call)); \
  } while (0)

// ---- the four data types ------------------------------------------------------------------------

// Storage type S of the data (x, y, dy, dx) <-> syncbn dtype, its parameter type (float, or
// double for fp64 data: also the dtype of the CPU plan that serves as the reference) and the
// tolerances of the GPU outputs:
//   data:  y, dx, relative to the magnitude of the terms they are made of (reference.hpp's
//          Expected::scale). For fp16 / bf16 the output is rounded to 11 / 8 significant bits:
//          half an ulp is 2^-11 = 4.9e-4 / 2^-8 = 3.9e-3 of |y| <= scale, so 1e-3 / 8e-3.
//   stats: save_mean (relative to mean |x|), save_invstd and the running statistics (relative).
//          These are fp32 for 16-bit data, computed from the exact (already rounded) inputs, so
//          the fp32 tolerance applies.
//   sums:  dweight, dbias, relative to the sum of the absolute values of their terms.
// fp32 and fp64 are held to what the CPU tests hold the CPU kernels to against the fp64
// reference (1e-5), and 1e-12 for fp64 (fp64 accumulation reaches ~1e-15).
template <class S>
struct CudaType;
template <>
struct CudaType<float> {
  using Param = float;
  static constexpr syncbn_dtype_t dtype = SYNCBN_FLOAT32;
  static constexpr const char* name = "fp32";
  static float from_double(double v) { return static_cast<float>(v); }
  static double to_double(float v) { return v; }
  static constexpr double data = 1e-5, stats = 1e-5, sums = 1e-5;
};
template <>
struct CudaType<double> {
  using Param = double;
  static constexpr syncbn_dtype_t dtype = SYNCBN_FLOAT64;
  static constexpr const char* name = "fp64";
  static double from_double(double v) { return v; }
  static double to_double(double v) { return v; }
  static constexpr double data = 1e-12, stats = 1e-12, sums = 1e-12;
};
template <>
struct CudaType<__half> {
  using Param = float;
  static constexpr syncbn_dtype_t dtype = SYNCBN_FLOAT16;
  static constexpr const char* name = "fp16";
  static __half from_double(double v) { return __float2half_rn(static_cast<float>(v)); }
  static double to_double(__half v) { return static_cast<double>(__half2float(v)); }
  static constexpr double data = 1e-3, stats = 1e-5, sums = 1e-5;
};
template <>
struct CudaType<__nv_bfloat16> {
  using Param = float;
  static constexpr syncbn_dtype_t dtype = SYNCBN_BFLOAT16;
  static constexpr const char* name = "bf16";
  static __nv_bfloat16 from_double(double v) { return __float2bfloat16_rn(static_cast<float>(v)); }
  static double to_double(__nv_bfloat16 v) { return static_cast<double>(__bfloat162float(v)); }
  static constexpr double data = 8e-3, stats = 1e-5, sums = 1e-5;
};

// Calls f(S{}) with the storage type of dtype.
template <class F>
void dispatch_cuda_dtype(syncbn_dtype_t dtype, F&& f) {
  switch (dtype) {
    case SYNCBN_FLOAT32:
      f(float{});
      break;
    case SYNCBN_FLOAT64:
      f(double{});
      break;
    case SYNCBN_FLOAT16:
      f(__half{});
      break;
    case SYNCBN_BFLOAT16:
      f(__nv_bfloat16{});
      break;
    default:
      break;
  }
}

// v with every value replaced by the nearest value of S (so that the GPU's S inputs and the
// reference's P inputs are the same numbers).
template <class S, class P>
std::vector<P> rounded_to(std::vector<P> v) {
  for (auto& e : v)
    e = static_cast<P>(CudaType<S>::to_double(CudaType<S>::from_double(static_cast<double>(e))));
  return v;
}
template <class S, class P>
std::vector<S> to_storage(const std::vector<P>& v) {
  std::vector<S> s(v.size());
  for (size_t i = 0; i < v.size(); ++i) s[i] = CudaType<S>::from_double(static_cast<double>(v[i]));
  return s;
}
template <class S>
std::vector<double> storage_to_double(const std::vector<S>& v) {
  std::vector<double> d(v.size());
  for (size_t i = 0; i < v.size(); ++i) d[i] = CudaType<S>::to_double(v[i]);
  return d;
}

inline ::testing::AssertionResult all_nan(const std::string& what, const std::vector<double>& v) {
  for (size_t i = 0; i < v.size(); ++i)
    if (!std::isnan(v[i]))
      return ::testing::AssertionFailure()
             << what << ": [" << i << "] = " << v[i] << ", want NaN (a failed call writes NaN)";
  return ::testing::AssertionSuccess();
}

// ---- device memory and streams ----------------------------------------------------------------

// n elements of T in device memory, starting `offset` elements after the start of a cudaMalloc
// allocation (offset 1: a pointer that is not aligned for vector loads). No allocation for n == 0:
// data() is then NULL. Failures are recorded (EXPECT) rather than thrown, so that MPI tests keep
// their ranks in step.
template <class T>
class DeviceArray {
 public:
  DeviceArray() = default;
  explicit DeviceArray(size_t n, size_t offset = 0) : n_(n), offset_(offset) {
    if (n == 0) return;
    void* p = nullptr;
    const cudaError_t e = cudaMalloc(&p, (n + offset) * sizeof(T));
    EXPECT_TRUE(cuda_ok(e, "cudaMalloc")) << (n + offset) * sizeof(T) << " bytes";
    if (e == cudaSuccess) base_ = static_cast<T*>(p);
  }
  DeviceArray(const std::vector<T>& host, size_t offset) : DeviceArray(host.size(), offset) {
    upload(host);
  }
  explicit DeviceArray(const std::vector<T>& host) : DeviceArray(host, 0) {}
  ~DeviceArray() {
    if (base_) (void)cudaFree(base_);
  }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  DeviceArray(DeviceArray&& o) noexcept { *this = std::move(o); }
  DeviceArray& operator=(DeviceArray&& o) noexcept {
    if (this != &o) {
      if (base_) (void)cudaFree(base_);
      base_ = std::exchange(o.base_, nullptr);
      n_ = std::exchange(o.n_, 0);
      offset_ = std::exchange(o.offset_, 0);
    }
    return *this;
  }

  T* data() const { return base_ ? base_ + offset_ : nullptr; }
  size_t size() const { return n_; }

  // Synchronous copies (cudaMemcpy: the legacy default stream). Callers synchronize the stream
  // the library worked on first.
  void upload(const std::vector<T>& host) {
    EXPECT_EQ(host.size(), n_) << "upload of the wrong size";
    if (n_ == 0 || !base_ || host.size() != n_) return;
    SYNCBN_CUDA_EXPECT(cudaMemcpy(data(), host.data(), n_ * sizeof(T), cudaMemcpyHostToDevice));
  }
  void fill(const T& v) { upload(std::vector<T>(n_, v)); }
  std::vector<T> download() const {
    std::vector<T> h(n_);
    if (n_ && base_)
      SYNCBN_CUDA_EXPECT(cudaMemcpy(h.data(), data(), n_ * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
  }
  // Asynchronous upload on stream (the host buffer must outlive the call only: pageable memory
  // is staged before cudaMemcpyAsync returns).
  void upload_async(const std::vector<T>& host, cudaStream_t stream) {
    EXPECT_EQ(host.size(), n_) << "upload of the wrong size";
    if (n_ == 0 || !base_ || host.size() != n_) return;
    SYNCBN_CUDA_EXPECT(
        cudaMemcpyAsync(data(), host.data(), n_ * sizeof(T), cudaMemcpyHostToDevice, stream));
  }

 private:
  T* base_ = nullptr;
  size_t n_ = 0, offset_ = 0;
};

// Device data of storage type S as doubles.
template <class S>
std::vector<double> download_double(const DeviceArray<S>& a) {
  return storage_to_double(a.download());
}

// A stream of the test's own, non-blocking (no implicit ordering with the legacy default stream:
// what the library does must be ordered on the stream it is given).
class Stream {
 public:
  Stream() {
    const cudaError_t e = cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking);
    EXPECT_TRUE(cuda_ok(e, "cudaStreamCreateWithFlags"));
    if (e != cudaSuccess) s_ = nullptr;
  }
  ~Stream() {
    if (s_) (void)cudaStreamDestroy(s_);
  }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  cudaStream_t get() const { return s_; }
  void* handle() const { return static_cast<void*>(s_); }
  void sync() const { SYNCBN_CUDA_EXPECT(cudaStreamSynchronize(s_)); }

 private:
  cudaStream_t s_ = nullptr;
};

// ---- a layer's parameters and statistics on the device ----------------------------------------

template <class P>
struct DeviceLayerState {
  DeviceArray<P> weight, bias, running_mean, running_var;
  DeviceArray<int64_t> num_batches_tracked;

  DeviceLayerState() = default;
  explicit DeviceLayerState(const LayerState<P>& st, size_t offset = 0)
      : weight(st.weight, offset),
        bias(st.bias, offset),
        running_mean(st.running_mean, offset),
        running_var(st.running_var, offset),
        num_batches_tracked(std::vector<int64_t>{st.num_batches_tracked}, 0) {}

  LayerState<P> download() const {
    LayerState<P> s;
    s.weight = weight.download();
    s.bias = bias.download();
    s.running_mean = running_mean.download();
    s.running_var = running_var.download();
    const auto n = num_batches_tracked.download();
    s.num_batches_tracked = n.empty() ? -1 : n[0];
    return s;
  }
};

// state_unchanged (reference.hpp) compares a DeviceLayerState with a LayerState.

// ---- the Memory policy of the scenario runner (scenarios.hpp) for CUDA plans ------------------

// Device memory, data of storage type S (fp32, fp64, fp16, bf16) and parameters of its parameter
// type, with the tolerances of CudaType<S>; inputs rounded to S before the reference sees them.
// Calls run on the test's own non-blocking stream (or the legacy default stream); finish waits
// for them and requires that the device recorded no error.
template <class S_>
struct DeviceMemory {
  using S = S_;
  using P = typename CudaType<S>::Param;
  static constexpr syncbn_dtype_t dtype = CudaType<S>::dtype;
  static constexpr syncbn_device_t device = SYNCBN_DEVICE_CUDA;
  static constexpr double data = CudaType<S>::data;
  static constexpr double stats = CudaType<S>::stats;
  static constexpr double sums = CudaType<S>::sums;
  template <class X>
  using Array = DeviceArray<X>;
  using State = DeviceLayerState<P>;
  using Stream = ::syncbn_test::Stream;

  static S from_double(double v) { return CudaType<S>::from_double(v); }
  static std::vector<P> rounded(std::vector<P> v) { return rounded_to<S>(std::move(v)); }
  static std::vector<S> storage(const std::vector<P>& v) { return to_storage<S>(v); }
  static std::vector<double> values(const DeviceArray<S>& a) { return download_double(a); }
  static void finish(syncbn_plan_t plan, void* stream, const char* what) {
    expect_no_async_error(plan, stream, what);
    SYNCBN_CUDA_EXPECT(cudaStreamSynchronize(static_cast<cudaStream_t>(stream)));
  }
};

// ---- CUDA graphs: capture once, replay, compare with eager steps -----------------------------

// The outputs and state after one training step (forward + backward), as doubles.
struct StepResult {
  std::vector<double> y, save_mean, save_invstd, dx, dweight, dbias, running_mean, running_var;
  int64_t num_batches_tracked = -1;
};

// a against b (norm-wise, relative rel): two runs of the same computation on the same inputs.
inline void expect_same_step(const std::string& what, const StepResult& a, const StepResult& b,
                             double data_rel, double stats_rel) {
  SCOPED_TRACE(what);
  EXPECT_TRUE(all_close("y", a.y, b.y, normwise(data_rel, b.y)));
  EXPECT_TRUE(all_close("dx", a.dx, b.dx, normwise(data_rel, b.dx)));
  EXPECT_TRUE(all_close("save_mean", a.save_mean, b.save_mean, normwise(stats_rel, b.save_mean)));
  EXPECT_TRUE(
      all_close("save_invstd", a.save_invstd, b.save_invstd, normwise(stats_rel, b.save_invstd)));
  EXPECT_TRUE(all_close("dweight", a.dweight, b.dweight, normwise(stats_rel, b.dweight)));
  EXPECT_TRUE(all_close("dbias", a.dbias, b.dbias, normwise(stats_rel, b.dbias)));
  EXPECT_TRUE(all_close("running_mean", a.running_mean, b.running_mean,
                        normwise(stats_rel, b.running_mean)));
  EXPECT_TRUE(
      all_close("running_var", a.running_var, b.running_var, normwise(stats_rel, b.running_var)));
  EXPECT_EQ(a.num_batches_tracked, b.num_batches_tracked);
}

struct GraphCheck {
  syncbn_layout_t layout = SYNCBN_CHANNELS_FIRST;
  double momentum = 0.1;
  cudaStreamCaptureMode mode = cudaStreamCaptureModeGlobal;
  int steps = 10;
  uint32_t seed = 0;  // data: seed and rank; parameters: seed alone
  int rank = 0;
  // The comm is a group of one: the eager steps are also checked against a CPU plan on the self
  // communicator (the same batch norm).
  bool compare_with_cpu = true;
  // COLLECTIVE over the comm's group where there is one: true iff `ok` on every rank (so that all
  // ranks take the same path). In one process: the identity.
  std::function<bool(bool)> all_agree = [](bool ok) { return ok; };
  // The layer and the batch: C channels, a rank's N (0: an empty batch on that rank), spatial
  // extents. Large spatial sizes make every channel a reduction over several blocks, whose merge
  // the replays then repeat.
  int64_t channels = 5;
  std::function<int64_t(int rank)> batch = [](int rank) { return int64_t{3} + rank % 2; };
  std::vector<int64_t> spatial = {6, 5};
  // Replays must equal the eager steps bit for bit (the same kernels on the same data in the
  // same order), not only within the dtype's tolerance.
  bool bitwise = false;
};

// Every output and statistic of a step, bit for bit.
inline void expect_bitwise_step(const std::string& what, const StepResult& a,
                                const StepResult& b) {
  SCOPED_TRACE(what);
  EXPECT_TRUE(same_bytes("y", a.y, b.y));
  EXPECT_TRUE(same_bytes("dx", a.dx, b.dx));
  EXPECT_TRUE(same_bytes("save_mean", a.save_mean, b.save_mean));
  EXPECT_TRUE(same_bytes("save_invstd", a.save_invstd, b.save_invstd));
  EXPECT_TRUE(same_bytes("dweight", a.dweight, b.dweight));
  EXPECT_TRUE(same_bytes("dbias", a.dbias, b.dbias));
  EXPECT_TRUE(same_bytes("running_mean", a.running_mean, b.running_mean));
  EXPECT_TRUE(same_bytes("running_var", a.running_var, b.running_var));
  EXPECT_EQ(a.num_batches_tracked, b.num_batches_tracked);
}

// One layer, two plans on comm (eager and graph), identical initial state with
// num_batches_tracked = 0, fresh data each step (copied into the same device buffers before each
// step). The eager plan runs `steps` calls of forward_training + backward; the graph plan's
// forward_training + backward are captured once on a non-default stream, then the graph is
// launched `steps` times. After every step the graph's outputs and running statistics equal the
// eager ones (and, with compare_with_cpu, the CPU plan's); num_batches_tracked reaches `steps`.
// Capturing must execute nothing: state and outputs are unchanged after cudaStreamEndCapture.
// Every status is also read through syncbn_plan_get_async_error (where NCCL would report).
template <class S>
void check_graph_replay(syncbn_comm_t comm, const GraphCheck& o) {
  using P = typename CudaType<S>::Param;
  constexpr double kDataTol = CudaType<S>::data, kStatsTol = CudaType<S>::stats;
  const int64_t C = o.channels;
  const Geometry g = make_geometry(o.layout, o.batch(o.rank), C, o.spatial);
  const auto shape = g.shape();
  const size_t n = static_cast<size_t>(g.numel()), c = static_cast<size_t>(C);

  syncbn_config_t cfg = syncbn::make_config(C, CudaType<S>::dtype);
  cfg.layout = o.layout;
  cfg.device = SYNCBN_DEVICE_CUDA;
  cfg.momentum = o.momentum;
  cfg.eps = 1e-3;
  syncbn_plan_t pe = nullptr, pg = nullptr;
  EXPECT_EQ(syncbn_plan_create(comm, &cfg, &pe), SYNCBN_SUCCESS) << syncbn_last_error();
  EXPECT_EQ(syncbn_plan_create(comm, &cfg, &pg), SYNCBN_SUCCESS) << syncbn_last_error();
  std::unique_ptr<syncbn_plan_s, decltype(&syncbn_plan_destroy)> eager(pe, &syncbn_plan_destroy),
      graph_plan(pg, &syncbn_plan_destroy);
  if (!o.all_agree(pe != nullptr && pg != nullptr)) return;

  Rng common(o.seed);
  LayerState<P> init = LayerState<P>::random(C, common);
  init.num_batches_tracked = 0;
  Rng local(o.seed + 7919u * static_cast<uint32_t>(o.rank + 1));
  const auto dist = ChannelDistribution::random(C, local);
  std::vector<std::vector<P>> xs, dys;
  for (int s = 0; s < o.steps; ++s) {
    xs.push_back(rounded_to<S>(random_batch<P>(g, local, dist)));
    dys.push_back(rounded_to<S>(random_batch<P>(g, local)));
  }

  Stream stream;
  // The buffers of one run (eager or graph): the captured graph keeps their addresses.
  struct Buffers {
    DeviceLayerState<P> st;
    DeviceArray<S> x, dy, y, dx;
    DeviceArray<P> save_mean, save_invstd, dweight, dbias;
    Buffers(const LayerState<P>& init, size_t n, size_t c)
        : st(init), x(n), dy(n), y(n), dx(n), save_mean(c), save_invstd(c), dweight(c), dbias(c) {
      const S sentinel = CudaType<S>::from_double(-777);
      y.fill(sentinel);
      dx.fill(sentinel);
      for (auto* a : {&save_mean, &save_invstd, &dweight, &dbias}) a->fill(P(-777));
    }
    StepResult result() const {
      StepResult r;
      r.y = download_double(y);
      r.dx = download_double(dx);
      r.save_mean = to_double(save_mean.download());
      r.save_invstd = to_double(save_invstd.download());
      r.dweight = to_double(dweight.download());
      r.dbias = to_double(dbias.download());
      const LayerState<P> s = st.download();
      r.running_mean = to_double(s.running_mean);
      r.running_var = to_double(s.running_var);
      r.num_batches_tracked = s.num_batches_tracked;
      return r;
    }
  };
  auto enqueue_step = [&](syncbn_plan_t plan, Buffers& b, syncbn_status_t* fs,
                          syncbn_status_t* bs) {
    *fs = syncbn_forward_training(
        plan, g.ndim(), shape.data(), b.x.data(), b.st.weight.data(), b.st.bias.data(), b.y.data(),
        b.save_mean.data(), b.save_invstd.data(), b.st.running_mean.data(), b.st.running_var.data(),
        b.st.num_batches_tracked.data(), stream.handle());
    *bs = syncbn_backward(plan, g.ndim(), shape.data(), b.x.data(), b.dy.data(), b.st.weight.data(),
                          b.save_mean.data(), b.save_invstd.data(), b.dx.data(), b.dweight.data(),
                          b.dbias.data(), stream.handle());
  };
  auto async_ok = [&](syncbn_plan_t plan) {
    syncbn_status_t async = SYNCBN_ERROR_INTERNAL;
    EXPECT_EQ(syncbn_plan_get_async_error(plan, stream.handle(), &async), SYNCBN_SUCCESS)
        << syncbn_last_error();
    EXPECT_EQ(async, SYNCBN_SUCCESS) << syncbn_last_error();
    stream.sync();
  };

  // ---- the CPU plan: the expected value of every eager step (group of one only)
  std::vector<StepResult> cpu;
  if (o.compare_with_cpu) {
    syncbn_config_t ccfg = cfg;
    ccfg.device = SYNCBN_DEVICE_CPU;
    ccfg.dtype = DtypeOf<P>::value;
    syncbn::BatchNorm ref(syncbn::Communicator::self(), ccfg);
    LayerState<P> st = init;
    for (int s = 0; s < o.steps; ++s) {
      std::vector<P> y(n), sm(c), si(c), dx(n), dw(c), db(c);
      ref.forward_training(shape, xs[s].data(), st.weight.data(), st.bias.data(), y.data(),
                           sm.data(), si.data(), st.running_mean.data(), st.running_var.data(),
                           &st.num_batches_tracked);
      ref.backward(shape, xs[s].data(), dys[s].data(), st.weight.data(), sm.data(), si.data(),
                   dx.data(), dw.data(), db.data());
      cpu.push_back(StepResult{to_double(y), to_double(sm), to_double(si), to_double(dx),
                               to_double(dw), to_double(db), to_double(st.running_mean),
                               to_double(st.running_var), st.num_batches_tracked});
    }
  }

  // ---- eager steps
  std::vector<StepResult> eager_steps;
  {
    Buffers b(init, n, c);
    for (int s = 0; s < o.steps; ++s) {
      SCOPED_TRACE("eager step " + std::to_string(s));
      b.x.upload_async(to_storage<S>(xs[s]), stream.get());
      b.dy.upload_async(to_storage<S>(dys[s]), stream.get());
      syncbn_status_t fs, bs;
      enqueue_step(eager.get(), b, &fs, &bs);
      EXPECT_EQ(fs, SYNCBN_SUCCESS) << syncbn_last_error();
      EXPECT_EQ(bs, SYNCBN_SUCCESS) << syncbn_last_error();
      async_ok(eager.get());
      eager_steps.push_back(b.result());
      EXPECT_EQ(eager_steps.back().num_batches_tracked, s + 1);
      if (o.compare_with_cpu)
        expect_same_step("eager GPU step vs the CPU plan", eager_steps.back(), cpu[s], kDataTol,
                         kStatsTol);
    }
  }

  // ---- capture once
  Buffers b(init, n, c);
  const StepResult before_capture = b.result();
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  syncbn_status_t fs = SYNCBN_ERROR_INTERNAL, bs = SYNCBN_ERROR_INTERNAL;
  const cudaError_t begin = cudaStreamBeginCapture(stream.get(), o.mode);
  EXPECT_TRUE(cuda_ok(begin, "cudaStreamBeginCapture"));
  if (begin == cudaSuccess) {
    enqueue_step(graph_plan.get(), b, &fs, &bs);
    EXPECT_TRUE(cuda_ok(cudaStreamEndCapture(stream.get(), &graph), "cudaStreamEndCapture"))
        << "the library made a call that is illegal during stream capture (a synchronization, "
           "cudaMalloc/cudaFree, a copy on another stream, ...)";
  }
  EXPECT_EQ(fs, SYNCBN_SUCCESS) << "forward_training during capture: " << syncbn_last_error();
  EXPECT_EQ(bs, SYNCBN_SUCCESS) << "backward during capture: " << syncbn_last_error();
  bool ok =
      begin == cudaSuccess && graph != nullptr && fs == SYNCBN_SUCCESS && bs == SYNCBN_SUCCESS;
  if (ok) {
    SYNCBN_CUDA_EXPECT(cudaStreamSynchronize(stream.get()));
    const StepResult after_capture = b.result();
    // Nothing ran: every buffer is as it was (sentinels, initial state), bitwise.
    EXPECT_TRUE(same_bytes("y after capture", after_capture.y, before_capture.y));
    EXPECT_TRUE(
        same_bytes("save_mean after capture", after_capture.save_mean, before_capture.save_mean));
    EXPECT_TRUE(same_bytes("running_mean after capture", after_capture.running_mean,
                           before_capture.running_mean));
    EXPECT_TRUE(same_bytes("running_var after capture", after_capture.running_var,
                           before_capture.running_var));
    EXPECT_EQ(after_capture.num_batches_tracked, 0) << "capturing must not count a batch";
    ok = cuda_ok(cudaGraphInstantiate(&exec, graph, 0), "cudaGraphInstantiate");
    EXPECT_TRUE(ok);
  }
  if (o.all_agree(ok)) {
    // ---- replay, step by step
    for (int s = 0; s < o.steps; ++s) {
      SCOPED_TRACE("graph replay " + std::to_string(s));
      b.x.upload_async(to_storage<S>(xs[s]), stream.get());
      b.dy.upload_async(to_storage<S>(dys[s]), stream.get());
      SYNCBN_CUDA_EXPECT(cudaGraphLaunch(exec, stream.get()));
      async_ok(graph_plan.get());
      const StepResult r = b.result();
      EXPECT_EQ(r.num_batches_tracked, s + 1);
      if (o.bitwise) {
        expect_bitwise_step("graph replay vs eager step", r, eager_steps[s]);
      } else {
        expect_same_step("graph replay vs eager step", r, eager_steps[s], kDataTol, kStatsTol);
      }
      if (o.compare_with_cpu)
        expect_same_step("graph replay vs the CPU plan", r, cpu[s], kDataTol, kStatsTol);
    }
    EXPECT_EQ(b.result().num_batches_tracked, o.steps);
  }
  if (exec) (void)cudaGraphExecDestroy(exec);
  if (graph) (void)cudaGraphDestroy(graph);
}

// Holds a stream (a host function enqueued on it waits) until opened, or gives up after 20 s.
struct StreamGate {
  std::atomic<bool> open{false}, entered{false}, gave_up{false};
  static void CUDART_CB wait(void* p) {
    auto* gate = static_cast<StreamGate*>(p);
    gate->entered = true;
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while (!gate->open.load()) {
      if (std::chrono::steady_clock::now() > deadline) {
        gate->gave_up = true;
        return;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  }
};

}  // namespace syncbn_test

#endif  // SYNCBN_TESTS_CUDA_HELPERS_HPP
