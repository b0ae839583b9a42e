// An int8 oneDNN convolution whose primitive (and reordered weights) is built once and then
// executed per call: the probe behind benchmarks/onednn_cached_conv.py (issue 21). uint8 NHWC
// activations with a per-tensor scale / zero point, int8 per-channel weights, f32 bias, uint8
// output with its own scale / zero point, optional ReLU / ReLU6 post-op. C API only, so it
// builds against the oneDNN 3.x headers of the onednn-devel wheel and runs on the CPU-only
// onednn-cpu-gomp library.
#include <torch/extension.h>
#include <oneapi/dnnl/dnnl.h>
#include <omp.h>
#include <chrono>
#include <vector>
#include <memory>

#define CHECK_DNNL(x) do { dnnl_status_t s_ = (x); TORCH_CHECK(s_ == dnnl_success, #x, " failed: ", int(s_)); } while (0)

static dnnl_engine_t engine() { static dnnl_engine_t e = [] { dnnl_engine_t x; CHECK_DNNL(dnnl_engine_create(&x, dnnl_cpu, 0)); return x; }(); return e; }
static dnnl_stream_t stream() { static dnnl_stream_t s = [] { dnnl_stream_t x; CHECK_DNNL(dnnl_stream_create(&x, engine(), dnnl_stream_default_flags)); return x; }(); return s; }

struct Conv {
  dnnl_primitive_t prim;
  dnnl_memory_t src, wei, bias, dst, s_src, s_wei, s_dst, z_src, z_dst;
  std::vector<int64_t> out_shape;  // N, OH, OW, OC (NHWC)
  double kernel_s = 0;
};
static std::vector<std::unique_ptr<Conv>> convs;

static dnnl_memory_t mem(const_dnnl_memory_desc_t md, void* h) { dnnl_memory_t m; CHECK_DNNL(dnnl_memory_create(&m, md, engine(), h)); return m; }
static dnnl_memory_t vec_mem(int64_t n, dnnl_data_type_t dt, const void* src, size_t bytes) {
  dnnl_memory_desc_t md; dnnl_dims_t d = {n};
  CHECK_DNNL(dnnl_memory_desc_create_with_tag(&md, 1, d, dt, dnnl_a));
  dnnl_memory_t m = mem(md, DNNL_MEMORY_ALLOCATE);
  void* p; CHECK_DNNL(dnnl_memory_get_data_handle(m, &p)); memcpy(p, src, bytes);
  return m;
}

