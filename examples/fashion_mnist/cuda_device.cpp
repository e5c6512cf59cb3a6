#include "cuda_device.hpp"

#include <stdexcept>
#include <string>

#include "data_parallel.hpp"

namespace syncbn_examples {

int select_local_cuda_device(MPI_Comm comm) {
  const int local = local_rank(comm);  // collective: every rank takes part before any throws
  const int count = cuda_device_count();
  if (count <= 0) {
    throw std::runtime_error("rank " + std::to_string(mpi_rank(comm)) + ": no CUDA device");
  }
  const int device = local % count;
  cuda_set_device(device);
  return device;
}

}  // namespace syncbn_examples
