// CUDA DFA projection (DESIGN §5) and the cosine term of DESIGN §6:
//
//   eq = (e Q) ⊙ σ   (p×k)        δh = eq Pᵀ   (p×d)        delta = δh ⊙ f'(h)
//
// with f' read from h, δh shared by every position of a spatial h (HW = numel/(p·d)),
// and, when cos != 0, per row i (flattened over d·HW, δh broadcast):
//
//   delta_i += alpha_i·δh_i + beta_i·a_i,   na = max(‖a_i‖, 1e-12),
//   ng = max(sqrt(HW·Σ_c δh_ic²), 1e-12),   dot = −Σ a_i·δh_i,
//   alpha = cos/(p·na·ng),   beta = cos·dot/(p·na³·ng).
//
// eq is tiny and comes from cuBLAS. 2-D h without the cosine term: one fused kernel
// makes delta tiles from eq and P with the mask in its epilogue, so δh is never stored.
// Otherwise δh (p×d) is formed first, then either an elementwise broadcast kernel or,
// with the cosine term, one block per row that reduces the row statistics and writes
// the row.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "cuda/cuda_common.cuh"

namespace ssa {
namespace {

using cuda::kSide;
using cuda::kThreads;

constexpr int kBM = 64;  // rows (samples) per tile
constexpr int kBN = 64;  // columns (features d) per tile
constexpr int kBK = 16;  // chunk of the feedback width k

// delta[i][c] = (Σ_l eq[i][l] P[c][l]) · f'(h[i][c]). Grid: x = row tiles, y = column tiles.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    dfa_project_mask_kernel(const acc_t* __restrict__ eq, const scalar_t* __restrict__ P,
                            const scalar_t* __restrict__ h, scalar_t* __restrict__ out,
                            int64_t p, int64_t d, int64_t k, Act act, acc_t slope) {
  constexpr int TM = kBM / kSide, TN = kBN / kSide;
  constexpr int LDM = kBM + 1, LDN = kBN + 1;
  __shared__ acc_t As[kBK * LDM];
  __shared__ acc_t Bs[kBK * LDN];

  const int ty = cuda::tile_ty(), tx = cuda::tile_tx();
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * kBN;

  acc_t acc[TM][TN] = {};
  for (int64_t k0 = 0; k0 < k; k0 += kBK) {
    cuda::stage_nk<kBK, kBM>(As, LDM, eq, k, k0, k, row0, p);
    cuda::stage_nk<kBK, kBN>(Bs, LDN, P, k, k0, k, col0, d);
    __syncthreads();
    cuda::mma_tile<TM, TN, kBK>(acc, As, LDM, Bs, LDN);
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < TM; ++i) {
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int64_t grow = row0 + ty + kSide * i, gcol = col0 + tx + kSide * j;
      if (grow >= p || gcol >= d) continue;
      const int64_t idx = grow * d + gcol;
      const acc_t hv = static_cast<acc_t>(h[idx]);
      out[idx] = static_cast<scalar_t>(acc[i][j] * act_grad_from_output<acc_t>(hv, act, slope));
    }
  }
}

// out[idx] = δh[idx / HW] · f'(h[idx]) over the contiguous (p, d, HW) layout.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    dfa_broadcast_mask_kernel(const acc_t* __restrict__ dh, const scalar_t* __restrict__ h,
                              scalar_t* __restrict__ out, int64_t total, int64_t hw, Act act,
                              acc_t slope) {
  for (int64_t idx = cuda::grid_stride_begin(); idx < total; idx += cuda::grid_stride_step()) {
    const acc_t hv = static_cast<acc_t>(h[idx]);
    out[idx] = static_cast<scalar_t>(dh[idx / hw] * act_grad_from_output<acc_t>(hv, act, slope));
  }
}

