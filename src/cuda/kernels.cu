// The CUDA kernels of kernels.hpp and their launch shapes.
//
// Launch shapes. Channels-first (N, C, S): a 3-D grid (C, split_n, split_s); block (c, jn, js)
// covers rows n = jn, jn + split_n, ... of channel c and the segment js of each row, its threads
// striding through the segment with 16-byte vectors (when S and the pointers allow). Few
// channels with huge S split each row into segments; many channels with tiny S get one block
// per channel. Channels-last (R rows of C): blocks of (bdx lanes x bdy rows), each lane owning
// one vector of consecutive channels, grid (channel tiles, row splits). Both aim at one full wave
// of blocks and stop splitting where a block would get less than four passes of work.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <string>

#include "core/error.hpp"
#include "core/finalize.hpp"
#include "cuda/kernels.hpp"
#include "cuda/runtime.hpp"

namespace syncbn::cuda {
namespace {

using core::kGuardSlots;

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr std::int64_t kMinPartialCapacity = 65536;
constexpr std::int64_t kMaxGridYZ = 65535;

// ---- types ---------------------------------------------------------------------------------

template <class T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <class T> using Acc = typename AccOf<T>::type;

// Elements per 16-byte vector.
template <class T> constexpr int kVec = static_cast<int>(16 / sizeof(T));

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T> __device__ __forceinline__ T from_acc(Acc<T> v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <class T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};
template <class T, int V>
__device__ __forceinline__ Pack<T, V> load(const T* p) {
  return *reinterpret_cast<const Pack<T, V>*>(p);
}
template <class T, int V>
__device__ __forceinline__ void store(T* p, const Pack<T, V>& v) {
  *reinterpret_cast<Pack<T, V>*>(p) = v;
}

template <class T> struct Tag { using type = T; };

// Calls f(Tag<T>{}) with T the data type of dtype.
template <class F>
void dispatch(syncbn_dtype_t dtype, F&& f) {
  switch (dtype) {
    case SYNCBN_FLOAT32: f(Tag<float>{}); break;
    case SYNCBN_FLOAT64: f(Tag<double>{}); break;
    case SYNCBN_FLOAT16: f(Tag<__half>{}); break;
    case SYNCBN_BFLOAT16: f(Tag<__nv_bfloat16>{}); break;
    default: break;  // validated at plan creation
  }
}

void check_launch(const char* kernel) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) {
    core::fail(SYNCBN_ERROR_INTERNAL,
               std::string("CUDA kernel ") + kernel + " failed to launch: " + cudaGetErrorString(e));
  }
}

cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

int next_pow2(std::int64_t v) {
  int p = 1;
  while (p < v && p < (1 << 30)) p <<= 1;
  return p;
}

// ---- launch shapes -------------------------------------------------------------------------

struct CfShape {
  dim3 grid;
  int threads;
  std::int64_t seg;  // elements of a row per block, a multiple of threads * V
};

// max_splits: blocks per channel the partial sums have room for (no limit for elementwise).
CfShape cf_shape(const Geometry& g, int V, int multiprocessors, std::int64_t max_splits) {
  const std::int64_t N = g.outer, C = g.channels, S = g.inner;
  const int threads = std::clamp(next_pow2(ceil_div(S, V)), 64, kThreads);
  const std::int64_t chunk = static_cast<std::int64_t>(threads) * V;
  const std::int64_t segments = ceil_div(S, chunk);
  const std::int64_t target = static_cast<std::int64_t>(multiprocessors) * (2048 / threads);
  std::int64_t want = std::max<std::int64_t>(1, ceil_div(target, C));
  want = std::min(want, std::max<std::int64_t>(1, N * segments / 4));
  want = std::min(want, std::max<std::int64_t>(1, max_splits));
  std::int64_t split_s = std::min({want, segments, kMaxGridYZ});
  const std::int64_t seg = ceil_div(segments, split_s) * chunk;
  split_s = ceil_div(S, seg);
  std::int64_t split_n = std::min({N, ceil_div(want, split_s), kMaxGridYZ});
  split_n = std::max<std::int64_t>(1, std::min(split_n, max_splits / split_s));
  return {dim3(static_cast<unsigned>(C), static_cast<unsigned>(split_n),
               static_cast<unsigned>(split_s)),
          threads, seg};
}

struct ClShape {
  dim3 grid, block;
};

