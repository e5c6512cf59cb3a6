// SyncBatchNorm: a libtorch module whose batch statistics are taken over every rank of a
// syncbn::Communicator. A drop-in for torch::nn::BatchNorm1d/2d/3d in data-parallel training:
// same parameters (weight, bias), buffers (running_mean, running_var, num_batches_tracked),
// options and state-dict names, so checkpoints move between the two.
//
//   syncbn::Communicator comm = syncbn::mpi_communicator(MPI_COMM_WORLD);
//   SyncBatchNorm bn(comm, SyncBatchNormOptions(64).momentum(0.1));
//   auto y = bn(x);   // x: (N, C) or (N, C, *spatial), 1 to 3 spatial dims
//
// Training mode: one syncbn::BatchNorm::forward_training per call (COLLECTIVE: every rank of
// the communicator calls every layer's forward and backward in the same order, even with an
// empty local batch N = 0). The backward is syncbn::BatchNorm::backward; it returns this rank's
// (local) weight and bias gradients, as torch's SyncBatchNorm does, so the trainer averages
// parameter gradients over ranks as it does for every other parameter.
// Evaluation mode: syncbn::BatchNorm::forward_inference with the running statistics (local, no
// communication; collective over batch statistics when track_running_stats is off). It is not
// differentiable: evaluate under torch::NoGradGuard.
//
// Data: float32 or float64 (move the module with ->to(torch::kFloat64) for the latter), on the
// CPU or, in a build with the CUDA path (SYNCBN_EXAMPLE_CUDA), on the CUDA device given by
// SyncBatchNormOptions::device. The device is fixed at construction: the layer's plans are made
// for it and its parameters and buffers are created on it (num_batches_tracked as an int64
// device tensor that the library increments on the device); input on another device is refused.
// CUDA calls are enqueued on the legacy default stream (stream 0, PyTorch's default current
// stream) with the layer's device made current; work on other streams must be synchronized
// with it by the caller. Over an NCCL communicator, errors the group finds only on the device
// (another rank's bad argument, a call mismatch) come back from check_async_error(), which a
// trainer calls once per step (check_async_errors below); the failed call's outputs are NaN.
// Construction is COLLECTIVE too: it creates the layer's plans (one per dtype), which checks
// that every rank configured the layer alike. The module is not clonable (clone() would create
// plans on one rank only).
#ifndef SYNCBN_EXAMPLES_SYNC_BATCH_NORM_HPP
#define SYNCBN_EXAMPLES_SYNC_BATCH_NORM_HPP

#include <torch/torch.h>

#include <cstdint>
#include <ostream>

#include "syncbn/syncbn.hpp"

namespace syncbn_examples {

struct SyncBatchNormOptions {
  /* implicit */ SyncBatchNormOptions(int64_t num_features) : num_features_(num_features) {}

  // C, the size of dimension 1 of the (logical, N C *spatial) input.
  TORCH_ARG(int64_t, num_features);
  // Added to the variance before the square root.
  TORCH_ARG(double, eps) = 1e-5;
  // Weight of the new batch statistic in the running statistics; nullopt: cumulative average
  // (1 / num_batches_tracked), like torch's momentum=None.
  TORCH_ARG(c10::optional<double>, momentum) = 0.1;
  // Learnable weight (gamma, init 1) and bias (beta, init 0).
  TORCH_ARG(bool, affine) = true;
  // Keep running_mean / running_var / num_batches_tracked and use them in evaluation mode.
  TORCH_ARG(bool, track_running_stats) = true;
  // Channels are the fastest-varying dimension in memory (NHWC, torch::MemoryFormat::ChannelsLast
  // for 4-D input). Input in the other layout is copied into this one.
  TORCH_ARG(bool, channels_last) = false;
  // Where parameters, buffers and input live: the CPU, or a CUDA device (cuda:k; plain cuda:
  // the CUDA runtime's current device at construction). CUDA needs a build with the CUDA path.
  TORCH_ARG(torch::Device, device) = torch::kCPU;
};

class SyncBatchNormImpl : public torch::nn::Module {
 public:
  // COLLECTIVE over comm.
  SyncBatchNormImpl(const syncbn::Communicator& comm, const SyncBatchNormOptions& options);

  // input: (N, C) or (N, C, *spatial) with 1 to 3 spatial dims, N may be 0.
  torch::Tensor forward(const torch::Tensor& input);

  // running_mean = 0, running_var = 1, num_batches_tracked = 0.
  void reset_running_stats();
  // reset_running_stats(), weight = 1, bias = 0.
  void reset_parameters();

  void pretty_print(std::ostream& stream) const override;

  // CUDA plans: waits for the legacy default stream, then throws (syncbn::Error) the first error
  // the device recorded in this layer's calls since the last check (NCCL communicators; see
  // syncbn_plan_get_async_error) and clears it. Nothing to do on the CPU.
  void check_async_error();

  const SyncBatchNormOptions& options() const { return options_; }
  // The device of the layer's plans, parameters and buffers (with its index for CUDA).
  const torch::Device& device() const { return device_; }

  torch::Tensor weight;               // (C), undefined when !affine
  torch::Tensor bias;                 // (C), undefined when !affine
  torch::Tensor running_mean;         // (C), undefined when !track_running_stats
  torch::Tensor running_var;          // (C), undefined when !track_running_stats
  torch::Tensor num_batches_tracked;  // int64 scalar, undefined when !track_running_stats

 private:
  syncbn::BatchNorm& plan_for(const torch::Tensor& input);
  torch::Tensor forward_eval(const torch::Tensor& input, syncbn::BatchNorm& plan);

  SyncBatchNormOptions options_;
  torch::Device device_;
  syncbn::BatchNorm plan_float32_;
  syncbn::BatchNorm plan_float64_;
};

TORCH_MODULE(SyncBatchNorm);

// Calls check_async_error() of every SyncBatchNorm in module (module itself included); the
// syncbn::Error names the layer ("SYNCBN_ERROR_...: SyncBatchNorm 1: rank 2: ...").
void check_async_errors(torch::nn::Module& module);

}  // namespace syncbn_examples

#endif  // SYNCBN_EXAMPLES_SYNC_BATCH_NORM_HPP
