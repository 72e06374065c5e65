// CUDA one-pass factor gradients (DESIGN §6):
//
//   w = δU (p×r)    wᵀt (r×r)    cores = factor_cores(...)   (r×r, ssa_kernels/_cores.py)
//   gU = (δᵀt) diag(colscale) + U·CU + beta·BU[:, :k]
//   gV = (xᵀw) diag(colscale) + V·CV + beta·BV[:, :k]
//   gs = cores.gs    gb = ce·colsum(δ)
//
// The small products (w, wᵀt) and the cores go through ATen/cuBLAS first; each of the
// two big skinny products Aᵀ·B (A = δ or x, p×M; B = t or w, p×r) is then written by
// one kernel that applies the whole epilogue to its output tile (scale, the U·CU
// product as a continuation of the same accumulation, targets, cast). When the M×r
// output tiles alone cannot fill the GPU the batch p is split (split-K): each split
// atomically adds its partial product into an fp32 (fp64) workspace and a finishing
// kernel applies the epilogue.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "cuda/cuda_common.cuh"

namespace ssa {
namespace {

using cuda::kSide;
using cuda::kThreads;

constexpr int kBM = 64;  // output rows (of U resp. V) per tile
constexpr int kBN = 64;  // output columns (rank) per tile
constexpr int kBK = 16;  // batch rows (split-K) / core rows per chunk
constexpr int kTM = kBM / kSide, kTN = kBN / kSide;
constexpr int kLDM = kBM + 1, kLDN = kBN + 1;
constexpr int kMinChunksPerSplit = 8;  // >= 128 batch rows per split, to amortise the atomics

// out = acc·diag(colscale) + Y·C + beta·B[:, :k] for an M×R output (all row-major,
// contiguous; B is M×k and null when k == 0).
template <typename scalar_t, typename acc_t>
struct FactorEpilogue {
  const acc_t* colscale;  // R
  const acc_t* Y;         // M×R (U or V in the accumulation dtype)
  const acc_t* C;         // R×R core
  const acc_t* B;         // M×k targets, or nullptr
  int64_t k;
  acc_t beta;
  scalar_t* out;          // M×R
  int64_t M, R;
};

// The epilogue's pointers for an M×R output `out` (Y: M×R, C: R×R, B: M×k or undefined).
template <typename scalar_t, typename acc_t>
FactorEpilogue<scalar_t, acc_t> make_epilogue(const at::Tensor& colscale, const at::Tensor& Y,
                                              const at::Tensor& C, const at::Tensor& B,
                                              const FactorCores& cores, at::Tensor& out) {
  return {colscale.data_ptr<acc_t>(),
          Y.data_ptr<acc_t>(),
          C.data_ptr<acc_t>(),
          B.defined() ? B.data_ptr<acc_t>() : nullptr,
          cores.k,
          static_cast<acc_t>(cores.beta),
          out.data_ptr<scalar_t>(),
          out.size(0),
          out.size(1)};
}

// Applies the epilogue to the block tile (row0, col0) held in acc. Every thread of the
// block must call it (it stages Y and C through As/Bs with barriers).
template <typename scalar_t, typename acc_t>
__device__ void factor_epilogue_tile(acc_t (&acc)[kTM][kTN], int64_t row0, int64_t col0,
                                     const FactorEpilogue<scalar_t, acc_t>& ep, acc_t* As,
                                     acc_t* Bs) {
  const int ty = cuda::tile_ty(), tx = cuda::tile_tx();
#pragma unroll
  for (int j = 0; j < kTN; ++j) {
    const int64_t gcol = col0 + tx + kSide * j;
    const acc_t scale = gcol < ep.R ? ep.colscale[gcol] : acc_t(0);
#pragma unroll
    for (int i = 0; i < kTM; ++i) acc[i][j] *= scale;
  }
  // acc += Y[rows, :] · C[:, cols], the reduction now running over the rank.
  for (int64_t q0 = 0; q0 < ep.R; q0 += kBK) {
    cuda::stage_nk<kBK, kBM>(As, kLDM, ep.Y, ep.R, q0, ep.R, row0, ep.M);
    cuda::stage_kn<kBK, kBN>(Bs, kLDN, ep.C, ep.R, q0, ep.R, col0, ep.R);
    __syncthreads();
    cuda::mma_tile<kTM, kTN, kBK>(acc, As, kLDM, Bs, kLDN);
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < kTM; ++i) {
#pragma unroll
    for (int j = 0; j < kTN; ++j) {
      const int64_t grow = row0 + ty + kSide * i, gcol = col0 + tx + kSide * j;
      if (grow >= ep.M || gcol >= ep.R) continue;
      acc_t v = acc[i][j];
      if (ep.B != nullptr && gcol < ep.k) v += ep.beta * ep.B[grow * ep.k + gcol];
      ep.out[grow * ep.R + gcol] = static_cast<scalar_t>(v);
    }
  }
}

// Aᵀ·B for A (p×M, input dtype) and B (p×R, accumulation dtype), over the batch rows
// [z·rows_per_split, (z + 1)·rows_per_split) of split z = blockIdx.z. Grid: x = row
// tiles of M, y = column tiles of R, z = splits. With ws == nullptr (one split) the
// epilogue is applied here; otherwise the partial product is added into ws (M×R).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    factor_product_kernel(const scalar_t* __restrict__ A, const acc_t* __restrict__ B, int64_t p,
                          int64_t rows_per_split, acc_t* __restrict__ ws,
                          FactorEpilogue<scalar_t, acc_t> ep) {
  __shared__ acc_t As[kBK * kLDM];
  __shared__ acc_t Bs[kBK * kLDN];
  const int ty = cuda::tile_ty(), tx = cuda::tile_tx();
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * kBN;
  const int64_t kbeg = static_cast<int64_t>(blockIdx.z) * rows_per_split;
  const int64_t kend = p < kbeg + rows_per_split ? p : kbeg + rows_per_split;

  acc_t acc[kTM][kTN] = {};
  for (int64_t k0 = kbeg; k0 < kend; k0 += kBK) {
    cuda::stage_kn<kBK, kBM>(As, kLDM, A, ep.M, k0, kend, row0, ep.M);
    cuda::stage_kn<kBK, kBN>(Bs, kLDN, B, ep.R, k0, kend, col0, ep.R);
    __syncthreads();
    cuda::mma_tile<kTM, kTN, kBK>(acc, As, kLDM, Bs, kLDN);
    __syncthreads();
  }
  if (ws == nullptr) {
    factor_epilogue_tile(acc, row0, col0, ep, As, Bs);
    return;
  }
#pragma unroll
  for (int i = 0; i < kTM; ++i) {
#pragma unroll
    for (int j = 0; j < kTN; ++j) {
      const int64_t grow = row0 + ty + kSide * i, gcol = col0 + tx + kSide * j;
      if (grow < ep.M && gcol < ep.R) atomicAdd(ws + grow * ep.R + gcol, acc[i][j]);
    }
  }
}

// The epilogue of a split-K product: acc = ws tile. Grid: x = row tiles, y = column tiles.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    factor_finish_kernel(const acc_t* __restrict__ ws, FactorEpilogue<scalar_t, acc_t> ep) {
  __shared__ acc_t As[kBK * kLDM];
  __shared__ acc_t Bs[kBK * kLDN];
  const int ty = cuda::tile_ty(), tx = cuda::tile_tx();
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * kBN;
  acc_t acc[kTM][kTN];
#pragma unroll
  for (int i = 0; i < kTM; ++i) {
#pragma unroll
    for (int j = 0; j < kTN; ++j) {
      const int64_t grow = row0 + ty + kSide * i, gcol = col0 + tx + kSide * j;
      acc[i][j] = (grow < ep.M && gcol < ep.R) ? ws[grow * ep.R + gcol] : acc_t(0);
    }
  }
  factor_epilogue_tile(acc, row0, col0, ep, As, Bs);
}

