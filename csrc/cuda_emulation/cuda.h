// Emulation stand-in for the CUDA driver API types (see README.md in this folder).
#pragma once

using CUresult = int;
constexpr CUresult CUDA_SUCCESS = 0;
using CUcontext = struct CUctx_emulated*;
