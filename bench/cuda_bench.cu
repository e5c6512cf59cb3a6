// cuda_bench: syncbn's CUDA forward training and backward on one GPU, against the memory floor
// (a device-to-device copy of the same tensor measured in the same run), cuDNN 9's batch norm
// and, through a CSV written by bench/torch_bn_bench.py, PyTorch's own batch-norm kernels.
// Shapes: the 12 distinct batch-norm input shapes of torchvision ResNet-50 (53 BN layers).
//
//   cuda_bench [-n 200] [-w 20] [--batches 2,8,32] [--dtypes f32,bf16] [--layouts nchw,nhwc]
//              [--shapes 2048x7x7,...] [--comm nccl|self] [--csv FILE] [--torch-csv FILE]
//              [--cudnn-mode best|spatial|persistent|none] [--no-graph] [--cold-l2] ...
//   (cuda_bench --help lists every flag.)
//
// What is timed. syncbn runs a CUDA plan on a one-rank communicator: --comm nccl (default) wraps
// a one-device ncclCommInitAll communicator, so every forward and backward goes through its NCCL
// path and makes its one-rank ncclAllReduce; --comm self exchanges nothing. Each call computes
// what cuDNN's computes: forward y, save_mean, save_invstd and the running statistics; backward
// dx, dweight and dbias. Note: NCCL serves an in-place sum allreduce on ONE rank by enqueueing
// nothing (ncclLaunchOneRank: "in-place is nop"), so on one GPU the nccl rows carry NCCL's host
// cost and syncbn's device-side verdict path, not a transfer; the CSV columns nccl_allreduce_*
// time that bare call (2C + 18 doubles, in place) to show it. A real exchange needs >= 2 GPUs.
//
// How it is timed. Every number is the MEDIAN over -n iterations of per-iteration CUDA event
// timings (events recorded around each call on the same stream), after -w warm-up iterations.
// Before each group of --chunk iterations the stream is held by a kernel that spins until the
// host has enqueued the whole group (as nvbench does), so the events measure device time, not
// the host's launch latency; "host" is the separate CPU time to enqueue one call. A row marked
// "h" released the hold on a time-out: the host fell behind and those times include launch gaps.
// "graph" replays a CUDA graph holding one captured call, timed the same way, per replay.
// Without --cold-l2 the same buffers are used back to back, so tensors smaller than L2 (50 MB
// on H100/H200) are served partly from L2 and can beat the HBM copy rate; --cold-l2 overwrites
// a 2 x L2 buffer before every timed iteration (outside the events).
//
// Byte model (bytes that must move per call; O(C) parameter and statistics traffic ignored):
//   forward  = 3 x tensor bytes: x read for the reduction, x read again to normalize, y written
//   backward = 5 x tensor bytes: x and dy read for the reduction, x and dy read again, dx written
//   copy     = 2 x tensor bytes: read + write (cudaMemcpyAsync, device to device)
// effective bandwidth (GB/s) = model bytes / median time; "%copy" = that over the copy's.
//
// Ratios are "higher is better for syncbn": xcudnn = cuDNN time / syncbn time, xtorchK =
// PyTorch SyncBatchNorm kernels time / syncbn time, xtorchF = F.batch_norm time / syncbn time
// (syncbn eager time, not graph). cuDNN: cudnnBatchNormalizationForwardTraining / Backward,
// CUDNN_BATCHNORM_SPATIAL and _SPATIAL_PERSISTENT (best of both unless --cudnn-mode), NCHW or
// NHWC 4-d descriptors, bf16/f16 data with fp32 scale and bias; "n/a" where cuDNN rejects it.
//
// Correctness (like nccl-tests -c): every output of syncbn and of cuDNN is compared with an fp64
// reference computed on the device; "err" is max |out - ref| / (1 + |ref|) over y, save_mean,
// save_invstd (forward) or dx, dweight, dbias (backward). Tolerances: f32 1e-3, f16 5e-3, bf16
// 2e-2. Rows above them are counted in the footer and make the exit status 3.
//
// Exit status: 0 success, 1 a failure (CUDA, NCCL or cuDNN error, or a syncbn call failed),
// 2 bad usage or no CUDA device, 3 outputs out of tolerance.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cudnn.h>
#include <nccl.h>

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <chrono>
#include <cerrno>
#include <cinttypes>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "syncbn/syncbn.hpp"
#include "syncbn/syncbn_nccl.hpp"

