#!/usr/bin/env bash
# Configure, build and run the C++ tests (CMakeLists.txt) against the torch in $PYTHON.
# A CUDA build of torch makes find_package(Torch) look for the CUDA toolkit: point it at
# the toolkit and at the nvrtc of the pip CUDA wheels (tools/cuda_env.py finds both).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
BUILD=${BUILD_DIR:-build/cmake}
eval "$("$PYTHON" tools/cuda_env.py)"
prefix=$("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)')
args=(-S . -B "$BUILD" -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_BUILD_TYPE=Release)
command -v ninja >/dev/null && args+=(-G Ninja)
if "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)'; then
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
  args+=(-DCUDA_TOOLKIT_ROOT_DIR="$CUDA_HOME" -DCMAKE_CUDA_COMPILER="$CUDA_HOME/bin/nvcc")
  [ -n "$SSA_NVRTC_LIBRARY" ] && args+=(-DCUDA_nvrtc_LIBRARY="$SSA_NVRTC_LIBRARY")
fi
cmake "${args[@]}" >"$BUILD.configure.log" 2>&1 || { cat "$BUILD.configure.log"; exit 1; }
cmake --build "$BUILD" -j"${MAX_JOBS:-2}"
ctest --test-dir "$BUILD" --output-on-failure
