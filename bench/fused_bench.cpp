// fused_bench: syncbn's fused activations (syncbn_activation_t) against the same layer with the
// activation as separate passes, and against oneDNN's fused batch norm, over MPI ranks. Run it
// under the launch script:
//
//   launch/run_local.sh -n P --threads T -- build/bench/fused_bench [--shape NxCxHxW ...]
//       [--batch 32] [--layout nchw,nhwc] [--act relu,add_relu] [-n 20] [-w 3]
//       [--csv FILE] [--json FILE] [--no-onednn] [--no-check]
//
// Shapes are per rank (the global batch is P x N); the default is the 12 distinct batch-norm
// input shapes of ResNet-50 at N = --batch (bench::resnet50_shapes, as syncbn_bench). fp32 only.
//
// Per shape, layout and activation (relu: y = relu(bn(x)); add_relu: y = relu(bn(x) + z)), on
// the same OpenMP threads and in the same run, four modes:
//   fused     one syncbn plan on MPI_COMM_WORLD with cfg.activation = SYNCBN_ACTIVATION_RELU
//             (_ADD_RELU): syncbn_forward_training_ex (z: the residual; mask: the relu's mask,
//             a byte per element) and syncbn_backward_ex (mask: the forward's, in place of y;
//             dz: the residual's gradient), as the libtorch and Python modules call them.
//   separate  what a framework runs without the fusion: a syncbn plan on MPI_COMM_WORLD without
//             an activation, then the activation as its own passes over the tensor (OpenMP simd
//             loops, compiled for AVX-512 / AVX2 / baseline and picked at run time, as PyTorch's
//             kernels are): forward relu y = bn(x); relu_(y) (PyTorch's relu_, in place), or
//             add_relu y = bn(x); y += z; relu_(y) (two passes, torchvision's ResNet
//             `out += identity; out = relu(out)`); backward the relu's backward to a tensor,
//             g = y > 0 ? dy : 0 (PyTorch's threshold_backward), then syncbn_backward of g (for
//             add_relu g is also dz).
//   oneDNN    (not synchronized: each rank normalizes its own batch; compare per-rank times of
//             the same run) relu: dnnl::batch_normalization_forward / _backward with
//             use_scale | use_shift | fuse_norm_relu (forward_training writes the workspace, the
//             relu's mask, which backward reads). add_relu: oneDNN 2.6 has no
//             fuse_norm_add_relu (a later oneDNN has it: 3.x's dnnl_types.h lists it), and
//             fuse_norm_relu cannot take z; so oneDNN's batch norm (use_scale | use_shift),
//             then a binary add with an eltwise-relu post-op (one pass: y = relu(y + z), in
//             place), and backward an eltwise relu backward (relu_use_dst_for_bwd: g = dy where
//             y > 0, written to a tensor, = dz) then the batch norm's backward of g. The best
//             that oneDNN 2.6's primitives give for this layer.
//   local     the fused plan on syncbn_comm_create_self (no exchange), forward + backward only:
//             the like-for-like comparison with oneDNN, which does not synchronize either.
//   from y    the fused plan without the mask, its backward reading y instead (the calls before
//             0.5), forward + backward only: the column mask/y is fused f+b over it.
// Timing: every op (fwd, bwd and fwd+bwd of fused, separate and oneDNN; fwd+bwd of local) runs
// once per round, each after an MPI_Barrier, in a random order per round (the same on every
// rank), -w untimed rounds then -n timed ones (bench/driver/bench_mpi.hpp's time_interleaved);
// the median over rounds of each op on each rank, then the maximum over ranks. Every mode's
// buffers are its own (y, mask, dx, dz), so a backward op reads its own forward's mask (or y);
// before the rounds every mode runs once, so that no backward op reads an output not yet written.
// GB/s: the bytes each mode must move over its time (T = the tensor's bytes, M = T/4 the mask's):
// fused relu forward 3T + M (x twice, y, mask), backward 5T + 2M (x, dy and the mask twice, dx);
// fused add_relu 4T + M (+ z) and 6T + 2M (+ dz); separate relu 5T (+ relu read and write) and
// 8T (relu backward 3T, batch norm 5T); separate add_relu 8T (+ add 3T, relu 2T) and 8T; oneDNN
// relu 3T and 5T (plus the workspace); oneDNN add_relu 6T (batch norm 3T, binary 3T) and 8T
// (eltwise backward 3T, batch norm 5T). A memory-bound model gives fused / separate
// forward+backward = 8.75 / 13 = 0.67 (relu) and 10.75 / 16 = 0.67 (add_relu) where the tensor
// is larger than the caches (with y for the mask, as before 0.5: 10 / 13 = 0.77 and
// 12 / 16 = 0.75); the footer prints them.
//
// Goals (footer): fused / separate forward+backward <= 0.75; fused / oneDNN forward+backward
// <= 1.0 (counted per row).
// Checks (default on, --no-check), after the timed rounds on the same plans and buffers:
//   fused vs separate, bitwise: y, dx, dz (add_relu), dweight, dbias, save_mean and save_invstd
//     of the fused plan equal the separate path's (the library computes the same value and
//     applies the activation; the mask gates the same dy); max abs difference and the count of
//     elements whose bits differ, over all ranks. WRONG if either is not 0.
//   oneDNN vs syncbn: the local plan's y, dx (and dz) against oneDNN's, max abs difference over
//     the tensor's max |value| (syncbn's), over all ranks; WRONG above 1e-4. Elements whose
//     relu mask differs between the two (y > 0 in one, 0 in the other: a pre-activation within
//     rounding of 0) would gate dy differently, changing dx there by a * dy and the channel's
//     other dx through its sums by ~ a * dy / m, which at m = 32 x 14 x 14 is already ~1e-4 of
//     max |dx|; so the two forwards run, then dy is zeroed at those elements (both masks then
//     give 0), the two backwards run, and dy is restored. They are counted; WRONG if such an
//     element's y is above the y tolerance (then it is not rounding). Both libraries' mean and
//     variance are also held against fp64 statistics of the same x (reported, not a check), to
//     tell which one a difference comes from.
// Exit status: 0; 1 if a check failed (WRONG in the footer); 2 on bad arguments.
// Only rank 0 prints and writes files. CSV: one header line, one line per row, empty fields for
// n/a. JSON: {"meta": {...}, "results": [{same keys as the CSV}, ...]}, null for n/a.
// Options, timing, the table and the CSV / JSON writers are the shared driver's
// (bench/driver/bench_driver.hpp, bench_mpi.hpp).
#include <mpi.h>
#include <omp.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "driver/bench_mpi.hpp"
#include "syncbn/syncbn_mpi.hpp"
#ifdef SYNCBN_BENCH_HAVE_ONEDNN
#include "oneapi/dnnl/dnnl.hpp"
#endif

namespace {

using bench::kNaN;
using bench::Shape4;

constexpr double kSeparateGoal = 0.75;    // fused / separate, forward + backward
constexpr double kOneDnnGoal = 1.0;       // fused / oneDNN, forward + backward
constexpr double kOneDnnTolerance = 1e-4;  // max abs difference / max |value|
constexpr int64_t kParallelMin = 32768;    // PyTorch's grain size: smaller loops on one thread

// ---- buffers, data ------------------------------------------------------------------------------

// 64-byte aligned floats, first touched by fill() on the OpenMP threads.
class Buffer {
 public:
  explicit Buffer(int64_t count) {
    const std::size_t bytes =
        (static_cast<std::size_t>(std::max<int64_t>(count, 1)) * sizeof(float) + 63) / 64 * 64;
    ptr_.reset(static_cast<float*>(std::aligned_alloc(64, bytes)));
    if (!ptr_) throw std::bad_alloc();
  }
  float* data() const { return ptr_.get(); }