namespace {

// ---- error checking ---------------------------------------------------------------------------

std::string where(const char* file, int line, const char* call) {
  return std::string(file) + ":" + std::to_string(line) + ": " + call;
}

#define CUDA_CHECK(call)                                                                        \
  do {                                                                                          \
    const cudaError_t err_ = (call);                                                            \
    if (err_ != cudaSuccess) {                                                                  \
      (void)cudaGetLastError(); /* clear a non-sticky error */                                  \
      throw std::runtime_error(where(__FILE__, __LINE__, #call) + ": " +                        \
                               cudaGetErrorName(err_) + ": " + cudaGetErrorString(err_));       \
    }                                                                                           \
  } while (0)

#define NCCL_CHECK(call)                                                                        \
  do {                                                                                          \
    const ncclResult_t res_ = (call);                                                           \
    if (res_ != ncclSuccess) {                                                                  \
      throw std::runtime_error(where(__FILE__, __LINE__, #call) + ": " +                        \
                               ncclGetErrorString(res_));                                       \
    }                                                                                           \
  } while (0)

#define CUDNN_CHECK(call)                                                                       \
  do {                                                                                          \
    const cudnnStatus_t st_ = (call);                                                           \
    if (st_ != CUDNN_STATUS_SUCCESS) {                                                          \
      throw std::runtime_error(where(__FILE__, __LINE__, #call) + ": " +                        \
                               cudnnGetErrorString(st_));                                       \
    }                                                                                           \
  } while (0)

// A launch: the configuration error now, or nothing.
#define LAUNCH_CHECK() CUDA_CHECK(cudaGetLastError())

// ---- problem description ----------------------------------------------------------------------

enum class DType { f32, bf16, f16 };
enum class Layout { nchw, nhwc };
enum class CommKind { nccl, self };

const char* name(DType d) { return d == DType::f32 ? "f32" : d == DType::bf16 ? "bf16" : "f16"; }
const char* name(Layout l) { return l == Layout::nchw ? "nchw" : "nhwc"; }
size_t element_size(DType d) { return d == DType::f32 ? 4 : 2; }
syncbn_dtype_t syncbn_dtype(DType d) {
  return d == DType::f32 ? SYNCBN_FLOAT32 : d == DType::bf16 ? SYNCBN_BFLOAT16 : SYNCBN_FLOAT16;
}
cudnnDataType_t cudnn_dtype(DType d) {
  return d == DType::f32 ? CUDNN_DATA_FLOAT : d == DType::bf16 ? CUDNN_DATA_BFLOAT16
                                                              : CUDNN_DATA_HALF;
}
double tolerance(DType d) { return d == DType::f32 ? 1e-3 : d == DType::f16 ? 5e-3 : 2e-2; }

struct ShapeSpec {
  std::string name;  // "CxHxW", the key shared with torch_bn_bench.py
  int64_t c, h, w;
  int resnet50_layers;  // how many of ResNet-50's 53 BN layers see this shape (0: not ResNet-50)
};

// The distinct BN input shapes of torchvision ResNet-50 (v1.5: stride on the 3x3 conv), per
// sample, and how many of its 53 BN layers have each.
const std::vector<ShapeSpec>& resnet50_shapes() {
  static const std::vector<ShapeSpec> shapes = {
      {"64x112x112", 64, 112, 112, 1},  // stem bn1
      {"64x56x56", 64, 56, 56, 6},      // layer1.{0,1,2} bn1, bn2
      {"256x56x56", 256, 56, 56, 4},    // layer1.{0,1,2} bn3, layer1.0 downsample
      {"128x56x56", 128, 56, 56, 1},    // layer2.0 bn1
      {"128x28x28", 128, 28, 28, 7},    // layer2.0 bn2, layer2.{1,2,3} bn1, bn2
      {"512x28x28", 512, 28, 28, 5},    // layer2.{0..3} bn3, layer2.0 downsample
      {"256x28x28", 256, 28, 28, 1},    // layer3.0 bn1
      {"256x14x14", 256, 14, 14, 11},   // layer3.0 bn2, layer3.{1..5} bn1, bn2
      {"1024x14x14", 1024, 14, 14, 7},  // layer3.{0..5} bn3, layer3.0 downsample
      {"512x14x14", 512, 14, 14, 1},    // layer4.0 bn1
      {"512x7x7", 512, 7, 7, 5},        // layer4.0 bn2, layer4.{1,2} bn1, bn2
      {"2048x7x7", 2048, 7, 7, 4},      // layer4.{0,1,2} bn3, layer4.0 downsample
  };
  return shapes;
}

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

// ---- options ----------------------------------------------------------------------------------

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
  std::string csv, torch_csv;
  std::string cudnn_mode = "best";
  bool graph = true;
  bool cold_l2 = false;
  bool check = true;
  cudaStreamCaptureMode capture_mode = cudaStreamCaptureModeGlobal;
};

const char* kUsage =
    "usage: cuda_bench [options]\n"
    "  -n, --iters N         timed iterations per measurement (median reported), default 200\n"
    "  -w, --warmup N        warm-up iterations, default 20\n"
    "  --batches LIST        per-GPU batch sizes, default 2,8,32\n"
    "  --dtypes LIST         f32, bf16, f16; default f32,bf16\n"
    "  --layouts LIST        nchw, nhwc; default nchw,nhwc\n"
    "  --shapes LIST         CxHxW per sample, default the 12 ResNet-50 BN shapes\n"
    "  --comm nccl|self      one-rank NCCL communicator (default) or no exchange at all\n"
    "  --csv FILE            also write one CSV row per problem\n"
    "  --torch-csv FILE      the CSV of torch_bn_bench.py, for the xtorch columns\n"
    "  --cudnn-mode M        best (default: faster of the two), spatial, persistent, none\n"
    "  --no-graph            skip the CUDA graph replay measurements\n"
    "  --cold-l2             overwrite 2 x L2 before every timed iteration\n"
    "  --no-check            skip the fp64 reference check\n"
    "  --capture-mode M      global (default, as torch.cuda.graph), thread_local, relaxed\n"
    "  --chunk N             iterations enqueued behind one stream hold, default 64\n"
    "  --hold-timeout-ms T   release a hold after T ms even if the host is behind, default 100\n"
    "  --device N            CUDA device, default 0\n";

[[noreturn]] void usage_error(const std::string& msg) {
  std::fprintf(stderr, "cuda_bench: %s\n%s", msg.c_str(), kUsage);
  std::exit(2);
}

std::vector<std::string> split_list(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (!item.empty()) out.push_back(item);
  }
  if (out.empty()) usage_error("empty list '" + s + "'");
  return out;
}

int64_t parse_int(const std::string& flag, const std::string& v, int64_t min) {
  char* end = nullptr;
  errno = 0;
  const long long x = std::strtoll(v.c_str(), &end, 10);
  if (v.empty() || *end != '\0' || errno != 0 || x < min) {
    usage_error(flag + ": expected an integer >= " + std::to_string(min) + ", got '" + v + "'");
  }
  return x;
}

ShapeSpec parse_shape(const std::string& s) {
  for (const auto& known : resnet50_shapes()) {
    if (known.name == s) return known;
  }
  long long c = 0, h = 0, w = 0;
  char tail = 0;
  if (std::sscanf(s.c_str(), "%lldx%lldx%lld%c", &c, &h, &w, &tail) != 3 || c < 1 || h < 1 ||
      w < 1) {
    usage_error("--shapes: expected CxHxW (per sample), got '" + s + "'");
  }
  return ShapeSpec{std::to_string(c) + "x" + std::to_string(h) + "x" + std::to_string(w), c, h,
                   w, 0};
}

Options parse_options(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string flag = argv[i];
    std::string value;
    bool has_value = false;
    const auto eq = flag.find('=');
    if (flag.rfind("--", 0) == 0 && eq != std::string::npos) {
      value = flag.substr(eq + 1);
      flag = flag.substr(0, eq);
      has_value = true;
    }
    auto next = [&]() -> std::string {
      if (has_value) return value;
      if (i + 1 >= argc) usage_error(flag + " needs a value");
      return argv[++i];
    };
    auto no_value = [&] {
      if (has_value) usage_error(flag + " takes no value");
    };
    if (flag == "-h" || flag == "--help") {
      std::fputs(kUsage, stdout);
      std::exit(0);
    } else if (flag == "-n" || flag == "--iters") {
      o.iters = static_cast<int>(parse_int(flag, next(), 1));
    } else if (flag == "-w" || flag == "--warmup") {
      o.warmup = static_cast<int>(parse_int(flag, next(), 0));
    } else if (flag == "--chunk") {
      o.chunk = static_cast<int>(parse_int(flag, next(), 1));
    } else if (flag == "--device") {
      o.device = static_cast<int>(parse_int(flag, next(), 0));
    } else if (flag == "--hold-timeout-ms") {
      o.hold_timeout_ms = static_cast<double>(parse_int(flag, next(), 1));
    } else if (flag == "--batches") {
      o.batches.clear();
      for (const auto& b : split_list(next())) o.batches.push_back(parse_int(flag, b, 1));
    } else if (flag == "--dtypes") {
      o.dtypes.clear();
      for (const auto& d : split_list(next())) {
        if (d == "f32" || d == "fp32" || d == "float32") {
          o.dtypes.push_back(DType::f32);
        } else if (d == "bf16" || d == "bfloat16") {
          o.dtypes.push_back(DType::bf16);
        } else if (d == "f16" || d == "fp16" || d == "float16") {
          o.dtypes.push_back(DType::f16);
        } else {
          usage_error("--dtypes: unknown dtype '" + d + "' (f32, bf16, f16)");
        }
      }
    } else if (flag == "--layouts") {
      o.layouts.clear();
      for (const auto& l : split_list(next())) {
        if (l == "nchw" || l == "channels_first") {
          o.layouts.push_back(Layout::nchw);
        } else if (l == "nhwc" || l == "channels_last") {
          o.layouts.push_back(Layout::nhwc);
        } else {
          usage_error("--layouts: unknown layout '" + l + "' (nchw, nhwc)");
        }
      }
    } else if (flag == "--shapes") {
      o.shapes.clear();
      for (const auto& s : split_list(next())) o.shapes.push_back(parse_shape(s));
    } else if (flag == "--comm") {
      const std::string c = next();
      if (c == "nccl") {
        o.comm = CommKind::nccl;
      } else if (c == "self") {
        o.comm = CommKind::self;
      } else {
        usage_error("--comm: expected nccl or self, got '" + c + "'");
      }
    } else if (flag == "--csv") {
      o.csv = next();
    } else if (flag == "--torch-csv") {
      o.torch_csv = next();
    } else if (flag == "--cudnn-mode") {
      o.cudnn_mode = next();
      if (o.cudnn_mode != "best" && o.cudnn_mode != "spatial" && o.cudnn_mode != "persistent" &&
          o.cudnn_mode != "none") {
        usage_error("--cudnn-mode: expected best, spatial, persistent or none");
      }
    } else if (flag == "--capture-mode") {
      const std::string m = next();
      if (m == "global") {
        o.capture_mode = cudaStreamCaptureModeGlobal;
      } else if (m == "thread_local") {
        o.capture_mode = cudaStreamCaptureModeThreadLocal;
      } else if (m == "relaxed") {
        o.capture_mode = cudaStreamCaptureModeRelaxed;
      } else {
        usage_error("--capture-mode: expected global, thread_local or relaxed");
      }
    } else if (flag == "--no-graph") {
      no_value();
      o.graph = false;
    } else if (flag == "--cold-l2") {
      no_value();
      o.cold_l2 = true;
    } else if (flag == "--no-check") {
      no_value();
      o.check = false;
    } else if (flag == "--no-dist") {
      no_value();  // torch_bn_bench.py's; accepted so that one flag list serves both
    } else {
      usage_error("unknown option '" + flag + "'");
    }
  }
  return o;
}

// ---- device memory ----------------------------------------------------------------------------

class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t bytes) : bytes_(bytes) { CUDA_CHECK(cudaMalloc(&ptr_, bytes ? bytes : 1)); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept { swap(o); }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    swap(o);
    return *this;
  }
  ~DeviceBuffer() {
    if (ptr_ != nullptr) (void)cudaFree(ptr_);
  }
  void* get() const { return ptr_; }
  template <class T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }
  size_t bytes() const { return bytes_; }

 private:
  void swap(DeviceBuffer& o) noexcept {
    std::swap(ptr_, o.ptr_);
    std::swap(bytes_, o.bytes_);
  }
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// ---- device kernels: data, fp64 reference, checks, stream hold -------------------------------

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
template <class T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}

__device__ __forceinline__ uint64_t mix64(uint64_t z) {  // splitmix64 finalizer
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// A standard normal value for index i (Box-Muller on two hashed uniforms in (0, 1)).
__device__ __forceinline__ float hashed_normal(uint64_t i, uint64_t seed) {
  const uint64_t h = mix64(i * 0x9e3779b97f4a7c15ull + seed);
  const float u1 = (static_cast<float>(h >> 40) + 0.5f) * (1.0f / 16777216.0f);
  const float u2 = (static_cast<float>((h >> 16) & 0xffffffu) + 0.5f) * (1.0f / 16777216.0f);
  return sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2);
}

