// Shared declarations of the ssa_kernels C++/CUDA implementations.
//
// The op schemas are defined in Python (ssa_kernels/_ops.py); this library only
// registers implementations with TORCH_LIBRARY_IMPL(ssa_kernels, CPU|CUDA, m).
// Formulas: DESIGN.md §3 (forward), §5 (DFA projection), §6 (factor gradients).
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <functional>
#include <optional>
#include <tuple>

namespace ssa {

// ----------------------------------------------------------------- activations
enum class Act : int { None = 0, Relu = 1, LeakyRelu = 2, Tanh = 3, Sigmoid = 4 };

Act parse_activation(c10::string_view name);

// h = f(a), as torch.nn.functional gives it, ±inf and NaN included: relu(−inf) = 0,
// leaky_relu(−inf) = −inf·slope, tanh(±inf) = ±1, sigmoid(±inf) = 1 / 0, NaN propagates.
// relu/leaky_relu are selects, not products with a 0/1 mask (−inf·0 would be NaN): the
// CPU loops still if-convert them to blends (vectorised, no mispredicted branches).
template <typename T>
C10_HOST_DEVICE inline T act_forward(T a, Act act, T slope) {
  switch (act) {
    case Act::Relu:
      return a <= T(0) ? T(0) : a;  // NaN <= 0 is false: NaN passes, as in torch.relu
    case Act::LeakyRelu:
      return a > T(0) ? a : a * slope;
    case Act::Tanh:
      return ::tanh(a);
    case Act::Sigmoid:
      return T(1) / (T(1) + ::exp(-a));
    default:
      return a;
  }
}

// f'(a) read from h = f(a) (needs slope >= 0 for leaky_relu); at a = ±inf autograd's values:
// relu 0 / 1, leaky_relu slope / 1, tanh and sigmoid 0 (h = ±1, resp. 0 / 1).
template <typename T>
C10_HOST_DEVICE inline T act_grad_from_output(T h, Act act, T slope) {
  switch (act) {
    case Act::Relu:
      return h > T(0) ? T(1) : T(0);
    case Act::LeakyRelu:
      return h > T(0) ? T(1) : slope;
    case Act::Tanh:
      return T(1) - h * h;
    case Act::Sigmoid:
      return h * (T(1) - h);
    default:
      return T(1);
  }
}

// Norm floor of the cosine term (reference.COS_NORM_EPS).
constexpr double kCosNormEps = 1e-12;

// ---------------------------------------------------------- factor-grad options
enum class Projection : int { Stiefel = 0, Paper = 1, None = 2 };
enum class Scaling : int { Euclidean = 0, Inverse = 1 };

Projection parse_projection(c10::string_view name);
Scaling parse_scaling(c10::string_view name);

// The r×r cores of DESIGN §6 (see ssa_kernels/_cores.py for the derivation):
//   gU = (δᵀt) diag(colscale) + U·CU + beta·BU     gV = (xᵀw) diag(colscale) + V·CV + beta·BV
// BU/BV hold the k aligned columns (undefined when k == 0). All tensors in wt's dtype.
struct FactorCores {
  at::Tensor colscale, CU, CV, gs, BU, BV;
  double beta = 0.0;
  int64_t k = 0;
};

FactorCores factor_cores(const at::Tensor& U, const at::Tensor& s, const at::Tensor& V,
                         const at::Tensor& wt, const std::optional<at::Tensor>& BU,
                         const std::optional<at::Tensor>& BS,
                         const std::optional<at::Tensor>& BV, double ce, double align,
                         double ortho, double hoyer, double hoyer_eps, Scaling scaling,
                         Projection projection, double eps);

// One of the two big products of the factor gradients with its whole epilogue:
//   out (M×r, A's dtype) = Aᵀ B · diag(cores.colscale) + Y·C + cores.beta·Bk[:, :cores.k]
// with A (p×M, input dtype, contiguous) and B, Y, C, Bk in the accumulation dtype.
using FactorProduct = std::function<at::Tensor(const at::Tensor& A, const at::Tensor& B,
                                               const at::Tensor& Y, const at::Tensor& C,
                                               const at::Tensor& Bk, const FactorCores& cores)>;

// svd_factor_grads without its two big products (DESIGN §6), shared by the CPU and CUDA
// kernels: checks, w = δU and wᵀt (one pass over the batch), the r×r cores, gs and gb;
// gU = product(δ, t, U, C_U, B_U) and gV = product(x, w, V, C_V, B_V).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> svd_factor_grads_frame(
    const at::Tensor& x, const at::Tensor& t, const at::Tensor& delta, const at::Tensor& U,
    const at::Tensor& s, const at::Tensor& V, const std::optional<at::Tensor>& BU,
    const std::optional<at::Tensor>& BS, const std::optional<at::Tensor>& BV, double ce,
    double align, double ortho, double hoyer, double hoyer_eps, c10::string_view scaling,
    c10::string_view projection, double eps, const FactorProduct& product);

