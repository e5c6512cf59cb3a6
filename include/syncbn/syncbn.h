/*
 * syncbn: synchronized batch normalization across processes.
 *
 * The C API. Opaque handles, a status code from every call, outputs through trailing pointers,
 * the stream (or NULL) last. Backend constructors live in their own headers
 * (syncbn/syncbn_mpi.h), so a CPU-only, single-process user never includes mpi.h.
 *
 * What one training step computes (Ioffe & Szegedy 2015, Algorithm 1, with the mini-batch taken
 * over every rank of the group):
 *   per channel c, over the m = sum_r N_r * S_r values of all ranks r of the group:
 *     mean_c   = (1/m) sum x
 *     var_c    = max((1/m) sum x^2 - mean_c^2, 0)  (biased; used for normalizing)
 *     invstd_c = 1 / sqrt(var_c + eps)
 *     y        = (x - mean_c) * invstd_c * weight_c + bias_c
 *     running_mean = (1 - a) running_mean + a mean_c
 *     running_var  = (1 - a) running_var  + a var_c m / (m - 1)   (unbiased, global m)
 *   with a = momentum, or 1 / num_batches_tracked when momentum is SYNCBN_MOMENTUM_CUMULATIVE.
 * Local sums are accumulated in fp64 and ONE allreduce(SUM) of an fp64 buffer of 2C + 18
 * values ([17 guard slots | sum (x - K) | sum (x - K)^2 | m], K the shared shift, see
 * Precision) combines them, whatever the number of ranks (two where the shift must be refined).
 * Backward likewise makes one allreduce of [guards | sum dy | sum dy (x - mean) | m].
 *
 * Shapes and layouts. A tensor is described by ndim (2 to 5) and shape[ndim], dense and
 * contiguous in the plan's layout:
 *   SYNCBN_CHANNELS_FIRST: (N, C), (N, C, L), (N, C, H, W), (N, C, D, H, W)   (NCHW)
 *   SYNCBN_CHANNELS_LAST:  (N, C), (N, L, C), (N, H, W, C), (N, D, H, W, C)   (NHWC)
 * C must equal the plan's num_features on every rank. N and the spatial sizes may differ between
 * ranks, and N may be 0 (the rank then contributes zeros but still takes part in the collective).
 * Data pointers (x, y, dy, dx) may be NULL only where the local tensor is empty.
 *
 * Dtypes. Data is SYNCBN_FLOAT32 or SYNCBN_FLOAT64 on the CPU; SYNCBN_FLOAT16 (IEEE binary16)
 * and SYNCBN_BFLOAT16 are CUDA-only (SYNCBN_ERROR_NOT_SUPPORTED on a CPU plan).
 * Parameters (weight, bias, their gradients) and statistics (running_mean, running_var,
 * save_mean, save_invstd) are arrays of C values of the "parameter type": float for FLOAT32,
 * FLOAT16 and BFLOAT16 data, double for FLOAT64 data.
 *
 * Collectives and failure. Calls marked COLLECTIVE must be made by every rank of the plan's
 * group, in the same order. A rank that rejects its own arguments still enters the collective
 * with a failure flag instead of data, so every rank of the group returns the same status and a
 * message naming the rank and the argument ("rank 2: weight is null") instead of waiting
 * forever. A failed call changes no running statistic and no
 * num_batches_tracked, on any rank. Call fingerprints (plan, operation, sequence number) travel
 * with every allreduce, so a rank that skipped a call or called another layer makes every rank
 * fail with SYNCBN_ERROR_CALL_MISMATCH; the plan's call sequence is then out of step and the
 * plan must be destroyed and created again. (Ranks in calls of plans with different C pass
 * allreduces of different lengths, which MPI itself may report as SYNCBN_ERROR_COMM or not at
 * all: the check is best effort there.) The exceptions are a NULL plan or communicator handle:
 * that rank has no group to tell, returns SYNCBN_ERROR_INVALID_ARGUMENT at once, and its peers
 * will wait.
 *
 * Precision. Sums are taken around a per-channel shift identical on every rank and near the
 * mean (the plan's previous mean rounded to the data type; a call whose batch mean is more than
 * 2 standard deviations from it redoes its sums around that mean, with a second allreduce: a
 * plan's first call, a jump in the data; CUDA plans on their first training call only), in fp64
 * (CPU plans first sum groups of 16 rows in the data type where the inner size is 1,
 * channels-last or (N, C), redoing them in fp64 if fp32 overflows; CUDA plans sum vectors of
 * rows in fp32), and reduced as they are: fp64 data at mean/std 1e4 (1e6) keeps its variance to
 * 1e-13 (1e-10) relative, fp32 data at 1e4 to 1e-6, a constant channel normalizes to exactly 0.
 * Outputs are (x - center) * scale + shift with the rounding of center folded into
 * shift in fp64. Saved statistics are of the parameter type, so backward of fp32 data centers on
 * the fp32-rounded mean: dweight and the projection term of dx carry a relative error of about
 * 6e-8 * |mean| / std (as in cuDNN and PyTorch).
 *
 * Deadlines. Every collective (communicator creation and split, plan creation, forward and
 * backward training calls, syncbn_plan_reject_call) finishes or fails by the communicator's
 * deadline: syncbn_comm_set_timeout, default 600 s or SYNCBN_TIMEOUT_S from the environment.
 * When it passes, the call returns SYNCBN_ERROR_TIMEOUT on every rank that waited, writes
 * nothing, and breaks the communicator: every later call on it and its plans returns
 * SYNCBN_ERROR_COMM_BROKEN at once, and syncbn_comm_abort ends the job. So a rank that leaves
 * the loop early, evaluates while the others train, stalls or dies costs its peers at most the
 * deadline, never a hang. Over NCCL, forward and backward only enqueue; the host's wait for them
 * is bounded where it happens (syncbn_plan_get_async_error). A rank that arrives late (stopped,
 * then continued) may complete its call against the messages its peers abandoned and succeed
 * where they timed out: its running statistics then differ from theirs, and the job, whose
 * communicators are broken on the other ranks, should end (syncbn_comm_abort).
 *
 * The contract in full (the packed buffer, the guard protocol, the precision argument, the
 * failure semantics): docs/design.md in the source tree, installed as
 * share/doc/syncbn/design.md.
 *
 * Bitwise-identical running statistics across ranks rely on the allreduce returning the same
 * sums on every rank, as MPI advises and Open MPI and MPICH do.
 *
 * CUDA plans (device = SYNCBN_DEVICE_CUDA, built with SYNCBN_WITH_CUDA). Every data, parameter
 * and statistics pointer, num_batches_tracked included (one int64 in device memory), is device
 * memory of the device that was current at syncbn_plan_create; that device must be current at
 * every call. stream is a cudaStream_t cast to void* (NULL: the legacy default stream). Kernels
 * and the allreduce are enqueued on stream, in stream order with the caller's work:
 *   - over an NCCL communicator (syncbn_nccl.h) a call never synchronizes the host, so a whole
 *     training step can be captured in a CUDA graph and replayed; errors the group only finds
 *     out on the device (a rank's bad argument, a call mismatch, an empty global batch) are
 *     recorded on the device and returned by syncbn_plan_get_async_error, with the same message
 *     the CPU path gives. The failed call still leaves running statistics and
 *     num_batches_tracked untouched and writes NaN to its outputs (y, save_*, dx, dweight,
 *     dbias), so a failure cannot pass as data;
 *   - over the self communicator nothing is exchanged; over MPI the packed buffer goes through
 *     pinned host memory (or straight to MPI when Open MPI is CUDA-aware), the call synchronizes
 *     stream once (CUDA-aware MPI: twice, before and after the allreduce), and every error is
 *     returned by the call itself, as on the CPU;
 *   - over a custom communicator (syncbn_comm_create_custom) the caller's allreduce gets the
 *     device buffer and the stream, and verdicts are reached on the device as over NCCL.
 * Arguments a rank can check itself (null pointers, shapes, the current device) are returned by
 * the call on that rank in every case; it still enqueues its part of the allreduce, carrying the
 * failure, so that no peer waits forever. The call sequence number that guards against skipped
 * calls is counted on the device, so graph replays count as calls. A negative
 * num_batches_tracked (device memory) is found on the device: asynchronously over NCCL and over
 * the self communicator. A plan's calls share its device memory, so they run in call order:
 * each call first waits (cudaStreamWaitEvent, on its stream) for the end of the plan's previous
 * call, whatever stream that used. Inside a CUDA graph capture no event is recorded or waited
 * on: the caller must order the launches of graphs that use one plan (one stream does). Over
 * NCCL, ranks in calls of plans with different C enqueue allreduces of different lengths, which
 * NCCL does not detect: they hang rather than fail.
 *
 * Threads. Handles are not thread-safe: one thread at a time per plan and per communicator. CPU
 * kernels run with OpenMP on omp_get_max_threads() threads. The last-error message is kept per
 * thread.
 *
 * Memory. On Linux, CPU plans advise outputs (y, dx) of 4 MiB or more as transparent huge pages
 * (madvise MADV_HUGEPAGE) before writing them: a freshly allocated output then faults in 2 MiB
 * instead of 4 KiB pages, which for a 100 MB tensor more than halves the call. A hint only;
 * SYNCBN_CPU_HUGEPAGES=0 in the environment turns it off. Outputs (y, dx and dz together) at
 * least as large as the last-level cache are written with non-temporal stores on x86-64: they
 * skip the read of every line an ordinary store first makes, and leave the cache to the inputs
 * (the output would not have stayed in it). The threshold is the cache size from sysfs (else
 * sysconf, else 32 MiB); SYNCBN_CPU_STREAM_BYTES=N in the environment sets it to N bytes (0:
 * every output). The values written are the same either way.
 */
