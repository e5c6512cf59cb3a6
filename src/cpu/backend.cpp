// The CPU backend of plans (core/backend.hpp): the packed buffer in host memory, the kernels of
// kernels.hpp, and the per-channel finalize of core/finalize.hpp in a loop over channels.
#include <algorithm>
#include <limits>
#include <memory>
#include <new>
#include <type_traits>
#include <vector>

#include "core/backend.hpp"
#include "cpu/kernels.hpp"

namespace syncbn::cpu {
namespace {

using core::ArgError;
using core::Call;
using core::kGuardSlots;

template <class T>
const T* as(const void* p) {
  return static_cast<const T*>(p);
}
template <class T>
T* as(void* p) {
  return static_cast<T*>(p);
}

// The per-call arrays of C values, of the data type T (= the parameter type on the CPU).
template <class T>
struct Scratch {
  std::vector<T> shift;         // the group's shared shift (core/finalize.hpp), 0 at first
  std::vector<T> local_shift;   // a call without communication: its refined shift
  std::vector<T> coefficients;  // 4C: core::affine_arrays / core::backward_arrays
  explicit Scratch(std::size_t C) : shift(C), local_shift(C), coefficients(4 * C) {}
};

template <class T>
class CpuBackend final : public core::Backend {
 public:
  explicit CpuBackend(const syncbn_config_t& config)
      : C_(config.num_features),
        relu_(config.activation != SYNCBN_ACTIVATION_NONE),
        buffer_(kGuardSlots + 2 * static_cast<std::size_t>(C_) + 1, 0.0),
        local_(2 * static_cast<std::size_t>(C_), 0.0),
        scratch_(static_cast<std::size_t>(C_)) {
    reserve_workspace(workspace_, C_);
  }

  void check_call(Call& call) override {
    core::require(call.err, call.stream == nullptr, core::Arg::stream, core::Problem::not_null);
  }

  void reduce_moments(Call& call, int rank, const void* x,
                      const std::int64_t* num_batches_tracked) override {
    if (num_batches_tracked != nullptr) {  // host memory: checked here, before anything is summed
      core::require(call.err, *num_batches_tracked >= 0, core::Arg::num_batches_tracked,
              core::Problem::negative);
      core::require(call.err, *num_batches_tracked < std::numeric_limits<std::int64_t>::max(),
              core::Arg::num_batches_tracked, core::Problem::overflow);  // it is incremented
    }
    double* const sum = buffer_.data() + kGuardSlots;
    double* const sumsq = sum + C_;
    std::fill(sum, sum + 2 * C_, 0.0);
    if (!call.err && call.count > 0) {
      local_phase(call, [&] {
        cpu::reduce_moments(call.g, as<T>(x), shift_of(call), sum, sumsq, workspace_);
      });
    }
    put_guards_and_count(call, rank);
  }

  void reduce_grad(Call& call, int rank, const void* x, const void* dy, const void* y,
                   const void* mask, const void* save_mean, bool keep_local) override {
    double* const sum_g = buffer_.data() + kGuardSlots;
    double* const sum_gx = sum_g + C_;
    std::fill(sum_g, sum_g + 2 * C_, 0.0);
    if (!call.err && call.count > 0) {
      local_phase(call, [&] {
        cpu::reduce_grad(call.g, as<T>(x), as<T>(dy), as<T>(y), as<cpu::MaskByte>(mask),
                         as<T>(save_mean), sum_g, sum_gx, workspace_);
      });
    }
    put_guards_and_count(call, rank);
    if (keep_local) std::copy(sum_g, sum_g + 2 * C_, local_.begin());
  }

  void exchange(comm::Communicator& comm, Call& call) override {
    if (call.collective) comm.allreduce_sum(buffer_.data(), buffer_.size());
    std::copy(buffer_.begin(), buffer_.begin() + kGuardSlots, call.verdict);
    call.verdict[kGuardSlots] = buffer_.back();
    call.host_verdict = true;
  }

  bool refine_shift(Call& call) override {
    const double* const sums = buffer_.data() + kGuardSlots;
    const double m = buffer_.back();
    T* const to = call.collective ? scratch_.shift.data() : scratch_.local_shift.data();
    bool moved = false;
    for (std::int64_t c = 0; c < C_; ++c) {
      moved |= core::refined_shift<T>(sums[c], sums[C_ + c], m, scratch_.shift[c], to[c]);
    }
    return moved;
  }

