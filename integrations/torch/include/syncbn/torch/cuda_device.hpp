// syncbn::torch: the CUDA device helpers of the module and of its users' trainers, over the CUDA
// runtime directly (cudaGetDevice, cudaSetDevice), not c10::cuda, so that they build against a
// CPU-only libtorch too. syncbn's CUDA plans work on the device that is current at plan creation
// and must find it current at every call. Where syncbn::torch was built without CUDA
// (built_with_cuda() false) every function below that needs a GPU throws std::runtime_error
// naming the missing build option.
#ifndef SYNCBN_TORCH_CUDA_DEVICE_HPP
#define SYNCBN_TORCH_CUDA_DEVICE_HPP

#include <torch/torch.h>

#include <string>

namespace syncbn_torch {

// Whether this syncbn::torch was built with the CUDA path (CMake SYNCBN_WITH_CUDA): without it,
// a layer on a CUDA device throws at construction.
bool built_with_cuda();

// Throws std::runtime_error saying why `what` (e.g. "SyncBatchNorm on cuda:0", "--device cuda")
// cannot run: this build has no CUDA path, or libtorch sees no CUDA device (a CPU-only libtorch,
// no GPU, no driver). Returns normally when it can.
void require_cuda(const std::string& what);

// The CUDA runtime's device count, and the current device of this thread (get and set). Throw
// std::runtime_error naming the failed runtime call.
int cuda_device_count();
int cuda_current_device();
void cuda_set_device(int device);

// Makes device current for the scope (CUDA devices with an index; nothing for the CPU) and
// restores the previous device at the end.
class CudaDeviceScope {
 public:
  explicit CudaDeviceScope(const torch::Device& device);
  ~CudaDeviceScope();
  CudaDeviceScope(const CudaDeviceScope&) = delete;
  CudaDeviceScope& operator=(const CudaDeviceScope&) = delete;

 private:
  int previous_ = -1;  // the device to restore; -1: nothing changed
};

}  // namespace syncbn_torch

#endif  // SYNCBN_TORCH_CUDA_DEVICE_HPP
