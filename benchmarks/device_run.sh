#!/usr/bin/env bash
# The whole device lease in one call (see ../shared/device/README.md): build for sm_90, run the
# GPU-marked tests, a memcheck case under compute-sanitizer, and the device check with timings.
# Everything lands in $OUT. Prepare first, on this machine: ../shared/device/fetch-wheels.sh --scvi
# Device tool call: carry [".whl"], command "bash benchmarks/device_run.sh", timeout_s 540. Each step
# is capped (about 525 s together at worst; a normal run needs about 5-6 minutes), and each writes
# its own file in $OUT, so a run cut short keeps what it did.
set -uo pipefail
REPO=$(pwd)
OUT=${OUT:-/tmp/device_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=16
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
{ time timeout 150 python3 -m pip install -q --no-build-isolation --no-deps \
    -Ccmake.define.ANNLOADER_CUDA=ON -Ccmake.define.CMAKE_CUDA_ARCHITECTURES=90 . ; } > "$OUT/build.log" 2>&1
tail -20 "$OUT/build.log"
# Import the installed package, not the source tree (which has no compiled modules).
cd /tmp || exit 1
python3 -c "import annloader_gpu, json; print(json.dumps(annloader_gpu.build_info()))" | tee "$OUT/build_info.json"
# In order of importance.
timeout 150 python3 "$REPO/benchmarks/device_check.py" --out "$OUT" 2>&1 | tee "$OUT/device_check.log"
# The whole pytest log comes back (files up to 16 MiB); the reply shows its end.
timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short -rfE "$REPO/tests" > "$OUT/pytest_gpu.log" 2>&1
tail -25 "$OUT/pytest_gpu.log"
# Sharded residency with a re-partition every epoch on one GPU (NCCL, world 1): the CUDA-tensor
# exchange path end to end (all-to-all over NCCL, uint16 views, ragged CSR rows).
timeout 45 python3 -m torch.distributed.run --standalone --nproc_per_node=1 "$REPO/examples/train_ddp.py" \
  --sharded --repartition-every 1 --epochs 3 --n-obs 20000 --n-vars 2000 > "$OUT/ddp_repartition.log" 2>&1
tail -8 "$OUT/ddp_repartition.log"
# Without the caching allocator every tensor is its own allocation, so an overrun past one is seen:
# the kernels' check, then the gather plan (fused, grouped narrow-field and wide launches).
{ PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 30 compute-sanitizer --tool memcheck --error-exitcode 99 \
    python3 "$REPO/benchmarks/device_check.py" --sanitize-case
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 30 compute-sanitizer --tool memcheck --error-exitcode 99 \
    python3 -m pytest -q -p no:cacheprovider "$REPO/tests/test_kernels_gpu_contracts.py" -k "narrow_fields or never_writes"
} > "$OUT/memcheck.log" 2>&1
tail -20 "$OUT/memcheck.log"
