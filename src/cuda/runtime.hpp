// src/cuda's small helpers over the CUDA runtime, shared by the CUDA backend of plans
// (backend.cpp) and the NCCL communicator (src/comm/nccl.cpp): one way to check a runtime call
// and one way to make a device current for a scope.
#ifndef SYNCBN_CUDA_RUNTIME_HPP
#define SYNCBN_CUDA_RUNTIME_HPP

#include <cuda_runtime.h>

#include <string>

#include "core/error.hpp"

namespace syncbn::cuda {

// Throws Failure(SYNCBN_ERROR_INTERNAL) "<what> failed: <CUDA's message>" unless e is
// cudaSuccess, after clearing a non-sticky error.
inline void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    cudaGetLastError();
    core::fail(SYNCBN_ERROR_INTERNAL, std::string(what) + " failed: " + cudaGetErrorString(e));
  }
}

// Makes device current for its lifetime, and the previous one current again at its end.
class DeviceSwitch {
 public:
  explicit DeviceSwitch(int device) {
    int current = -1;
    if (cudaGetDevice(&current) != cudaSuccess) {
      cudaGetLastError();
      current = -1;
    }
    if (current != device) {
      previous_ = current;
      if (cudaSetDevice(device) != cudaSuccess) cudaGetLastError();
    }
  }
  ~DeviceSwitch() {
    if (previous_ >= 0) cudaSetDevice(previous_);
  }
  DeviceSwitch(const DeviceSwitch&) = delete;
  DeviceSwitch& operator=(const DeviceSwitch&) = delete;

 private:
  int previous_ = -1;
};

}  // namespace syncbn::cuda

#endif  // SYNCBN_CUDA_RUNTIME_HPP
