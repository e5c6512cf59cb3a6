// syncbn_nccl_comm_init_mpi: an NCCL communicator bootstrapped over MPI, one GPU per local rank.
#include <cuda_runtime.h>
#include <mpi.h>
#include <nccl.h>

#include <climits>
#include <cstring>
#include <string>

#include "comm/nccl.hpp"
#include "core/error.hpp"

namespace syncbn::comm {
namespace {

void check_mpi(int code, const char* what) {
  if (code != MPI_SUCCESS) {
    char text[MPI_MAX_ERROR_STRING];
    int length = 0;
    MPI_Error_string(code, text, &length);
    core::fail(SYNCBN_ERROR_COMM, std::string(what) + " failed: " + std::string(text, length));
  }
}

// The lowest rank for which ok is false, or -1 if none (COLLECTIVE).
int first_failing(bool ok, int rank, int size, MPI_Comm comm) {
  int mine = ok ? size : rank;
  int first = size;
  check_mpi(MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, comm), "MPI_Allreduce");
  return first < size ? first : -1;
}

}  // namespace

void nccl_comm_init_mpi(MPI_Comm mpi_comm, ncclComm_t* nccl_comm, int* local_rank_out) {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (!initialized || finalized) {
    core::fail(SYNCBN_ERROR_INVALID_ARGUMENT, "mpi_comm: MPI is not initialized (or finalized)");
  }
  if (mpi_comm == MPI_COMM_NULL) core::fail(SYNCBN_ERROR_INVALID_ARGUMENT, "mpi_comm is MPI_COMM_NULL");
  int rank = 0, size = 1;
  check_mpi(MPI_Comm_rank(mpi_comm, &rank), "MPI_Comm_rank");
  check_mpi(MPI_Comm_size(mpi_comm, &size), "MPI_Comm_size");

  // 1. The local rank, and its GPU.
  MPI_Comm node = MPI_COMM_NULL;
  check_mpi(MPI_Comm_split_type(mpi_comm, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &node),
            "MPI_Comm_split_type");
  int local_rank = 0;
  MPI_Comm_rank(node, &local_rank);
  MPI_Comm_free(&node);
  int devices = 0;
  bool ok = nccl_comm != nullptr;
  std::string why = "nccl_comm is null";
  if (ok) {
    if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
      cudaGetLastError();
      ok = false;
      why = "device: no usable CUDA device";
    } else if (cudaError_t e = cudaSetDevice(local_rank % devices); e != cudaSuccess) {
      cudaGetLastError();
      ok = false;
      why = std::string("device: cudaSetDevice failed: ") + cudaGetErrorString(e);
    }
  }
  if (const int bad = first_failing(ok, rank, size, mpi_comm); bad >= 0) {
    core::fail(SYNCBN_ERROR_INVALID_ARGUMENT,
               "rank " + std::to_string(bad) + ": " +
                   (bad == rank ? why : std::string("no usable CUDA device or nccl_comm null")));
  }

  // 2. The unique id, from rank 0 to every rank, with rank 0's success.
  struct {
    int ok;
    ncclUniqueId id;
  } root{};
  if (rank == 0) root.ok = ncclGetUniqueId(&root.id) == ncclSuccess ? 1 : 0;
  check_mpi(MPI_Bcast(&root, static_cast<int>(sizeof root), MPI_BYTE, 0, mpi_comm), "MPI_Bcast");
  if (!root.ok) core::fail(SYNCBN_ERROR_COMM, "rank 0: ncclGetUniqueId failed");

  // 3. The communicator.
  ncclComm_t comm = nullptr;
  const ncclResult_t r = ncclCommInitRank(&comm, size, root.id, rank);
  if (first_failing(r == ncclSuccess, rank, size, mpi_comm) >= 0) {
    if (comm != nullptr) ncclCommDestroy(comm);
    core::fail(SYNCBN_ERROR_COMM, std::string("ncclCommInitRank failed") +
                                      (r != ncclSuccess ? std::string(": ") + ncclGetErrorString(r)
                                                        : std::string(" on another rank")));
  }
  *nccl_comm = comm;
  if (local_rank_out != nullptr) *local_rank_out = local_rank;
}

}  // namespace syncbn::comm
