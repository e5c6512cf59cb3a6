// The CUDA half of the plans: device memory, and the three calls as sequences of enqueued work
// on the caller's stream (src/cuda holds the kernels):
//
//   reduction (local sums and guards into the packed buffer) -> exchange -> finalize (verdict,
//   statistics, coefficients) -> elementwise pass.
//
// The exchange depends on the communicator (comm::DeviceBuffers): nothing for a group of one; a
// pinned-memory round trip with one stream synchronization for MPI, whose verdict the host then
// reaches as on the CPU; one enqueued ncclAllReduce for NCCL, whose verdict only the device
// sees (the finalize kernels check the guards, and keep a record for async_error).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>

#include "core/error.hpp"
#include "core/plan.hpp"
#include "cuda/kernels.hpp"

namespace syncbn::core {
namespace {

void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    cudaGetLastError();  // clear a non-sticky error
    fail(SYNCBN_ERROR_INTERNAL, std::string(what) + " failed: " + cudaGetErrorString(e));
  }
}

cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

// Makes device current for its lifetime.
class DeviceSwitch {
 public:
  explicit DeviceSwitch(int device) {
    int current = -1;
    if (cudaGetDevice(&current) != cudaSuccess) {
      cudaGetLastError();
      current = -1;
    }
    if (current != device) {
      previous_ = current;
      cudaSetDevice(device);
    }
  }
  ~DeviceSwitch() {
    if (previous_ >= 0) cudaSetDevice(previous_);
  }
  DeviceSwitch(const DeviceSwitch&) = delete;
  DeviceSwitch& operator=(const DeviceSwitch&) = delete;

 private:
  int previous_ = -1;
};

std::size_t round_up(std::size_t bytes) { return (bytes + 255) / 256 * 256; }

}  // namespace

// One cudaMalloc carved into the arrays of cuda::DeviceState, and pinned staging for host
// communicators.
class CudaResources final : public DeviceResources {
 public:
  ~CudaResources() override {
    DeviceSwitch on(device);
    if (block != nullptr) cudaFree(block);
    if (staging != nullptr) cudaFreeHost(staging);
  }
  int device = 0;
  void* block = nullptr;
  double* staging = nullptr;  // the packed buffer's host copy (DeviceBuffers::stage)
  cuda::DeviceState state;
};

ArgError Plan::init_cuda() {
  auto res = std::make_unique<CudaResources>();
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0 ||
      cudaGetDevice(&res->device) != cudaSuccess) {
    cudaGetLastError();
    return {Arg::device, Problem::no_device, {}};
  }
  if (comm_->device() >= 0 && comm_->device() != res->device) {
    return {Arg::device, Problem::wrong_device,
            "current device " + std::to_string(res->device) + ", NCCL communicator's " +
                std::to_string(comm_->device())};
  }
  const std::int64_t C = config_.num_features;
  cuda::DeviceState& st = res->state;
  st.channels = C;
  st.dtype = config_.dtype;
  if (cudaDeviceGetAttribute(&st.multiprocessors, cudaDevAttrMultiProcessorCount, res->device) !=
      cudaSuccess) {
    st.multiprocessors = 1;
  }
  st.partial_capacity = cuda::partial_capacity(C);
  const std::size_t param_bytes = config_.dtype == SYNCBN_FLOAT64 ? sizeof(double) : sizeof(float);
  const auto c = static_cast<std::size_t>(C);
  const std::size_t sizes[] = {
      (kGuardSlots + 2 * c + 1) * sizeof(double),                           // buffer
      2 * c * sizeof(double),                                               // local
      4 * c * param_bytes,                                                  // coefficients
      2 * static_cast<std::size_t>(st.partial_capacity) * sizeof(double),   // partials
      c * sizeof(unsigned),                                                 // counters
      sizeof(long long),                                                    // num_batches_next
      sizeof(unsigned long long),                                           // calls
      sizeof(cuda::AsyncRecord)};                                           // record
  std::size_t total = 0;
  for (std::size_t s : sizes) total += round_up(s);
  const auto oom = [&](cudaError_t e) {
    cudaGetLastError();
    return ArgError{Arg::memory, Problem::out_of_memory,
                    std::to_string(total) + " bytes of device memory: " + cudaGetErrorString(e)};
  };
  if (cudaError_t e = cudaMalloc(&res->block, total); e != cudaSuccess) return oom(e);
  if (cudaError_t e = cudaMemset(res->block, 0, total); e != cudaSuccess) return oom(e);
  if (cudaError_t e = cudaDeviceSynchronize(); e != cudaSuccess) return oom(e);
  auto* p = static_cast<char*>(res->block);
  constexpr int kParts = sizeof sizes / sizeof sizes[0];
  void* parts[kParts];
  for (int i = 0; i < kParts; ++i) {
    parts[i] = p;
    p += round_up(sizes[i]);
  }
  st.buffer = static_cast<double*>(parts[0]);
  st.local = static_cast<double*>(parts[1]);
  st.coefficients = parts[2];
  st.partials = static_cast<double*>(parts[3]);
  st.counters = static_cast<unsigned*>(parts[4]);
  st.num_batches_next = static_cast<long long*>(parts[5]);
  st.calls = static_cast<unsigned long long*>(parts[6]);
  st.record = static_cast<cuda::AsyncRecord*>(parts[7]);
  if (comm_->device_buffers() == comm::DeviceBuffers::stage) {
    if (cudaError_t e = cudaMallocHost(&res->staging, sizes[0]); e != cudaSuccess) return oom(e);
  }
  device_ = std::move(res);
  return {};
}

