// cuda_bench's device-side data, fp64 reference and output checks (reference.cuh).
#include <cfloat>
#include <cstring>

#include "reference.cuh"

namespace cuda_bench {

namespace {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
template <class T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}

__device__ __forceinline__ uint64_t mix64(uint64_t z) {  // splitmix64 finalizer
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// A standard normal value for index i (Box-Muller on two hashed uniforms in (0, 1)).
__device__ __forceinline__ float hashed_normal(uint64_t i, uint64_t seed) {
  const uint64_t h = mix64(i * 0x9e3779b97f4a7c15ull + seed);
  const float u1 = (static_cast<float>(h >> 40) + 0.5f) * (1.0f / 16777216.0f);
  const float u2 = (static_cast<float>((h >> 16) & 0xffffffu) + 0.5f) * (1.0f / 16777216.0f);
  return sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2);
}

__device__ __forceinline__ int64_t channel_of(int64_t i, int64_t c, int64_t s, bool cl) {
  return cl ? i % c : (i / s) % c;
}

// Data with per-channel mean offset * ((c % 7) - 3) and std 1 + scale_step * (c % 5), so that a
// channel or layout mix-up shows in the check.
template <class T>
__global__ void fill_data(T* p, int64_t count, int64_t c, int64_t s, bool cl, uint64_t seed,
                          float offset, float scale_step) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t ch = channel_of(i, c, s, cl);
    const float v = offset * static_cast<float>(ch % 7 - 3) +
                    (1.0f + scale_step * static_cast<float>(ch % 5)) * hashed_normal(i, seed);
    p[i] = from_float<T>(v);
  }
}

// weight in [0.5, 1.5), bias in [-0.5, 0.5), running_mean 0, running_var 1.
__global__ void fill_params(float* weight, float* bias, float* rm0, float* rv0, float* rm1,
                            float* rv1, int64_t c) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < c;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    weight[i] = 0.5f + static_cast<float>(mix64(i + 101) >> 40) * (1.0f / 16777216.0f);
    bias[i] = static_cast<float>(mix64(i + 202) >> 40) * (1.0f / 16777216.0f) - 0.5f;
    rm0[i] = rm1[i] = 0.0f;
    rv0[i] = rv1[i] = 1.0f;
  }
}

constexpr int kRefThreads = 256;

// One block per channel: the exact statistics in fp64 (docs/design.md section 1).
template <class T>
__global__ void __launch_bounds__(kRefThreads)
    reference_stats(const T* x, const T* dy, int64_t n, int64_t c, int64_t s, bool cl, double eps,
                    Reference ref) {
  __shared__ double sh[4][kRefThreads];
  const int64_t ch = blockIdx.x;
  const int64_t m = n * s;
  double sx = 0, sxx = 0, sg = 0, sgx = 0;
  for (int64_t j = threadIdx.x; j < m; j += blockDim.x) {
    const int64_t b = j / s, k = j % s;
    const int64_t idx = cl ? (b * s + k) * c + ch : (b * c + ch) * s + k;
    const double xv = to_float(x[idx]), gv = to_float(dy[idx]);
    sx += xv;
    sxx += xv * xv;
    sg += gv;
    sgx += gv * xv;
  }
  sh[0][threadIdx.x] = sx;
  sh[1][threadIdx.x] = sxx;
  sh[2][threadIdx.x] = sg;
  sh[3][threadIdx.x] = sgx;
  __syncthreads();
  for (int half = blockDim.x / 2; half > 0; half /= 2) {
    if (static_cast<int>(threadIdx.x) < half) {
      for (int k = 0; k < 4; ++k) sh[k][threadIdx.x] += sh[k][threadIdx.x + half];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const double mean = sh[0][0] / m;
    const double var = fmax(sh[1][0] / m - mean * mean, 0.0);
    const double invstd = 1.0 / sqrt(var + eps);
    const double sum_dy_xmu = sh[3][0] - mean * sh[2][0];
    ref.mean[ch] = mean;
    ref.invstd[ch] = invstd;
    ref.sum_dy[ch] = sh[2][0];
    ref.sum_dy_xmu[ch] = sum_dy_xmu;
    ref.dweight[ch] = sum_dy_xmu * invstd;
  }
}

// |out - ref| / (1 + |ref|), with NaN and Inf mapped to +Inf so that they always count.
__device__ __forceinline__ float rel_err(double out, double ref) {
  const double e = fabs(out - ref) / (1.0 + fabs(ref));
  return (e <= static_cast<double>(FLT_MAX)) ? static_cast<float>(e) : INFINITY;
}

// Non-negative floats order like their bit patterns, so atomicMax on the bits is a float max.
__device__ __forceinline__ void block_max_to(float e, unsigned* out) {
  for (int off = 16; off > 0; off /= 2) e = fmaxf(e, __shfl_down_sync(0xffffffffu, e, off));
  if ((threadIdx.x & 31) == 0) atomicMax(out, __float_as_uint(e));
}

template <class T>
__global__ void check_forward(const T* x, const T* y, int64_t count, int64_t c, int64_t s,
                              bool cl, Reference ref, const float* weight, const float* bias,
                              unsigned* err) {
  float e = 0.0f;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t ch = channel_of(i, c, s, cl);
    const double r = (to_float(x[i]) - ref.mean[ch]) * ref.invstd[ch] * weight[ch] + bias[ch];
    e = fmaxf(e, rel_err(to_float(y[i]), r));
  }
  block_max_to(e, err);
}

