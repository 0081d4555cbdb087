"""The package's public surface: exports, build info, and the GPU-missing error."""

import subprocess
import sys

import pytest

import annloader_gpu


def test_public_names_resolve():
    for name in annloader_gpu.__all__:
        assert getattr(annloader_gpu, name) is not None, name


def test_import_does_not_pull_scvi_tools():
    code = "import sys, annloader_gpu; print('scvi' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_build_info_describes_the_build():
    info = annloader_gpu.build_info()
    assert info["cpu_module"] is True
    assert info["cpu_threads"] >= 1
    assert isinstance(info["cuda_compiled"], bool)
    if info["cuda_compiled"]:
        assert info["cuda_architectures"], "a CUDA build lists its architectures"
    assert info["gpu_usable"] == annloader_gpu.gpu_usable()
    if not info["gpu_usable"]:
        assert info["gpu_unusable_reason"]


@pytest.mark.skipif(annloader_gpu.gpu_usable(), reason="checks the error raised where no GPU is usable")
def test_gpu_path_without_gpu_raises_clear_error():
    from annloader_gpu._cuda_module import require_cuda_module

    with pytest.raises(annloader_gpu.CudaUnavailableError, match="device='cpu'"):
        require_cuda_module()


# The emulated CUDA module is the CUDA module's bindings compiled for the host: same stub.
@pytest.mark.parametrize("module_name,stub_name", [("_core", "_core"), ("_cuda", "_cuda"), ("_cuda_emulated", "_cuda")])
def test_typed_stubs_list_exactly_the_compiled_names(module_name, stub_name):
    import ast
    import importlib
    from pathlib import Path

    try:
        module = importlib.import_module(f"annloader_gpu.{module_name}")
    except ImportError:
        pytest.skip(f"annloader_gpu.{module_name} was not built")
    stub = Path(annloader_gpu.__file__).with_name(f"{stub_name}.pyi")
    tree = ast.parse(stub.read_text())
    stubbed = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    stubbed |= {n.target.id for n in tree.body if isinstance(n, ast.AnnAssign)}
    stubbed |= {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    compiled = {name for name in dir(module) if not name.startswith("__")}
    assert stubbed == compiled
