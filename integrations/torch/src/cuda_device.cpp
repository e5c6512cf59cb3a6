#include "syncbn/torch/cuda_device.hpp"

#include <torch/cuda.h>

#include <stdexcept>
#include <string>

#ifdef SYNCBN_TORCH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace syncbn_torch {
namespace {

#ifdef SYNCBN_TORCH_CUDA
void check_cuda(cudaError_t rc, const std::string& call) {
  if (rc == cudaSuccess) return;
  throw std::runtime_error(call + " failed: " + cudaGetErrorName(rc) + ": " +
                           cudaGetErrorString(rc));
}
#else
[[noreturn]] void no_cuda(const std::string& what) {
  throw std::runtime_error(what + ": this build has no CUDA support (configure syncbn with "
                           "-DSYNCBN_WITH_CUDA=ON and a CUDA toolkit)");
}
#endif

}  // namespace

bool built_with_cuda() {
#ifdef SYNCBN_TORCH_CUDA
  return true;
#else
  return false;
#endif
}

void require_cuda(const std::string& what) {
#ifndef SYNCBN_TORCH_CUDA
  no_cuda(what);
#else
  if (!torch::cuda::is_available()) {
    throw std::runtime_error(
        what + ": libtorch sees no CUDA device (torch::cuda::is_available() is false): this "
               "libtorch is CPU-only (as Debian's), or no GPU or driver is visible. Build with "
               "a CUDA libtorch (e.g. pip's torch: -DTorch_DIR=$(python3 -c 'import torch; "
               "print(torch.utils.cmake_prefix_path)')/Torch) and run on a GPU machine");
  }
#endif
}

int cuda_device_count() {
#ifdef SYNCBN_TORCH_CUDA
  int count = 0;
  check_cuda(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
  return count;
#else
  no_cuda("cuda_device_count");
#endif
}

int cuda_current_device() {
#ifdef SYNCBN_TORCH_CUDA
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  return device;
#else
  no_cuda("cuda_current_device");
#endif
}

void cuda_set_device(int device) {
#ifdef SYNCBN_TORCH_CUDA
  check_cuda(cudaSetDevice(device), "cudaSetDevice(" + std::to_string(device) + ")");
#else
  (void)device;
  no_cuda("cuda_set_device");
#endif
}

CudaDeviceScope::CudaDeviceScope(const torch::Device& device) {
  if (!device.is_cuda()) return;
#ifdef SYNCBN_TORCH_CUDA
  const int current = cuda_current_device();
  if (device.has_index() && device.index() != current) {
    cuda_set_device(device.index());
    previous_ = current;
  }
#else
  no_cuda("CUDA device " + device.str());
#endif
}

CudaDeviceScope::~CudaDeviceScope() {
#ifdef SYNCBN_TORCH_CUDA
  if (previous_ >= 0) cudaSetDevice(previous_);  // nothing to do about a failure here
#endif
}

}  // namespace syncbn_torch
