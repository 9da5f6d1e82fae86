// Stand-in for the CUDA runtime API header, for building csrc/wkv_binding.cpp over the kernels run on CPU
// threads (tests/wkv_cpu_emulator.cpp): the few names the binding uses, nothing else.
#pragma once

typedef int cudaError_t;
typedef struct CUstream_st* cudaStream_t;
enum { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
inline const char* cudaGetErrorString(cudaError_t) { return "no emulated kernel for these sizes"; }
