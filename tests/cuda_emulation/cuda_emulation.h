// CPU stand-ins for the CUDA runtime, so that csrc/cuda/*.cu compile with a host compiler
// (-DSSA_CUDA_EMULATION) and run on CPU tensors: each block of a launch runs its threads
// as real std::threads, __syncthreads is a std::barrier, warp shuffles go through a
// block-shared buffer and atomicAdd takes a lock. Blocks run one after another.
//
// What this checks: index arithmetic, bounds masks, tails, the placement of barriers
// (a missing one races or deadlocks), split-K bookkeeping and dtype conversions.
// What it cannot: the GPU memory model, shared-memory limits, bank conflicts, speed.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/Device.h>

#include <barrier>
#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};

inline thread_local dim3 threadIdx;
inline dim3 blockIdx, gridDim, blockDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)

namespace emu {

inline std::barrier<>* block_barrier = nullptr;
inline std::vector<double> shuffle_buffer;
inline std::mutex atomic_lock;
inline int64_t launches = 0;
inline int sm_count = 132;

// Runs kernel(args...) over grid × block the way the GPU would, one block at a time.
template <typename Kernel, typename... Args>
void launch(dim3 grid, dim3 block, Kernel kernel, Args... args) {
  const unsigned threads = block.x * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0)
    throw std::runtime_error("cuda_emulation: empty grid (CUDA would fail the launch)");
  if (grid.y > 65535 || grid.z > 65535 || threads > 1024)
    throw std::runtime_error("cuda_emulation: grid or block over CUDA's limits");
  ++launches;
  gridDim = grid;
  blockDim = block;
  shuffle_buffer.assign(threads, 0.0);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        blockIdx = dim3(bx, by, bz);
        std::barrier<> barrier(threads);
        block_barrier = &barrier;
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (unsigned t = 0; t < threads; ++t)
          pool.emplace_back([&, t] {
            threadIdx = dim3(t);
            kernel(args...);
            barrier.arrive_and_drop();  // a finished thread no longer holds the others
          });
        for (auto& th : pool) th.join();
      }
}

template <typename Kernel>
struct Launcher {
  dim3 grid, block;
  Kernel kernel;
  template <typename... Args>
  void operator()(Args... args) const {
    launch(grid, block, kernel, args...);
  }
};

template <typename Kernel>
Launcher<Kernel> launcher(dim3 grid, dim3 block, Kernel kernel) {
  return {grid, block, kernel};
}

}  // namespace emu

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }

// Every thread of the block must call it together (as block_sum does).
template <typename T>
T __shfl_down_sync(unsigned, T v, int offset) {
  const unsigned tid = threadIdx.x;
  emu::shuffle_buffer[tid] = static_cast<double>(v);
  emu::block_barrier->arrive_and_wait();
  const unsigned lane = tid % 32;
  T out = lane + offset < 32 ? static_cast<T>(emu::shuffle_buffer[tid + offset]) : v;
  emu::block_barrier->arrive_and_wait();
  return out;
}

template <typename T>
T atomicAdd(T* address, T value) {
  std::lock_guard<std::mutex> lock(emu::atomic_lock);
  T old = *address;
  *address = old + value;
  return old;
}

namespace at {
namespace cuda {
struct EmulatedStream {};
inline EmulatedStream getCurrentCUDAStream() { return {}; }
struct EmulatedProperties {
  int multiProcessorCount;
};
inline EmulatedProperties* getCurrentDeviceProperties() {
  static EmulatedProperties props{0};
  props.multiProcessorCount = emu::sm_count;
  return &props;
}
}  // namespace cuda
}  // namespace at

namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace cuda
}  // namespace c10
