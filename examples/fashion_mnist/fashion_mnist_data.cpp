#include "fashion_mnist_data.hpp"

#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>

namespace syncbn_examples {
namespace {

constexpr uint32_t kImagesMagic = 0x00000803;  // unsigned byte data, 3 dims
constexpr uint32_t kLabelsMagic = 0x00000801;  // unsigned byte data, 1 dim
constexpr uint32_t kMaxCount = 10'000'000;     // guards the allocation against a corrupt header

// An open gzip file; every error names the path.
class GzReader {
 public:
  explicit GzReader(std::string path) : path_(std::move(path)) {
    errno = 0;
    file_ = gzopen(path_.c_str(), "rb");
    if (file_ == nullptr) {
      fail(std::string("cannot open: ") + (errno != 0 ? std::strerror(errno) : "gzopen failed"));
    }
  }
  ~GzReader() { gzclose(file_); }
  GzReader(const GzReader&) = delete;
  GzReader& operator=(const GzReader&) = delete;

  // Reads exactly n bytes; `what` names them in the error.
  void read(void* out, size_t n, const char* what) {
    auto* p = static_cast<unsigned char*>(out);
    size_t done = 0;
    while (done < n) {
      const auto chunk = static_cast<unsigned>(std::min<size_t>(n - done, INT_MAX));
      const int got = gzread(file_, p + done, chunk);
      if (got < 0) fail(std::string("read error: ") + zlib_error());
      if (got == 0) {
        fail("truncated: expected " + std::to_string(n) + " bytes of " + what + ", got " +
             std::to_string(done));
      }
      done += static_cast<size_t>(got);
    }
  }

  uint32_t read_be32(const char* what) {
    unsigned char b[4];
    read(b, sizeof b, what);
    return (uint32_t{b[0]} << 24) | (uint32_t{b[1]} << 16) | (uint32_t{b[2]} << 8) | b[3];
  }

  // The file must end here.
  void expect_end() {
    unsigned char extra;
    const int got = gzread(file_, &extra, 1);
    if (got < 0) fail(std::string("read error: ") + zlib_error());
    if (got > 0) fail("unexpected data after the last item the header announces");
  }

  [[noreturn]] void fail(const std::string& message) const {
    throw std::runtime_error(path_ + ": " + message);
  }

 private:
  const char* zlib_error() const {
    int code = Z_OK;
    const char* message = gzerror(file_, &code);
    return code == Z_ERRNO ? std::strerror(errno) : message;
  }

  std::string path_;
  gzFile file_ = nullptr;
};

void expect_field(GzReader& in, uint32_t actual, uint32_t expected, const char* what) {
  if (actual != expected) {
    in.fail(std::string("bad ") + what + ": expected " + std::to_string(expected) + ", got " +
            std::to_string(actual));
  }
}

std::string hex(uint32_t v) {
  char text[11];
  std::snprintf(text, sizeof text, "0x%08x", v);
  return text;
}

void expect_magic(GzReader& in, uint32_t expected, const char* what) {
  const uint32_t magic = in.read_be32("magic number");
  if (magic != expected) {
    in.fail(std::string("bad magic number ") + hex(magic) + ", expected " + hex(expected) +
            " (" + what + ")");
  }
}

uint32_t read_count(GzReader& in) {
  const uint32_t count = in.read_be32("item count");
  if (count == 0 || count > kMaxCount) {
    in.fail("implausible item count " + std::to_string(count));
  }
  return count;
}

std::vector<uint8_t> read_images(const std::string& path, uint32_t& count) {
  GzReader in(path);
  expect_magic(in, kImagesMagic, "IDX3 unsigned-byte images");
  count = read_count(in);
  expect_field(in, in.read_be32("rows"), kFashionMnistRows, "number of rows");
  expect_field(in, in.read_be32("columns"), kFashionMnistCols, "number of columns");
  std::vector<uint8_t> pixels(size_t{count} * kFashionMnistRows * kFashionMnistCols);
  in.read(pixels.data(), pixels.size(), "pixels");
  in.expect_end();
  return pixels;
}

std::vector<uint8_t> read_labels(const std::string& path, uint32_t expected_count) {
  GzReader in(path);
  expect_magic(in, kLabelsMagic, "IDX1 unsigned-byte labels");
  expect_field(in, in.read_be32("item count"), expected_count,
               "label count (must match the image file)");
  std::vector<uint8_t> labels(expected_count);
  in.read(labels.data(), labels.size(), "labels");
  in.expect_end();
  const auto bad = std::find_if(labels.begin(), labels.end(),
                                [](uint8_t l) { return l >= kFashionMnistClasses; });
  if (bad != labels.end()) {
    in.fail("label " + std::to_string(*bad) + " at index " +
            std::to_string(bad - labels.begin()) + " is not a class 0..9");
  }
  return labels;
}

}  // namespace

FashionMnistSplit load_fashion_mnist(const std::string& dir, const std::string& split) {
  if (split != "train" && split != "t10k") {
    throw std::invalid_argument("Fashion-MNIST split must be \"train\" or \"t10k\", got \"" +
                                split + "\"");
  }
  const std::string prefix = dir + "/" + split;
  FashionMnistSplit data;
  uint32_t count = 0;
  data.pixels = read_images(prefix + "-images-idx3-ubyte.gz", count);
  data.labels = read_labels(prefix + "-labels-idx1-ubyte.gz", count);
  data.count = count;
  return data;
}

}  // namespace syncbn_examples
