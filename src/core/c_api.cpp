// The C API: handles, argument plumbing and the translation of internal failures into status
// codes and the per-thread last-error message. No logic of its own beyond that.
#include <cmath>
#include <cstring>
#include <new>
#include <string>
#include <utility>

#include "comm/communicator.hpp"
#include "comm/custom.hpp"
#include "comm/handle.hpp"
#include "core/error.hpp"
#include "core/plan.hpp"
#include "core/split.hpp"
#include "syncbn/syncbn.h"
#ifdef SYNCBN_HAVE_MPI
#include "comm/mpi.hpp"
#include "syncbn/syncbn_mpi.h"
#endif
#ifdef SYNCBN_HAVE_NCCL
#include "comm/nccl.hpp"
#include "syncbn/syncbn_nccl.h"
#ifdef SYNCBN_HAVE_MPI
#include "syncbn/syncbn_nccl_mpi.h"
#endif
#else
// Built without NCCL: the entry points exist and say so. ncclComm_t is struct ncclComm*.
struct ncclComm;
extern "C" {
SYNCBN_API syncbn_status_t syncbn_comm_create_nccl(ncclComm* nccl_comm, syncbn_comm_t* comm);
#ifdef SYNCBN_HAVE_MPI
SYNCBN_API syncbn_status_t syncbn_nccl_comm_init_mpi(MPI_Comm mpi_comm, ncclComm** nccl_comm,
                                                     int* local_rank);
#endif
}
#endif

struct syncbn_plan_s {
  std::unique_ptr<syncbn::core::Plan> impl;
};

namespace {

using syncbn::core::Failure;

// Runs body, turning every exception into a status and the last-error message.
template <class F>
syncbn_status_t guarded(F&& body) noexcept {
  syncbn::core::clear_last_error();
  try {
    body();
    return SYNCBN_SUCCESS;
  } catch (const Failure& e) {
    syncbn::core::set_last_error(e.what());
    return e.status();
  } catch (const std::bad_alloc&) {
    syncbn::core::set_last_error("out of memory");
    return SYNCBN_ERROR_OUT_OF_MEMORY;
  } catch (const std::exception& e) {
    syncbn::core::set_last_error(std::string("internal error: ") + e.what());
    return SYNCBN_ERROR_INTERNAL;
  } catch (...) {
    syncbn::core::set_last_error("internal error: unknown exception");
    return SYNCBN_ERROR_INTERNAL;
  }
}

// A handle the caller passed: NULL fails locally (there is no group to tell).
template <class H>
auto& checked(H handle, const char* name) {
  if (handle == nullptr) {
    syncbn::core::fail(SYNCBN_ERROR_INVALID_ARGUMENT, std::string(name) + " is null");
  }
  return *handle->impl;
}

// A call on a plan: with a name set, every message of the call starts with it.
template <class F>
void on_plan(syncbn_plan_t plan, F&& body) {
  auto& p = checked(plan, "plan");
  if (p.name().empty()) {
    body(p);
    return;
  }
  syncbn::core::with_context(p.label(), [&] { body(p); });
}

// A named-argument call whose args are NULL: this rank takes its part in the call as a rank that
// rejected "args" (collective where the call is), on the legacy default stream of a CUDA plan.
[[noreturn]] void reject_null_args(syncbn::core::Plan& p, syncbn::core::Op op) {
  p.reject_call(op, {syncbn::core::Arg::args, syncbn::core::Problem::null, {}}, nullptr);
}

syncbn::core::ForwardArgs forward_args(const syncbn_forward_args_t& a) {
  syncbn::core::ForwardArgs f;
  f.shape = {a.ndim, a.shape};
  f.x = a.x;
  f.z = a.z;
  f.weight = a.weight;
  f.bias = a.bias;
  f.y = a.y;
  f.mask = a.mask;
  f.save_mean = a.save_mean;
  f.save_invstd = a.save_invstd;
  f.running_mean = a.running_mean;
  f.running_var = a.running_var;
  f.num_batches_tracked = a.num_batches_tracked;
  f.stream = a.stream;
  return f;
}

template <class H>
void require_out(H* out, const char* name) {
  if (out == nullptr) {
    syncbn::core::fail(SYNCBN_ERROR_INVALID_ARGUMENT, std::string(name) + " is null");
  }
}

}  // namespace

