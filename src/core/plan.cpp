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

// Ends a call on its backend when the call's scope ends, returned or thrown.
class CallEnd {
 public:
  CallEnd(Backend& backend, const Call& call) : backend_(backend), call_(call) {}
  ~CallEnd() { backend_.end_call(call_); }
  CallEnd(const CallEnd&) = delete;
  CallEnd& operator=(const CallEnd&) = delete;

 private:
  Backend& backend_;
  const Call& call_;
};

// C at most this, so that the packed buffer's count fits the int of MPI_Allreduce.
constexpr std::int64_t kMaxFeatures = (std::numeric_limits<int>::max() - 64) / 2;
// Fields every rank must agree on at plan creation, in this order.
constexpr int kConfigFields = 10;
constexpr const char* kConfigFieldNames[kConfigFields] = {
    "num_features", "dtype", "layout", "device", "eps", "momentum",
    "affine", "track_running_stats", "global_param_grads", "activation"};

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
  out[9] = static_cast<std::uint64_t>(c.activation) & k48;
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
    case 8: return std::to_string(c.global_param_grads != 0);
    default: return std::to_string(static_cast<int>(c.activation));
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

}  // namespace

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
  require(err,
          c.activation == SYNCBN_ACTIVATION_NONE || c.activation == SYNCBN_ACTIVATION_RELU ||
              c.activation == SYNCBN_ACTIVATION_ADD_RELU,
          Arg::activation, Problem::invalid_enum);
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
      std::unique_ptr<Backend> backend = c.device == SYNCBN_DEVICE_CUDA
                                             ? make_cuda_backend(c, *comm, err)
                                             : make_cpu_backend(c);
      // A CPU plan's calls sum its packed buffer in host memory: room for it now (NCCL).
      if (!err && c.device == SYNCBN_DEVICE_CPU && !comm->broken()) {
        comm->reserve_host(static_cast<std::size_t>(kGuardSlots + 2 * c.num_features + 1));
      }
      if (!err) plan.reset(new Plan(comm, c, tag, serial, std::move(backend)));
    } catch (const std::bad_alloc&) {
      err = {Arg::memory, Problem::out_of_memory, {}};
    } catch (const Failure& f) {
      if (f.status() != SYNCBN_ERROR_OUT_OF_MEMORY) throw;
      err = {Arg::memory, Problem::out_of_memory, f.what()};
    }
  }

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
  // On a broken communicator an abandoned collective may still write the backend's memory
  // (CUDA-aware MPI) or use it (NCCL kernels): keep it for the rest of the process.
  if (backend_ && backend_->exposed_to_transport() && comm_->broken()) {
    comm::keep_forever(std::shared_ptr<Backend>(std::move(backend_)));
  }
}

std::string Plan::label() const {
  return name_.empty() ? "plan #" + std::to_string(serial_) : "plan '" + name_ + "'";
}

Plan::Plan(std::shared_ptr<comm::Communicator> comm, const syncbn_config_t& config,
           std::uint64_t tag, std::uint32_t serial, std::unique_ptr<Backend> backend)
    : comm_(std::move(comm)), config_(config), tag_(tag), serial_(serial),
      backend_(std::move(backend)) {}

void Plan::check_forward(const ForwardArgs& a, bool track, Call& call) const {
  ArgError& err = call.err;
  err = a.rejected ? *a.rejected : map_shape(a.shape, config_.num_features, config_.layout, &call.g);
  call.count = err ? 0 : call.g.count_per_channel();
  require(err, call.count == 0 || a.x != nullptr, Arg::x);
  require(err, call.count == 0 || a.y != nullptr, Arg::y);
  require(err, !config_.affine || a.weight != nullptr, Arg::weight);
  require(err, !config_.affine || a.bias != nullptr, Arg::bias);
  const bool add = config_.activation == SYNCBN_ACTIVATION_ADD_RELU;
  require(err, !add || call.count == 0 || a.z != nullptr, Arg::z);
  require(err, add || a.z == nullptr, Arg::z, Problem::unexpected);
  require(err, config_.activation != SYNCBN_ACTIVATION_NONE || a.mask == nullptr, Arg::mask,
          Problem::unexpected);
  require(err, call.count == 0 || a.mask == nullptr ||
                   (a.mask != a.x && a.mask != a.y && a.mask != a.z),
          Arg::mask, Problem::mask_aliases);
  call.stream = a.stream;
  backend_->check_call(call);
  require(err, !track || a.running_mean != nullptr, Arg::running_mean);
  require(err, !track || a.running_var != nullptr, Arg::running_var);
  require(err, !track || !std::isnan(config_.momentum) || a.num_batches_tracked != nullptr,
          Arg::num_batches_tracked);
  if (err) call.count = 0;
}

