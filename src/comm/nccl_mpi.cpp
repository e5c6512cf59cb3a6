// syncbn_nccl_comm_init_mpi: an NCCL communicator bootstrapped over MPI, one GPU per local rank.
// Every step is bounded by the default deadline (SYNCBN_TIMEOUT_S): MPI's collectives are
// non-blocking and polled, and NCCL's init is non-blocking (config.blocking = 0) and polled with
// ncclCommGetAsyncError, so that a rank whose ncclCommInitRank fails, or that never gets there,
// cannot leave the others in NCCL's bootstrap.
#include <cuda_runtime.h>
#include <mpi.h>
#include <nccl.h>

#include <algorithm>
#include <array>
#include <climits>
#include <memory>
#include <cstring>
#include <string>
#include <vector>

#include "comm/mpi.hpp"
#include "comm/nccl.hpp"
#include "core/error.hpp"

namespace syncbn::comm {
namespace {

// The lowest rank for which ok is false, or -1 if none (COLLECTIVE, by the deadline).
int first_failing(bool ok, int rank, int size, MPI_Comm comm, Deadline deadline) {
  // [mine, first]: MPI may still write it after a timeout
  auto slots = std::make_shared<std::array<int, 2>>();
  auto& mine = *slots;
  mine[0] = ok ? size : rank;
  MPI_Request request = MPI_REQUEST_NULL;
  check_mpi(MPI_Iallreduce(&mine[0], &mine[1], 1, MPI_INT, MPI_MIN, comm, &request),
            "MPI_Iallreduce");
  mpi_wait(&request, deadline, "syncbn_nccl_comm_init_mpi: MPI_Iallreduce (rank " +
                                   std::to_string(rank) + ")", slots);
  return mine[1] < size ? mine[1] : -1;
}

}  // namespace

void nccl_comm_init_mpi(MPI_Comm mpi_comm, ncclComm_t* nccl_comm, int* local_rank_out) {
  check_mpi_comm(mpi_comm);
  const Deadline deadline{default_timeout_seconds()};
  int rank = 0, size = 1;
  check_mpi(MPI_Comm_rank(mpi_comm, &rank), "MPI_Comm_rank");
  check_mpi(MPI_Comm_size(mpi_comm, &size), "MPI_Comm_size");

  // 1. The local rank, and its GPU: local_rank modulo the devices this rank sees (one each, or
  // one per rank already, as with a CUDA_VISIBLE_DEVICES per rank).
  MPI_Comm node = MPI_COMM_NULL;
  check_mpi(MPI_Comm_split_type(mpi_comm, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &node),
            "MPI_Comm_split_type");
  const std::unique_ptr<MPI_Comm, void (*)(MPI_Comm*)> node_owner(&node, [](MPI_Comm* c) {
    if (*c != MPI_COMM_NULL) MPI_Comm_free(c);
  });
  int local_rank = 0, local_size = 1;
  MPI_Comm_rank(node, &local_rank);
  MPI_Comm_size(node, &local_size);
  int devices = 0;
  bool ok = nccl_comm != nullptr;
  std::string why = "nccl_comm is null";
  // This rank's GPU by UUID, all zeros when it has none.
  auto uuids = std::make_shared<std::vector<cudaUUID_t>>(static_cast<std::size_t>(local_size) + 1);
  cudaUUID_t& mine = uuids->back();
  std::memset(&mine, 0, sizeof mine);
  if (ok) {
    cudaDeviceProp prop{};
    if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
      cudaGetLastError();
      ok = false;
      why = "device: no usable CUDA device";
    } else if (cudaError_t e = cudaSetDevice(local_rank % devices); e != cudaSuccess) {
      cudaGetLastError();
      ok = false;
      why = std::string("device: cudaSetDevice failed: ") + cudaGetErrorString(e);
    } else if (cudaError_t p = cudaGetDeviceProperties(&prop, local_rank % devices);
               p != cudaSuccess) {
      cudaGetLastError();
      ok = false;
      why = std::string("device: cudaGetDeviceProperties failed: ") + cudaGetErrorString(p);
    } else {
      mine = prop.uuid;
    }
  }
  // Ranks of a node on one GPU: NCCL refuses them ("Duplicate GPU detected") after its
  // bootstrap; say so here, on every rank, before it.
  MPI_Request gather = MPI_REQUEST_NULL;
  check_mpi(MPI_Iallgather(&mine, static_cast<int>(sizeof(cudaUUID_t)), MPI_BYTE, uuids->data(),
                           static_cast<int>(sizeof(cudaUUID_t)), MPI_BYTE, node, &gather),
            "MPI_Iallgather");
  mpi_wait(&gather, deadline,
           "syncbn_nccl_comm_init_mpi: MPI_Iallgather of the GPUs (rank " + std::to_string(rank) +
               ")",
           uuids);
  if (ok) {
    for (int other = 0; other < local_size; ++other) {
      if (other != local_rank &&
          std::memcmp(&(*uuids)[static_cast<std::size_t>(other)], &mine, sizeof mine) == 0) {
        ok = false;
        why = "device: local ranks " + std::to_string(std::min(other, local_rank)) + " and " +
              std::to_string(std::max(other, local_rank)) + " of this node (" +
              std::to_string(local_size) + " ranks, " + std::to_string(devices) +
              " CUDA devices visible here) are on the same GPU; NCCL needs one GPU per rank";
        break;
      }
    }
  }
  if (const int bad = first_failing(ok, rank, size, mpi_comm, deadline); bad >= 0) {
    core::fail(SYNCBN_ERROR_INVALID_ARGUMENT,
               "rank " + std::to_string(bad) + ": " +
                   (bad == rank ? why
                                : std::string("no usable CUDA device of its own (none, a "
                                              "failed cudaSetDevice, or a GPU another local "
                                              "rank is on), or nccl_comm null")));
  }

