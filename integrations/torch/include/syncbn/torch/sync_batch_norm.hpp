// syncbn::torch (CMake: find_package(syncbn REQUIRED COMPONENTS torch), target syncbn::torch).
// SyncBatchNorm: a libtorch module whose batch statistics are taken over every rank of a
// syncbn::Communicator. A drop-in for torch::nn::BatchNorm1d/2d/3d in data-parallel training:
// same parameters (weight, bias), buffers (running_mean, running_var, num_batches_tracked),
// options and state-dict names, so checkpoints move between the two.
//
//   syncbn::Communicator comm = syncbn::mpi_communicator(MPI_COMM_WORLD);
//   syncbn_torch::SyncBatchNorm bn(comm, syncbn_torch::SyncBatchNormOptions(64).momentum(0.1));
//   auto y = bn(x);   // x: (N, C) or (N, C, *spatial), 1 to 3 spatial dims
//
// Training mode: one syncbn_forward_training_ex per call, on the layer's plan (COLLECTIVE: every
// rank of the communicator calls every layer's forward and backward in the same order, even with
// an empty local batch N = 0). The backward is syncbn_backward_ex; it returns this rank's
// (local) weight and bias gradients, as torch's SyncBatchNorm does, so the trainer averages
// parameter gradients over ranks as it does for every other parameter.
// Evaluation mode: syncbn_forward_inference_ex with the running statistics, or with the
// rank's own batch statistics when track_running_stats is off (docs/design.md section 1.2);
// local, no communication, so one rank may evaluate alone. It is not differentiable: evaluate
// under torch::NoGradGuard.
//
// Data: float32 or float64, the layer's dtype (dtype(): float32 at construction; move the module
// with ->to(torch::kFloat64) for the latter, on every rank alike, since changing the dtype makes
// the layer's plan anew, COLLECTIVELY), on the CPU or, in a build with the CUDA path
// (built_with_cuda(): CMake SYNCBN_WITH_CUDA), on the CUDA device given by
// SyncBatchNormOptions::device. The device is fixed at construction: the layer's plan is made
// for it and its parameters and buffers are created on it (num_batches_tracked as an int64
// device tensor that the library increments on the device); input on another device is refused.
// CUDA calls are enqueued on the legacy default stream (stream 0, PyTorch's default current
// stream) with the layer's device made current; work on other streams must be synchronized
// with it by the caller. Over an NCCL communicator, errors the group finds only on the device
// (another rank's bad argument, a call mismatch) come back from check_async_error(), which a
// trainer calls once per step (check_async_errors below); the failed call's outputs are NaN.
// Construction is COLLECTIVE too: it creates the layer's one plan (a syncbn::BatchNorm for the
// layer's dtype and device), which checks that every rank configured the layer alike. The
// module is not clonable (clone() would create a plan on one rank only).
//
// Fused activations: SyncBatchNormReLU (relu(bn(x))) and SyncBatchNormAddReLU (relu(bn(x) + z),
// z the residual input, forward(x, z)) are SyncBatchNorm with the activation fused into the
// library's passes (syncbn_activation_t, the _ex calls of syncbn.h): the same options,
// parameters, buffers, state-dict names, statistics and collectives; the ReLU's backward (the
// mask y > 0 that the forward writes beside y, a kBool per element saved instead of y,
// relu'(0) = 0 as torch's) runs inside syncbn's backward, and
// z gets its gradient. They are modules of their own, not an option of SyncBatchNorm, because
// libtorch's torch::nn::Sequential and AnyModule need one forward() per module, not overloads:
// SyncBatchNorm and SyncBatchNormReLU keep forward(x) and go into a Sequential as
// BatchNorm2d + ReLU would; SyncBatchNormAddReLU's forward(x, z) is its only forward.
//
// Errors: std::runtime_error at construction for a CUDA device where this build has no CUDA
// path or libtorch sees no GPU; c10::Error (TORCH_CHECK, on this rank only, before any
// collective) for a device other than the CPU or CUDA, and for input, parameters or statistics
// on another device than the layer's; syncbn::Error for what the library or the group finds: a
// bad shape on any rank, or a rank whose input, parameters or statistics are not of the layer's
// dtype (every rank fails that call alike, SYNCBN_ERROR_INVALID_ARGUMENT naming the rank).
#ifndef SYNCBN_TORCH_SYNC_BATCH_NORM_HPP
#define SYNCBN_TORCH_SYNC_BATCH_NORM_HPP

