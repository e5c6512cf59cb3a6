// cuda_bench's shared types, in plain C++ (no CUDA, cuDNN, NCCL or CLI11 header), so that the
// host-compiled parts (the flags, cuda_bench_main.cpp; the tables, CSV and JSON,
// cuda_bench_report.cpp) and the nvcc-compiled ones (cuda_bench_run.cu and the files it uses)
// share them: the problem description, the options, one measurement's statistics, one
// problem's result, PyTorch's times, and the entry points between the parts.
// What the bench measures and how: cuda_bench_main.cpp's header.
#ifndef SYNCBN_BENCH_CUDA_BENCH_HPP
#define SYNCBN_BENCH_CUDA_BENCH_HPP

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

namespace cuda_bench {

// ---- problem description ----------------------------------------------------------------------

enum class DType { f32, bf16, f16 };
enum class Layout { nchw, nhwc };
enum class CommKind { nccl, self };
enum class CaptureMode { global, thread_local_, relaxed };  // cudaStreamCaptureMode*

inline const char* name(DType d) {
  return d == DType::f32 ? "f32" : d == DType::bf16 ? "bf16" : "f16";
}
inline const char* name(Layout l) { return l == Layout::nchw ? "nchw" : "nhwc"; }
inline size_t element_size(DType d) { return d == DType::f32 ? 4 : 2; }
inline double tolerance(DType d) {
  return d == DType::f32 ? 1e-3 : d == DType::f16 ? 5e-3 : 2e-2;
}

struct ShapeSpec {
  std::string name;  // "CxHxW", the key shared with torch_bn_bench.py
  int64_t c, h, w;
  int resnet50_layers;  // how many of ResNet-50's 53 BN layers see this shape (0: not ResNet-50)
};

// The distinct BN input shapes of torchvision ResNet-50 (v1.5: stride on the 3x3 conv), per
// sample, and how many of its 53 BN layers have each.
const std::vector<ShapeSpec>& resnet50_shapes();

struct Problem {
  ShapeSpec shape;
  int64_t n;
  DType dtype;
  Layout layout;
  int64_t count() const { return n * shape.c * shape.h * shape.w; }
  int64_t spatial() const { return shape.h * shape.w; }
  size_t bytes() const { return static_cast<size_t>(count()) * element_size(dtype); }
  // The syncbn shape, in the plan's layout.
  std::vector<int64_t> syncbn_shape() const {
    return layout == Layout::nchw ? std::vector<int64_t>{n, shape.c, shape.h, shape.w}
                                  : std::vector<int64_t>{n, shape.h, shape.w, shape.c};
  }
};

// ---- options (flags: cuda_bench_main.cpp) ------------------------------------------------------

struct Options {
  int iters = 200;
  int warmup = 20;
  int chunk = 64;
  int device = 0;
  double hold_timeout_ms = 100;
  std::vector<int64_t> batches{2, 8, 32};
  std::vector<DType> dtypes{DType::f32, DType::bf16};
  std::vector<Layout> layouts{Layout::nchw, Layout::nhwc};
  std::vector<ShapeSpec> shapes = resnet50_shapes();
  CommKind comm = CommKind::nccl;
  std::string csv, json, torch_csv;
  std::string cudnn_mode = "best";
  bool graph = true;
  bool cold_l2 = false;
  bool check = true;
  CaptureMode capture_mode = CaptureMode::global;
};

// ---- one measurement, one problem ---------------------------------------------------------------

struct Stats {
  double median_us = NAN;  // median of per-iteration event times
  double min_us = NAN;
  double span_us = NAN;    // first start to last stop of each held group / its iterations
                           // (back-to-back throughput; NAN with --cold-l2)
  double host_us = NAN;    // median CPU time to enqueue one iteration
  bool host_bound = false;  // a hold timed out before the host finished enqueuing (later
                            // groups of the measurement then ran without holds)
  bool ok() const { return std::isfinite(median_us); }
};

// PyTorch's times of one problem (torch_bn_bench.py CSV), microseconds.
struct TorchTimes {
  double kernels_fwd = NAN, kernels_bwd = NAN;  // SyncBatchNorm's kernels, no collective
  double functional_fwd = NAN, functional_bwd = NAN;  // F.batch_norm(training=True) + autograd
  double syncbn_fwd = NAN, syncbn_bwd = NAN;  // the SyncBatchNorm function, one-rank group
};
using TorchKey = std::tuple<std::string, int64_t, std::string, std::string>;  // shape n dtype lay

// --torch-csv: throws std::runtime_error if the file cannot be read or lacks a key column.
std::map<TorchKey, TorchTimes> read_torch_csv(const std::string& path);

extern const char* const kCudnnModeName[2];  // "spatial", "persistent"

struct Result {
  Problem p;
  Stats copy;
  Stats allreduce;                       // bare one-rank ncclAllReduce, 2C + 18 doubles
  Stats fwd, bwd, fwd_graph, bwd_graph;  // syncbn
  double fwd_err = NAN, bwd_err = NAN;   // syncbn against the fp64 reference
  Stats cudnn_fwd[2], cudnn_bwd[2];      // [0] SPATIAL, [1] SPATIAL_PERSISTENT
  double cudnn_err = NAN;                // max over modes, forward and backward
  std::string cudnn_note;                // why a mode is n/a
  TorchTimes torch;
  std::string failure;  // a syncbn failure, if any

