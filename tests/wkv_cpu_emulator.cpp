// Runs the CUDA WKV kernels of csrc/wkv5.cu and csrc/wkv7.cu, unchanged, on CPU threads: one std::thread per
// CUDA thread, blocks one after another, __shared__ arrays shared by the block's threads, __syncthreads() a
// std::barrier. So a machine without a GPU executes the kernels' own index arithmetic, chunking, shared-memory
// traffic and barriers.
//
// It defines the launchers that csrc/wkv_binding.cpp declares, so tests/test_cuda.py links it with the real
// binding (built with -DWKV_CPU_EMULATION, which lets it take CPU tensors, and tests/emulated_cuda/ for the
// CUDA runtime header) into a Python extension, and runs it through rwkv_state_hub/wkv/cuda.py's autograd
// wrapper: wrapper, binding and kernels together, against the reference loops.
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#include "cuda_runtime_api.h"  // tests/emulated_cuda/: cudaError_t, cudaStream_t

#ifndef WKV_CPU_EMULATION
#define WKV_CPU_EMULATION
#endif
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __restrict__ __restrict
#define __shared__ static  // one block runs at a time, so a function-static array is the block's shared memory

struct EmuDim {
    int x = 0;
};
thread_local EmuDim threadIdx;
EmuDim blockIdx;
std::barrier<>* emu_barrier = nullptr;
inline void __syncthreads() { emu_barrier->arrive_and_wait(); }
using std::min;

struct __nv_bfloat16 {
    uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 x) {
    const uint32_t u = static_cast<uint32_t>(x.bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}
inline __nv_bfloat16 __float2bfloat16(float f) {  // round to nearest even, as the CUDA intrinsic
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return {static_cast<uint16_t>(u >> 16)};
}

#include "../rwkv_state_hub/wkv/csrc/wkv5.cu"
#include "../rwkv_state_hub/wkv/csrc/wkv7.cu"

namespace {

template <class Body>
void launch(int grid, int block, Body body) {
    for (int bx = 0; bx < grid; ++bx) {
        blockIdx.x = bx;
        std::barrier<> barrier(block);
        emu_barrier = &barrier;
        std::vector<std::thread> threads;
        threads.reserve(block);
        for (int t = 0; t < block; ++t) {
            threads.emplace_back([&body, t] {
                threadIdx.x = t;
                body();
            });
        }
        for (auto& th : threads) th.join();
    }
}

template <typename F, int N>
void v5_forward(int B, int T, int H, const void* r, const void* k, const void* v, const void* w, const float* u,
                const float* s0, void* y, float* s_out, float* ckpt) {
    launch(B * H, N, [&] {
        wkv5_forward_kernel<F, N>(T, H, static_cast<const F*>(r), static_cast<const F*>(k),
                                  static_cast<const F*>(v), static_cast<const F*>(w), u, s0, static_cast<F*>(y),
                                  s_out, ckpt);
    });
}

template <typename F, int N>
void v5_backward(int B, int T, int H, const void* r, const void* k, const void* v, const void* w, const float* u,
                 const float* ckpt, const void* gy, const float* gs, float* scratch, void* gr, void* gk, void* gv,
                 void* gw, float* gs0) {
    launch(B * H, N, [&] {
        wkv5_backward_kernel<F, N>(T, H, static_cast<const F*>(r), static_cast<const F*>(k),
                                   static_cast<const F*>(v), static_cast<const F*>(w), u, ckpt,
                                   static_cast<const F*>(gy), gs, scratch, static_cast<F*>(gr), static_cast<F*>(gk),
                                   static_cast<F*>(gv), static_cast<F*>(gw), gs0);
    });
}

template <typename F, int N>
void v7_forward(int B, int T, int H, const void* r, const void* k, const void* v, const void* w, const void* a,
                const void* b, const float* s0, void* y, float* s_out, float* ckpt) {
    launch(B * H, N, [&] {
        wkv7_forward_kernel<F, N>(T, H, static_cast<const F*>(r), static_cast<const F*>(k),
                                  static_cast<const F*>(v), static_cast<const F*>(w), static_cast<const F*>(a),
                                  static_cast<const F*>(b), s0, static_cast<F*>(y), s_out, ckpt);
    });
}

template <typename F, int N>
void v7_backward(int B, int T, int H, const void* r, const void* k, const void* v, const void* w, const void* a,
                 const void* b, const float* ckpt, const void* gy, const float* gs, float* scratch, void* gr, void* gk,
                 void* gv, void* gw, void* ga, void* gb, float* gs0) {
    launch(B * H, N, [&] {
        wkv7_backward_kernel<F, N>(T, H, static_cast<const F*>(r), static_cast<const F*>(k),
                                   static_cast<const F*>(v), static_cast<const F*>(w), static_cast<const F*>(a),
                                   static_cast<const F*>(b), ckpt, static_cast<const F*>(gy), gs, scratch,
                                   static_cast<F*>(gr), static_cast<F*>(gk), static_cast<F*>(gv), static_cast<F*>(gw),
                                   static_cast<F*>(ga), static_cast<F*>(gb), gs0);
    });
}

}  // namespace

// The binding's launchers, for head sizes 8 and 64 (the smallest and the official one).
#define EMU_DISPATCH(FN, ...)                                     \
    if (N == 8 && bf16) FN<__nv_bfloat16, 8>(__VA_ARGS__);        \
    else if (N == 8) FN<float, 8>(__VA_ARGS__);                   \
    else if (N == 64 && bf16) FN<__nv_bfloat16, 64>(__VA_ARGS__); \
    else if (N == 64) FN<float, 64>(__VA_ARGS__);                 \
    else return cudaErrorInvalidValue;                            \
    return cudaSuccess

cudaError_t wkv5_forward_launch(bool bf16, int N, int B, int T, int H, const void* r, const void* k, const void* v,
                                const void* log_w, const float* u, const float* s0, void* y, float* s_out, float* ckpt,
                                cudaStream_t) {
    EMU_DISPATCH(v5_forward, B, T, H, r, k, v, log_w, u, s0, y, s_out, ckpt);
}

cudaError_t wkv5_backward_launch(bool bf16, int N, int B, int T, int H, const void* r, const void* k, const void* v,
                                 const void* log_w, const float* u, const float* ckpt, const void* gy,
                                 const float* gs_out, float* scratch, void* gr, void* gk, void* gv, void* glog_w,
                                 float* gs0, cudaStream_t) {
    EMU_DISPATCH(v5_backward, B, T, H, r, k, v, log_w, u, ckpt, gy, gs_out, scratch, gr, gk, gv, glog_w, gs0);
}

cudaError_t wkv7_forward_launch(bool bf16, int N, int B, int T, int H, const void* r, const void* k, const void* v,
                                const void* log_w, const void* a, const void* b, const float* s0, void* y,
                                float* s_out, float* ckpt, cudaStream_t) {
    EMU_DISPATCH(v7_forward, B, T, H, r, k, v, log_w, a, b, s0, y, s_out, ckpt);
}

cudaError_t wkv7_backward_launch(bool bf16, int N, int B, int T, int H, const void* r, const void* k, const void* v,
                                 const void* log_w, const void* a, const void* b, const float* ckpt, const void* gy,
                                 const float* gs_out, float* scratch, void* gr, void* gk, void* gv, void* glog_w,
                                 void* ga, void* gb, float* gs0, cudaStream_t) {
    EMU_DISPATCH(v7_backward, B, T, H, r, k, v, log_w, a, b, ckpt, gy, gs_out, scratch, gr, gk, gv, glog_w, ga, gb,
                 gs0);
}