 private:
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  std::unique_ptr<float, Free> ptr_;
};

uint64_t splitmix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ULL;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// p[i] = center + half_width * u, u uniform in [-1, 1), a pure function of (seed, i).
void fill(float* p, int64_t count, uint64_t seed, double center, double half_width) {
  const uint64_t key = splitmix64(seed);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < count; ++i) {
    const double u =
        static_cast<double>(splitmix64(key ^ static_cast<uint64_t>(i)) >> 11) * 0x1.0p-53;
    p[i] = static_cast<float>(center + half_width * (2 * u - 1));
  }
}

// ---- the separate passes ------------------------------------------------------------------------

// The kernels of one thread's share, compiled for AVX-512, AVX2 and the baseline and picked at
// run time (the bench itself is built for the baseline; the library dispatches the same way).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FUSED_BENCH_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FUSED_BENCH_CLONES
#endif

FUSED_BENCH_CLONES void relu_span(float* __restrict__ y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = y[i] < 0.0f ? 0.0f : y[i];  // NaN stays NaN
}

FUSED_BENCH_CLONES void add_span(float* __restrict__ y, const float* __restrict__ z, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += z[i];
}

FUSED_BENCH_CLONES void relu_backward_span(const float* __restrict__ y,
                                           const float* __restrict__ dy, float* __restrict__ g,
                                           int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) g[i] = y[i] > 0.0f ? dy[i] : 0.0f;
}

// f(begin, end) over [0, count) in static shares of the OpenMP threads (one thread below
// kParallelMin elements).
template <class F>
void parallel_spans(int64_t count, F&& f) {
  const int nt = count < kParallelMin ? 1 : omp_get_max_threads();
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    const int t = omp_get_thread_num(), p = omp_get_num_threads();
    const int64_t begin = count * t / p, end = count * (t + 1) / p;
    if (end > begin) f(begin, end);
  }
}

void relu_(float* y, int64_t count) {
  parallel_spans(count, [=](int64_t b, int64_t e) { relu_span(y + b, e - b); });
}
void add_(float* y, const float* z, int64_t count) {
  parallel_spans(count, [=](int64_t b, int64_t e) { add_span(y + b, z + b, e - b); });
}
void relu_backward(const float* y, const float* dy, float* g, int64_t count) {
  parallel_spans(count,
                 [=](int64_t b, int64_t e) { relu_backward_span(y + b, dy + b, g + b, e - b); });
}

// ---- oneDNN -------------------------------------------------------------------------------------

#ifdef SYNCBN_BENCH_HAVE_ONEDNN
std::string onednn_version() {
  const dnnl_version_t* v = dnnl_version();
  return std::to_string(v->major) + "." + std::to_string(v->minor) + "." + std::to_string(v->patch);
}

// oneDNN's batch norm with the activation (see the file comment), on caller-owned f32 buffers in
// NCHW or NHWC; primitive creation (and its JIT) in the constructor, outside the timed rounds.
// relu: x -> y (fuse_norm_relu, workspace); dy -> dx. add_relu: x, z -> y; dy -> g (= dz), dx.
// mean and variance are owned here. Throws dnnl::error if oneDNN rejects the problem.
class OneDnnFused {
 public:
  OneDnnFused(const Shape4& s, bool nhwc, bool add, float eps, float* x, float* z, float* y,
              float* dy, float* g, float* dx, float* scale, float* shift, float* diff_scale,
              float* diff_shift)
      : add_(add), engine_(dnnl::engine::kind::cpu, 0), stream_(engine_), mean_(s.c),
        variance_(s.c) {
    using dnnl::memory;
    using tag = memory::format_tag;
    using flags_t = dnnl::normalization_flags;
    const memory::desc data({s.n, s.c, s.h, s.w}, memory::data_type::f32,
                            nhwc ? tag::nhwc : tag::nchw);
    const memory::desc channel({s.c}, memory::data_type::f32, tag::a);
    const flags_t flags = add ? flags_t::use_scale | flags_t::use_shift
                              : flags_t::use_scale | flags_t::use_shift | flags_t::fuse_norm_relu;
    const dnnl::batch_normalization_forward::primitive_desc fwd_pd(
        {dnnl::prop_kind::forward_training, data, eps, flags}, engine_);
    const dnnl::batch_normalization_backward::primitive_desc bwd_pd(
        {dnnl::prop_kind::backward, data, data, eps, flags}, engine_, fwd_pd);
    bn_fwd_ = dnnl::batch_normalization_forward(fwd_pd);
    bn_bwd_ = dnnl::batch_normalization_backward(bwd_pd);
    impl_ = std::string("batch norm ") + fwd_pd.impl_info_str() + " / " + bwd_pd.impl_info_str();

    const memory src(data, engine_, x), dst(data, engine_, y), diff_dst(data, engine_, dy),
        diff_src(data, engine_, dx);
    const memory mscale(channel, engine_, scale), mshift(channel, engine_, shift),
        mdiff_scale(channel, engine_, diff_scale), mdiff_shift(channel, engine_, diff_shift),
        mmean(channel, engine_, mean_.data()), mvariance(channel, engine_, variance_.data());
    bn_fwd_args_ = {{DNNL_ARG_SRC, src},      {DNNL_ARG_DST, dst},
                    {DNNL_ARG_SCALE, mscale}, {DNNL_ARG_SHIFT, mshift},
                    {DNNL_ARG_MEAN, mmean},   {DNNL_ARG_VARIANCE, mvariance}};
    // Backward with use_shift takes the shift too (oneDNN 2.6 rejects the call without it).
    bn_bwd_args_ = {{DNNL_ARG_SRC, src},           {DNNL_ARG_DIFF_DST, diff_dst},
                    {DNNL_ARG_SCALE, mscale},      {DNNL_ARG_SHIFT, mshift},
                    {DNNL_ARG_MEAN, mmean},        {DNNL_ARG_VARIANCE, mvariance},
                    {DNNL_ARG_DIFF_SRC, diff_src}, {DNNL_ARG_DIFF_SCALE, mdiff_scale},
                    {DNNL_ARG_DIFF_SHIFT, mdiff_shift}};
    // fuse_norm_relu in training: the workspace (the relu's mask) from forward to backward.
    if (fwd_pd.workspace_desc().get_size() != 0) {
      workspace_ = memory(fwd_pd.workspace_desc(), engine_);
      bn_fwd_args_.emplace(DNNL_ARG_WORKSPACE, workspace_);
      bn_bwd_args_.emplace(DNNL_ARG_WORKSPACE, workspace_);
    }
    if (!add) return;

    // y = relu(y + z) in place: a binary add with an eltwise-relu post-op.
    const memory residual(data, engine_, z), grad(data, engine_, g);
    dnnl::post_ops po;
    po.append_eltwise(1.0f, dnnl::algorithm::eltwise_relu, 0.0f, 0.0f);
    dnnl::primitive_attr attr;
    attr.set_post_ops(po);
    const dnnl::binary::primitive_desc add_pd({dnnl::algorithm::binary_add, data, data, data},
                                              attr, engine_);
    add_relu_ = dnnl::binary(add_pd);
    add_relu_args_ = {{DNNL_ARG_SRC_0, dst}, {DNNL_ARG_SRC_1, residual}, {DNNL_ARG_DST, dst}};
    // g = dy where y > 0, else 0: the relu's backward from its output.
    const dnnl::eltwise_forward::primitive_desc relu_fwd_pd(
        {dnnl::prop_kind::forward_training, dnnl::algorithm::eltwise_relu_use_dst_for_bwd, data,
         0.0f, 0.0f},
        engine_);
    const dnnl::eltwise_backward::primitive_desc relu_bwd_pd(
        {dnnl::algorithm::eltwise_relu_use_dst_for_bwd, data, data, 0.0f, 0.0f}, engine_,
        relu_fwd_pd);
    relu_bwd_ = dnnl::eltwise_backward(relu_bwd_pd);
    impl_ += std::string(", binary ") + add_pd.impl_info_str() + ", eltwise backward " +
             relu_bwd_pd.impl_info_str();
    relu_bwd_args_ = {{DNNL_ARG_DST, dst}, {DNNL_ARG_DIFF_DST, diff_dst}, {DNNL_ARG_DIFF_SRC, grad}};
    bn_bwd_args_[DNNL_ARG_DIFF_DST] = grad;  // the batch norm's backward of g
  }