  void finalize_forward(const Call& call, const core::ForwardFinalize& f) override {
    const double* const sums = buffer_.data() + kGuardSlots;
    const double m = buffer_.back();
    const double a =
        f.track ? core::running_factor(f.momentum, f.num_batches_tracked
                                                       ? *f.num_batches_tracked + 1
                                                       : 0)
                : 0.0;
    T* const coefficients = scratch_.coefficients.data();
    for (std::int64_t c = 0; c < C_; ++c) {
      core::finalize_forward_channel<T>(f, sums, C_, c, m, a, shift_of(call),
                                        call.collective ? scratch_.shift.data() : nullptr,
                                        coefficients);
    }
    if (f.track && f.num_batches_tracked != nullptr) ++*f.num_batches_tracked;
  }

  void finalize_running(const Call&, double eps, bool affine, const void* weight,
                        const void* bias, const void* running_mean,
                        const void* running_var) override {
    T* const coefficients = scratch_.coefficients.data();
    for (std::int64_t c = 0; c < C_; ++c) {
      core::finalize_running_channel<T>(eps, affine, weight, bias, as<T>(running_mean),
                                        as<T>(running_var), C_, c, coefficients);
    }
  }

  void finalize_backward(const Call&, const core::BackwardFinalize& f) override {
    const double* const sums = buffer_.data() + kGuardSlots;
    const double m = buffer_.back();
    T* const coefficients = scratch_.coefficients.data();
    for (std::int64_t c = 0; c < C_; ++c) {
      core::finalize_backward_channel<T>(f, sums, local_.data(), C_, c, m, coefficients);
    }
  }

  void normalize(const Call& call, const void* x, const void* z, void* y, void* mask) override {
    const auto co = core::affine_arrays<const T>(scratch_.coefficients.data(), C_);
    cpu::normalize(call.g, as<T>(x), as<T>(z), co.center, co.scale, co.shift, relu_, as<T>(y),
                   as<cpu::MaskByte>(mask));
  }

  void backward_elemt(const Call& call, const void* x, const void* dy, const void* y,
                      const void* mask, void* dx, void* dz) override {
    const auto co = core::backward_arrays<const T>(scratch_.coefficients.data(), C_);
    cpu::backward_elemt(call.g, as<T>(x), as<T>(dy), as<T>(y), as<cpu::MaskByte>(mask),
                        co.center, co.a, co.k, co.d, as<T>(dx), as<T>(dz));
  }

 private:
  // The shift of a forward's sums: the group's, or after a refinement without communication
  // this rank's own.
  const T* shift_of(const Call& call) const {
    return call.round > 1 && !call.collective ? scratch_.local_shift.data()
                                              : scratch_.shift.data();
  }

  // Runs a reduction; an allocation failure (the workspace grew with the thread count) becomes
  // this rank's error, so that it still enters the collective and reports it there.
  template <class F>
  static void local_phase(Call& call, F&& compute) {
    try {
      compute();
    } catch (const std::bad_alloc&) {
      call.err = {core::Arg::memory, core::Problem::out_of_memory, {}};
    }
  }

  void put_guards_and_count(Call& call, int rank) {
    if (call.err) {
      call.count = 0;
      std::fill(buffer_.begin() + kGuardSlots, buffer_.end(), 0.0);  // a failing rank's zeros
    }
    core::put_guards(buffer_.data(), rank, call.err, call.fp);
    buffer_.back() = static_cast<double>(call.count);
  }

  std::int64_t C_;
  bool relu_;  // the plan's activation ends in a relu
  std::vector<double> buffer_;  // [guards | 2C sums | m]
  std::vector<double> local_;   // this rank's backward sums (local parameter gradients)
  Scratch<T> scratch_;
  Workspace workspace_;
};

}  // namespace

}  // namespace syncbn::cpu

namespace syncbn::core {

std::unique_ptr<Backend> make_cpu_backend(const syncbn_config_t& config) {
  if (config.dtype == SYNCBN_FLOAT64) return std::make_unique<cpu::CpuBackend<double>>(config);
  return std::make_unique<cpu::CpuBackend<float>>(config);
}

}  // namespace syncbn::core
