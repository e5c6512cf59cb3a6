/* The MPI communicator from a C-only consumer: every rank holds the values rank and rank + 1 of
   one channel, so the group's mean is P / 2 on every rank. Run on 2 ranks by consumer_package. */
#include <math.h>
#include <stdio.h>
#include <syncbn/syncbn_mpi.h>

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, size = 1, ok = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  syncbn_comm_t comm = NULL;
  syncbn_config_t config;
  syncbn_plan_t plan = NULL;
  const int64_t shape[2] = {2, 1};
  const double x[2] = {rank, rank + 1};
  double y[2], mean[1], invstd[1];
  ok = syncbn_comm_create_mpi(MPI_COMM_WORLD, &comm) == SYNCBN_SUCCESS &&
       syncbn_config_init(&config, 1, SYNCBN_FLOAT64) == SYNCBN_SUCCESS;
  config.affine = 0;
  config.track_running_stats = 0;
  ok = ok && syncbn_plan_create(comm, &config, &plan) == SYNCBN_SUCCESS &&
       syncbn_forward_training(plan, 2, shape, x, NULL, NULL, y, mean, invstd, NULL, NULL, NULL,
                               NULL) == SYNCBN_SUCCESS;
  if (!ok || fabs(mean[0] - size / 2.0) > 1e-12) {
    fprintf(stderr, "consumer_c_mpi: rank %d: %s (mean %g, want %g)\n", rank, syncbn_last_error(),
            ok ? mean[0] : NAN, size / 2.0);
    ok = 0;
  } else if (rank == 0) {
    printf("consumer_c_mpi: ok (%d ranks, mean %g)\n", size, mean[0]);
  }
  syncbn_plan_destroy(plan);
  syncbn_comm_destroy(comm);
  MPI_Finalize();
  return ok ? 0 : 1;
}