#include <torch/torch.h>

#include <cstdint>
#include <ostream>

#include "syncbn/syncbn.hpp"
#include "syncbn/torch/cuda_device.hpp"  // built_with_cuda()

namespace syncbn_torch {

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
  // Every layer's calls go through syncbn's named-argument calls (syncbn_forward_training_ex,
  // syncbn_forward_inference_ex, syncbn_backward_ex), activation SYNCBN_ACTIVATION_NONE here.
  // COLLECTIVE over comm: makes the layer's plan (float32, on options.device()). Parameters
  // and buffers are float32, on options.device(). Throws syncbn::Error where the ranks'
  // options differ (SYNCBN_ERROR_CONFIG_MISMATCH) or are invalid (on every rank alike),
  // std::runtime_error for a CUDA device this build or libtorch cannot use, c10::Error for a
  // device other than the CPU or CUDA.
  SyncBatchNormImpl(const syncbn::Communicator& comm, const SyncBatchNormOptions& options);

  // input: (N, C) or (N, C, *spatial) with 1 to 3 spatial dims, N may be 0, of the layer's
  // dtype (float32 or float64) and on its device, in any memory layout (copied into the layer's
  // when it is not dense in it). Returns y of input's shape, dtype and device, dense in the
  // layer's layout (channels-last strides when channels_last and input has spatial dims).
  // COLLECTIVE in training mode. Errors: see "Errors" above. (On a SyncBatchNormAddReLU
  // reached through this class, the missing z fails the call on every rank alike.)
  torch::Tensor forward(const torch::Tensor& input);

  // torch::nn::Module::to, which also makes the layer's plan for the new dtype when the dtype
  // changes to float32 or float64: COLLECTIVE then (every rank must move its model alike, as
  // it constructs it). Other dtypes (float16, ...) convert parameters and buffers but keep the
  // plan, and forward refuses them. The device of the layer is fixed at construction: moving
  // parameters to another device makes forward refuse them. Before its plan is replaced, the
  // errors its CUDA calls recorded are thrown (check_async_error()).
  using torch::nn::Module::to;
  void to(torch::Device device, torch::Dtype dtype, bool non_blocking = false) override;
  void to(torch::Dtype dtype, bool non_blocking = false) override;

  // running_mean = 0, running_var = 1, num_batches_tracked = 0.
  void reset_running_stats();
  // reset_running_stats(), weight = 1, bias = 0.
  void reset_parameters();

  void pretty_print(std::ostream& stream) const override;

  // CUDA layers: waits for the legacy default stream, then throws (syncbn::Error) the first error
  // the device recorded in this layer's calls since the last check (NCCL communicators; see
  // syncbn_plan_get_async_error) and clears it. Nothing to do on the CPU.
  void check_async_error();

  const SyncBatchNormOptions& options() const { return options_; }
  // The device of the layer's plan, parameters and buffers (with its index for CUDA).
  const torch::Device& device() const { return device_; }
  // The dtype of the layer's plan, of its parameters and running statistics, and of the input it
  // takes: torch::kFloat32 or torch::kFloat64.
  torch::Dtype dtype() const { return dtype_; }
  // The activation fused into the layer: SYNCBN_ACTIVATION_NONE, or _RELU / _ADD_RELU for the
  // modules below.
  syncbn_activation_t activation() const { return activation_; }

