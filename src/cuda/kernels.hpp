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
  syncbn_activation_t activation = SYNCBN_ACTIVATION_NONE;
  int multiprocessors = 1;
  double* buffer = nullptr;      // [guards (kGuardSlots) | 2C | m], the allreduced buffer
  double* local = nullptr;       // 2C: this rank's sums, kept across the allreduce
  void* coefficients = nullptr;  // 4C of the accumulation type (float, or double for fp64)
  void* shift = nullptr;         // C of the same type: the group's shared shift (core/finalize.hpp)
  void* local_shift = nullptr;   // C: a call without communication refines its own here
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
  bool repeat;      // a forward's round 2: the same number as its round 1
};

// Local moments of x around shift (C values of the accumulation type: sum (x - K) and
// sum (x - K)^2, see core::moments_from_sums) into the buffer, then the guards.
// g.count_per_channel() > 0.
void reduce_moments(const DeviceState& st, const Geometry& g, const void* x, const void* shift,
                    const GuardWrite& gw, void* stream);

// Local sum g and sum g (x - save_mean) into the buffer, and into st.local when keep_local; g = dy,
// or dy where the fused forward's mask bytes are not 0 (mask not NULL), else dy * (y > 0) where y
// (its output) is not NULL.
void reduce_grad(const DeviceState& st, const Geometry& g, const void* x, const void* dy,
                 const void* y, const void* mask, const void* save_mean, bool keep_local,
                 const GuardWrite& gw, void* stream);

// The buffer of a rank with nothing to add (an empty batch, or arguments it rejected): zeros
// and the guards.
void write_guards(const DeviceState& st, const GuardWrite& gw, bool zero_local, void* stream);

// From the group's buffer of a round 1 around shift: per channel core::refined_shift into out
// (out = shift where the verdict fails).
void refine_shift(const DeviceState& st, int group_size, bool track, const void* shift, void* out,
                  void* stream);

// From the group's buffer around shift: the verdict (core::verdict_of); then per channel
// core::finalize_forward_channel (mean, invstd, the coefficients, the saved and the running
// statistics, and next_shift unless NULL). On a failed verdict: coefficients and saved
// statistics NaN, running statistics and next_shift untouched, the record kept.
void finalize_forward(const DeviceState& st, const core::ForwardFinalize& f, const void* shift,
                      void* next_shift, void* stream);

// Affine coefficients from running statistics (inference).
void finalize_running(const DeviceState& st, double eps, bool affine, const void* weight,
                      const void* bias, const void* running_mean, const void* running_var,
                      void* stream);

// The same from the backward's buffer (core::finalize_backward_channel).
void finalize_backward(const DeviceState& st, const core::BackwardFinalize& f, void* stream);

// The normalize pass: y = act((x - center) * scale + shift [+ z]) with the coefficients of
// finalize_forward/_running and st.activation (z: ADD_RELU's residual, else NULL); with an
// activation, mask (bytes, not NULL) = y > 0.
void normalize(const DeviceState& st, const Geometry& g, const void* x, const void* z, void* y,
               void* mask, void* stream);

// dx = a g - k (x - center) + d with the coefficients of finalize_backward, g = dy, or with
// st.activation dy masked by the mask bytes (not NULL) or by y > 0, and dz = g where dz is not
// NULL.
void backward_elemt(const DeviceState& st, const Geometry& g, const void* x, const void* dy,
                    const void* y, const void* mask, void* dx, void* dz, void* stream);

}  // namespace syncbn::cuda

#endif  // SYNCBN_CUDA_KERNELS_HPP