ClShape cl_shape(const Geometry& g, int V, int multiprocessors, std::int64_t max_splits) {
  const std::int64_t R = g.outer, C = g.channels;
  const std::int64_t lanes = ceil_div(C, V);
  const int bdx = std::min(kWarp, next_pow2(lanes));
  const int bdy = kThreads / bdx;
  const std::int64_t tiles = ceil_div(lanes, bdx);
  const std::int64_t target = static_cast<std::int64_t>(multiprocessors) * (2048 / kThreads);
  std::int64_t splits = std::max<std::int64_t>(1, ceil_div(target, tiles));
  splits = std::min({splits, std::max<std::int64_t>(1, ceil_div(R, 4 * bdy)), kMaxGridYZ,
                     std::max<std::int64_t>(1, max_splits)});
  return {dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(splits)),
          dim3(static_cast<unsigned>(bdx), static_cast<unsigned>(bdy))};
}

bool channels_last(const Geometry& g) { return g.inner == 1; }

// The fused activation of the elementwise kernels (syncbn_activation_t), as a template argument.
constexpr int kNoActivation = SYNCBN_ACTIVATION_NONE;
constexpr int kRelu = SYNCBN_ACTIVATION_RELU;
constexpr int kAddRelu = SYNCBN_ACTIVATION_ADD_RELU;

// Whether 16-byte vectors can be used: the vectorized dimension is a multiple of the width and
// every pointer is aligned.
template <class T>
bool vectorizable(const Geometry& g, std::initializer_list<const void*> pointers) {
  const std::int64_t dim = channels_last(g) ? g.channels : g.inner;
  if (dim % kVec<T> != 0) return false;
  for (const void* p : pointers) {
    if (p != nullptr && !aligned16(p)) return false;
  }
  return true;
}

// ---- device helpers --------------------------------------------------------------------------

template <int K>
__device__ __forceinline__ void warp_sum(double (&v)[K]) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) {
#pragma unroll
    for (int i = 0; i < K; ++i) v[i] += __shfl_down_sync(0xffffffffu, v[i], o);
  }
}

// Sum over a 1-D block; the result is valid in thread 0. Fixed order: deterministic.
template <int K>
__device__ __forceinline__ void block_sum(double (&v)[K]) {
  __shared__ double shared[kThreads / kWarp][K];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int warps = (blockDim.x + kWarp - 1) / kWarp;
  warp_sum(v);
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < K; ++i) shared[warp][i] = v[i];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int i = 0; i < K; ++i) v[i] = lane < warps ? shared[lane][i] : 0.0;
    warp_sum(v);
  }
}

__device__ __forceinline__ int linear_thread() { return threadIdx.y * blockDim.x + threadIdx.x; }

// Writes the guards, the count and num_batches_next: once per call, by one block (all its
// threads call this). The sequence pair comes from the device's call counter.
__device__ void put_guards(const DeviceState& st, const GuardWrite& gw) {
  if (linear_thread() != 0) return;
  double* b = st.buffer;
  for (std::size_t i = 0; i < kGuardSlots; ++i) b[i] = gw.slots[i];
  core::put_sequence(b, !gw.collective ? *st.calls : gw.repeat ? *st.calls - 1 : (*st.calls)++);
  const long long* nbt = gw.num_batches_tracked;
  if (nbt != nullptr && *nbt < 0 && b[1] == 0.0) {
    core::put_error_slots(b, gw.rank,
                          core::error_code(core::Arg::num_batches_tracked, core::Problem::negative));
  }
  b[kGuardSlots + 2 * st.channels] = gw.count;
  *st.num_batches_next = nbt != nullptr ? *nbt + 1 : 0;
}

// Where a channel's merged sums go: the buffer and, for backward with local parameter
// gradients, st.local.
template <bool GRAD>
struct SumsStore {
  bool keep_local;
  __device__ void operator()(const DeviceState& st, std::int64_t c, double s, double q) const {
    const std::int64_t C = st.channels;
    double* sums = st.buffer + kGuardSlots;
    sums[c] = s;
    sums[C + c] = q;
    if (GRAD && keep_local) {
      st.local[c] = s;
      st.local[C + c] = q;
    }
  }
};