// The epilogue alone, for a product computed elsewhere (the convolution weight-gradients):
//   out (M×r, out_dtype) = acc·diag(cores.colscale) + Y·C + cores.beta·Bk[:, :cores.k]
// with acc, Y, C, Bk in the accumulation dtype. One per device (factor_epilogue_cpu/_cuda).
using FactorEpilogueFn = std::function<at::Tensor(const at::Tensor& acc, const at::Tensor& Y,
                                                  const at::Tensor& C, const at::Tensor& Bk,
                                                  const FactorCores& cores,
                                                  at::ScalarType out_dtype)>;

at::Tensor factor_epilogue_cpu(const at::Tensor& acc, const at::Tensor& Y, const at::Tensor& C,
                               const at::Tensor& Bk, const FactorCores& cores,
                               at::ScalarType out_dtype);

// ------------------------------------------------------------ convolutions (DESIGN §4)
// Kernel K (N×C×kh×kw) as K'[(n,w),(c,h)] = U diag(s) Vᵀ: U is (N·kw)×r, V is (C·kh)×r.
// padding = (top, bottom, left, right); asymmetric padding pre-pads the input.
struct ConvGeometry {
  int64_t kh, kw, sh, sw, pt, pb, pl, pr, dh, dw;
};

ConvGeometry parse_conv_geometry(const char* op, at::IntArrayRef kernel_size,
                                 at::IntArrayRef stride, at::IntArrayRef padding,
                                 at::IntArrayRef dilation);

void check_conv_factors(const char* op, const at::Tensor& x, const at::Tensor& U,
                        const at::Tensor& s, const at::Tensor& V, const ConvGeometry& g);

// Device-generic (ATen convolutions, cuDNN on a GPU): s is folded into the second kernel,
// bias into the second convolution, the activation applied in place.
std::tuple<at::Tensor, at::Tensor> lowrank_conv2d_native(
    const at::Tensor& x, const at::Tensor& U, const at::Tensor& s, const at::Tensor& V,
    const std::optional<at::Tensor>& bias, at::IntArrayRef kernel_size, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, c10::string_view activation,
    double negative_slope);

// The two weight-gradients by ATen convolution_backward, w·t summed over batch and
// positions for the r×r cores, then the linear path's cores (factor_cores) and epilogue.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> svd_conv_factor_grads_frame(
    const at::Tensor& x, const at::Tensor& t, const at::Tensor& delta, const at::Tensor& U,
    const at::Tensor& s, const at::Tensor& V, at::IntArrayRef kernel_size,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    const std::optional<at::Tensor>& BU, const std::optional<at::Tensor>& BS,
    const std::optional<at::Tensor>& BV, double ce, double align, double ortho, double hoyer,
    double hoyer_eps, c10::string_view scaling, c10::string_view projection, double eps,
    const FactorEpilogueFn& epilogue);

// Accumulation dtype: fp32 for fp16/bf16/fp32 inputs, fp64 for fp64.
inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// -------------------------------------------------------------- argument checks
// Shapes/dtypes/devices only (no host sync); the Python wrappers give the friendly
// messages, these guard direct torch.ops calls.
void check_lowrank_linear(const at::Tensor& x, const at::Tensor& U, const at::Tensor& s,
                          const at::Tensor& V, const std::optional<at::Tensor>& bias);
void check_dfa_project(const at::Tensor& e, const at::Tensor& P, const at::Tensor& sigma,
                       const at::Tensor& Q, const at::Tensor& h,
                       const std::optional<at::Tensor>& a, double cos);
// An optional bias beside x: 1-D, x's dtype and device, `size` entries (`what` names them).
void check_bias(const char* op, const std::optional<at::Tensor>& bias, const at::Tensor& x,
                int64_t size, const char* what);
// t and delta beside x (p×n or p×C×H×W): same rank and device, delta in x's dtype, t in x's
// or the accumulation dtype.
void check_batch_inputs(const char* op, const at::Tensor& x, const at::Tensor& t,
                        const at::Tensor& delta);
