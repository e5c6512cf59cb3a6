/* The C API from a consumer project: one single-process forward + backward, checked. */
#include <math.h>
#include <stdio.h>
#include <syncbn/syncbn.h>

#define CHECK(call)                                                                   \
  do {                                                                                \
    syncbn_status_t s_ = (call);                                                      \
    if (s_ != SYNCBN_SUCCESS) {                                                       \
      fprintf(stderr, "%s: %s: %s\n", #call, syncbn_status_string(s_), syncbn_last_error()); \
      return 1;                                                                       \
    }                                                                                 \
  } while (0)

int main(void) {
  enum { N = 4, C = 2 };
  const int64_t shape[2] = {N, C}; /* (N, C) */
  float x[N * C] = {1, 10, 2, 20, 3, 30, 4, 40}, y[N * C], dy[N * C], dx[N * C];
  float weight[C] = {1, 1}, bias[C] = {0, 0}, running_mean[C] = {0, 0}, running_var[C] = {1, 1};
  float save_mean[C], save_invstd[C], dweight[C], dbias[C];
  int64_t num_batches_tracked = 0;
  syncbn_comm_t comm;
  syncbn_config_t config;
  syncbn_plan_t plan;
  int version = 0;
  CHECK(syncbn_get_version(&version)); /* the installed, generated syncbn/version.h agrees */
  if (version != SYNCBN_VERSION_CODE) {
    fprintf(stderr, "consumer_c: library version %d, headers %d\n", version, SYNCBN_VERSION_CODE);
    return 1;
  }
  CHECK(syncbn_comm_create_self(&comm));
  CHECK(syncbn_config_init(&config, C, SYNCBN_FLOAT32));
  CHECK(syncbn_plan_create(comm, &config, &plan));
  CHECK(syncbn_forward_training(plan, 2, shape, x, weight, bias, y, save_mean, save_invstd,
                                running_mean, running_var, &num_batches_tracked, NULL));
  for (int i = 0; i < N * C; ++i) dy[i] = y[i];
  CHECK(syncbn_backward(plan, 2, shape, x, dy, weight, save_mean, save_invstd, dx, dweight, dbias,
                        NULL));
  /* channel 0 holds 1..4: mean 2.5, biased var 1.25 */
  if (fabsf(save_mean[0] - 2.5f) > 1e-6f || fabsf(y[0] + 1.5f / sqrtf(1.25f + 1e-5f)) > 1e-5f ||
      fabsf(running_var[0] - (0.9f + 0.1f * 1.25f * 4 / 3)) > 1e-6f || num_batches_tracked != 1) {
    fprintf(stderr, "consumer_c: wrong result\n");
    return 1;
  }
  syncbn_plan_destroy(plan);
  syncbn_comm_destroy(comm);
  printf("consumer_c: ok (y[0] = %.6f, running_var[0] = %.6f)\n", y[0], running_var[0]);
  return 0;
}
