// The CUDA backend of plans (core/backend.hpp): device memory, and each step of a call enqueued
// on the caller's stream (the kernels are in kernels.cu):
//
//   reduce (local sums and guards into the packed buffer) -> exchange -> finalize (verdict,
//   statistics, coefficients) -> elementwise pass.
//
// The exchange is the communicator's (comm::Communicator::allreduce_sum of a DeviceSum, which
// stages through this plan's pinned mirror where it must); the backend only learns where the
// group's sum is: its own (a group of one), on the host (MPI: the host reaches the verdict as on
// the CPU), or on the device only (NCCL, custom: the finalize kernels check the guards, and keep
// a record for async_error).
//
// Ordering: a plan's device buffers are shared by its calls. Every call waits for the previous
// call's end (an event recorded at the end of every call), whatever their streams, outside
// stream capture; inside a capture the caller orders the graph's launches (syncbn.h).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>

#include "comm/device_sum.hpp"
#include "core/backend.hpp"
#include "core/error.hpp"
#include "cuda/kernels.hpp"
#include "cuda/runtime.hpp"

namespace syncbn::cuda {
namespace {

using core::ArgError;
using core::Call;
using core::kGuardSlots;

std::size_t round_up(std::size_t bytes) { return (bytes + 255) / 256 * 256; }

class CudaBackend final : public core::Backend {
 public:
  explicit CudaBackend(const syncbn_config_t& config) : config_(config) {}

  ~CudaBackend() override {
    DeviceSwitch on(device_);
    mirror_.reset();
    if (block_ != nullptr) cudaFree(block_);
    if (record_host_ != nullptr) cudaFreeHost(record_host_);
    if (call_done_ != nullptr) cudaEventDestroy(call_done_);
  }
  CudaBackend(const CudaBackend&) = delete;
  CudaBackend& operator=(const CudaBackend&) = delete;

  // Device memory, pinned memory and the event, before the creation collective (a rank that
  // cannot get them reports it there).
  ArgError init(const comm::Communicator& comm) {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0 ||
        cudaGetDevice(&device_) != cudaSuccess) {
      cudaGetLastError();
      return {core::Arg::device, core::Problem::no_device, {}};
    }
    if (comm.device() >= 0 && comm.device() != device_) {
      return {core::Arg::device, core::Problem::wrong_device,
              "current device " + std::to_string(device_) + ", NCCL communicator's " +
                  std::to_string(comm.device())};
    }
    group_size_ = comm.size();
    const std::int64_t C = config_.num_features;
    st_.channels = C;
    st_.dtype = config_.dtype;
    st_.activation = config_.activation;
    if (cudaDeviceGetAttribute(&st_.multiprocessors, cudaDevAttrMultiProcessorCount, device_) !=
        cudaSuccess) {
      st_.multiprocessors = 1;
    }
    st_.partial_capacity = partial_capacity(C);
    const std::size_t param_bytes =
        config_.dtype == SYNCBN_FLOAT64 ? sizeof(double) : sizeof(float);
    const auto c = static_cast<std::size_t>(C);
    slots_ = kGuardSlots + 2 * c + 1;
    const std::size_t sizes[] = {
        slots_ * sizeof(double),                                              // buffer
        2 * c * sizeof(double),                                               // local
        4 * c * param_bytes,                                                  // coefficients
        c * param_bytes,                                                      // shift
        c * param_bytes,                                                      // local_shift
        2 * static_cast<std::size_t>(st_.partial_capacity) * sizeof(double),  // partials
        c * sizeof(unsigned),                                                 // counters
        sizeof(long long),                                                    // num_batches_next
        sizeof(unsigned long long),                                           // calls
        sizeof(AsyncRecord)};                                                 // record
    std::size_t total = 0;
    for (std::size_t s : sizes) total += round_up(s);
    const auto oom = [&](cudaError_t e) {
      cudaGetLastError();
      return ArgError{core::Arg::memory, core::Problem::out_of_memory,
                      std::to_string(total) + " bytes of device memory: " +
                          cudaGetErrorString(e)};
    };
    if (cudaError_t e = cudaMalloc(&block_, total); e != cudaSuccess) return oom(e);
    // Zeroed on a stream of the library's own and waited for there: a cudaMemset on the legacy
    // stream and a device-wide synchronization would wait for every blocking stream and break
    // another thread's graph capture.
    {
      cudaStream_t init_stream = nullptr;
      cudaError_t e = cudaStreamCreateWithFlags(&init_stream, cudaStreamNonBlocking);
      if (e == cudaSuccess) e = cudaMemsetAsync(block_, 0, total, init_stream);
      if (e == cudaSuccess) e = cudaStreamSynchronize(init_stream);
      if (init_stream != nullptr) cudaStreamDestroy(init_stream);
      if (e != cudaSuccess) return oom(e);
    }
    auto* p = static_cast<char*>(block_);
    constexpr int kParts = sizeof sizes / sizeof sizes[0];
    void* parts[kParts];
    for (int i = 0; i < kParts; ++i) {
      parts[i] = p;
      p += round_up(sizes[i]);
    }
    st_.buffer = static_cast<double*>(parts[0]);
    st_.local = static_cast<double*>(parts[1]);
    st_.coefficients = parts[2];
    st_.shift = parts[3];
    st_.local_shift = parts[4];
    st_.partials = static_cast<double*>(parts[5]);
    st_.counters = static_cast<unsigned*>(parts[6]);
    st_.num_batches_next = static_cast<long long*>(parts[7]);
    st_.calls = static_cast<unsigned long long*>(parts[8]);
    st_.record = static_cast<AsyncRecord*>(parts[9]);
    // Pinned host memory: the packed buffer's mirror for the communicator's host-side
    // exchanges, and the async record's copy (every device-to-host copy is asynchronous on the
    // caller's stream, so none waits for unrelated work).
    try {
      mirror_ = std::make_unique<comm::HostMirror>(slots_);
    } catch (const core::Failure& f) {
      return ArgError{core::Arg::memory, core::Problem::out_of_memory, f.what()};
    }
    if (cudaError_t e = cudaMallocHost(&record_host_, sizeof(AsyncRecord)); e != cudaSuccess) {
      return oom(e);
    }
    if (cudaError_t e = cudaEventCreateWithFlags(&call_done_, cudaEventDisableTiming);
        e != cudaSuccess) {
      return oom(e);
    }
    return {};
  }

