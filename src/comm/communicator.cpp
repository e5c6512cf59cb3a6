#include "comm/communicator.hpp"

#include "core/error.hpp"

namespace syncbn::comm {

void Communicator::allreduce_sum_device(double*, std::size_t, void*) {
  core::fail(SYNCBN_ERROR_INTERNAL, "this communicator cannot sum device buffers");
}

namespace {

class SelfCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  void allreduce_sum(double*, std::size_t) override {}
  DeviceBuffers device_buffers() const override { return DeviceBuffers::identity; }
  std::shared_ptr<Communicator> split_consecutive(int) override {
    return std::make_shared<SelfCommunicator>();
  }
};

}  // namespace

std::shared_ptr<Communicator> make_self_communicator() {
  return std::make_shared<SelfCommunicator>();
}

}  // namespace syncbn::comm
