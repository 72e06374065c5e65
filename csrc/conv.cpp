// Low-rank convolutions (DESIGN §4) in ATen, shared by the CPU and CUDA registrations:
// the two convolutions are ATen/cuDNN calls; around them the scaling by s (folded into the
// second kernel), the bias (inside the second convolution) and the activation (in place)
// in the forward, and in the factor gradients the r×r cores and the epilogue of the linear
// path (factor_cores + a per-device epilogue kernel), never a copy of it.
#include <ATen/ATen.h>

#include "ssa_kernels.h"

namespace ssa {
namespace {

// Canonical NCHW strides. A tensor with size-1 dims (a 1×1 kernel, r = 1) can pass
// is_contiguous() with strides that also read as channels-last; ATen then takes oneDNN's NHWC
// path, whose strided 1×1 backward-weights kernel corrupts the heap in torch 2.14 on AVX-512
// CPUs with several threads (reproduced with torch alone: aten.convolution_backward on
// channels-last 3×3×5×8 / 5×3×1×1, stride (1, 2), OMP_NUM_THREADS=2 -> "malloc(): invalid next
// size"). Every tensor handed to a convolution here goes through this first.
at::Tensor nchw(const at::Tensor& t) {
  if (t.is_contiguous() && t.suggest_memory_format() == at::MemoryFormat::Contiguous) return t;
  return t.clone(at::MemoryFormat::Contiguous);
}

int64_t out_size(int64_t size, int64_t pad, int64_t k, int64_t stride, int64_t dilation) {
  return (size + pad - dilation * (k - 1) - 1) / stride + 1;
}

struct ConvShapes {
  int64_t N, C, r, Ho, Wo, Wt;
};

ConvShapes conv_shapes(const char* op, const at::Tensor& x, const at::Tensor& U,
                       const at::Tensor& s, const at::Tensor& V, const ConvGeometry& g) {
  check_conv_factors(op, x, U, s, V, g);
  ConvShapes c{U.size(0) / g.kw, x.size(1), U.size(1), 0, 0, 0};
  c.Ho = out_size(x.size(2), g.pt + g.pb, g.kh, g.sh, g.dh);
  c.Wt = x.size(3) + g.pl + g.pr;
  c.Wo = out_size(c.Wt, 0, g.kw, g.sw, g.dw);
  TORCH_CHECK_VALUE(c.Ho >= 1 && c.Wo >= 1, op, ": input ", x.sizes(),
                    " is smaller than the dilated kernel");
  return c;
}

// K1[j, c, h, 0] = V[(c, h), j]  (r×C×kh×1)
at::Tensor kernel1(const at::Tensor& V, const ConvShapes& c, const ConvGeometry& g) {
  // canonical strides: a strided weight view makes oneDNN pick channels-last (see nchw)
  return nchw(V.t().reshape({c.r, c.C, g.kh, 1}));
}

// K2[n, j, 0, w] = U[(n, w), j]  (N×r×1×kw)
at::Tensor kernel2(const at::Tensor& U, const ConvShapes& c, const ConvGeometry& g) {
  return nchw(U.reshape({c.N, g.kw, c.r}).permute({0, 2, 1}).reshape({c.N, c.r, 1, g.kw}));
}

// Symmetric padding is passed to the first convolution, asymmetric padding pre-pads x.
std::pair<at::Tensor, std::array<int64_t, 2>> pad_input(const at::Tensor& x,
                                                         const ConvGeometry& g) {
  if (g.pt == g.pb && g.pl == g.pr) return {nchw(x), {g.pt, g.pl}};
  return {nchw(at::constant_pad_nd(x, {g.pl, g.pr, g.pt, g.pb}, 0)), {0, 0}};
}

at::Tensor conv(const at::Tensor& in, const at::Tensor& w, const std::optional<at::Tensor>& b,
                std::array<int64_t, 2> stride, std::array<int64_t, 2> pad,
                std::array<int64_t, 2> dil) {
  return at::convolution(in, w, b, stride, pad, dil, false, {0, 0}, 1);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> lowrank_conv2d_native(
    const at::Tensor& x, const at::Tensor& U, const at::Tensor& s, const at::Tensor& V,
    const std::optional<at::Tensor>& bias, at::IntArrayRef kernel_size, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, c10::string_view activation,
    double negative_slope) {
  const char* op = "ssa_kernels.lowrank_conv2d";
  const auto g = parse_conv_geometry(op, kernel_size, stride, padding, dilation);
  const auto c = conv_shapes(op, x, U, s, V, g);
  const auto act = parse_activation(activation);
  check_bias(op, bias, x, c.N, "N");
  auto [xp, pad] = pad_input(x, g);
  auto t = nchw(conv(xp, kernel1(V, c, g), std::nullopt, {g.sh, 1}, pad, {g.dh, 1}));
  // diag(s) scales the r input channels of the second convolution: fold it into K2.
  auto K2s = nchw(kernel2(U, c, g) * s.view({1, c.r, 1, 1}));
  auto a = conv(t, K2s, bias, {1, g.sw}, {0, 0}, {1, g.dw});
  switch (act) {
    case Act::Relu:
      a.relu_();
      break;
    case Act::LeakyRelu:
      at::leaky_relu_(a, negative_slope);
      break;
    case Act::Tanh:
      a.tanh_();
      break;
    case Act::Sigmoid:
      a.sigmoid_();
      break;
    default:
      break;
  }
  return {a, t.to(acc_type(x.scalar_type()))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> svd_conv_factor_grads_frame(
    const at::Tensor& x, const at::Tensor& t, const at::Tensor& delta, const at::Tensor& U,
    const at::Tensor& s, const at::Tensor& V, at::IntArrayRef kernel_size,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    const std::optional<at::Tensor>& BU, const std::optional<at::Tensor>& BS,
    const std::optional<at::Tensor>& BV, double ce, double align, double ortho, double hoyer,
    double hoyer_eps, c10::string_view scaling, c10::string_view projection, double eps,
    const FactorEpilogueFn& epilogue) {
  const char* op = "ssa_kernels.svd_conv_factor_grads";
  const auto g = parse_conv_geometry(op, kernel_size, stride, padding, dilation);
  const auto c = conv_shapes(op, x, U, s, V, g);
  check_batch_inputs(op, x, t, delta);
  const auto p = x.size(0);
  TORCH_CHECK_VALUE(t.size(0) == p && t.size(1) == c.r && t.size(2) == c.Ho &&
                        t.size(3) == c.Wt,
                    op, ": t ", t.sizes(), " must be (", p, ", ", c.r, ", ", c.Ho, ", ", c.Wt, ")");
  TORCH_CHECK_VALUE(delta.size(0) == p && delta.size(1) == c.N &&
                        delta.size(2) == c.Ho && delta.size(3) == c.Wo,
                    op, ": delta ", delta.sizes(), " must be (", p, ", ", c.N, ", ", c.Ho, ", ",
                    c.Wo, ")");
  check_targets(op, U, V, BU, BS, BV, align);
  const auto proj = parse_projection(projection);
  const auto scale = parse_scaling(scaling);
  // Everything in the accumulation dtype (t already is): the weight-gradients are sums over
  // the whole batch and every position.
  const auto acc = acc_type(x.scalar_type());
  auto xa = x.to(acc), da = nchw(delta.to(acc)), ta = nchw(t.to(acc));
  auto Ua = U.to(acc).contiguous(), Va = V.to(acc).contiguous();
  auto [xp, pad] = pad_input(xa, g);
  // Second convolution: w = its input-gradient (the conv form of δU), RU = its weight-gradient
  // with input t (δᵀt); first convolution: RV = its weight-gradient for output-gradient w (xᵀw).
  auto [w_, gK2, unused2] = at::convolution_backward(
      da, ta, kernel2(Ua, c, g), std::nullopt, {1, g.sw}, {0, 0}, {1, g.dw}, false, {0, 0}, 1,
      {true, true, false});
  auto w = nchw(w_);
  auto gK1 = std::get<1>(at::convolution_backward(w, xp, kernel1(Va, c, g), std::nullopt,
                                                  {g.sh, 1}, {pad[0], pad[1]}, {g.dh, 1}, false,
                                                  {0, 0}, 1, {false, true, false}));
  auto RU = gK2.reshape({c.N, c.r, g.kw}).permute({0, 2, 1}).reshape({c.N * g.kw, c.r});
  auto RV = gK1.reshape({c.r, c.C * g.kh}).t();
  // wᵀt summed over batch and positions: UᵀRU = wᵀt and VᵀRV = tᵀw, as in the linear case.
  // One batched product per sample (p×r×r) then a sum: no relayout copy of w or t.
  auto wt = at::bmm(w.flatten(2), ta.flatten(2).transpose(1, 2)).sum(0);
  auto cores = factor_cores(Ua, s, Va, wt, BU, BS, BV, ce, align, ortho, hoyer, hoyer_eps, scale,
                            proj, eps);
  const auto pt = U.scalar_type();
  auto gU = epilogue(RU.contiguous(), Ua, cores.CU, cores.BU, cores, pt);
  auto gV = epilogue(RV.contiguous(), Va, cores.CV, cores.BV, cores, pt);
  auto gb = da.sum({0, 2, 3}).mul_(ce).to(pt);
  return {gU, cores.gs.to(pt), gV, gb};
}

}  // namespace ssa