extern "C" {

const char* syncbn_status_string(syncbn_status_t status) {
  switch (status) {
    case SYNCBN_SUCCESS: return "SYNCBN_SUCCESS";
    case SYNCBN_ERROR_INVALID_ARGUMENT: return "SYNCBN_ERROR_INVALID_ARGUMENT";
    case SYNCBN_ERROR_CONFIG_MISMATCH: return "SYNCBN_ERROR_CONFIG_MISMATCH";
    case SYNCBN_ERROR_CALL_MISMATCH: return "SYNCBN_ERROR_CALL_MISMATCH";
    case SYNCBN_ERROR_BATCH_TOO_SMALL: return "SYNCBN_ERROR_BATCH_TOO_SMALL";
    case SYNCBN_ERROR_NOT_SUPPORTED: return "SYNCBN_ERROR_NOT_SUPPORTED";
    case SYNCBN_ERROR_COMM: return "SYNCBN_ERROR_COMM";
    case SYNCBN_ERROR_OUT_OF_MEMORY: return "SYNCBN_ERROR_OUT_OF_MEMORY";
    case SYNCBN_ERROR_INTERNAL: return "SYNCBN_ERROR_INTERNAL";
    case SYNCBN_ERROR_TIMEOUT: return "SYNCBN_ERROR_TIMEOUT";
    case SYNCBN_ERROR_COMM_BROKEN: return "SYNCBN_ERROR_COMM_BROKEN";
    default: break;
  }
  return "SYNCBN_ERROR_UNKNOWN_STATUS";
}

const char* syncbn_last_error(void) { return syncbn::core::last_error(); }

syncbn_status_t syncbn_get_version(int* version) {
  return guarded([&] {
    require_out(version, "version");
    *version = SYNCBN_VERSION_CODE;
  });
}

syncbn_status_t syncbn_config_init(syncbn_config_t* config, int64_t num_features,
                                   syncbn_dtype_t dtype) {
  return guarded([&] {
    require_out(config, "config");
    *config = syncbn_config_t{};
    config->num_features = num_features;
    config->dtype = dtype;
    config->layout = SYNCBN_CHANNELS_FIRST;
    config->device = SYNCBN_DEVICE_CPU;
    config->eps = 1e-5;
    config->momentum = 0.1;
    config->affine = 1;
    config->track_running_stats = 1;
    config->global_param_grads = 0;
    config->activation = SYNCBN_ACTIVATION_NONE;
  });
}

syncbn_status_t syncbn_comm_create_self(syncbn_comm_t* comm) {
  return guarded([&] {
    require_out(comm, "comm");
    *comm = new syncbn_comm_s{syncbn::comm::make_self_communicator()};
  });
}

syncbn_status_t syncbn_comm_create_custom(int rank, int size, syncbn_allreduce_fn allreduce,
                                          syncbn_split_fn split, syncbn_release_fn release,
                                          void* user_data, syncbn_comm_t* comm) {
  return guarded([&] {
    require_out(comm, "comm");
    auto impl = syncbn::comm::make_custom_communicator(rank, size, allreduce, split, release,
                                                       user_data);
    *comm = new syncbn_comm_s{std::move(impl)};
  });
}

#ifdef SYNCBN_HAVE_MPI
syncbn_status_t syncbn_comm_create_mpi(MPI_Comm mpi_comm, syncbn_comm_t* comm) {
  return guarded([&] {
    require_out(comm, "comm");
    *comm = new syncbn_comm_s{syncbn::comm::make_mpi_communicator(mpi_comm)};
  });
}
#endif

#ifdef SYNCBN_HAVE_NCCL
syncbn_status_t syncbn_comm_create_nccl(ncclComm_t nccl_comm, syncbn_comm_t* comm) {
  return guarded([&] {
    require_out(comm, "comm");
    *comm = new syncbn_comm_s{syncbn::comm::make_nccl_communicator(nccl_comm)};
  });
}
#ifdef SYNCBN_HAVE_MPI
syncbn_status_t syncbn_nccl_comm_init_mpi(MPI_Comm mpi_comm, ncclComm_t* nccl_comm,
                                          int* local_rank) {
  return guarded([&] { syncbn::comm::nccl_comm_init_mpi(mpi_comm, nccl_comm, local_rank); });
}
#endif
#else
syncbn_status_t syncbn_comm_create_nccl(ncclComm*, syncbn_comm_t*) {
  return guarded([&] {
    syncbn::core::fail(SYNCBN_ERROR_NOT_SUPPORTED, "this build has no NCCL (SYNCBN_WITH_NCCL)");
  });
}
#ifdef SYNCBN_HAVE_MPI
syncbn_status_t syncbn_nccl_comm_init_mpi(MPI_Comm, ncclComm**, int*) {
  return guarded([&] {
    syncbn::core::fail(SYNCBN_ERROR_NOT_SUPPORTED, "this build has no NCCL (SYNCBN_WITH_NCCL)");
  });
}
#endif
#endif

syncbn_status_t syncbn_comm_split(syncbn_comm_t parent, int group_size, syncbn_comm_t* sub) {
  return guarded([&] {
    auto group = syncbn::core::split_consecutive(checked(parent, "parent"), group_size,
                                                 sub == nullptr);
    *sub = new syncbn_comm_s{std::move(group)};
  });
}

syncbn_status_t syncbn_comm_set_timeout(syncbn_comm_t comm, double seconds) {
  return guarded([&] {
    auto& c = checked(comm, "comm");
    if (!(seconds >= 0.0) || std::isinf(seconds)) {
      syncbn::core::fail(SYNCBN_ERROR_INVALID_ARGUMENT,
                         "seconds must be >= 0 and finite (0: no deadline), got " +
                             std::to_string(seconds));
    }
    c.set_timeout_seconds(seconds);
  });
}

syncbn_status_t syncbn_comm_get_timeout(syncbn_comm_t comm, double* seconds) {
  return guarded([&] {
    auto& c = checked(comm, "comm");
    require_out(seconds, "seconds");
    *seconds = c.timeout_seconds();
  });
}

syncbn_status_t syncbn_comm_abort(syncbn_comm_t comm) {
  return guarded([&] { checked(comm, "comm").abort(); });
}

syncbn_status_t syncbn_comm_destroy(syncbn_comm_t comm) {
  return guarded([&] { delete comm; });
}

syncbn_status_t syncbn_comm_rank(syncbn_comm_t comm, int* rank) {
  return guarded([&] {
    auto& c = checked(comm, "comm");
    require_out(rank, "rank");
    *rank = c.rank();
  });
}

syncbn_status_t syncbn_comm_size(syncbn_comm_t comm, int* size) {
  return guarded([&] {
    auto& c = checked(comm, "comm");
    require_out(size, "size");
    *size = c.size();
  });
}

syncbn_status_t syncbn_plan_create(syncbn_comm_t comm, const syncbn_config_t* config,
                                   syncbn_plan_t* plan) {
  return guarded([&] {
    if (comm == nullptr) syncbn::core::fail(SYNCBN_ERROR_INVALID_ARGUMENT, "comm is null");
    std::unique_ptr<syncbn_plan_s> handle(new (std::nothrow) syncbn_plan_s{});
    auto impl = syncbn::core::Plan::create(comm->impl, config, plan == nullptr, !handle);
    handle->impl = std::move(impl);
    *plan = handle.release();
  });
}

syncbn_status_t syncbn_plan_destroy(syncbn_plan_t plan) {
  return guarded([&] { delete plan; });
}

syncbn_status_t syncbn_plan_set_name(syncbn_plan_t plan, const char* name) {
  return guarded([&] {
    auto& p = checked(plan, "plan");
    constexpr std::size_t kMaxName = 255;
    p.set_name(name == nullptr ? std::string() : std::string(name, strnlen(name, kMaxName)));
  });
}

syncbn_status_t syncbn_plan_get_config(syncbn_plan_t plan, syncbn_config_t* config) {
  return guarded([&] {
    auto& p = checked(plan, "plan");
    require_out(config, "config");
    *config = p.config();
  });
}

syncbn_status_t syncbn_plan_get_async_error(syncbn_plan_t plan, void* stream,
                                            syncbn_status_t* async_error) {
  return guarded([&] {
    require_out(async_error, "async_error");
    *async_error = SYNCBN_SUCCESS;
    on_plan(plan, [&](syncbn::core::Plan& p) { *async_error = p.async_error(stream); });
  });
}

syncbn_status_t syncbn_forward_training_ex(syncbn_plan_t plan, const syncbn_forward_args_t* args) {
  return guarded([&] {
    on_plan(plan, [&](syncbn::core::Plan& p) {
      if (args == nullptr) reject_null_args(p, syncbn::core::Op::forward_training);
      p.forward_training(forward_args(*args));
    });
  });
}

syncbn_status_t syncbn_forward_inference_ex(syncbn_plan_t plan,
                                            const syncbn_forward_args_t* args) {
  return guarded([&] {
    on_plan(plan, [&](syncbn::core::Plan& p) {
      if (args == nullptr) reject_null_args(p, syncbn::core::Op::forward_inference);
      syncbn::core::ForwardArgs a = forward_args(*args);
      a.save_mean = a.save_invstd = nullptr;  // not written in inference
      a.num_batches_tracked = nullptr;
      p.forward_inference(a);
    });
  });
}

syncbn_status_t syncbn_backward_ex(syncbn_plan_t plan, const syncbn_backward_args_t* args) {
  return guarded([&] {
    on_plan(plan, [&](syncbn::core::Plan& p) {
      if (args == nullptr) reject_null_args(p, syncbn::core::Op::backward);
      const syncbn_backward_args_t& a = *args;
      p.backward({{a.ndim, a.shape}, a.x, a.dy, a.weight, a.save_mean, a.save_invstd, a.dx,
                  a.dweight, a.dbias, a.stream, nullptr, a.y, a.dz, a.mask});
    });
  });
}

// The positional calls: the named ones without z, y and dz.

syncbn_status_t syncbn_forward_training(syncbn_plan_t plan, int ndim, const int64_t* shape,
                                        const void* x, const void* weight, const void* bias,
                                        void* y, void* save_mean, void* save_invstd,
                                        void* running_mean, void* running_var,
                                        int64_t* num_batches_tracked, void* stream) {
  syncbn_forward_args_t a{};
  a.ndim = ndim;
  a.shape = shape;
  a.x = x;
  a.weight = weight;
  a.bias = bias;
  a.y = y;
  a.save_mean = save_mean;
  a.save_invstd = save_invstd;
  a.running_mean = running_mean;
  a.running_var = running_var;
  a.num_batches_tracked = num_batches_tracked;
  a.stream = stream;
  return syncbn_forward_training_ex(plan, &a);
}

syncbn_status_t syncbn_forward_inference(syncbn_plan_t plan, int ndim, const int64_t* shape,
                                         const void* x, const void* weight, const void* bias,
                                         const void* running_mean, const void* running_var,
                                         void* y, void* stream) {
  syncbn_forward_args_t a{};
  a.ndim = ndim;
  a.shape = shape;
  a.x = x;
  a.weight = weight;
  a.bias = bias;
  a.y = y;
  a.running_mean = const_cast<void*>(running_mean);  // read only in inference
  a.running_var = const_cast<void*>(running_var);
  a.stream = stream;
  return syncbn_forward_inference_ex(plan, &a);
}

syncbn_status_t syncbn_backward(syncbn_plan_t plan, int ndim, const int64_t* shape,
                                const void* x, const void* dy, const void* weight,
                                const void* save_mean, const void* save_invstd, void* dx,
                                void* dweight, void* dbias, void* stream) {
  syncbn_backward_args_t a{};
  a.ndim = ndim;
  a.shape = shape;
  a.x = x;
  a.dy = dy;
  a.weight = weight;
  a.save_mean = save_mean;
  a.save_invstd = save_invstd;
  a.dx = dx;
  a.dweight = dweight;
  a.dbias = dbias;
  a.stream = stream;
  return syncbn_backward_ex(plan, &a);
}

syncbn_status_t syncbn_plan_reject_call(syncbn_plan_t plan, syncbn_call_t call,
                                        const char* argument, syncbn_problem_t problem,
                                        const char* detail, void* stream) {
  return guarded([&] {
    checked(plan, "plan");
    using syncbn::core::Op;
    using syncbn::core::Problem;
    Op op = Op::forward_training;
    switch (call) {
      case SYNCBN_CALL_FORWARD_TRAINING: op = Op::forward_training; break;
      case SYNCBN_CALL_FORWARD_INFERENCE: op = Op::forward_inference; break;
      case SYNCBN_CALL_BACKWARD: op = Op::backward; break;
      default:
        syncbn::core::fail(SYNCBN_ERROR_INVALID_ARGUMENT,
                           "call is not a syncbn_call_t (" + std::to_string(static_cast<int>(call)) + ")");
    }
    Problem what = Problem::rejected;
    switch (problem) {
      case SYNCBN_PROBLEM_DTYPE: what = Problem::wrong_dtype; break;
      case SYNCBN_PROBLEM_DEVICE: what = Problem::wrong_memory; break;
      case SYNCBN_PROBLEM_LAYOUT: what = Problem::wrong_layout; break;
      case SYNCBN_PROBLEM_SHAPE: what = Problem::wrong_shape; break;
      default: break;  // reported as "rejected by the caller"
    }
    on_plan(plan, [&](syncbn::core::Plan& p) {
      p.reject_call(op, {syncbn::core::arg_from_name(argument), what, detail ? detail : ""}, stream);
    });
  });
}

}  // extern "C"