__device__ __forceinline__ int64_t channel_of(int64_t i, int64_t c, int64_t s, bool cl) {
  return cl ? i % c : (i / s) % c;
}

// Data with per-channel mean offset * ((c % 7) - 3) and std 1 + scale_step * (c % 5), so that a
// channel or layout mix-up shows in the check.
template <class T>
__global__ void fill_data(T* p, int64_t count, int64_t c, int64_t s, bool cl, uint64_t seed,
                          float offset, float scale_step) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t ch = channel_of(i, c, s, cl);
    const float v = offset * static_cast<float>(ch % 7 - 3) +
                    (1.0f + scale_step * static_cast<float>(ch % 5)) * hashed_normal(i, seed);
    p[i] = from_float<T>(v);
  }
}

// weight in [0.5, 1.5), bias in [-0.5, 0.5), running_mean 0, running_var 1.
__global__ void fill_params(float* weight, float* bias, float* rm0, float* rv0, float* rm1,
                            float* rv1, int64_t c) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < c;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    weight[i] = 0.5f + static_cast<float>(mix64(i + 101) >> 40) * (1.0f / 16777216.0f);
    bias[i] = static_cast<float>(mix64(i + 202) >> 40) * (1.0f / 16777216.0f) - 0.5f;
    rm0[i] = rm1[i] = 0.0f;
    rv0[i] = rv1[i] = 1.0f;
  }
}

struct Reference {  // fp64, C values each
  double* mean;
  double* invstd;
  double* sum_dy;       // = dbias
  double* sum_dy_xmu;   // sum dy (x - mean)
  double* dweight;      // sum_dy_xmu * invstd
};

constexpr int kRefThreads = 256;

// One block per channel: the exact statistics in fp64 (docs/design.md section 1).
template <class T>
__global__ void __launch_bounds__(kRefThreads)
    reference_stats(const T* x, const T* dy, int64_t n, int64_t c, int64_t s, bool cl, double eps,
                    Reference ref) {
  __shared__ double sh[4][kRefThreads];
  const int64_t ch = blockIdx.x;
  const int64_t m = n * s;
  double sx = 0, sxx = 0, sg = 0, sgx = 0;
  for (int64_t j = threadIdx.x; j < m; j += blockDim.x) {
    const int64_t b = j / s, k = j % s;
    const int64_t idx = cl ? (b * s + k) * c + ch : (b * c + ch) * s + k;
    const double xv = to_float(x[idx]), gv = to_float(dy[idx]);
    sx += xv;
    sxx += xv * xv;
    sg += gv;
    sgx += gv * xv;
  }
  sh[0][threadIdx.x] = sx;
  sh[1][threadIdx.x] = sxx;
  sh[2][threadIdx.x] = sg;
  sh[3][threadIdx.x] = sgx;
  __syncthreads();
  for (int half = blockDim.x / 2; half > 0; half /= 2) {
    if (static_cast<int>(threadIdx.x) < half) {
      for (int k = 0; k < 4; ++k) sh[k][threadIdx.x] += sh[k][threadIdx.x + half];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const double mean = sh[0][0] / m;
    const double var = fmax(sh[1][0] / m - mean * mean, 0.0);
    const double invstd = 1.0 / sqrt(var + eps);
    const double sum_dy_xmu = sh[3][0] - mean * sh[2][0];
    ref.mean[ch] = mean;
    ref.invstd[ch] = invstd;
    ref.sum_dy[ch] = sh[2][0];
    ref.sum_dy_xmu[ch] = sum_dy_xmu;
    ref.dweight[ch] = sum_dy_xmu * invstd;
  }
}

// |out - ref| / (1 + |ref|), with NaN and Inf mapped to +Inf so that they always count.
__device__ __forceinline__ float rel_err(double out, double ref) {
  const double e = fabs(out - ref) / (1.0 + fabs(ref));
  return (e <= static_cast<double>(FLT_MAX)) ? static_cast<float>(e) : INFINITY;
}

// Non-negative floats order like their bit patterns, so atomicMax on the bits is a float max.
__device__ __forceinline__ void block_max_to(float e, unsigned* out) {
  for (int off = 16; off > 0; off /= 2) e = fmaxf(e, __shfl_down_sync(0xffffffffu, e, off));
  if ((threadIdx.x & 31) == 0) atomicMax(out, __float_as_uint(e));
}

template <class T>
__global__ void check_forward(const T* x, const T* y, int64_t count, int64_t c, int64_t s,
                              bool cl, Reference ref, const float* weight, const float* bias,
                              unsigned* err) {
  float e = 0.0f;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t ch = channel_of(i, c, s, cl);
    const double r = (to_float(x[i]) - ref.mean[ch]) * ref.invstd[ch] * weight[ch] + bias[ch];
    e = fmaxf(e, rel_err(to_float(y[i]), r));
  }
  block_max_to(e, err);
}

template <class T>
__global__ void check_backward(const T* x, const T* dy, const T* dx, int64_t count, int64_t c,
                               int64_t s, bool cl, Reference ref, const float* weight, double m,
                               unsigned* err) {
  float e = 0.0f;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t ch = channel_of(i, c, s, cl);
    const double is = ref.invstd[ch];
    const double r = weight[ch] * is *
                     (to_float(dy[i]) - ref.sum_dy[ch] / m -
                      (to_float(x[i]) - ref.mean[ch]) * is * is * ref.sum_dy_xmu[ch] / m);
    e = fmaxf(e, rel_err(to_float(dx[i]), r));
  }
  block_max_to(e, err);
}

__global__ void check_params(const float* out, const double* ref, int64_t c, unsigned* err) {
  float e = 0.0f;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < c;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    e = fmaxf(e, rel_err(out[i], ref[i]));
  }
  block_max_to(e, err);
}

__device__ __forceinline__ unsigned long long global_timer_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Holds the stream until the host sets *release (mapped pinned memory) or timeout_ns passes.
__global__ void hold_stream(const volatile int* release, unsigned long long timeout_ns) {
  const unsigned long long t0 = global_timer_ns();
  while (*release == 0) {
    if (global_timer_ns() - t0 > timeout_ns) break;
    __nanosleep(1000);
  }
}

// Runs f with a value of the element type of d.
template <class F>
void with_type(DType d, F&& f) {
  switch (d) {
    case DType::f32:
      f(float{});
      break;
    case DType::bf16:
      f(__nv_bfloat16{});
      break;
    case DType::f16:
      f(__half{});
      break;
  }
}

// ---- timing -----------------------------------------------------------------------------------

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

double median(std::vector<double> v) {
  if (v.empty()) return NAN;
  const size_t mid = v.size() / 2;
  std::nth_element(v.begin(), v.begin() + mid, v.end());
  return v[mid];
}

class Timer {
 public:
  Timer(cudaStream_t stream, const Options& o, void* flush, size_t flush_bytes)
      : stream_(stream),
        iters_(o.iters),
        warmup_(o.warmup),
        chunk_(std::min(o.chunk, o.iters)),
        timeout_ns_(static_cast<unsigned long long>(o.hold_timeout_ms * 1e6)),
        flush_(flush),
        flush_bytes_(flush_bytes) {
    start_.resize(chunk_);
    stop_.resize(chunk_);
    for (int i = 0; i < chunk_; ++i) {
      CUDA_CHECK(cudaEventCreate(&start_[i]));
      CUDA_CHECK(cudaEventCreate(&stop_[i]));
    }
    CUDA_CHECK(cudaEventCreateWithFlags(&held_, cudaEventDisableTiming));
    void* host = nullptr;
    CUDA_CHECK(cudaHostAlloc(&host, sizeof(int), cudaHostAllocMapped));
    release_host_ = static_cast<volatile int*>(host);
    *release_host_ = 1;
    void* dev = nullptr;
    CUDA_CHECK(cudaHostGetDevicePointer(&dev, host, 0));
    release_dev_ = static_cast<const int*>(dev);
  }
  Timer(const Timer&) = delete;
  Timer& operator=(const Timer&) = delete;
  ~Timer() {
    for (auto e : start_) (void)cudaEventDestroy(e);
    for (auto e : stop_) (void)cudaEventDestroy(e);
    (void)cudaEventDestroy(held_);
    (void)cudaFreeHost(const_cast<int*>(release_host_));
  }