  void forward() {
    bn_fwd_.execute(stream_, bn_fwd_args_);
    if (add_) add_relu_.execute(stream_, add_relu_args_);
    stream_.wait();
  }
  void backward() {
    if (add_) relu_bwd_.execute(stream_, relu_bwd_args_);
    bn_bwd_.execute(stream_, bn_bwd_args_);
    stream_.wait();
  }
  // The implementations oneDNN picked ("batch norm bnorm_jit:avx512_core / ...").
  const std::string& impl() const { return impl_; }
  // The last forward's statistics (the variance is the biased one).
  const std::vector<float>& mean() const { return mean_; }
  const std::vector<float>& variance() const { return variance_; }

 private:
  bool add_;
  std::string impl_;
  dnnl::engine engine_;
  dnnl::stream stream_;
  std::vector<float> mean_, variance_;
  dnnl::memory workspace_;
  dnnl::batch_normalization_forward bn_fwd_;
  dnnl::batch_normalization_backward bn_bwd_;
  dnnl::binary add_relu_;
  dnnl::eltwise_backward relu_bwd_;
  std::unordered_map<int, dnnl::memory> bn_fwd_args_, bn_bwd_args_, add_relu_args_,
      relu_bwd_args_;
};
#endif

// ---- comparisons --------------------------------------------------------------------------------

struct Diff {
  double max_abs = 0;   // infinity where a NaN is met
  int64_t unequal = 0;  // elements whose bits differ
};

Diff compare_bits(const float* a, const float* b, int64_t count) {
  double m = 0;
  int64_t unequal = 0;
#pragma omp parallel for schedule(static) reduction(max : m) reduction(+ : unequal)
  for (int64_t i = 0; i < count; ++i) {
    const double d = std::fabs(static_cast<double>(a[i]) - static_cast<double>(b[i]));
    m = std::isnan(d) ? std::numeric_limits<double>::infinity() : std::max(m, d);
    unequal += std::memcmp(&a[i], &b[i], sizeof(float)) != 0;
  }
  return {m, unequal};
}

double max_abs(const float* a, int64_t count) {
  double m = 0;
#pragma omp parallel for schedule(static) reduction(max : m)
  for (int64_t i = 0; i < count; ++i) {
    const double v = std::fabs(static_cast<double>(a[i]));
    m = std::isnan(v) ? std::numeric_limits<double>::infinity() : std::max(m, v);
  }
  return m;
}

// Per-channel mean and (biased) variance of x in fp64, two passes: the reference the two
// libraries' statistics are held against.
struct RefStats {
  std::vector<double> mean, var;
};

RefStats reference_stats(const float* x, const Shape4& s, bool nhwc) {
  const int64_t C = s.c, S = s.h * s.w;
  const double m = static_cast<double>(s.n * S);
  RefStats r{std::vector<double>(C, 0.0), std::vector<double>(C, 0.0)};
  auto at = [&](int64_t n, int64_t c, int64_t i) {
    return static_cast<double>(nhwc ? x[(n * S + i) * C + c] : x[(n * C + c) * S + i]);
  };
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < C; ++c) {
    double sum = 0;
    for (int64_t n = 0; n < s.n; ++n) {
      for (int64_t i = 0; i < S; ++i) sum += at(n, c, i);
    }
    const double mean = sum / m;
    double sq = 0;
    for (int64_t n = 0; n < s.n; ++n) {
      for (int64_t i = 0; i < S; ++i) sq += (at(n, c, i) - mean) * (at(n, c, i) - mean);
    }
    r.mean[c] = mean;
    r.var[c] = sq / m;
  }
  return r;
}

// {max |mean - ref| / ref std, max |var - ref| / ref var} over channels.
std::pair<double, double> stats_error(const RefStats& ref, const std::vector<float>& mean,
                                      const std::vector<float>& var) {
  double em = 0, ev = 0;
  for (std::size_t c = 0; c < ref.mean.size(); ++c) {
    em = std::max(em, std::fabs(mean[c] - ref.mean[c]) / std::sqrt(ref.var[c]));
    ev = std::max(ev, std::fabs(var[c] - ref.var[c]) / ref.var[c]);
  }
  return {em, ev};
}

double nan_max(double a, double b) {
  return std::isnan(a) ? b : std::isnan(b) ? a : std::max(a, b);
}

// ---- rows, checks -------------------------------------------------------------------------------

struct Options {
  bench::CommonOptions common;  // -n, -w, --csv, --json
  std::vector<Shape4> shapes;
  std::vector<std::string> layouts{"nchw"};
  std::vector<std::string> acts{"relu", "add_relu"};
  bool onednn = true;
  bool check = true;
};

struct Row {
  Shape4 shape;
  std::string layout, act;
  int ranks = 1, threads = 1;
  int64_t tensor_bytes = 0;
  // seconds: fwd, bwd, fwd+bwd per mode (local: fwd+bwd only)
  double fused[3] = {kNaN, kNaN, kNaN}, sep[3] = {kNaN, kNaN, kNaN},
         onednn[3] = {kNaN, kNaN, kNaN}, local_fb = kNaN, from_y_fb = kNaN;
  double bytes_fused[3] = {}, bytes_sep[3] = {}, bytes_onednn[3] = {};  // bytes moved, the same
  // checks: fused vs separate (max over every compared tensor) and oneDNN vs local
  double bit_diff = kNaN;
  int64_t bit_unequal = -1;
  double dnnl_y_rel = kNaN, dnnl_dx_rel = kNaN, dnnl_dz_rel = kNaN;
  int64_t dnnl_kink = -1, dnnl_bad_mask = -1;
  // statistics against fp64 ones: {max |mean err| / std, max |var err| / var}
  double stats_err_syncbn[2] = {kNaN, kNaN}, stats_err_onednn[2] = {kNaN, kNaN};
  std::string onednn_impl;  // the implementations oneDNN picked

  double us(const double (&t)[3], int k) const { return t[k] * 1e6; }
  double ratio_sep(int k) const { return fused[k] / sep[k]; }
  double ratio_dnnl(int k) const { return fused[k] / onednn[k]; }
  double ratio_local_dnnl() const { return local_fb / onednn[2]; }
  double ratio_mask_y() const { return fused[2] / from_y_fb; }
  double gbs(const double (&t)[3], const double (&b)[3], int k) const { return b[k] / t[k] / 1e9; }
};

