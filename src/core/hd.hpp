// SYNCBN_HD: marks the inline functions of src/core that CUDA kernels call too.
#ifndef SYNCBN_CORE_HD_HPP
#define SYNCBN_CORE_HD_HPP

#if defined(__CUDACC__)
#define SYNCBN_HD __host__ __device__
#else
#define SYNCBN_HD
#endif

#endif  // SYNCBN_CORE_HD_HPP