// One block per row i: reduce ‖a_i‖², Σ_c δh_ic², a_i·δh_i, then write
// delta_i = δh_i ⊙ f'(h_i) + alpha_i·δh_i + beta_i·a_i.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    dfa_cos_row_kernel(const acc_t* __restrict__ dh, const scalar_t* __restrict__ h,
                       const scalar_t* __restrict__ a, scalar_t* __restrict__ out, int64_t p,
                       int64_t d, int64_t hw, Act act, acc_t slope, acc_t cosc) {
  __shared__ acc_t red[cuda::kWarps];
  const int64_t i = blockIdx.x;
  const int64_t len = d * hw;
  const acc_t* dhi = dh + i * d;
  const scalar_t* hi = h + i * len;
  const scalar_t* ai = a + i * len;
  scalar_t* oi = out + i * len;

  acc_t na2 = 0, ng2 = 0, dot = 0;
  for (int64_t idx = threadIdx.x; idx < len; idx += kThreads) {
    const acc_t av = static_cast<acc_t>(ai[idx]);
    na2 += av * av;
    dot -= av * dhi[idx / hw];
  }
  for (int64_t c = threadIdx.x; c < d; c += kThreads) ng2 += dhi[c] * dhi[c];
  na2 = cuda::block_sum(na2, red);
  ng2 = cuda::block_sum(ng2, red);
  dot = cuda::block_sum(dot, red);

  const acc_t floor = static_cast<acc_t>(kCosNormEps);
  const acc_t rna = ::sqrt(na2), rng = ::sqrt(ng2 * static_cast<acc_t>(hw));
  const acc_t na = rna < floor ? floor : rna;  // std::max semantics: NaN propagates
  const acc_t ng = rng < floor ? floor : rng;
  const acc_t pn = static_cast<acc_t>(p);
  const acc_t alpha = cosc / (pn * na * ng);
  const acc_t beta = cosc * dot / (pn * na * na * na * ng);
  for (int64_t idx = threadIdx.x; idx < len; idx += kThreads) {
    const acc_t g = dhi[idx / hw];
    const acc_t hv = static_cast<acc_t>(hi[idx]);
    const acc_t av = static_cast<acc_t>(ai[idx]);
    oi[idx] = static_cast<scalar_t>(g * act_grad_from_output<acc_t>(hv, act, slope) + alpha * g +
                                    beta * av);
  }
}

}  // namespace

at::Tensor dfa_project_cuda(const at::Tensor& e, const at::Tensor& P, const at::Tensor& sigma,
                            const at::Tensor& Q, const at::Tensor& h,
                            const std::optional<at::Tensor>& a, c10::string_view activation,
                            double negative_slope, double cos) {
  check_dfa_project(e, P, sigma, Q, h, a, cos);
  const Act act = parse_activation(activation);
  const c10::cuda::CUDAGuard guard(h.device());
  const auto acc = acc_type(h.scalar_type());
  const int64_t p = h.size(0), d = h.size(1), k = P.size(1);
  auto delta = at::empty(h.sizes(), h.options());  // contiguous
  if (delta.numel() == 0) return delta;
  const int64_t hw = h.numel() / (p * d);
  auto eq = at::mm(e.to(acc), Q.to(acc)).mul_(sigma.to(acc));  // p×k, contiguous
  auto hc = h.contiguous();
  auto stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "dfa_project_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t slope = static_cast<acc_t>(negative_slope);
    if (hw == 1 && cos == 0.0) {
      auto Pc = P.contiguous();
      const dim3 grid(static_cast<unsigned>(cuda::ceil_div(p, kBM)),
                      static_cast<unsigned>(cuda::ceil_div(d, kBN)));
      TORCH_CHECK(grid.y <= 65535, "ssa_kernels.dfa_project: d = ", d, " is too large");
      SSA_LAUNCH(grid, kThreads, stream, dfa_project_mask_kernel<scalar_t, acc_t>)(
          eq.data_ptr<acc_t>(), Pc.data_ptr<scalar_t>(), hc.data_ptr<scalar_t>(),
          delta.data_ptr<scalar_t>(), p, d, k, act, slope);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    auto dh = at::mm(eq, P.to(acc).t());  // p×d, contiguous
    if (cos == 0.0) {
      const int64_t total = h.numel();
      SSA_LAUNCH(cuda::elementwise_blocks(total), kThreads, stream, dfa_broadcast_mask_kernel<scalar_t, acc_t>)(
              dh.data_ptr<acc_t>(), hc.data_ptr<scalar_t>(), delta.data_ptr<scalar_t>(), total,
              hw, act, slope);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    auto ac = a->contiguous();
    SSA_LAUNCH(static_cast<unsigned>(p), kThreads, stream, dfa_cos_row_kernel<scalar_t, acc_t>)(
        dh.data_ptr<acc_t>(), hc.data_ptr<scalar_t>(), ac.data_ptr<scalar_t>(),
        delta.data_ptr<scalar_t>(), p, d, hw, act, slope, static_cast<acc_t>(cos));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return delta;
}

#ifndef SSA_CUDA_EMULATION
TORCH_LIBRARY_IMPL(ssa_kernels, CUDA, m) {
  m.impl("dfa_project_native", TORCH_FN(dfa_project_cuda));
}
#endif

}  // namespace ssa
