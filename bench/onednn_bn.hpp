// oneDNN batch normalization for bench/syncbn_bench: forward training with use_scale | use_shift
// and backward (prop_kind::backward, also computing diff_scale and diff_shift) on caller-owned
// f32 buffers in NCHW or NHWC, with oneDNN 2.x's desc / primitive_desc API. oneDNN runs on the
// CPU engine with the library's own threading runtime (OpenMP in Debian's libdnnl), so on the
// same threads as syncbn. Primitive creation (and its JIT) happens in the constructor, outside
// any timed region.
#ifndef SYNCBN_BENCH_ONEDNN_BN_HPP
#define SYNCBN_BENCH_ONEDNN_BN_HPP

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"

namespace bench {

// The installed oneDNN's version, "2.6.3".
inline std::string onednn_version() {
  const dnnl_version_t* v = dnnl_version();
  return std::to_string(v->major) + "." + std::to_string(v->minor) + "." + std::to_string(v->patch);
}

class OneDnnBatchNorm {
 public:
  // x, y, dy, dx: n*c*h*w floats in the given layout; scale, shift, diff_scale, diff_shift:
  // c floats. mean and variance (c floats each) are owned here: forward writes them (the
  // biased variance), backward reads them. Throws dnnl::error if oneDNN rejects the problem.
  OneDnnBatchNorm(int64_t n, int64_t c, int64_t h, int64_t w, bool nhwc, float eps, float* x,
                  float* y, float* dy, float* dx, float* scale, float* shift, float* diff_scale,
                  float* diff_shift)
      : engine_(dnnl::engine::kind::cpu, 0), stream_(engine_), mean_(c), variance_(c) {
    using dnnl::memory;
    using tag = memory::format_tag;
    const memory::desc data({n, c, h, w}, memory::data_type::f32, nhwc ? tag::nhwc : tag::nchw);
    const memory::desc channel({c}, memory::data_type::f32, tag::a);
    const auto flags = dnnl::normalization_flags::use_scale | dnnl::normalization_flags::use_shift;

    const dnnl::batch_normalization_forward::desc fwd_desc(dnnl::prop_kind::forward_training, data,
                                                           eps, flags);
    const dnnl::batch_normalization_forward::primitive_desc fwd_pd(fwd_desc, engine_);
    const dnnl::batch_normalization_backward::desc bwd_desc(dnnl::prop_kind::backward, data, data,
                                                            eps, flags);
    const dnnl::batch_normalization_backward::primitive_desc bwd_pd(bwd_desc, engine_, fwd_pd);
    forward_ = dnnl::batch_normalization_forward(fwd_pd);
    backward_ = dnnl::batch_normalization_backward(bwd_pd);

    const memory src(data, engine_, x), dst(data, engine_, y), diff_dst(data, engine_, dy),
        diff_src(data, engine_, dx);
    const memory mscale(channel, engine_, scale), mshift(channel, engine_, shift),
        mdiff_scale(channel, engine_, diff_scale), mdiff_shift(channel, engine_, diff_shift),
        mmean(channel, engine_, mean_.data()), mvariance(channel, engine_, variance_.data());
    fwd_args_ = {{DNNL_ARG_SRC, src},      {DNNL_ARG_DST, dst},    {DNNL_ARG_SCALE, mscale},
                 {DNNL_ARG_SHIFT, mshift}, {DNNL_ARG_MEAN, mmean}, {DNNL_ARG_VARIANCE, mvariance}};
    // Backward with use_shift takes the shift too (oneDNN 2.6 rejects the call without it).
    bwd_args_ = {{DNNL_ARG_SRC, src},
                 {DNNL_ARG_DIFF_DST, diff_dst},
                 {DNNL_ARG_SCALE, mscale},
                 {DNNL_ARG_SHIFT, mshift},
                 {DNNL_ARG_MEAN, mmean},
                 {DNNL_ARG_VARIANCE, mvariance},
                 {DNNL_ARG_DIFF_SRC, diff_src},
                 {DNNL_ARG_DIFF_SCALE, mdiff_scale},
                 {DNNL_ARG_DIFF_SHIFT, mdiff_shift}};
    // No fused ReLU, so no workspace; keep whatever the primitive asks for anyway.
    if (fwd_pd.workspace_desc().get_size() != 0) {
      const memory ws(fwd_pd.workspace_desc(), engine_);
      fwd_args_.emplace(DNNL_ARG_WORKSPACE, ws);
      bwd_args_.emplace(DNNL_ARG_WORKSPACE, ws);
    }
  }

  // Forward training: y, mean, variance. Returns when done.
  void forward() {
    forward_.execute(stream_, fwd_args_);
    stream_.wait();
  }
  // Backward: dx, diff_scale, diff_shift from the last forward's mean and variance.
  void backward() {
    backward_.execute(stream_, bwd_args_);
    stream_.wait();
  }

 private:
  dnnl::engine engine_;
  dnnl::stream stream_;
  std::vector<float> mean_, variance_;
  dnnl::batch_normalization_forward forward_;
  dnnl::batch_normalization_backward backward_;
  std::unordered_map<int, dnnl::memory> fwd_args_, bwd_args_;
};

}  // namespace bench

#endif  // SYNCBN_BENCH_ONEDNN_BN_HPP