  // Times op(), which enqueues one iteration on the stream and throws on failure.
  template <class F>
  Stats time(F&& op) {
    for (int i = 0; i < warmup_; ++i) op();
    CUDA_CHECK(cudaStreamSynchronize(stream_));
    std::vector<double> dev, host;
    double span_sum_us = 0;
    Stats st;
    for (int done = 0; done < iters_;) {
      const int len = std::min(chunk_, iters_ - done);
      // After a time-out (op() blocks the host, or enqueues slower than the hold lasts) the
      // rest of this measurement runs without holds rather than waiting out each one.
      const bool held = !st.host_bound;
      if (held) hold();
      try {
        for (int i = 0; i < len; ++i) {
          if (flush_ != nullptr) {
            CUDA_CHECK(cudaMemsetAsync(flush_, (done + i) & 0xff, flush_bytes_, stream_));
          }
          CUDA_CHECK(cudaEventRecord(start_[i], stream_));
          const auto t0 = std::chrono::steady_clock::now();
          op();
          const auto t1 = std::chrono::steady_clock::now();
          CUDA_CHECK(cudaEventRecord(stop_[i], stream_));
          host.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
        }
        if (held) {
          const cudaError_t q = cudaEventQuery(held_);
          if (q == cudaSuccess) {
            st.host_bound = true;  // the hold ended on its time-out
          } else if (q != cudaErrorNotReady) {
            CUDA_CHECK(q);
          }
          if (cudaPeekAtLastError() == cudaErrorNotReady) (void)cudaGetLastError();
        }
      } catch (...) {
        release();
        throw;
      }
      release();
      CUDA_CHECK(cudaStreamSynchronize(stream_));
      for (int i = 0; i < len; ++i) {
        float ms = 0;
        CUDA_CHECK(cudaEventElapsedTime(&ms, start_[i], stop_[i]));
        dev.push_back(1e3 * ms);
      }
      float span_ms = 0;
      CUDA_CHECK(cudaEventElapsedTime(&span_ms, start_[0], stop_[len - 1]));
      span_sum_us += 1e3 * span_ms;
      done += len;
    }
    st.median_us = median(dev);
    st.min_us = *std::min_element(dev.begin(), dev.end());
    st.span_us = flush_ != nullptr ? NAN : span_sum_us / iters_;
    st.host_us = median(host);
    return st;
  }

 private:
  void hold() {
    *release_host_ = 0;
    std::atomic_thread_fence(std::memory_order_seq_cst);
    hold_stream<<<1, 1, 0, stream_>>>(release_dev_, timeout_ns_);
    LAUNCH_CHECK();
    CUDA_CHECK(cudaEventRecord(held_, stream_));
  }
  void release() {
    std::atomic_thread_fence(std::memory_order_seq_cst);
    *release_host_ = 1;
    std::atomic_thread_fence(std::memory_order_seq_cst);
  }

  cudaStream_t stream_;
  int iters_, warmup_, chunk_;
  unsigned long long timeout_ns_;
  void* flush_;
  size_t flush_bytes_;
  std::vector<cudaEvent_t> start_, stop_;
  cudaEvent_t held_ = nullptr;
  volatile int* release_host_ = nullptr;
  const int* release_dev_ = nullptr;
};

// A CUDA graph of one captured op(), instantiated.
class Graph {
 public:
  template <class F>
  Graph(cudaStream_t stream, cudaStreamCaptureMode mode, F&& op) {
    CUDA_CHECK(cudaStreamBeginCapture(stream, mode));
    cudaGraph_t graph = nullptr;
    try {
      op();
    } catch (...) {
      (void)cudaStreamEndCapture(stream, &graph);
      if (graph != nullptr) (void)cudaGraphDestroy(graph);
      (void)cudaGetLastError();
      throw;
    }
    CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
    const cudaError_t err = cudaGraphInstantiate(&exec_, graph, 0);
    (void)cudaGraphDestroy(graph);
    CUDA_CHECK(err);
  }
  Graph(const Graph&) = delete;
  Graph& operator=(const Graph&) = delete;
  ~Graph() {
    if (exec_ != nullptr) (void)cudaGraphExecDestroy(exec_);
  }
  void launch(cudaStream_t stream) const { CUDA_CHECK(cudaGraphLaunch(exec_, stream)); }

 private:
  cudaGraphExec_t exec_ = nullptr;
};

// ---- PyTorch results (torch_bn_bench.py CSV) -------------------------------------------------

struct TorchTimes {
  double kernels_fwd = NAN, kernels_bwd = NAN;  // SyncBatchNorm's kernels, no collective
  double functional_fwd = NAN, functional_bwd = NAN;  // F.batch_norm(training=True) + autograd
  double syncbn_fwd = NAN, syncbn_bwd = NAN;  // the SyncBatchNorm function, one-rank group
};
using TorchKey = std::tuple<std::string, int64_t, std::string, std::string>;

double parse_double(const std::string& s) {
  char* end = nullptr;
  const double v = std::strtod(s.c_str(), &end);
  return (s.empty() || *end != '\0') ? NAN : v;
}

std::map<TorchKey, TorchTimes> read_torch_csv(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("--torch-csv: cannot open " + path);
  std::map<TorchKey, TorchTimes> out;
  std::map<std::string, size_t> col;
  std::string line;
  auto cells = [](const std::string& l) {
    std::vector<std::string> v;
    std::stringstream ss(l);
    std::string c;
    while (std::getline(ss, c, ',')) v.push_back(c);
    return v;
  };
  while (std::getline(in, line)) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty() || line[0] == '#') continue;
    const auto v = cells(line);
    if (col.empty()) {
      for (size_t i = 0; i < v.size(); ++i) col[v[i]] = i;
      for (const char* need : {"shape", "n", "dtype", "layout"}) {
        if (!col.count(need)) throw std::runtime_error("--torch-csv: no column '" + std::string(need) + "' in " + path);
      }
      continue;
    }
    auto get = [&](const char* k) -> std::string {
      const auto it = col.find(k);
      return (it == col.end() || it->second >= v.size()) ? std::string() : v[it->second];
    };
    TorchTimes t;
    t.kernels_fwd = parse_double(get("tk_fwd_us"));
    t.kernels_bwd = parse_double(get("tk_bwd_us"));
    t.functional_fwd = parse_double(get("F_fwd_us"));
    t.functional_bwd = parse_double(get("F_bwd_us"));
    t.syncbn_fwd = parse_double(get("sbn_fwd_us"));
    t.syncbn_bwd = parse_double(get("sbn_bwd_us"));
    const double n = parse_double(get("n"));
    if (!std::isfinite(n)) continue;
    out[TorchKey{get("shape"), static_cast<int64_t>(n), get("dtype"), get("layout")}] = t;
  }
  return out;
}

// ---- one problem ------------------------------------------------------------------------------

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
    return copy.host_bound || allreduce.host_bound || fwd.host_bound || bwd.host_bound || fwd_graph.host_bound ||
           bwd_graph.host_bound || cudnn_fwd[0].host_bound || cudnn_fwd[1].host_bound ||
           cudnn_bwd[0].host_bound || cudnn_bwd[1].host_bound;
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

const char* kCudnnModeName[2] = {"spatial", "persistent"};
const cudnnBatchNormMode_t kCudnnMode[2] = {CUDNN_BATCHNORM_SPATIAL,
                                            CUDNN_BATCHNORM_SPATIAL_PERSISTENT};

struct Context {
  const Options& o;
  cudaStream_t stream;
  int sm_count;
  ncclComm_t nccl;  // null with --comm self
  syncbn::Communicator comm;
  cudnnHandle_t cudnn;
  Timer& timer;
  // Data (sized for the largest problem).
  DeviceBuffer x, dy, y, dx, y_ref, dx_ref;
  // Parameters and statistics, fp32, C each.
  DeviceBuffer params;
  DeviceBuffer nbt;
  DeviceBuffer ref_buf;  // 5 x C doubles
  DeviceBuffer err;      // 6 unsigned
  DeviceBuffer allreduce_buf;  // 2C + 18 doubles
  std::map<TorchKey, TorchTimes> torch;
};

struct ParamSet {  // pointers into Context::params
  float *weight, *bias;
  float *rm, *rv, *save_mean, *save_invstd, *dweight, *dbias;  // syncbn
  float *c_rm, *c_rv, *c_mean, *c_invstd, *c_dweight, *c_dbias;  // cuDNN
};

ParamSet param_set(const Context& ctx, int64_t max_c) {
  float* p = ctx.params.as<float>();
  auto next = [&] {
    float* q = p;
    p += max_c;
    return q;
  };
  ParamSet s{};
  s.weight = next();
  s.bias = next();
  s.rm = next();
  s.rv = next();
  s.save_mean = next();
  s.save_invstd = next();
  s.dweight = next();
  s.dbias = next();
  s.c_rm = next();
  s.c_rv = next();
  s.c_mean = next();
  s.c_invstd = next();
  s.c_dweight = next();
  s.c_dbias = next();
  return s;
}
constexpr int kParamArrays = 14;

Reference reference_of(const Context& ctx, int64_t max_c) {
  double* p = ctx.ref_buf.as<double>();
  return Reference{p, p + max_c, p + 2 * max_c, p + 3 * max_c, p + 4 * max_c};
}

