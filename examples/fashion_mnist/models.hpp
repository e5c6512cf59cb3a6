// The two Fashion-MNIST networks of the example, built around a pluggable batch-norm layer so
// that the same architecture (and the same parameter names: "0.weight", "2.running_mean", ...)
// can carry syncbn's SyncBatchNorm or torch's own BatchNorm1d/2d.
#ifndef SYNCBN_EXAMPLES_MODELS_HPP
#define SYNCBN_EXAMPLES_MODELS_HPP

#include <torch/torch.h>

#include <cstdint>
#include <functional>
#include <string>

#include "syncbn/syncbn.hpp"

namespace syncbn_examples {

// A batch-norm layer over `features` channels of (N, C) input (spatial_dims 0) or of
// (N, C, H, W) input (spatial_dims 2).
using BatchNormFactory =
    std::function<torch::nn::AnyModule(int64_t features, int spatial_dims)>;

// syncbn's SyncBatchNorm (syncbn::torch) over comm (statistics of the global batch), with its
// parameters, buffers and plan on device (SyncBatchNormOptions::device). COLLECTIVE when called.
BatchNormFactory sync_batch_norm_factory(const syncbn::Communicator& comm,
                                         torch::Device device = torch::kCPU);

// torch::nn::BatchNorm1d / BatchNorm2d (statistics of the local batch only).
BatchNormFactory torch_batch_norm_factory();

// Both take (N, 1, 28, 28) images and return (N, 10) logits. Parameters are drawn from torch's
// global generator (torch::manual_seed). The linear and convolution layers that feed a batch
// norm have no bias (the norm's own bias replaces it).
//   "mlp": flatten, 784 -> 128, BN, ReLU, 128 -> 64, BN, ReLU, 64 -> 10
//   "cnn": conv 1->16 3x3 pad 1, BN, ReLU, maxpool 2, conv 16->32 3x3 pad 1, BN, ReLU,
//          maxpool 2, flatten, 32*7*7 -> 10
torch::nn::Sequential make_model(const std::string& name, const BatchNormFactory& batch_norm);

}  // namespace syncbn_examples

#endif  // SYNCBN_EXAMPLES_MODELS_HPP
