// syncbn: the C++ API. A header-only layer over the C API (syncbn/syncbn.h): RAII handles and
// one exception type carrying the status. Semantics, shapes, dtypes and errors are those of the
// C functions named in each comment.
#ifndef SYNCBN_SYNCBN_HPP
#define SYNCBN_SYNCBN_HPP

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "syncbn/syncbn.h"

namespace syncbn {

// Thrown by every wrapper below when the C call does not return SYNCBN_SUCCESS.
class Error : public std::runtime_error {
 public:
  Error(syncbn_status_t status, const std::string& message)
      : std::runtime_error(std::string(syncbn_status_string(status)) + ": " + message),
        status_(status) {}
  syncbn_status_t status() const noexcept { return status_; }

 private:
  syncbn_status_t status_;
};

inline void check(syncbn_status_t status) {
  if (status != SYNCBN_SUCCESS) throw Error(status, syncbn_last_error());
}

// The loaded library's version, MAJOR * 10000 + MINOR * 100 + PATCH (syncbn_get_version).
inline int version() {
  int v = 0;
  check(syncbn_get_version(&v));
  return v;
}

// A group of ranks. Owns a syncbn_comm_t.
class Communicator {
 public:
  Communicator() = default;
  // Takes ownership of a handle made by a C constructor (syncbn_comm_create_*).
  explicit Communicator(syncbn_comm_t handle) : handle_(handle, &syncbn_comm_destroy) {}

  // One process, no MPI (syncbn_comm_create_self).
  static Communicator self() {
    syncbn_comm_t h = nullptr;
    check(syncbn_comm_create_self(&h));
    return Communicator(h);
  }

  // COLLECTIVE: consecutive groups of group_size ranks (syncbn_comm_split).
  Communicator split(int group_size) const {
    syncbn_comm_t h = nullptr;
    check(syncbn_comm_split(get(), group_size, &h));
    return Communicator(h);
  }

  // The deadline of every collective on it and its plans, in seconds, 0 for none
  // (syncbn_comm_set_timeout; default SYNCBN_TIMEOUT_S or 600). A call past it throws Error
  // with status() SYNCBN_ERROR_TIMEOUT, and every later call SYNCBN_ERROR_COMM_BROKEN.
  void set_timeout(double seconds) const { check(syncbn_comm_set_timeout(get(), seconds)); }
  double timeout() const {
    double s = 0;
    check(syncbn_comm_get_timeout(get(), &s));
    return s;
  }
  // syncbn_comm_abort: ends the job (MPI: MPI_Abort, does not return).
  void abort() const { check(syncbn_comm_abort(get())); }

  int rank() const {
    int r = 0;
    check(syncbn_comm_rank(get(), &r));
    return r;
  }
  int size() const {
    int s = 0;
    check(syncbn_comm_size(get(), &s));
    return s;
  }
  syncbn_comm_t get() const { return handle_.get(); }
  explicit operator bool() const { return handle_ != nullptr; }

 private:
  std::shared_ptr<syncbn_comm_s> handle_;
};

// The allreduce of a custom communicator: sums count doubles in place over the group and
// returns 0, SYNCBN_ERROR_TIMEOUT when the deadline passed, or another error code (see
// syncbn_allreduce_fn for device, stream and the contract).
using AllreduceFunction =
    std::function<int(double* buffer, std::size_t count, syncbn_device_t device, void* stream)>;

// A communicator over any collective library (syncbn_comm_create_custom, not collective): this
// rank's rank and the group's size, and an allreduce, kept alive as long as the communicator
// and every plan on it. It cannot split (syncbn_comm_split returns SYNCBN_ERROR_NOT_SUPPORTED);
// use the C function with a split function for that.
inline Communicator custom_communicator(int rank, int size, AllreduceFunction allreduce) {
  struct Trampoline {
    static int call(double* buffer, std::size_t count, syncbn_device_t device, void* stream,
                    void* self) {
      try {
        return (*static_cast<AllreduceFunction*>(self))(buffer, count, device, stream);
      } catch (...) {
        return -1;  // an exception must not cross the C boundary (SYNCBN_ERROR_COMM)
      }
    }
    static void release(void* self) { delete static_cast<AllreduceFunction*>(self); }
  };
  auto fn = std::make_unique<AllreduceFunction>(std::move(allreduce));
  syncbn_comm_t h = nullptr;
  check(syncbn_comm_create_custom(rank, size, &Trampoline::call, nullptr, &Trampoline::release,
                                  fn.get(), &h));
  fn.release();  // owned by the communicator now: freed by Trampoline::release
  return Communicator(h);
}

// The defaults of syncbn_config_init: eps 1e-5, momentum 0.1, affine, track_running_stats,
// channels-first, CPU, local parameter gradients, no activation.
inline syncbn_config_t make_config(int64_t num_features, syncbn_dtype_t dtype = SYNCBN_FLOAT32) {
  syncbn_config_t c;
  check(syncbn_config_init(&c, num_features, dtype));
  return c;
}

// One batch-norm layer: a validated plan on a communicator (syncbn_plan_create, COLLECTIVE).
// Pointers follow the C API: data in the plan's dtype and layout, parameters and statistics
// C values of the parameter type (float, or double for FLOAT64 data).
class BatchNorm {
 public:
  BatchNorm() = default;
  BatchNorm(const Communicator& comm, const syncbn_config_t& config) {
    syncbn_plan_t p = nullptr;
    check(syncbn_plan_create(comm.get(), &config, &p));
    plan_.reset(p, &syncbn_plan_destroy);
  }