int grid_for(const Context& ctx, int64_t count, int threads = 256) {
  const int64_t blocks = (count + threads - 1) / threads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(blocks, 8LL * ctx.sm_count)));
}

// Max relative errors {forward, backward} of a set of outputs against the fp64 reference.
std::pair<double, double> check_outputs(const Context& ctx, const Problem& p, const Reference& ref,
                                        const float* weight, const float* bias, const void* y,
                                        const float* mean, const float* invstd, const void* dx,
                                        const float* dweight, const float* dbias) {
  unsigned* err = ctx.err.as<unsigned>();
  CUDA_CHECK(cudaMemsetAsync(err, 0, 6 * sizeof(unsigned), ctx.stream));
  const int64_t c = p.shape.c, s = p.spatial(), count = p.count();
  const bool cl = p.layout == Layout::nhwc;
  const int g = grid_for(ctx, count);
  with_type(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    check_forward<T><<<g, 256, 0, ctx.stream>>>(ctx.x.as<T>(), static_cast<const T*>(y), count,
                                                c, s, cl, ref, weight, bias, err + 0);
    LAUNCH_CHECK();
    check_backward<T><<<g, 256, 0, ctx.stream>>>(ctx.x.as<T>(), ctx.dy.as<T>(),
                                                 static_cast<const T*>(dx), count, c, s, cl, ref,
                                                 weight, static_cast<double>(p.n * s), err + 3);
    LAUNCH_CHECK();
  });
  const int gc = grid_for(ctx, c);
  check_params<<<gc, 256, 0, ctx.stream>>>(mean, ref.mean, c, err + 1);
  LAUNCH_CHECK();
  check_params<<<gc, 256, 0, ctx.stream>>>(invstd, ref.invstd, c, err + 2);
  LAUNCH_CHECK();
  check_params<<<gc, 256, 0, ctx.stream>>>(dweight, ref.dweight, c, err + 4);
  LAUNCH_CHECK();
  check_params<<<gc, 256, 0, ctx.stream>>>(dbias, ref.sum_dy, c, err + 5);
  LAUNCH_CHECK();
  unsigned bits[6];
  CUDA_CHECK(cudaMemcpyAsync(bits, err, sizeof(bits), cudaMemcpyDeviceToHost, ctx.stream));
  CUDA_CHECK(cudaStreamSynchronize(ctx.stream));
  float e[6];
  std::memcpy(e, bits, sizeof(e));
  return {std::max({e[0], e[1], e[2]}), std::max({e[3], e[4], e[5]})};
}

// After a failed syncbn or cuDNN call: end a capture left open, clear non-sticky errors, and
// stop the whole run if the context is dead.
void recover(cudaStream_t stream) {
  cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &cs) == cudaSuccess && cs != cudaStreamCaptureStatusNone) {
    cudaGraph_t g = nullptr;
    (void)cudaStreamEndCapture(stream, &g);
    if (g != nullptr) (void)cudaGraphDestroy(g);
  }
  (void)cudaGetLastError();
  const cudaError_t e = cudaStreamSynchronize(stream);
  if (e != cudaSuccess) {
    throw std::runtime_error(std::string("CUDA context unusable after a failure: ") +
                             cudaGetErrorName(e) + ": " + cudaGetErrorString(e));
  }
}

void measure_syncbn(Context& ctx, Result& r, const ParamSet& ps, const Reference& ref) {
  const Problem& p = r.p;
  syncbn_config_t config = syncbn::make_config(p.shape.c, syncbn_dtype(p.dtype));
  config.layout = p.layout == Layout::nchw ? SYNCBN_CHANNELS_FIRST : SYNCBN_CHANNELS_LAST;
  config.device = SYNCBN_DEVICE_CUDA;
  syncbn::BatchNorm bn(ctx.comm, config);
  const std::vector<int64_t> shape = p.syncbn_shape();
  void* s = static_cast<void*>(ctx.stream);
  int64_t* nbt = ctx.nbt.as<int64_t>();
  auto forward = [&] {
    bn.forward_training(shape, ctx.x.get(), ps.weight, ps.bias, ctx.y.get(), ps.save_mean,
                        ps.save_invstd, ps.rm, ps.rv, nbt, s);
  };
  auto backward = [&] {
    bn.backward(shape, ctx.x.get(), ctx.dy.get(), ps.weight, ps.save_mean, ps.save_invstd,
                ctx.dx.get(), ps.dweight, ps.dbias, s);
  };
  forward();
  backward();
  bn.check_async_error(s);
  r.fwd = ctx.timer.time(forward);
  r.bwd = ctx.timer.time(backward);
  bn.check_async_error(s);
  auto check = [&] {
    if (!ctx.o.check) return;
    const auto e = check_outputs(ctx, p, ref, ps.weight, ps.bias, ctx.y.get(), ps.save_mean,
                                 ps.save_invstd, ctx.dx.get(), ps.dweight, ps.dbias);
    r.fwd_err = std::isnan(r.fwd_err) ? e.first : std::max(r.fwd_err, e.first);
    r.bwd_err = std::isnan(r.bwd_err) ? e.second : std::max(r.bwd_err, e.second);
  };
  check();
  if (ctx.o.graph) {
    // Poison the outputs so that the check after replay sees the graphs' own results.
    CUDA_CHECK(cudaMemsetAsync(ctx.y.get(), 0xff, p.bytes(), ctx.stream));
    CUDA_CHECK(cudaMemsetAsync(ctx.dx.get(), 0xff, p.bytes(), ctx.stream));
    const Graph gf(ctx.stream, ctx.o.capture_mode, forward);
    const Graph gb(ctx.stream, ctx.o.capture_mode, backward);
    r.fwd_graph = ctx.timer.time([&] { gf.launch(ctx.stream); });
    r.bwd_graph = ctx.timer.time([&] { gb.launch(ctx.stream); });
    bn.check_async_error(s);
    check();
  }
}

void measure_cudnn(Context& ctx, Result& r, const ParamSet& ps, const Reference& ref) {
  const Problem& p = r.p;
  if (ctx.o.cudnn_mode == "none") return;
  struct Desc {
    cudnnTensorDescriptor_t d = nullptr;
    Desc() { CUDNN_CHECK(cudnnCreateTensorDescriptor(&d)); }
    ~Desc() { (void)cudnnDestroyTensorDescriptor(d); }
  } xd, pd;
  const cudnnStatus_t sd = cudnnSetTensor4dDescriptor(
      xd.d, p.layout == Layout::nchw ? CUDNN_TENSOR_NCHW : CUDNN_TENSOR_NHWC,
      cudnn_dtype(p.dtype), static_cast<int>(p.n), static_cast<int>(p.shape.c),
      static_cast<int>(p.shape.h), static_cast<int>(p.shape.w));
  if (sd != CUDNN_STATUS_SUCCESS) {
    r.cudnn_note = std::string("descriptor: ") + cudnnGetErrorString(sd);
    return;
  }
  const float one = 1.0f, zero = 0.0f;
  const double eps = 1e-5, momentum = 0.1;
  for (int m = 0; m < 2; ++m) {
    if (ctx.o.cudnn_mode != "best" && ctx.o.cudnn_mode != kCudnnModeName[m]) continue;
    const cudnnBatchNormMode_t mode = kCudnnMode[m];
    const cudnnStatus_t sp = cudnnDeriveBNTensorDescriptor(pd.d, xd.d, mode);
    if (sp != CUDNN_STATUS_SUCCESS) {
      r.cudnn_note += std::string(kCudnnModeName[m]) + ": " + cudnnGetErrorString(sp) + "; ";
      continue;
    }
    auto forward = [&]() -> cudnnStatus_t {
      return cudnnBatchNormalizationForwardTraining(
          ctx.cudnn, mode, &one, &zero, xd.d, ctx.x.get(), xd.d, ctx.y_ref.get(), pd.d,
          ps.weight, ps.bias, momentum, ps.c_rm, ps.c_rv, eps, ps.c_mean, ps.c_invstd);
    };
    auto backward = [&]() -> cudnnStatus_t {
      return cudnnBatchNormalizationBackward(
          ctx.cudnn, mode, &one, &zero, &one, &zero, xd.d, ctx.x.get(), xd.d, ctx.dy.get(),
          xd.d, ctx.dx_ref.get(), pd.d, ps.weight, ps.c_dweight, ps.c_dbias, eps, ps.c_mean,
          ps.c_invstd);
    };
    // Probe: a status other than success means cuDNN does not serve this combination.
    cudnnStatus_t st = forward();
    if (st == CUDNN_STATUS_SUCCESS) st = backward();
    if (st != CUDNN_STATUS_SUCCESS) {
      r.cudnn_note += std::string(kCudnnModeName[m]) + ": " + cudnnGetErrorString(st) + "; ";
      recover(ctx.stream);
      continue;
    }
    CUDA_CHECK(cudaStreamSynchronize(ctx.stream));
    r.cudnn_fwd[m] = ctx.timer.time([&] { CUDNN_CHECK(forward()); });
    r.cudnn_bwd[m] = ctx.timer.time([&] { CUDNN_CHECK(backward()); });
    if (ctx.o.check) {
      const auto e = check_outputs(ctx, p, ref, ps.weight, ps.bias, ctx.y_ref.get(), ps.c_mean,
                                   ps.c_invstd, ctx.dx_ref.get(), ps.c_dweight, ps.c_dbias);
      const double worst = std::max(e.first, e.second);
      r.cudnn_err = std::isnan(r.cudnn_err) ? worst : std::max(r.cudnn_err, worst);
    }
  }
}

