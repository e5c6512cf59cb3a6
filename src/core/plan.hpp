// A plan: one batch-norm layer's validated configuration on a communicator, its call sequence
// number, and its backend (core/backend.hpp: the packed fp64 buffer, scratch, kernels; CPU or
// CUDA). Describe once (collectively, at creation), execute many: calls validate only their own
// pointers and shape, and the verdict rides on the one allreduce each call makes anyway. Every
// call runs one sequence, whatever the backend: validate -> fingerprint -> reduce -> exchange
// -> verdict -> finalize -> apply.
#ifndef SYNCBN_CORE_PLAN_HPP
#define SYNCBN_CORE_PLAN_HPP

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "comm/communicator.hpp"
#include "core/backend.hpp"
#include "core/error.hpp"
#include "core/geometry.hpp"
#include "core/guard.hpp"
#include "core/shape.hpp"
#include "syncbn/syncbn.h"

namespace syncbn::core {

// A call's tensor arguments, as the C API received them. Pointers to data are of the plan's
// dtype, pointers to parameters and statistics of its parameter type.

struct ForwardArgs {
  TensorShape shape;
  const void* x = nullptr;
  const void* weight = nullptr;
  const void* bias = nullptr;
  void* y = nullptr;
  void* save_mean = nullptr;    // NULL: not saved
  void* save_invstd = nullptr;  // NULL: not saved
  void* running_mean = nullptr;
  void* running_var = nullptr;
  std::int64_t* num_batches_tracked = nullptr;
  void* stream = nullptr;
  const ArgError* rejected = nullptr;  // syncbn_plan_reject_call: this rank's error, nothing else
  const void* z = nullptr;  // SYNCBN_ACTIVATION_ADD_RELU: the residual input
  void* mask = nullptr;     // with an activation, optional: y > 0, a byte per element
};

struct BackwardArgs {
  TensorShape shape;
  const void* x = nullptr;
  const void* dy = nullptr;
  const void* weight = nullptr;
  const void* save_mean = nullptr;
  const void* save_invstd = nullptr;
  void* dx = nullptr;
  void* dweight = nullptr;
  void* dbias = nullptr;
  void* stream = nullptr;
  const ArgError* rejected = nullptr;  // as in ForwardArgs
  const void* y = nullptr;  // with an activation: the forward's output (its mask y > 0)
  void* dz = nullptr;       // SYNCBN_ACTIVATION_ADD_RELU: the residual's gradient (may be NULL)
  const void* mask = nullptr;  // with an activation: the forward's mask, in place of y
};

// The config's own validity, on this rank (no communication).
ArgError validate_config(const syncbn_config_t& config);

class Plan {
 public:
  ~Plan();
  // COLLECTIVE over comm. config may be NULL on a rank (that rank reports it); plan_out_null
  // says the caller gave no place for the handle, out_of_memory that the caller could not
  // allocate its own part. Every allocation happens before the collective, so a rank out of
  // memory reports it there. Throws Failure, identically on every rank.
  static std::unique_ptr<Plan> create(std::shared_ptr<comm::Communicator> comm,
                                      const syncbn_config_t* config, bool plan_out_null,
                                      bool out_of_memory);

  const syncbn_config_t& config() const { return config_; }

  // The caller's name for the plan ("" if none), shown in its messages; the label messages use:
  // "plan 'name'", or "plan #serial" without a name.
  void set_name(std::string name) { name_ = std::move(name); }
  const std::string& name() const { return name_; }
  std::string label() const;

  // COLLECTIVE. Batch statistics over the group; running statistics updated on success.
  void forward_training(const ForwardArgs& args);
  // Local: running statistics when track_running_stats, else this rank's batch statistics.
  void forward_inference(const ForwardArgs& args);
  // COLLECTIVE.
  void backward(const BackwardArgs& args);
  // Takes part in the call op as a rank that rejected its arguments (err); always throws.
  [[noreturn]] void reject_call(Op op, const ArgError& err, void* stream);

  // CUDA plans: synchronizes stream, then the first failed verdict the device recorded since the
  // last report (SYNCBN_SUCCESS if none), with its message as last error; clears it.
  syncbn_status_t async_error(void* stream);

 private:
  Plan(std::shared_ptr<comm::Communicator> comm, const syncbn_config_t& config,
       std::uint64_t tag, std::uint32_t serial, std::unique_ptr<Backend> backend);

  // Runs a collective of the call fp (comm_'s allreduce); its timeout or transport failure is
  // thrown again naming the call ("forward_training call #17", after the label when the plan
  // has no name: the C API puts a name first) and saying that the communicator is now broken.
  template <class F> void collective_call(const Fingerprint& fp, F&& body);

  // The sequence of every call with batch statistics: of the group (op forward_training), or of
  // this rank alone without any communication (op forward_inference: no fingerprint is drawn,
  // the sequence stays).
  void forward_batch_stats(const ForwardArgs& args, Op op);
  void forward_running_stats(const ForwardArgs& args);

  // Checks shape against the plan; fills geometry and the per-channel count.
  // What every forward checks: the shape, x and y (unless the tensor is empty), weight and bias
  // (when affine), and with track the running statistics and num_batches_tracked (when momentum
  // is cumulative); then the backend's checks (stream, device). Fills call's geometry and count
  // (0 on error).
  void check_forward(const ForwardArgs& args, bool track, Call& call) const;
  // What backward checks: the shape, x, dy and dx (unless the tensor is empty), weight (when
  // affine), save_mean, save_invstd; then the backend's.
  void check_backward(const BackwardArgs& args, Call& call) const;
  Fingerprint next_fingerprint(Op op) { return {tag_, op, seq_++}; }
  // The exchange and the verdict: sums the packed buffer over the group (collective calls) and
  // throws the verdict where the host reaches it, identically on every rank; where only the
  // device can (NCCL), throws nothing: throw_own_error does, after the call's last collective
  // (which every rank enters, whatever its own error).
  void exchange_and_judge(Call& call, bool track);
  void throw_own_error(const Call& call) const;
  // Whether op's batch statistics are the group's (else this rank's own).
  static bool collective(Op op) { return op != Op::forward_inference; }

  std::shared_ptr<comm::Communicator> comm_;
  syncbn_config_t config_;
  std::uint64_t tag_;      // plan fingerprint: creation serial and config, 48 bits used
  std::uint32_t serial_;   // creation number on the communicator
  std::string name_;
  std::uint64_t seq_ = 0;  // collective calls made on this plan
  std::unique_ptr<Backend> backend_;  // CPU or CUDA, chosen at creation
};

template <class F>
void Plan::collective_call(const Fingerprint& fp, F&& body) {
  try {
    body();
  } catch (const Failure& f) {
    if (f.status() != SYNCBN_ERROR_TIMEOUT && f.status() != SYNCBN_ERROR_COMM) throw;
    fail(f.status(), (name_.empty() ? label() + " " : std::string()) +
                         op_name(fp.op) + " call #" +
                         std::to_string(fp.seq) + ": " + f.what() +
                         "; the communicator is now broken (SYNCBN_ERROR_COMM_BROKEN from here on)");
  }
}

}  // namespace syncbn::core

#endif  // SYNCBN_CORE_PLAN_HPP
