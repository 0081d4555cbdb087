#!/usr/bin/env bash
# The whole device lease in one call (see ../shared/device/README.md): build for sm_90, run the
# device check with timings, the GPU-marked tests, an NCCL re-partition run, and memcheck under
# compute-sanitizer. Prepare first, on this machine: bash benchmarks/fetch_device_wheels.sh
# (and, to try the software without a GPU: bash benchmarks/device_twin.sh).
# Device tool call: carry [".whl"], command "bash benchmarks/device_run.sh", timeout_s 540.
#
# Time: every step has its own cap, and none may run past DEADLINE (520 s after the start) less
# the minimum kept for the steps after it, so the whole run ends within the 540 s command timeout
# and a slow early step squeezes (or, below 10 s left, skips) the later, less important ones
# instead of cutting the run off. Caps: wheels 60, imports 40, nvidia-smi 20, build 200, build_info 30,
# device_check 120, pytest 130, NCCL run 40, memcheck 90 for both runs together. A normal run
# should need about 4-6 minutes (an estimate: never run on a GPU yet). DEVICE_RUN_DEADLINE=S
# replaces the 520 (to try the squeezing in a rehearsal).
# Output: the same 8 files in $OUT as ever (gpu.txt, build.log, build_info.json, device_check.log,
# device_check.json, pytest_gpu.log, ddp_repartition.log, memcheck.log); each step appends
#   [step NAME] rc=N wall=Ss cap=Cs
# to its own log (the wheels, imports, build and build_info lines go to build.log; build_info.json stays
# JSON). rc: 124 = hit its cap (137: killed 5 s later), 99 = compute-sanitizer found an error,
# 127 = command not found, "skipped" = too little time left; else the command's own status.
# device_check.json is rewritten after each of its sections, so a capped check keeps its results.
# A failed build ends the run (nothing after it could import the package).
#
# CPU rehearsal (no GPU, nothing installed or built: uses the package installed here):
#   DEVICE_RUN_REHEARSAL=1 OUT=/tmp/devout bash benchmarks/device_run.sh
# runs the same steps with device_check.py --device cpu --quick; nvidia-smi and compute-sanitizer
# are missing (rc=127), the GPU tests skip, and the NCCL run falls back to gloo on the CPU.
set -uo pipefail
REPO=$(pwd)
OUT=${OUT:-/tmp/device_out}
REHEARSAL=${DEVICE_RUN_REHEARSAL:-0}
DEADLINE=${DEVICE_RUN_DEADLINE:-520}  # seconds after the start ($SECONDS) by which every step ends
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=16

# run_step NAME LOG CAP RESERVE CMD...: runs CMD, its output appended to LOG (stdout to
# $STEP_STDOUT instead when set), for at most CAP seconds and never past DEADLINE - RESERVE
# (RESERVE: the minimum kept for the steps after it); then appends the step line to LOG.
run_step() {
  local name=$1 log=$2 cap=$3 reserve=$4
  shift 4
  local left=$(( DEADLINE - SECONDS - reserve ))
  (( left < cap )) && cap=$left
  if (( cap < 10 )); then
    echo "[step $name] rc=skipped wall=0s cap=${cap}s (too little time left before the deadline)" >> "$log"
    return 125
  fi
  local t0 rc ms
  t0=$(date +%s%N)
  if [[ -n ${STEP_STDOUT:-} ]]; then
    timeout -k 5 "$cap" "$@" > "$STEP_STDOUT" 2>> "$log"
  else
    timeout -k 5 "$cap" "$@" >> "$log" 2>&1
  fi
  rc=$?
  ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  echo "[step $name] rc=$rc wall=$(( ms / 1000 )).$(( ms % 1000 / 100 ))s cap=${cap}s" >> "$log"
  return $rc
}

# Minimum seconds kept for each later step; a step's RESERVE is the sum over the steps after it.
MIN_BUILD=120 MIN_INFO=15 MIN_CHECK=60 MIN_PYTEST=45 MIN_DDP=20 MIN_MEMCHECK=40
AFTER_BUILD=$(( MIN_INFO + MIN_CHECK + MIN_PYTEST + MIN_DDP + MIN_MEMCHECK ))
: > "$OUT/build.log"
if [[ $REHEARSAL == 1 ]]; then
  echo "[step wheels] rc=skipped wall=0s (rehearsal: the installed environment is used)" >> "$OUT/build.log"
