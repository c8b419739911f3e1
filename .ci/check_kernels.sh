#!/usr/bin/env bash
# Compile check of the CUDA kernels, for machines without a GPU (CI).
#
# 1. Installs nvcc from the `nvidia-cuda-nvcc` wheel (+ the `nvidia-cuda-cccl` headers it needs;
#    it pulls nvidia-cuda-runtime, -crt and nvidia-nvvm itself) into a throwaway folder, used for
#    this check only and removed at exit.
# 2. Compiles every kernels/*.cu with `nvcc -c`, with the flags torch's extension loader uses,
#    for the GPU architectures in RWKVTOOLS_CUDA_ARCHS (default "80 90"), warnings as errors.
# 3. Compiles the torch binding kernels/wkv_cuda_binding.cpp with the host compiler and links it
#    with the kernel object into a shared library with --no-undefined (against torch's CPU
#    libraries and the wheel's libcudart), so a mismatch between the launchers the binding calls
#    and those the .cu defines fails here, not on a GPU machine.
#
# Exits non-zero on any compile or link error. Needs python with torch and pip, g++, network
# access to PyPI. Usage: bash .ci/check_kernels.sh    (PYTHON=... to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
ARCHS="${RWKVTOOLS_CUDA_ARCHS:-80 90}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
start=$SECONDS

echo "check_kernels: installing nvcc (nvidia-cuda-nvcc wheel) into a throwaway folder"
"$PY" -m pip install -q --disable-pip-version-check --no-warn-script-location --target "$TMP/cuda" \
  "nvidia-cuda-nvcc>=13,<14" "nvidia-cuda-cccl>=13,<14"
ROOT="$(ls -d "$TMP"/cuda/nvidia/cu1* | head -n1)"
NVCC="$ROOT/bin/nvcc"
[ -x "$NVCC" ] || { echo "check_kernels: nvcc not found in the wheel ($ROOT)" >&2; exit 1; }
"$NVCC" --version | tail -n 2

TORCH_FLAGS="-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr"
GENCODE=""
for a in $ARCHS; do GENCODE="$GENCODE -gencode arch=compute_$a,code=sm_$a"; done

shopt -s nullglob
objs=()
for src in kernels/*.cu; do
  obj="$TMP/$(basename "$src" .cu).o"
  echo "check_kernels: nvcc -c $src (sm: $ARCHS)"
  # shellcheck disable=SC2086
  "$NVCC" -c "$src" -o "$obj" -std=c++20 -O3 -Xcompiler -fPIC -Ikernels $TORCH_FLAGS $GENCODE \
    --threads 0 -Werror all-warnings -Xcompiler -Wall
  objs+=("$obj")
done
[ ${#objs[@]} -gt 0 ] || { echo "check_kernels: no kernels/*.cu found" >&2; exit 1; }

echo "check_kernels: compiling the torch binding and linking it with the kernels"
TORCH_INC="$("$PY" -c 'import torch.utils.cpp_extension as c; print(" ".join("-isystem " + p for p in c.include_paths()))')"
TORCH_LIB="$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
# shellcheck disable=SC2086
g++ -c kernels/wkv_cuda_binding.cpp -o "$TMP/binding.o" -std=c++20 -O1 -fPIC -Wall -Werror \
  -Ikernels $TORCH_INC -DTORCH_EXTENSION_NAME=rwkvtools_wkv_cuda
g++ -shared -o "$TMP/rwkvtools_wkv_cuda.so" "$TMP/binding.o" "${objs[@]}" -Wl,--no-undefined \
  -L"$TORCH_LIB" -lc10 -ltorch_cpu -ltorch -L"$ROOT/lib" -l:libcudart.so.13
echo "check_kernels: ok (${#objs[@]} CUDA source(s), $((SECONDS - start)) s)"
