#include "core/plan.hpp"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>

#include "core/error.hpp"
#include "core/finalize.hpp"

namespace syncbn::core {
namespace {

// Arrays of C values of the parameter type in a plan's scratch.
constexpr int kScratchArrays = 6;
// C at most this, so that the packed buffer's count fits the int of MPI_Allreduce.
constexpr std::int64_t kMaxFeatures = (std::numeric_limits<int>::max() - 64) / 2;
// Fields every rank must agree on at plan creation, in this order.
constexpr int kConfigFields = 9;
constexpr const char* kConfigFieldNames[kConfigFields] = {
    "num_features", "dtype", "layout", "device", "eps", "momentum",
    "affine", "track_running_stats", "global_param_grads"};

std::uint64_t bits_of(double v) {
  if (std::isnan(v)) v = std::numeric_limits<double>::quiet_NaN();  // one NaN for "unset"
  std::uint64_t b = 0;
  std::memcpy(&b, &v, sizeof b);
  return b;
}

// A 64-bit mix (splitmix64 finalizer), used to fold values into the 48 bits that travel.
std::uint64_t mix(std::uint64_t h) {
  h ^= h >> 30;
  h *= 0xbf58476d1ce4e5b9ULL;
  h ^= h >> 27;
  h *= 0x94d049bb133111ebULL;
  return h ^ (h >> 31);
}

void config_fields(const syncbn_config_t& c, std::uint64_t out[kConfigFields]) {
  constexpr std::uint64_t k48 = (std::uint64_t{1} << 48) - 1;
  out[0] = static_cast<std::uint64_t>(c.num_features) & k48;
  out[1] = static_cast<std::uint64_t>(c.dtype) & k48;
  out[2] = static_cast<std::uint64_t>(c.layout) & k48;
  out[3] = static_cast<std::uint64_t>(c.device) & k48;
  out[4] = mix(bits_of(c.eps)) & k48;
  out[5] = mix(bits_of(c.momentum)) & k48;
  out[6] = c.affine != 0;
  out[7] = c.track_running_stats != 0;
  out[8] = c.global_param_grads != 0;
}

// The shortest decimal that reads back as v ("1e-05", not "0.000010").
std::string exact(double v) {
  char text[32];
  for (int digits = 6; digits <= 17; ++digits) {
    std::snprintf(text, sizeof text, "%.*g", digits, v);
    if (std::strtod(text, nullptr) == v) break;
  }
  return text;
}

std::string field_value(const syncbn_config_t& c, int field) {
  switch (field) {
    case 0: return std::to_string(c.num_features);
    case 1: return std::to_string(static_cast<int>(c.dtype));
    case 2: return std::to_string(static_cast<int>(c.layout));
    case 3: return std::to_string(static_cast<int>(c.device));
    case 4: return exact(c.eps);
    case 5: return std::isnan(c.momentum) ? "cumulative" : exact(c.momentum);
    case 6: return std::to_string(c.affine != 0);
    case 7: return std::to_string(c.track_running_stats != 0);
    default: return std::to_string(c.global_param_grads != 0);
  }
}

syncbn_config_t normalized(const syncbn_config_t& c) {
  syncbn_config_t n = c;
  n.affine = c.affine != 0;
  n.track_running_stats = c.track_running_stats != 0;
  n.global_param_grads = c.global_param_grads != 0;
  if (std::isnan(n.momentum)) n.momentum = SYNCBN_MOMENTUM_CUMULATIVE;
  return n;
}


template <class T>
const T* as(const void* p) {
  return static_cast<const T*>(p);
}
template <class T>
T* as(void* p) {
  return static_cast<T*>(p);
}

}  // namespace

void require(ArgError& err, bool ok, Arg arg, Problem problem) {
  if (!err && !ok) err = {arg, problem, {}};
}

void fail_local(int rank, const ArgError& err) {
  fail(status_of(err.problem), "rank " + std::to_string(rank) + ": " +
                                   describe(err.arg, err.problem) +
                                   (err.detail.empty() ? "" : " (" + err.detail + ")"));
}

ArgError validate_config(const syncbn_config_t& c) {
  ArgError err;
  require(err, c.num_features > 0, Arg::num_features, Problem::not_positive);
  require(err, c.dtype >= SYNCBN_FLOAT32 && c.dtype <= SYNCBN_BFLOAT16, Arg::dtype,
          Problem::invalid_enum);
  require(err, c.layout == SYNCBN_CHANNELS_FIRST || c.layout == SYNCBN_CHANNELS_LAST,
          Arg::layout, Problem::invalid_enum);
  require(err, c.device == SYNCBN_DEVICE_CPU || c.device == SYNCBN_DEVICE_CUDA, Arg::device,
          Problem::invalid_enum);
  require(err, c.eps > 0.0 && std::isfinite(c.eps), Arg::eps, Problem::not_positive);
  require(err, std::isnan(c.momentum) || (c.momentum >= 0.0 && c.momentum <= 1.0), Arg::momentum,
          Problem::out_of_range);
  require(err, c.num_features <= kMaxFeatures, Arg::num_features, Problem::overflow);
  // Valid requests this build cannot serve: 16-bit data is CUDA-only.
#ifdef SYNCBN_HAVE_CUDA
  constexpr bool kHaveCuda = true;
#else
  constexpr bool kHaveCuda = false;
#endif
  require(err, c.device == SYNCBN_DEVICE_CPU || kHaveCuda, Arg::device, Problem::unsupported);
  require(err,
          c.dtype == SYNCBN_FLOAT32 || c.dtype == SYNCBN_FLOAT64 || c.device == SYNCBN_DEVICE_CUDA,
          Arg::dtype, Problem::unsupported);
  return err;
}

std::unique_ptr<Plan> Plan::create(std::shared_ptr<comm::Communicator> comm,
                                   const syncbn_config_t* config, bool plan_out_null,
                                   bool out_of_memory) {
  ArgError err;
  require(err, config != nullptr, Arg::config);
  require(err, !plan_out_null, Arg::plan);
  if (!err) err = validate_config(*config);
  const syncbn_config_t c = config != nullptr ? normalized(*config) : syncbn_config_t{};

  std::uint64_t fields[kConfigFields];
  config_fields(c, fields);
  const std::uint32_t serial = comm->next_plan_serial();
  std::uint64_t tag = mix(serial);
  for (std::uint64_t f : fields) tag = mix(tag ^ f);

  // Allocate before the collective: a rank that runs out of memory must say so in it.
  std::unique_ptr<Plan> plan;
  require(err, !out_of_memory, Arg::memory, Problem::out_of_memory);
  if (!err) {
    try {
      plan.reset(new Plan(comm, c, tag, serial));
    } catch (const std::bad_alloc&) {
      err = {Arg::memory, Problem::out_of_memory, {}};
    }
  }
#ifdef SYNCBN_HAVE_CUDA
  if (!err && c.device == SYNCBN_DEVICE_CUDA) err = plan->init_cuda();
#endif

  double buffer[kErrorSlots + kConfigFields * kAgree48Slots];
  put_error_record(buffer, comm->rank(), err);
  for (int i = 0; i < kConfigFields; ++i) {
    put_agree48(buffer + kErrorSlots + i * kAgree48Slots, fields[i]);
  }
  with_context("syncbn_plan_create", [&] { comm->allreduce_sum(buffer, sizeof buffer / sizeof buffer[0]); });

  check_error_record(buffer, comm->size(), comm->rank(), err);
  for (int i = 0; i < kConfigFields; ++i) {
    if (!agreed48(buffer + kErrorSlots + i * kAgree48Slots, comm->size())) {
      fail(SYNCBN_ERROR_CONFIG_MISMATCH, std::string(kConfigFieldNames[i]) +
                                             " differs across ranks (rank " +
                                             std::to_string(comm->rank()) + " has " +
                                             field_value(c, i) + ")");
    }
  }
  return plan;
}

Plan::~Plan() {
  // On a broken communicator an abandoned collective may still write the plan's device memory
  // (CUDA-aware MPI) or use it (NCCL kernels): keep it for the rest of the process.
  if (device_ && comm_->broken()) comm::keep_forever(std::shared_ptr<DeviceResources>(std::move(device_)));
}

std::string Plan::label() const {
  return name_.empty() ? "plan #" + std::to_string(serial_) : "plan '" + name_ + "'";
}

Plan::Plan(std::shared_ptr<comm::Communicator> comm, const syncbn_config_t& config,
           std::uint64_t tag, std::uint32_t serial)
    : comm_(std::move(comm)), config_(config), tag_(tag), serial_(serial) {
  if (config_.device == SYNCBN_DEVICE_CUDA) return;  // init_cuda allocates on the device
  const auto C = static_cast<std::size_t>(config_.num_features);
  buffer_.assign(kGuardSlots + 2 * C + 1, 0.0);
  local_.assign(2 * C, 0.0);
  if (config_.dtype == SYNCBN_FLOAT64) {
    scratch64_.assign(kScratchArrays * C, 0.0);
  } else {
    scratch32_.assign(kScratchArrays * C, 0.0f);
  }
  cpu::reserve_workspace(workspace_, config_.num_features);
}

template <class T>
T* Plan::scratch(int i) {
  const auto offset = static_cast<std::size_t>(i) * static_cast<std::size_t>(config_.num_features);
  if constexpr (std::is_same_v<T, double>) {
    return scratch64_.data() + offset;
  } else {
    return scratch32_.data() + offset;
  }
}

ArgError Plan::check_shape(const TensorShape& shape, cpu::Geometry* g) const {
  *g = cpu::Geometry{0, config_.num_features, 1};
  ArgError err;
  require(err, shape.ndim >= 2 && shape.ndim <= 5, Arg::ndim, Problem::ndim_range);
  require(err, shape.dims != nullptr, Arg::shape);
  if (err) {
    if (err.arg == Arg::ndim) err.detail = "ndim = " + std::to_string(shape.ndim);
    return err;
  }
  const int channel_dim = config_.layout == SYNCBN_CHANNELS_LAST ? shape.ndim - 1 : 1;
  std::int64_t spatial = 1;
  for (int d = 0; d < shape.ndim; ++d) {
    const std::int64_t n = shape.dims[d];
    if (n < 0) {
      return {Arg::shape, Problem::negative,
              "shape[" + std::to_string(d) + "] = " + std::to_string(n)};
    }
    if (d == channel_dim) {
      if (n != config_.num_features) {
        return {Arg::shape, Problem::channels,
                "shape[" + std::to_string(d) + "] = " + std::to_string(n) +
                    ", num_features = " + std::to_string(config_.num_features)};
      }
    } else if (d != 0) {
      if (n != 0 && spatial > std::numeric_limits<std::int64_t>::max() / n) {
        return {Arg::shape, Problem::overflow, {}};
      }
      spatial *= n;
    }
  }
  const std::int64_t N = shape.dims[0];
  const std::int64_t C = config_.num_features;
  if (spatial != 0 && N > std::numeric_limits<std::int64_t>::max() / C / spatial) {
    return {Arg::shape, Problem::overflow, {}};
  }
  if (config_.layout == SYNCBN_CHANNELS_LAST || shape.ndim == 2) {
    *g = cpu::Geometry{N * spatial, C, 1};
  } else {
    *g = cpu::Geometry{N, C, spatial};
  }
  return err;
}

ArgError Plan::check_forward(const ForwardArgs& a, bool track, cpu::Geometry* g,
                             std::int64_t* count) const {
  ArgError err = a.rejected ? *a.rejected : check_shape(a.shape, g);
  *count = err ? 0 : g->count_per_channel();
  require(err, *count == 0 || a.x != nullptr, Arg::x);
  require(err, *count == 0 || a.y != nullptr, Arg::y);
  require(err, !config_.affine || a.weight != nullptr, Arg::weight);
  require(err, !config_.affine || a.bias != nullptr, Arg::bias);
  require(err, a.stream == nullptr || config_.device == SYNCBN_DEVICE_CUDA, Arg::stream,
          Problem::not_null);
  require(err, !track || a.running_mean != nullptr, Arg::running_mean);
  require(err, !track || a.running_var != nullptr, Arg::running_var);
  require(err, !track || !std::isnan(config_.momentum) || a.num_batches_tracked != nullptr,
          Arg::num_batches_tracked);
  return err;
}

ArgError Plan::check_backward(const BackwardArgs& a, cpu::Geometry* g, std::int64_t* count) const {
  ArgError err = a.rejected ? *a.rejected : check_shape(a.shape, g);
  *count = err ? 0 : g->count_per_channel();
  require(err, *count == 0 || a.x != nullptr, Arg::x);
  require(err, *count == 0 || a.dy != nullptr, Arg::dy);
  require(err, *count == 0 || a.dx != nullptr, Arg::dx);
  require(err, !config_.affine || a.weight != nullptr, Arg::weight);
  require(err, a.save_mean != nullptr, Arg::save_mean);
  require(err, a.save_invstd != nullptr, Arg::save_invstd);
  require(err, a.stream == nullptr || config_.device == SYNCBN_DEVICE_CUDA, Arg::stream,
          Problem::not_null);
  return err;
}

void Plan::exchange(std::size_t data_slots, const ArgError& mine, Op op) {
  if (!collective(op)) {
    if (mine) fail_local(comm_->rank(), mine);
    return;
  }
  const Fingerprint fp = next_fingerprint(op);
  put_guards(buffer_.data(), comm_->rank(), mine, fp);
  collective_call(fp, [&] { comm_->allreduce_sum(buffer_.data(), kGuardSlots + data_slots); });
  check_guards(buffer_.data(), comm_->size(), comm_->rank(), mine, fp);
}

template <class F>
void Plan::local_phase(ArgError& err, F&& compute) {
  if (err) return;
  try {
    compute();
  } catch (const std::bad_alloc&) {  // the workspace grew with the thread count
    err = {Arg::memory, Problem::out_of_memory, {}};
  }
}

template <class T>
void Plan::forward_batch_stats(const ForwardArgs& a, Op op) {
  const std::int64_t C = config_.num_features;
  const bool track = op == Op::forward_training && config_.track_running_stats;

  cpu::Geometry g;
  std::int64_t count = 0;
  ArgError err = check_forward(a, track, &g, &count);
  require(err, !track || a.num_batches_tracked == nullptr || *a.num_batches_tracked >= 0,
          Arg::num_batches_tracked, Problem::negative);
  require(err,
          !track || a.num_batches_tracked == nullptr ||
              *a.num_batches_tracked < std::numeric_limits<std::int64_t>::max(),
          Arg::num_batches_tracked, Problem::overflow);  // it is incremented

  // [guards | sum x (C) | sum x^2 (C) | m]; a failing rank contributes zeros and its flag.
  double* const sum = buffer_.data() + kGuardSlots;
  double* const sumsq = sum + C;
  std::fill(sum, sum + 2 * C, 0.0);
  if (count > 0) {
    local_phase(err, [&] {
      // Shift each channel by its first local value (outer index 0), undo the shift in fp64.
      T* const data_shift = scratch<T>(5);
      for (std::int64_t c = 0; c < C; ++c) data_shift[c] = as<T>(a.x)[c * g.inner];
      cpu::reduce_moments(g, as<T>(a.x), data_shift, sum, sumsq, workspace_);
      for (std::int64_t c = 0; c < C; ++c) {
        unshift_moments(sum[c], sumsq[c], static_cast<double>(count), data_shift[c]);
      }
    });
  }
  sum[2 * C] = err ? 0.0 : static_cast<double>(count);
  exchange(2 * C + 1, err, op);

  const double m = sum[2 * C];
  if (!collective(op) && m == 0.0) return;  // this rank's empty batch: nothing to normalize
  check_batch_count(m, track);

  // Nothing can fail from here on: write saved statistics, y and running statistics.
  T* const save_mean = a.save_mean ? as<T>(a.save_mean) : scratch<T>(0);
  T* const save_invstd = a.save_invstd ? as<T>(a.save_invstd) : scratch<T>(1);
  T* const center = scratch<T>(2);
  T* const scale = scratch<T>(3);
  T* const shift = scratch<T>(4);
  const T* const weight = as<T>(a.weight);
  const T* const bias = as<T>(a.bias);
  T* const running_mean = as<T>(a.running_mean);
  T* const running_var = as<T>(a.running_var);
  const double factor =
      track ? running_factor(config_.momentum,
                             a.num_batches_tracked ? *a.num_batches_tracked + 1 : 0)
            : 0.0;
  for (std::int64_t c = 0; c < C; ++c) {
    const Moments mo = moments_from_sums(sum[c], sumsq[c], m, config_.eps);
    save_mean[c] = static_cast<T>(mo.mean);
    save_invstd[c] = static_cast<T>(mo.invstd);
    const AffineCoefficients<T> co = affine_coefficients<T>(
        mo.mean, mo.invstd, config_.affine ? weight[c] : 1.0, config_.affine ? bias[c] : 0.0);
    center[c] = co.center;
    scale[c] = co.scale;
    shift[c] = co.shift;
    if (track) update_running(running_mean[c], running_var[c], mo, m, factor);
  }
  if (count > 0) cpu::affine(g, as<T>(a.x), center, scale, shift, as<T>(a.y));
  if (track && a.num_batches_tracked != nullptr) ++*a.num_batches_tracked;
}

template <class T>
void Plan::forward_running_stats(const ForwardArgs& a) {
  const std::int64_t C = config_.num_features;
  cpu::Geometry g;
  std::int64_t count = 0;
  ArgError err = check_forward(a, false, &g, &count);
  require(err, a.running_mean != nullptr, Arg::running_mean);
  require(err, a.running_var != nullptr, Arg::running_var);
  if (err) fail_local(comm_->rank(), err);  // no collective here: nobody else waits

  T* const center = scratch<T>(2);
  T* const scale = scratch<T>(3);
  T* const shift = scratch<T>(4);
  const T* const weight = as<T>(a.weight);
  const T* const bias = as<T>(a.bias);
  const T* const running_mean = as<T>(a.running_mean);
  const T* const running_var = as<T>(a.running_var);
  for (std::int64_t c = 0; c < C; ++c) {
    const double invstd = 1.0 / std::sqrt(static_cast<double>(running_var[c]) + config_.eps);
    const AffineCoefficients<T> co =
        affine_coefficients<T>(running_mean[c], invstd, config_.affine ? weight[c] : 1.0,
                               config_.affine ? bias[c] : 0.0);
    center[c] = co.center;
    scale[c] = co.scale;
    shift[c] = co.shift;
  }
  if (count > 0) cpu::affine(g, as<T>(a.x), center, scale, shift, as<T>(a.y));
}

template <class T>
void Plan::backward_typed(const BackwardArgs& a) {
  const std::int64_t C = config_.num_features;
  cpu::Geometry g;
  std::int64_t count = 0;
  ArgError err = check_backward(a, &g, &count);

  const T* const save_mean = as<T>(a.save_mean);
  const T* const save_invstd = as<T>(a.save_invstd);
  // [guards | sum dy (C) | sum dy (x - mean) (C) | m]
  double* const sum_g = buffer_.data() + kGuardSlots;
  double* const sum_gx = sum_g + C;
  std::fill(sum_g, sum_g + 2 * C, 0.0);
  if (count > 0) {
    local_phase(err, [&] {
      cpu::reduce_grad(g, as<T>(a.x), as<T>(a.dy), save_mean, sum_g, sum_gx, workspace_);
    });
  }
  sum_g[2 * C] = err ? 0.0 : static_cast<double>(count);
  const bool param_grads = config_.affine && (a.dweight != nullptr || a.dbias != nullptr);
  if (param_grads && !config_.global_param_grads) std::copy(sum_g, sum_g + 2 * C, local_.begin());
  exchange(2 * C + 1, err, Op::backward);

  const double m = sum_g[2 * C];
  check_batch_count(m, false);

  T* const center = scratch<T>(0);
  T* const ka = scratch<T>(1);
  T* const kk = scratch<T>(2);
  T* const kd = scratch<T>(3);
  const T* const weight = as<T>(a.weight);
  for (std::int64_t c = 0; c < C; ++c) {
    const BackwardCoefficients<T> co =
        backward_coefficients<T>(save_mean[c], save_invstd[c], config_.affine ? weight[c] : 1.0,
                                 sum_g[c], sum_gx[c], m);
    center[c] = co.center;
    ka[c] = co.a;
    kk[c] = co.k;
    kd[c] = co.d;
  }
  if (count > 0) cpu::backward_elemt(g, as<T>(a.x), as<T>(a.dy), center, ka, kk, kd, as<T>(a.dx));
  if (param_grads) {
    const double* const src = config_.global_param_grads ? sum_g : local_.data();
    for (std::int64_t c = 0; c < C; ++c) {
      if (a.dweight) as<T>(a.dweight)[c] = static_cast<T>(src[C + c] * save_invstd[c]);
      if (a.dbias) as<T>(a.dbias)[c] = static_cast<T>(src[c]);
    }
  }
}

#ifdef SYNCBN_HAVE_CUDA
#define SYNCBN_ON_CUDA(call)                                     \
  if (config_.device == SYNCBN_DEVICE_CUDA) {                    \
    call;                                                        \
    return;                                                      \
  }
#else
#define SYNCBN_ON_CUDA(call)
#endif

void Plan::forward_training(const ForwardArgs& args) {
  comm_->check_usable();
  SYNCBN_ON_CUDA(cuda_forward_batch_stats(args, Op::forward_training))
  if (config_.dtype == SYNCBN_FLOAT64) {
    forward_batch_stats<double>(args, Op::forward_training);
  } else {
    forward_batch_stats<float>(args, Op::forward_training);
  }
}

void Plan::forward_inference(const ForwardArgs& args) {
  comm_->check_usable();
  const bool f64 = config_.dtype == SYNCBN_FLOAT64;
  if (args.rejected) fail_local(comm_->rank(), *args.rejected);  // never collective
  if (!config_.track_running_stats) {
    SYNCBN_ON_CUDA(cuda_forward_batch_stats(args, Op::forward_inference))
    ForwardArgs batch = args;  // this rank's batch statistics, nothing saved
    batch.save_mean = batch.save_invstd = nullptr;
    if (f64) {
      forward_batch_stats<double>(batch, Op::forward_inference);
    } else {
      forward_batch_stats<float>(batch, Op::forward_inference);
    }
  } else if (config_.device == SYNCBN_DEVICE_CUDA) {
    SYNCBN_ON_CUDA(cuda_forward_running_stats(args))
  } else if (f64) {
    forward_running_stats<double>(args);
  } else {
    forward_running_stats<float>(args);
  }
}

void Plan::backward(const BackwardArgs& args) {
  comm_->check_usable();
  SYNCBN_ON_CUDA(cuda_backward(args))
  if (config_.dtype == SYNCBN_FLOAT64) {
    backward_typed<double>(args);
  } else {
    backward_typed<float>(args);
  }
}

void Plan::reject_call(Op op, const ArgError& err, void* stream) {
  if (op == Op::backward) {
    BackwardArgs args;
    args.stream = stream;
    args.rejected = &err;
    backward(args);
  } else {
    ForwardArgs args;
    args.stream = stream;
    args.rejected = &err;
    if (op == Op::forward_training) {
      forward_training(args);
    } else {
      forward_inference(args);
    }
  }
  fail(SYNCBN_ERROR_INTERNAL, "a rejected call did not fail");
}

syncbn_status_t Plan::async_error(void* stream) {
#ifdef SYNCBN_HAVE_CUDA
  if (config_.device == SYNCBN_DEVICE_CUDA) return cuda_async_error(stream);
#endif
  (void)stream;
  return SYNCBN_SUCCESS;  // CPU plans report every error from the call itself
}

}  // namespace syncbn::core
