"""The loader's scvi-tools parity tests, rerun with every gather done by the CUDA kernels.

Each test of ``test_loader`` and ``test_loader_adversarial`` runs here a second time with the
compiled CPU module replaced by ``_emulated_core``: the CUDA launchers and kernels (compiled for
the CPU, see ``csrc/cuda_emulation``) then produce every batch, and the batches must still equal
scvi-tools' loader's. (85 of their 95 CPU tests gather; ``test_loader_inputs`` is left out, as 48
of its 50 tests stop at argument checks.) What this cannot reach is the CUDA-only Python around
the kernels (streams, device placement, prefetch), which ``benchmarks/device_run.sh`` checks on a
GPU.
"""

from __future__ import annotations

import pytest

from annloader_gpu import gather_plan, kernels

try:
    import _emulated_core
except ImportError as exc:  # only where the build was configured with ANNLOADER_CUDA_EMULATION=OFF
    pytest.skip(f"annloader_gpu was built without the CUDA emulation ({exc})", allow_module_level=True)

# The tests to rerun, collected again in this module. (A test function keeps its own module's
# globals; only fixtures resolve here, and the one name they share, ``scvi``, is the same fixture.)
from test_loader import *  # noqa: E402,F403
from test_loader_adversarial import *  # noqa: E402,F403


@pytest.fixture(autouse=True)
def _gathers_by_cuda_kernels(request, monkeypatch):
    if request.node.get_closest_marker("gpu"):
        # GPU tests gather with the real CUDA module; they run once, in their own module.
        pytest.skip("a GPU test: run in its own module, not again here")
    monkeypatch.setattr(kernels, "_core", _emulated_core)
    monkeypatch.setattr(gather_plan, "_core", _emulated_core)
