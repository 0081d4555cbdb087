"""Typed stub of annloader_gpu._cuda_emulated: exactly the CUDA module's bindings (see _cuda.pyi),
compiled as host C++ against csrc/cuda_emulation/ for the tests. Addresses are host pointers,
device 0 is the only device and the stream is ignored."""

from ._cuda import *  # noqa: F403
