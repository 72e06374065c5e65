// CPU one-pass factor gradients (DESIGN §6). svd_factor_grads_frame() reads the batch for
// w = δU and wᵀt and builds the r×r cores; here the two big products δᵀt and xᵀw go
// through BLAS and each output row of gU/gV gets the whole epilogue (column scale,
// projection and ortho core through one small BLAS product Y·C, alignment targets, cast)
// in one parallel pass.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/cpu_common.h"

namespace ssa {
namespace {

// out = acc·diag(colscale) + Y·C + beta·B (B: first k columns), cast to out_dtype.
// Y·C (M×r by r×r) goes through BLAS; scale, sum, targets and cast are one row pass.
at::Tensor factor_epilogue(const at::Tensor& acc, const at::Tensor& colscale, const at::Tensor& Y,
                           const at::Tensor& C, double beta, const at::Tensor& B, int64_t k,
                           at::ScalarType out_dtype) {
  const int64_t M = acc.size(0), R = acc.size(1);
  auto accc = acc.contiguous();
  auto yc = at::mm(Y, C);  // M×r, contiguous
  auto out = out_dtype == acc.scalar_type() ? accc : at::empty({M, R}, acc.options().dtype(out_dtype));
  auto cs = colscale.contiguous();
  auto Bc = k > 0 ? B.contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "factor_epilogue_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* ap = accc.data_ptr<acc_t>();
    const acc_t* yp = yc.data_ptr<acc_t>();
    const acc_t* sp = cs.data_ptr<acc_t>();
    const acc_t* bp = k > 0 ? Bc.data_ptr<acc_t>() : nullptr;
    const acc_t bt = static_cast<acc_t>(beta);
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, M, cpu::row_grain(R), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const acc_t* ai = ap + i * R;
        const acc_t* yi = yp + i * R;
        const acc_t* bi = bp != nullptr ? bp + i * k : nullptr;
        scalar_t* oi = op + i * R;
        for (int64_t j = 0; j < R; ++j) {
          acc_t v = ai[j] * sp[j] + yi[j];
          if (j < k) v += bt * bi[j];
          oi[j] = static_cast<scalar_t>(v);
        }
      }
    });
  });
  return out;
}

}  // namespace

at::Tensor factor_epilogue_cpu(const at::Tensor& acc, const at::Tensor& Y, const at::Tensor& C,
                               const at::Tensor& Bk, const FactorCores& cores,
                               at::ScalarType out_dtype) {
  return factor_epilogue(acc, cores.colscale, Y, C, cores.beta, Bk, cores.k, out_dtype);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> svd_factor_grads_cpu(
    const at::Tensor& x, const at::Tensor& t, const at::Tensor& delta, const at::Tensor& U,
    const at::Tensor& s, const at::Tensor& V, const std::optional<at::Tensor>& BU,
    const std::optional<at::Tensor>& BS, const std::optional<at::Tensor>& BV, double ce,
    double align, double ortho, double hoyer, double hoyer_eps, c10::string_view scaling,
    c10::string_view projection, double eps) {
  return svd_factor_grads_frame(
      x, t, delta, U, s, V, BU, BS, BV, ce, align, ortho, hoyer, hoyer_eps, scaling, projection,
      eps, [](const at::Tensor& A, const at::Tensor& B, const at::Tensor& Y, const at::Tensor& C,
              const at::Tensor& Bk, const FactorCores& cores) {
        return factor_epilogue(at::mm(A.to(B.scalar_type()).t(), B), cores.colscale, Y, C,
                               cores.beta, Bk, cores.k, A.scalar_type());
      });
}

TORCH_LIBRARY_IMPL(ssa_kernels, CPU, m) {
  m.impl("svd_factor_grads_native", TORCH_FN(svd_factor_grads_cpu));
}

}  // namespace ssa
