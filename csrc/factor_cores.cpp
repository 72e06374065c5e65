// The r×r cores of the one-pass factor gradients (DESIGN §6) and the frame of the op
// around its two big products, in ATen so that the CPU and CUDA kernels share them.
// Derivation and Python twin of the cores: ssa_kernels/_cores.py.
#include "ssa_kernels.h"

namespace ssa {
namespace {

at::Tensor safe_inverse(const at::Tensor& s, double eps) {
  // 1/s_safe, s_safe = sgn(s)·max(|s|, eps·max|s|), sgn(0) = +1
  auto abs = s.abs();
  auto floor = abs.max() * eps;
  auto sgn = at::where(s < 0, -at::ones_like(s), at::ones_like(s));
  return (sgn * at::maximum(abs, floor)).reciprocal();
}

at::Tensor align_s_grad(const at::Tensor& s, const at::Tensor& BS) {
  // ∇_s ‖s/‖s‖ − BS/‖BS‖‖² = (2/‖s‖)(I − ŝŝᵀ)(ŝ − B̂_S)
  auto ns = s.norm();
  auto sh = s / ns;
  auto diff = sh - BS / BS.norm();
  return (diff - sh * at::dot(sh, diff)) * (2.0 / ns);
}

at::Tensor hoyer_grad(const at::Tensor& s, double eps) {
  // H(s) = Σ sqrt(s² + ε²)/‖s‖,  ∇H = s/(sqrt(s² + ε²)‖s‖) − H s/‖s‖²
  auto ns = s.norm();
  auto root = at::sqrt(s * s + eps * eps);
  auto H = root.sum() / ns;
  return s / (root * ns) - H * s / (ns * ns);
}

at::Tensor core(const at::Tensor& Y, const at::Tensor& K0, const at::Tensor& BY, int64_t k,
                double align, double ortho, Projection projection) {
  const auto r = Y.size(1);
  auto G = at::mm(Y.t(), Y);
  auto eye = at::eye(r, Y.options());
  auto Ek = at::zeros({r}, Y.options());
  if (k > 0) Ek.narrow(0, 0, k).fill_(1.0);
  auto Gortho = (G - eye) * (4.0 * ortho);
  auto C = Gortho + at::diag(Ek) * (2.0 * align);
  if (projection == Projection::None) return C;
  auto K = K0 + (G * Ek) * (2.0 * align);
  if (k > 0) K.narrow(1, 0, k).sub_(at::mm(Y.t(), BY), 2.0 * align);
  if (projection == Projection::Stiefel) return C - (K + K.t()) * 0.5;
  return C - K - at::mm(G, Gortho);
}

}  // namespace

FactorCores factor_cores(const at::Tensor& U, const at::Tensor& s, const at::Tensor& V,
                         const at::Tensor& wt, const std::optional<at::Tensor>& BU,
                         const std::optional<at::Tensor>& BS,
                         const std::optional<at::Tensor>& BV, double ce, double align,
                         double ortho, double hoyer, double hoyer_eps, Scaling scaling,
                         Projection projection, double eps) {
  const auto work = wt.scalar_type();
  auto Uw = U.to(work), sw = s.to(work), Vw = V.to(work);
  const auto r = Uw.size(1);
  FactorCores out;
  auto d = scaling == Scaling::Euclidean ? sw : safe_inverse(sw, eps);
  out.colscale = d * ce;
  out.gs = wt.diagonal().mul(ce);
  if (align != 0.0) {
    out.k = std::min<int64_t>(r, BS->size(0));
    out.BU = BU->to(work).narrow(1, 0, out.k);
    out.BV = BV->to(work).narrow(1, 0, out.k);
    auto BSk = BS->to(work).narrow(0, 0, out.k);
    out.gs.narrow(0, 0, out.k).add_(align_s_grad(sw.narrow(0, 0, out.k), BSk), align);
  }
  if (hoyer != 0.0) out.gs.add_(hoyer_grad(sw, hoyer_eps), hoyer);
  out.beta = -2.0 * align;
  out.CU = core(Uw, wt * out.colscale, out.BU, out.k, align, ortho, projection);
  out.CV = core(Vw, wt.t() * out.colscale, out.BV, out.k, align, ortho, projection);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> svd_factor_grads_frame(
    const at::Tensor& x, const at::Tensor& t, const at::Tensor& delta, const at::Tensor& U,
    const at::Tensor& s, const at::Tensor& V, const std::optional<at::Tensor>& BU,
    const std::optional<at::Tensor>& BS, const std::optional<at::Tensor>& BV, double ce,
    double align, double ortho, double hoyer, double hoyer_eps, c10::string_view scaling,
    c10::string_view projection, double eps, const FactorProduct& product) {
  check_svd_factor_grads(x, t, delta, U, s, V, BU, BS, BV, align);
  const auto proj = parse_projection(projection);
  const auto scale = parse_scaling(scaling);
  const auto acc = acc_type(x.scalar_type());
  auto xc = x.contiguous(), dc = delta.contiguous();
  auto da = dc.to(acc);
  auto ta = t.to(acc).contiguous(), Ua = U.to(acc).contiguous(), Va = V.to(acc).contiguous();
  auto w = at::mm(da, Ua);      // p×r
  auto wt = at::mm(w.t(), ta);  // r×r
  auto cores = factor_cores(Ua, s, Va, wt, BU, BS, BV, ce, align, ortho, hoyer, hoyer_eps, scale,
                            proj, eps);
  const auto pt = U.scalar_type();
  auto gU = product(dc, ta, Ua, cores.CU, cores.BU, cores);
  auto gV = product(xc, w, Va, cores.CV, cores.BV, cores);
  auto gb = da.sum(0).mul_(ce).to(pt);
  return {gU, cores.gs.to(pt), gV, gb};
}

}  // namespace ssa
