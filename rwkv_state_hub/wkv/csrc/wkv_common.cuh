// Shared by wkv5.cu and wkv7.cu: input loads/stores for fp32 and bf16, and the checkpoint chunk length.
//
// Layouts (all contiguous):
//   r, k, v, log_w, a, b, y and their gradients: [B, T, H, N] in the input type (fp32 or bf16)
//   u: [H, N] fp32; state, final state, state gradient: [B, H, N(value), N(key)] fp32
//   ckpt:    [B*H, ceil(T / WKV_CHUNK), N(key), N(value)] fp32: the state before each chunk of steps
//   scratch: [B*H, WKV_CHUNK, N(key), N(value)] fp32: the states of one chunk, recomputed in backward
// One thread block per (batch, head), one thread per value row i of the state.
#pragma once

#ifndef WKV_CPU_EMULATION  // tests/wkv_cpu_emulator.cpp runs the kernels on CPU threads, with its own stand-ins
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#endif

#include "wkv_chunk.h"

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename F> __device__ __forceinline__ F from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

// Index of element (b, t, h, n) in a [B, T, H, N] tensor.
template <int N>
__device__ __forceinline__ size_t btn_index(int b, int t, int T, int h, int H, int n) {
    return ((static_cast<size_t>(b) * T + t) * H + h) * N + n;
}