Result measure(Context& ctx, const Problem& p, int64_t max_c) {
  Result r;
  r.p = p;
  const ParamSet ps = param_set(ctx, max_c);
  const Reference ref = reference_of(ctx, max_c);
  const int64_t c = p.shape.c, s = p.spatial(), count = p.count();
  const bool cl = p.layout == Layout::nhwc;
  with_type(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const int g = grid_for(ctx, count);
    fill_data<T><<<g, 256, 0, ctx.stream>>>(ctx.x.as<T>(), count, c, s, cl, 1, 0.5f, 0.25f);
    LAUNCH_CHECK();
    fill_data<T><<<g, 256, 0, ctx.stream>>>(ctx.dy.as<T>(), count, c, s, cl, 2, 0.1f, 0.0f);
    LAUNCH_CHECK();
    reference_stats<T><<<static_cast<unsigned>(c), kRefThreads, 0, ctx.stream>>>(
        ctx.x.as<T>(), ctx.dy.as<T>(), p.n, c, s, cl, 1e-5, ref);
    LAUNCH_CHECK();
  });
  fill_params<<<grid_for(ctx, c), 256, 0, ctx.stream>>>(ps.weight, ps.bias, ps.rm, ps.rv,
                                                          ps.c_rm, ps.c_rv, c);
  LAUNCH_CHECK();
  CUDA_CHECK(cudaMemsetAsync(ctx.nbt.get(), 0, sizeof(int64_t), ctx.stream));
  CUDA_CHECK(cudaStreamSynchronize(ctx.stream));

  r.copy = ctx.timer.time([&] {
    CUDA_CHECK(cudaMemcpyAsync(ctx.y.get(), ctx.x.get(), p.bytes(), cudaMemcpyDeviceToDevice,
                               ctx.stream));
  });
  if (ctx.nccl != nullptr) {
    CUDA_CHECK(cudaMemsetAsync(ctx.allreduce_buf.get(), 0, ctx.allreduce_buf.bytes(), ctx.stream));
    r.allreduce = ctx.timer.time([&] {
      NCCL_CHECK(ncclAllReduce(ctx.allreduce_buf.get(), ctx.allreduce_buf.get(),
                               static_cast<size_t>(2 * c + 18), ncclDouble, ncclSum, ctx.nccl,
                               ctx.stream));
    });
  }
  try {
    measure_syncbn(ctx, r, ps, ref);
  } catch (const std::exception& e) {
    r.failure = e.what();
    recover(ctx.stream);
  }
  try {
    measure_cudnn(ctx, r, ps, ref);
  } catch (const std::exception& e) {
    r.cudnn_note += std::string("failed: ") + e.what() + "; ";
    recover(ctx.stream);
  }
  const auto it = ctx.torch.find(TorchKey{p.shape.name, p.n, name(p.dtype), name(p.layout)});
  if (it != ctx.torch.end()) r.torch = it->second;
  return r;
}

// ---- output -----------------------------------------------------------------------------------

std::string fmt(double v, int width, int prec) {
  char buf[64];
  if (!std::isfinite(v)) {
    std::snprintf(buf, sizeof(buf), "%*s", width, "n/a");
  } else {
    std::snprintf(buf, sizeof(buf), "%*.*f", width, prec, v);
  }
  return buf;
}
std::string fmt_e(double v, int width) {
  char buf[64];
  if (std::isnan(v)) {
    std::snprintf(buf, sizeof(buf), "%*s", width, "n/a");
  } else {
    std::snprintf(buf, sizeof(buf), "%*.1e", width, v);
  }
  return buf;
}
double gbps(double bytes, double us) { return bytes / (us * 1e-6) / 1e9; }
double ratio(double num, double den) { return num / den; }  // NaN propagates

void print_table(const std::vector<Result>& rows, bool forward, CommKind comm) {
  std::printf("#\n# %s (syncbn_%s, comm %s)\n", forward ? "forward training" : "backward",
              forward ? "forward_training" : "backward",
              comm == CommKind::nccl ? "nccl: kernels + one-rank ncclAllReduce"
                                     : "self: kernels only");
  std::printf("# %10s %4s %4s %4s %8s %8s | %8s %8s %8s %8s %6s | %8s %6s %7s %7s | %7s %s\n",
              "shape", "N", "type", "lay", "size", "copy", "time", "graph", "host", "effbw",
              "%copy", "cudnn", "xcudnn", "xtorchK", "xtorchF", "err", "flags");
  std::printf("# %10s %4s %4s %4s %8s %8s | %8s %8s %8s %8s %6s | %8s %6s %7s %7s | %7s\n",
              "(CxHxW)", "", "", "", "(MB)", "(us)", "(us)", "(us)", "(us)", "(GB/s)", "(%)",
              "(us)", "(x)", "(x)", "(x)", "");
  for (const auto& r : rows) {
    const double bytes = static_cast<double>(r.p.bytes());
    const double copy_bw = gbps(2 * bytes, r.copy.median_us);
    const Stats& t = forward ? r.fwd : r.bwd;
    const Stats& g = forward ? r.fwd_graph : r.bwd_graph;
    const double model = (forward ? 3 : 5) * bytes;
    const double bw = gbps(model, t.median_us);
    const double cud = forward ? r.cudnn_fwd_us() : r.cudnn_bwd_us();
    const double tk = forward ? r.torch.kernels_fwd : r.torch.kernels_bwd;
    const double tf = forward ? r.torch.functional_fwd : r.torch.functional_bwd;
    const double err = forward ? r.fwd_err : r.bwd_err;
    std::string flags;
    if (!r.failure.empty()) flags += "FAIL ";
    if (err > tolerance(r.p.dtype)) flags += "WRONG ";
    if (r.host_bound()) flags += "h";
    std::printf("  %10s %4" PRId64 " %4s %4s %s %s | %s %s %s %s %s | %s %s %s %s | %s %s\n",
                r.p.shape.name.c_str(), r.p.n, name(r.p.dtype), name(r.p.layout),
                fmt(bytes / 1e6, 8, 2).c_str(), fmt(r.copy.median_us, 8, 2).c_str(),
                fmt(t.median_us, 8, 2).c_str(), fmt(g.median_us, 8, 2).c_str(),
                fmt(t.host_us, 8, 2).c_str(), fmt(bw, 8, 1).c_str(),
                fmt(100 * bw / copy_bw, 6, 0).c_str(), fmt(cud, 8, 2).c_str(),
                fmt(ratio(cud, t.median_us), 6, 2).c_str(),
                fmt(ratio(tk, t.median_us), 7, 2).c_str(),
                fmt(ratio(tf, t.median_us), 7, 2).c_str(), fmt_e(err, 7).c_str(), flags.c_str());
  }
}

void write_csv_header(std::FILE* f) {
  std::fprintf(f,
               "comm,shape,c,h,w,n,dtype,layout,bytes,copy_us,copy_gbps,"
               "fwd_us,fwd_min_us,fwd_span_us,fwd_host_us,fwd_graph_us,fwd_graph_min_us,"
               "fwd_gbps,fwd_pct_copy,fwd_err,"
               "bwd_us,bwd_min_us,bwd_span_us,bwd_host_us,bwd_graph_us,bwd_graph_min_us,"
               "bwd_gbps,bwd_pct_copy,bwd_err,"
               "cudnn_fwd_us,cudnn_fwd_mode,cudnn_bwd_us,cudnn_bwd_mode,"
               "cudnn_spatial_fwd_us,cudnn_spatial_bwd_us,cudnn_persistent_fwd_us,"
               "cudnn_persistent_bwd_us,cudnn_err,"
               "torch_tk_fwd_us,torch_tk_bwd_us,torch_F_fwd_us,torch_F_bwd_us,"
               "torch_sbn_fwd_us,torch_sbn_bwd_us,"
               "x_cudnn_fwd,x_cudnn_bwd,x_torch_tk_fwd,x_torch_tk_bwd,x_torch_F_fwd,"
               "x_torch_F_bwd,x_torch_sbn_fwd,x_torch_sbn_bwd,"
               "nccl_allreduce_us,nccl_allreduce_host_us,host_bound,status\n");
  std::fflush(f);
}

