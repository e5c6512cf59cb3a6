// A plan: one batch-norm layer's validated configuration on a communicator, the packed fp64
// buffer of its allreduces, its call sequence number, and scratch. Describe once (collectively,
// at creation), execute many: calls validate only their own pointers and shape, and the verdict
// rides on the one allreduce each call makes anyway.
#ifndef SYNCBN_CORE_PLAN_HPP
#define SYNCBN_CORE_PLAN_HPP

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "comm/communicator.hpp"
#include "core/error.hpp"
#include "core/guard.hpp"
#include "cpu/kernels.hpp"
#include "syncbn/syncbn.h"

namespace syncbn::core {

// A call's tensor arguments, as the C API received them. Pointers to data are of the plan's
// dtype, pointers to parameters and statistics of its parameter type.
struct TensorShape {
  int ndim = 0;
  const std::int64_t* dims = nullptr;
};

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
};

// The config's own validity, on this rank (no communication).
ArgError validate_config(const syncbn_config_t& config);

// What a plan keeps on a device (CUDA plans: core/plan_cuda.cpp).
class DeviceResources {
 public:
  virtual ~DeviceResources() = default;
};

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
       std::uint64_t tag, std::uint32_t serial);

  // Runs a collective of the call fp (comm_'s allreduce); its timeout or transport failure is
  // thrown again naming the call ("forward_training call #17", after the label when the plan
  // has no name: the C API puts a name first) and saying that the communicator is now broken.
  template <class F> void collective_call(const Fingerprint& fp, F&& body);

  // Batch statistics of the group (op forward_training), or of this rank alone without any
  // communication (op forward_inference: no fingerprint is drawn, the sequence stays).
  template <class T> void forward_batch_stats(const ForwardArgs& args, Op op);
  template <class T> void forward_running_stats(const ForwardArgs& args);
  template <class T> void backward_typed(const BackwardArgs& args);

  // Checks shape against the plan; fills geometry and the per-channel count.
  ArgError check_shape(const TensorShape& shape, cpu::Geometry* geometry) const;
  // What every forward checks: the shape, x and y (unless the tensor is empty), weight and bias
  // (when affine), the stream (NULL on the CPU), and with track the running statistics and
  // num_batches_tracked (when momentum is cumulative). Fills the geometry and the per-channel
  // count (0 on error).
  ArgError check_forward(const ForwardArgs& args, bool track, cpu::Geometry* geometry,
                         std::int64_t* count) const;
  // What backward checks: the shape, x, dy and dx (unless the tensor is empty), weight (when
  // affine), save_mean, save_invstd, the stream (NULL on the CPU).
  ArgError check_backward(const BackwardArgs& args, cpu::Geometry* geometry,
                          std::int64_t* count) const;
  Fingerprint next_fingerprint(Op op) { return {tag_, op, seq_++}; }
  // Sums [guards | data_slots of data] over the group and reaches the common verdict (throws
  // on error, identically on every rank). For forward_inference (local batch statistics) no
  // communication: this rank's error is its verdict.
  void exchange(std::size_t data_slots, const ArgError& mine, Op op);
  // Whether op's batch statistics are the group's (else this rank's own).
  static bool collective(Op op) { return op != Op::forward_inference; }
  // Runs a call's local computation unless err is set; an allocation failure becomes err, so
  // that this rank still enters the collective and reports it there.
  template <class F> void local_phase(ArgError& err, F&& compute);
  // C values of type T in the plan's scratch, slot i of kScratchArrays.
  template <class T> T* scratch(int i);

  // CUDA plans (core/plan_cuda.cpp): device memory before the creation collective, and the
  // three calls. Each enqueues its reduction, the exchange, the finalize and the elementwise
  // pass on the caller's stream.
  ArgError init_cuda();
  void cuda_forward_batch_stats(const ForwardArgs& args, Op op);
  void cuda_forward_running_stats(const ForwardArgs& args);
  void cuda_backward(const BackwardArgs& args);
  syncbn_status_t cuda_async_error(void* stream);

  std::shared_ptr<comm::Communicator> comm_;
  syncbn_config_t config_;
  std::uint64_t tag_;      // plan fingerprint: creation serial and config, 48 bits used
  std::uint32_t serial_;   // creation number on the communicator
  std::string name_;
  std::uint64_t seq_ = 0;  // collective calls made on this plan
  std::vector<double> buffer_;     // [guard slots | data (2C + 1)]
  std::vector<double> local_;      // this rank's sums, kept across the allreduce (2C)
  std::vector<float> scratch32_;   // kScratchArrays arrays of C values, FLOAT32 plans
  std::vector<double> scratch64_;  // the same, FLOAT64 plans
  cpu::Workspace workspace_;
  std::unique_ptr<DeviceResources> device_;  // CUDA plans
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

// The rank's own error, raised on this rank only ("rank 2: weight is null").
[[noreturn]] void fail_local(int rank, const ArgError& err);
// The first problem found wins; later checks do not overwrite it.
void require(ArgError& err, bool ok, Arg arg, Problem problem = Problem::null);

}  // namespace syncbn::core

#endif  // SYNCBN_CORE_PLAN_HPP