struct Checks {
  int shapes_bits = 0, wrong_bits = 0;
  double bit_diff = kNaN;
  int64_t bit_unequal = 0;
  int shapes_dnnl = 0, wrong_dnnl = 0;
  double y_rel = kNaN, dx_rel = kNaN, dz_rel = kNaN;
  int64_t kink = 0, bad_mask = 0;
  double stats_syncbn[2] = {kNaN, kNaN}, stats_onednn[2] = {kNaN, kNaN};
};

// ---- one shape, layout and activation -----------------------------------------------------------

struct Tensors {  // every tensor of one shape, for both activations
  explicit Tensors(int64_t count)
      : x(count), z(count), dy(count), y_f(count), y_s(count), y_d(count), y_l(count),
        dx_f(count), dx_s(count), dx_d(count), dx_l(count), dz_f(count), g_s(count), g_d(count),
        dz_l(count), y_y(count), dx_y(count), dz_y(count), mask_f(static_cast<size_t>(count)),
        mask_l(static_cast<size_t>(count)) {}
  Buffer x, z, dy, y_f, y_s, y_d, y_l, dx_f, dx_s, dx_d, dx_l, dz_f, g_s, g_d, dz_l;
  Buffer y_y, dx_y, dz_y;                // the from-y plan's
  std::vector<uint8_t> mask_f, mask_l;  // the fused and local plans' relu masks
};

struct Stats {  // a plan's saved and running statistics and parameter gradients
  explicit Stats(int64_t c) : mean(c), invstd(c), rmean(c, 0.0f), rvar(c, 1.0f), dw(c), db(c) {}
  std::vector<float> mean, invstd, rmean, rvar, dw, db;
  int64_t nbt = 0;
};

