// CPU DFA projection (DESIGN §5): δh = ((e Q) ⊙ σ) Pᵀ through ATen/BLAS, then one parallel
// pass per row: activation mask f'(h), broadcast over positions for spatial h, and the
// cosine term of DESIGN §6 (its row statistics are taken in the same row task).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "cpu/cpu_common.h"

namespace ssa {

at::Tensor dfa_project_cpu(const at::Tensor& e, const at::Tensor& P, const at::Tensor& sigma,
                           const at::Tensor& Q, const at::Tensor& h,
                           const std::optional<at::Tensor>& a, c10::string_view activation,
                           double negative_slope, double cos) {
  check_dfa_project(e, P, sigma, Q, h, a, cos);
  const Act act = parse_activation(activation);
  const auto acc = acc_type(h.scalar_type());
  const int64_t p = h.size(0), d = h.size(1);
  const int64_t hw = (p * d) > 0 ? h.numel() / (p * d) : 1;
  auto eq = at::mm(e.to(acc), Q.to(acc)).mul_(sigma.to(acc));  // p×k
  auto dh = at::mm(eq, P.to(acc).t()).contiguous();            // p×d
  auto hc = h.contiguous();
  auto ac = cos != 0.0 ? a->contiguous() : at::Tensor();
  auto delta = at::empty(h.sizes(), h.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "dfa_project_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* dhp = dh.data_ptr<acc_t>();
    const scalar_t* hp = hc.data_ptr<scalar_t>();
    const scalar_t* app = ac.defined() ? ac.data_ptr<scalar_t>() : nullptr;
    scalar_t* op = delta.data_ptr<scalar_t>();
    const acc_t slope = static_cast<acc_t>(negative_slope);
    const acc_t cosc = static_cast<acc_t>(cos);
    const acc_t floor = static_cast<acc_t>(kCosNormEps);
    cpu::with_act(act, [&](auto A) {
      at::parallel_for(0, p, cpu::row_grain(d * hw), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const acc_t* dhi = dhp + i * d;
          const scalar_t* hi = hp + i * d * hw;
          scalar_t* oi = op + i * d * hw;
          if (app == nullptr && hw == 1) {
            for (int64_t c = 0; c < d; ++c) {
              const acc_t hv = static_cast<acc_t>(hi[c]);
              oi[c] = static_cast<scalar_t>(dhi[c] * act_grad_from_output(hv, A.value, slope));
            }
            continue;
          }
          if (app == nullptr) {
            for (int64_t c = 0; c < d; ++c) {
              const acc_t g = dhi[c];
              for (int64_t q = 0; q < hw; ++q) {
                const acc_t hv = static_cast<acc_t>(hi[c * hw + q]);
                oi[c * hw + q] = static_cast<scalar_t>(g * act_grad_from_output(hv, A.value, slope));
              }
            }
            continue;
          }
          // cos · ∇_a [1 − cos(a, −δh)] / p = alpha·δh + beta·a (DESIGN §6)
          const scalar_t* ai = app + i * d * hw;
          acc_t na2 = 0, ng2 = 0, dot = 0;
          for (int64_t c = 0; c < d; ++c) {
            const acc_t g = dhi[c];
            acc_t asum = 0;
            for (int64_t q = 0; q < hw; ++q) {
              const acc_t av = static_cast<acc_t>(ai[c * hw + q]);
              na2 += av * av;
              asum += av;
            }
            ng2 += g * g * static_cast<acc_t>(hw);
            dot -= asum * g;
          }
          const acc_t na = std::max(std::sqrt(na2), floor);
          const acc_t ng = std::max(std::sqrt(ng2), floor);
          const acc_t alpha = cosc / (static_cast<acc_t>(p) * na * ng);
          const acc_t beta = cosc * dot / (static_cast<acc_t>(p) * na * na * na * ng);
          for (int64_t c = 0; c < d; ++c) {
            const acc_t g = dhi[c];
            for (int64_t q = 0; q < hw; ++q) {
              const int64_t idx = c * hw + q;
              const acc_t hv = static_cast<acc_t>(hi[idx]);
              const acc_t av = static_cast<acc_t>(ai[idx]);
              oi[idx] = static_cast<scalar_t>(g * act_grad_from_output(hv, A.value, slope) +
                                              alpha * g + beta * av);
            }
          }
        }
      });
    });
  });
  return delta;
}

TORCH_LIBRARY_IMPL(ssa_kernels, CPU, m) {
  m.impl("dfa_project_native", TORCH_FN(dfa_project_cpu));
}

}  // namespace ssa
