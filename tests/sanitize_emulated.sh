#!/usr/bin/env bash
# The CUDA kernels' CPU emulation under AddressSanitizer and UBSan: a CPU stand-in for
# compute-sanitizer's memcheck over the kernels' logic (every out-of-bounds read or write of a
# kernel, launcher or binding, and undefined behaviour such as signed overflow), run by the
# emulation tests. Not part of `python -m pytest` (the instrumented build takes ~5 minutes on
# 2 cores). Needs the package installed (README's test command), gcc, cmake and ninja.
#   bash tests/sanitize_emulated.sh            # builds into /tmp/annloader_asan, then runs
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
build=${ANNLOADER_ASAN_BUILD:-/tmp/annloader_asan}
flags="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined"
cmake -S "$repo" -B "$build" -G Ninja -DANNLOADER_CUDA=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_FLAGS="$flags" -DCMAKE_SHARED_LINKER_FLAGS="$flags" \
  -Dpybind11_DIR="$(python -c 'import pybind11; print(pybind11.get_cmake_dir())')" > "$build.cmake.log"
cmake --build "$build" --target _cuda_emulated
so=$(ls "$build"/_cuda_emulated*.so)
# Python itself is not instrumented: the runtimes are preloaded; Python's own leaks are not ours.
# Fibers switch stacks, which ASan's use-after-return detection cannot follow.
ANNLOADER_CUDA_EMULATED_SO=$so \
ASAN_OPTIONS=detect_leaks=0:detect_stack_use_after_return=0 \
UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)" \
  python -m pytest -q -p no:cacheprovider "$repo/tests/test_cuda_emulated.py" "$repo/tests/test_pinned.py" \
    "$repo/tests/test_loader_on_cuda_kernels.py" "$@"