Row run_one(const Shape4& s, bool nhwc, bool add, const Options& o, const syncbn::Communicator& world,
            Tensors& t, const std::vector<float>& weight, const std::vector<float>& bias,
            Checks& chk) {
  const int64_t count = s.count(), C = s.c;
  const MPI_Comm mpi = MPI_COMM_WORLD;
  const std::vector<int64_t> shape =
      nhwc ? std::vector<int64_t>{s.n, s.h, s.w, s.c} : std::vector<int64_t>{s.n, s.c, s.h, s.w};

  syncbn_config_t cfg = syncbn::make_config(C, SYNCBN_FLOAT32);
  cfg.layout = nhwc ? SYNCBN_CHANNELS_LAST : SYNCBN_CHANNELS_FIRST;
  syncbn_config_t cfg_act = cfg;
  cfg_act.activation = add ? SYNCBN_ACTIVATION_ADD_RELU : SYNCBN_ACTIVATION_RELU;
  // COLLECTIVE plans (the same on every rank).
  // from_y: a plan of its own, so that the fused and separate plans see the same calls (a
  // plan's sums are taken around its previous mean: channels-last fp32 sums, rounded in the
  // data type, differ in their last bits with that history).
  syncbn::BatchNorm fused(world, cfg_act), separate(world, cfg), from_y(world, cfg_act);
  syncbn::BatchNorm local(syncbn::Communicator::self(), cfg_act);
  Stats st_f(C), st_s(C), st_l(C), st_d(C), st_y(C);  // st_d: oneDNN's diff_scale / diff_shift

  // The fused plan's calls (fused: on the world; local: on self).
  // mask NULL: the backward reads y (from_y).
  auto fused_fwd = [&](syncbn::BatchNorm& bn, Stats& st, float* y, uint8_t* mask) {
    syncbn_forward_args_t a{};
    a.ndim = 4;
    a.shape = shape.data();
    a.x = t.x.data();
    a.z = add ? t.z.data() : nullptr;
    a.weight = weight.data();
    a.bias = bias.data();
    a.y = y;
    a.save_mean = st.mean.data();
    a.save_invstd = st.invstd.data();
    a.running_mean = st.rmean.data();
    a.running_var = st.rvar.data();
    a.num_batches_tracked = &st.nbt;
    a.mask = mask;
    bn.forward_training(a);
  };
  auto fused_bwd = [&](syncbn::BatchNorm& bn, Stats& st, const uint8_t* mask, float* dx,
                       float* dz, const float* y = nullptr) {
    syncbn_backward_args_t b{};
    b.ndim = 4;
    b.shape = shape.data();
    b.x = t.x.data();
    b.mask = mask;
    b.y = y;
    b.dy = t.dy.data();
    b.weight = weight.data();
    b.save_mean = st.mean.data();
    b.save_invstd = st.invstd.data();
    b.dx = dx;
    b.dz = add ? dz : nullptr;
    b.dweight = st.dw.data();
    b.dbias = st.db.data();
    bn.backward(b);
  };
  auto sep_fwd = [&] {
    separate.forward_training(shape, t.x.data(), weight.data(), bias.data(), t.y_s.data(),
                              st_s.mean.data(), st_s.invstd.data(), st_s.rmean.data(),
                              st_s.rvar.data(), &st_s.nbt);
    if (add) add_(t.y_s.data(), t.z.data(), count);
    relu_(t.y_s.data(), count);
  };
  auto sep_bwd = [&] {
    relu_backward(t.y_s.data(), t.dy.data(), t.g_s.data(), count);
    separate.backward(shape, t.x.data(), t.g_s.data(), weight.data(), st_s.mean.data(),
                      st_s.invstd.data(), t.dx_s.data(), st_s.dw.data(), st_s.db.data());
  };

  std::vector<bench::Op> ops;
  auto op = [&ops](std::function<void()> f) {
    ops.push_back({std::move(f), {}, {}});
    return static_cast<int>(ops.size()) - 1;
  };
  int op_f[3], op_s[3], op_d[3] = {-1, -1, -1};
  op_f[0] = op([&] { fused_fwd(fused, st_f, t.y_f.data(), t.mask_f.data()); });
  op_f[1] = op([&] { fused_bwd(fused, st_f, t.mask_f.data(), t.dx_f.data(), t.dz_f.data()); });
  op_f[2] = op([&] {
    fused_fwd(fused, st_f, t.y_f.data(), t.mask_f.data());
    fused_bwd(fused, st_f, t.mask_f.data(), t.dx_f.data(), t.dz_f.data());
  });
  op_s[0] = op(sep_fwd);
  op_s[1] = op(sep_bwd);
  op_s[2] = op([&] {
    sep_fwd();
    sep_bwd();
  });
  const int op_y = op([&] {
    fused_fwd(from_y, st_y, t.y_y.data(), nullptr);
    fused_bwd(from_y, st_y, nullptr, t.dx_y.data(), t.dz_y.data(), t.y_y.data());
  });
  const int op_l = op([&] {
    fused_fwd(local, st_l, t.y_l.data(), t.mask_l.data());
    fused_bwd(local, st_l, t.mask_l.data(), t.dx_l.data(), t.dz_l.data());
  });
  std::string r_impl;
#ifdef SYNCBN_BENCH_HAVE_ONEDNN
  std::unique_ptr<OneDnnFused> onednn;
  std::vector<float> scale(weight), shift(bias);  // oneDNN's memory objects take non-const
  if (o.onednn) {
    onednn = std::make_unique<OneDnnFused>(s, nhwc, add, static_cast<float>(cfg.eps), t.x.data(),
                                           t.z.data(), t.y_d.data(), t.dy.data(), t.g_d.data(),
                                           t.dx_d.data(), scale.data(), shift.data(),
                                           st_d.dw.data(), st_d.db.data());
    r_impl = onednn->impl();
    op_d[0] = op([&] { onednn->forward(); });
    op_d[1] = op([&] { onednn->backward(); });
    op_d[2] = op([&] {
      onednn->forward();
      onednn->backward();
    });
  }
#endif

  // Every mode once before the rounds (each backward op then reads its own forward's outputs);
  // the fused and separate plans then make the same calls alike, forward and backward.
  for (const int i : {op_f[2], op_s[2], op_l, op_d[2]}) {
    if (i >= 0) ops[static_cast<std::size_t>(i)].run();
  }
  const std::vector<double> sec = bench::time_interleaved(ops, o.common.iters, o.common.warmup, mpi);
  auto seconds = [&sec](int i) { return i < 0 ? kNaN : sec[static_cast<std::size_t>(i)]; };

  Row r;
  r.shape = s;
  r.layout = nhwc ? "nhwc" : "nchw";
  r.act = add ? "add_relu" : "relu";
  r.ranks = world.size();
  r.threads = omp_get_max_threads();
  const double T = static_cast<double>(count) * sizeof(float);
  r.tensor_bytes = static_cast<int64_t>(T);
  for (int k = 0; k < 3; ++k) {
    r.fused[k] = seconds(op_f[k]);
    r.sep[k] = seconds(op_s[k]);
    r.onednn[k] = seconds(op_d[k]);
  }
  r.local_fb = seconds(op_l);
  r.from_y_fb = seconds(op_y);
  r.onednn_impl = r_impl;
  const double M = static_cast<double>(count);  // the relu mask: a byte per element
  const double bf[2] = {(add ? 4 * T : 3 * T) + M, (add ? 6 * T : 5 * T) + 2 * M};
  const double bs[2] = {add ? 8 * T : 5 * T, 8 * T};
  const double bd[2] = {add ? 6 * T : 3 * T, add ? 8 * T : 5 * T};
  for (int k = 0; k < 2; ++k) {
    r.bytes_fused[k] = bf[k];
    r.bytes_sep[k] = bs[k];
    r.bytes_onednn[k] = bd[k];
  }
  r.bytes_fused[2] = bf[0] + bf[1];
  r.bytes_sep[2] = bs[0] + bs[1];
  r.bytes_onednn[2] = bd[0] + bd[1];

  if (!o.check) return r;

  // ---- fused vs separate, bitwise: one more call of each, the same calls on both plans.
  fused_fwd(fused, st_f, t.y_f.data(), t.mask_f.data());
  fused_bwd(fused, st_f, t.mask_f.data(), t.dx_f.data(), t.dz_f.data());
  sep_fwd();
  sep_bwd();
  Diff d;
  auto merge = [&d](const Diff& e) {
    d.max_abs = std::max(d.max_abs, e.max_abs);
    d.unequal += e.unequal;
  };
  merge(compare_bits(t.y_f.data(), t.y_s.data(), count));
  merge(compare_bits(t.dx_f.data(), t.dx_s.data(), count));
  if (add) merge(compare_bits(t.dz_f.data(), t.g_s.data(), count));
  merge(compare_bits(st_f.dw.data(), st_s.dw.data(), C));
  merge(compare_bits(st_f.db.data(), st_s.db.data(), C));
  merge(compare_bits(st_f.mean.data(), st_s.mean.data(), C));
  merge(compare_bits(st_f.invstd.data(), st_s.invstd.data(), C));
  r.bit_diff = bench::max_over_ranks(d.max_abs, mpi);
  long unequal = static_cast<long>(d.unequal);
  MPI_Allreduce(MPI_IN_PLACE, &unequal, 1, MPI_LONG, MPI_SUM, mpi);
  r.bit_unequal = unequal;
  chk.shapes_bits += 1;
  chk.wrong_bits += !(r.bit_diff == 0) || r.bit_unequal != 0;
  chk.bit_diff = nan_max(chk.bit_diff, r.bit_diff);
  chk.bit_unequal += r.bit_unequal;

#ifdef SYNCBN_BENCH_HAVE_ONEDNN
  // ---- oneDNN vs syncbn's local plan (each rank's own batch), to a tolerance.
  if (onednn) {
    fused_fwd(local, st_l, t.y_l.data(), t.mask_l.data());
    onednn->forward();
    const double y_max = max_abs(t.y_l.data(), count);
    const double y_tol = kOneDnnTolerance * y_max;
    const double y_rel = compare_bits(t.y_l.data(), t.y_d.data(), count).max_abs / y_max;
    // Elements at the relu's kink: y > 0 in one and 0 in the other (a pre-activation within
    // rounding of 0). Their masks gate dy differently, which changes dx there by a * dy and,
    // through the channel's sums, the whole channel's dx by about a * dy / m; dy is zeroed
    // there for the backward comparison (then both masks give g = 0), and restored after.
    std::vector<int64_t> kink;
    long bad_mask = 0;
    for (int64_t i = 0; i < count; ++i) {
      const float a = t.y_l.data()[i], b = t.y_d.data()[i];
      if ((a > 0.0f) != (b > 0.0f)) {
        kink.push_back(i);
        bad_mask += std::max(static_cast<double>(a), static_cast<double>(b)) > y_tol;
      }
    }
    std::vector<float> saved_dy;
    for (const int64_t i : kink) {
      saved_dy.push_back(t.dy.data()[i]);
      t.dy.data()[i] = 0.0f;
    }
    fused_bwd(local, st_l, t.mask_l.data(), t.dx_l.data(), t.dz_l.data());
    onednn->backward();
    for (std::size_t k = 0; k < kink.size(); ++k) t.dy.data()[kink[k]] = saved_dy[k];
    std::vector<double> rel = {
        y_rel,
        compare_bits(t.dx_l.data(), t.dx_d.data(), count).max_abs / max_abs(t.dx_l.data(), count),
        add ? compare_bits(t.dz_l.data(), t.g_d.data(), count).max_abs /
                  max_abs(t.dz_l.data(), count)
            : 0.0};
    // The statistics against fp64 ones of the same x: who of the two is off, if they disagree.
    const RefStats ref = reference_stats(t.x.data(), s, nhwc);
    const std::vector<float> dnnl_var = onednn->variance();
    std::vector<float> syncbn_var(C);
    for (int64_t c = 0; c < C; ++c) {
      const double is = st_l.invstd[c];
      syncbn_var[c] = static_cast<float>(1.0 / (is * is) - cfg.eps);
    }
    const std::pair<double, double> e_syncbn = stats_error(ref, st_l.mean, syncbn_var),
                                    e_dnnl = stats_error(ref, onednn->mean(), dnnl_var);
    rel.insert(rel.end(), {e_syncbn.first, e_syncbn.second, e_dnnl.first, e_dnnl.second});
    long counts[2] = {static_cast<long>(kink.size()), bad_mask};
    bench::max_over_ranks(rel, mpi);
    MPI_Allreduce(MPI_IN_PLACE, counts, 2, MPI_LONG, MPI_SUM, mpi);
    r.dnnl_y_rel = rel[0];
    r.dnnl_dx_rel = rel[1];
    r.dnnl_dz_rel = add ? rel[2] : kNaN;
    r.stats_err_syncbn[0] = rel[3];
    r.stats_err_syncbn[1] = rel[4];
    r.stats_err_onednn[0] = rel[5];
    r.stats_err_onednn[1] = rel[6];
    r.dnnl_kink = counts[0];
    r.dnnl_bad_mask = counts[1];
    const bool ok = rel[0] <= kOneDnnTolerance && rel[1] <= kOneDnnTolerance &&
                    rel[2] <= kOneDnnTolerance && counts[1] == 0;
    chk.shapes_dnnl += 1;
    chk.wrong_dnnl += !ok;
    chk.y_rel = nan_max(chk.y_rel, rel[0]);
    chk.dx_rel = nan_max(chk.dx_rel, rel[1]);
    if (add) chk.dz_rel = nan_max(chk.dz_rel, rel[2]);
    for (int k = 0; k < 2; ++k) {
      chk.stats_syncbn[k] = nan_max(chk.stats_syncbn[k], rel[3 + k]);
      chk.stats_onednn[k] = nan_max(chk.stats_onednn[k], rel[5 + k]);
    }
    chk.kink += counts[0];
    chk.bad_mask += counts[1];
  }
#endif
  return r;
}