  // The current device must be the plan's, and the stream must belong to it; otherwise this
  // rank still takes part, on the plan device's legacy default stream. Then the call waits for
  // the end of the plan's previous call (outside capture).
  void check_call(Call& call) override {
    cudaGetLastError();  // an error an earlier launch of the caller's left behind
    int current = -1;
    if (cudaGetDevice(&current) != cudaSuccess) cudaGetLastError();
    bool ok = current == device_;
    DeviceSwitch on(device_);  // the queries and the fallback below are the plan device's
    const cudaStream_t stream = as_stream(call.stream);
    const bool capturing = is_capturing(stream);
    if (ok && stream != nullptr && !capturing) {
      // Outside capture only (the query is not documented as legal during capture; a captured
      // call on a stream of another device fails when its kernels are launched into it), and a
      // query the runtime cannot answer is no verdict: the launches would report a mismatch.
      int stream_device = -1;
      if (cudaStreamGetDevice(stream, &stream_device) != cudaSuccess) {
        cudaGetLastError();
        stream_device = device_;
      }
      ok = stream_device == device_;
    }
    if (!ok) {
      core::require(call.err, false, core::Arg::device, core::Problem::wrong_device);
      // Outside capture the call goes to the plan device's legacy stream; inside one it stays
      // on the caller's (a launch on the legacy stream would invalidate the capture), so that
      // the captured call carries this rank's error to every replay.
      if (!capturing) call.stream = nullptr;
    }
    call_stream_ = as_stream(call.stream);
    order_ = !capturing;
    // After the previous call, whatever its stream (a wait on an event of the same stream costs
    // nothing, and a new stream may have the address of a destroyed one).
    if (order_ && ended_) {
      if (cudaStreamWaitEvent(call_stream_, call_done_, 0) != cudaSuccess) cudaGetLastError();
    }
  }

  void end_call(const Call& call) noexcept override {
    (void)call;
    if (!order_) return;
    DeviceSwitch on(device_);
    if (cudaEventRecord(call_done_, call_stream_) != cudaSuccess) {
      cudaGetLastError();
      return;
    }
    ended_ = true;
  }

  void reduce_moments(Call& call, int rank, const void* x,
                      const std::int64_t* num_batches_tracked) override {
    DeviceSwitch on(device_);
    GuardWrite gw = guard_write(rank, call, num_batches_tracked);
    reduce_or_guards(call, rank, gw, false, [&] {
      cuda::reduce_moments(st_, call.g, x, shift_of(call), gw, call.stream);
    });
  }

  // The host sees no sums here: a plan's calls refine their shift until a collective call has
  // (its first forward_training), each channel on the device where its sums show it stale. A
  // first call that failed on the device leaves the shift at 0 for one more call.
  bool refine_shift(Call& call) override {
    if (shift_ready_) return false;
    DeviceSwitch on(device_);
    try {
      cuda::refine_shift(st_, call.collective ? group_size_ : 1, false, st_.shift,
                         call.collective ? st_.shift : st_.local_shift, call.stream);
    } catch (const core::Failure& f) {  // round 2 still runs, carrying this rank's failure
      if (!call.err) call.err = {core::Arg::device, core::Problem::cuda_failed, f.what()};
      call.count = 0;
    }
    if (call.collective) shift_ready_ = true;
    return true;
  }

