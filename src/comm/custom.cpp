#include "comm/custom.hpp"

#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "comm/handle.hpp"
#include "core/error.hpp"

namespace syncbn::comm {
namespace {

class CustomCommunicator final : public Communicator {
 public:
  CustomCommunicator(int rank, int size, syncbn_allreduce_fn allreduce, syncbn_split_fn split,
                     syncbn_release_fn release, void* user_data)
      : rank_(rank), size_(size), allreduce_(allreduce), split_(split), release_(release),
        user_data_(user_data) {}
  ~CustomCommunicator() override {
    if (release_ != nullptr) release_(user_data_);
  }
  CustomCommunicator(const CustomCommunicator&) = delete;
  CustomCommunicator& operator=(const CustomCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }

  // CUDA plans hand over the device buffer and the stream; the caller's function sums in
  // stream order, so the verdict is the device's, as over NCCL.
  DeviceBuffers device_buffers() const override { return DeviceBuffers::on_stream; }

 protected:
  // The deadline is the caller's to keep (syncbn_comm_get_timeout): its function returns
  // SYNCBN_ERROR_TIMEOUT when the sum did not complete in time.
  // The caller's function gets the communicator's own copy of the buffer: after it failed
  // (a timeout, say) its transport may still write there, so that memory is kept for good then,
  // and the syncbn caller's (a plan's, or the stack of plan creation) is never exposed.
  void allreduce_host(double* buffer, std::size_t count, Deadline) override {
    if (!wire_ || wire_->size() < count) wire_ = std::make_shared<std::vector<double>>(count);
    std::memcpy(wire_->data(), buffer, count * sizeof(double));
    try {
      call(wire_->data(), count, SYNCBN_DEVICE_CPU, nullptr);
    } catch (...) {
      keep_forever(std::move(wire_));
      throw;
    }
    std::memcpy(buffer, wire_->data(), count * sizeof(double));
  }
  void allreduce_device(double* buffer, std::size_t count, void* stream, Deadline) override {
    call(buffer, count, SYNCBN_DEVICE_CUDA, stream);
  }

  std::shared_ptr<Communicator> split(int group_size, Deadline) override {
    if (split_ == nullptr) {
      core::fail(SYNCBN_ERROR_NOT_SUPPORTED,
                 "a custom communicator without a split function cannot split");
    }
    syncbn_comm_t sub = nullptr;
    const int code = split_(group_size, user_data_, &sub);
    const std::unique_ptr<syncbn_comm_s> owned(sub);  // ours from here, whatever happens
    if (code != 0) {
      core::fail(SYNCBN_ERROR_COMM, "the split function returned " + std::to_string(code));
    }
    if (owned == nullptr) core::fail(SYNCBN_ERROR_COMM, "the split function stored no communicator");
    return owned->impl;
  }

 private:
  void call(double* buffer, std::size_t count, syncbn_device_t device, void* stream) {
    const double start = now_seconds();
    const int code = allreduce_(buffer, count, device, stream, user_data_);
    if (code == SYNCBN_ERROR_TIMEOUT) {
      core::fail(SYNCBN_ERROR_TIMEOUT,
                 "the custom allreduce of " + std::to_string(count) + " doubles over " +
                     std::to_string(size_) + " ranks (rank " + std::to_string(rank_) +
                     ") reported a timeout (deadline " + format_seconds(timeout_seconds()) +
                     ", waited " + format_seconds(now_seconds() - start) + ")");
    }
    if (code != 0) {
      core::fail(SYNCBN_ERROR_COMM, "the custom allreduce returned " + std::to_string(code) +
                                        " (rank " + std::to_string(rank_) + ")");
    }
  }

  int rank_;
  int size_;
  syncbn_allreduce_fn allreduce_;
  syncbn_split_fn split_;
  syncbn_release_fn release_;
  void* user_data_;
  std::shared_ptr<std::vector<double>> wire_;  // grows to the largest count
};

}  // namespace

std::shared_ptr<Communicator> make_custom_communicator(int rank, int size,
                                                       syncbn_allreduce_fn allreduce,
                                                       syncbn_split_fn split,
                                                       syncbn_release_fn release,
                                                       void* user_data) {
  if (allreduce == nullptr) core::fail(SYNCBN_ERROR_INVALID_ARGUMENT, "allreduce is null");
  if (size < 1) {
    core::fail(SYNCBN_ERROR_INVALID_ARGUMENT, "size must be >= 1 (size = " + std::to_string(size) + ")");
  }
  if (rank < 0 || rank >= size) {
    core::fail(SYNCBN_ERROR_INVALID_ARGUMENT, "rank must be in [0, size) (rank = " +
                                                  std::to_string(rank) + ", size = " +
                                                  std::to_string(size) + ")");
  }
  return std::make_shared<CustomCommunicator>(rank, size, allreduce, split, release, user_data);
}

}  // namespace syncbn::comm