#ifndef SYNCBN_SYNCBN_H
#define SYNCBN_SYNCBN_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "syncbn/version.h" /* SYNCBN_VERSION_MAJOR, _MINOR, _PATCH, _CODE */

#if defined(_WIN32) && defined(SYNCBN_BUILDING)
#define SYNCBN_API __declspec(dllexport)
#elif defined(_WIN32)
#define SYNCBN_API __declspec(dllimport)
#elif defined(__GNUC__)
#define SYNCBN_API __attribute__((visibility("default")))
#else
#define SYNCBN_API
#endif

#ifdef __cplusplus
extern "C" {
#endif


/* Status codes. Every call returns one; syncbn_last_error() gives the detail. */
typedef enum syncbn_status {
  SYNCBN_SUCCESS = 0,
  /* A null pointer, a bad shape, C <= 0, eps <= 0, momentum outside [0, 1], a bad group size,
     on this rank or (for collective calls) on any rank of the group: the message names the rank
     and the argument. */
  SYNCBN_ERROR_INVALID_ARGUMENT = 1,
  /* syncbn_plan_create: the ranks of the group disagree on the configuration (the message
     names the field). */
  SYNCBN_ERROR_CONFIG_MISMATCH = 2,
  /* A collective call met a different call on another rank: a rank skipped a call, or called
     another plan, or forward met backward. */
  SYNCBN_ERROR_CALL_MISMATCH = 3,
  /* The global batch is too small: m == 0, or m == 1 in training with track_running_stats
     (the unbiased variance m / (m - 1) is undefined). */
  SYNCBN_ERROR_BATCH_TOO_SMALL = 4,
  /* A valid request this build cannot serve (a dtype or device it was built without). */
  SYNCBN_ERROR_NOT_SUPPORTED = 5,
  /* The communication backend failed (MPI or NCCL returned an error), or its sum is garbage
     (the group's count of values is NaN, infinite or negative). */
  SYNCBN_ERROR_COMM = 6,
  SYNCBN_ERROR_OUT_OF_MEMORY = 7,
  SYNCBN_ERROR_INTERNAL = 8,
  /* A collective did not complete by the communicator's deadline (syncbn_comm_set_timeout): a
     peer left the loop, evaluates, stalls, or died. Returned on every rank that waited; the
     message names the plan (syncbn_plan_set_name), the operation, its call number and the
     seconds waited. Nothing was written, as for every failure. The communicator is then broken
     (the abandoned collective can never complete). */
  SYNCBN_ERROR_TIMEOUT = 9,
  /* The communicator is broken: an earlier collective on it timed out or its transport failed.
     Every later call on it and its plans returns this at once, with the first failure in the
     message. (Subgroups made from it before are communicators of their own: their collectives
     time out themselves if peers are gone.) Destroy them, or end the job with
     syncbn_comm_abort. */
  SYNCBN_ERROR_COMM_BROKEN = 10,
  /* Not values: they give the enumeration the range of int, so that any int a caller passes
     (or casts) is a value the library may hold, and rejects, in C++ as in C. */
  SYNCBN_STATUS_RANGE_MIN_ = -2147483647 - 1,
  SYNCBN_STATUS_RANGE_MAX_ = 2147483647
} syncbn_status_t;

typedef enum syncbn_dtype {
  SYNCBN_FLOAT32 = 0,
  SYNCBN_FLOAT64 = 1,
  SYNCBN_FLOAT16 = 2,  /* IEEE binary16, CUDA plans only */
  SYNCBN_BFLOAT16 = 3, /* bfloat16, CUDA plans only */
  /* Not values: they give the enumeration the range of int (see syncbn_status_t). */
  SYNCBN_DTYPE_RANGE_MIN_ = -2147483647 - 1,
  SYNCBN_DTYPE_RANGE_MAX_ = 2147483647
} syncbn_dtype_t;

typedef enum syncbn_layout {
  SYNCBN_CHANNELS_FIRST = 0, /* (N, C, *spatial), NCHW */
  SYNCBN_CHANNELS_LAST = 1,  /* (N, *spatial, C), NHWC */
  /* Not values: they give the enumeration the range of int (see syncbn_status_t). */
  SYNCBN_LAYOUT_RANGE_MIN_ = -2147483647 - 1,
  SYNCBN_LAYOUT_RANGE_MAX_ = 2147483647
} syncbn_layout_t;

typedef enum syncbn_device {
  SYNCBN_DEVICE_CPU = 0,
  SYNCBN_DEVICE_CUDA = 1, /* needs a build with SYNCBN_WITH_CUDA, else SYNCBN_ERROR_NOT_SUPPORTED */
  /* Not values: they give the enumeration the range of int (see syncbn_status_t). */
  SYNCBN_DEVICE_RANGE_MIN_ = -2147483647 - 1,
  SYNCBN_DEVICE_RANGE_MAX_ = 2147483647
} syncbn_device_t;

/* An activation fused into the layer's elementwise passes (oneDNN's fuse_norm_relu and
   fuse_norm_add_relu, cuDNN's CUDNN_BATCHNORM_OPS_BN_ACTIVATION and _BN_ADD_ACTIVATION): one
   read and write of the tensor fewer per op than batch norm followed by separate ops. */
typedef enum syncbn_activation {
  SYNCBN_ACTIVATION_NONE = 0,     /* y = bn(x) */
  SYNCBN_ACTIVATION_RELU = 1,     /* y = max(bn(x), 0) */
  SYNCBN_ACTIVATION_ADD_RELU = 2, /* y = max(bn(x) + z, 0), z the residual (shortcut) input */
  /* Not values: they give the enumeration the range of int (see syncbn_status_t). */
  SYNCBN_ACTIVATION_RANGE_MIN_ = -2147483647 - 1,
  SYNCBN_ACTIVATION_RANGE_MAX_ = 2147483647
} syncbn_activation_t;

/* momentum value meaning "unset": running statistics are the cumulative average,
   a = 1 / num_batches_tracked (PyTorch's momentum=None). A quiet NaN. */
#define SYNCBN_MOMENTUM_CUMULATIVE ((double)NAN)

/* A layer's configuration. Fill it with syncbn_config_init, then change fields. Every rank of
   the group must pass the same values to syncbn_plan_create. */
typedef struct syncbn_config {
  int64_t num_features;      /* C, > 0 */
  syncbn_dtype_t dtype;      /* of x, y, dy, dx */
  syncbn_layout_t layout;    /* default SYNCBN_CHANNELS_FIRST */
  syncbn_device_t device;    /* default SYNCBN_DEVICE_CPU */
  double eps;                /* > 0 and finite, default 1e-5 */
  double momentum;           /* in [0, 1] or SYNCBN_MOMENTUM_CUMULATIVE, default 0.1 */
  int affine;                /* nonzero: learnable weight and bias; 0: weight 1, bias 0. Default 1 */
  int track_running_stats;   /* nonzero: keep running_mean / running_var. Default 1 */
  int global_param_grads;    /* nonzero: dweight / dbias summed over the group; 0 (default):
                                local to this rank, as PyTorch's SyncBatchNorm, for trainers
                                that average parameter gradients themselves */
  syncbn_activation_t activation; /* default SYNCBN_ACTIVATION_NONE (since 0.4) */
} syncbn_config_t;

typedef struct syncbn_comm_s* syncbn_comm_t;
typedef struct syncbn_plan_s* syncbn_plan_t;

/* The name of a status code ("SYNCBN_ERROR_INVALID_ARGUMENT"). Never NULL; an unknown value
   gives "SYNCBN_ERROR_UNKNOWN_STATUS". */
SYNCBN_API const char* syncbn_status_string(syncbn_status_t status);

/* The message of the last failed call on this thread ("" if none). Valid until the next call
   into syncbn on this thread. */
SYNCBN_API const char* syncbn_last_error(void);

/* The version of the library loaded, as MAJOR * 10000 + MINOR * 100 + PATCH (0.3.0: 300), in
   *version: compare it with SYNCBN_VERSION_CODE (syncbn/version.h) of the headers compiled
   against, as ncclGetVersion is used. Returns SYNCBN_ERROR_INVALID_ARGUMENT if version is NULL. */
SYNCBN_API syncbn_status_t syncbn_get_version(int* version);

/* Fills *config with the defaults above for num_features channels of dtype. Does not validate
   (syncbn_plan_create does). Returns SYNCBN_ERROR_INVALID_ARGUMENT if config is NULL. */
SYNCBN_API syncbn_status_t syncbn_config_init(syncbn_config_t* config, int64_t num_features,
                                              syncbn_dtype_t dtype);

/* ---- Communicators ------------------------------------------------------------------------ */

/* A communicator of one process (rank 0, size 1) that needs no MPI. Synchronized BN over it is
   plain batch norm. */
SYNCBN_API syncbn_status_t syncbn_comm_create_self(syncbn_comm_t* comm);

/* A caller-supplied allreduce for syncbn_comm_create_custom: sums count doubles in place over
   the group, with the same result on every rank, as MPI_Allreduce(MPI_IN_PLACE, buffer, count,
   MPI_DOUBLE, MPI_SUM, ...) would.
     buffer  count doubles. device SYNCBN_DEVICE_CPU: host memory, and stream is NULL (plan
             creation, syncbn_comm_split, and every call of a CPU plan). SYNCBN_DEVICE_CUDA: device
             memory of the current CUDA device, and stream is the cudaStream_t of the syncbn
             call (NULL: the legacy default stream); the sum must happen in stream order, either
             enqueued on stream (as ncclAllReduce does) or done before returning after
             synchronizing stream (calls of a CUDA plan).
     count   2C + 18 for forward and backward calls of a plan of C channels, fewer for plan
             creation and split (guard slots only)
     user_data  the pointer given to syncbn_comm_create_custom
   Returns 0 on success. SYNCBN_ERROR_TIMEOUT (9) means the sum did not complete by the deadline
   (syncbn_comm_get_timeout on the communicator; the function keeps it, e.g. with the timeout of
   its transport's wait): the syncbn call then returns SYNCBN_ERROR_TIMEOUT. Any other value
   fails the syncbn call on this rank with SYNCBN_ERROR_COMM, the value in the message. Either
   failure breaks the communicator (SYNCBN_ERROR_COMM_BROKEN afterwards). syncbn calls it from the thread that made the
   syncbn call, once per collective, in the same order on every rank; it must not call syncbn
   functions on the same communicator other than syncbn_comm_get_timeout. buffer is the
   communicator's own memory for host sums: after the function returned an error its transport
   may still write there (a late peer), which syncbn allows by never reusing or freeing it. What the other ranks see when it fails is up to the
   transport: a callback that returns an error without taking part in the sum leaves its peers
   waiting in theirs, so a transport that fails should fail on every rank. */
typedef int (*syncbn_allreduce_fn)(double* buffer, size_t count, syncbn_device_t device,
                                   void* stream, void* user_data);

/* Optional split for syncbn_comm_create_custom. Called by syncbn_comm_split on every rank of the
   parent once group_size is validated (>= 1, divides the size, the same on every rank). Must
   store in *sub this rank's communicator of the consecutive group of group_size ranks that
   contains it (rank parent_rank % group_size, size group_size), typically made with
   syncbn_comm_create_custom; syncbn takes ownership of that handle. Returns 0 on success, any
   other value for failure (SYNCBN_ERROR_COMM). */
typedef int (*syncbn_split_fn)(int group_size, void* user_data, syncbn_comm_t* sub);

/* Optional release for syncbn_comm_create_custom: called once, with user_data, when the
   communicator's handle and every plan and subgroup made on it have been destroyed. */
typedef void (*syncbn_release_fn)(void* user_data);

/* A communicator over any collective library (torch.distributed, Gloo, oneCCL, UCC, Horovod,
   a thread pool): the caller supplies the group's rank and size and an allreduce. Not
   collective, no communication. Everything else is as over MPI: every call makes one allreduce
   of [guard slots | data], carrying the verdicts, the configuration check at plan creation and
   the call fingerprints. split may be NULL: syncbn_comm_split then fails with
   SYNCBN_ERROR_NOT_SUPPORTED on every rank. release may be NULL. user_data must stay valid until
   release is called (or, without release, until the communicator and everything made on it is
   destroyed). CUDA plans on a custom communicator hand allreduce the device buffer and the
   stream and never synchronize the host (verdicts as over NCCL: syncbn_plan_get_async_error).
   Errors: SYNCBN_ERROR_INVALID_ARGUMENT (comm or allreduce NULL, size < 1, rank outside
   [0, size)); release is not called then. */
SYNCBN_API syncbn_status_t syncbn_comm_create_custom(int rank, int size,
                                                     syncbn_allreduce_fn allreduce,
                                                     syncbn_split_fn split,
                                                     syncbn_release_fn release, void* user_data,
                                                     syncbn_comm_t* comm);

/* COLLECTIVE over parent (a NULL parent fails locally and its peers wait). Splits parent into
   consecutive groups of group_size ranks
   (ranks [0, k), [k, 2k), ...); *sub is this rank's group. Statistics of plans on *sub are
   shared within the group only. group_size must be >= 1, divide parent's size, and be the same
   on every rank (else SYNCBN_ERROR_INVALID_ARGUMENT on every rank). MPI communicators split with
   MPI_Comm_split, NCCL ones with ncclCommSplit, custom ones with their split function. Two
   allreduces over parent: one validates group_size, one agrees on the outcome of the split, so
   a rank whose backend fails to split makes every rank fail (SYNCBN_ERROR_COMM, or
   SYNCBN_ERROR_NOT_SUPPORTED for a custom communicator without a split function). Both
   allreduces are bounded by parent's deadline (SYNCBN_ERROR_TIMEOUT); MPI_Comm_split itself
   has no non-blocking form, and runs once the first allreduce found every rank present. */
SYNCBN_API syncbn_status_t syncbn_comm_split(syncbn_comm_t parent, int group_size,
                                             syncbn_comm_t* sub);

/* The deadline of every collective on comm and on the plans made on it, in seconds: a collective
   that has not completed after this long returns SYNCBN_ERROR_TIMEOUT and breaks the
   communicator (see SYNCBN_ERROR_TIMEOUT). 0 means no deadline (wait forever; over MPI the
   blocking MPI_Allreduce). A new communicator's deadline is SYNCBN_TIMEOUT_S from the
   environment when that is a number >= 0, else 600 (PyTorch's NCCL default); subgroups made by
   syncbn_comm_split inherit their parent's. Not collective: set the same value on every rank.
   Takes effect at the next collective. Over MPI a deadline of 0 changes the algorithm (see
   syncbn_mpi.h): give every rank a deadline, or none. Custom communicators (syncbn_comm_create_custom) keep
   the deadline in their allreduce function, which reads it with syncbn_comm_get_timeout and
   returns SYNCBN_ERROR_TIMEOUT when it passes. Errors: SYNCBN_ERROR_INVALID_ARGUMENT (comm NULL,
   seconds negative or not finite). */
SYNCBN_API syncbn_status_t syncbn_comm_set_timeout(syncbn_comm_t comm, double seconds);
SYNCBN_API syncbn_status_t syncbn_comm_get_timeout(syncbn_comm_t comm, double* seconds);

/* Ends the job, for callers that want that after SYNCBN_ERROR_TIMEOUT or
   SYNCBN_ERROR_COMM_BROKEN. MPI communicators: MPI_Abort on the library's duplicate, with error
   code 1 (does not return; mpirun ends every rank). NCCL communicators: ncclCommAbort on the
   NCCL communicator (which frees it: the caller must not use or destroy it again), then
   returns. Self and custom communicators: nothing to end but this process's use of it; returns.
   In every case that returns, the communicator is broken afterwards. Not collective.
   Errors: SYNCBN_ERROR_INVALID_ARGUMENT (comm NULL). */
SYNCBN_API syncbn_status_t syncbn_comm_abort(syncbn_comm_t comm);

/* Releases the handle. Plans made on it keep the communicator alive until they are destroyed.
   The last release of an MPI communicator frees its duplicate with MPI_Comm_free, which MPI
   defines as collective: release communicators and plans in the same order on every rank.
   NULL is accepted. */
SYNCBN_API syncbn_status_t syncbn_comm_destroy(syncbn_comm_t comm);

SYNCBN_API syncbn_status_t syncbn_comm_rank(syncbn_comm_t comm, int* rank);
SYNCBN_API syncbn_status_t syncbn_comm_size(syncbn_comm_t comm, int* size);

/* ---- Plans ---------------------------------------------------------------------------------- */

/* COLLECTIVE over comm (one allreduce; a NULL comm fails locally and its peers wait).
   num_features must be at most (INT_MAX - 64) / 2, so that the buffer fits one MPI call.
   Validates config on every rank and checks that all
   ranks agree on num_features, dtype, layout, device, eps, momentum, affine,
   track_running_stats, global_param_grads and activation. Errors (on every rank alike):
   SYNCBN_ERROR_INVALID_ARGUMENT (a rank's config is invalid: the message names rank and
   field), SYNCBN_ERROR_CONFIG_MISMATCH (valid but different: the message names the field),
   SYNCBN_ERROR_NOT_SUPPORTED (dtype or device this build lacks), SYNCBN_ERROR_OUT_OF_MEMORY
   (a rank could not allocate the plan). After creation, calls on the
   plan run no validation collective of their own: their checks ride on the one allreduce each
   call makes anyway. */
SYNCBN_API syncbn_status_t syncbn_plan_create(syncbn_comm_t comm, const syncbn_config_t* config,
                                              syncbn_plan_t* plan);

/* Releases the plan (and its reference to the communicator: see syncbn_comm_destroy).
   NULL is accepted. */
SYNCBN_API syncbn_status_t syncbn_plan_destroy(syncbn_plan_t plan);

/* Names the plan in every message of its calls ("plan 'layer3.bn2': forward_training call #17:
   ..."), e.g. with the layer's name in the model. Not collective. name is copied (up to 255
   bytes); NULL or "" removes the name (messages then say "plan #<serial>", the plan's creation
   number on its communicator). Errors: SYNCBN_ERROR_INVALID_ARGUMENT (plan NULL). */
SYNCBN_API syncbn_status_t syncbn_plan_set_name(syncbn_plan_t plan, const char* name);

/* Copies the plan's configuration into *config. */
SYNCBN_API syncbn_status_t syncbn_plan_get_config(syncbn_plan_t plan, syncbn_config_t* config);

/* CUDA plans: synchronizes stream (a cudaStream_t, NULL: the legacy default stream), then
   reports the first error the device recorded in this plan's calls since the last report, and
   clears it: SYNCBN_SUCCESS in *async_error if none, else the status (and syncbn_last_error()
   the message) that the failing call would have returned on the CPU. Only collective verdicts
   made on the device land here (NCCL communicators); errors the call itself returned do not.
   On a CPU plan, *async_error is always SYNCBN_SUCCESS. Over NCCL the wait for stream is bounded
   by the communicator's deadline: when it passes the NCCL communicator is aborted
   (syncbn_nccl.h) and this returns SYNCBN_ERROR_TIMEOUT itself. Returns
   SYNCBN_ERROR_INVALID_ARGUMENT (plan or async_error NULL), SYNCBN_ERROR_INTERNAL (the CUDA
   runtime failed), SYNCBN_ERROR_TIMEOUT, SYNCBN_ERROR_COMM (NCCL's asynchronous error),
   SYNCBN_ERROR_COMM_BROKEN. */
SYNCBN_API syncbn_status_t syncbn_plan_get_async_error(syncbn_plan_t plan, void* stream,
                                                       syncbn_status_t* async_error);

/* ---- Batch normalization -------------------------------------------------------------------- */

/* COLLECTIVE (one allreduce of 2C + 18 doubles; two where the shared shift is refined, see
   Precision above). Forward in training mode.
     x      [in]  data, shape[ndim] in the plan's layout and dtype
     weight [in]  C params (gamma); ignored (may be NULL) when affine is off
     bias   [in]  C params (beta);  ignored (may be NULL) when affine is off
     y      [out] same shape as x; may equal x (in place)
     save_mean, save_invstd [out] C params each: the batch mean and 1/sqrt(var + eps) over the
                  group, for syncbn_backward. May be NULL when no backward follows.
     running_mean, running_var [in/out] C params each; required when track_running_stats,
                  ignored otherwise
     num_batches_tracked [in/out] >= 0; required when track_running_stats and momentum is
                  SYNCBN_MOMENTUM_CUMULATIVE, optional (may be NULL) otherwise; incremented by
                  one on success when track_running_stats, ignored otherwise
     stream       must be NULL for CPU plans; a cudaStream_t for CUDA plans
   Errors: SYNCBN_ERROR_INVALID_ARGUMENT, SYNCBN_ERROR_CALL_MISMATCH,
   SYNCBN_ERROR_BATCH_TOO_SMALL, SYNCBN_ERROR_OUT_OF_MEMORY, SYNCBN_ERROR_COMM,
   SYNCBN_ERROR_TIMEOUT, SYNCBN_ERROR_COMM_BROKEN. On error, y,
   save_*, running_* and num_batches_tracked are left as they were, on every rank. */
SYNCBN_API syncbn_status_t syncbn_forward_training(
    syncbn_plan_t plan, int ndim, const int64_t* shape, const void* x, const void* weight,
    const void* bias, void* y, void* save_mean, void* save_invstd, void* running_mean,
    void* running_var, int64_t* num_batches_tracked, void* stream);

/* Forward in evaluation mode. Never collective: no communication, and a bad argument is
   SYNCBN_ERROR_INVALID_ARGUMENT on this rank only (no peer waits). The plan's call sequence does
   not advance, so one rank may evaluate alone between training calls.
   With track_running_stats on:
     y = (x - running_mean) / sqrt(running_var + eps) * weight + bias.
   x, y (unless the tensor is empty), running_mean, running_var and, when affine, weight and
   bias are required.
   With track_running_stats off there are no running statistics: y is normalized with this
   rank's OWN batch statistics (mean and biased variance of x over its N * S values per
   channel), as torch.nn.BatchNorm and torch.nn.SyncBatchNorm do in eval mode; running_mean and
   running_var are ignored. An empty local tensor is a success with nothing to write. (Before
   version 0.2 this case used the group's batch statistics and was collective.) On a broken
   communicator it fails with SYNCBN_ERROR_COMM_BROKEN like every call of the plan. */
SYNCBN_API syncbn_status_t syncbn_forward_inference(syncbn_plan_t plan, int ndim,
                                                    const int64_t* shape, const void* x,
                                                    const void* weight, const void* bias,
                                                    const void* running_mean,
                                                    const void* running_var, void* y,
                                                    void* stream);

/* COLLECTIVE (one allreduce of 2C + 18 doubles). Backward of syncbn_forward_training.
     x, dy  [in]  same shape, layout and dtype as the forward input
     weight [in]  C params; ignored (may be NULL) when affine is off
     save_mean, save_invstd [in] C params each, as written by syncbn_forward_training
     dx     [out] same shape as x; may equal dy (in place)
     dweight, dbias [out] C params each, optional (NULL: not computed); ignored when affine
                  is off. Local to this rank unless global_param_grads:
                  dweight = sum(dy * (x - mean)) * invstd, dbias = sum(dy).
   dx = weight * invstd * (dy - sum_g / m - (x - mean) * invstd^2 * sum_gx / m), with
   sum_g = sum dy and sum_gx = sum dy (x - mean) over the whole group.
   Errors: as syncbn_forward_training; SYNCBN_ERROR_BATCH_TOO_SMALL when m == 0. On error, dx,
   dweight and dbias are left as they were. */
SYNCBN_API syncbn_status_t syncbn_backward(syncbn_plan_t plan, int ndim, const int64_t* shape,
                                           const void* x, const void* dy, const void* weight,
                                           const void* save_mean, const void* save_invstd,
                                           void* dx, void* dweight, void* dbias, void* stream);

/* ---- Batch normalization with named arguments (and fused activations) ---------------------- */

/* syncbn_forward_training, syncbn_forward_inference and syncbn_backward above are the calls
   below with z, y and dz NULL: on a plan with an activation the forwards apply it (ADD_RELU
   then fails for want of z), and backward fails for want of y. */

/* The arguments of syncbn_forward_training_ex and syncbn_forward_inference_ex: those of
   syncbn_forward_training, by name, plus the residual input z and the relu mask. Zero-initialize
   the struct (= {0} in C, {} in C++) and set what the call uses, so that fields added later stay
   NULL.
     z     [in]  SYNCBN_ACTIVATION_ADD_RELU: the residual, same shape, layout and dtype as x (may
                 equal y); otherwise must be NULL.
     mask  [out] with an activation, optional (since 0.5): the relu's mask for syncbn_backward_ex,
                 one byte per element of y in y's memory order (as many bytes as x has elements;
                 a torch.bool / torch.uint8 tensor shaped like x), 1 where y > 0 and 0 elsewhere
                 (NaN: 0), written in the normalize pass beside y. A backward reading it instead
                 of y reads a quarter of the bytes (fp32; an eighth for fp64) in each of its two
                 passes (oneDNN's fuse_norm_relu workspace). Not x, y or z; without an
                 activation must be NULL. */
typedef struct syncbn_forward_args {
  int ndim;
  const int64_t* shape;
  const void* x;
  const void* z;
  const void* weight;
  const void* bias;
  void* y;
  void* save_mean;           /* training only */
  void* save_invstd;         /* training only */
  void* running_mean;        /* [in/out] in training, [in] in inference */
  void* running_var;         /* [in/out] in training, [in] in inference */
  int64_t* num_batches_tracked; /* training only */
  void* stream;
  void* mask;                /* since 0.5 */
} syncbn_forward_args_t;

/* The arguments of syncbn_backward_ex: those of syncbn_backward, by name, plus
     y     [in]  SYNCBN_ACTIVATION_RELU / _ADD_RELU: the forward's output, whose mask y > 0
                 gates dy (relu'(0) = 0, as PyTorch's threshold_backward); NULL where mask is
                 given; otherwise must be NULL
     mask  [in]  with an activation, in place of y (since 0.5): the forward's mask
                 (syncbn_forward_args_t.mask), whose nonzero bytes keep dy; the same results as with y,
                 bitwise. Exactly one of y and mask (both: "y must be NULL when mask is given").
                 Not dx or dz; without an activation must be NULL
     dz    [out] SYNCBN_ACTIVATION_ADD_RELU: the residual's gradient dy * (y > 0), optional (NULL:
                 not computed; may equal dy, not dx); otherwise must be NULL. */
typedef struct syncbn_backward_args {
  int ndim;
  const int64_t* shape;
  const void* x;
  const void* y;
  const void* dy;
  const void* weight;
  const void* save_mean;
  const void* save_invstd;
  void* dx;
  void* dz;
  void* dweight;
  void* dbias;
  void* stream;
  const void* mask;          /* since 0.5 */
} syncbn_backward_args_t;

/* syncbn_forward_training with the plan's activation fused into its normalize pass:
     y = act(bn(x)), or act(bn(x) + z) with SYNCBN_ACTIVATION_ADD_RELU,
   bn(x) as above (statistics, running statistics and saved statistics are those of bn; the
   activation changes y only). COLLECTIVE, with the same errors, guarantees and allreduce
   (args NULL on a rank: SYNCBN_ERROR_INVALID_ARGUMENT there, naming "args", and every rank
   fails alike). */
SYNCBN_API syncbn_status_t syncbn_forward_training_ex(syncbn_plan_t plan,
                                                      const syncbn_forward_args_t* args);

/* syncbn_forward_inference with the plan's activation (save_*, num_batches_tracked ignored).
   Never collective. */
SYNCBN_API syncbn_status_t syncbn_forward_inference_ex(syncbn_plan_t plan,
                                                       const syncbn_forward_args_t* args);

/* syncbn_backward of a fused forward: with g = dy * (y > 0), or dy where mask is not 0 (the
   activation's backward, in the same passes), the batch-norm backward of g: dx, dweight and dbias as syncbn_backward gives
   them for dy = g, and dz = g. Without an activation it is syncbn_backward. COLLECTIVE, with
   the same errors and guarantees (dz too is left as it was on error). */
SYNCBN_API syncbn_status_t syncbn_backward_ex(syncbn_plan_t plan,
                                              const syncbn_backward_args_t* args);

/* ---- Arguments the caller rejects ----------------------------------------------------------- */

/* The calls of a plan, for syncbn_plan_reject_call. */
typedef enum syncbn_call {
  SYNCBN_CALL_FORWARD_TRAINING = 1,
  SYNCBN_CALL_FORWARD_INFERENCE = 2,
  SYNCBN_CALL_BACKWARD = 3,
  /* Not values: they give the enumeration the range of int (see syncbn_status_t). */
  SYNCBN_CALL_RANGE_MIN_ = -2147483647 - 1,
  SYNCBN_CALL_RANGE_MAX_ = 2147483647
} syncbn_call_t;

/* What a caller found wrong with an argument that the C API, seeing only pointers, cannot check
   itself: a framework binding knows each tensor's dtype, device, strides and shape. */
typedef enum syncbn_problem {
  SYNCBN_PROBLEM_DTYPE = 1,   /* not of the plan's dtype (data) or parameter type */
  SYNCBN_PROBLEM_DEVICE = 2,  /* not in the memory of the plan's device */
  SYNCBN_PROBLEM_LAYOUT = 3,  /* not dense in the plan's layout */
  SYNCBN_PROBLEM_SHAPE = 4,   /* a shape other than the call's (dy unlike x, C params unlike C) */
  /* Not values: they give the enumeration the range of int (see syncbn_status_t). */
  SYNCBN_PROBLEM_RANGE_MIN_ = -2147483647 - 1,
  SYNCBN_PROBLEM_RANGE_MAX_ = 2147483647
} syncbn_problem_t;

/* COLLECTIVE where the call it stands for is (forward training, backward; forward inference is
   local). Takes this rank's part in that call as a rank that rejected its arguments, so that
   every rank of the group fails the call alike instead of waiting for this one: every rank
   returns SYNCBN_ERROR_INVALID_ARGUMENT with "rank R: <argument> <problem>", this rank with
   detail appended. Nothing is read or written but the plan's own state; the call sequence
   advances as the call would have advanced it.
     call      the call this rank was about to make
     argument  the C API's name of the argument ("x", "dy", "weight", "bias", "running_mean",
               "running_var", "num_batches_tracked", "save_mean", "save_invstd", "y", "dx",
               "dweight", "dbias", "z", "dz", "mask"); NULL or another name is reported as "an
               argument"
     problem   what is wrong (another value is reported as "rejected by the caller")
     detail    text for this rank's message only (may be NULL), e.g. "float64, plan float32"
     stream    as for the call: NULL for CPU plans, the cudaStream_t for CUDA plans
   Returns that error (never SYNCBN_SUCCESS), or SYNCBN_ERROR_INVALID_ARGUMENT at once, on
   this rank only, for a NULL plan or a call that is not a syncbn_call_t. */
SYNCBN_API syncbn_status_t syncbn_plan_reject_call(syncbn_plan_t plan, syncbn_call_t call,
                                                   const char* argument, syncbn_problem_t problem,
                                                   const char* detail, void* stream);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* SYNCBN_SYNCBN_H */