  void reduce_grad(Call& call, int rank, const void* x, const void* dy, const void* y,
                   const void* mask, const void* save_mean, bool keep_local) override {
    DeviceSwitch on(device_);
    GuardWrite gw = guard_write(rank, call, nullptr);
    reduce_or_guards(call, rank, gw, keep_local, [&] {
      cuda::reduce_grad(st_, call.g, x, dy, y, mask, save_mean, keep_local, gw, call.stream);
    });
  }

  void exchange(comm::Communicator& comm, Call& call) override {
    DeviceSwitch on(device_);
    call.host_verdict = true;
    comm::SumAt at = comm::SumAt::own;
    if (call.collective) {
      Substitute sub{this, &call, comm.rank()};
      comm::DeviceSum sum;
      sum.buffer = st_.buffer;
      sum.count = slots_;
      sum.stream = call.stream;
      sum.mirror = mirror_.get();
      if (guards_unwritten_) sum.unwritten = "the guards could not be written on the device";
      sum.substitute = &Substitute::write;
      sum.context = &sub;
      sum.host_reads = kGuardSlots;  // the verdict's: the guards, and m in the last slot
      at = comm.allreduce_sum(sum);
    }
    switch (at) {
      case comm::SumAt::own:  // this rank's own guards and count are the verdict's
        std::memcpy(call.verdict, last_guards_, sizeof last_guards_);
        call.verdict[kGuardSlots] = static_cast<double>(call.count);
        return;
      case comm::SumAt::host:
        std::memcpy(call.verdict, mirror_->data(), kGuardSlots * sizeof(double));
        call.verdict[kGuardSlots] = mirror_->data()[slots_ - 1];
        return;
      case comm::SumAt::device:
        call.host_verdict = false;
        return;
    }
  }

  void finalize_forward(const Call& call, const core::ForwardFinalize& f) override {
    DeviceSwitch on(device_);
    cuda::finalize_forward(st_, f, shift_of(call), call.collective ? st_.shift : nullptr,
                           call.stream);
  }

  void finalize_running(const Call& call, double eps, bool affine, const void* weight,
                        const void* bias, const void* running_mean,
                        const void* running_var) override {
    DeviceSwitch on(device_);
    cuda::finalize_running(st_, eps, affine, weight, bias, running_mean, running_var,
                           call.stream);
  }

  void finalize_backward(const Call& call, const core::BackwardFinalize& f) override {
    DeviceSwitch on(device_);
    cuda::finalize_backward(st_, f, call.stream);
  }

  void normalize(const Call& call, const void* x, const void* z, void* y, void* mask) override {
    DeviceSwitch on(device_);
    cuda::normalize(st_, call.g, x, z, y, mask, call.stream);
  }

  void backward_elemt(const Call& call, const void* x, const void* dy, const void* y,
                      const void* mask, void* dx, void* dz) override {
    DeviceSwitch on(device_);
    cuda::backward_elemt(st_, call.g, x, dy, y, mask, dx, dz, call.stream);
  }

  syncbn_status_t async_error(comm::Communicator& comm, std::uint64_t plan_tag,
                              const std::string& context, void* stream) override {
    DeviceSwitch on(device_);
    comm.check_usable();
    const cudaStream_t s = as_stream(stream);
    // The record, copied on the caller's stream (ordered after its calls) into pinned memory.
    check_cuda(cudaMemcpyAsync(record_host_, st_.record, sizeof(AsyncRecord),
                               cudaMemcpyDeviceToHost, s),
               "cudaMemcpyAsync (async record)");
    if (comm.device() >= 0) {
      // NCCL: the stream holds this plan's collectives; wait for them by the deadline.
      core::with_context(context, [&] { comm.wait_stream(stream); });
    } else {
      check_cuda(cudaStreamSynchronize(s), "cudaStreamSynchronize");
    }
    const AsyncRecord record = *record_host_;
    if (record.flag == 0) return SYNCBN_SUCCESS;
    // Cleared in stream order too, so that a failure recorded by a later call is not lost.
    check_cuda(cudaMemsetAsync(&st_.record->flag, 0, sizeof(int), s),
               "cudaMemsetAsync (clear async record)");
    check_cuda(cudaStreamSynchronize(s), "cudaStreamSynchronize");
    // The verdict the device reached, reached again on the host from the same sums: the same
    // status and message a CPU plan's call would have given.
    try {
      const core::Fingerprint fp{plan_tag, static_cast<core::Op>(record.op), record.seq};
      core::check_verdict(record.slots, comm.size(), comm.rank(), ArgError{}, fp,
                          record.slots[kGuardSlots], record.track != 0);
      core::fail(SYNCBN_ERROR_INTERNAL, "the device recorded a failed call the host cannot explain");
    } catch (const core::Failure& f) {
      core::set_last_error(f.what());
      return f.status();
    }
  }

