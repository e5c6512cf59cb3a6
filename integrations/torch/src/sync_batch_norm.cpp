#include "syncbn/torch/sync_batch_norm.hpp"

#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "syncbn/torch/cuda_device.hpp"

namespace syncbn_torch {
namespace {


using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// What the autograd function needs besides its differentiable inputs. Passed by value, so it is
// not an autograd input; the running statistics are updated in place by the library.
struct TrainingState {
  syncbn::BatchNorm plan;
  syncbn_activation_t activation;  // the plan's
  int64_t num_features;
  torch::Tensor running_mean;         // undefined when !track_running_stats
  torch::Tensor running_var;          // undefined when !track_running_stats
  torch::Tensor num_batches_tracked;  // undefined when !track_running_stats
};

// Keeps the layer's plan alive in the autograd graph (AutogradContext::saved_data holds IValues).
struct PlanHolder : torch::CustomClassHolder {
  explicit PlanHolder(syncbn::BatchNorm p) : plan(std::move(p)) {}
  syncbn::BatchNorm plan;
};

void* data_or_null(const torch::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

void* data_or_null(const c10::optional<torch::Tensor>& t) {
  return t.has_value() ? data_or_null(*t) : nullptr;
}

int64_t* counter_or_null(const torch::Tensor& t) {
  return t.defined() ? t.data_ptr<int64_t>() : nullptr;
}

std::vector<int64_t> shape_of(const torch::Tensor& t) { return t.sizes().vec(); }

// Batch norm over the ranks of a plan, with the plan's activation, through the C API's named-
// argument calls (syncbn::BatchNorm's overloads taking syncbn_forward_args_t and
// syncbn_backward_args_t) for every layer, activation NONE included. x (and z, the residual of
// SYNCBN_ACTIVATION_ADD_RELU, undefined otherwise) are contiguous in the plan's layout, with the
// shape the plan expects ((N, C, *spatial) or (N, *spatial, C)). z is optional (autograd takes no
// undefined Tensor as input); when given it is autograd input 1, after x (needs_input_grad(1)).
class SyncBatchNormFunction : public torch::autograd::Function<SyncBatchNormFunction> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x,
                               const c10::optional<torch::Tensor>& z,
                               const c10::optional<torch::Tensor>& weight,
                               const c10::optional<torch::Tensor>& bias,
                               const TrainingState& state) {
    // Parameters and statistics have the data's dtype (float32 or float64). With an activation
    // the forward also writes the relu's mask (y > 0, a bool per element, in x's memory order:
    // x is contiguous), which backward reads instead of y: a quarter of y's bytes (fp32).
    const bool fused = state.activation != SYNCBN_ACTIVATION_NONE;
    torch::Tensor y = torch::empty_like(x);
    torch::Tensor mask = fused ? torch::empty(x.sizes(), x.options().dtype(torch::kBool))
                               : torch::Tensor();
    torch::Tensor save_mean = torch::empty({state.num_features}, x.options());
    torch::Tensor save_invstd = torch::empty({state.num_features}, x.options());
    const std::vector<int64_t> shape = shape_of(x);
    syncbn_forward_args_t args{};
    args.ndim = static_cast<int>(shape.size());
    args.shape = shape.data();
    args.x = x.data_ptr();
    args.z = data_or_null(z);
    args.weight = data_or_null(weight);
    args.bias = data_or_null(bias);
    args.y = y.data_ptr();
    args.save_mean = save_mean.data_ptr();
    args.save_invstd = save_invstd.data_ptr();
    args.running_mean = data_or_null(state.running_mean);
    args.running_var = data_or_null(state.running_var);
    args.num_batches_tracked = counter_or_null(state.num_batches_tracked);
    args.mask = data_or_null(mask);
    syncbn::BatchNorm plan = state.plan;
    const CudaDeviceScope device(x.device());
    plan.forward_training(args);
    ctx->save_for_backward({x, weight.value_or(torch::Tensor()), save_mean, save_invstd, mask});
    ctx->saved_data["plan"] = c10::IValue::make_capsule(c10::make_intrusive<PlanHolder>(plan));
    ctx->saved_data["dz"] = z.has_value();  // ADD_RELU with its residual
    return y;
  }

