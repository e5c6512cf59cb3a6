// cuda_bench's cuDNN baseline: cudnnBatchNormalizationForwardTraining / Backward of the same
// problem (CUDNN_BATCHNORM_SPATIAL and _SPATIAL_PERSISTENT, the best of both unless
// --cudnn-mode), timed like syncbn and checked against the same fp64 reference; "n/a" with the
// reason where cuDNN rejects a combination.
#include <string>

#include "cudnn_baseline.cuh"
#include "reference.cuh"

namespace cuda_bench {

const char* const kCudnnModeName[2] = {"spatial", "persistent"};

namespace {

const cudnnBatchNormMode_t kCudnnMode[2] = {CUDNN_BATCHNORM_SPATIAL,
                                            CUDNN_BATCHNORM_SPATIAL_PERSISTENT};

}  // namespace

void measure_cudnn(Context& ctx, Result& r, const ParamSet& ps, const Reference& ref) {
  const Problem& p = r.p;
  if (ctx.o.cudnn_mode == "none") return;
  struct Desc {
    cudnnTensorDescriptor_t d = nullptr;
    Desc() { CUDNN_CHECK(cudnnCreateTensorDescriptor(&d)); }
    ~Desc() { (void)cudnnDestroyTensorDescriptor(d); }
  } xd, pd;
  const cudnnStatus_t sd = cudnnSetTensor4dDescriptor(
      xd.d, p.layout == Layout::nchw ? CUDNN_TENSOR_NCHW : CUDNN_TENSOR_NHWC,
      cudnn_dtype(p.dtype), static_cast<int>(p.n), static_cast<int>(p.shape.c),
      static_cast<int>(p.shape.h), static_cast<int>(p.shape.w));
  if (sd != CUDNN_STATUS_SUCCESS) {
    r.cudnn_note = std::string("descriptor: ") + cudnnGetErrorString(sd);
    return;
  }
  const float one = 1.0f, zero = 0.0f;
  const double eps = 1e-5, momentum = 0.1;
  for (int m = 0; m < 2; ++m) {
    if (ctx.o.cudnn_mode != "best" && ctx.o.cudnn_mode != kCudnnModeName[m]) continue;
    const cudnnBatchNormMode_t mode = kCudnnMode[m];
    const cudnnStatus_t sp = cudnnDeriveBNTensorDescriptor(pd.d, xd.d, mode);
    if (sp != CUDNN_STATUS_SUCCESS) {
      r.cudnn_note += std::string(kCudnnModeName[m]) + ": " + cudnnGetErrorString(sp) + "; ";
      continue;
    }
    auto forward = [&]() -> cudnnStatus_t {
      return cudnnBatchNormalizationForwardTraining(
          ctx.cudnn, mode, &one, &zero, xd.d, ctx.x.get(), xd.d, ctx.y_ref.get(), pd.d,
          ps.weight, ps.bias, momentum, ps.c_rm, ps.c_rv, eps, ps.c_mean, ps.c_invstd);
    };
    auto backward = [&]() -> cudnnStatus_t {
      return cudnnBatchNormalizationBackward(
          ctx.cudnn, mode, &one, &zero, &one, &zero, xd.d, ctx.x.get(), xd.d, ctx.dy.get(),
          xd.d, ctx.dx_ref.get(), pd.d, ps.weight, ps.c_dweight, ps.c_dbias, eps, ps.c_mean,
          ps.c_invstd);
    };
    // Probe: a status other than success means cuDNN does not serve this combination.
    cudnnStatus_t st = forward();
    if (st == CUDNN_STATUS_SUCCESS) st = backward();
    if (st != CUDNN_STATUS_SUCCESS) {
      r.cudnn_note += std::string(kCudnnModeName[m]) + ": " + cudnnGetErrorString(st) + "; ";
      recover(ctx.stream);
      continue;
    }
    CUDA_CHECK(cudaStreamSynchronize(ctx.stream));
    r.cudnn_fwd[m] = ctx.timer.time([&] { CUDNN_CHECK(forward()); });
    r.cudnn_bwd[m] = ctx.timer.time([&] { CUDNN_CHECK(backward()); });
    if (ctx.o.check) {
      const auto e = check_outputs(ctx, p, ref, ps.weight, ps.bias, ctx.y_ref.get(), ps.c_mean,
                                   ps.c_invstd, ctx.dx_ref.get(), ps.c_dweight, ps.c_dbias);
      const double worst = std::max(e.first, e.second);
      r.cudnn_err = std::isnan(r.cudnn_err) ? worst : std::max(r.cudnn_err, worst);
    }
  }
}

}  // namespace cuda_bench
