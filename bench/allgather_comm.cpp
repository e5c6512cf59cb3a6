// The allgather exchange and the custom communicator over it (allgather_comm.hpp).
#include "allgather_comm.hpp"

#include <algorithm>

#include "driver/bench_stats.hpp"

namespace bench {

AllgatherExchange::AllgatherExchange(MPI_Comm comm) : comm_(comm) {
  MPI_Comm_size(comm_, &size_);
}

int AllgatherExchange::exchange(const double* mine, double* out, int count,
                                double* combine_seconds) {
  const std::size_t n = static_cast<std::size_t>(count);
  gathered_.resize(static_cast<std::size_t>(size_) * n);
  const int rc =
      MPI_Allgather(mine, count, MPI_DOUBLE, gathered_.data(), count, MPI_DOUBLE, comm_);
  if (rc != MPI_SUCCESS) return rc;
  // The combine: the same sum on every rank, in rank order.
  const double start = combine_seconds != nullptr ? now_seconds() : 0.0;
  std::copy(gathered_.begin(), gathered_.begin() + static_cast<std::ptrdiff_t>(n), out);
  for (int r = 1; r < size_; ++r) {
    const double* g = gathered_.data() + static_cast<std::size_t>(r) * n;
    for (std::size_t i = 0; i < n; ++i) out[i] += g[i];
  }
  if (combine_seconds != nullptr) *combine_seconds = now_seconds() - start;
  return MPI_SUCCESS;
}

ExchangeComm::ExchangeComm(MPI_Comm world) {
  MPI_Comm_dup(world, &mpi_);
  gather_ = std::make_unique<AllgatherExchange>(mpi_);
  int rank = 0, size = 1;
  MPI_Comm_rank(mpi_, &rank);
  MPI_Comm_size(mpi_, &size);
  syncbn_comm_t h = nullptr;
  syncbn::check(syncbn_comm_create_custom(rank, size, &ExchangeComm::allreduce, nullptr, nullptr,
                                          this, &h));
  comm_ = syncbn::Communicator(h);
  comm_.set_timeout(0);  // the callback blocks in MPI: no deadline, as the sync communicator
}

ExchangeComm::~ExchangeComm() {
  comm_ = syncbn::Communicator();  // plans made on it must be gone already
  if (mpi_ != MPI_COMM_NULL) MPI_Comm_free(&mpi_);
}

int ExchangeComm::allreduce(double* buffer, std::size_t count, syncbn_device_t device,
                            void* /*stream*/, void* user_data) {
  auto* self = static_cast<ExchangeComm*>(user_data);
  if (device != SYNCBN_DEVICE_CPU) return SYNCBN_ERROR_NOT_SUPPORTED;
  const int n = static_cast<int>(count);
  const double enter = self->log_ != nullptr ? now_seconds() : 0.0;
  int rc = MPI_SUCCESS;
  if (self->allgather_) {
    ++self->allgather_calls_;
    rc = self->gather_->exchange(buffer, buffer, n);
  } else {
    rc = MPI_Allreduce(MPI_IN_PLACE, buffer, n, MPI_DOUBLE, MPI_SUM, self->mpi_);
  }
  if (self->log_ != nullptr) {
    self->log_->enter.push_back(enter);
    self->log_->leave.push_back(now_seconds());
  }
  return rc == MPI_SUCCESS ? 0 : SYNCBN_ERROR_COMM;
}

}  // namespace bench
