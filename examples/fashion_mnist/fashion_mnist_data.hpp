// Reads Fashion-MNIST (Xiao, Rasul & Vollgraf 2017) from its gzipped IDX files, as shipped by
// the Debian package dataset-fashion-mnist:
//   DIR/{train,t10k}-images-idx3-ubyte.gz   magic 0x00000803, dims count, 28, 28, then pixels
//   DIR/{train,t10k}-labels-idx1-ubyte.gz   magic 0x00000801, dim count, then labels 0..9
// Header integers are big-endian. No libtorch here: this translation unit compiles fast.
#ifndef SYNCBN_EXAMPLES_FASHION_MNIST_DATA_HPP
#define SYNCBN_EXAMPLES_FASHION_MNIST_DATA_HPP

#include <cstdint>
#include <string>
#include <vector>

namespace syncbn_examples {

inline constexpr const char* kDefaultFashionMnistDir = "/usr/share/datasets/fashion-mnist";
inline constexpr int64_t kFashionMnistRows = 28;
inline constexpr int64_t kFashionMnistCols = 28;
inline constexpr int kFashionMnistClasses = 10;

struct FashionMnistSplit {
  int64_t count = 0;
  std::vector<uint8_t> pixels;  // count * 28 * 28 values 0..255, image after image, row-major
  std::vector<uint8_t> labels;  // count values 0..9
};

// split: "train" (60000 images) or "t10k" (10000). Validates magic numbers, dimensions, that
// image and label counts agree, that each file has exactly the bytes its header announces, and
// the label range. Throws std::runtime_error naming the file and what is wrong with it.
FashionMnistSplit load_fashion_mnist(const std::string& dir, const std::string& split);

}  // namespace syncbn_examples

#endif  // SYNCBN_EXAMPLES_FASHION_MNIST_DATA_HPP
