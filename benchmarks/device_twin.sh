#!/usr/bin/env bash
# A CPU twin of the GPU machine's software, to find what would fail there for reasons other
# than the GPU before any device time is spent: Python 3.12, torch 2.11 (its CUDA build, with
# no driver here), the image's packages at today's releases (see ../shared/device/README.md),
# the .whl wheels installed exactly as device_run.sh installs them, the package built as there
# (CUDA on, sm_90; the CPU emulation kept so that its tests run). Then the whole test suite and
# the device run's CPU rehearsal. The GPU tests skip: this checks software, not the GPU.
#
#   bash benchmarks/fetch_device_wheels.sh && bash benchmarks/device_twin.sh [pytest args]
#
# Env: TWIN (the venv, reused when present; default /tmp/devtwin), PYTHON312 (default python3.12).
# First run ~4 GB of downloads (torch's CUDA libraries) and ~10 minutes on 2 cores.
set -euo pipefail
REPO=$(git rev-parse --show-toplevel)
TWIN=${TWIN:-/tmp/devtwin}
if [[ ! -x $TWIN/bin/python ]]; then
  "${PYTHON312:-python3.12}" -m venv "$TWIN"
  "$TWIN/bin/python" -m pip install -q torch==2.11.0 cupy-cuda13x numpy scipy pandas h5py pytest hypothesis \
    pybind11 scikit-build-core cmake ninja lightning torchmetrics numba scikit-learn statsmodels seaborn \
    matplotlib networkx rich tqdm
fi
export PATH=$TWIN/bin:$PATH
[[ -d $REPO/.whl ]] || { echo "device_twin: no .whl; run benchmarks/fetch_device_wheels.sh first" >&2; exit 1; }
rm -rf "$TWIN/site"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$TWIN/site" \
  "$REPO"/.whl/*.whl
export PYTHONPATH=$TWIN/site
python3 -c "import anndata, scvi; from importlib.metadata import version as v; print('device_twin: anndata', v('anndata'), 'scvi-tools', v('scvi-tools'))"
cd "$REPO"
CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) python3 -m pip install -q --no-build-isolation --no-deps \
  -Ccmake.define.ANNLOADER_CUDA=ON -Ccmake.define.CMAKE_CUDA_ARCHITECTURES=90 -Cbuild-dir="$TWIN/build" .
cd /tmp  # the installed package, not the source tree
python3 -m pytest -q -p no:cacheprovider "$@" "$REPO/tests"
cd "$REPO"
rm -rf "$TWIN/out"
DEVICE_RUN_REHEARSAL=1 OUT=$TWIN/out bash benchmarks/device_run.sh > "$TWIN/rehearsal.log" 2>&1
grep -h '^\[step' "$TWIN"/out/*.log
echo "device_twin: rehearsal files in $TWIN/out, log $TWIN/rehearsal.log"
