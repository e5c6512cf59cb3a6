// src/cpu: the CPU kernels, nothing else: per-channel local reductions and elementwise passes
// over dense tensors, parallel with OpenMP. No validation, no communication, no per-channel
// finalize math (src/core owns those); every function trusts its arguments. Tensors are seen as
// (outer, C, inner) (core/geometry.hpp).
#ifndef SYNCBN_CPU_KERNELS_HPP
#define SYNCBN_CPU_KERNELS_HPP

#include <cstdint>
#include <vector>

#include "core/geometry.hpp"

namespace syncbn::cpu {

using core::Geometry;

// A fused forward's relu mask: one byte per element of the tensor, in its memory order, 1 where
// the output y > 0 and 0 elsewhere (syncbn_forward_args_t.mask). An enumeration, not unsigned
// char: a store through a character type may alias any object, so GCC reloads the op's captured
// pointers after each one and leaves the loop scalar (measured 2-2.7x the forward time).
enum class MaskByte : std::uint8_t {};

// Scratch for per-thread partial sums; owned by a plan. A reduction grows it only if the
// OpenMP thread count grew since reserve_workspace (and may then throw std::bad_alloc).
struct Workspace {
  std::vector<double> sums;         // fp64 partial sums, 2C per thread
  std::vector<float> groups_f32;    // channels-last group sums of fp32 data, 2C per thread
  std::vector<double> groups_f64;   // the same for fp64 data (and fp32 data's fp64 fallback)
};

// The workspace's memory: capacity reserved ahead; for a reduction, n zeroed partial sums and
// room for at least n group sums of float or double (not zeroed). They grow the vectors, and are compiled once, at the baseline
// instruction set (dispatch.cpp): std::vector's out-of-line code instantiated in the kernels,
// which are compiled per instruction set, would be a weak symbol the linker may take from the
// AVX-512 object for every caller. Throw std::bad_alloc.
void reserve_memory(Workspace& ws, std::size_t sums, std::size_t groups_f32,
                    std::size_t groups_f64);
double* zeroed_sums(Workspace& ws, std::size_t n);
float* group_room(Workspace& ws, std::size_t n, float* /* tag */);
double* group_room(Workspace& ws, std::size_t n, double* /* tag */);

// The kernels, declared once per instruction set they are compiled for (kernels.cpp). The
// entry points below (dispatch.cpp) call the best set this CPU supports, chosen once: AVX-512
// (x86-64-v4), AVX2 + FMA (x86-64-v3) or the baseline. SYNCBN_CPU_ISA=generic|x86-64-v3|
// x86-64-v4 in the environment forces one (for tests and benchmarks; an unsupported choice
// falls back to the best supported).
#define SYNCBN_CPU_KERNEL_DECLARATIONS                                                         \
  void reserve_workspace(Workspace& ws, std::int64_t channels);                                \
  template <class T>                                                                           \
  void reduce_moments(const Geometry& g, const T* x, const T* shift, double* sum,              \
                      double* sumsq, Workspace& ws);                                           \
  template <class T>                                                                           \
  void reduce_grad(const Geometry& g, const T* x, const T* dy, const T* y,                     \
                   const MaskByte* mask, const T* center, double* sum_g, double* sum_gx,       \
                   Workspace& ws);                                                             \
  template <class T>                                                                           \
  void normalize(const Geometry& g, const T* x, const T* z, const T* center, const T* scale,   \
                 const T* shift, bool relu, T* y, MaskByte* mask);                             \
  template <class T>                                                                           \
  void backward_elemt(const Geometry& g, const T* x, const T* dy, const T* y,                  \
                      const MaskByte* mask, const T* center, const T* a, const T* k,           \
                      const T* d, T* dx, T* dz);

// Explicit instantiations of the four kernels for data type T.
#define SYNCBN_CPU_INSTANTIATE_KERNELS(T)                                                      \
  template void reduce_moments<T>(const Geometry&, const T*, const T*, double*, double*,       \
                                  Workspace&);                                                 \
  template void reduce_grad<T>(const Geometry&, const T*, const T*, const T*, const MaskByte*,  \
                               const T*, double*, double*, Workspace&);                        \
  template void normalize<T>(const Geometry&, const T*, const T*, const T*, const T*,          \
                             const T*, bool, T*, MaskByte*);                                   \
  template void backward_elemt<T>(const Geometry&, const T*, const T*, const T*,               \
                                  const MaskByte*, const T*, const T*, const T*, const T*, T*, \
                                  T*);

namespace generic { SYNCBN_CPU_KERNEL_DECLARATIONS }
namespace x86_64_v3 { SYNCBN_CPU_KERNEL_DECLARATIONS }
namespace x86_64_v4 { SYNCBN_CPU_KERNEL_DECLARATIONS }

// The instruction set the entry points use: "generic", "x86-64-v3" or "x86-64-v4".
const char* isa_name();

// Sizes ws for the reductions over C channels on omp_get_max_threads() threads.
void reserve_workspace(Workspace& ws, std::int64_t channels);

// Shifted moments: sum[c] = sum (x - shift[c]), sumsq[c] = sum (x - shift[c])^2 over the
// channel, accumulated in fp64. Inner size > 1 (channels-first with spatial dims): fp32 data is
// widened first, so differences and squares are exact. Inner size 1 (channels-last, or (N, C)
// input): terms are formed in the data type and summed over groups of up to 16 rows in it, then
// merged in fp64 (docs/design.md section 3, "blocked partials merged in fp64"; a group's
// relative error is about 16 ulp of its absolute sum, the merge adds none); where an fp32 group
// overflows (|x - shift| above ~1e19) the reduction is redone in fp64. A shift near the mean
// keeps the sums free of cancellation (the plan's shared shift, core/finalize.hpp).
// Overwrites C values of each.
template <class T>
void reduce_moments(const Geometry& g, const T* x, const T* shift, double* sum, double* sumsq,
                    Workspace& ws);

// sum_g[c] = sum g, sum_gx[c] = sum g * (x - center[c]), with g = dy, or dy masked: by mask[i]
// where mask (the fused forward's) is not NULL, else by y > 0 where y (its output) is not NULL;
// accumulated in fp64 as in reduce_moments (inner size 1: 16-row groups in the data type first,
// fp64 where they overflow).
template <class T>
void reduce_grad(const Geometry& g, const T* x, const T* dy, const T* y, const MaskByte* mask,
                 const T* center, double* sum_g, double* sum_gx, Workspace& ws);

// y = (x - center[c]) * scale[c] + shift[c]; with z (not NULL) y = max(that + z, 0), else with
// relu y = max(that, 0) (NaN stays NaN, as torch.relu). y may equal x or z. With relu or z, mask
// (not NULL) gets y > 0 (MaskByte). Large outputs are advised as huge pages first (memory.hpp),
// as in backward_elemt.
template <class T>
void normalize(const Geometry& g, const T* x, const T* z, const T* center, const T* scale,
               const T* shift, bool relu, T* y, MaskByte* mask);

// With g = dy, or dy masked as in reduce_grad (by mask, else by y > 0): dx = a[c] * g -
// k[c] * (x - center[c]) + d[c], and dz = g where dz is not NULL (needs y or mask). dx may equal
// dy or x; dz may equal dy.
template <class T>
void backward_elemt(const Geometry& g, const T* x, const T* dy, const T* y, const MaskByte* mask,
                    const T* center, const T* a, const T* k, const T* d, T* dx, T* dz);

}  // namespace syncbn::cpu

#endif  // SYNCBN_CPU_KERNELS_HPP
