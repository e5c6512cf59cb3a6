// The backend of a plan: where its tensors live (CPU or a CUDA device), chosen once at plan
// creation. Plan (plan.cpp) runs every call as one sequence over this interface:
//
//   validate (Plan, then check_call) -> fingerprint (Plan) -> reduce (local sums and guards into
//   the packed buffer) -> exchange (the allreduce; the verdict's slots on the host when it can
//   reach them now) -> verdict (Plan, on the host; or the device's finalize) -> [forward: a
//   second reduce and exchange around a refined shift, where refine_shift asks for one] ->
//   finalize (per-channel statistics and coefficients, core/finalize.hpp) -> apply (the
//   elementwise pass).
//
// A backend owns the plan's packed buffer [guards (kGuardSlots) | 2C sums | m] and scratch, runs
// its kernels (src/cpu, src/cuda), and never makes a verdict's message (Plan does, from
// core/guard.hpp). Methods trust their arguments: Plan validated them.
#ifndef SYNCBN_CORE_BACKEND_HPP
#define SYNCBN_CORE_BACKEND_HPP

#include <cstdint>
#include <memory>
#include <string>

#include "comm/communicator.hpp"
#include "core/finalize.hpp"
#include "core/geometry.hpp"
#include "core/guard.hpp"
#include "syncbn/syncbn.h"

namespace syncbn::core {

// One call as it passes through the backend.
struct Call {
  Op op = Op::forward_training;
  bool collective = true;  // the group's statistics (else this rank's own, no communication)
  Geometry g;
  std::int64_t count = 0;  // values per channel on this rank; 0 once err is set
  ArgError err;            // this rank's error (validation, or a local failure of reduce)
  Fingerprint fp;
  void* stream = nullptr;  // the caller's (CUDA), or the backend's replacement for it
  int round = 1;           // forward: 2 for the reduction redone around a refined shift
  // After exchange, when host_verdict: the group's guard slots, then its m.
  double verdict[kGuardSlots + 1] = {};
  bool host_verdict = false;
};

class Backend {
 public:
  virtual ~Backend() = default;

  // This backend's own checks of a call's stream and device (CPU: the stream must be NULL;
  // CUDA: the current device and the stream's are the plan's). On a mismatch the CUDA backend
  // replaces call.stream by one it can use to take part in the collective.
  virtual void check_call(Call& call) = 0;

  // The end of a call that check_call began, whatever happened in between (CUDA: the event the
  // plan's next call on another stream waits for).
  virtual void end_call(const Call& call) noexcept { (void)call; }

  // Local sums into the packed buffer with the guards of (rank, call.err, call.fp) and the
  // count: forward the moments of x around the call's shift (core/finalize.hpp: the plan's
  // shared shift; in round 2 the refined one, which for a call without communication is this
  // rank's own and leaves the shared one as it was), with
  // num_batches_tracked (NULL: none) checked where it lives; backward sum dy and
  // sum dy (x - save_mean), kept as this rank's own too with keep_local. A rank with call.err set
  // or nothing to sum writes zeros. A reduction that cannot run sets call.err (count 0) and
  // writes that rank's failing guards instead.
  virtual void reduce_moments(Call& call, int rank, const void* x,
                              const std::int64_t* num_batches_tracked) = 0;
  // With the plan's activation, backward sums g = dy masked instead of dy: by mask (the forward's
  // mask bytes, syncbn_forward_args_t.mask) where it is not NULL, else by y > 0 (y: the
  // forward's output).
  virtual void reduce_grad(Call& call, int rank, const void* x, const void* dy, const void* y,
                           const void* mask, const void* save_mean, bool keep_local) = 0;

  // COLLECTIVE (when call.collective). Sums the packed buffer over comm (comm carries out the
  // exchange, host or device memory); fills call.verdict (host_verdict) where the host can reach
  // the group's guards now, or leaves the verdict to the device (finalize). Without
  // call.collective, the verdict is this rank's own. Throws what comm throws.
  virtual void exchange(comm::Communicator& comm, Call& call) = 0;

  // COLLECTIVE in its decision: after a forward round 1 whose verdict the host reached and
  // passed (or which only the device judges), whether the reduction must be redone around a
  // refined shift (core::refined_shift of each channel: where the sums show the shift stale),
  // and if so that shift, where round 2 reads it. Every rank of the group must decide alike:
  // from the group's sums on the host (CPU), or from what every rank knows (CUDA: the plan's
  // first call, the device refining each channel).
  virtual bool refine_shift(Call& call) = 0;

  // Per channel (core/finalize.hpp) from the packed buffer: the coefficients of apply, and the
  // outputs of f; a collective forward also sets the shared shift of the plan's next call. The CUDA backend evaluates the verdict here too, where the host could not.
  virtual void finalize_forward(const Call& call, const ForwardFinalize& f) = 0;
  virtual void finalize_running(const Call& call, double eps, bool affine, const void* weight,
                                const void* bias, const void* running_mean,
                                const void* running_var) = 0;
  virtual void finalize_backward(const Call& call, const BackwardFinalize& f) = 0;

  // The elementwise passes with the coefficients of the last finalize and the plan's activation:
  // y = act((x - center) * scale + shift [+ z]) and, with an activation, mask = y > 0 where mask
  // is not NULL (one byte per element); with g = dy, or dy masked as in reduce_grad with an
  // activation, dx = a g - k (x - center) + d and dz = g (ADD_RELU; dz may be NULL).
  virtual void normalize(const Call& call, const void* x, const void* z, void* y, void* mask) = 0;
  virtual void backward_elemt(const Call& call, const void* x, const void* dy, const void* y,
                              const void* mask, void* dx, void* dz) = 0;

  // The first verdict the device failed since the last report (CUDA: after waiting for stream,
  // by comm's deadline over NCCL; throws SYNCBN_ERROR_COMM_BROKEN on a broken comm), with its
  // message as last error; SYNCBN_SUCCESS on the CPU, whose calls report every error themselves.
  virtual syncbn_status_t async_error(comm::Communicator& comm, const std::uint64_t plan_tag,
                                      const std::string& context, void* stream) {
    (void)comm, (void)plan_tag, (void)context, (void)stream;
    return SYNCBN_SUCCESS;
  }

  // Whether a transport may still touch this backend's memory after a failed collective (the
  // device buffer of CUDA-aware MPI, NCCL kernels): the plan then keeps it for good.
  virtual bool exposed_to_transport() const { return false; }
};

// The backends (src/cpu/backend.cpp, src/cuda/backend.cpp). make_cuda_backend returns NULL and
// sets err when this rank cannot make one (no device, wrong device, out of memory).
std::unique_ptr<Backend> make_cpu_backend(const syncbn_config_t& config);
std::unique_ptr<Backend> make_cuda_backend(const syncbn_config_t& config,
                                           const comm::Communicator& comm, ArgError& err);

}  // namespace syncbn::core

#endif  // SYNCBN_CORE_BACKEND_HPP