namespace {

CudaResources& resources(const std::unique_ptr<DeviceResources>& d) {
  return static_cast<CudaResources&>(*d);
}

// What the reduction writes next to this rank's sums (a failing rank: its error, count 0).
cuda::GuardWrite guard_write(int rank, const ArgError& err, const Fingerprint& fp,
                             std::int64_t count, const std::int64_t* num_batches_tracked,
                             bool collective = true) {
  cuda::GuardWrite gw{};
  put_guards(gw.slots, rank, err, fp);
  gw.count = err ? 0.0 : static_cast<double>(count);
  gw.num_batches_tracked = err ? nullptr : reinterpret_cast<const long long*>(num_batches_tracked);
  gw.rank = rank;
  gw.collective = collective;
  return gw;
}

// The device check every call makes (after clearing an error an earlier launch of the caller's
// left behind); on a mismatch the call still takes part in the collective, on the plan's device
// and its legacy default stream (the caller's stream belongs to another device).
void check_device(ArgError& err, const CudaResources& res, void*& stream) {
  cudaGetLastError();
  int current = -1;
  if (cudaGetDevice(&current) != cudaSuccess) cudaGetLastError();
  if (current != res.device) {
    require(err, false, Arg::device, Problem::wrong_device);
    stream = nullptr;
  }
}

// Runs the reduction; if it cannot be launched, this rank still writes its guards, carrying the
// failure, so that it joins the allreduce like every other rank.
template <class F>
void reduce_or_guards(CudaResources& res, int rank, ArgError& err, const Fingerprint& fp,
                      cuda::GuardWrite& gw, bool zero_local, void* stream, F&& reduce) {
  if (!err && gw.count > 0) {
    try {
      reduce();
      return;
    } catch (const Failure& f) {
      err = {Arg::device, Problem::cuda_failed, f.what()};
      gw = guard_write(rank, err, fp, 0, nullptr);
    }
  }
  cuda::write_guards(res.state, gw, zero_local, stream);
}

// Sums [guards | data_slots] over the group (see the file comment). Throws the verdict where the
// host can reach it; for NCCL only this rank's own error.
template <class Collective>
void exchange_device(comm::Communicator& comm, CudaResources& res, std::size_t data_slots,
                     const cuda::GuardWrite& gw, const ArgError& mine, const Fingerprint& fp,
                     bool track, void* stream, Collective&& collective_call) {
  const std::size_t n = kGuardSlots + data_slots;
  const std::size_t bytes = n * sizeof(double);
  double* const dbuf = res.state.buffer;
  double host[kGuardSlots + 1];
  switch (comm.device_buffers()) {
    case comm::DeviceBuffers::identity:
      std::memcpy(host, gw.slots, sizeof gw.slots);
      check_guards(host, 1, comm.rank(), mine, fp);
      check_batch_count(gw.count, track);
      return;
    case comm::DeviceBuffers::stage: {
      ArgError own = mine;
      try {
        check_cuda(cudaMemcpyAsync(res.staging, dbuf, bytes, cudaMemcpyDeviceToHost,
                                   as_stream(stream)),
                   "cudaMemcpyAsync (packed buffer to host)");
        check_cuda(cudaStreamSynchronize(as_stream(stream)), "cudaStreamSynchronize");
      } catch (const Failure& f) {  // join the allreduce anyway, carrying the failure
        if (!own) own = {Arg::device, Problem::cuda_failed, f.what()};
        std::fill(res.staging, res.staging + n, 0.0);
        put_guards(res.staging, comm.rank(), own, fp);
      }
      collective_call([&] { comm.allreduce_sum(res.staging, n); });
      check_guards(res.staging, comm.size(), comm.rank(), own, fp);
      check_batch_count(res.staging[n - 1], track);
      check_cuda(cudaMemcpyAsync(dbuf, res.staging, bytes, cudaMemcpyHostToDevice, as_stream(stream)),
                 "cudaMemcpyAsync (packed buffer to device)");
      return;
    }
    case comm::DeviceBuffers::after_sync:
      check_cuda(cudaStreamSynchronize(as_stream(stream)), "cudaStreamSynchronize");
      collective_call([&] { comm.allreduce_sum_device(dbuf, n, stream); });
      check_cuda(cudaMemcpy(host, dbuf, sizeof(double) * kGuardSlots, cudaMemcpyDeviceToHost),
                 "cudaMemcpy (guards to host)");
      check_cuda(cudaMemcpy(host + kGuardSlots, dbuf + n - 1, sizeof(double), cudaMemcpyDeviceToHost),
                 "cudaMemcpy (count to host)");
      check_guards(host, comm.size(), comm.rank(), mine, fp);
      check_batch_count(host[kGuardSlots], track);
      return;
    case comm::DeviceBuffers::on_stream:
      collective_call([&] { comm.allreduce_sum_device(dbuf, n, stream); });
      if (mine) fail_local(comm.rank(), mine);
      return;
  }
}

}  // namespace