// The last block of a tile to finish (counter) merges the tile's partials: one warp per
// channel, lanes striding over the splits in a fixed order, then a fixed shuffle tree.
// Partials of channel c are pairs at partials[2 (c * splits + j)].
template <class Store>
__device__ void finish_tile(const DeviceState& st, unsigned tile, std::int64_t c_begin,
                            std::int64_t c_end, int splits, const Store& store) {
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  // atomicInc wraps the counter to 0 at the tile's last block, and reduce() zeroes the
  // counters in stream order before every reduction.
  if (linear_thread() == 0) {
    const auto limit = static_cast<unsigned>(splits - 1);
    last = atomicInc(&st.counters[tile], limit) == limit;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  const int t = linear_thread();
  const int lane = t % kWarp, warp = t / kWarp;
  const int warps = blockDim.x * blockDim.y / kWarp;
  for (std::int64_t c = c_begin + warp; c < c_end; c += warps) {
    double v[2] = {0.0, 0.0};
    for (int j = lane; j < splits; j += kWarp) {
      v[0] += __ldcg(st.partials + 2 * (c * splits + j));
      v[1] += __ldcg(st.partials + 2 * (c * splits + j) + 1);
    }
    warp_sum(v);
    if (lane == 0) store(st, c, v[0], v[1]);
  }
}

// ---- reductions ------------------------------------------------------------------------------

// Per element: forward sums d = x - K and d^2 (K = the call's shift); backward sums g = dy and
// g (x - K), K = the saved mean.
template <class T, bool GRAD>
__device__ __forceinline__ void accumulate(T x, T dy, Acc<T> K, Acc<T>& s, Acc<T>& q) {
  if constexpr (GRAD) {
    const Acc<T> g = to_acc(dy);
    s += g;
    q += g * (to_acc(x) - K);
  } else {
    const Acc<T> d = to_acc(x) - K;
    s += d;
    q += d * d;
  }
}

// A vector of x (and dy when GRAD; else x again, unused) at element i.
template <class T, int V, bool GRAD>
__device__ __forceinline__ void load_pair(const T* x, const T* dy, std::int64_t i,
                                          Pack<T, V>& xv, Pack<T, V>& gv) {
  xv = load<T, V>(x + i);
  if constexpr (GRAD) {
    gv = load<T, V>(dy + i);
  } else {
    gv = xv;
  }
}

// The relu's backward on a vector of gradients: elements whose forward output y (at element i)
// is not > 0 get 0 (relu'(0) = 0, as PyTorch's threshold_backward; NaN in y gives 0); with the
// forward's mask bytes (not NULL: read instead of y), elements whose byte is 0.
template <class T, int V>
__device__ __forceinline__ void mask_by(const T* y, const std::uint8_t* mask, std::int64_t i,
                                        Pack<T, V>& gv) {
  if (mask != nullptr) {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      if (mask[i + k] == 0) gv.v[k] = from_acc<T>(Acc<T>(0));
    }
    return;
  }
  const Pack<T, V> yv = load<T, V>(y + i);
#pragma unroll
  for (int k = 0; k < V; ++k) {
    if (!(to_acc(yv.v[k]) > Acc<T>(0))) gv.v[k] = from_acc<T>(Acc<T>(0));
  }
}

template <class T, int V, bool GRAD, bool MASK>
__global__ void __launch_bounds__(kThreads)
reduce_cf_kernel(DeviceState st, const T* __restrict__ x, const T* __restrict__ dy,
                 const T* __restrict__ y, const std::uint8_t* __restrict__ mask,
                 const Acc<T>* __restrict__ center, std::int64_t N, std::int64_t S,
                 std::int64_t seg, GuardWrite gw, bool keep_local) {
  const std::int64_t C = st.channels;
  const std::int64_t c = blockIdx.x;
  const int split_n = gridDim.y, split_s = gridDim.z;
  const Acc<T> K = center[c];
  const std::int64_t s0 = static_cast<std::int64_t>(blockIdx.z) * seg;
  const std::int64_t s1 = s0 + seg < S ? s0 + seg : S;
  double sum[2] = {0.0, 0.0};
  for (std::int64_t n = blockIdx.y; n < N; n += split_n) {
    const std::int64_t base = (n * C + c) * S;
    for (std::int64_t s = s0 + static_cast<std::int64_t>(threadIdx.x) * V; s < s1;
         s += static_cast<std::int64_t>(blockDim.x) * V) {
      Pack<T, V> xv, gv;
      load_pair<T, V, GRAD>(x, dy, base + s, xv, gv);
      if constexpr (MASK) mask_by<T, V>(y, mask, base + s, gv);
      Acc<T> ps = 0, pq = 0;
#pragma unroll
      for (int k = 0; k < V; ++k) accumulate<T, GRAD>(xv.v[k], gv.v[k], K, ps, pq);
      sum[0] += ps;
      sum[1] += pq;
    }
  }
  block_sum(sum);
  const int splits = split_n * split_s;
  const std::int64_t j = static_cast<std::int64_t>(blockIdx.y) * split_s + blockIdx.z;
  if (threadIdx.x == 0) {
    st.partials[2 * (c * splits + j)] = sum[0];
    st.partials[2 * (c * splits + j) + 1] = sum[1];
  }
  finish_tile(st, blockIdx.x, c, c + 1, splits,
              SumsStore<GRAD>{keep_local});
  if (blockIdx.x == 0 && blockIdx.y == 0 && blockIdx.z == 0) put_guards(st, gw);
}

