#!/usr/bin/env bash
# Compile-checks every CUDA source (native/cuda/*.cu) with nvcc for the architectures tunekit
# ships (sm_80 and sm_90a), without CMake and without a GPU: what CI runs on machines that have
# nvcc and cudart but no driver, no device and no cuBLAS headers. The defines mirror the CMake
# target: TUNEKIT_WITH_CUDA=1 always, TUNEKIT_WITH_CUBLASLT=1 when the toolkit has cublasLt.h.
# Every file is compiled even after a failure, so one run lists all broken files, and the exit
# status is non-zero if any failed; warnings are printed, not fatal. Objects go to a temporary
# directory that is removed on exit.
#   bash scripts/check-cuda-compile.sh            all files
#   NVCC=/path/to/nvcc bash scripts/check-cuda-compile.sh
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC="${NVCC:-nvcc}"
if ! command -v "$NVCC" >/dev/null 2>&1; then
  echo "check-cuda-compile: nvcc not found (set NVCC or put the CUDA toolkit's bin on PATH)" >&2
  exit 1
fi

shopt -s nullglob
files=(native/cuda/*.cu)
if [ ${#files[@]} -eq 0 ]; then
  echo "check-cuda-compile: no .cu files under native/cuda" >&2
  exit 1
fi

defines=(-DTUNEKIT_WITH_CUDA=1)
cuda_root="$(cd "$(dirname "$(command -v "$NVCC")")/.." && pwd)"
cublaslt="no cuBLASLt headers"
for inc in "$cuda_root/include" "$cuda_root/targets/$(uname -m)-linux/include"; do
  if [ -f "$inc/cublasLt.h" ]; then
    defines+=(-DTUNEKIT_WITH_CUBLASLT=1)
    cublaslt="cuBLASLt"
    break
  fi
done

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

echo "check-cuda-compile: $("$NVCC" --version | tail -n 1), ${#files[@]} files, sm_80 + sm_90a, $cublaslt"
failed=()
for f in "${files[@]}"; do
  echo "  nvcc $f"
  if ! "$NVCC" -std=c++17 -O2 -I. "${defines[@]}" \
    -gencode arch=compute_80,code=sm_80 \
    -gencode arch=compute_90a,code=sm_90a \
    --expt-relaxed-constexpr -lineinfo \
    -Xcompiler -Wall,-Wextra,-Wno-unused-parameter \
    -c "$f" -o "$out/$(basename "$f" .cu).o"; then
    failed+=("$f")
  fi
done
if [ ${#failed[@]} -ne 0 ]; then
  echo "check-cuda-compile: FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "check-cuda-compile: ok"
