// C++ tests of the CPU kernels: each op's numbers against the plain ATen formula of
// DESIGN.md (§3, §5, §6), in float64. Run by ctest (see CMakeLists.txt).
#include <ATen/ATen.h>

#include <torch/csrc/autograd/autograd.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

#include "ssa_kernels.h"

namespace {

int failures = 0;

void expect_close(const std::string& what, const at::Tensor& got, const at::Tensor& want,
                  double tol = 1e-10) {
  const double err = (got.to(at::kDouble) - want.to(at::kDouble)).abs().max().item<double>();
  const double scale = std::max(1.0, want.abs().max().item<double>());
  const bool ok = err <= tol * scale;
  std::printf("%-48s max err %.3g %s\n", what.c_str(), err, ok ? "ok" : "FAILED");
  if (!ok) ++failures;
}

at::Tensor orthonormal(int64_t rows, int64_t cols) {
  return std::get<0>(at::linalg_qr(at::randn({rows, cols}, at::kDouble)));
}

void test_lowrank_linear() {
  const int64_t p = 7, n = 33, m = 5, r = 4;
  auto x = at::randn({p, n}, at::kDouble);
  auto U = orthonormal(m, r), V = orthonormal(n, r);
  auto s = at::rand({r}, at::kDouble) + 0.5;
  auto b = at::randn({m}, at::kDouble);
  auto [h, t] = ssa::lowrank_linear_cpu(x, U, s, V, b, "relu", 0.0);
  auto t_want = at::mm(x, V);
  auto h_want = at::relu(at::mm(t_want * s, U.t()) + b);
  expect_close("lowrank_linear: t = x V", t, t_want);
  expect_close("lowrank_linear: h = relu((t*s) U^T + b)", h, h_want);
  auto [h2, t2] = ssa::lowrank_linear_cpu(x.to(at::kFloat), U.to(at::kFloat), s.to(at::kFloat),
                                           V.to(at::kFloat), std::nullopt, "tanh", 0.0);
  expect_close("lowrank_linear fp32: h = tanh((t*s) U^T)", h2, at::tanh(at::mm(t_want * s, U.t())),
               1e-5);
}

void test_dfa_project() {
  const int64_t p = 6, C = 10, d = 8, k = 4;
  auto e = at::randn({p, C}, at::kDouble);
  auto P = at::randn({d, k}, at::kDouble), Q = at::randn({C, k}, at::kDouble);
  auto sigma = at::rand({k}, at::kDouble);
  auto a = at::randn({p, d}, at::kDouble);
  auto h = at::sigmoid(a);
  auto B = at::mm(P * sigma, Q.t());  // dense d×C feedback, only for the test
  auto delta = ssa::dfa_project_cpu(e, P, sigma, Q, h, std::nullopt, "sigmoid", 0.0, 0.0);
  expect_close("dfa_project: (e B^T) * h(1-h)", delta, at::mm(e, B.t()) * h * (1 - h));
  auto a4 = at::randn({p, d, 3, 2}, at::kDouble);
  auto d4 = ssa::dfa_project_cpu(e, P, sigma, Q, at::relu(a4), std::nullopt, "relu", 0.0, 0.0);
  expect_close("dfa_project 4-D: shared over positions", d4,
               at::mm(e, B.t()).view({p, d, 1, 1}) * (a4 > 0).to(at::kDouble));
}

void test_svd_factor_grads() {
  const int64_t p = 9, n = 7, m = 6, r = 4;
  auto x = at::randn({p, n}, at::kDouble);
  auto U = orthonormal(m, r), V = orthonormal(n, r);
  auto s = at::rand({r}, at::kDouble) + 0.5;
  auto delta = at::randn({p, m}, at::kDouble);
  auto t = at::mm(x, V);
  // euclidean + none + ce only: the gradients of sum(delta * a), a = x V diag(s) U^T + b
  auto [gU, gs, gV, gb] = ssa::svd_factor_grads_cpu(x, t, delta, U, s, V, std::nullopt,
                                                    std::nullopt, std::nullopt, 1.0, 0.0, 0.0,
                                                    0.0, 1e-3, "euclidean", "none", 1e-6);
  auto w = at::mm(delta, U);
  expect_close("svd_factor_grads: gU = delta^T t diag(s)", gU, at::mm(delta.t(), t) * s);
  expect_close("svd_factor_grads: gV = x^T w diag(s)", gV, at::mm(x.t(), w) * s);
  expect_close("svd_factor_grads: gs = colsum(w * t)", gs, (w * t).sum(0));
  expect_close("svd_factor_grads: gb = colsum(delta)", gb, delta.sum(0));
  // stiefel with alignment: a tangent vector at orthonormal U (U^T gU skew-symmetric)
  auto BU = orthonormal(m, 2), BV = orthonormal(n, 2);
  auto BS = at::rand({2}, at::kDouble);
  auto res = ssa::svd_factor_grads_cpu(x, t, delta, U, s, V, BU, BS, BV, 1.0, 0.3, 0.0, 0.0, 1e-3,
                                       "euclidean", "stiefel", 1e-6);
  auto gUs = std::get<0>(res);
  auto skew = at::mm(U.t(), gUs) + at::mm(gUs.t(), U);
  expect_close("svd_factor_grads stiefel: U^T gU + gU^T U = 0", skew, at::zeros_like(skew));
  // delta = 0, align = 0, U and V off the manifold: only the ortho penalty is left,
  // 4·ortho·U(UᵀU − I) (= ∇_U ortho‖UᵀU − I‖²) under none and stiefel (added after the
  // projection), (I − UUᵀ) of it under paper.
  {
    auto Uo = at::randn({m, r}, at::kDouble) * 0.5, Vo = at::randn({n, r}, at::kDouble) * 0.5;
    auto zero = at::zeros({p, m}, at::kDouble);
    const double ortho = 0.7;
    auto eye = at::eye(r, at::kDouble);
    auto OU = at::mm(Uo, at::mm(Uo.t(), Uo) - eye) * (4 * ortho);
    auto OV = at::mm(Vo, at::mm(Vo.t(), Vo) - eye) * (4 * ortho);
    for (const char* proj : {"none", "stiefel", "paper"}) {
      auto g = ssa::svd_factor_grads_cpu(x, at::mm(x, Vo), zero, Uo, s, Vo, std::nullopt,
                                         std::nullopt, std::nullopt, 1.0, 0.0, ortho, 0.0, 1e-3,
                                         "euclidean", proj, 1e-6);
      const bool paper = std::string(proj) == "paper";
      auto wU = paper ? OU - at::mm(Uo, at::mm(Uo.t(), OU)) : OU;
      auto wV = paper ? OV - at::mm(Vo, at::mm(Vo.t(), OV)) : OV;
      expect_close(std::string("svd_factor_grads ortho alone, ") + proj + ": gU", std::get<0>(g), wU);
      expect_close(std::string("svd_factor_grads ortho alone, ") + proj + ": gV", std::get<2>(g), wV);
    }
  }
}

// f(a) at ±inf and NaN as torch gives it (relu(−inf) = 0, not −inf·0 = NaN), and f'(a)
// read from h = f(a) as autograd gives it; then through the op, with a ±inf bias.
template <typename T>
void check_activations_at_infinity(const char* dtype, at::ScalarType st) {
  const T inf = std::numeric_limits<T>::infinity();
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const T slope = T(0.1);
  auto a = at::tensor(std::vector<T>{-inf, inf, nan, T(-2), T(0), T(3)}, at::TensorOptions(st));
  auto leaf = a.clone().set_requires_grad(true);
  auto autograd = [&](const at::Tensor& out) {
    return torch::autograd::grad({out}, {leaf}, {at::ones_like(a)})[0].detach();
  };
  struct Case {
    const char* name;
    ssa::Act act;
    at::Tensor h, dh;
  };
  std::vector<Case> cases;
  cases.push_back({"relu", ssa::Act::Relu, at::relu(a), autograd(at::relu(leaf))});
  cases.push_back({"leaky_relu", ssa::Act::LeakyRelu, at::leaky_relu(a, slope),
                   autograd(at::leaky_relu(leaf, slope))});
  cases.push_back({"tanh", ssa::Act::Tanh, at::tanh(a), autograd(at::tanh(leaf))});
  cases.push_back({"sigmoid", ssa::Act::Sigmoid, at::sigmoid(a), autograd(at::sigmoid(leaf))});
  for (auto& c : cases) {
    const T* ap = a.template data_ptr<T>();
    const T* hp = c.h.template data_ptr<T>();
    const T* gp = c.dh.template data_ptr<T>();
    bool ok = true;
    for (int64_t i = 0; i < a.numel(); ++i) {
      const T got = ssa::act_forward<T>(ap[i], c.act, slope);
      const bool same = std::isnan(hp[i]) ? std::isnan(got) : std::abs(got - hp[i]) <= T(1e-6) ||
                                                                  got == hp[i];
      if (!same) {
        std::printf("  act_forward %s(%g) = %g, torch %g\n", c.name, double(ap[i]), double(got),
                    double(hp[i]));
        ok = false;
      }
      if (std::isnan(ap[i])) continue;  // f' at NaN is not part of the contract
      const T g = ssa::act_grad_from_output<T>(hp[i], c.act, slope);
      if (std::isnan(g) || std::abs(g - gp[i]) > T(1e-6)) {
        std::printf("  act_grad_from_output %s at a = %g: %g, autograd %g\n", c.name,
                    double(ap[i]), double(g), double(gp[i]));
        ok = false;
      }
    }
    const std::string what = std::string("activations at +-inf, NaN: ") + c.name + " " + dtype;
    std::printf("%-48s %s\n", what.c_str(), ok ? "ok" : "FAILED");
    if (!ok) ++failures;
  }
}

void test_activations_at_infinity() {
  check_activations_at_infinity<float>("fp32", at::kFloat);
  check_activations_at_infinity<double>("fp64", at::kDouble);
  const int64_t p = 5, n = 6, m = 4, r = 3;
  const double inf = std::numeric_limits<double>::infinity();
  auto x = at::randn({p, n}, at::kDouble);
  auto U = orthonormal(m, r), V = orthonormal(n, r);
  auto s = at::rand({r}, at::kDouble) + 0.5;
  auto b = at::randn({m}, at::kDouble);
  b[0] = -inf;
  b[2] = inf;
  auto a = at::mm(at::mm(x, V) * s, U.t()) + b;
  for (auto st : {at::kFloat, at::kDouble}) {
    const std::string dt = st == at::kFloat ? " fp32" : " fp64";
    auto h = std::get<0>(ssa::lowrank_linear_cpu(x.to(st), U.to(st), s.to(st), V.to(st), b.to(st),
                                                 "relu", 0.0))
                 .to(at::kDouble);
    const bool no_nan = !at::isnan(h).any().item<bool>();
    std::printf("%-48s %s\n", ("lowrank_linear relu, -inf bias: no NaN" + dt).c_str(),
                no_nan ? "ok" : "FAILED");
    if (!no_nan) ++failures;
    auto inf_a = at::isinf(a);
    expect_close("lowrank_linear relu, +-inf bias: finite part" + dt,
                 at::where(inf_a, at::zeros_like(h), h), at::where(inf_a, at::zeros_like(a), at::relu(a)),
                 1e-5);
    expect_close("lowrank_linear relu, +-inf bias: which are inf" + dt, at::isinf(h).to(at::kDouble),
                 (a == inf).to(at::kDouble));
  }
}

// DESIGN §4: K'[(n,w),(c,h)] = K[n,c,h,w] = U diag(s) V^T, forward = two convolutions.
void test_conv() {
  const int64_t p = 3, C = 2, N = 4, H = 7, W = 6, kh = 3, kw = 2;
  const int64_t m = N * kw, n = C * kh, r = std::min(m, n);
  auto x = at::randn({p, C, H, W}, at::kDouble);
  auto U = orthonormal(m, r), V = orthonormal(n, r);
  auto s = at::rand({r}, at::kDouble) + 0.5;
  auto b = at::randn({N}, at::kDouble);
  // the dense kernel of the factors
  auto K = at::mm(U * s, V.t()).view({N, kw, C, kh}).permute({0, 2, 3, 1}).contiguous();
  const std::vector<int64_t> ks{kh, kw}, st{2, 1}, pad{1, 0, 1, 1}, dil{1, 2};  // asymmetric
  auto [h, t] = ssa::lowrank_conv2d_native(x, U, s, V, b, ks, st, pad, dil, "none", 0.0);
  auto xp = at::constant_pad_nd(x, {1, 1, 1, 0}, 0);
  auto want = at::convolution(xp, K, b, {2, 1}, {0, 0}, {1, 2}, false, {0, 0}, 1);
  expect_close("lowrank_conv2d: two convolutions = conv2d(x, K)", h, want);
  // euclidean + none: chain rule through K' from the dense weight-gradient G'
  auto delta = at::randn(h.sizes(), at::kDouble);
  auto G = std::get<1>(at::convolution_backward(delta, xp, K, std::nullopt, {2, 1}, {0, 0}, {1, 2},
                                                false, {0, 0}, 1, {false, true, false}));
  auto Gp = G.permute({0, 3, 1, 2}).reshape({m, n});
  auto [gU, gs, gV, gb] = ssa::svd_conv_factor_grads_cpu(
      x, t, delta, U, s, V, ks, st, pad, dil, std::nullopt, std::nullopt, std::nullopt, 1.0, 0.0,
      0.0, 0.0, 1e-3, "euclidean", "none", 1e-6);
  expect_close("svd_conv_factor_grads: gU = G' V diag(s)", gU, at::mm(Gp, V) * s);
  expect_close("svd_conv_factor_grads: gV = G'^T U diag(s)", gV, at::mm(Gp.t(), U) * s);
  expect_close("svd_conv_factor_grads: gs = diag(U^T G' V)", gs, at::mm(U.t(), at::mm(Gp, V)).diagonal());
  expect_close("svd_conv_factor_grads: gb = sum(delta)", gb, delta.sum({0, 2, 3}));
}

}  // namespace

int main() {
  at::manual_seed(0);
  test_lowrank_linear();
  test_dfa_project();
  test_activations_at_infinity();
  test_svd_factor_grads();
  test_conv();
  if (failures) std::printf("%d check(s) FAILED\n", failures);
  return failures == 0 ? 0 : 1;
}