void Plan::cuda_forward_batch_stats(const ForwardArgs& a, Op op) {
  CudaResources& res = resources(device_);
  const std::int64_t C = config_.num_features;
  const bool track = op == Op::forward_training && config_.track_running_stats;
  Geometry g;
  std::int64_t count = 0;
  ArgError err = check_forward(a, track, &g, &count);
  void* stream = a.stream;
  check_device(err, res, stream);
  const bool group = collective(op);
  if (!group) {  // this rank's own batch statistics: every verdict is known here
    if (err) fail_local(comm_->rank(), err);
    if (count == 0) return;  // an empty batch: nothing to normalize
  }
  DeviceSwitch on(res.device);

  const Fingerprint fp = group ? next_fingerprint(op) : Fingerprint{tag_, op, seq_};
  cuda::GuardWrite gw = guard_write(comm_->rank(), err, fp, count,
                                    track ? a.num_batches_tracked : nullptr, group);
  reduce_or_guards(res, comm_->rank(), err, fp, gw, false, stream,
                   [&] { cuda::reduce_moments(res.state, g, a.x, gw, stream); });
  if (err) count = 0;
  if (group) {
    exchange_device(*comm_, res, 2 * C + 1, gw, err, fp, track, stream,
                    [&](auto&& body) { collective_call(fp, body); });
  }
  if (!group && err) fail_local(comm_->rank(), err);  // the reduction could not be launched

  cuda::ForwardFinalize f{};
  f.group_size = group ? comm_->size() : 1;
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
  cuda::finalize_forward(res.state, f, stream);
  if (count > 0) cuda::affine(res.state, g, a.x, a.y, stream);
}