  // Returns dx, dz (ADD_RELU, where z needs it; else undefined) and this rank's dweight, dbias
  // (undefined when the layer has no affine parameters), and nothing for the state.
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const torch::Tensor& x = saved[0];
    const torch::Tensor& weight = saved[1];
    const torch::Tensor& save_mean = saved[2];
    const torch::Tensor& save_invstd = saved[3];
    const torch::Tensor& mask = saved[4];  // undefined without an activation
    syncbn::BatchNorm plan =
        c10::static_intrusive_pointer_cast<PlanHolder>(ctx->saved_data["plan"].toCapsule())->plan;

    // Every rank must enter the collective, whatever gradient reached it.
    const torch::Tensor dy = grad_outputs[0].defined() ? grad_outputs[0].contiguous()
                                                      : torch::zeros_like(x);
    torch::Tensor dx = torch::empty_like(x);
    torch::Tensor dweight, dbias, dz;
    if (weight.defined()) {
      dweight = torch::empty_like(save_mean);
      dbias = torch::empty_like(save_mean);
    }
    if (ctx->saved_data["dz"].toBool() && ctx->needs_input_grad(1)) dz = torch::empty_like(x);
    const std::vector<int64_t> shape = shape_of(x);
    syncbn_backward_args_t args{};
    args.ndim = static_cast<int>(shape.size());
    args.shape = shape.data();
    args.x = x.data_ptr();
    args.mask = data_or_null(mask);
    args.dy = dy.data_ptr();
    args.weight = data_or_null(weight);
    args.save_mean = save_mean.data_ptr();
    args.save_invstd = save_invstd.data_ptr();
    args.dx = dx.data_ptr();
    args.dz = data_or_null(dz);
    args.dweight = data_or_null(dweight);
    args.dbias = data_or_null(dbias);
    const CudaDeviceScope device(x.device());
    plan.backward(args);
    return {dx, dz, dweight, dbias, torch::Tensor()};
  }
};

bool moves_channels(bool channels_last, const torch::Tensor& t) {
  return channels_last && t.dim() > 2;
}

// (N, C, *spatial) -> contiguous in the plan's layout. For channels-last input (strides of
// torch::MemoryFormat::ChannelsLast) the movedim is already contiguous and nothing is copied.
torch::Tensor to_plan_layout(const torch::Tensor& input, bool channels_last) {
  return moves_channels(channels_last, input) ? input.movedim(1, -1).contiguous()
                                              : input.contiguous();
}

// The inverse view: the plan's layout -> logical (N, C, *spatial).
torch::Tensor from_plan_layout(const torch::Tensor& t, bool channels_last) {
  return moves_channels(channels_last, t) ? t.movedim(-1, 1) : t;
}

std::string describe(const torch::Tensor& t) {
  std::ostringstream s;
  s << t.scalar_type() << " " << t.sizes() << " on " << t.device();
  return s.str();
}

syncbn_config_t make_plan_config(const SyncBatchNormOptions& o, torch::Dtype dtype,
                                 const torch::Device& device, syncbn_activation_t activation) {
  syncbn_config_t config = syncbn::make_config(
      o.num_features(), dtype == torch::kFloat64 ? SYNCBN_FLOAT64 : SYNCBN_FLOAT32);
  config.device = device.is_cuda() ? SYNCBN_DEVICE_CUDA : SYNCBN_DEVICE_CPU;
  config.eps = o.eps();
  config.momentum = o.momentum().has_value() ? *o.momentum() : SYNCBN_MOMENTUM_CUMULATIVE;
  config.affine = o.affine() ? 1 : 0;
  config.track_running_stats = o.track_running_stats() ? 1 : 0;
  config.layout = o.channels_last() ? SYNCBN_CHANNELS_LAST : SYNCBN_CHANNELS_FIRST;
  config.activation = activation;
  return config;
}

// The device of a layer, with the index made explicit for CUDA (the current device if none).
torch::Device layer_device(const torch::Device& requested) {
  if (requested.is_cpu()) return requested;
  TORCH_CHECK(requested.is_cuda(), "SyncBatchNorm: CPU or CUDA devices only, got ", requested);
  require_cuda("SyncBatchNorm on " + requested.str());
  return torch::Device(torch::kCUDA, requested.has_index()
                                         ? requested.index()
                                         : static_cast<c10::DeviceIndex>(cuda_current_device()));
}

