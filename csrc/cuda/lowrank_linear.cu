// CUDA low-rank forward (DESIGN §3):
//
//   t = x V  (p×r, accumulation dtype, returned)      a = (t ⊙ s) Uᵀ + b      h = f(a)
//
// r <= 128: one fused kernel. A block owns BM rows of x; phase 1 computes their t over
// the whole of n and keeps (t ⊙ s) in shared memory, phase 2 sweeps the columns of h
// in tiles of 64, so x is read once, t is written once and a never leaves the chip.
// r > 128: t and a from two cuBLAS products in the accumulation dtype, then one
// elementwise kernel for bias + activation + cast.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "cuda/cuda_common.cuh"

namespace ssa {
namespace {

using cuda::kSide;
using cuda::kThreads;

constexpr int kRankMax = 128;  // largest r whose t tile stays in shared memory
constexpr int kBN = 64;        // columns of h per phase-2 tile

// Rows of x per block and reduction chunk, sized so that the shared memory below stays
// within 48 KB for the accumulation type.
template <typename acc_t>
struct FusedTile;
template <>
struct FusedTile<float> {
  static constexpr int BM = 64, BK = 16;
};
template <>
struct FusedTile<double> {
  static constexpr int BM = 32, BK = 8;
};

template <typename acc_t>
constexpr int fused_smem_bytes() {
  constexpr int BM = FusedTile<acc_t>::BM, BK = FusedTile<acc_t>::BK;
  return static_cast<int>(sizeof(acc_t)) * (kRankMax * (BM + 1) + BK * (BM + 1) + BK * kRankMax);
}
static_assert(fused_smem_bytes<float>() <= cuda::kMaxStaticSmem, "fused tile too large (fp32)");
static_assert(fused_smem_bytes<double>() <= cuda::kMaxStaticSmem, "fused tile too large (fp64)");

// Grid: x = row blocks of BM rows, y = column splits (each split recomputes t for its
// rows and takes every gridDim.y-th 64-column tile of h; only split 0 writes t).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    lowrank_fused_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ U,
                         const scalar_t* __restrict__ s, const scalar_t* __restrict__ V,
                         const scalar_t* __restrict__ bias, scalar_t* __restrict__ h,
                         acc_t* __restrict__ t, int64_t p, int64_t n, int64_t m, int r, Act act,
                         acc_t slope) {
  constexpr int BM = FusedTile<acc_t>::BM, BK = FusedTile<acc_t>::BK;
  constexpr int TM = BM / kSide;         // rows per thread
  constexpr int TN1 = kRankMax / kSide;  // t columns per thread (phase 1)
  constexpr int TN2 = kBN / kSide;       // h columns per thread (phase 2)
  constexpr int LDM = BM + 1;            // +1: transposed stores hit distinct banks
  constexpr int LDN = kBN + 1;
  static_assert(BK * LDN <= BK * kRankMax, "U tile must fit the V tile's buffer");

  __shared__ acc_t tsT[kRankMax * LDM];  // (t ⊙ s)ᵀ of the block's rows: t kept on chip
  __shared__ acc_t xs[BK * LDM];         // x chunk, K-major
  __shared__ acc_t ws[BK * kRankMax];    // V chunk in phase 1, U chunk in phase 2

  const int ty = cuda::tile_ty(), tx = cuda::tile_tx();
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int jn = static_cast<int>(cuda::ceil_div(r, kSide));  // live t column groups

  // Phase 1: t[row0 : row0 + BM, :r] = x[rows, :] V, looping over n.
  acc_t tacc[TM][TN1] = {};
  for (int64_t k0 = 0; k0 < n; k0 += BK) {
    cuda::stage_nk<BK, BM>(xs, LDM, x, n, k0, n, row0, p);
    cuda::stage_kn<BK, kRankMax>(ws, kRankMax, V, r, k0, n, 0, r, jn * kSide);
    __syncthreads();
    cuda::mma_tile<TM, TN1, BK>(tacc, xs, LDM, ws, kRankMax, jn);
    __syncthreads();
  }

  // Columns r <= col < 16·jn are stored as zeros: phase 2 reads t in chunks of BK (which
  // divides 16), up to 16·jn.
  const bool write_t = blockIdx.y == 0;
#pragma unroll
  for (int i = 0; i < TM; ++i) {
#pragma unroll
    for (int j = 0; j < TN1; ++j) {
      if (j >= jn) continue;
      const int row = ty + kSide * i, col = tx + kSide * j;
      const int64_t grow = row0 + row;
      if (write_t && grow < p && col < r) t[grow * r + col] = tacc[i][j];
      tsT[col * LDM + row] = col < r ? tacc[i][j] * static_cast<acc_t>(s[col]) : acc_t(0);
    }
  }
  __syncthreads();

  // Phase 2: h[rows, c0 : c0 + 64] = f((t ⊙ s) U[c0 : c0 + 64, :]ᵀ + b).
  for (int64_t c0 = static_cast<int64_t>(blockIdx.y) * kBN; c0 < m;
       c0 += static_cast<int64_t>(gridDim.y) * kBN) {
    acc_t acc[TM][TN2] = {};
    for (int l0 = 0; l0 < r; l0 += BK) {
      cuda::stage_nk<BK, kBN>(ws, LDN, U, r, l0, r, c0, m);
      __syncthreads();
      cuda::mma_tile<TM, TN2, BK>(acc, tsT + l0 * LDM, LDM, ws, LDN);
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < TM; ++i) {
#pragma unroll
      for (int j = 0; j < TN2; ++j) {
        const int64_t grow = row0 + ty + kSide * i, gcol = c0 + tx + kSide * j;
        if (grow >= p || gcol >= m) continue;
        acc_t v = acc[i][j];
        if (bias != nullptr) v += static_cast<acc_t>(bias[gcol]);
        h[grow * m + gcol] = static_cast<scalar_t>(act_forward<acc_t>(v, act, slope));
      }
    }
  }
}

// h = f(a + b) for a (p×m, accumulation dtype), cast to h's dtype.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    bias_act_kernel(const acc_t* __restrict__ a, const scalar_t* __restrict__ bias,
                    scalar_t* __restrict__ h, int64_t total, int64_t m, Act act, acc_t slope) {
  for (int64_t idx = cuda::grid_stride_begin(); idx < total; idx += cuda::grid_stride_step()) {
    acc_t v = a[idx];
    if (bias != nullptr) v += static_cast<acc_t>(bias[idx % m]);
    h[idx] = static_cast<scalar_t>(act_forward<acc_t>(v, act, slope));
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> lowrank_linear_cuda(const at::Tensor& x, const at::Tensor& U,
                                                       const at::Tensor& s, const at::Tensor& V,
                                                       const std::optional<at::Tensor>& bias,
                                                       c10::string_view activation,
                                                       double negative_slope) {
  check_lowrank_linear(x, U, s, V, bias);
  const Act act = parse_activation(activation);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto acc = acc_type(x.scalar_type());
  const int64_t p = x.size(0), n = x.size(1), m = U.size(0), r = U.size(1);
  auto h = at::empty({p, m}, x.options());
  if (p == 0) return {h, at::empty({p, r}, x.options().dtype(acc))};
  auto Uc = U.contiguous();
  auto bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  auto stream = at::cuda::getCurrentCUDAStream();

  if (r > kRankMax) {
    auto t = at::mm(x.to(acc), V.to(acc));
    auto a = at::mm(t * s.to(acc), Uc.to(acc).t());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                    "lowrank_linear_cuda_epilogue", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      SSA_LAUNCH(cuda::elementwise_blocks(p * m), kThreads, stream, bias_act_kernel<scalar_t, acc_t>)(
          a.data_ptr<acc_t>(), bc.defined() ? bc.data_ptr<scalar_t>() : nullptr,
          h.data_ptr<scalar_t>(), p * m, m, act, static_cast<acc_t>(negative_slope));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return {h, t};
  }

  auto t = at::empty({p, r}, x.options().dtype(acc));
  auto xc = x.contiguous(), sc = s.contiguous(), Vc = V.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lowrank_linear_cuda",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t row_blocks = cuda::ceil_div(p, FusedTile<acc_t>::BM);
    // Few row blocks leave SMs idle; splitting the columns of h helps, but every split
    // recomputes t (p·n·r), so split only while the h tiles (p·m·r) are the larger part.
    const int64_t want = cuda::ceil_div(2 * cuda::num_sms(), row_blocks);
    const int64_t msplit =
        std::max<int64_t>(1, std::min({want, cuda::ceil_div(m, kBN), m / n, int64_t{65535}}));
    const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(msplit));
    SSA_LAUNCH(grid, kThreads, stream, lowrank_fused_kernel<scalar_t, acc_t>)(
        xc.data_ptr<scalar_t>(), Uc.data_ptr<scalar_t>(), sc.data_ptr<scalar_t>(),
        Vc.data_ptr<scalar_t>(), bc.defined() ? bc.data_ptr<scalar_t>() : nullptr,
        h.data_ptr<scalar_t>(), t.data_ptr<acc_t>(), p, n, m, static_cast<int>(r), act,
        static_cast<acc_t>(negative_slope));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {h, t};
}

#ifndef SSA_CUDA_EMULATION
TORCH_LIBRARY_IMPL(ssa_kernels, CUDA, m) {
  m.impl("lowrank_linear_native", TORCH_FN(lowrank_linear_cuda));
}
#endif

}  // namespace ssa