// ---- output -------------------------------------------------------------------------------------

const bench::Table& table() {
  using C = bench::Column;
  static const bench::Table t({
      C{"shape (NxCxHxW)", "", 16, 0, "", 1},
      C{"lay", "", 4, 0},
      C{"act", "", 8, 0},
      C{"fwd", "(us)", 8, 0, "fused", 2},
      C{"bwd", "(us)", 8, 0, "fused"},
      C{"f+b", "(us)", 8, 0, "fused"},
      C{"f+b", "(us)", 8, 0, "separate", 2},
      C{"f+b", "(us)", 8, 0, "oneDNN", 2},
      C{"fwd", "", 5, 2, "fused / separate", 2},
      C{"bwd", "", 5, 2, "fused / separate"},
      C{"f+b", "", 5, 2, "fused / separate"},
      C{"fwd", "", 5, 2, "fused / oneDNN", 2},
      C{"bwd", "", 5, 2, "fused / oneDNN"},
      C{"f+b", "", 5, 2, "fused / oneDNN"},
      C{"local", "/dnnl", 5, 2, "", 2},
      C{"mask", "/y", 5, 2, "", 1},
      C{"fused", "", 5, 1, "f+b GB/s", 2},
      C{"sep", "", 5, 1, "f+b GB/s"},
      C{"dnnl", "", 5, 1, "f+b GB/s"},
      C{"bits", "diff", 5, 0, "", 2},
  });
  return t;
}

bench::Record table_row(const Row& r) {
  using bench::num;
  using bench::text;
  return {text(r.shape.name()),
          text(r.layout),
          text(r.act),
          num(r.us(r.fused, 0)),
          num(r.us(r.fused, 1)),
          num(r.us(r.fused, 2)),
          num(r.us(r.sep, 2)),
          num(r.us(r.onednn, 2)),
          num(r.ratio_sep(0)),
          num(r.ratio_sep(1)),
          num(r.ratio_sep(2)),
          num(r.ratio_dnnl(0)),
          num(r.ratio_dnnl(1)),
          num(r.ratio_dnnl(2)),
          num(r.ratio_local_dnnl()),
          num(r.ratio_mask_y()),
          num(r.gbs(r.fused, r.bytes_fused, 2)),
          num(r.gbs(r.sep, r.bytes_sep, 2)),
          num(r.gbs(r.onednn, r.bytes_onednn, 2)),
          r.bit_unequal < 0 ? text("n/a") : bench::integer(r.bit_unequal)};
}

// The CSV / JSON columns (empty CSV field, JSON null: n/a).
const bench::Fields<Row>& fields() {
  using bench::integer;
  using bench::num;
  using bench::text;
  static const bench::Fields<Row> f = {
      {"shape", [](const Row& r) { return text(r.shape.name()); }},
      {"n", [](const Row& r) { return integer(r.shape.n); }},
      {"c", [](const Row& r) { return integer(r.shape.c); }},
      {"h", [](const Row& r) { return integer(r.shape.h); }},
      {"w", [](const Row& r) { return integer(r.shape.w); }},
      {"dtype", [](const Row&) { return text("f32"); }},
      {"layout", [](const Row& r) { return text(r.layout); }},
      {"act", [](const Row& r) { return text(r.act); }},
      {"ranks", [](const Row& r) { return integer(r.ranks); }},
      {"threads", [](const Row& r) { return integer(r.threads); }},
      {"tensor_bytes", [](const Row& r) { return integer(r.tensor_bytes); }},
      {"fused_fwd_us", [](const Row& r) { return num(r.us(r.fused, 0)); }},
      {"fused_bwd_us", [](const Row& r) { return num(r.us(r.fused, 1)); }},
      {"fused_fb_us", [](const Row& r) { return num(r.us(r.fused, 2)); }},
      {"sep_fwd_us", [](const Row& r) { return num(r.us(r.sep, 0)); }},
      {"sep_bwd_us", [](const Row& r) { return num(r.us(r.sep, 1)); }},
      {"sep_fb_us", [](const Row& r) { return num(r.us(r.sep, 2)); }},
      {"onednn_fwd_us", [](const Row& r) { return num(r.us(r.onednn, 0)); }},
      {"onednn_bwd_us", [](const Row& r) { return num(r.us(r.onednn, 1)); }},
      {"onednn_fb_us", [](const Row& r) { return num(r.us(r.onednn, 2)); }},
      {"local_fb_us", [](const Row& r) { return num(r.local_fb * 1e6); }},
      {"from_y_fb_us", [](const Row& r) { return num(r.from_y_fb * 1e6); }},
      {"mask_over_y_fb", [](const Row& r) { return num(r.ratio_mask_y()); }},
      {"fused_sep_fwd", [](const Row& r) { return num(r.ratio_sep(0)); }},
      {"fused_sep_bwd", [](const Row& r) { return num(r.ratio_sep(1)); }},
      {"fused_sep_fb", [](const Row& r) { return num(r.ratio_sep(2)); }},
      {"fused_onednn_fwd", [](const Row& r) { return num(r.ratio_dnnl(0)); }},
      {"fused_onednn_bwd", [](const Row& r) { return num(r.ratio_dnnl(1)); }},
      {"fused_onednn_fb", [](const Row& r) { return num(r.ratio_dnnl(2)); }},
      {"local_onednn_fb", [](const Row& r) { return num(r.ratio_local_dnnl()); }},
      {"fused_fwd_gbs", [](const Row& r) { return num(r.gbs(r.fused, r.bytes_fused, 0)); }},
      {"fused_bwd_gbs", [](const Row& r) { return num(r.gbs(r.fused, r.bytes_fused, 1)); }},
      {"fused_fb_gbs", [](const Row& r) { return num(r.gbs(r.fused, r.bytes_fused, 2)); }},
      {"sep_fb_gbs", [](const Row& r) { return num(r.gbs(r.sep, r.bytes_sep, 2)); }},
      {"onednn_fb_gbs", [](const Row& r) { return num(r.gbs(r.onednn, r.bytes_onednn, 2)); }},
      {"bits_max_abs_diff", [](const Row& r) { return num(r.bit_diff); }},
      {"bits_unequal",
       [](const Row& r) { return r.bit_unequal < 0 ? num(kNaN) : integer(r.bit_unequal); }},
      {"onednn_y_rel", [](const Row& r) { return num(r.dnnl_y_rel); }},
      {"onednn_dx_rel", [](const Row& r) { return num(r.dnnl_dx_rel); }},
      {"onednn_dz_rel", [](const Row& r) { return num(r.dnnl_dz_rel); }},
      {"onednn_kink_excluded",
       [](const Row& r) { return r.dnnl_kink < 0 ? num(kNaN) : integer(r.dnnl_kink); }},
      {"syncbn_mean_err", [](const Row& r) { return num(r.stats_err_syncbn[0]); }},
      {"syncbn_var_err", [](const Row& r) { return num(r.stats_err_syncbn[1]); }},
      {"onednn_mean_err", [](const Row& r) { return num(r.stats_err_onednn[0]); }},
      {"onednn_var_err", [](const Row& r) { return num(r.stats_err_onednn[1]); }},
      {"onednn_impl", [](const Row& r) { return text(r.onednn_impl); }},
  };
  return f;
}