void check_targets(const char* op, const at::Tensor& U, const at::Tensor& V,
                   const std::optional<at::Tensor>& BU, const std::optional<at::Tensor>& BS,
                   const std::optional<at::Tensor>& BV, double align);
void check_svd_factor_grads(const at::Tensor& x, const at::Tensor& t, const at::Tensor& delta,
                            const at::Tensor& U, const at::Tensor& s, const at::Tensor& V,
                            const std::optional<at::Tensor>& BU,
                            const std::optional<at::Tensor>& BS,
                            const std::optional<at::Tensor>& BV, double align);

// ------------------------------------------------------------------ CPU kernels
std::tuple<at::Tensor, at::Tensor> lowrank_linear_cpu(const at::Tensor& x, const at::Tensor& U,
                                                      const at::Tensor& s, const at::Tensor& V,
                                                      const std::optional<at::Tensor>& bias,
                                                      c10::string_view activation,
                                                      double negative_slope);

at::Tensor dfa_project_cpu(const at::Tensor& e, const at::Tensor& P, const at::Tensor& sigma,
                           const at::Tensor& Q, const at::Tensor& h,
                           const std::optional<at::Tensor>& a, c10::string_view activation,
                           double negative_slope, double cos);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> svd_factor_grads_cpu(
    const at::Tensor& x, const at::Tensor& t, const at::Tensor& delta, const at::Tensor& U,
    const at::Tensor& s, const at::Tensor& V, const std::optional<at::Tensor>& BU,
    const std::optional<at::Tensor>& BS, const std::optional<at::Tensor>& BV, double ce,
    double align, double ortho, double hoyer, double hoyer_eps, c10::string_view scaling,
    c10::string_view projection, double eps);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> svd_conv_factor_grads_cpu(
    const at::Tensor& x, const at::Tensor& t, const at::Tensor& delta, const at::Tensor& U,
    const at::Tensor& s, const at::Tensor& V, at::IntArrayRef kernel_size,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    const std::optional<at::Tensor>& BU, const std::optional<at::Tensor>& BS,
    const std::optional<at::Tensor>& BV, double ce, double align, double ortho, double hoyer,
    double hoyer_eps, c10::string_view scaling, c10::string_view projection, double eps);

#ifdef SSA_WITH_CUDA
// ----------------------------------------------------------------- CUDA kernels
// Same signatures and semantics as the CPU kernels (csrc/cuda/*.cu).
std::tuple<at::Tensor, at::Tensor> lowrank_linear_cuda(const at::Tensor& x, const at::Tensor& U,
                                                       const at::Tensor& s, const at::Tensor& V,
                                                       const std::optional<at::Tensor>& bias,
                                                       c10::string_view activation,
                                                       double negative_slope);

at::Tensor dfa_project_cuda(const at::Tensor& e, const at::Tensor& P, const at::Tensor& sigma,
                            const at::Tensor& Q, const at::Tensor& h,
                            const std::optional<at::Tensor>& a, c10::string_view activation,
                            double negative_slope, double cos);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> svd_factor_grads_cuda(
    const at::Tensor& x, const at::Tensor& t, const at::Tensor& delta, const at::Tensor& U,
    const at::Tensor& s, const at::Tensor& V, const std::optional<at::Tensor>& BU,
    const std::optional<at::Tensor>& BS, const std::optional<at::Tensor>& BV, double ce,
    double align, double ortho, double hoyer, double hoyer_eps, c10::string_view scaling,
    c10::string_view projection, double eps);
at::Tensor factor_epilogue_cuda(const at::Tensor& acc, const at::Tensor& Y, const at::Tensor& C,
                                const at::Tensor& Bk, const FactorCores& cores,
                                at::ScalarType out_dtype);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> svd_conv_factor_grads_cuda(
    const at::Tensor& x, const at::Tensor& t, const at::Tensor& delta, const at::Tensor& U,
    const at::Tensor& s, const at::Tensor& V, at::IntArrayRef kernel_size,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    const std::optional<at::Tensor>& BU, const std::optional<at::Tensor>& BS,
    const std::optional<at::Tensor>& BV, double ce, double align, double ortho, double hoyer,
    double hoyer_eps, c10::string_view scaling, c10::string_view projection, double eps);
#endif  // SSA_WITH_CUDA

}  // namespace ssa
