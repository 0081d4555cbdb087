#!/usr/bin/env bash
# Fills ./.whl with the wheels the GPU machine's image lacks, for benchmarks/device_run.sh.
# Run here (it needs the package registry), from anywhere in the repository:
#   bash benchmarks/fetch_device_wheels.sh
#
# The shared script (../shared/device/fetch-wheels.sh --scvi) fetches anndata, scvi-tools and
# their own small dependencies, each without its dependencies. Today's releases import more
# than it fetches; a Python 3.12 twin of the image (benchmarks/device_twin.sh) showed which:
#   anndata >= 0.13      -> pydantic-settings, pydantic, pydantic-core, annotated-types,
#                           typing-inspection, python-dotenv (through scverse-misc[settings])
#   ml-collections       -> absl-py
#   docrep               -> six (python-dateutil >= 4 no longer brings it)
#   pyro-ppl             -> opt-einsum
#   scvi-tools           -> xarray
# pydantic-settings is fetched with its dependencies resolved (pydantic pins pydantic-core to
# one release); the others without theirs, which the image has (numpy, pandas, packaging), so
# that nothing here shadows the image's compiled packages.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
"$root/../shared/device/fetch-wheels.sh" --scvi
platform_args=(--only-binary=:all: --python-version 3.12 --implementation cp
               --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
               --platform manylinux2014_x86_64 -d .whl)
python3 -m pip download -q "${platform_args[@]}" pydantic-settings 2>&1 | grep -v '^WARNING' || true
python3 -m pip download -q --no-deps "${platform_args[@]}" absl-py six opt-einsum xarray 2>&1 \
  | grep -v '^WARNING' || true
for wheel in pydantic_settings pydantic_core absl_py six opt_einsum xarray; do
  ls .whl/"${wheel}"-*.whl > /dev/null 2>&1 || { echo "fetch_device_wheels: no wheel for $wheel" >&2; exit 1; }
done
du -sh .whl