template <class T>
__global__ void check_backward(const T* x, const T* dy, const T* dx, int64_t count, int64_t c,
                               int64_t s, bool cl, Reference ref, const float* weight, double m,
                               unsigned* err) {
  float e = 0.0f;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t ch = channel_of(i, c, s, cl);
    const double is = ref.invstd[ch];
    const double r = weight[ch] * is *
                     (to_float(dy[i]) - ref.sum_dy[ch] / m -
                      (to_float(x[i]) - ref.mean[ch]) * is * is * ref.sum_dy_xmu[ch] / m);
    e = fmaxf(e, rel_err(to_float(dx[i]), r));
  }
  block_max_to(e, err);
}

__global__ void check_params(const float* out, const double* ref, int64_t c, unsigned* err) {
  float e = 0.0f;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < c;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    e = fmaxf(e, rel_err(out[i], ref[i]));
  }
  block_max_to(e, err);
}

}  // namespace

void prepare_problem(const Context& ctx, const Problem& p, const ParamSet& ps,
                     const Reference& ref) {
  const int64_t c = p.shape.c, s = p.spatial(), count = p.count();
  const bool cl = p.layout == Layout::nhwc;
  with_type(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const int g = grid_for(ctx, count);
    fill_data<T><<<g, 256, 0, ctx.stream>>>(ctx.x.as<T>(), count, c, s, cl, 1, 0.5f, 0.25f);
    LAUNCH_CHECK();
    fill_data<T><<<g, 256, 0, ctx.stream>>>(ctx.dy.as<T>(), count, c, s, cl, 2, 0.1f, 0.0f);
    LAUNCH_CHECK();
    reference_stats<T><<<static_cast<unsigned>(c), kRefThreads, 0, ctx.stream>>>(
        ctx.x.as<T>(), ctx.dy.as<T>(), p.n, c, s, cl, 1e-5, ref);
    LAUNCH_CHECK();
  });
  fill_params<<<grid_for(ctx, c), 256, 0, ctx.stream>>>(ps.weight, ps.bias, ps.rm, ps.rv,
                                                          ps.c_rm, ps.c_rv, c);
  LAUNCH_CHECK();
  CUDA_CHECK(cudaMemsetAsync(ctx.nbt.get(), 0, sizeof(int64_t), ctx.stream));
  CUDA_CHECK(cudaStreamSynchronize(ctx.stream));
}

std::pair<double, double> check_outputs(const Context& ctx, const Problem& p, const Reference& ref,
                                        const float* weight, const float* bias, const void* y,
                                        const float* mean, const float* invstd, const void* dx,
                                        const float* dweight, const float* dbias) {
  unsigned* err = ctx.err.as<unsigned>();
  CUDA_CHECK(cudaMemsetAsync(err, 0, 6 * sizeof(unsigned), ctx.stream));
  const int64_t c = p.shape.c, s = p.spatial(), count = p.count();
  const bool cl = p.layout == Layout::nhwc;
  const int g = grid_for(ctx, count);
  with_type(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    check_forward<T><<<g, 256, 0, ctx.stream>>>(ctx.x.as<T>(), static_cast<const T*>(y), count,
                                                c, s, cl, ref, weight, bias, err + 0);
    LAUNCH_CHECK();
    check_backward<T><<<g, 256, 0, ctx.stream>>>(ctx.x.as<T>(), ctx.dy.as<T>(),
                                                 static_cast<const T*>(dx), count, c, s, cl, ref,
                                                 weight, static_cast<double>(p.n * s), err + 3);
    LAUNCH_CHECK();
  });
  const int gc = grid_for(ctx, c);
  check_params<<<gc, 256, 0, ctx.stream>>>(mean, ref.mean, c, err + 1);
  LAUNCH_CHECK();
  check_params<<<gc, 256, 0, ctx.stream>>>(invstd, ref.invstd, c, err + 2);
  LAUNCH_CHECK();
  check_params<<<gc, 256, 0, ctx.stream>>>(dweight, ref.dweight, c, err + 4);
  LAUNCH_CHECK();
  check_params<<<gc, 256, 0, ctx.stream>>>(dbias, ref.sum_dy, c, err + 5);
  LAUNCH_CHECK();
  unsigned bits[6];
  CUDA_CHECK(cudaMemcpyAsync(bits, err, sizeof(bits), cudaMemcpyDeviceToHost, ctx.stream));
  CUDA_CHECK(cudaStreamSynchronize(ctx.stream));
  float e[6];
  std::memcpy(e, bits, sizeof(e));
  return {std::max({e[0], e[1], e[2]}), std::max({e[3], e[4], e[5]})};
}

}  // namespace cuda_bench
