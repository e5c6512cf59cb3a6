// The CUDA device side of the examples, kept behind plain functions so that no caller needs the
// CUDA headers. syncbn's CUDA plans work on the device that is current (in the CUDA runtime) at
// plan creation and must find it current at every call; these helpers set it with the CUDA
// runtime directly (cudaSetDevice), not through c10::cuda, so that the examples build against a
// CPU-only libtorch too. Built with the CUDA path when SYNCBN_EXAMPLE_CUDA is defined (CMake:
// SYNCBN_WITH_CUDA=ON); otherwise every function below that needs a GPU throws, naming the
// missing build option.
#ifndef SYNCBN_EXAMPLES_CUDA_DEVICE_HPP
#define SYNCBN_EXAMPLES_CUDA_DEVICE_HPP

#include <mpi.h>
#include <torch/torch.h>

#include <string>

namespace syncbn_examples {

// Whether these examples were built with the CUDA path (SYNCBN_WITH_CUDA) and with the NCCL one
// (SYNCBN_WITH_NCCL).
constexpr bool built_with_cuda() {
#ifdef SYNCBN_EXAMPLE_CUDA
  return true;
#else
  return false;
#endif
}

constexpr bool built_with_nccl() {
#ifdef SYNCBN_EXAMPLE_NCCL
  return true;
#else
  return false;
#endif
}

// Throws std::runtime_error with a message saying why `what` (e.g. "--device cuda") cannot run:
// this build has no CUDA path, or libtorch sees no CUDA device (a CPU-only libtorch, no GPU, no
// driver). Returns normally when it can.
void require_cuda(const std::string& what);

// The CUDA runtime's device count and current device of this thread.
int cuda_device_count();
int cuda_current_device();
void cuda_set_device(int device);

// COLLECTIVE over comm. One GPU per local rank: the rank's index among the ranks of comm on the
// same node (MPI_Comm_split_type shared), modulo the node's device count, made current. The
// same choice as syncbn_nccl_comm_init_mpi. Returns the device index.
int select_local_cuda_device(MPI_Comm comm);

// Makes device current for the scope (CUDA devices; nothing for the CPU) and restores the
// previous device at the end.
class CudaDeviceScope {
 public:
  explicit CudaDeviceScope(const torch::Device& device);
  ~CudaDeviceScope();
  CudaDeviceScope(const CudaDeviceScope&) = delete;
  CudaDeviceScope& operator=(const CudaDeviceScope&) = delete;

 private:
  int previous_ = -1;  // the device to restore; -1: nothing changed
};

}  // namespace syncbn_examples

#endif  // SYNCBN_EXAMPLES_CUDA_DEVICE_HPP
