// cuda_bench's CUDA plumbing, shared by its .cu files: the CUDA / NCCL / cuDNN error checks
// (throwing std::runtime_error with file, line and call), device memory (DeviceBuffer), the
// element types of each DType (with_type) and their conversions on the device.
#ifndef SYNCBN_BENCH_CUDA_COMMON_CUH
#define SYNCBN_BENCH_CUDA_COMMON_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cudnn.h>
#include <nccl.h>

#include <stdexcept>
#include <string>
#include <utility>

#include "cuda_bench.hpp"

namespace cuda_bench {

inline std::string where(const char* file, int line, const char* call) {
  return std::string(file) + ":" + std::to_string(line) + ": " + call;
}

#define CUDA_CHECK(call)                                                                        \
  do {                                                                                          \
    const cudaError_t err_ = (call);                                                            \
    if (err_ != cudaSuccess) {                                                                  \
      (void)cudaGetLastError(); /* clear a non-sticky error */                                  \
      throw std::runtime_error(::cuda_bench::where(__FILE__, __LINE__, #call) + ": " +          \
                               cudaGetErrorName(err_) + ": " + cudaGetErrorString(err_));       \
    }                                                                                           \
  } while (0)

#define NCCL_CHECK(call)                                                                        \
  do {                                                                                          \
    const ncclResult_t res_ = (call);                                                           \
    if (res_ != ncclSuccess) {                                                                  \
      throw std::runtime_error(::cuda_bench::where(__FILE__, __LINE__, #call) + ": " +          \
                               ncclGetErrorString(res_));                                       \
    }                                                                                           \
  } while (0)

#define CUDNN_CHECK(call)                                                                       \
  do {                                                                                          \
    const cudnnStatus_t st_ = (call);                                                           \
    if (st_ != CUDNN_STATUS_SUCCESS) {                                                          \
      throw std::runtime_error(::cuda_bench::where(__FILE__, __LINE__, #call) + ": " +          \
                               cudnnGetErrorString(st_));                                       \
    }                                                                                           \
  } while (0)

// A launch: the configuration error now, or nothing.
#define LAUNCH_CHECK() CUDA_CHECK(cudaGetLastError())

class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t bytes) : bytes_(bytes) {
    CUDA_CHECK(cudaMalloc(&ptr_, bytes ? bytes : 1));
  }
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

inline cudnnDataType_t cudnn_dtype(DType d) {
  return d == DType::f32 ? CUDNN_DATA_FLOAT : d == DType::bf16 ? CUDNN_DATA_BFLOAT16
                                                              : CUDNN_DATA_HALF;
}

inline cudaStreamCaptureMode capture_mode(CaptureMode m) {
  return m == CaptureMode::global          ? cudaStreamCaptureModeGlobal
         : m == CaptureMode::thread_local_ ? cudaStreamCaptureModeThreadLocal
                                           : cudaStreamCaptureModeRelaxed;
}

}  // namespace cuda_bench

#endif  // SYNCBN_BENCH_CUDA_COMMON_CUH