template <class T, int V, bool GRAD, bool MASK>
__global__ void __launch_bounds__(kThreads)
reduce_cl_kernel(DeviceState st, const T* __restrict__ x, const T* __restrict__ dy,
                 const T* __restrict__ y, const std::uint8_t* __restrict__ mask,
                 const Acc<T>* __restrict__ center, std::int64_t R, GuardWrite gw,
                 bool keep_local) {
  constexpr int kRowsPerFlush = 4;  // rows summed in Acc<T> before the fp64 accumulators
  __shared__ double shared[kThreads * 2 * V];
  const std::int64_t C = st.channels;
  const int bdx = blockDim.x, bdy = blockDim.y, tx = threadIdx.x, ty = threadIdx.y;
  const std::int64_t c0 = (static_cast<std::int64_t>(blockIdx.x) * bdx + tx) * V;
  const bool active = c0 < C;
  double sum[V], sq[V];
#pragma unroll
  for (int k = 0; k < V; ++k) sum[k] = sq[k] = 0.0;
  if (active) {
    Acc<T> K[V];
#pragma unroll
    for (int k = 0; k < V; ++k) K[k] = center[c0 + k];
    const std::int64_t stride = static_cast<std::int64_t>(gridDim.y) * bdy;
    std::int64_t r = static_cast<std::int64_t>(blockIdx.y) * bdy + ty;
    while (r < R) {
      Acc<T> ps[V], pq[V];
#pragma unroll
      for (int k = 0; k < V; ++k) ps[k] = pq[k] = 0;
#pragma unroll
      for (int u = 0; u < kRowsPerFlush; ++u, r += stride) {
        if (r < R) {
          Pack<T, V> xv, gv;
          load_pair<T, V, GRAD>(x, dy, r * C + c0, xv, gv);
          if constexpr (MASK) mask_by<T, V>(y, mask, r * C + c0, gv);
#pragma unroll
          for (int k = 0; k < V; ++k) accumulate<T, GRAD>(xv.v[k], gv.v[k], K[k], ps[k], pq[k]);
        }
      }
#pragma unroll
      for (int k = 0; k < V; ++k) {
        sum[k] += ps[k];
        sq[k] += pq[k];
      }
    }
  }
  // Tree over the rows of the block, in shared memory.
  double* mine = shared + (ty * bdx + tx) * 2 * V;
#pragma unroll
  for (int k = 0; k < V; ++k) {
    mine[k] = sum[k];
    mine[V + k] = sq[k];
  }
  __syncthreads();
  for (int h = bdy / 2; h > 0; h >>= 1) {
    if (ty < h) {
      const double* other = shared + ((ty + h) * bdx + tx) * 2 * V;
#pragma unroll
      for (int i = 0; i < 2 * V; ++i) mine[i] += other[i];
    }
    __syncthreads();
  }
  const int splits = gridDim.y;
  if (ty == 0 && active) {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const std::int64_t c = c0 + k;
      st.partials[2 * (c * splits + blockIdx.y)] = mine[k];
      st.partials[2 * (c * splits + blockIdx.y) + 1] = mine[V + k];
    }
  }
  const std::int64_t c_begin = static_cast<std::int64_t>(blockIdx.x) * bdx * V;
  const std::int64_t c_end = c_begin + static_cast<std::int64_t>(bdx) * V < C
                                 ? c_begin + static_cast<std::int64_t>(bdx) * V
                                 : C;
  finish_tile(st, blockIdx.x, c_begin, c_end, splits,
              SumsStore<GRAD>{keep_local});
  if (blockIdx.x == 0 && blockIdx.y == 0) put_guards(st, gw);
}

template <class T, bool GRAD, bool MASK = false>
void reduce(const DeviceState& st, const Geometry& g, const T* x, const T* dy, const T* y,
            const std::uint8_t* mask, const Acc<T>* center, bool keep_local, const GuardWrite& gw,
            cudaStream_t stream) {
  const std::int64_t max_splits = st.partial_capacity / g.channels;
  const bool vec = vectorizable<T>(g, {x, dy, y});
  // The merge counters from 0 in stream order (capturable): a residue that overlapping calls
  // left (calls the caller did not order) cannot make a later call merge early.
  cuda::check_cuda(cudaMemsetAsync(st.counters, 0,
                                   static_cast<std::size_t>(st.channels) * sizeof(unsigned), stream),
                   "cudaMemsetAsync (merge counters)");
  if (channels_last(g)) {
    const ClShape sh = cl_shape(g, vec ? kVec<T> : 1, st.multiprocessors, max_splits);
    if (vec) {
      reduce_cl_kernel<T, kVec<T>, GRAD, MASK><<<sh.grid, sh.block, 0, stream>>>(st, x, dy, y, mask, center, g.outer, gw, keep_local);
    } else {
      reduce_cl_kernel<T, 1, GRAD, MASK><<<sh.grid, sh.block, 0, stream>>>(st, x, dy, y, mask, center, g.outer, gw, keep_local);
    }
  } else {
    const CfShape sh = cf_shape(g, vec ? kVec<T> : 1, st.multiprocessors, max_splits);
    if (vec) {
      reduce_cf_kernel<T, kVec<T>, GRAD, MASK><<<sh.grid, sh.threads, 0, stream>>>(st, x, dy, y, mask, center, g.outer, g.inner, sh.seg, gw, keep_local);
    } else {
      reduce_cf_kernel<T, 1, GRAD, MASK><<<sh.grid, sh.threads, 0, stream>>>(st, x, dy, y, mask, center, g.outer, g.inner, sh.seg, gw, keep_local);
    }
  }
  check_launch(GRAD ? "reduce_grad" : "reduce_moments");
}

