// CPU low-rank forward (DESIGN §3): t = x V and a = t (U diag(s))ᵀ through ATen/BLAS,
// bias + activation + cast fused in one parallel pass over the output rows.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/cpu_common.h"

namespace ssa {

std::tuple<at::Tensor, at::Tensor> lowrank_linear_cpu(const at::Tensor& x, const at::Tensor& U,
                                                      const at::Tensor& s, const at::Tensor& V,
                                                      const std::optional<at::Tensor>& bias,
                                                      c10::string_view activation,
                                                      double negative_slope) {
  check_lowrank_linear(x, U, s, V, bias);
  const Act act = parse_activation(activation);
  const auto acc = acc_type(x.scalar_type());
  const int64_t p = x.size(0), m = U.size(0);
  auto t = at::mm(x.to(acc), V.to(acc));                  // p×r, kept for the update
  auto a = at::mm(t, (U.to(acc) * s.to(acc)).t());        // p×m, contiguous
  auto h = x.scalar_type() == acc ? a : at::empty({p, m}, x.options());
  at::Tensor b = bias.has_value() ? bias->to(acc).contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lowrank_linear_cpu",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* ap = a.data_ptr<acc_t>();
    const acc_t* bp = b.defined() ? b.data_ptr<acc_t>() : nullptr;
    scalar_t* hp = h.data_ptr<scalar_t>();
    const acc_t slope = static_cast<acc_t>(negative_slope);
    cpu::with_act(act, [&](auto A) {
      at::parallel_for(0, p, cpu::row_grain(m), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const acc_t* ai = ap + i * m;
          scalar_t* hi = hp + i * m;
          if (bp != nullptr) {
            for (int64_t j = 0; j < m; ++j)
              hi[j] = static_cast<scalar_t>(act_forward<acc_t>(ai[j] + bp[j], A.value, slope));
          } else {
            for (int64_t j = 0; j < m; ++j)
              hi[j] = static_cast<scalar_t>(act_forward<acc_t>(ai[j], A.value, slope));
          }
        }
      });
    });
  });
  return {h, t};
}

TORCH_LIBRARY_IMPL(ssa_kernels, CPU, m) {
  m.impl("lowrank_linear_native", TORCH_FN(lowrank_linear_cpu));
}

}  // namespace ssa