void Plan::check_backward(const BackwardArgs& a, Call& call) const {
  ArgError& err = call.err;
  err = a.rejected ? *a.rejected : map_shape(a.shape, config_.num_features, config_.layout, &call.g);
  call.count = err ? 0 : call.g.count_per_channel();
  require(err, call.count == 0 || a.x != nullptr, Arg::x);
  require(err, call.count == 0 || a.dy != nullptr, Arg::dy);
  require(err, call.count == 0 || a.dx != nullptr, Arg::dx);
  require(err, !config_.affine || a.weight != nullptr, Arg::weight);
  require(err, a.save_mean != nullptr, Arg::save_mean);
  require(err, a.save_invstd != nullptr, Arg::save_invstd);
  const bool act = config_.activation != SYNCBN_ACTIVATION_NONE;
  require(err, !act || call.count == 0 || a.y != nullptr || a.mask != nullptr, Arg::y);
  require(err, act || a.y == nullptr, Arg::y, Problem::unexpected);
  require(err, act || a.mask == nullptr, Arg::mask, Problem::unexpected);
  require(err, a.y == nullptr || a.mask == nullptr, Arg::y, Problem::with_mask);
  require(err, call.count == 0 || a.mask == nullptr || (a.mask != a.dx && a.mask != a.dz),
          Arg::mask, Problem::mask_aliases);
  require(err, config_.activation == SYNCBN_ACTIVATION_ADD_RELU || a.dz == nullptr, Arg::dz,
          Problem::unexpected);
  require(err, call.count == 0 || a.dz == nullptr || a.dz != a.dx, Arg::dz, Problem::aliases);
  call.stream = a.stream;
  backend_->check_call(call);
  if (err) call.count = 0;
}

void Plan::exchange_and_judge(Call& call, bool track) {
  if (call.collective) {
    collective_call(call.fp, [&] { backend_->exchange(*comm_, call); });
  } else {
    backend_->exchange(*comm_, call);
  }
  if (!call.host_verdict) return;  // the device judges (NCCL): see throw_own_error
  if (call.collective) {
    check_verdict(call.verdict, comm_->size(), comm_->rank(), call.err, call.fp,
                  call.verdict[kGuardSlots], track);
  } else if (call.err) {
    fail_local(comm_->rank(), call.err);
  }
}

void Plan::throw_own_error(const Call& call) const {
  if (!call.host_verdict && call.err) fail_local(comm_->rank(), call.err);
}