// Batch rows per split: one split (no workspace) when the output tiles fill the GPU
// (about two blocks per SM) or the batch is short; otherwise enough splits to fill it,
// each at least kMinChunksPerSplit chunks long.
int64_t rows_per_split(int64_t p, int64_t tiles) {
  const int64_t chunks = cuda::ceil_div(p, kBK);
  const int64_t target = 2 * cuda::num_sms();
  int64_t splits = 1;
  if (tiles < target) {
    splits = std::min(cuda::ceil_div(target, tiles), chunks / kMinChunksPerSplit);
    splits = std::max<int64_t>(1, splits);
  }
  return std::max<int64_t>(1, cuda::ceil_div(chunks, splits)) * kBK;
}

// One of gU, gV: out (M×R, dtype of A) = Aᵀ·B with the epilogue of `cores` (C, Bk).
at::Tensor factor_product(const at::Tensor& A, const at::Tensor& B, const at::Tensor& Y,
                          const FactorCores& cores, const at::Tensor& C, const at::Tensor& Bk) {
  const int64_t p = A.size(0), M = A.size(1), R = B.size(1);
  auto out = at::empty({M, R}, A.options());
  auto colscale = cores.colscale.contiguous(), Cc = C.contiguous();
  auto Bc = cores.k > 0 ? Bk.contiguous() : at::Tensor();
  const int64_t row_tiles = cuda::ceil_div(M, kBM), col_tiles = cuda::ceil_div(R, kBN);
  TORCH_CHECK(col_tiles <= 65535, "ssa_kernels.svd_factor_grads: rank ", R, " is too large");
  const int64_t rows = rows_per_split(p, row_tiles * col_tiles);
  const int64_t splits = std::max<int64_t>(1, cuda::ceil_div(p, rows));
  auto ws = splits > 1 ? at::zeros({M, R}, B.options()) : at::Tensor();
  auto stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A.scalar_type(), "svd_factor_grads_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto ep = make_epilogue<scalar_t, acc_t>(colscale, Y, Cc, Bc, cores, out);
    const dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(col_tiles),
                    static_cast<unsigned>(splits));
    SSA_LAUNCH(grid, kThreads, stream, factor_product_kernel<scalar_t, acc_t>)(
        A.data_ptr<scalar_t>(), B.data_ptr<acc_t>(), p, rows,
        ws.defined() ? ws.data_ptr<acc_t>() : nullptr, ep);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (ws.defined()) {
      const dim3 finish_grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(col_tiles));
      SSA_LAUNCH(finish_grid, kThreads, stream, factor_finish_kernel<scalar_t, acc_t>)(
          ws.data_ptr<acc_t>(), ep);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return out;
}

}  // namespace

