#include "models.hpp"

#include <stdexcept>

#include "syncbn/torch/sync_batch_norm.hpp"

namespace syncbn_examples {
namespace {

namespace nn = torch::nn;
using syncbn_torch::SyncBatchNorm;
using syncbn_torch::SyncBatchNormOptions;

nn::Sequential make_mlp(const BatchNormFactory& batch_norm) {
  nn::Sequential model;
  model->push_back(nn::Flatten());
  model->push_back(nn::Linear(nn::LinearOptions(28 * 28, 128).bias(false)));
  model->push_back(batch_norm(128, 0));
  model->push_back(nn::ReLU());
  model->push_back(nn::Linear(nn::LinearOptions(128, 64).bias(false)));
  model->push_back(batch_norm(64, 0));
  model->push_back(nn::ReLU());
  model->push_back(nn::Linear(64, 10));
  return model;
}

nn::Sequential make_cnn(const BatchNormFactory& batch_norm) {
  nn::Sequential model;
  model->push_back(nn::Conv2d(nn::Conv2dOptions(1, 16, 3).padding(1).bias(false)));
  model->push_back(batch_norm(16, 2));
  model->push_back(nn::ReLU());
  model->push_back(nn::MaxPool2d(nn::MaxPool2dOptions(2)));
  model->push_back(nn::Conv2d(nn::Conv2dOptions(16, 32, 3).padding(1).bias(false)));
  model->push_back(batch_norm(32, 2));
  model->push_back(nn::ReLU());
  model->push_back(nn::MaxPool2d(nn::MaxPool2dOptions(2)));
  model->push_back(nn::Flatten());
  model->push_back(nn::Linear(32 * 7 * 7, 10));
  return model;
}

void check_spatial_dims(int spatial_dims) {
  if (spatial_dims != 0 && spatial_dims != 2) {
    throw std::invalid_argument("batch norm factory: spatial_dims must be 0 or 2, got " +
                                std::to_string(spatial_dims));
  }
}

}  // namespace

BatchNormFactory sync_batch_norm_factory(const syncbn::Communicator& comm,
                                         torch::Device device) {
  return [comm, device](int64_t features, int spatial_dims) {
    check_spatial_dims(spatial_dims);
    return nn::AnyModule(SyncBatchNorm(comm, SyncBatchNormOptions(features).device(device)));
  };
}

BatchNormFactory torch_batch_norm_factory() {
  return [](int64_t features, int spatial_dims) {
    check_spatial_dims(spatial_dims);
    return spatial_dims == 0 ? nn::AnyModule(nn::BatchNorm1d(features))
                             : nn::AnyModule(nn::BatchNorm2d(features));
  };
}

nn::Sequential make_model(const std::string& name, const BatchNormFactory& batch_norm) {
  if (name == "mlp") return make_mlp(batch_norm);
  if (name == "cnn") return make_cnn(batch_norm);
  throw std::invalid_argument("unknown model \"" + name + "\" (expected mlp or cnn)");
}

}  // namespace syncbn_examples
