// The CUDA gathers and their bindings, compiled as host C++ for annloader_gpu._cuda_emulated.
#define ANNLOADER_CUDA_MODULE _cuda_emulated
#include "../cuda_gather.cu"
