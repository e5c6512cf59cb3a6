#include "comm/mpi.hpp"

#include <cstdlib>
#include <cstring>
#include <string>
#if __has_include(<mpi-ext.h>)
#include <mpi-ext.h>  // Open MPI: MPIX_CUDA_AWARE_SUPPORT, MPIX_Query_cuda_support
#endif

#include "core/error.hpp"

namespace syncbn::comm {
namespace {

std::string mpi_error_text(int code) {
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  if (MPI_Error_string(code, text, &length) != MPI_SUCCESS) return "MPI error " + std::to_string(code);
  return std::string(text, static_cast<std::size_t>(length));
}

void check_mpi(int code, const char* what) {
  if (code != MPI_SUCCESS) {
    core::fail(SYNCBN_ERROR_COMM, std::string(what) + " failed: " + mpi_error_text(code));
  }
}

// Whether MPI_Allreduce may be given device pointers: Open MPI's run-time answer where it has
// one (MPIX_Query_cuda_support), overridden by SYNCBN_MPI_CUDA_AWARE=0|1 in the environment.
bool cuda_aware() {
  static const bool aware = [] {
    if (const char* env = std::getenv("SYNCBN_MPI_CUDA_AWARE")) return std::strcmp(env, "1") == 0;
#if defined(MPIX_CUDA_AWARE_SUPPORT) && MPIX_CUDA_AWARE_SUPPORT
    return MPIX_Query_cuda_support() == 1;
#else
    return false;
#endif
  }();
  return aware;
}

bool mpi_finalized() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  return finalized != 0;
}

class MpiCommunicator final : public Communicator {
 public:
  // Takes ownership of comm (a communicator this library created).
  explicit MpiCommunicator(MPI_Comm comm) : comm_(comm) {
    MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
    check_mpi(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank");
    check_mpi(MPI_Comm_size(comm_, &size_), "MPI_Comm_size");
  }
  ~MpiCommunicator() override {
    if (!mpi_finalized()) MPI_Comm_free(&comm_);
  }
  MpiCommunicator(const MpiCommunicator&) = delete;
  MpiCommunicator& operator=(const MpiCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }

  void allreduce_sum(double* buffer, std::size_t count) override {
    check_mpi(MPI_Allreduce(MPI_IN_PLACE, buffer, static_cast<int>(count), MPI_DOUBLE, MPI_SUM,
                            comm_),
              "MPI_Allreduce");
  }

  DeviceBuffers device_buffers() const override {
    return cuda_aware() ? DeviceBuffers::after_sync : DeviceBuffers::stage;
  }
  void allreduce_sum_device(double* buffer, std::size_t count, void*) override {
    allreduce_sum(buffer, count);  // CUDA-aware MPI takes the device pointer
  }

  std::shared_ptr<Communicator> split_consecutive(int group_size) override {
    MPI_Comm sub = MPI_COMM_NULL;
    check_mpi(MPI_Comm_split(comm_, rank_ / group_size, rank_, &sub), "MPI_Comm_split");
    return std::make_shared<MpiCommunicator>(sub);
  }

 private:
  MPI_Comm comm_;
  int rank_ = 0;
  int size_ = 1;
};

}  // namespace

std::shared_ptr<Communicator> make_mpi_communicator(MPI_Comm mpi_comm) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized || mpi_finalized()) {
    core::fail(SYNCBN_ERROR_INVALID_ARGUMENT, "mpi_comm: MPI is not initialized (or finalized)");
  }
  if (mpi_comm == MPI_COMM_NULL) core::fail(SYNCBN_ERROR_INVALID_ARGUMENT, "mpi_comm is MPI_COMM_NULL");
  MPI_Comm dup = MPI_COMM_NULL;
  check_mpi(MPI_Comm_dup(mpi_comm, &dup), "MPI_Comm_dup");
  return std::make_shared<MpiCommunicator>(dup);
}

}  // namespace syncbn::comm