  bool exposed_to_transport() const override { return true; }

 private:
  static cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

  // The shift of a forward's sums (device memory): the group's, or after a refinement without
  // communication this rank's own.
  const void* shift_of(const Call& call) const {
    return call.round > 1 && !call.collective ? st_.local_shift : st_.shift;
  }

  // Whether stream is being captured (a query that fails counts as a capture: no event is
  // recorded or waited on then).
  static bool is_capturing(cudaStream_t stream) {
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(stream, &status) != cudaSuccess) {
      cudaGetLastError();
      return true;
    }
    return status != cudaStreamCaptureStatusNone;
  }

  // The contribution of a rank whose device buffer cannot be read (comm::DeviceSum): zeros and
  // its failing guards, count 0.
  struct Substitute {
    CudaBackend* backend;
    Call* call;
    int rank;
    static void write(void* context, double* host, const std::string& why) {
      auto& s = *static_cast<Substitute*>(context);
      Call& call = *s.call;
      if (!call.err) call.err = {core::Arg::device, core::Problem::cuda_failed, why};
      call.count = 0;
      std::fill(host, host + s.backend->slots_, 0.0);
      core::put_guards(host, s.rank, call.err, call.fp);
    }
  };

  // What the reduction writes next to this rank's sums (a failing rank: its error, count 0);
  // the host keeps the guards for a verdict it reaches alone.
  GuardWrite guard_write(int rank, const Call& call, const std::int64_t* num_batches_tracked) {
    GuardWrite gw{};
    core::put_guards(gw.slots, rank, call.err, call.fp);
    std::memcpy(last_guards_, gw.slots, sizeof last_guards_);
    gw.count = call.err ? 0.0 : static_cast<double>(call.count);
    gw.num_batches_tracked =
        call.err ? nullptr : reinterpret_cast<const long long*>(num_batches_tracked);
    gw.rank = rank;
    gw.collective = call.collective;
    gw.repeat = call.round > 1;
    return gw;
  }

  // Runs the reduction; if it cannot be launched, this rank still writes its guards, carrying
  // the failure, so that it joins the allreduce like every other rank.
  template <class F>
  void reduce_or_guards(Call& call, int rank, GuardWrite& gw, bool zero_local, F&& reduce) {
    guards_unwritten_ = false;
    if (!call.err && call.count > 0) {
      try {
        reduce();
        return;
      } catch (const core::Failure& f) {
        call.err = {core::Arg::device, core::Problem::cuda_failed, f.what()};
        call.count = 0;
        gw = guard_write(rank, call, nullptr);
      }
    }
    if (call.err) call.count = 0;
    if (!call.collective) return;  // nobody reads the buffer: this rank's verdict is its own
    try {
      write_guards(st_, gw, zero_local, call.stream);
    } catch (const core::Failure& f) {
      // Nothing can be launched: the MPI exchanges send the failing guards from pinned host
      // memory instead; over NCCL the device buffer still holds the previous call's group sum,
      // whose participation count makes every rank's device verdict fail.
      if (!call.err) call.err = {core::Arg::device, core::Problem::cuda_failed, f.what()};
      call.count = 0;
      guard_write(rank, call, nullptr);  // the host's copy carries the failure (a group of one)
      guards_unwritten_ = true;
    }
  }

  syncbn_config_t config_;
  int device_ = 0;
  void* block_ = nullptr;                 // one cudaMalloc carved into st_'s arrays
  std::size_t slots_ = 0;                 // the packed buffer's length
  std::unique_ptr<comm::HostMirror> mirror_;  // pinned: the packed buffer's host copy
  AsyncRecord* record_host_ = nullptr;    // pinned: async_error's copy of the record
  cudaEvent_t call_done_ = nullptr;       // recorded at the end of the last ordered call
  cudaStream_t call_stream_ = nullptr;    // the current call's stream
  bool order_ = false;                    // the current call takes part in the ordering
  bool ended_ = false;                    // call_done_ has been recorded
  double last_guards_[kGuardSlots] = {};  // this rank's guards of the current call
  bool guards_unwritten_ = false;         // this call's guards are not on the device
  int group_size_ = 1;                    // the communicator's size
  bool shift_ready_ = false;              // a collective call has refined the shared shift
  DeviceState st_;
};

}  // namespace

}  // namespace syncbn::cuda

namespace syncbn::core {

std::unique_ptr<Backend> make_cuda_backend(const syncbn_config_t& config,
                                           const comm::Communicator& comm, ArgError& err) {
  auto backend = std::make_unique<cuda::CudaBackend>(config);
  err = backend->init(comm);
  if (err) return nullptr;
  return backend;
}

}  // namespace syncbn::core
