// Option parsing and shared argument checks of the ssa_kernels implementations.
// (The op schemas themselves are defined once, in Python: ssa_kernels/_ops.py.)
#include "ssa_kernels.h"

#include <c10/util/Exception.h>

namespace ssa {

Act parse_activation(c10::string_view name) {
  if (name == "none") return Act::None;
  if (name == "relu") return Act::Relu;
  if (name == "leaky_relu") return Act::LeakyRelu;
  if (name == "tanh") return Act::Tanh;
  if (name == "sigmoid") return Act::Sigmoid;
  TORCH_CHECK_VALUE(false, "ssa_kernels: activation must be one of none, relu, leaky_relu, ",
                    "tanh, sigmoid; got '", std::string(name), "'");
}

Projection parse_projection(c10::string_view name) {
  if (name == "stiefel") return Projection::Stiefel;
  if (name == "paper") return Projection::Paper;
  if (name == "none") return Projection::None;
  TORCH_CHECK_VALUE(false, "ssa_kernels: projection must be one of stiefel, paper, none; got '",
                    std::string(name), "'");
}

Scaling parse_scaling(c10::string_view name) {
  if (name == "euclidean") return Scaling::Euclidean;
  if (name == "inverse") return Scaling::Inverse;
  TORCH_CHECK_VALUE(false, "ssa_kernels: scaling must be one of euclidean, inverse; got '",
                    std::string(name), "'");
}

namespace {

void check_float(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), op, ": ", name,
                   " must be a floating tensor, got ", t.scalar_type());
  TORCH_CHECK_VALUE(dim < 0 || t.dim() == dim, op, ": ", name, " must be ", dim, "-D, got ",
                    t.sizes());
}

void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref,
                bool dtype = true) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " is on ", t.device(),
                    " but the inputs are on ", ref.device());
  TORCH_CHECK_TYPE(!dtype || t.scalar_type() == ref.scalar_type(), op, ": ", name,
                   " has dtype ", t.scalar_type(), ", expected ", ref.scalar_type());
}

void check_factors(const char* op, const at::Tensor& U, const at::Tensor& s, const at::Tensor& V,
                   const at::Tensor& ref) {
  check_float(op, "U", U, 2);
  check_float(op, "s", s, 1);
  check_float(op, "V", V, 2);
  check_like(op, "U", U, ref);
  check_like(op, "s", s, ref);
  check_like(op, "V", V, ref);
  const auto r = U.size(1);
  TORCH_CHECK_VALUE(s.size(0) == r && V.size(1) == r, op, ": U ", U.sizes(), ", s ", s.sizes(),
                    " and V ", V.sizes(), " must share the rank r");
  TORCH_CHECK_VALUE(r >= 1 && r <= std::min(U.size(0), V.size(0)), op, ": rank r = ", r,
                    " must satisfy 1 <= r <= min(m, n) = ", std::min(U.size(0), V.size(0)));
}

}  // namespace

void check_lowrank_linear(const at::Tensor& x, const at::Tensor& U, const at::Tensor& s,
                          const at::Tensor& V, const std::optional<at::Tensor>& bias) {
  const char* op = "ssa_kernels.lowrank_linear";
  check_float(op, "x", x, 2);
  check_factors(op, U, s, V, x);
  TORCH_CHECK_VALUE(V.size(0) == x.size(1), op, ": V ", V.sizes(), " must have n = ", x.size(1),
                    " rows (the features of x)");
  check_bias(op, bias, x, U.size(0), "m");
}

void check_bias(const char* op, const std::optional<at::Tensor>& bias, const at::Tensor& x,
                int64_t size, const char* what) {
  if (!bias.has_value()) return;
  check_float(op, "bias", *bias, 1);
  check_like(op, "bias", *bias, x);
  TORCH_CHECK_VALUE(bias->size(0) == size, op, ": bias ", bias->sizes(), " must have ", what,
                    " = ", size, " entries");
}

void check_dfa_project(const at::Tensor& e, const at::Tensor& P, const at::Tensor& sigma,
                       const at::Tensor& Q, const at::Tensor& h,
                       const std::optional<at::Tensor>& a, double cos) {
  const char* op = "ssa_kernels.dfa_project";
  check_float(op, "e", e, 2);
  check_float(op, "P", P, 2);
  check_float(op, "sigma", sigma, 1);
  check_float(op, "Q", Q, 2);
  check_float(op, "h", h, -1);
  check_like(op, "P", P, e);
  check_like(op, "sigma", sigma, e);
  check_like(op, "Q", Q, e);
  check_like(op, "h", h, e);
  const auto k = P.size(1);
  TORCH_CHECK_VALUE(Q.size(0) == e.size(1) && Q.size(1) == k && sigma.size(0) == k, op,
                    ": e ", e.sizes(), ", Q ", Q.sizes(), ", sigma ", sigma.sizes(), ", P ",
                    P.sizes(), " do not chain as (p×C)(C×k)(k)(d×k)ᵀ");
  TORCH_CHECK_VALUE(h.dim() >= 2 && h.size(0) == e.size(0) && h.size(1) == P.size(0), op,
                    ": h ", h.sizes(), " must be (p, d, ...) with p = ", e.size(0),
                    ", d = ", P.size(0));
  TORCH_CHECK_VALUE(cos == 0.0 || a.has_value(), op, ": cos != 0 needs the pre-activation a");
  if (a.has_value()) {
    check_like(op, "a", *a, h);
    TORCH_CHECK_VALUE(a->sizes() == h.sizes(), op, ": a ", a->sizes(), " must have the shape ",
                      "of h ", h.sizes());
  }
}

