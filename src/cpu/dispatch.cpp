// The kernel entry points: each forwards to the instruction set chosen once per process.
#include <cstdlib>
#include <cstring>
#if defined(__clang__) && __clang_major__ < 16 && (defined(__x86_64__) || defined(__i386__))
#include <cpuid.h>
#endif

#include "cpu/kernels.hpp"
#include "cpu/memory.hpp"

namespace syncbn::cpu {
namespace {

enum class Isa { generic, x86_64_v3, x86_64_v4 };

#if defined(SYNCBN_CPU_MULTI_ISA) && defined(__clang__) && __clang_major__ < 16
// clang before 16 does not know the x86-64 psABI level names (GCC 12 does): test their
// features one by one. x86-64-v3: AVX, AVX2, BMI1, BMI2, F16C, FMA, LZCNT, MOVBE (the builtin's
// avx and avx2 include the OS's support of the YMM state); x86-64-v4: v3 + AVX512F/BW/CD/DQ/VL.
bool cpuid_bit(unsigned leaf, int reg, int bit) {
  unsigned r[4] = {0, 0, 0, 0};
  if (!__get_cpuid_count(leaf, 0, &r[0], &r[1], &r[2], &r[3])) return false;
  return ((r[reg] >> bit) & 1u) != 0;
}
bool level_supported(Isa isa) {
  const bool v3 = __builtin_cpu_supports("avx") && __builtin_cpu_supports("avx2") &&
                  __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2") &&
                  __builtin_cpu_supports("fma") && cpuid_bit(1, 2, 29) /* f16c */ &&
                  cpuid_bit(1, 2, 22) /* movbe */ && cpuid_bit(0x80000001u, 2, 5) /* lzcnt */;
  if (isa == Isa::x86_64_v3) return v3;
  return v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vl");
}
#elif defined(SYNCBN_CPU_MULTI_ISA)
bool level_supported(Isa isa) {
  return isa == Isa::x86_64_v4 ? __builtin_cpu_supports("x86-64-v4")
                               : __builtin_cpu_supports("x86-64-v3");
}
#endif

bool supported(Isa isa) {
#if defined(SYNCBN_CPU_MULTI_ISA)
  __builtin_cpu_init();
  switch (isa) {
    case Isa::x86_64_v4:
    case Isa::x86_64_v3: return level_supported(isa);
    case Isa::generic: return true;
  }
  return false;
#else
  return isa == Isa::generic;
#endif
}

Isa choose() {
  const char* forced = std::getenv("SYNCBN_CPU_ISA");
  if (forced != nullptr) {
    if (std::strcmp(forced, "generic") == 0) return Isa::generic;
    if (std::strcmp(forced, "x86-64-v3") == 0 && supported(Isa::x86_64_v3)) return Isa::x86_64_v3;
    if (std::strcmp(forced, "x86-64-v4") == 0 && supported(Isa::x86_64_v4)) return Isa::x86_64_v4;
  }
  if (supported(Isa::x86_64_v4)) return Isa::x86_64_v4;
  if (supported(Isa::x86_64_v3)) return Isa::x86_64_v3;
  return Isa::generic;
}

Isa isa() {
  static const Isa chosen = choose();
  return chosen;
}

}  // namespace

#if defined(SYNCBN_CPU_MULTI_ISA)
#define SYNCBN_DISPATCH(call)                                   \
  switch (isa()) {                                              \
    case Isa::x86_64_v4: return x86_64_v4::call;                \
    case Isa::x86_64_v3: return x86_64_v3::call;                \
    case Isa::generic: break;                                   \
  }                                                             \
  return generic::call
#else
#define SYNCBN_DISPATCH(call) return generic::call
#endif

const char* isa_name() {
  switch (isa()) {
    case Isa::x86_64_v4: return "x86-64-v4";
    case Isa::x86_64_v3: return "x86-64-v3";
    case Isa::generic: break;
  }
  return "generic";
}

void reserve_workspace(Workspace& ws, std::int64_t channels) {
  generic::reserve_workspace(ws, channels);  // the same for every instruction set
}

template <class T>
void reduce_moments(const Geometry& g, const T* x, const T* shift, double* sum, double* sumsq,
                    Workspace& ws) {
  SYNCBN_DISPATCH(reduce_moments(g, x, shift, sum, sumsq, ws));
}

template <class T>
void reduce_grad(const Geometry& g, const T* x, const T* dy, const T* y, const MaskByte* mask,
                 const T* center, double* sum_g, double* sum_gx, Workspace& ws) {
  SYNCBN_DISPATCH(reduce_grad(g, x, dy, y, mask, center, sum_g, sum_gx, ws));
}

// The elementwise passes write a whole tensor of g: its memory is prepared first (memory.hpp).
template <class T>
void normalize(const Geometry& g, const T* x, const T* z, const T* center, const T* scale,
               const T* shift, bool relu, T* y, MaskByte* mask) {
  prepare_output(y, tensor_bytes<T>(g));
  if (mask != nullptr) prepare_output(mask, tensor_bytes<MaskByte>(g));
  SYNCBN_DISPATCH(normalize(g, x, z, center, scale, shift, relu, y, mask));
}

template <class T>
void backward_elemt(const Geometry& g, const T* x, const T* dy, const T* y, const MaskByte* mask,
                    const T* center, const T* a, const T* k, const T* d, T* dx, T* dz) {
  prepare_output(dx, tensor_bytes<T>(g));
  if (dz != nullptr) prepare_output(dz, tensor_bytes<T>(g));
  SYNCBN_DISPATCH(backward_elemt(g, x, dy, y, mask, center, a, k, d, dx, dz));
}

SYNCBN_CPU_INSTANTIATE_KERNELS(float)
SYNCBN_CPU_INSTANTIATE_KERNELS(double)

// The workspace's growth, at the baseline instruction set (kernels.hpp).
void reserve_memory(Workspace& ws, std::size_t sums, std::size_t groups_f32,
                    std::size_t groups_f64) {
  ws.sums.reserve(sums);
  ws.groups_f32.reserve(groups_f32);
  ws.groups_f64.reserve(groups_f64);
}

double* zeroed_sums(Workspace& ws, std::size_t n) {
  ws.sums.assign(n, 0.0);
  return ws.sums.data();
}

float* group_room(Workspace& ws, std::size_t n, float*) {
  if (ws.groups_f32.size() < n) ws.groups_f32.resize(n);
  return ws.groups_f32.data();
}

double* group_room(Workspace& ws, std::size_t n, double*) {
  if (ws.groups_f64.size() < n) ws.groups_f64.resize(n);
  return ws.groups_f64.data();
}

}  // namespace syncbn::cpu
