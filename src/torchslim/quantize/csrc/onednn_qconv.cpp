// torchslim_onednn::qconv2d - an int8 2-D convolution on oneDNN whose primitive is built once.
//
// PyTorch's own onednn::qconv_pointwise rebuilds the primitive descriptor at every call, which at
// batch 1 costs tens of microseconds per conv (issue 21). Here each distinct call (weight tensor,
// input shape, scales, post-ops) creates its primitive and reorders its weights once; later calls
// only point the primitive at the input and output and execute it.
//
//   x      uint8, (N, C, H, W) logical, any memory format (made channels-last)
//   w      int8 (OC, C / groups, KH, KW), symmetric per output channel: w_scale (OC,) float32
//   bias   float32 (OC,) or none
//   out    uint8 (N, OC, OH, OW), channels-last:
//            round(act(x_scale * w_scale * conv(x - x_zp, w) + bias [+ accum_scale * (accum - accum_zp)])
//                  / y_scale) + y_zp, saturated to [0, 255]
//   act    0 none, 1 ReLU, 2 clamp to [0, 6] (ReLU6 / hardtanh(0, 6))
//
// Only the oneDNN C API is used (built against the onednn-devel headers, run on the CPU-only
// onednn-cpu-gomp library). A cache entry holds a reference to its weight tensor, so the weight's
// memory cannot be freed and reused by another tensor while its reordered copy is cached.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <oneapi/dnnl/dnnl.h>
#include <omp.h>

#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>
#include <vector>