std::string csv_num(double v) {
  if (std::isnan(v)) return "nan";
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.6g", v);
  return buf;
}

std::string csv_text(std::string s) {  // no commas, quotes or newlines in a cell
  for (auto& ch : s) {
    if (ch == ',' || ch == '"' || ch == '\n' || ch == '\r') ch = ';';
  }
  return s;
}

void write_csv_row(std::FILE* f, CommKind comm, const Result& r) {
  const double bytes = static_cast<double>(r.p.bytes());
  const double copy_bw = gbps(2 * bytes, r.copy.median_us);
  const double fbw = gbps(3 * bytes, r.fwd.median_us), bbw = gbps(5 * bytes, r.bwd.median_us);
  const int bf = r.best_cudnn_fwd(), bb = r.best_cudnn_bwd();
  const double cf = r.cudnn_fwd_us(), cb = r.cudnn_bwd_us();
  std::string status = r.failure.empty() ? "ok" : "FAIL: " + r.failure;
  if (r.wrong()) status += " WRONG";
  if (!r.cudnn_note.empty()) status += " cudnn: " + r.cudnn_note;
  const std::vector<std::string> cells = {
      comm == CommKind::nccl ? "nccl" : "self", r.p.shape.name, std::to_string(r.p.shape.c),
      std::to_string(r.p.shape.h), std::to_string(r.p.shape.w), std::to_string(r.p.n),
      name(r.p.dtype), name(r.p.layout), std::to_string(r.p.bytes()),
      csv_num(r.copy.median_us), csv_num(copy_bw),
      csv_num(r.fwd.median_us), csv_num(r.fwd.min_us), csv_num(r.fwd.span_us),
      csv_num(r.fwd.host_us), csv_num(r.fwd_graph.median_us), csv_num(r.fwd_graph.min_us),
      csv_num(fbw), csv_num(100 * fbw / copy_bw), csv_num(r.fwd_err),
      csv_num(r.bwd.median_us), csv_num(r.bwd.min_us), csv_num(r.bwd.span_us),
      csv_num(r.bwd.host_us), csv_num(r.bwd_graph.median_us), csv_num(r.bwd_graph.min_us),
      csv_num(bbw), csv_num(100 * bbw / copy_bw), csv_num(r.bwd_err),
      csv_num(cf), bf < 0 ? "n/a" : kCudnnModeName[bf], csv_num(cb),
      bb < 0 ? "n/a" : kCudnnModeName[bb],
      csv_num(r.cudnn_fwd[0].median_us), csv_num(r.cudnn_bwd[0].median_us),
      csv_num(r.cudnn_fwd[1].median_us), csv_num(r.cudnn_bwd[1].median_us),
      csv_num(r.cudnn_err),
      csv_num(r.torch.kernels_fwd), csv_num(r.torch.kernels_bwd),
      csv_num(r.torch.functional_fwd), csv_num(r.torch.functional_bwd),
      csv_num(r.torch.syncbn_fwd), csv_num(r.torch.syncbn_bwd),
      csv_num(cf / r.fwd.median_us), csv_num(cb / r.bwd.median_us),
      csv_num(r.torch.kernels_fwd / r.fwd.median_us), csv_num(r.torch.kernels_bwd / r.bwd.median_us),
      csv_num(r.torch.functional_fwd / r.fwd.median_us),
      csv_num(r.torch.functional_bwd / r.bwd.median_us),
      csv_num(r.torch.syncbn_fwd / r.fwd.median_us), csv_num(r.torch.syncbn_bwd / r.bwd.median_us),
      csv_num(r.allreduce.median_us), csv_num(r.allreduce.host_us), r.host_bound() ? "1" : "0", csv_text(status)};
  for (size_t i = 0; i < cells.size(); ++i) {
    std::fprintf(f, "%s%s", i ? "," : "", cells[i].c_str());
  }
  std::fprintf(f, "\n");
  std::fflush(f);
}

// Sums over ResNet-50's 53 BN layers, per (batch, dtype, layout) where all 12 shapes ran.
void print_resnet50_totals(const std::vector<Result>& rows, const Options& o) {
  const auto& all = resnet50_shapes();
  bool header = false;
  for (int64_t n : o.batches) {
    for (DType d : o.dtypes) {
      for (Layout l : o.layouts) {
        double sb = 0, sg = 0, cud = 0, floor = 0, tk = 0, tf = 0;
        size_t found = 0;
        for (const auto& spec : all) {
          for (const auto& r : rows) {
            if (r.p.n != n || r.p.dtype != d || r.p.layout != l || r.p.shape.name != spec.name) {
              continue;
            }
            ++found;
            const int k = spec.resnet50_layers;
            sb += k * (r.fwd.median_us + r.bwd.median_us);
            sg += k * (r.fwd_graph.median_us + r.bwd_graph.median_us);
            cud += k * (r.cudnn_fwd_us() + r.cudnn_bwd_us());
            floor += k * r.copy.median_us * (3.0 + 5.0) / 2.0;  // model bytes at copy speed
            tk += k * (r.torch.kernels_fwd + r.torch.kernels_bwd);
            tf += k * (r.torch.functional_fwd + r.torch.functional_bwd);
          }
        }
        if (found != all.size()) continue;
        if (!header) {
          std::printf("#\n# ResNet-50, all 53 BN layers, forward + backward, sum of medians (us);"
                      " (x) = other / syncbn\n");
          header = true;
        }
        std::printf("#   N=%-3" PRId64 " %-4s %-4s syncbn %s  graph %s  copy floor %s"
                    "  cuDNN %s (x%s)  torch kernels %s (x%s)  F.batch_norm %s (x%s)\n",
                    n, name(d), name(l), fmt(sb, 9, 1).c_str(), fmt(sg, 9, 1).c_str(),
                    fmt(floor, 9, 1).c_str(), fmt(cud, 9, 1).c_str(),
                    fmt(cud / sb, 4, 2).c_str(), fmt(tk, 9, 1).c_str(), fmt(tk / sb, 4, 2).c_str(),
                    fmt(tf, 9, 1).c_str(), fmt(tf / sb, 4, 2).c_str());
      }
    }
  }
}

// The issue's goal: 2048x7x7, batch 2, forward under graph replay (with the one-rank NCCL
// allreduce) under 10 us.
void print_goal(const std::vector<Result>& rows, CommKind comm) {
  bool any = false;
  for (const auto& r : rows) {
    if (r.p.shape.name != "2048x7x7" || r.p.n != 2) continue;
    any = true;
    const double t = r.fwd_graph.median_us;
    const char* verdict = !std::isfinite(t) ? "n/a" : t < 10.0 ? "PASS" : "MISS";
    std::printf("# goal: 2048x7x7 N=2 %-4s %s forward, CUDA graph replay, %s: %s us "
                "(target < 10 us): %s%s\n",
                name(r.p.dtype), name(r.p.layout),
                comm == CommKind::nccl ? "comm nccl (one rank)" : "comm self (no allreduce)",
                fmt(t, 6, 2).c_str(), verdict,
                comm == CommKind::nccl ? "" : "  [the goal is stated for --comm nccl]");
  }
  if (!any) {
    std::printf("# goal: 2048x7x7 N=2 forward under graph replay: not measured "
                "(needs --shapes 2048x7x7 --batches 2)\n");
  }
}

std::string version_string(int v) {
  // NCCL >= 2.9: MAJOR * 10000 + MINOR * 100 + PATCH; cuDNN 9: MAJOR * 10000 + MINOR * 100 + PATCH.
  return std::to_string(v / 10000) + "." + std::to_string(v / 100 % 100) + "." +
         std::to_string(v % 100);
}

