// cuda_bench's run context, shared by its .cu files: the stream, the communicators, the cuDNN
// handle, the Timer and the device buffers sized for the largest problem (Context); the
// parameter and statistics arrays inside them (ParamSet); the fp64 reference's arrays
// (Reference); launch sizes; and the recovery after a failed call.
#ifndef SYNCBN_BENCH_CUDA_CONTEXT_CUH
#define SYNCBN_BENCH_CUDA_CONTEXT_CUH

#include <algorithm>
#include <map>
#include <string>

#include "cuda_common.cuh"
#include "syncbn/syncbn.hpp"
#include "timing.cuh"

namespace cuda_bench {

struct Reference {  // fp64, C values each
  double* mean;
  double* invstd;
  double* sum_dy;       // = dbias
  double* sum_dy_xmu;   // sum dy (x - mean)
  double* dweight;      // sum_dy_xmu * invstd
};

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

inline ParamSet param_set(const Context& ctx, int64_t max_c) {
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

inline Reference reference_of(const Context& ctx, int64_t max_c) {
  double* p = ctx.ref_buf.as<double>();
  return Reference{p, p + max_c, p + 2 * max_c, p + 3 * max_c, p + 4 * max_c};
}

inline int grid_for(const Context& ctx, int64_t count, int threads = 256) {
  const int64_t blocks = (count + threads - 1) / threads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(blocks, 8LL * ctx.sm_count)));
}

// After a failed syncbn or cuDNN call: end a capture left open, clear non-sticky errors, and
// stop the whole run if the context is dead.
inline void recover(cudaStream_t stream) {
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

}  // namespace cuda_bench

#endif  // SYNCBN_BENCH_CUDA_CONTEXT_CUH