else
  run_step wheels "$OUT/build.log" 60 $(( MIN_BUILD + AFTER_BUILD )) \
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { tail -20 "$OUT/build.log"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
# anndata is needed by everything after the build, scvi-tools only by the side-by-side timing
# (which falls back to the scipy path without it): a missing module is named here, and the run goes on.
run_step imports "$OUT/build.log" 40 $(( MIN_BUILD + AFTER_BUILD )) \
  python3 -c "import anndata, scvi; from importlib.metadata import version as v; print('anndata', v('anndata'), 'scvi-tools', v('scvi-tools'))"
: > "$OUT/gpu.txt"
run_step nvidia-smi "$OUT/gpu.txt" 20 $(( MIN_BUILD + AFTER_BUILD )) nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
cat "$OUT/gpu.txt"
# The CPU emulation of the kernels (a CPU test aid, ~60 s of compile) is left out on the device.
if [[ $REHEARSAL == 1 ]]; then
  echo "[step build] rc=skipped wall=0s (rehearsal: the installed package is used)" >> "$OUT/build.log"
else
  run_step build "$OUT/build.log" 200 "$AFTER_BUILD" \
    python3 -m pip install -q --no-build-isolation --no-deps -Ccmake.define.ANNLOADER_CUDA=ON \
    -Ccmake.define.ANNLOADER_CUDA_EMULATION=OFF -Ccmake.define.CMAKE_CUDA_ARCHITECTURES=90 . \
    || { tail -30 "$OUT/build.log"; exit 1; }
fi
# Import the installed package, not the source tree (which has no compiled modules).
cd /tmp || exit 1
STEP_STDOUT="$OUT/build_info.json" run_step build_info "$OUT/build.log" 30 $(( MIN_CHECK + MIN_PYTEST + MIN_DDP + MIN_MEMCHECK )) \
  python3 -c "import annloader_gpu, json; print(json.dumps(annloader_gpu.build_info()))"
tail -20 "$OUT/build.log"
cat "$OUT/build_info.json"

# In order of importance.
CHECK_ARGS=(--out "$OUT")
: > "$OUT/device_check.log"
[[ $REHEARSAL == 1 ]] && CHECK_ARGS+=(--device cpu --quick)
run_step device_check "$OUT/device_check.log" 120 $(( MIN_PYTEST + MIN_DDP + MIN_MEMCHECK )) \
  python3 "$REPO/benchmarks/device_check.py" "${CHECK_ARGS[@]}"
tail -60 "$OUT/device_check.log"
# The whole pytest log comes back (files up to 16 MiB); the reply shows its end. Verbose, one line
# per test, so that a run stopped by its cap still shows which test it was in.
: > "$OUT/pytest_gpu.log"
run_step pytest_gpu "$OUT/pytest_gpu.log" 130 $(( MIN_DDP + MIN_MEMCHECK )) \
  python3 -m pytest -v -m gpu -p no:cacheprovider --tb=short -rfE "$REPO/tests"
tail -25 "$OUT/pytest_gpu.log"
# Sharded residency with a re-partition every epoch on one GPU (NCCL, world 1): the CUDA-tensor
# exchange path end to end (all-to-all over NCCL, uint16 views, ragged CSR rows).
: > "$OUT/ddp_repartition.log"
run_step ddp_repartition "$OUT/ddp_repartition.log" 40 "$MIN_MEMCHECK" \
  python3 -m torch.distributed.run --standalone --nproc_per_node=1 "$REPO/examples/train_ddp.py" \
  --sharded --repartition-every 1 --epochs 3 --n-obs 20000 --n-vars 2000
tail -8 "$OUT/ddp_repartition.log"
# Without the caching allocator every tensor is its own allocation, so an overrun past one is seen:
# the kernels' check, then the gather plan (fused, grouped narrow-field and wide launches). The two
# share 90 s (torch starts slowly under memcheck): the first gets at most 60, the second the rest.
MEMCHECK_END=$(( SECONDS + 90 ))
: > "$OUT/memcheck.log"
run_step memcheck_check "$OUT/memcheck.log" 60 15 \
  env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 99 \
  python3 "$REPO/benchmarks/device_check.py" --sanitize-case
run_step memcheck_gather_plan "$OUT/memcheck.log" $(( MEMCHECK_END - SECONDS )) 0 \
  env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 99 \
  python3 -m pytest -q -p no:cacheprovider "$REPO/tests/test_kernels_gpu_contracts.py" -k "narrow_fields or never_writes"
tail -20 "$OUT/memcheck.log"
echo "device_run: done in ${SECONDS}s"