void check_batch_inputs(const char* op, const at::Tensor& x, const at::Tensor& t,
                        const at::Tensor& delta) {
  check_float(op, "t", t, x.dim());
  check_float(op, "delta", delta, x.dim());
  check_like(op, "delta", delta, x);
  check_like(op, "t", t, x, /*dtype=*/false);
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type() ||
                       t.scalar_type() == acc_type(x.scalar_type()),
                   op, ": t has dtype ", t.scalar_type(), ", expected ", x.scalar_type(), " or ",
                   acc_type(x.scalar_type()));
}

void check_svd_factor_grads(const at::Tensor& x, const at::Tensor& t, const at::Tensor& delta,
                            const at::Tensor& U, const at::Tensor& s, const at::Tensor& V,
                            const std::optional<at::Tensor>& BU,
                            const std::optional<at::Tensor>& BS,
                            const std::optional<at::Tensor>& BV, double align) {
  const char* op = "ssa_kernels.svd_factor_grads";
  check_float(op, "x", x, 2);
  check_factors(op, U, s, V, x);
  check_batch_inputs(op, x, t, delta);
  const auto p = x.size(0), r = U.size(1);
  TORCH_CHECK_VALUE(V.size(0) == x.size(1), op, ": V ", V.sizes(), " must have n = ", x.size(1),
                    " rows");
  TORCH_CHECK_VALUE(t.size(0) == p && t.size(1) == r, op, ": t ", t.sizes(), " must be (",
                    p, ", ", r, ")");
  TORCH_CHECK_VALUE(delta.size(0) == p && delta.size(1) == U.size(0), op, ": delta ",
                    delta.sizes(), " must be (", p, ", ", U.size(0), ")");
  check_targets(op, U, V, BU, BS, BV, align);
}

void check_targets(const char* op, const at::Tensor& U, const at::Tensor& V,
                   const std::optional<at::Tensor>& BU, const std::optional<at::Tensor>& BS,
                   const std::optional<at::Tensor>& BV, double align) {
  const bool any = BU.has_value() || BS.has_value() || BV.has_value();
  const bool all = BU.has_value() && BS.has_value() && BV.has_value();
  TORCH_CHECK_VALUE(any == all, op, ": BU, BS, BV must be given together");
  TORCH_CHECK_VALUE(align == 0.0 || all, op, ": align != 0 needs BU, BS, BV");
  if (all) {
    check_float(op, "BU", *BU, 2);
    check_float(op, "BS", *BS, 1);
    check_float(op, "BV", *BV, 2);
    check_like(op, "BU", *BU, U);
    check_like(op, "BS", *BS, U);
    check_like(op, "BV", *BV, U);
    const auto k = BS->size(0);
    TORCH_CHECK_VALUE(k >= 1 && BU->size(0) == U.size(0) && BU->size(1) == k &&
                          BV->size(0) == V.size(0) && BV->size(1) == k,
                      op, ": targets BU ", BU->sizes(), ", BS ", BS->sizes(), ", BV ",
                      BV->sizes(), " must be (m, k), (k), (n, k)");
  }
}

ConvGeometry parse_conv_geometry(const char* op, at::IntArrayRef kernel_size,
                                 at::IntArrayRef stride, at::IntArrayRef padding,
                                 at::IntArrayRef dilation) {
  TORCH_CHECK_VALUE(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 4 &&
                        dilation.size() == 2,
                    op, ": kernel_size, stride and dilation must have 2 entries and padding 4 ",
                    "(top, bottom, left, right); got ", kernel_size, ", ", stride, ", ", padding,
                    ", ", dilation);
  ConvGeometry g{kernel_size[0], kernel_size[1], stride[0], stride[1], padding[0],
                 padding[1],     padding[2],     padding[3], dilation[0], dilation[1]};
  TORCH_CHECK_VALUE(g.kh >= 1 && g.kw >= 1 && g.sh >= 1 && g.sw >= 1 && g.dh >= 1 && g.dw >= 1,
                    op, ": kernel_size, stride and dilation must be >= 1");
  TORCH_CHECK_VALUE(g.pt >= 0 && g.pb >= 0 && g.pl >= 0 && g.pr >= 0, op,
                    ": padding must be >= 0, got ", padding);
  return g;
}

void check_conv_factors(const char* op, const at::Tensor& x, const at::Tensor& U,
                        const at::Tensor& s, const at::Tensor& V, const ConvGeometry& g) {
  check_float(op, "x", x, 4);
  check_factors(op, U, s, V, x);
  TORCH_CHECK_VALUE(U.size(0) % g.kw == 0, op, ": U ", U.sizes(),
                    " must have N·kw rows (kw = ", g.kw, ")");
  TORCH_CHECK_VALUE(V.size(0) == x.size(1) * g.kh, op, ": V ", V.sizes(), " must have C·kh = ",
                    x.size(1) * g.kh, " rows");
}

}  // namespace ssa