__global__ void write_guards_kernel(DeviceState st, GuardWrite gw, bool zero_local) {
  const std::int64_t C = st.channels;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       i < 2 * C; i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    st.buffer[kGuardSlots + i] = 0.0;
    if (zero_local) st.local[i] = 0.0;
  }
  if (blockIdx.x == 0) put_guards(st, gw);
}

// ---- finalize ----------------------------------------------------------------------------

__device__ void keep_record(const DeviceState& st, double m, bool track, std::uint32_t op) {
  AsyncRecord* r = st.record;
  if (r->flag != 0) return;  // the first failure is the one reported
  r->track = track;
  r->op = op;
  r->seq = *st.calls - 1;  // this call's number
  for (std::size_t i = 0; i < kGuardSlots; ++i) r->slots[i] = st.buffer[i];
  r->slots[kGuardSlots] = m;
  __threadfence();
  r->flag = 1;
}

// Round 1's sums around shift give each channel its refined shift in out (core::refined_shift);
// where the verdict fails, out keeps shift.
template <class P>
__global__ void refine_shift_kernel(DeviceState st, int group_size, bool track, const P* shift,
                                    P* out) {
  const std::int64_t C = st.channels;
  const std::int64_t c = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const double* sums = st.buffer + kGuardSlots;
  const double m = sums[2 * C];
  if (core::verdict_of(st.buffer, group_size, m, track) != core::Verdict::pass) {
    out[c] = shift[c];
    return;
  }
  core::refined_shift<P>(sums[c], sums[C + c], m, shift[c], out[c]);
}

template <class P>
__global__ void finalize_forward_kernel(DeviceState st, core::ForwardFinalize f, const P* shift,
                                        P* next_shift) {
  const std::int64_t C = st.channels;
  const double* sums = st.buffer + kGuardSlots;
  const double m = sums[2 * C];
  const bool ok = core::verdict_of(st.buffer, f.group_size, m, f.track) == core::Verdict::pass;
  const std::int64_t c = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  P* coefficients = static_cast<P*>(st.coefficients);  // [center | scale | shift]
  if (!ok) {
    if (c == 0) keep_record(st, m, f.track, f.op);
    if (c < C) {
      const P nan = static_cast<P>(CUDART_NAN);
      coefficients[c] = coefficients[C + c] = coefficients[2 * C + c] = nan;
      if (f.save_mean) static_cast<P*>(f.save_mean)[c] = nan;
      if (f.save_invstd) static_cast<P*>(f.save_invstd)[c] = nan;
    }
    return;
  }
  if (c < C) {
    const double a = f.track ? core::running_factor(f.momentum, *st.num_batches_next) : 0.0;
    core::finalize_forward_channel<P>(f, sums, C, c, m, a, shift, next_shift, coefficients);
  }
  if (c == 0 && f.track && f.num_batches_tracked) *f.num_batches_tracked = *st.num_batches_next;
}

template <class P>
__global__ void finalize_running_kernel(DeviceState st, double eps, bool affine, const void* weight,
                                        const void* bias, const P* running_mean,
                                        const P* running_var) {
  const std::int64_t c = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= st.channels) return;
  core::finalize_running_channel<P>(eps, affine, weight, bias, running_mean, running_var,
                                    st.channels, c, static_cast<P*>(st.coefficients));
}

template <class P>
__global__ void finalize_backward_kernel(DeviceState st, core::BackwardFinalize f) {
  const std::int64_t C = st.channels;
  const double* sums = st.buffer + kGuardSlots;
  const double m = sums[2 * C];
  const bool ok = core::verdict_of(st.buffer, f.group_size, m, false) == core::Verdict::pass;
  const std::int64_t c = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  P* k = static_cast<P*>(st.coefficients);  // [center | a | k | d]
  if (!ok) {
    if (c == 0) keep_record(st, m, false, f.op);
    if (c < C) {
      const P nan = static_cast<P>(CUDART_NAN);
      k[c] = k[C + c] = k[2 * C + c] = k[3 * C + c] = nan;
      if (f.affine && f.dweight) static_cast<P*>(f.dweight)[c] = nan;
      if (f.affine && f.dbias) static_cast<P*>(f.dbias)[c] = nan;
    }
    return;
  }
  if (c < C) core::finalize_backward_channel<P>(f, sums, st.local, C, c, m, k);
}