namespace {

#define TS_DNNL(call)                                                                       \
  do {                                                                                      \
    dnnl_status_t status_ = (call);                                                         \
    TORCH_CHECK(status_ == dnnl_success, "oneDNN call failed (status ", int(status_), "): " #call); \
  } while (0)

dnnl_engine_t engine() {
  static dnnl_engine_t e = [] {
    dnnl_engine_t made;
    TS_DNNL(dnnl_engine_create(&made, dnnl_cpu, 0));
    return made;
  }();
  return e;
}

dnnl_memory_t new_memory(const_dnnl_memory_desc_t md, void* handle) {
  dnnl_memory_t m;
  TS_DNNL(dnnl_memory_create(&m, md, engine(), handle));
  return m;
}

dnnl_memory_t vector_memory(const void* data, int64_t n, dnnl_data_type_t type) {
  dnnl_memory_desc_t md;
  dnnl_dims_t dims = {n};
  TS_DNNL(dnnl_memory_desc_create_with_tag(&md, 1, dims, type, dnnl_a));
  dnnl_memory_t m = new_memory(md, DNNL_MEMORY_ALLOCATE);
  TS_DNNL(dnnl_memory_desc_destroy(md));
  void* p;
  TS_DNNL(dnnl_memory_get_data_handle(m, &p));
  std::memcpy(p, data, size_t(n) * 4);
  return m;
}

struct Conv {
  at::Tensor weight;  // pins the user's weight: its address is part of the cache key
  dnnl_primitive_t primitive = nullptr;
  dnnl_memory_t src = nullptr, dst = nullptr, wei = nullptr, bias = nullptr;
  dnnl_memory_t src_scale = nullptr, wei_scale = nullptr, dst_scale = nullptr, src_zp = nullptr, dst_zp = nullptr;
  std::vector<int64_t> out_sizes;
  bool has_bias = false;
};

using Key = std::tuple<const void*, std::vector<int64_t>, std::vector<int64_t>, double, int64_t, double, int64_t, int64_t,
                       double, int64_t, bool, const void*, const void*>;
std::map<Key, std::unique_ptr<Conv>> cache;
std::mutex cache_mutex;

std::unique_ptr<Conv> build(const at::Tensor& x, double x_scale, int64_t x_zp, const at::Tensor& w, const at::Tensor& w_scale,
                            const c10::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, int64_t groups, double y_scale, int64_t y_zp, int64_t act, bool accum,
                            double accum_scale, int64_t accum_zp) {
  auto c = std::make_unique<Conv>();
  c->weight = w;
  const int64_t n = x.size(0), ic = x.size(1), h = x.size(2), wd = x.size(3);
  const int64_t oc = w.size(0), kh = w.size(2), kw = w.size(3);
  const int64_t oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) / stride[0] + 1;
  const int64_t ow = (wd + 2 * padding[1] - dilation[1] * (kw - 1) - 1) / stride[1] + 1;
  TORCH_CHECK(oh > 0 && ow > 0, "qconv2d: the input ", x.sizes(), " is smaller than the kernel");
  c->out_sizes = {n, oc, oh, ow};
  dnnl_memory_desc_t src_md, dst_md, bias_md, wei_any, wei_user;
  dnnl_dims_t src_dims = {n, ic, h, wd}, dst_dims = {n, oc, oh, ow}, bias_dims = {oc};
  TS_DNNL(dnnl_memory_desc_create_with_tag(&src_md, 4, src_dims, dnnl_u8, dnnl_nhwc));
  TS_DNNL(dnnl_memory_desc_create_with_tag(&dst_md, 4, dst_dims, dnnl_u8, dnnl_nhwc));
  TS_DNNL(dnnl_memory_desc_create_with_tag(&bias_md, 1, bias_dims, dnnl_f32, dnnl_a));
  if (groups > 1) {
    dnnl_dims_t dims = {groups, oc / groups, ic / groups, kh, kw};
    TS_DNNL(dnnl_memory_desc_create_with_tag(&wei_any, 5, dims, dnnl_s8, dnnl_format_tag_any));
    TS_DNNL(dnnl_memory_desc_create_with_tag(&wei_user, 5, dims, dnnl_s8, dnnl_goihw));
  } else {
    dnnl_dims_t dims = {oc, ic, kh, kw};
    TS_DNNL(dnnl_memory_desc_create_with_tag(&wei_any, 4, dims, dnnl_s8, dnnl_format_tag_any));
    TS_DNNL(dnnl_memory_desc_create_with_tag(&wei_user, 4, dims, dnnl_s8, dnnl_oihw));
  }
  dnnl_primitive_attr_t attr;
  TS_DNNL(dnnl_primitive_attr_create(&attr));
  TS_DNNL(dnnl_primitive_attr_set_scales_mask(attr, DNNL_ARG_SRC, 0));
  TS_DNNL(dnnl_primitive_attr_set_scales_mask(attr, DNNL_ARG_WEIGHTS, groups > 1 ? 3 : 1));
  TS_DNNL(dnnl_primitive_attr_set_scales_mask(attr, DNNL_ARG_DST, 0));
  TS_DNNL(dnnl_primitive_attr_set_zero_points_mask(attr, DNNL_ARG_SRC, 0));
  TS_DNNL(dnnl_primitive_attr_set_zero_points_mask(attr, DNNL_ARG_DST, 0));
  dnnl_post_ops_t post_ops;
  TS_DNNL(dnnl_post_ops_create(&post_ops));
  if (accum) TS_DNNL(dnnl_post_ops_append_sum(post_ops, float(accum_scale), int32_t(accum_zp), dnnl_u8));
  if (act == 1) TS_DNNL(dnnl_post_ops_append_eltwise(post_ops, dnnl_eltwise_relu, 0.f, 0.f));
  if (act == 2) TS_DNNL(dnnl_post_ops_append_eltwise(post_ops, dnnl_eltwise_clip, 0.f, 6.f));
  TS_DNNL(dnnl_primitive_attr_set_post_ops(attr, post_ops));
  dnnl_dims_t strides = {stride[0], stride[1]}, dil = {dilation[0] - 1, dilation[1] - 1};
  dnnl_dims_t pad = {padding[0], padding[1]};
  dnnl_primitive_desc_t pd;
  c->has_bias = bias.has_value();
  TS_DNNL(dnnl_convolution_forward_primitive_desc_create(&pd, engine(), dnnl_forward_inference, dnnl_convolution_direct, src_md,
                                                         wei_any, c->has_bias ? bias_md : nullptr, dst_md, strides, dil, pad, pad,
                                                         attr));
  TS_DNNL(dnnl_primitive_create(&c->primitive, pd));
  // the weights, reordered once into the layout the primitive chose
  const_dnnl_memory_desc_t wei_md = dnnl_primitive_desc_query_md(pd, dnnl_query_weights_md, 0);
  at::Tensor w_contig = w.contiguous();
  dnnl_memory_t user = new_memory(wei_user, w_contig.data_ptr());
  c->wei = new_memory(wei_md, DNNL_MEMORY_ALLOCATE);
  dnnl_primitive_desc_t reorder_pd;
  dnnl_primitive_t reorder;
  TS_DNNL(dnnl_reorder_primitive_desc_create(&reorder_pd, wei_user, engine(), wei_md, engine(), nullptr));
  TS_DNNL(dnnl_primitive_create(&reorder, reorder_pd));
  dnnl_stream_t stream;
  TS_DNNL(dnnl_stream_create(&stream, engine(), dnnl_stream_default_flags));
  dnnl_exec_arg_t reorder_args[2] = {{DNNL_ARG_FROM, user}, {DNNL_ARG_TO, c->wei}};
  TS_DNNL(dnnl_primitive_execute(reorder, stream, 2, reorder_args));
  TS_DNNL(dnnl_stream_wait(stream));
  TS_DNNL(dnnl_stream_destroy(stream));
  TS_DNNL(dnnl_primitive_destroy(reorder));
  TS_DNNL(dnnl_primitive_desc_destroy(reorder_pd));
  TS_DNNL(dnnl_memory_destroy(user));
  if (c->has_bias) {
    at::Tensor b = bias->to(at::kFloat).contiguous();
    c->bias = vector_memory(b.data_ptr(), oc, dnnl_f32);
  }
  at::Tensor ws = w_scale.to(at::kFloat).contiguous();
  const float xs = float(x_scale), ys = float(y_scale);
  const int32_t xz = int32_t(x_zp), yz = int32_t(y_zp);
  c->src_scale = vector_memory(&xs, 1, dnnl_f32);
  c->dst_scale = vector_memory(&ys, 1, dnnl_f32);
  c->wei_scale = vector_memory(ws.data_ptr(), oc, dnnl_f32);
  c->src_zp = vector_memory(&xz, 1, dnnl_s32);
  c->dst_zp = vector_memory(&yz, 1, dnnl_s32);
  c->src = new_memory(src_md, DNNL_MEMORY_NONE);
  c->dst = new_memory(dst_md, DNNL_MEMORY_NONE);
  TS_DNNL(dnnl_primitive_desc_destroy(pd));
  TS_DNNL(dnnl_primitive_attr_destroy(attr));
  TS_DNNL(dnnl_post_ops_destroy(post_ops));
  for (auto md : {src_md, dst_md, bias_md, wei_any, wei_user}) TS_DNNL(dnnl_memory_desc_destroy(md));
  return c;
}

at::Tensor qconv2d(const at::Tensor& x, double x_scale, int64_t x_zp, const at::Tensor& w, const at::Tensor& w_scale,
                   const c10::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                   at::IntArrayRef dilation, int64_t groups, double y_scale, int64_t y_zp, int64_t act,
                   const c10::optional<at::Tensor>& accum, double accum_scale, int64_t accum_zp) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kByte && x.device().is_cpu(), "qconv2d: x must be a 4-D uint8 CPU tensor");
  TORCH_CHECK(w.dim() == 4 && w.scalar_type() == at::kChar && w.device().is_cpu(), "qconv2d: w must be a 4-D int8 CPU tensor");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, "qconv2d: stride, padding, dilation are pairs");
  TORCH_CHECK(groups >= 1 && x.size(1) == w.size(1) * groups && w.size(0) % groups == 0, "qconv2d: channels ", x.size(1),
              " do not match the weight ", w.sizes(), " with groups ", groups);
  TORCH_CHECK(act >= 0 && act <= 2, "qconv2d: act must be 0, 1 or 2");
  const int threads = at::get_num_threads();
  if (omp_get_max_threads() != threads) omp_set_num_threads(threads);  // oneDNN's OpenMP follows torch's count
  const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  Key key{w.data_ptr(), x.sizes().vec(), std::vector<int64_t>{stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1]},
          x_scale, x_zp, y_scale, y_zp, act, accum.has_value() ? accum_scale : 0.0, accum.has_value() ? accum_zp : -1,
          accum.has_value(), w_scale.data_ptr(), bias.has_value() ? bias->data_ptr() : nullptr};
  std::lock_guard<std::mutex> lock(cache_mutex);
  auto found = cache.find(key);
  if (found == cache.end()) {
    found = cache.emplace(key, build(xc, x_scale, x_zp, w, w_scale, bias, stride, padding, dilation, groups, y_scale, y_zp, act,
                                     accum.has_value(), accum_scale, accum_zp)).first;
  }
  Conv& c = *found->second;
  at::Tensor y;
  if (accum.has_value()) {
    TORCH_CHECK(accum->scalar_type() == at::kByte && accum->sizes().vec() == c.out_sizes, "qconv2d: accum must be uint8 of the output's shape ",
                at::IntArrayRef(c.out_sizes));
    y = accum->contiguous(at::MemoryFormat::ChannelsLast).clone(at::MemoryFormat::ChannelsLast);  // the sum post-op reads it in place
  } else {
    y = at::empty(c.out_sizes, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  }
  TS_DNNL(dnnl_memory_set_data_handle(c.src, xc.data_ptr()));
  TS_DNNL(dnnl_memory_set_data_handle(c.dst, y.data_ptr()));
  std::vector<dnnl_exec_arg_t> args = {{DNNL_ARG_SRC, c.src}, {DNNL_ARG_WEIGHTS, c.wei}, {DNNL_ARG_DST, c.dst},
                                       {DNNL_ARG_ATTR_SCALES | DNNL_ARG_SRC, c.src_scale},
                                       {DNNL_ARG_ATTR_SCALES | DNNL_ARG_WEIGHTS, c.wei_scale},
                                       {DNNL_ARG_ATTR_SCALES | DNNL_ARG_DST, c.dst_scale},
                                       {DNNL_ARG_ATTR_ZERO_POINTS | DNNL_ARG_SRC, c.src_zp},
                                       {DNNL_ARG_ATTR_ZERO_POINTS | DNNL_ARG_DST, c.dst_zp}};
  if (c.has_bias) args.push_back({DNNL_ARG_BIAS, c.bias});
  static thread_local dnnl_stream_t stream = [] {
    dnnl_stream_t made;
    TS_DNNL(dnnl_stream_create(&made, engine(), dnnl_stream_default_flags));
    return made;
  }();
  TS_DNNL(dnnl_primitive_execute(c.primitive, stream, int(args.size()), args.data()));
  TS_DNNL(dnnl_stream_wait(stream));
  return y;
}

int64_t cached_primitives() {
  std::lock_guard<std::mutex> lock(cache_mutex);
  return int64_t(cache.size());
}

}  // namespace

TORCH_LIBRARY(torchslim_onednn, m) {
  m.def("qconv2d(Tensor x, float x_scale, int x_zp, Tensor w, Tensor w_scale, Tensor? bias, int[] stride, int[] padding, "
        "int[] dilation, int groups, float y_scale, int y_zp, int act, Tensor? accum, float accum_scale, int accum_zp) -> Tensor");
  m.def("cached_primitives() -> int", &cached_primitives);
}

TORCH_LIBRARY_IMPL(torchslim_onednn, CPU, m) { m.impl("qconv2d", &qconv2d); }
