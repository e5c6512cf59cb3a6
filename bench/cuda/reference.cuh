// cuda_bench's correctness side (like nccl-tests -c): the data and parameters of a problem
// generated on the device, the fp64 reference statistics, and the check of a set of outputs
// (syncbn's or cuDNN's) against them: max |out - ref| / (1 + |ref|) (reference.cu).
#ifndef SYNCBN_BENCH_CUDA_REFERENCE_CUH
#define SYNCBN_BENCH_CUDA_REFERENCE_CUH

#include <utility>

#include "context.cuh"

namespace cuda_bench {

// Fills x, dy (per-channel offsets and scales, see reference.cu), the parameters and the running
// statistics of syncbn and cuDNN, num_batches_tracked, and computes the fp64 reference of the
// problem into ref; synchronizes the stream.
void prepare_problem(const Context& ctx, const Problem& p, const ParamSet& ps,
                     const Reference& ref);

// Max relative errors {forward, backward} of a set of outputs against the fp64 reference.
std::pair<double, double> check_outputs(const Context& ctx, const Problem& p, const Reference& ref,
                                        const float* weight, const float* bias, const void* y,
                                        const float* mean, const float* invstd, const void* dx,
                                        const float* dweight, const float* dbias);

}  // namespace cuda_bench

#endif  // SYNCBN_BENCH_CUDA_REFERENCE_CUH
