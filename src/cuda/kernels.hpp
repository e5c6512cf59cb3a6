// src/cuda: the CUDA kernels, nothing else: per-channel local reductions, the per-channel
// finalize (the shared math of core/finalize.hpp, run on the device so that no call waits for
// the host), and the elementwise passes, all enqueued on the caller's stream. No validation and
// no communication (src/core and src/comm own those); every function trusts its arguments.
// This header is plain C++ (no CUDA headers), for src/core to include.
//
// Tensors are (outer, C, inner) (core/geometry.hpp). Reductions write the group's packed buffer
// [guards | 2C sums | m] in place, so that the allreduce can follow at once: a grid of blocks
// makes fp64 partial sums, and the last block of each channel (or channel tile) to finish merges
// them in a fixed order, so results are deterministic run to run. Within a block, elements are
// first summed in the accumulation type (fp32 for fp32/fp16/bf16, fp64 for fp64) over at most
// one 16-byte vector or four rows, then in fp64: fp32 never sums more than 8 values.
#ifndef SYNCBN_CUDA_KERNELS_HPP
#define SYNCBN_CUDA_KERNELS_HPP

#include <cstddef>
#include <cstdint>

#include "core/finalize.hpp"
#include "core/geometry.hpp"
#include "core/guard.hpp"
#include "syncbn/syncbn.h"

namespace syncbn::cuda {

using core::Geometry;

// What the device keeps when a collective verdict fails there (NCCL communicators): the
// group's guard slots and count, and which call it was, for the host to turn into the message
// the CPU path gives (syncbn_plan_get_async_error). flag != 0: a record is held.
struct AsyncRecord {
  int flag;
  int track;          // the call trained with running statistics (m >= 2 needed)
  std::uint32_t op;   // core::Op
  std::uint64_t seq;  // the call's sequence number
  double slots[core::kGuardSlots + 1];  // guards, then m
};

// Device memory of one plan (allocated and owned by src/core).
struct DeviceState {
  std::int64_t channels = 0;
  syncbn_dtype_t dtype = SYNCBN_FLOAT32;
  int multiprocessors = 1;
  double* buffer = nullptr;      // [guards (kGuardSlots) | 2C | m], the allreduced buffer
  double* local = nullptr;       // 2C: this rank's sums, kept across the allreduce
  void* coefficients = nullptr;  // 4C of the accumulation type (float, or double for fp64)
  double* partials = nullptr;    // 2 * partial_capacity
  std::int64_t partial_capacity = 0;
  unsigned* counters = nullptr;  // C: blocks of a tile done, modulo the tile's splits
  long long* num_batches_next = nullptr;  // 1
  unsigned long long* calls = nullptr;    // 1: collective calls made, the sequence number's
                                          // source (on the device, so that graph replays count)
  AsyncRecord* record = nullptr;          // 1
};

// Partial sums a plan of C channels needs room for (pairs of doubles).
std::int64_t partial_capacity(std::int64_t channels);

// The guard slots and count a reduction writes into the buffer, and num_batches_tracked to read
// (its successor goes to num_batches_next; NULL: 0). The device replaces the sequence pair with
// its own call counter (advanced by collective calls only), and flags a negative
// num_batches_tracked as this rank's error.
struct GuardWrite {
  double slots[core::kGuardSlots];
  double count;
  const long long* num_batches_tracked;
  int rank;
  bool collective;  // a collective call: it takes the call counter's next number
};

// Local shifted moments of x into the buffer (unshifted in fp64 before they are written, see
// core::unshift_moments), then the guards. g.count_per_channel() > 0.
void reduce_moments(const DeviceState& st, const Geometry& g, const void* x, const GuardWrite& gw,
                    void* stream);

// Local sum dy and sum dy (x - save_mean) into the buffer, and into st.local when keep_local.
void reduce_grad(const DeviceState& st, const Geometry& g, const void* x, const void* dy,
                 const void* save_mean, bool keep_local, const GuardWrite& gw, void* stream);

// The buffer of a rank with nothing to add (an empty batch, or arguments it rejected): zeros
// and the guards.
void write_guards(const DeviceState& st, const GuardWrite& gw, bool zero_local, void* stream);

// From the group's buffer: the verdict (core::verdict_of); then per channel
// core::finalize_forward_channel (mean, invstd, the coefficients, the saved and the running
// statistics). On a failed verdict: coefficients and saved statistics NaN, running statistics
// untouched, the record kept.
void finalize_forward(const DeviceState& st, const core::ForwardFinalize& f, void* stream);

// Affine coefficients from running statistics (inference).
void finalize_running(const DeviceState& st, double eps, bool affine, const void* weight,
                      const void* bias, const void* running_mean, const void* running_var,
                      void* stream);

// The same from the backward's buffer (core::finalize_backward_channel).
void finalize_backward(const DeviceState& st, const core::BackwardFinalize& f, void* stream);

// The normalize pass: y = (x - center) * scale + shift with the coefficients of
// finalize_forward/_running.
void normalize(const DeviceState& st, const Geometry& g, const void* x, void* y, void* stream);

// dx = a dy - k (x - center) + d with the coefficients of finalize_backward.
void backward_elemt(const DeviceState& st, const Geometry& g, const void* x, const void* dy,
                    void* dx, void* stream);

}  // namespace syncbn::cuda

#endif  // SYNCBN_CUDA_KERNELS_HPP