// The epilogue alone on a product computed elsewhere (the convolutions' weight-gradients):
// the split-K finishing kernel with acc as its workspace.
at::Tensor factor_epilogue_cuda(const at::Tensor& acc, const at::Tensor& Y, const at::Tensor& C,
                                const at::Tensor& Bk, const FactorCores& cores,
                                at::ScalarType out_dtype) {
  const c10::cuda::CUDAGuard guard(acc.device());
  const int64_t M = acc.size(0), R = acc.size(1);
  auto ws = acc.contiguous();
  auto out = at::empty({M, R}, acc.options().dtype(out_dtype));
  auto colscale = cores.colscale.contiguous(), Yc = Y.contiguous(), Cc = C.contiguous();
  auto Bc = cores.k > 0 ? Bk.contiguous() : at::Tensor();
  const int64_t row_tiles = cuda::ceil_div(M, kBM), col_tiles = cuda::ceil_div(R, kBN);
  TORCH_CHECK(col_tiles <= 65535, "ssa_kernels: rank ", R, " is too large");
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "factor_epilogue_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    TORCH_CHECK(ws.scalar_type() == c10::CppTypeToScalarType<acc_t>::value,
                "factor_epilogue_cuda: acc must be in the accumulation dtype");
    const auto ep = make_epilogue<scalar_t, acc_t>(colscale, Yc, Cc, Bc, cores, out);
    const dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(col_tiles));
    SSA_LAUNCH(grid, kThreads, stream, factor_finish_kernel<scalar_t, acc_t>)(
        ws.data_ptr<acc_t>(), ep);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> svd_factor_grads_cuda(
    const at::Tensor& x, const at::Tensor& t, const at::Tensor& delta, const at::Tensor& U,
    const at::Tensor& s, const at::Tensor& V, const std::optional<at::Tensor>& BU,
    const std::optional<at::Tensor>& BS, const std::optional<at::Tensor>& BV, double ce,
    double align, double ortho, double hoyer, double hoyer_eps, c10::string_view scaling,
    c10::string_view projection, double eps) {
  const c10::cuda::CUDAGuard guard(x.device());
  return svd_factor_grads_frame(
      x, t, delta, U, s, V, BU, BS, BV, ce, align, ortho, hoyer, hoyer_eps, scaling, projection,
      eps, [](const at::Tensor& A, const at::Tensor& B, const at::Tensor& Y, const at::Tensor& C,
              const at::Tensor& Bk, const FactorCores& cores) {
        return factor_product(A, B, Y, cores, C, Bk);
      });
}

#ifndef SSA_CUDA_EMULATION
TORCH_LIBRARY_IMPL(ssa_kernels, CUDA, m) {
  m.impl("svd_factor_grads_native", TORCH_FN(svd_factor_grads_cuda));
}
#endif

}  // namespace ssa
