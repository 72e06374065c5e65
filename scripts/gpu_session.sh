#!/usr/bin/env bash
# One self-contained GPU session (the lent machine starts bare each time):
# (python3 -P: import the installed package, not the source tree)
# build the extension with the CUDA kernels, run the GPU tests, then the benchmarks.
#   scripts/gpu_session.sh [tests|bench|all]      (logs and bench.json under $OUT, or ./gpu_out)
set -u
what=${1:-all}
out=${OUT:-gpu_out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
# The lent machines set CXX=/opt/gcc/bin/g++, a GCC that links libstdc++ statically: any torch
# extension it builds segfaults when formatting an error message (seen 2026-11-23, even with a
# minimal load_inline extension). Build with the distribution's compiler instead.
if command -v x86_64-linux-gnu-g++ >/dev/null; then export CC=x86_64-linux-gnu-gcc CXX=x86_64-linux-gnu-g++; fi
if ls .whl/*.whl >/dev/null 2>&1; then   # packages missing on the machine, carried as wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
{ date -u; nvidia-smi -L; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
  2>&1 | tee "$out/env.txt"
t0=$(date +%s)
python3 -m pip install -q --no-build-isolation --no-deps . > "$out/build.log" 2>&1 || { tail -50 "$out/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
python3 -P -c "import ssa_kernels; print(ssa_kernels.available_backends('cuda'))"
rc=0
if [ "$what" != bench ]; then
  t0=$(date +%s)
  SSA_KERNELS_EXPECT_EXT=1 SSA_KERNELS_EXPECT_CUDA=1 timeout ${TEST_TIMEOUT:-400} \
    python3 -P -m pytest tests -q -rfEs -p no:cacheprovider ${PYTEST_ARGS:-} > "$out/tests.log" 2>&1; rc=$?
  echo "tests: rc=$rc $(( $(date +%s) - t0 )) s"; tail -40 "$out/tests.log"
fi
if [ "$what" != tests ]; then
  t0=$(date +%s)
  timeout ${BENCH_TIMEOUT:-400} python3 -P -m pytest benchmarks --benchmark-only -q -p no:cacheprovider \
    --benchmark-json="$out/bench.json" ${BENCH_ARGS:-} > "$out/bench.log" 2>&1; echo "bench: rc=$? $(( $(date +%s) - t0 )) s"
  tail -5 "$out/bench.log"
  python3 benchmarks/report.py "$out/bench.json" --command "scripts/gpu_session.sh bench" > "$out/bench.md" 2>&1 || true
fi
exit $rc
