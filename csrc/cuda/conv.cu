// CUDA registration of the low-rank convolution ops (DESIGN §4): the ATen frame of
// csrc/conv.cpp (cuDNN convolutions) with the CUDA epilogue of the linear factor
// gradients (factor_epilogue_cuda, the split-K finishing kernel of svd_factor_grads.cu).
#include <torch/library.h>

#include "cuda/cuda_common.cuh"

namespace ssa {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> svd_conv_factor_grads_cuda(
    const at::Tensor& x, const at::Tensor& t, const at::Tensor& delta, const at::Tensor& U,
    const at::Tensor& s, const at::Tensor& V, at::IntArrayRef kernel_size,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    const std::optional<at::Tensor>& BU, const std::optional<at::Tensor>& BS,
    const std::optional<at::Tensor>& BV, double ce, double align, double ortho, double hoyer,
    double hoyer_eps, c10::string_view scaling, c10::string_view projection, double eps) {
  const c10::cuda::CUDAGuard guard(x.device());
  return svd_conv_factor_grads_frame(x, t, delta, U, s, V, kernel_size, stride, padding, dilation,
                                     BU, BS, BV, ce, align, ortho, hoyer, hoyer_eps, scaling,
                                     projection, eps, factor_epilogue_cuda);
}

#ifndef SSA_CUDA_EMULATION
TORCH_LIBRARY_IMPL(ssa_kernels, CUDA, m) {
  m.impl("lowrank_conv2d_native", TORCH_FN(lowrank_conv2d_native));
  m.impl("svd_conv_factor_grads_native", TORCH_FN(svd_conv_factor_grads_cuda));
}
#endif

}  // namespace ssa