  // 2. The unique id, from rank 0 to every rank, with rank 0's success.
  struct Root {
    int ok;
    ncclUniqueId id;
  };
  auto root = std::make_shared<Root>();  // MPI may write it after a timeout
  if (rank == 0) root->ok = ncclGetUniqueId(&root->id) == ncclSuccess ? 1 : 0;
  MPI_Request request = MPI_REQUEST_NULL;
  check_mpi(MPI_Ibcast(root.get(), static_cast<int>(sizeof(Root)), MPI_BYTE, 0, mpi_comm, &request),
            "MPI_Ibcast");
  mpi_wait(&request, deadline,
           "syncbn_nccl_comm_init_mpi: MPI_Ibcast of the unique id (rank " + std::to_string(rank) + ")",
           root);
  if (!root->ok) core::fail(SYNCBN_ERROR_COMM, "rank 0: ncclGetUniqueId failed");

  // 3. The communicator, non-blocking: polled until it is ready, fails, or the deadline passes
  // (then aborted, so that NCCL's bootstrap threads stop waiting for the missing peers).
  ncclComm_t comm = nullptr;
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  ncclResult_t r = ncclCommInitRankConfig(&comm, size, root->id, rank, &config);
  const double start = now_seconds();
  bool timed_out = false;
  while (r == ncclInProgress && comm != nullptr) {
    if (ncclCommGetAsyncError(comm, &r) != ncclSuccess) break;
    if (r == ncclInProgress && !deadline.none() && now_seconds() - start >= deadline.seconds) {
      timed_out = true;
      break;
    }
  }
  // Every rank says how its init ended, the ranks that timed out too, so that none leaves an
  // allreduce on mpi_comm behind. A rank that failed at once reaches this up to one deadline
  // before a rank that timed out: the agreement gets twice the deadline.
  const Deadline agreement{deadline.none() ? 0.0 : 2.0 * deadline.seconds};
  const int failing = first_failing(!timed_out && r == ncclSuccess, rank, size, mpi_comm, agreement);
  if (failing >= 0) {
    if (comm != nullptr) ncclCommAbort(comm);
    if (timed_out) {
      core::fail(SYNCBN_ERROR_TIMEOUT,
                 "syncbn_nccl_comm_init_mpi: ncclCommInitRankConfig over " + std::to_string(size) +
                     " ranks (rank " + std::to_string(rank) + ") did not complete within " +
                     format_seconds(deadline.seconds) + "; aborted (ncclCommAbort)");
    }
    core::fail(SYNCBN_ERROR_COMM, std::string("ncclCommInitRank failed") +
                                      (r != ncclSuccess ? std::string(": ") + ncclGetErrorString(r)
                                                        : " on rank " + std::to_string(failing)));
  }
  *nccl_comm = comm;
  if (local_rank_out != nullptr) *local_rank_out = local_rank;
}

}  // namespace syncbn::comm
