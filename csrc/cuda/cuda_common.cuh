// Building blocks shared by the CUDA kernels of ssa_kernels (DESIGN §3, §5, §6).
//
// Every tiled kernel here runs 256 threads seen as a 16 × 16 grid (ty, tx). A block
// tile of an output C (rows × cols) is computed as a sum over a reduction index k,
// staged through shared memory in chunks of BK:
//
//   As[kk][row] (BK × rows)  and  Bs[kk][col] (BK × cols),  both "K-major",
//   C[row][col] += Σ_kk As[kk][row] · Bs[kk][col].
//
// Thread (ty, tx) owns rows ty + 16·i and columns tx + 16·j of the tile (i < TM,
// j < TN): a warp then writes 16 consecutive columns of two rows (coalesced), and its
// shared-memory reads are either broadcasts (As) or 16 consecutive words (Bs).
// The two staging helpers fill such K-major tiles from a row-major matrix whose rows
// are either the k index (stage_kn) or the row/column index (stage_nk, a transpose),
// converting to the accumulation type and writing zeros outside the matrix, so the
// inner product never needs a bounds check.
//
// SSA_CUDA_EMULATION: the same sources compile with a host compiler against the CPU
// stand-ins of tests/cuda_emulation/cuda_emulation.h (blocks run as CPU threads), so the
// kernels' index arithmetic, masks and barriers are tested on machines without a GPU.
// Kernels are therefore launched through SSA_LAUNCH(grid, block, stream, kernel)(args...).
#pragma once

#ifdef SSA_CUDA_EMULATION
#include "cuda_emulation.h"
#define SSA_LAUNCH(grid, block, stream, ...) ::emu::launcher(grid, block, &__VA_ARGS__)
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#define SSA_LAUNCH(grid, block, stream, ...) __VA_ARGS__<<<grid, block, 0, stream>>>
#endif

#include <algorithm>
#include <cstdint>

#include "ssa_kernels.h"

namespace ssa {
namespace cuda {

constexpr int kSide = 16;               // thread grid is kSide × kSide
constexpr int kThreads = kSide * kSide;  // threads of every kernel in this library
constexpr int kWarps = kThreads / 32;
constexpr int kMaxStaticSmem = 48 * 1024;  // static shared memory limit per block

C10_HOST_DEVICE inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int64_t num_sms() {
  return at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
}

// Blocks of a grid-stride elementwise launch over `total` (> 0) elements: enough to
// fill the GPU, never more than the elements need.
inline unsigned elementwise_blocks(int64_t total) {
  return static_cast<unsigned>(std::min<int64_t>(ceil_div(total, kThreads), num_sms() * 16));
}

__device__ __forceinline__ int tile_ty() { return static_cast<int>(threadIdx.x) / kSide; }
__device__ __forceinline__ int tile_tx() { return static_cast<int>(threadIdx.x) % kSide; }

__device__ __forceinline__ int64_t grid_stride_begin() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t grid_stride_step() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}

// dst[kk·ld + j] = src[(k0 + kk)·lds + j0 + j] for kk < BK, j < span (<= SPAN); zero where
// k0 + kk >= K or j0 + j >= N. src is a row-major K × N matrix with row stride lds.
// Consecutive threads take consecutive j: coalesced reads along the rows of src.
template <int BK, int SPAN, typename acc_t, typename T>
__device__ __forceinline__ void stage_kn(acc_t* dst, int ld, const T* __restrict__ src,
                                         int64_t lds, int64_t k0, int64_t K, int64_t j0,
                                         int64_t N, int span = SPAN) {
  for (int e = threadIdx.x; e < BK * SPAN; e += kThreads) {
    const int kk = e / SPAN, j = e % SPAN;
    if (j >= span) continue;
    const int64_t gk = k0 + kk, gj = j0 + j;
    dst[kk * ld + j] = (gk < K && gj < N) ? static_cast<acc_t>(src[gk * lds + gj]) : acc_t(0);
  }
}

// dst[kk·ld + j] = src[(j0 + j)·lds + k0 + kk] for kk < BK, j < SPAN; zero where
// k0 + kk >= K or j0 + j >= N. src is a row-major N × K matrix (k along its rows), so
// consecutive threads take consecutive kk: the reads stay along the rows of src.
template <int BK, int SPAN, typename acc_t, typename T>
__device__ __forceinline__ void stage_nk(acc_t* dst, int ld, const T* __restrict__ src,
                                         int64_t lds, int64_t k0, int64_t K, int64_t j0,
                                         int64_t N) {
  for (int e = threadIdx.x; e < BK * SPAN; e += kThreads) {
    const int j = e / BK, kk = e % BK;
    const int64_t gk = k0 + kk, gj = j0 + j;
    dst[kk * ld + j] = (gk < K && gj < N) ? static_cast<acc_t>(src[gj * lds + gk]) : acc_t(0);
  }
}

// acc[i][j] += Σ_{kk < BK} As[kk·lda + ty + 16i] · Bs[kk·ldb + tx + 16j] for j < tn_active
// (column groups at or past tn_active are neither read nor touched).
template <int TM, int TN, int BK, typename acc_t>
__device__ __forceinline__ void mma_tile(acc_t (&acc)[TM][TN], const acc_t* As, int lda,
                                         const acc_t* Bs, int ldb, int tn_active = TN) {
  const int ty = tile_ty(), tx = tile_tx();
#pragma unroll
  for (int kk = 0; kk < BK; ++kk) {
    acc_t a[TM], b[TN];
#pragma unroll
    for (int i = 0; i < TM; ++i) a[i] = As[kk * lda + ty + kSide * i];
#pragma unroll
    for (int j = 0; j < TN; ++j) b[j] = j < tn_active ? Bs[kk * ldb + tx + kSide * j] : acc_t(0);
#pragma unroll
    for (int i = 0; i < TM; ++i) {
#pragma unroll
      for (int j = 0; j < TN; ++j) {
        if (j < tn_active) acc[i][j] += a[i] * b[j];
      }
    }
  }
}

// Sum of v over the block (kThreads threads, all of which must call it), returned to
// every thread. red holds kWarps values; the leading barrier lets consecutive calls
// reuse it.
template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t v, acc_t* red) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  __syncthreads();
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = v;
  __syncthreads();
  acc_t total = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += red[w];
  return total;
}

}  // namespace cuda
}  // namespace ssa