  torch::Tensor weight;               // (C) of dtype(), undefined when !affine
  torch::Tensor bias;                 // (C) of dtype(), undefined when !affine
  torch::Tensor running_mean;         // (C) of dtype(), undefined when !track_running_stats
  torch::Tensor running_var;          // (C) of dtype(), undefined when !track_running_stats
  torch::Tensor num_batches_tracked;  // int64 scalar, undefined when !track_running_stats

 protected:
  // COLLECTIVE over comm, as the public constructor: a layer with activation fused, named name
  // in pretty_print.
  SyncBatchNormImpl(const syncbn::Communicator& comm, const SyncBatchNormOptions& options,
                    syncbn_activation_t activation, const char* name);

  // The one path of every layer: bn(input), act(bn(input)) or act(bn(input) + z). z is
  // SyncBatchNormAddReLU's residual, undefined otherwise.
  torch::Tensor forward_fused(const torch::Tensor& input, const torch::Tensor& z);

 private:
  void check_arguments(const torch::Tensor& input, const torch::Tensor& z);
  void set_dtype(torch::Dtype dtype);
  void keep_counter_int64();
  torch::Tensor forward_eval(const torch::Tensor& input, const torch::Tensor& z);

  syncbn_activation_t activation_ = SYNCBN_ACTIVATION_NONE;
  const char* name_ = "SyncBatchNorm";
  SyncBatchNormOptions options_;
  torch::Device device_;
  const syncbn::Communicator comm_;  // for the plan of another dtype (to())
  torch::Dtype dtype_ = torch::kFloat32;
  syncbn::BatchNorm plan_;           // the one plan: dtype_ on device_
};

TORCH_MODULE(SyncBatchNorm);

// relu(SyncBatchNorm(x)), the ReLU fused (SYNCBN_ACTIVATION_RELU): forward(input) as
// SyncBatchNorm's, returning relu(bn(input)); the backward gates the output gradient with the
// forward's mask y > 0. Evaluation applies the ReLU too.
class SyncBatchNormReLUImpl : public SyncBatchNormImpl {
 public:
  // COLLECTIVE over comm, as SyncBatchNorm's.
  SyncBatchNormReLUImpl(const syncbn::Communicator& comm, const SyncBatchNormOptions& options);
};

TORCH_MODULE(SyncBatchNormReLU);

// relu(SyncBatchNorm(x) + z), the addition of the residual and the ReLU fused
// (SYNCBN_ACTIVATION_ADD_RELU): a ResNet block's bn2, add and relu in one layer,
//   out = bn2(conv2->forward(out), identity);   // was relu(bn2(conv2(out)) + identity)
// The statistics are x's alone. z gets the gradient dy * (y > 0); x, weight and bias the batch
// norm's of that. Evaluation applies the addition and the ReLU.
class SyncBatchNormAddReLUImpl : public SyncBatchNormImpl {
 public:
  // COLLECTIVE over comm, as SyncBatchNorm's.
  SyncBatchNormAddReLUImpl(const syncbn::Communicator& comm,
                           const SyncBatchNormOptions& options);

  // input as SyncBatchNorm::forward's; z (the residual) of input's shape, dtype and device, in
  // any memory layout (copied into the layer's where it is not dense in it). A z on another
  // device is a c10::Error on this rank; of another dtype or shape, a syncbn::Error on every
  // rank (SYNCBN_ERROR_INVALID_ARGUMENT, "rank R: z ..."). COLLECTIVE in training mode.
  torch::Tensor forward(const torch::Tensor& input, const torch::Tensor& z);
};

TORCH_MODULE(SyncBatchNormAddReLU);

// Calls check_async_error() of every SyncBatchNorm (the fused ones too) in module (module itself
// included); the syncbn::Error names the layer ("SYNCBN_ERROR_...: SyncBatchNorm 1: rank 2: ...").
void check_async_errors(torch::nn::Module& module);

}  // namespace syncbn_torch

#endif  // SYNCBN_TORCH_SYNC_BATCH_NORM_HPP
