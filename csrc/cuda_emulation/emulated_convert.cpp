// The CUDA CSC -> CSR conversion, compiled as host C++ for annloader_gpu._cuda_emulated.
#include "../cuda_convert.cu"
