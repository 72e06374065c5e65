// Helpers of the CPU kernels: compile-time activation dispatch and row grain.
#pragma once

#include <type_traits>

#include "ssa_kernels.h"

namespace ssa {
namespace cpu {

// Call f(std::integral_constant<Act, A>) so that the activation switch folds away
// inside the row loops and they vectorise.
template <typename F>
void with_act(Act act, F&& f) {
  switch (act) {
    case Act::Relu:
      f(std::integral_constant<Act, Act::Relu>{});
      break;
    case Act::LeakyRelu:
      f(std::integral_constant<Act, Act::LeakyRelu>{});
      break;
    case Act::Tanh:
      f(std::integral_constant<Act, Act::Tanh>{});
      break;
    case Act::Sigmoid:
      f(std::integral_constant<Act, Act::Sigmoid>{});
      break;
    default:
      f(std::integral_constant<Act, Act::None>{});
  }
}

// Rows per parallel task: about 32k elements, at least one row.
inline int64_t row_grain(int64_t row_len) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_len));
}

}  // namespace cpu
}  // namespace ssa