  int best_cudnn_fwd() const { return best(cudnn_fwd); }
  int best_cudnn_bwd() const { return best(cudnn_bwd); }
  double cudnn_fwd_us() const {
    const int b = best_cudnn_fwd();
    return b < 0 ? NAN : cudnn_fwd[b].median_us;
  }
  double cudnn_bwd_us() const {
    const int b = best_cudnn_bwd();
    return b < 0 ? NAN : cudnn_bwd[b].median_us;
  }
  bool host_bound() const {
    return copy.host_bound || allreduce.host_bound || fwd.host_bound || bwd.host_bound ||
           fwd_graph.host_bound || bwd_graph.host_bound || cudnn_fwd[0].host_bound ||
           cudnn_fwd[1].host_bound || cudnn_bwd[0].host_bound || cudnn_bwd[1].host_bound;
  }
  bool wrong() const {
    const double tol = tolerance(p.dtype);
    return fwd_err > tol || bwd_err > tol;  // NaN (not checked) compares false
  }

 private:
  static int best(const Stats* s) {
    int b = -1;
    for (int i = 0; i < 2; ++i) {
      if (s[i].ok() && (b < 0 || s[i].median_us < s[b].median_us)) b = i;
    }
    return b;
  }
};

// ---- the parts ----------------------------------------------------------------------------------

// The device, the libraries and the run, for the JSON's meta.
struct RunInfo {
  std::string device, cuda_runtime, driver, cudnn, nccl, syncbn;
};

// The tables, the footer, the CSV (one row per problem as it is measured) and the JSON
// (cuda_bench_report.cpp, through the shared driver).
class Report {
 public:
  // Opens --csv and writes its header; throws std::runtime_error if it cannot.
  explicit Report(const Options& o);
  ~Report();
  Report(const Report&) = delete;
  Report& operator=(const Report&) = delete;
  // A problem's CSV row, written and flushed at once.
  void add(const Result& r);
  // The forward and backward tables, the footer, the goal, the ResNet-50 sums and --json;
  // returns the exit status (0, 1 failed rows, 3 rows out of tolerance).
  int finish(const std::vector<Result>& rows, const RunInfo& info);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Runs every problem of o on the GPU (cuda_bench_run.cu). Returns the exit status (2: no
// device); throws on a CUDA, NCCL or cuDNN failure outside a problem.
int run(const Options& o);

}  // namespace cuda_bench

#endif  // SYNCBN_BENCH_CUDA_BENCH_HPP