unsigned channel_blocks(std::int64_t C) { return static_cast<unsigned>(ceil_div(C, kThreads)); }

// ---- elementwise -----------------------------------------------------------------------------

// y = (x - center) * scale + shift, or dx = a dy - k (x - center) + d (BACKWARD), for V
// consecutive elements of one channel (channels-first) or one element of V channels: channel c
// of the coefficient arrays (core::affine_arrays, core::backward_arrays).
template <class T, bool BACKWARD>
struct Coefficients {
  std::conditional_t<BACKWARD, core::BackwardCoefficients<Acc<T>>,
                     core::AffineCoefficients<Acc<T>>>
      co;
  __device__ static Coefficients of(const Acc<T>* coef, std::int64_t C, std::int64_t c) {
    if constexpr (BACKWARD) {
      return {core::load(core::backward_arrays(coef, C), c)};
    } else {
      return {core::load(core::affine_arrays(coef, C), c)};
    }
  }
  // Forward: act((x - center) scale + shift [+ z]) (dy is z with ACT kAddRelu, else unused);
  // backward: a dy - k (x - center) + d (dy already masked by the caller).
  template <int ACT>
  __device__ T apply(T x, T dy) const {
    const Acc<T> xc = to_acc(x) - co.center;
    if constexpr (BACKWARD) {
      return from_acc<T>(co.a * to_acc(dy) - co.k * xc + co.d);
    } else {
      Acc<T> v = xc * co.scale + co.shift;
      if constexpr (ACT == kAddRelu) v += to_acc(dy);
      if constexpr (ACT != kNoActivation) v = v < Acc<T>(0) ? Acc<T>(0) : v;  // NaN stays NaN
      return from_acc<T>(v);
    }
  }
};

// The relu mask bytes of an element pass: written by the forward, read by the backward.
template <bool BACKWARD>
using MaskPtr = std::conditional_t<BACKWARD, const std::uint8_t*, std::uint8_t*>;

// The element pass of one vector at element i: forward o = act(...) of x (and z = aux), and with
// an activation mask = o > 0 where mask is not NULL; backward with an activation g = dy masked
// by the mask bytes (not NULL) or by y = aux, o = dx of g, and dz = g where out2 is not NULL.
template <class T, int V, bool BACKWARD, int ACT>
__device__ __forceinline__ void element_pass(const Coefficients<T, BACKWARD>* co, int co_stride,
                                             const T* x, const T* dy, const T* aux,
                                             MaskPtr<BACKWARD> mask, T* out, T* out2,
                                             std::int64_t i) {
  Pack<T, V> xv, gv, o;
  load_pair<T, V, BACKWARD>(x, dy, i, xv, gv);
  if constexpr (BACKWARD && ACT != kNoActivation) {
    mask_by<T, V>(aux, mask, i, gv);
    if (out2 != nullptr) store<T, V>(out2 + i, gv);
  } else if constexpr (!BACKWARD && ACT == kAddRelu) {
    gv = load<T, V>(aux + i);
  }
#pragma unroll
  for (int k = 0; k < V; ++k) o.v[k] = co[k * co_stride].template apply<ACT>(xv.v[k], gv.v[k]);
  store<T, V>(out + i, o);
  if constexpr (!BACKWARD && ACT != kNoActivation) {
    if (mask != nullptr) {
#pragma unroll
      for (int k = 0; k < V; ++k) mask[i + k] = to_acc(o.v[k]) > Acc<T>(0) ? 1 : 0;
    }
  }
}

template <class T, int V, bool BACKWARD, int ACT>
__global__ void __launch_bounds__(kThreads)
elementwise_cf_kernel(const Acc<T>* __restrict__ coef, const T* x, const T* dy, const T* aux,
                      MaskPtr<BACKWARD> mask, T* out, T* out2, std::int64_t N, std::int64_t C, std::int64_t S,
                      std::int64_t seg) {
  const std::int64_t c = blockIdx.x;
  const auto co = Coefficients<T, BACKWARD>::of(coef, C, c);
  const std::int64_t s0 = static_cast<std::int64_t>(blockIdx.z) * seg;
  const std::int64_t s1 = s0 + seg < S ? s0 + seg : S;
  for (std::int64_t n = blockIdx.y; n < N; n += gridDim.y) {
    const std::int64_t base = (n * C + c) * S;
    for (std::int64_t s = s0 + static_cast<std::int64_t>(threadIdx.x) * V; s < s1;
         s += static_cast<std::int64_t>(blockDim.x) * V) {
      element_pass<T, V, BACKWARD, ACT>(&co, 0, x, dy, aux, mask, out, out2, base + s);
    }
  }
}

