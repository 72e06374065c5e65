// The r×r cores of the one-pass factor gradients (DESIGN §6), in ATen so that the CPU
// and CUDA kernels share them. Derivation and Python twin: ssa_kernels/_cores.py.
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

}  // namespace ssa