// weight: int8 [OC, IC/g, kh, kw]; bias f32 [OC]; w_scales f32 [OC]; act: 0 none, 1 relu, 2 relu6 (clip)
int64_t make(std::vector<int64_t> in_nhwc, torch::Tensor weight, torch::Tensor bias, torch::Tensor w_scales,
             int64_t stride, int64_t pad, int64_t groups, double s_in, int64_t z_in, double s_out, int64_t z_out, int64_t act) {
  auto c = std::make_unique<Conv>();
  int64_t N = in_nhwc[0], H = in_nhwc[1], W = in_nhwc[2], IC = in_nhwc[3];
  int64_t OC = weight.size(0), KH = weight.size(2), KW = weight.size(3);
  int64_t OH = (H + 2 * pad - KH) / stride + 1, OW = (W + 2 * pad - KW) / stride + 1;
  c->out_shape = {N, OH, OW, OC};
  dnnl_memory_desc_t src_md, dst_md, wei_any, bias_md, wei_user;
  dnnl_dims_t sd = {N, IC, H, W}, dd = {N, OC, OH, OW}, bd = {OC};
  CHECK_DNNL(dnnl_memory_desc_create_with_tag(&src_md, 4, sd, dnnl_u8, dnnl_nhwc));
  CHECK_DNNL(dnnl_memory_desc_create_with_tag(&dst_md, 4, dd, dnnl_u8, dnnl_nhwc));
  CHECK_DNNL(dnnl_memory_desc_create_with_tag(&bias_md, 1, bd, dnnl_f32, dnnl_a));
  if (groups > 1) {
    dnnl_dims_t wd = {groups, OC / groups, IC / groups, KH, KW};
    CHECK_DNNL(dnnl_memory_desc_create_with_tag(&wei_any, 5, wd, dnnl_s8, dnnl_format_tag_any));
    CHECK_DNNL(dnnl_memory_desc_create_with_tag(&wei_user, 5, wd, dnnl_s8, dnnl_goihw));
  } else {
    dnnl_dims_t wd = {OC, IC, KH, KW};
    CHECK_DNNL(dnnl_memory_desc_create_with_tag(&wei_any, 4, wd, dnnl_s8, dnnl_format_tag_any));
    CHECK_DNNL(dnnl_memory_desc_create_with_tag(&wei_user, 4, wd, dnnl_s8, dnnl_oihw));
  }
  dnnl_primitive_attr_t attr; CHECK_DNNL(dnnl_primitive_attr_create(&attr));
  CHECK_DNNL(dnnl_primitive_attr_set_scales_mask(attr, DNNL_ARG_SRC, 0));
  CHECK_DNNL(dnnl_primitive_attr_set_scales_mask(attr, DNNL_ARG_WEIGHTS, groups > 1 ? 3 : 1));
  CHECK_DNNL(dnnl_primitive_attr_set_scales_mask(attr, DNNL_ARG_DST, 0));
  CHECK_DNNL(dnnl_primitive_attr_set_zero_points_mask(attr, DNNL_ARG_SRC, 0));
  CHECK_DNNL(dnnl_primitive_attr_set_zero_points_mask(attr, DNNL_ARG_DST, 0));
  if (act) {
    dnnl_post_ops_t po; CHECK_DNNL(dnnl_post_ops_create(&po));
    if (act == 1) CHECK_DNNL(dnnl_post_ops_append_eltwise(po, dnnl_eltwise_relu, 0.f, 0.f));
    else CHECK_DNNL(dnnl_post_ops_append_eltwise(po, dnnl_eltwise_clip, 0.f, 6.f));
    CHECK_DNNL(dnnl_primitive_attr_set_post_ops(attr, po));
  }
  dnnl_dims_t st = {stride, stride}, dil = {0, 0}, pl = {pad, pad}, pr = {pad, pad};
  dnnl_primitive_desc_t pd;
  CHECK_DNNL(dnnl_convolution_forward_primitive_desc_create(&pd, engine(), dnnl_forward_inference, dnnl_convolution_direct,
      src_md, wei_any, bias_md, dst_md, st, dil, pl, pr, attr));
  CHECK_DNNL(dnnl_primitive_create(&c->prim, pd));
  const_dnnl_memory_desc_t wmd = dnnl_primitive_desc_query_md(pd, dnnl_query_weights_md, 0);
  auto w = weight.contiguous();
  dnnl_memory_t user = mem(wei_user, w.data_ptr());
  c->wei = mem(wmd, DNNL_MEMORY_ALLOCATE);
  dnnl_primitive_desc_t rpd; dnnl_primitive_t rp;
  CHECK_DNNL(dnnl_reorder_primitive_desc_create(&rpd, wei_user, engine(), wmd, engine(), nullptr));
  CHECK_DNNL(dnnl_primitive_create(&rp, rpd));
  dnnl_exec_arg_t ra[2] = {{DNNL_ARG_FROM, user}, {DNNL_ARG_TO, c->wei}};
  CHECK_DNNL(dnnl_primitive_execute(rp, stream(), 2, ra)); CHECK_DNNL(dnnl_stream_wait(stream()));
  auto b = bias.contiguous().to(torch::kFloat); auto ws = w_scales.contiguous().to(torch::kFloat);
  c->bias = vec_mem(OC, dnnl_f32, b.data_ptr(), OC * 4);
  float fs_in = s_in, fs_out = s_out; int32_t zi = z_in, zo = z_out;
  c->s_src = vec_mem(1, dnnl_f32, &fs_in, 4); c->s_dst = vec_mem(1, dnnl_f32, &fs_out, 4);
  c->s_wei = vec_mem(OC, dnnl_f32, ws.data_ptr(), OC * 4);
  c->z_src = vec_mem(1, dnnl_s32, &zi, 4); c->z_dst = vec_mem(1, dnnl_s32, &zo, 4);
  c->src = mem(src_md, DNNL_MEMORY_NONE); c->dst = mem(dst_md, DNNL_MEMORY_NONE);
  convs.push_back(std::move(c));
  return int64_t(convs.size()) - 1;
}

torch::Tensor run(int64_t h, torch::Tensor x) {  // x: uint8 NHWC contiguous
  Conv& c = *convs.at(h);
  auto y = torch::empty(c.out_shape, x.options());
  CHECK_DNNL(dnnl_memory_set_data_handle(c.src, x.data_ptr()));
  CHECK_DNNL(dnnl_memory_set_data_handle(c.dst, y.data_ptr()));
  dnnl_exec_arg_t a[9] = {{DNNL_ARG_SRC, c.src}, {DNNL_ARG_WEIGHTS, c.wei}, {DNNL_ARG_BIAS, c.bias}, {DNNL_ARG_DST, c.dst},
      {DNNL_ARG_ATTR_SCALES | DNNL_ARG_SRC, c.s_src}, {DNNL_ARG_ATTR_SCALES | DNNL_ARG_WEIGHTS, c.s_wei},
      {DNNL_ARG_ATTR_SCALES | DNNL_ARG_DST, c.s_dst}, {DNNL_ARG_ATTR_ZERO_POINTS | DNNL_ARG_SRC, c.z_src},
      {DNNL_ARG_ATTR_ZERO_POINTS | DNNL_ARG_DST, c.z_dst}};
  auto t0 = std::chrono::steady_clock::now();
  CHECK_DNNL(dnnl_primitive_execute(c.prim, stream(), 9, a));
  CHECK_DNNL(dnnl_stream_wait(stream()));
  c.kernel_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return y;
}

double kernel_seconds(int64_t h) { return convs.at(h)->kernel_s; }
void reset_timers() { for (auto& c : convs) c->kernel_s = 0; }
void set_threads(int64_t n) { omp_set_num_threads(int(n)); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("make", &make); m.def("run", &run); m.def("kernel_seconds", &kernel_seconds);
  m.def("reset_timers", &reset_timers); m.def("set_threads", &set_threads);
}