template <class T, int V, bool BACKWARD, int ACT>
__global__ void __launch_bounds__(kThreads)
elementwise_cl_kernel(const Acc<T>* __restrict__ coef, const T* x, const T* dy, const T* aux,
                      MaskPtr<BACKWARD> mask, T* out, T* out2, std::int64_t R, std::int64_t C) {
  const std::int64_t c0 = (static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V;
  if (c0 >= C) return;
  Coefficients<T, BACKWARD> co[V];
#pragma unroll
  for (int k = 0; k < V; ++k) co[k] = Coefficients<T, BACKWARD>::of(coef, C, c0 + k);
  for (std::int64_t r = static_cast<std::int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < R;
       r += static_cast<std::int64_t>(gridDim.y) * blockDim.y) {
    element_pass<T, V, BACKWARD, ACT>(co, 1, x, dy, aux, mask, out, out2, r * C + c0);
  }
}

template <class T, bool BACKWARD, int ACT>
void elementwise_act(const DeviceState& st, const Geometry& g, const T* x, const T* dy,
                     const T* aux, MaskPtr<BACKWARD> mask, T* out, T* out2, cudaStream_t stream) {
  const auto* coef = static_cast<const Acc<T>*>(st.coefficients);
  const bool vec = vectorizable<T>(g, {x, dy, aux, out, out2});
  constexpr std::int64_t kNoLimit = std::numeric_limits<std::int32_t>::max();
  if (channels_last(g)) {
    const ClShape sh = cl_shape(g, vec ? kVec<T> : 1, st.multiprocessors, kNoLimit);
    if (vec) {
      elementwise_cl_kernel<T, kVec<T>, BACKWARD, ACT><<<sh.grid, sh.block, 0, stream>>>(coef, x, dy, aux, mask, out, out2, g.outer, g.channels);
    } else {
      elementwise_cl_kernel<T, 1, BACKWARD, ACT><<<sh.grid, sh.block, 0, stream>>>(coef, x, dy, aux, mask, out, out2, g.outer, g.channels);
    }
  } else {
    const CfShape sh = cf_shape(g, vec ? kVec<T> : 1, st.multiprocessors, kNoLimit);
    if (vec) {
      elementwise_cf_kernel<T, kVec<T>, BACKWARD, ACT><<<sh.grid, sh.threads, 0, stream>>>(coef, x, dy, aux, mask, out, out2, g.outer, g.channels, g.inner, sh.seg);
    } else {
      elementwise_cf_kernel<T, 1, BACKWARD, ACT><<<sh.grid, sh.threads, 0, stream>>>(coef, x, dy, aux, mask, out, out2, g.outer, g.channels, g.inner, sh.seg);
    }
  }
  check_launch(BACKWARD ? "backward_elemt" : "normalize");
}

// The pass of the plan's activation: forward aux = z (ADD_RELU) or NULL, and mask written where
// not NULL; backward aux = y or the mask bytes (with an activation: one of them) and out2 = dz
// (may be NULL).
template <class T, bool BACKWARD>
void elementwise(const DeviceState& st, const Geometry& g, const T* x, const T* dy, const T* aux,
                 MaskPtr<BACKWARD> mask, T* out, T* out2, cudaStream_t stream) {
  switch (st.activation) {
    case SYNCBN_ACTIVATION_RELU:
      elementwise_act<T, BACKWARD, kRelu>(st, g, x, dy, aux, mask, out, out2, stream);
      return;
    case SYNCBN_ACTIVATION_ADD_RELU:
      elementwise_act<T, BACKWARD, kAddRelu>(st, g, x, dy, aux, mask, out, out2, stream);
      return;
    default:
      elementwise_act<T, BACKWARD, kNoActivation>(st, g, x, dy, aux, mask, out, out2, stream);
      return;
  }
}

}  // namespace

std::int64_t partial_capacity(std::int64_t channels) {
  return std::max(channels, kMinPartialCapacity);
}

void reduce_moments(const DeviceState& st, const Geometry& g, const void* x, const void* shift,
                    const GuardWrite& gw, void* stream) {
  dispatch(st.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    reduce<T, false>(st, g, static_cast<const T*>(x), nullptr, nullptr, nullptr,
                     static_cast<const Acc<T>*>(shift), false, gw, as_stream(stream));
  });
}