std::string fmt(const char* f, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, v);
  return buf;
}

void print_summary(const std::vector<Row>& rows, const Checks& chk, const Options& o,
                   const std::string& dnnl_text) {
  std::vector<std::string> lines;
  lines.push_back("");
  lines.push_back("Times: median of " + std::to_string(o.common.iters) + " interleaved rounds (" +
                  std::to_string(o.common.warmup) +
                  " warm-up) of one call per op, each after an MPI_Barrier, then the maximum "
                  "over ranks; f+b: forward then backward timed as one op.");
  lines.push_back(
      "fused: syncbn plan with SYNCBN_ACTIVATION_RELU / _ADD_RELU on MPI_COMM_WORLD "
      "(syncbn_forward_training_ex writing the relu's mask, a byte per element; "
      "syncbn_backward_ex reading it, and dz).");
  lines.push_back(
      "separate: syncbn plan without activation on MPI_COMM_WORLD, then relu_(y) "
      "[add_relu: y += z; relu_(y)] as separate passes; backward g = (y > 0 ? dy : 0) to a "
      "tensor, then syncbn_backward of g.");
  lines.push_back("oneDNN " + dnnl_text +
                  ", per rank (no synchronization): relu = batch norm with use_scale | use_shift "
                  "| fuse_norm_relu (workspace to backward);");
  lines.push_back(
      "  add_relu = batch norm (use_scale | use_shift), then binary add with an eltwise-relu "
      "post-op (y = relu(y + z), one pass), backward eltwise relu backward (from y) to g, then "
      "batch-norm backward of g.");
  lines.push_back(
      "  fuse_norm_add_relu (batch norm + add + relu in one primitive) is not in oneDNN 2.6; a "
      "later oneDNN has it (3.x's dnnl_types.h lists it). fuse_norm_relu cannot take z.");
  std::vector<std::string> impls;  // per layout and activation, as oneDNN picked them
  for (const Row& r : rows) {
    const std::string l = "  oneDNN's implementations, " + r.layout + " " + r.act + ": " +
                          (r.onednn_impl.empty() ? std::string("n/a") : r.onednn_impl);
    if (std::find(impls.begin(), impls.end(), l) == impls.end()) impls.push_back(l);
  }
  lines.insert(lines.end(), impls.begin(), impls.end());
  lines.push_back(
      "local/dnnl: the fused plan on syncbn_comm_create_self (no exchange, like oneDNN), f+b "
      "over oneDNN's f+b.");
  lines.push_back(
      "mask/y: fused f+b (backward from the forward's mask) over the same plan's f+b without the "
      "mask (backward from y), in the same run.");
  lines.push_back(
      "GB/s: bytes each mode moves (T = tensor bytes, M = T/4 the relu mask) over its f+b time: "
      "fused relu 3T+M + 5T+2M, add_relu 4T+M + 6T+2M; separate relu 5T + 8T, add_relu 8T + 8T; "
      "oneDNN relu 3T + 5T, add_relu 6T + 8T.");
  lines.push_back(
      "Memory-bound model of fused / separate f+b: relu 8.75/13 = 0.67, add_relu 10.75/16 = 0.67 "
      "(tensors larger than the caches; the exchange and fixed costs move small shapes toward "
      "1).");
  lines.push_back("bits diff: elements (and per-channel values) of the fused outputs whose bits "
                  "differ from the separate path's, summed over ranks.");
  lines.push_back("");
  for (const std::string act : {"relu", "add_relu"}) {
    int n = 0, sep_ok = 0, dnnl_n = 0, dnnl_ok = 0, mask_faster = 0;
    double worst = kNaN, best = kNaN, mask_lo = kNaN, mask_hi = kNaN;
    for (const Row& r : rows) {
      if (r.act != act) continue;
      ++n;
      mask_faster += r.ratio_mask_y() < 1;
      mask_hi = nan_max(mask_hi, r.ratio_mask_y());
      mask_lo = std::isnan(mask_lo) ? r.ratio_mask_y() : std::min(mask_lo, r.ratio_mask_y());
      sep_ok += r.ratio_sep(2) <= kSeparateGoal;
      worst = nan_max(worst, r.ratio_sep(2));
      best = std::isnan(best) ? r.ratio_sep(2) : std::min(best, r.ratio_sep(2));
      if (!std::isnan(r.ratio_dnnl(2))) {
        ++dnnl_n;
        dnnl_ok += r.ratio_dnnl(2) <= kOneDnnGoal;
      }
    }
    if (n == 0) continue;
    lines.push_back("Goal " + act + ": fused / separate f+b <= " + fmt("%.2f", kSeparateGoal) +
                    ": " + std::to_string(sep_ok) + " of " + std::to_string(n) + " rows (" +
                    fmt("%.2f", best) + " to " + fmt("%.2f", worst) + "); fused / oneDNN f+b <= " +
                    fmt("%.2f", kOneDnnGoal) + ": " +
                    (dnnl_n ? std::to_string(dnnl_ok) + " of " + std::to_string(dnnl_n) + " rows"
                            : std::string("n/a")));
    lines.push_back("  " + act + ", f+b from the mask / from y: " + fmt("%.2f", mask_lo) + " to " +
                    fmt("%.2f", mask_hi) + ", faster on " + std::to_string(mask_faster) + " of " +
                    std::to_string(n) + " rows");
  }
  if (!o.check) {
    lines.push_back("Checks: off (--no-check)");
  } else {
    lines.push_back(
        "Check fused vs separate (y, dx, dz, dweight, dbias, save_mean, save_invstd, bitwise), " +
        std::to_string(chk.shapes_bits) + " rows: max abs diff " + fmt("%g", chk.bit_diff) +
        ", elements with other bits " + std::to_string(chk.bit_unequal) + ": " +
        (chk.wrong_bits ? "WRONG (" + std::to_string(chk.wrong_bits) + " rows)" : "OK"));
    if (chk.shapes_dnnl > 0) {
      lines.push_back(
          "Check oneDNN vs syncbn local plan, " + std::to_string(chk.shapes_dnnl) +
          " rows: max abs diff / max |value|: y " + fmt("%.2e", chk.y_rel) + ", dx " +
          fmt("%.2e", chk.dx_rel) + ", dz " + fmt("%.2e", chk.dz_rel) + " (tolerance " +
          fmt("%.0e", kOneDnnTolerance) + "); elements at the relu's kink (mask differs, y " +
          "within tolerance of 0; dy zeroed there for backward): " + std::to_string(chk.kink) +
          ", mask differences beyond it: " + std::to_string(chk.bad_mask) + ": " +
          (chk.wrong_dnnl ? "WRONG (" + std::to_string(chk.wrong_dnnl) + " rows)" : "OK"));
      lines.push_back("  statistics against fp64 ones of the same x (max over channels, rows, "
                      "ranks): |mean error| / std: syncbn " +
                      fmt("%.1e", chk.stats_syncbn[0]) + ", oneDNN " +
                      fmt("%.1e", chk.stats_onednn[0]) + "; |variance error| / variance: syncbn " +
                      fmt("%.1e", chk.stats_syncbn[1]) + ", oneDNN " +
                      fmt("%.1e", chk.stats_onednn[1]));
    } else {
      lines.push_back("Check oneDNN vs syncbn: n/a (no oneDNN)");
    }
  }
  bench::print_footer(lines);
}