int run(const Options& o) {
  int ndev = 0;
  const cudaError_t de = cudaGetDeviceCount(&ndev);
  if (de != cudaSuccess || ndev == 0) {
    std::fprintf(stderr,
                 "cuda_bench: no CUDA device available (cudaGetDeviceCount: %s); this "
                 "benchmark needs a GPU\n",
                 de != cudaSuccess ? cudaGetErrorString(de) : "0 devices");
    return 2;
  }
  if (o.device >= ndev) {
    std::fprintf(stderr, "cuda_bench: --device %d, but only %d device(s)\n", o.device, ndev);
    return 2;
  }
  CUDA_CHECK(cudaSetDevice(o.device));
  cudaDeviceProp prop{};
  CUDA_CHECK(cudaGetDeviceProperties(&prop, o.device));
  int mem_khz = 0, bus_bits = 0, rt = 0, drv = 0, nccl_v = 0;
  // Informational only (these attributes are deprecated): 0 where the runtime declines.
  if (cudaDeviceGetAttribute(&mem_khz, cudaDevAttrMemoryClockRate, o.device) != cudaSuccess ||
      cudaDeviceGetAttribute(&bus_bits, cudaDevAttrGlobalMemoryBusWidth, o.device) != cudaSuccess) {
    (void)cudaGetLastError();
    mem_khz = bus_bits = 0;
  }
  CUDA_CHECK(cudaRuntimeGetVersion(&rt));
  CUDA_CHECK(cudaDriverGetVersion(&drv));
  NCCL_CHECK(ncclGetVersion(&nccl_v));

  std::printf("# cuda_bench: syncbn CUDA forward training / backward on one GPU\n");
  std::printf("# device %d: %s, sm_%d%d, %d SMs, %.1f GiB, L2 %.0f MB, "
              "HBM peak (from clocks) %.0f GB/s\n",
              o.device, prop.name, prop.major, prop.minor, prop.multiProcessorCount,
              prop.totalGlobalMem / 1073741824.0, prop.l2CacheSize / 1e6,
              2.0 * mem_khz * 1e3 * (bus_bits / 8) / 1e9);
  std::printf("# CUDA runtime %d.%d, driver %d.%d, cuDNN %s, NCCL %s, syncbn %d.%d.%d\n",
              rt / 1000, rt % 1000 / 10, drv / 1000, drv % 1000 / 10,
              version_string(static_cast<int>(cudnnGetVersion())).c_str(),
              version_string(nccl_v).c_str(), SYNCBN_VERSION_MAJOR, SYNCBN_VERSION_MINOR,
              SYNCBN_VERSION_PATCH);
  std::printf("# comm %s; -n %d -w %d (median of per-iteration CUDA event times, stream held "
              "while enqueuing); %s L2; graph capture %s\n",
              o.comm == CommKind::nccl ? "nccl (one-rank ncclCommInitAll)" : "self", o.iters,
              o.warmup, o.cold_l2 ? "cold" : "warm (buffers reused back to back)",
              o.graph ? "on" : "off");
  std::printf("# bytes moved: forward 3x tensor, backward 5x tensor, copy 2x tensor; "
              "x<other> = other time / syncbn time (higher: syncbn faster)\n");
  std::fflush(stdout);

  cudaStream_t stream = nullptr;
  CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  struct StreamGuard {
    cudaStream_t s;
    ~StreamGuard() { (void)cudaStreamDestroy(s); }
  } stream_guard{stream};

  ncclComm_t nccl = nullptr;
  if (o.comm == CommKind::nccl) NCCL_CHECK(ncclCommInitAll(&nccl, 1, &o.device));
  struct NcclGuard {
    ncclComm_t c;
    ~NcclGuard() {
      if (c != nullptr) (void)ncclCommDestroy(c);
    }
  } nccl_guard{nccl};

  cudnnHandle_t cudnn = nullptr;
  CUDNN_CHECK(cudnnCreate(&cudnn));
  struct CudnnGuard {
    cudnnHandle_t h;
    ~CudnnGuard() { (void)cudnnDestroy(h); }
  } cudnn_guard{cudnn};
  CUDNN_CHECK(cudnnSetStream(cudnn, stream));

  // Problems, and the buffer sizes they need.
  std::vector<Problem> problems;
  size_t max_bytes = 0;
  int64_t max_c = 1;
  for (const auto& s : o.shapes) {
    for (int64_t n : o.batches) {
      for (DType d : o.dtypes) {
        for (Layout l : o.layouts) {
          problems.push_back(Problem{s, n, d, l});
          max_bytes = std::max(max_bytes, problems.back().bytes());
          max_c = std::max(max_c, s.c);
        }
      }
    }
  }

  DeviceBuffer flush;
  if (o.cold_l2) flush = DeviceBuffer(2 * static_cast<size_t>(std::max(prop.l2CacheSize, 1 << 20)));
  Timer timer(stream, o, o.cold_l2 ? flush.get() : nullptr, flush.bytes());

  // Plans hold the communicator; the context (and every plan) goes before nccl_guard.
  Context ctx{o,
              stream,
              prop.multiProcessorCount,
              nccl,
              o.comm == CommKind::nccl ? syncbn::nccl_communicator(nccl)
                                       : syncbn::Communicator::self(),
              cudnn,
              timer,
              DeviceBuffer(max_bytes),
              DeviceBuffer(max_bytes),
              DeviceBuffer(max_bytes),
              DeviceBuffer(max_bytes),
              DeviceBuffer(max_bytes),
              DeviceBuffer(max_bytes),
              DeviceBuffer(kParamArrays * max_c * sizeof(float)),
              DeviceBuffer(sizeof(int64_t)),
              DeviceBuffer(5 * max_c * sizeof(double)),
              DeviceBuffer(6 * sizeof(unsigned)),
              DeviceBuffer((2 * max_c + 18) * sizeof(double)),
              {}};
  if (!o.torch_csv.empty()) ctx.torch = read_torch_csv(o.torch_csv);

  std::FILE* csv = nullptr;
  if (!o.csv.empty()) {
    csv = std::fopen(o.csv.c_str(), "w");
    if (csv == nullptr) throw std::runtime_error("--csv: cannot open " + o.csv + " for writing");
    write_csv_header(csv);
  }
  struct FileGuard {
    std::FILE* f;
    ~FileGuard() {
      if (f != nullptr) std::fclose(f);
    }
  } csv_guard{csv};

  std::vector<Result> rows;
  for (size_t i = 0; i < problems.size(); ++i) {
    const Problem& p = problems[i];
    std::fprintf(stderr, "# [%zu/%zu] %s N=%" PRId64 " %s %s\n", i + 1, problems.size(),
                 p.shape.name.c_str(), p.n, name(p.dtype), name(p.layout));
    rows.push_back(measure(ctx, p, max_c));
    if (csv != nullptr) write_csv_row(csv, o.comm, rows.back());
  }

  print_table(rows, true, o.comm);
  print_table(rows, false, o.comm);

  // Footer: failures, wrong results, host-bound rows, the goal, the ResNet-50 sums.
  size_t failed = 0, wrong = 0, host_bound = 0, cudnn_wrong = 0;
  std::printf("#\n");
  for (const auto& r : rows) {
    if (!r.failure.empty()) {
      ++failed;
      std::printf("# FAIL %s N=%" PRId64 " %s %s: %s\n", r.p.shape.name.c_str(), r.p.n,
                  name(r.p.dtype), name(r.p.layout), r.failure.c_str());
    }
    if (r.wrong()) ++wrong;
    if (r.host_bound()) ++host_bound;
    if (r.cudnn_err > tolerance(r.p.dtype)) ++cudnn_wrong;
  }
  std::set<std::string> notes;
  for (const auto& r : rows) {
    if (!r.cudnn_note.empty()) {
      notes.insert(std::string(name(r.p.dtype)) + " " + name(r.p.layout) + ": " + r.cudnn_note);
    }
  }
  for (const auto& n : notes) std::printf("# cuDNN n/a for %s\n", n.c_str());
  std::printf("# err = max |out - fp64 ref| / (1 + |ref|); tolerance f32 1e-3, f16 5e-3, "
              "bf16 2e-2\n");
  std::printf("# Out of tolerance (syncbn): %zu of %zu rows %s\n", wrong, rows.size(),
              !o.check ? "(check off)" : wrong == 0 ? "OK" : "WRONG");
  if (cudnn_wrong) {
    std::printf("# Out of tolerance (cuDNN reference runs): %zu rows: the cuDNN column is "
                "suspect\n",
                cudnn_wrong);
  }
  std::printf("# Failed (syncbn): %zu of %zu rows\n", failed, rows.size());
  if (host_bound) {
    std::printf("# flag h: %zu rows had a stream hold time out (host slower than device); their"
                " times include launch gaps\n",
                host_bound);
  }
  if (o.comm == CommKind::nccl) {
    double dmin = INFINITY, dmax = -INFINITY, hmin = INFINITY, hmax = -INFINITY;
    for (const auto& r : rows) {
      if (!r.allreduce.ok()) continue;
      dmin = std::min(dmin, r.allreduce.median_us);
      dmax = std::max(dmax, r.allreduce.median_us);
      hmin = std::min(hmin, r.allreduce.host_us);
      hmax = std::max(hmax, r.allreduce.host_us);
    }
    if (std::isfinite(dmin)) {
      std::printf("# bare one-rank ncclAllReduce (2C + 18 doubles, in place): device %.2f..%.2f "
                  "us, host %.2f..%.2f us (one rank: NCCL enqueues nothing for it)\n",
                  dmin, dmax, hmin, hmax);
    }
  }
  print_goal(rows, o.comm);
  print_resnet50_totals(rows, o);
  std::fflush(stdout);
  if (failed) return 1;
  if (wrong) return 3;
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse_options(argc, argv);
  try {
    return run(o);
  } catch (const syncbn::Error& e) {
    std::fprintf(stderr, "cuda_bench: syncbn error: %s\n", e.what());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "cuda_bench: error: %s\n", e.what());
  }
  return 1;
}
