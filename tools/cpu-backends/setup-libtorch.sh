#!/usr/bin/env bash
# LibTorch 2.9.0 (what burn-tch 0.22 / tch 0.22 expect) for the CPU, from PyPI, without the
# 3 GB of CUDA libraries that PyPI's `torch` wheel depends on.
#
# PyPI ships Linux x86_64 `torch` only as the CUDA build. Its CPU library, libtorch_cpu.so, needs
# only libc10, libgomp and two small CUDA libraries (the runtime and CUPTI, 11 MB of wheels,
# loaded but unused without a GPU); its libtorch.so is a thin library that pulls in
# libtorch_cuda.so (1 GB, with cuBLAS, cuDNN, NCCL behind it). This script keeps libtorch_cpu,
# replaces libtorch.so with an empty stub, and prints the environment torch-sys builds with.
#
#   tools/cpu-backends/setup-libtorch.sh DIR     # then: eval "$(tools/cpu-backends/setup-libtorch.sh DIR)"
set -euo pipefail
dir="$(mkdir -p "${1:?usage: setup-libtorch.sh DIR}" && cd "$1" && pwd)"
if [ ! -e "$dir/lib/libtorch_cpu.so" ]; then
    wheels="$dir/wheels"
    mkdir -p "$wheels" "$dir/lib"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 -d "$wheels" \
        torch==2.9.0 nvidia-cuda-runtime-cu12==12.8.90 nvidia-cuda-cupti-cu12==12.8.90 >&2
    (cd "$dir" && python3 -m zipfile -e "$wheels"/torch-2.9.0-*.whl unpacked >&2)
    for w in "$wheels"/nvidia_*.whl; do (cd "$dir" && python3 -m zipfile -e "$w" unpacked >&2); done
    mv "$dir/unpacked/torch/include" "$dir/include"
    for lib in libtorch_cpu.so libc10.so libgomp.so.1; do
        mv "$dir/unpacked/torch/lib/$lib" "$dir/lib/"
    done
    find "$dir/unpacked/nvidia" -name 'libcudart.so.12' -o -name 'libcupti.so.12' | xargs -I{} mv {} "$dir/lib/"
    echo 'void burn_qat_libtorch_stub(void) {}' > "$dir/stub.c"
    cc -shared -fPIC -o "$dir/lib/libtorch.so" "$dir/stub.c"
    rm -rf "$dir/unpacked" "$wheels" "$dir/stub.c"
fi
echo "export LIBTORCH='$dir' LIBTORCH_CXX11_ABI=1 LD_LIBRARY_PATH='$dir/lib'\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