void reduce_grad(const DeviceState& st, const Geometry& g, const void* x, const void* dy,
                 const void* y, const void* mask, const void* save_mean, bool keep_local,
                 const GuardWrite& gw, void* stream) {
  dispatch(st.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const auto* center = static_cast<const Acc<T>*>(save_mean);
    if (y != nullptr || mask != nullptr) {
      reduce<T, true, true>(st, g, static_cast<const T*>(x), static_cast<const T*>(dy),
                            static_cast<const T*>(y), static_cast<const std::uint8_t*>(mask),
                            center, keep_local, gw, as_stream(stream));
    } else {
      reduce<T, true>(st, g, static_cast<const T*>(x), static_cast<const T*>(dy), nullptr, nullptr,
                      center, keep_local, gw, as_stream(stream));
    }
  });
}

void write_guards(const DeviceState& st, const GuardWrite& gw, bool zero_local, void* stream) {
  const unsigned blocks = static_cast<unsigned>(std::min<std::int64_t>(
      std::max<std::int64_t>(1, ceil_div(2 * st.channels, kThreads)), 4 * st.multiprocessors));
  write_guards_kernel<<<blocks, kThreads, 0, as_stream(stream)>>>(st, gw, zero_local);
  check_launch("write_guards");
}

void refine_shift(const DeviceState& st, int group_size, bool track, const void* shift, void* out,
                  void* stream) {
  if (st.dtype == SYNCBN_FLOAT64) {
    refine_shift_kernel<double><<<channel_blocks(st.channels), kThreads, 0, as_stream(stream)>>>(
        st, group_size, track, static_cast<const double*>(shift), static_cast<double*>(out));
  } else {
    refine_shift_kernel<float><<<channel_blocks(st.channels), kThreads, 0, as_stream(stream)>>>(
        st, group_size, track, static_cast<const float*>(shift), static_cast<float*>(out));
  }
  check_launch("refine_shift");
}

void finalize_forward(const DeviceState& st, const core::ForwardFinalize& f, const void* shift,
                      void* next_shift, void* stream) {
  if (st.dtype == SYNCBN_FLOAT64) {
    finalize_forward_kernel<double><<<channel_blocks(st.channels), kThreads, 0, as_stream(stream)>>>(
        st, f, static_cast<const double*>(shift), static_cast<double*>(next_shift));
  } else {
    finalize_forward_kernel<float><<<channel_blocks(st.channels), kThreads, 0, as_stream(stream)>>>(
        st, f, static_cast<const float*>(shift), static_cast<float*>(next_shift));
  }
  check_launch("finalize_forward");
}

void finalize_running(const DeviceState& st, double eps, bool affine, const void* weight,
                      const void* bias, const void* running_mean, const void* running_var,
                      void* stream) {
  if (st.dtype == SYNCBN_FLOAT64) {
    finalize_running_kernel<double><<<channel_blocks(st.channels), kThreads, 0, as_stream(stream)>>>(
        st, eps, affine, weight, bias, static_cast<const double*>(running_mean),
        static_cast<const double*>(running_var));
  } else {
    finalize_running_kernel<float><<<channel_blocks(st.channels), kThreads, 0, as_stream(stream)>>>(
        st, eps, affine, weight, bias, static_cast<const float*>(running_mean),
        static_cast<const float*>(running_var));
  }
  check_launch("finalize_running");
}

void finalize_backward(const DeviceState& st, const core::BackwardFinalize& f, void* stream) {
  if (st.dtype == SYNCBN_FLOAT64) {
    finalize_backward_kernel<double><<<channel_blocks(st.channels), kThreads, 0, as_stream(stream)>>>(st, f);
  } else {
    finalize_backward_kernel<float><<<channel_blocks(st.channels), kThreads, 0, as_stream(stream)>>>(st, f);
  }
  check_launch("finalize_backward");
}

void normalize(const DeviceState& st, const Geometry& g, const void* x, const void* z, void* y,
               void* mask, void* stream) {
  dispatch(st.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    elementwise<T, false>(st, g, static_cast<const T*>(x), nullptr, static_cast<const T*>(z),
                          static_cast<std::uint8_t*>(mask), static_cast<T*>(y), nullptr,
                          as_stream(stream));
  });
}

void backward_elemt(const DeviceState& st, const Geometry& g, const void* x, const void* dy,
                    const void* y, const void* mask, void* dx, void* dz, void* stream) {
  dispatch(st.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    elementwise<T, true>(st, g, static_cast<const T*>(x), static_cast<const T*>(dy),
                         static_cast<const T*>(y), static_cast<const std::uint8_t*>(mask),
                         static_cast<T*>(dx), static_cast<T*>(dz), as_stream(stream));
  });
}

}  // namespace syncbn::cuda
