// The C++ API from a consumer project: a channels-last forward, and an error as an exception.
#include <cmath>
#include <cstdio>
#include <syncbn/syncbn.hpp>
#include <vector>

int main() {
  const int64_t N = 2, H = 2, W = 2, C = 3;
  auto comm = syncbn::Communicator::self();
  auto config = syncbn::make_config(C, SYNCBN_FLOAT64);
  config.layout = SYNCBN_CHANNELS_LAST;
  syncbn::BatchNorm bn(comm, config);
  std::vector<double> x(N * H * W * C), y(x.size()), w(C, 2.0), b(C, 0.5), rm(C, 0.0), rv(C, 1.0);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = static_cast<double>(i % 7);
  int64_t nbt = 0;
  bn.forward_training({N, H, W, C}, x.data(), w.data(), b.data(), y.data(), nullptr, nullptr,
                      rm.data(), rv.data(), &nbt);
  double mean_y = 0.0;
  for (std::size_t i = 0; i < x.size(); i += C) mean_y += y[i];
  mean_y /= static_cast<double>(N * H * W);
  if (std::fabs(mean_y - 0.5) > 1e-12) {
    std::fprintf(stderr, "consumer_cpp: mean of y is %g, expected the bias 0.5\n", mean_y);
    return 1;
  }
  try {
    bn.forward_training({N, H, W, C}, x.data(), nullptr, b.data(), y.data(), nullptr, nullptr,
                        rm.data(), rv.data(), &nbt);
    std::fprintf(stderr, "consumer_cpp: a null weight was accepted\n");
    return 1;
  } catch (const syncbn::Error& e) {
    std::printf("consumer_cpp: ok (expected error: %s)\n", e.what());
  }
  return 0;
}