// COLLECTIVE over comm. The plan of a layer for dtype (float32 or float64) on device; CUDA plans
// belong to the device current at their creation.
syncbn::BatchNorm make_plan(const syncbn::Communicator& comm, const SyncBatchNormOptions& o,
                            torch::Dtype dtype, const torch::Device& device,
                            syncbn_activation_t activation) {
  const CudaDeviceScope scope(device);
  return syncbn::BatchNorm(comm, make_plan_config(o, dtype, device, activation));
}

}  // namespace


// One plan per layer. A plan has a fixed dtype, and the module takes float32 or float64 data, so
// it used to make both plans at construction and pick one per call by the input's dtype: twice
// the plan memory and the creation collectives of every layer, for a dtype most layers never
// see. Instead the layer's dtype is state, as its parameters' dtype is: float32 at construction,
// and to() makes the plan for a new dtype (collectively, as construction does) when it changes
// (set_dtype). Input of another dtype, which used to select the other plan (and, where ranks
// differed, a call mismatch on every rank), is now rejected collectively by that rank
// (check_arguments), so every rank still fails the call alike.
SyncBatchNormImpl::SyncBatchNormImpl(const syncbn::Communicator& comm,
                                     const SyncBatchNormOptions& options)
    : SyncBatchNormImpl(comm, options, SYNCBN_ACTIVATION_NONE, "SyncBatchNorm") {}

SyncBatchNormImpl::SyncBatchNormImpl(const syncbn::Communicator& comm,
                                     const SyncBatchNormOptions& options,
                                     syncbn_activation_t activation, const char* name)
    : activation_(activation),
      name_(name),
      options_(options),
      device_(layer_device(options.device())),
      comm_(comm) {
  options_.device(device_);
  plan_ = make_plan(comm_, options_, dtype_, device_, activation_);
  const int64_t c = options_.num_features();
  // float32 whatever torch's default dtype: the plan's (to() changes both together).
  const auto on_device = torch::TensorOptions().device(device_).dtype(dtype_);
  if (options_.affine()) {
    weight = register_parameter("weight", torch::ones({c}, on_device));
    bias = register_parameter("bias", torch::zeros({c}, on_device));
  } else {
    weight = register_parameter("weight", torch::Tensor(), /*requires_grad=*/false);
    bias = register_parameter("bias", torch::Tensor(), /*requires_grad=*/false);
  }
  if (options_.track_running_stats()) {
    running_mean = register_buffer("running_mean", torch::zeros({c}, on_device));
    running_var = register_buffer("running_var", torch::ones({c}, on_device));
    num_batches_tracked = register_buffer(
        "num_batches_tracked", torch::tensor(int64_t{0}, on_device.dtype(torch::kInt64)));
  } else {
    running_mean = register_buffer("running_mean", torch::Tensor());
    running_var = register_buffer("running_var", torch::Tensor());
    num_batches_tracked = register_buffer("num_batches_tracked", torch::Tensor());
  }
}

// The plan for dtype replaces the current one when dtype is float32 or float64 and not the
// layer's already. COLLECTIVE then. Throws before changing anything: the current plan's recorded
// device errors (they would be lost with it), or the group's plan creation error.
void SyncBatchNormImpl::set_dtype(torch::Dtype dtype) {
  if (dtype == dtype_ || (dtype != torch::kFloat32 && dtype != torch::kFloat64)) return;
  // The new plan first: its creation is collective, and no rank may throw before it (the old
  // plan's recorded errors are this rank's). Then the old plan's errors, reported on this rank
  // once the layer has its new dtype on every rank.
  syncbn::BatchNorm old =
      std::exchange(plan_, make_plan(comm_, options_, dtype, device_, activation_));
  dtype_ = dtype;
#ifdef SYNCBN_TORCH_CUDA
  if (device_.is_cuda()) {
    const CudaDeviceScope device(device_);
    old.check_async_error();
  }
#endif
}

// libtorch's Module::to(dtype) converts every buffer, the int64 batch counter too (PyTorch's
// converts floating-point tensors only): it is put back at once, so that a state_dict taken
// after to() still holds an int64 counter.
void SyncBatchNormImpl::keep_counter_int64() {
  if (num_batches_tracked.defined() && num_batches_tracked.scalar_type() != torch::kInt64) {
    num_batches_tracked.set_data(num_batches_tracked.to(torch::kInt64));
  }
}

