// The MPI communicator from a C++-only consumer (syncbn_mpi.hpp): every rank holds the values
// rank and rank + 1 of one channel, so the group's mean is P / 2. Run on 2 ranks.
#include <cmath>
#include <cstdio>
#include <syncbn/syncbn_mpi.hpp>
#include <vector>

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, size = 1, rc = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  try {
    auto world = syncbn::mpi_communicator(MPI_COMM_WORLD);
    auto config = syncbn::make_config(1, SYNCBN_FLOAT64);
    config.affine = 0;
    config.track_running_stats = 0;
    syncbn::BatchNorm bn(world, config);
    const std::vector<double> x{double(rank), double(rank + 1)};
    std::vector<double> y(2), mean(1), invstd(1);
    bn.forward_training({2, 1}, x.data(), nullptr, nullptr, y.data(), mean.data(), invstd.data(),
                        nullptr, nullptr, nullptr);
    if (std::fabs(mean[0] - size / 2.0) > 1e-12) {
      std::fprintf(stderr, "consumer_cpp_mpi: rank %d: mean %g, want %g\n", rank, mean[0], size / 2.0);
      rc = 1;
    } else if (rank == 0) {
      std::printf("consumer_cpp_mpi: ok (%d ranks, mean %g)\n", size, mean[0]);
    }
  } catch (const syncbn::Error& e) {
    std::fprintf(stderr, "consumer_cpp_mpi: rank %d: %s\n", rank, e.what());
    rc = 1;
  }
  MPI_Finalize();
  return rc;
}
