// cuda_bench's cuDNN baseline (cudnn_baseline.cu).
#ifndef SYNCBN_BENCH_CUDA_CUDNN_BASELINE_CUH
#define SYNCBN_BENCH_CUDA_CUDNN_BASELINE_CUH

#include "context.cuh"

namespace cuda_bench {

// Times cuDNN's forward training and backward of r.p in each selected mode into r.cudnn_fwd,
// r.cudnn_bwd, checks their outputs (r.cudnn_err) and notes the modes cuDNN rejects
// (r.cudnn_note). Nothing with --cudnn-mode none.
void measure_cudnn(Context& ctx, Result& r, const ParamSet& ps, const Reference& ref);

}  // namespace cuda_bench

#endif  // SYNCBN_BENCH_CUDA_CUDNN_BASELINE_CUH