void SyncBatchNormImpl::to(torch::Device device, torch::Dtype dtype, bool non_blocking) {
  set_dtype(dtype);
  torch::nn::Module::to(device, dtype, non_blocking);
  keep_counter_int64();
}

void SyncBatchNormImpl::to(torch::Dtype dtype, bool non_blocking) {
  set_dtype(dtype);
  torch::nn::Module::to(dtype, non_blocking);
  keep_counter_int64();
}

void SyncBatchNormImpl::reset_running_stats() {
  if (!options_.track_running_stats()) return;
  torch::NoGradGuard no_grad;
  running_mean.zero_();
  running_var.fill_(1);
  num_batches_tracked.zero_();
}

void SyncBatchNormImpl::reset_parameters() {
  reset_running_stats();
  if (!options_.affine()) return;
  torch::NoGradGuard no_grad;
  weight.fill_(1);
  bias.zero_();
}

void SyncBatchNormImpl::pretty_print(std::ostream& stream) const {
  stream << name_ << "(" << options_.num_features() << ", eps=" << options_.eps()
         << ", momentum=";
  if (options_.momentum().has_value()) {
    stream << *options_.momentum();
  } else {
    stream << "None";
  }
  stream << ", affine=" << std::boolalpha << options_.affine()
         << ", track_running_stats=" << options_.track_running_stats()
         << ", channels_last=" << options_.channels_last();
  if (!device_.is_cpu()) stream << ", device=" << device_;
  stream << ")";
}

void SyncBatchNormImpl::check_async_error() {
#ifdef SYNCBN_TORCH_CUDA
  if (!device_.is_cuda()) return;
  const CudaDeviceScope device(device_);
  plan_.check_async_error();
#endif
}

void check_async_errors(torch::nn::Module& module) {
  for (const auto& item : module.named_modules(/*name_prefix=*/"", /*include_self=*/true)) {
    auto bn = std::dynamic_pointer_cast<SyncBatchNormImpl>(item.value());
    if (!bn) continue;
    try {
      bn->check_async_error();
    } catch (const syncbn::Error& e) {
      // e.what() is "STATUS: message"; the new Error puts the status in front again.
      std::string message = e.what();
      const std::string status = std::string(syncbn_status_string(e.status())) + ": ";
      if (message.compare(0, status.size(), status) == 0) message.erase(0, status.size());
      const std::string name = item.key().empty() ? "" : " " + item.key();
      throw syncbn::Error(e.status(), "SyncBatchNorm" + name + ": " + message);
    }
  }
}

// Checks that input, parameters and statistics are on the layer's device (locally: a rank
// throws here) and of the plan's dtype (collectively: a rank whose tensors are not takes part in
// the call as a rank that rejected its arguments, syncbn_plan_reject_call, so every rank fails
// it alike, SYNCBN_ERROR_INVALID_ARGUMENT naming that rank and tensor). The shape is NOT checked
// here: a rank throwing before the collective would leave its peers waiting in it. The library
// checks ndim and C inside the collective, so a bad shape on one rank fails on every rank with a
// message naming it. Only what would make the library read memory wrongly is refused locally.
void SyncBatchNormImpl::check_arguments(const torch::Tensor& input, const torch::Tensor& z) {
  TORCH_CHECK(input.device() == device_, name_, ": the layer is on ", device_,
              " but the input is ", describe(input),
              device_.is_cpu() ? "; for CUDA input construct the layer with "
                                 "SyncBatchNormOptions::device"
                               : "");
  TORCH_CHECK(!z.defined() || z.device() == device_, name_, ": the layer is on ", device_,
              " but the residual z is ", describe(z));
  for (const torch::Tensor* t :
       {&weight, &bias, &running_mean, &running_var, &num_batches_tracked}) {
    TORCH_CHECK(!t->defined() || t->device() == device_, "SyncBatchNorm: the layer's plan is "
                "for ", device_, " but its parameters/statistics are on ", t->device(),
                "; the layer cannot move between devices (set SyncBatchNormOptions::device)");
  }
  const syncbn_call_t call =
      is_training() ? SYNCBN_CALL_FORWARD_TRAINING : SYNCBN_CALL_FORWARD_INFERENCE;
  const std::pair<const char*, const torch::Tensor*> tensors[] = {
      {"x", &input},
      {"z", &z},
      {"weight", &weight},
      {"bias", &bias},
      {"running_mean", &running_mean},
      {"running_var", &running_var}};
  for (const auto& [name, t] : tensors) {
    if (!t->defined() || t->scalar_type() == dtype_) continue;
    std::ostringstream detail;
    detail << name_ << ": " << name << " is " << t->scalar_type() << " but the layer is "
           << dtype_ << "; pass input of the layer's dtype, or move the module with ->to(dtype) "
           << "(float32 or float64) on every rank";
    const CudaDeviceScope device(device_);
    plan_.reject_call(call, name, SYNCBN_PROBLEM_DTYPE, detail.str().c_str());
  }
  // The library sees x's shape only: a z of another shape is this rank's to reject.
  if (z.defined() && z.sizes() != input.sizes()) {
    std::ostringstream detail;
    detail << name_ << ": the residual z is " << describe(z) << ", the input " << describe(input);
    const CudaDeviceScope device(device_);
    plan_.reject_call(call, "z", SYNCBN_PROBLEM_SHAPE, detail.str().c_str());
  }
}