  syncbn_config_t config() const {
    syncbn_config_t c;
    check(syncbn_plan_get_config(get(), &c));
    return c;
  }

  // syncbn_plan_set_name: the name every message of this layer's calls starts with.
  void set_name(const std::string& name) { check(syncbn_plan_set_name(get(), name.c_str())); }

  // COLLECTIVE. syncbn_forward_training.
  void forward_training(const std::vector<int64_t>& shape, const void* x, const void* weight,
                        const void* bias, void* y, void* save_mean, void* save_invstd,
                        void* running_mean, void* running_var,
                        int64_t* num_batches_tracked, void* stream = nullptr) {
    check(syncbn_forward_training(get(), static_cast<int>(shape.size()), shape.data(), x,
                                  weight, bias, y, save_mean, save_invstd, running_mean,
                                  running_var, num_batches_tracked, stream));
  }

  // syncbn_forward_inference (never collective).
  void forward_inference(const std::vector<int64_t>& shape, const void* x, const void* weight,
                         const void* bias, const void* running_mean, const void* running_var,
                         void* y, void* stream = nullptr) {
    check(syncbn_forward_inference(get(), static_cast<int>(shape.size()), shape.data(), x,
                                   weight, bias, running_mean, running_var, y, stream));
  }

  // COLLECTIVE. syncbn_backward.
  void backward(const std::vector<int64_t>& shape, const void* x, const void* dy,
                const void* weight, const void* save_mean, const void* save_invstd, void* dx,
                void* dweight, void* dbias, void* stream = nullptr) {
    check(syncbn_backward(get(), static_cast<int>(shape.size()), shape.data(), x, dy, weight,
                          save_mean, save_invstd, dx, dweight, dbias, stream));
  }

  // The named-argument calls (syncbn_forward_training_ex, ...): every argument by name, and the
  // fused activation's z and mask (forward), y or mask and dz (backward). Zero-initialize the
  // struct ({}).
  //   syncbn_forward_args_t a{};
  //   a.ndim = 4; a.shape = shape; a.x = x; a.z = residual; a.y = y; ...
  //   bn.forward_training(a);
  // COLLECTIVE.
  void forward_training(const syncbn_forward_args_t& args) {
    check(syncbn_forward_training_ex(get(), &args));
  }
  // Never collective.
  void forward_inference(const syncbn_forward_args_t& args) {
    check(syncbn_forward_inference_ex(get(), &args));
  }
  // COLLECTIVE.
  void backward(const syncbn_backward_args_t& args) { check(syncbn_backward_ex(get(), &args)); }

  // syncbn_plan_reject_call: takes part in call as a rank that rejected argument (COLLECTIVE
  // where call is). Always throws the group's error.
  [[noreturn]] void reject_call(syncbn_call_t call, const char* argument,
                                syncbn_problem_t problem, const char* detail = nullptr,
                                void* stream = nullptr) {
    check(syncbn_plan_reject_call(get(), call, argument, problem, detail, stream));
    throw Error(SYNCBN_ERROR_INTERNAL, "syncbn_plan_reject_call returned SYNCBN_SUCCESS");
  }

  // syncbn_plan_get_async_error: synchronizes stream; throws the error the device recorded in
  // this plan's completed calls (CUDA plans over NCCL), if any, and clears it.
  void check_async_error(void* stream = nullptr) {
    syncbn_status_t async = SYNCBN_SUCCESS;
    check(syncbn_plan_get_async_error(get(), stream, &async));
    check(async);
  }

  syncbn_plan_t get() const { return plan_.get(); }
  explicit operator bool() const { return plan_ != nullptr; }

 private:
  std::shared_ptr<syncbn_plan_s> plan_;
};

}  // namespace syncbn

#endif  // SYNCBN_SYNCBN_HPP