void Plan::cuda_forward_running_stats(const ForwardArgs& a) {
  CudaResources& res = resources(device_);
  Geometry g;
  std::int64_t count = 0;
  ArgError err = check_forward(a, false, &g, &count);
  require(err, a.running_mean != nullptr, Arg::running_mean);
  require(err, a.running_var != nullptr, Arg::running_var);
  void* stream = a.stream;
  check_device(err, res, stream);
  if (err) fail_local(comm_->rank(), err);  // no collective here: nobody else waits
  cuda::finalize_running(res.state, config_.eps, config_.affine != 0, a.weight, a.bias,
                         a.running_mean, a.running_var, stream);
  if (count > 0) cuda::affine(res.state, g, a.x, a.y, stream);
}

void Plan::cuda_backward(const BackwardArgs& a) {
  CudaResources& res = resources(device_);
  const std::int64_t C = config_.num_features;
  Geometry g;
  std::int64_t count = 0;
  ArgError err = check_backward(a, &g, &count);
  void* stream = a.stream;
  check_device(err, res, stream);
  DeviceSwitch on(res.device);

  const bool param_grads = config_.affine && (a.dweight != nullptr || a.dbias != nullptr);
  const bool keep_local = param_grads && !config_.global_param_grads;
  const Fingerprint fp = next_fingerprint(Op::backward);
  cuda::GuardWrite gw = guard_write(comm_->rank(), err, fp, count, nullptr);
  reduce_or_guards(res, comm_->rank(), err, fp, gw, keep_local, stream, [&] {
    cuda::reduce_grad(res.state, g, a.x, a.dy, a.save_mean, keep_local, gw, stream);
  });
  if (err) count = 0;
  exchange_device(*comm_, res, 2 * C + 1, gw, err, fp, false, stream,
                  [&](auto&& body) { collective_call(fp, body); });

  cuda::BackwardFinalize f{};
  f.group_size = comm_->size();
  f.affine = config_.affine != 0;
  f.global_param_grads = config_.global_param_grads != 0;
  f.weight = a.weight;
  f.save_mean = a.save_mean;
  f.save_invstd = a.save_invstd;
  f.dweight = a.dweight;
  f.dbias = a.dbias;
  f.op = static_cast<std::uint32_t>(Op::backward);
  cuda::finalize_backward(res.state, f, stream);
  if (count > 0) cuda::backward_elemt(res.state, g, a.x, a.dy, a.dx, stream);
}

syncbn_status_t Plan::cuda_async_error(void* stream) {
  CudaResources& res = resources(device_);
  DeviceSwitch on(res.device);
  comm_->check_usable();
  if (comm_->device() >= 0) {
    // NCCL: the stream holds this plan's collectives; wait for them by the deadline.
    with_context((name().empty() ? label() + " " : std::string()) + "syncbn_plan_get_async_error", [&] { comm_->wait_stream(stream); });
  } else {
    check_cuda(cudaStreamSynchronize(as_stream(stream)), "cudaStreamSynchronize");
  }
  cuda::AsyncRecord record;
  check_cuda(cudaMemcpy(&record, res.state.record, sizeof record, cudaMemcpyDeviceToHost),
             "cudaMemcpy (async record)");
  if (record.flag == 0) return SYNCBN_SUCCESS;
  const int cleared = 0;
  check_cuda(cudaMemcpy(&res.state.record->flag, &cleared, sizeof cleared, cudaMemcpyHostToDevice),
             "cudaMemcpy (clear async record)");
  // The verdict the device reached, reached again on the host from the same sums: the same
  // status and message a CPU plan's call would have given.
  try {
    const Fingerprint fp{tag_, static_cast<Op>(record.op), record.seq};
    check_guards(record.slots, comm_->size(), comm_->rank(), ArgError{}, fp);
    check_batch_count(record.slots[kGuardSlots], record.track != 0);
    fail(SYNCBN_ERROR_INTERNAL, "the device recorded a failed call the host cannot explain");
  } catch (const Failure& f) {
    set_last_error(f.what());
    return f.status();
  }
}

}  // namespace syncbn::core
