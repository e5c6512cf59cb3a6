/* The calls of fuzz_c_api.cpp that pass enumeration values by value, in C: a C caller may pass
   any int where the header has an enum parameter (the C enum is compatible with its integer
   type), and the header documents how unknown values are rejected. In C++ an enum value outside
   the enumerators' range is undefined, so the C++ harness cannot make one itself. */
#include "syncbn/syncbn.h"

int fuzz_config_init(syncbn_config_t* config, int64_t num_features, int dtype) {
  return (int)syncbn_config_init(config, num_features, (syncbn_dtype_t)dtype);
}

int fuzz_plan_reject_call(syncbn_plan_t plan, int call, const char* argument, int problem,
                          const char* detail, void* stream) {
  return (int)syncbn_plan_reject_call(plan, (syncbn_call_t)call, argument,
                                      (syncbn_problem_t)problem, detail, stream);
}