torch::Tensor SyncBatchNormImpl::forward(const torch::Tensor& input) {
  return forward_fused(input, torch::Tensor());
}

torch::Tensor SyncBatchNormImpl::forward_fused(const torch::Tensor& input, const torch::Tensor& z) {
  keep_counter_int64();  // a parent module's to(dtype) converts it without calling ours
  check_arguments(input, z);
  if (!is_training()) return forward_eval(input, z);
  const bool channels_last = options_.channels_last();
  const torch::Tensor x = to_plan_layout(input, channels_last);
  const torch::Tensor residual = z.defined() ? to_plan_layout(z, channels_last) : z;
  const auto optional_param = [](const torch::Tensor& t) {
    return t.defined() ? c10::optional<torch::Tensor>(t) : c10::nullopt;
  };
  const TrainingState state{plan_, activation_, options_.num_features(), running_mean,
                            running_var, num_batches_tracked};
  const torch::Tensor y = SyncBatchNormFunction::apply(
      x, optional_param(residual), optional_param(weight), optional_param(bias), state);
  return from_plan_layout(y, channels_last);
}

torch::Tensor SyncBatchNormImpl::forward_eval(const torch::Tensor& input, const torch::Tensor& z) {
  const bool needs_grad =
      input.requires_grad() || (weight.defined() && weight.requires_grad()) ||
      (bias.defined() && bias.requires_grad()) || (z.defined() && z.requires_grad());
  TORCH_CHECK(!(torch::GradMode::is_enabled() && needs_grad), name_,
              ": evaluation mode is not differentiable; evaluate under "
              "torch::NoGradGuard (or put the module in training mode)");
  const bool channels_last = options_.channels_last();
  const torch::Tensor x = to_plan_layout(input, channels_last);
  const torch::Tensor residual = z.defined() ? to_plan_layout(z, channels_last) : z;
  torch::Tensor y = torch::empty_like(x);
  const std::vector<int64_t> shape = shape_of(x);
  syncbn_forward_args_t args{};
  args.ndim = static_cast<int>(shape.size());
  args.shape = shape.data();
  args.x = x.data_ptr();
  args.z = data_or_null(residual);
  args.weight = data_or_null(weight);
  args.bias = data_or_null(bias);
  args.y = y.data_ptr();
  args.running_mean = data_or_null(running_mean);
  args.running_var = data_or_null(running_var);
  const CudaDeviceScope device(x.device());
  plan_.forward_inference(args);
  return from_plan_layout(y, channels_last);
}

SyncBatchNormReLUImpl::SyncBatchNormReLUImpl(const syncbn::Communicator& comm,
                                             const SyncBatchNormOptions& options)
    : SyncBatchNormImpl(comm, options, SYNCBN_ACTIVATION_RELU, "SyncBatchNormReLU") {}

SyncBatchNormAddReLUImpl::SyncBatchNormAddReLUImpl(const syncbn::Communicator& comm,
                                                   const SyncBatchNormOptions& options)
    : SyncBatchNormImpl(comm, options, SYNCBN_ACTIVATION_ADD_RELU, "SyncBatchNormAddReLU") {}

torch::Tensor SyncBatchNormAddReLUImpl::forward(const torch::Tensor& input,
                                                const torch::Tensor& z) {
  return forward_fused(input, z);
}

}  // namespace syncbn_torch