std::string lscpu_model() {  // lscpu's "Model name", else /proc/cpuinfo's
  std::string model;
  if (FILE* p = popen("lscpu 2>/dev/null", "r")) {
    char line[512];
    while (std::fgets(line, sizeof line, p)) {
      const std::string l(line);
      if (l.rfind("Model name:", 0) == 0) {
        model = l.substr(l.find(':') + 1);
        model.erase(0, model.find_first_not_of(" \t"));
        while (!model.empty() && (model.back() == '\n' || model.back() == ' ')) model.pop_back();
        break;
      }
    }
    pclose(p);
  }
  return model.empty() ? bench::cpu_model() : model;
}

int run(int argc, char** argv, int rank, int size) {
  CLI::App app{
      "fused_bench: syncbn's fused relu / add+relu against separate passes and oneDNN, over MPI "
      "ranks"};
  Options o;
  std::vector<std::string> shape_args;
  int64_t batch = 32;
  bool no_onednn = false;
  app.add_option("--shape", shape_args,
                 "NxCxHxW per rank, repeatable (default: the ResNet-50 BN shapes at --batch)");
  app.add_option("--batch", batch, "per-rank batch N of the default shapes")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--layout", o.layouts, "nchw, nhwc or both: repeatable or a comma list")
      ->delimiter(',')
      ->check(CLI::IsMember({"nchw", "nhwc", "both"}))
      ->capture_default_str();
  app.add_option("--act", o.acts, "relu, add_relu: repeatable or a comma list")
      ->delimiter(',')
      ->check(CLI::IsMember({"relu", "add_relu"}))
      ->capture_default_str();
  bench::add_common_options(app, o.common);
  app.add_flag("--no-onednn", no_onednn, "skip oneDNN");
  app.add_flag("--check,!--no-check", o.check, "check results (default on)");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (rank == 0) app.exit(e);
    return e.get_exit_code() == 0 ? 0 : 2;
  }
  if (std::find(o.layouts.begin(), o.layouts.end(), "both") != o.layouts.end()) {
    o.layouts = {"nchw", "nhwc"};
  }
  o.onednn = !no_onednn;
  if (shape_args.empty()) {
    o.shapes = bench::resnet50_shapes(batch);
  } else {
    try {
      for (const auto& s : shape_args) o.shapes.push_back(bench::parse_nchw(s));
    } catch (const CLI::ValidationError& e) {
      if (rank == 0) std::fprintf(stderr, "fused_bench: %s\n", e.what());
      return 2;
    }
  }

  std::string dnnl_text = no_onednn ? "off" : "not built in";
#ifdef SYNCBN_BENCH_HAVE_ONEDNN
  if (o.onednn) dnnl_text = onednn_version();
#else
  o.onednn = false;
#endif
  std::string command;
  for (int i = 0; i < argc; ++i) command += (i ? " " : "") + std::string(argv[i]);
  const std::string date = bench::utc_now(), cpu = lscpu_model();
  const bench::Llc llc = bench::last_level_cache();
  const int threads = omp_get_max_threads();
  const char* isa = std::getenv("SYNCBN_CPU_ISA");
  if (rank == 0) {
    std::printf("# fused_bench  command: %s\n", command.c_str());
    std::printf("# date %s  host %s  CPU %s (%ld online)  oneDNN %s\n", date.c_str(),
                bench::host_name().c_str(), cpu.c_str(), sysconf(_SC_NPROCESSORS_ONLN),
                dnnl_text.c_str());
    std::printf(
        "# ranks %d, OpenMP threads per rank %d, dtype f32, iterations %d, warm-up %d, LLC %.1f "
        "MiB (%s), SYNCBN_CPU_ISA %s\n",
        size, threads, o.common.iters, o.common.warmup,
        static_cast<double>(llc.bytes) / 1048576.0, llc.source.c_str(), isa ? isa : "(unset)");
    std::printf("# Shapes are per rank; times max over ranks; ratios < 1: fused is faster.\n#\n");
    table().print_header();
  }

  const syncbn::Communicator world = syncbn::mpi_communicator(MPI_COMM_WORLD);
  world.set_timeout(0);  // the blocking MPI_Allreduce, as syncbn_bench and PyTorch's NCCL/Gloo
  std::vector<Row> rows;
  Checks chk;
  for (const std::string& layout : o.layouts) {
    for (const Shape4& s : o.shapes) {
      const int64_t count = s.count();
      Tensors t(count);
      fill(t.x.data(), count, 1000003ULL * rank + 1, 0.5, 1.7);
      fill(t.dy.data(), count, 1000003ULL * rank + 2, 0.0, 1.0);
      fill(t.z.data(), count, 1000003ULL * rank + 3, 0.0, 1.0);
      for (float* p : {t.y_f.data(), t.y_s.data(), t.y_d.data(), t.y_l.data(), t.dx_f.data(),
                       t.dx_s.data(), t.dx_d.data(), t.dx_l.data(), t.dz_f.data(), t.g_s.data(),
                       t.g_d.data(), t.dz_l.data(), t.y_y.data(), t.dx_y.data(), t.dz_y.data()}) {
        fill(p, count, 5, 0.0, 0.0);
      }
      std::vector<float> weight(s.c), bias(s.c);  // the same on every rank
      for (int64_t i = 0; i < s.c; ++i) {
        weight[i] = static_cast<float>(0.5 + static_cast<double>(splitmix64(2 * i) >> 11) * 0x1.0p-53);
        bias[i] =
            static_cast<float>(-0.5 + static_cast<double>(splitmix64(2 * i + 1) >> 11) * 0x1.0p-53);
      }
      for (const std::string& act : o.acts) {
        const Row r = run_one(s, layout == "nhwc", act == "add_relu", o, world, t, weight, bias, chk);
        if (rank == 0) table().print_row(table_row(r));
        rows.push_back(r);
      }
    }
  }

  if (rank == 0) {
    print_summary(rows, chk, o, dnnl_text);
    std::vector<bench::Record> records;
    for (const Row& r : rows) records.push_back(bench::record_of(fields(), r));
    const bench::Schema schema = bench::schema_of(fields());
    if (!o.common.csv.empty()) bench::write_csv(o.common.csv, schema, records);
    if (!o.common.json.empty()) {
      bench::write_json(o.common.json,
                        {{"command", bench::text(command)},
                         {"date", bench::text(date)},
                         {"hostname", bench::text(bench::host_name())},
                         {"cpu_model", bench::text(cpu)},
                         {"onednn", bench::text(o.onednn ? dnnl_text : "")},
                         {"ranks", bench::integer(size)},
                         {"threads", bench::integer(threads)},
                         {"iterations", bench::integer(o.common.iters)},
                         {"warmup", bench::integer(o.common.warmup)},
                         {"llc_bytes", bench::integer(llc.bytes)}},
                        schema, records);
    }
  }
  const bool wrong = o.check && (chk.wrong_bits > 0 || chk.wrong_dnnl > 0);
  return wrong ? 1 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  int rc = 0;
  try {
    rc = run(argc, argv, rank, size);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fused_bench: rank %d: %s\n", rank, e.what());
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  MPI_Finalize();
  return rc;
}