void Plan::forward_batch_stats(const ForwardArgs& a, Op op) {
  const bool track = op == Op::forward_training && config_.track_running_stats;
  Call call;
  call.op = op;
  call.collective = collective(op);
  check_forward(a, track, call);
  const CallEnd end(*backend_, call);
  if (!call.collective && call.err) fail_local(comm_->rank(), call.err);  // nobody else waits
  call.fp = call.collective ? next_fingerprint(op) : Fingerprint{tag_, op, seq_};

  // Round 1 around the plan's shared shift; round 2 around a refined one, where the sums show
  // the shift stale (core/finalize.hpp), decided alike on every rank of the group.
  const std::int64_t* const nbt = track ? a.num_batches_tracked : nullptr;
  backend_->reduce_moments(call, comm_->rank(), a.x, nbt);
  exchange_and_judge(call, track);
  if (!call.collective && call.count == 0) return;  // this rank's empty batch: nothing to do
  if (backend_->refine_shift(call)) {
    call.round = 2;
    backend_->reduce_moments(call, comm_->rank(), a.x, nbt);
    exchange_and_judge(call, track);
  }
  throw_own_error(call);

  // Nothing can fail from here on (or, judged on the device, nothing is written but NaN).
  ForwardFinalize f;
  f.group_size = call.collective ? comm_->size() : 1;
  f.track = track;
  f.momentum = config_.momentum;
  f.eps = config_.eps;
  f.affine = config_.affine != 0;
  f.weight = a.weight;
  f.bias = a.bias;
  f.save_mean = a.save_mean;
  f.save_invstd = a.save_invstd;
  f.running_mean = a.running_mean;
  f.running_var = a.running_var;
  f.num_batches_tracked = track ? reinterpret_cast<long long*>(a.num_batches_tracked) : nullptr;
  f.op = static_cast<std::uint32_t>(op);
  backend_->finalize_forward(call, f);
  if (call.count > 0) backend_->normalize(call, a.x, a.z, a.y, a.mask);
}

void Plan::forward_running_stats(const ForwardArgs& a) {
  Call call;
  call.op = Op::forward_inference;
  call.collective = false;
  check_forward(a, false, call);
  const CallEnd end(*backend_, call);
  require(call.err, a.running_mean != nullptr, Arg::running_mean);
  require(call.err, a.running_var != nullptr, Arg::running_var);
  if (call.err) fail_local(comm_->rank(), call.err);  // no collective here: nobody else waits
  backend_->finalize_running(call, config_.eps, config_.affine != 0, a.weight, a.bias,
                             a.running_mean, a.running_var);
  if (call.count > 0) backend_->normalize(call, a.x, a.z, a.y, a.mask);
}

void Plan::forward_training(const ForwardArgs& args) {
  comm_->check_usable();
  forward_batch_stats(args, Op::forward_training);
}

void Plan::forward_inference(const ForwardArgs& args) {
  comm_->check_usable();
  if (args.rejected) fail_local(comm_->rank(), *args.rejected);  // never collective
  if (config_.track_running_stats) {
    forward_running_stats(args);
    return;
  }
  ForwardArgs batch = args;  // this rank's batch statistics, nothing saved
  batch.save_mean = batch.save_invstd = nullptr;
  forward_batch_stats(batch, Op::forward_inference);
}

void Plan::backward(const BackwardArgs& a) {
  comm_->check_usable();
  Call call;
  call.op = Op::backward;
  check_backward(a, call);
  const CallEnd end(*backend_, call);
  call.fp = next_fingerprint(Op::backward);

  const bool param_grads = config_.affine && (a.dweight != nullptr || a.dbias != nullptr);
  backend_->reduce_grad(call, comm_->rank(), a.x, a.dy, a.y, a.mask, a.save_mean,
                        param_grads && !config_.global_param_grads);
  exchange_and_judge(call, false);
  throw_own_error(call);

  BackwardFinalize f;
  f.group_size = comm_->size();
  f.affine = config_.affine != 0;
  f.global_param_grads = config_.global_param_grads != 0;
  f.weight = a.weight;
  f.save_mean = a.save_mean;
  f.save_invstd = a.save_invstd;
  f.dweight = a.dweight;
  f.dbias = a.dbias;
  f.op = static_cast<std::uint32_t>(Op::backward);
  backend_->finalize_backward(call, f);
  if (call.count > 0) backend_->backward_elemt(call, a.x, a.dy, a.y, a.mask, a.dx, a.dz);
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
  return backend_->async_error(*comm_, tag_,
                               (name_.empty() ? label() + " " : std::string()) +
                                   "syncbn_plan_get_async_error",
                               stream);
}

#ifndef SYNCBN_HAVE_CUDA
std::unique_ptr<Backend> make_cuda_backend(const syncbn_config_t&, const comm::Communicator&,
                                           ArgError& err) {
  err = {Arg::device, Problem::unsupported, {}};  // validate_config refuses CUDA first
  return nullptr;
}
#endif

}  // namespace syncbn::core
