// RWKV-5.2 / RWKV-6 WKV with a state input, the final state output, and the gradient to the state.
//
//   y_t = S_{t-1} r_t + v_t (sum_j u_j k_tj r_tj)
//   S_t = S_{t-1} diag(w_t) + v_t k_t^T          (w_t = exp(log_w_t) scales the key axis)
//
// Backward: the adjoint dS (gradient to S_t) runs backwards in time,
//   dS_{t-1} = dS_t diag(w_t) + gy_t r_t^T,
// and needs S_{t-1}: the forward pass saves S before every WKV_CHUNK steps; the backward pass recomputes
// the states of one chunk from its checkpoint into `scratch` and walks the chunk in reverse. Gradients
// to key-indexed inputs are sums over value rows: each thread writes its row to shared memory, then
// reads one column.
#include "wkv_common.cuh"

namespace {

template <typename F, int N>
__global__ void __launch_bounds__(N) wkv5_forward_kernel(
    int T, int H, const F* __restrict__ r, const F* __restrict__ k, const F* __restrict__ v,
    const F* __restrict__ log_w, const float* __restrict__ u, const float* __restrict__ s0, F* __restrict__ y,
    float* __restrict__ s_out, float* __restrict__ ckpt) {
    const int bh = blockIdx.x, b = bh / H, h = bh % H, i = threadIdx.x;
    const int n_chunks = (T + WKV_CHUNK - 1) / WKV_CHUNK;
    __shared__ float s_r[N], s_k[N], s_w[N], s_u[N];

    float S[N];
    const float* s0_row = s0 + (static_cast<size_t>(bh) * N + i) * N;
#pragma unroll
    for (int j = 0; j < N; ++j) S[j] = s0_row[j];
    s_u[i] = u[h * N + i];

    // each step's inputs are loaded one step ahead, so that global-memory latency overlaps the arithmetic
    size_t idx = btn_index<N>(b, 0, T, h, H, i);
    float next_r = to_float(r[idx]), next_k = to_float(k[idx]), next_v = to_float(v[idx]);
    float next_lw = to_float(log_w[idx]);
    for (int t = 0; t < T; ++t, idx += static_cast<size_t>(H) * N) {
        if (ckpt != nullptr && t % WKV_CHUNK == 0) {
            float* c = ckpt + (static_cast<size_t>(bh) * n_chunks + t / WKV_CHUNK) * N * N;
#pragma unroll
            for (int j = 0; j < N; ++j) c[j * N + i] = S[j];
        }
        __syncthreads();  // everyone is done with the previous step's vectors
        s_r[i] = next_r;
        s_k[i] = next_k;
        s_w[i] = expf(next_lw);
        const float vi = next_v;
        __syncthreads();
        if (t + 1 < T) {
            const size_t n = idx + static_cast<size_t>(H) * N;
            next_r = to_float(r[n]), next_k = to_float(k[n]), next_v = to_float(v[n]), next_lw = to_float(log_w[n]);
        }
        float acc[4] = {0.f, 0.f, 0.f, 0.f};  // four partial sums: shorter dependency chains
#pragma unroll
        for (int j = 0; j < N; ++j) {
            const float kv = vi * s_k[j];
            acc[j % 4] += (S[j] + s_u[j] * kv) * s_r[j];
            S[j] = S[j] * s_w[j] + kv;
        }
        y[idx] = from_float<F>((acc[0] + acc[1]) + (acc[2] + acc[3]));
    }
    float* out_row = s_out + (static_cast<size_t>(bh) * N + i) * N;
#pragma unroll
    for (int j = 0; j < N; ++j) out_row[j] = S[j];
}

template <typename F, int N>
__global__ void __launch_bounds__(N) wkv5_backward_kernel(
    int T, int H, const F* __restrict__ r, const F* __restrict__ k, const F* __restrict__ v,
    const F* __restrict__ log_w, const float* __restrict__ u, const float* __restrict__ ckpt,
    const F* __restrict__ gy, const float* __restrict__ gs_out, float* __restrict__ scratch, F* __restrict__ gr,
    F* __restrict__ gk, F* __restrict__ gv, F* __restrict__ glog_w, float* __restrict__ gs0) {
    const int bh = blockIdx.x, b = bh / H, h = bh % H, i = threadIdx.x;
    const int n_chunks = (T + WKV_CHUNK - 1) / WKV_CHUNK;
    __shared__ float s_r[N], s_k[N], s_w[N], s_u[N], s_v[N], s_gy[N];
    __shared__ float sm_g[N][N + 1], sm_s[N][N + 1];  // +1: conflict-free row writes and column reads

    struct Inputs {
        float r, k, lw, v, gy;
    };
    const auto load = [&](int t) {  // this thread's element of step t; loaded a step ahead of its use
        const size_t n = btn_index<N>(b, t, T, h, H, i);
        return Inputs{to_float(r[n]), to_float(k[n]), to_float(log_w[n]), to_float(v[n]), to_float(gy[n])};
    };

    float G[N];  // row i of dS_t, the gradient to the state after step t
    const float* gs_row = gs_out + (static_cast<size_t>(bh) * N + i) * N;
#pragma unroll
    for (int j = 0; j < N; ++j) G[j] = gs_row[j];
    s_u[i] = u[h * N + i];
    float* scr = scratch + static_cast<size_t>(bh) * WKV_CHUNK * N * N;

    for (int c = n_chunks - 1; c >= 0; --c) {
        const int t0 = c * WKV_CHUNK, t1 = min(T, t0 + WKV_CHUNK);
        {  // recompute S_{t-1} for every t of the chunk from its checkpoint, as the forward pass did
            float S[N];
            const float* cp = ckpt + (static_cast<size_t>(bh) * n_chunks + c) * N * N;
#pragma unroll
            for (int j = 0; j < N; ++j) S[j] = cp[j * N + i];
            Inputs next = load(t0);
            for (int t = t0; t < t1; ++t) {
                float* sc = scr + static_cast<size_t>(t - t0) * N * N;
#pragma unroll
                for (int j = 0; j < N; ++j) sc[j * N + i] = S[j];
                __syncthreads();
                s_k[i] = next.k;
                s_w[i] = expf(next.lw);
                const float vi = next.v;
                __syncthreads();
                if (t + 1 < t1) next = load(t + 1);
#pragma unroll
                for (int j = 0; j < N; ++j) S[j] = S[j] * s_w[j] + vi * s_k[j];
            }
        }
        Inputs next = load(t1 - 1);
        for (int t = t1 - 1; t >= t0; --t) {
            const size_t idx = btn_index<N>(b, t, T, h, H, i);
            __syncthreads();
            s_r[i] = next.r;
            s_k[i] = next.k;
            s_w[i] = expf(next.lw);
            s_v[i] = next.v;
            s_gy[i] = next.gy;
            __syncthreads();
            if (t > t0) next = load(t - 1);
            const float gyi = s_gy[i];
            const float* sc = scr + static_cast<size_t>(t - t0) * N * N;
            float ukr = 0.f, gvi = 0.f;
#pragma unroll
            for (int j = 0; j < N; ++j) {
                sm_s[i][j] = sc[j * N + i];
                sm_g[i][j] = G[j];
                gvi += G[j] * s_k[j];
                ukr += s_u[j] * s_k[j] * s_r[j];
            }
            gv[idx] = from_float<F>(gvi + gyi * ukr);
            __syncthreads();
            // column pass: this thread now owns key channel i
            float gyv = 0.f, grj = 0.f, gkj = 0.f, gwj = 0.f;
#pragma unroll 8
            for (int m = 0; m < N; ++m) {
                const float g = sm_g[m][i], s = sm_s[m][i];
                gyv += s_gy[m] * s_v[m];
                grj += s_gy[m] * s;
                gkj += g * s_v[m];
                gwj += g * s;
            }
            gr[idx] = from_float<F>(grj + s_u[i] * s_k[i] * gyv);
            gk[idx] = from_float<F>(gkj + s_u[i] * s_r[i] * gyv);
            glog_w[idx] = from_float<F>(gwj * s_w[i]);
#pragma unroll
            for (int j = 0; j < N; ++j) G[j] = G[j] * s_w[j] + gyi * s_r[j];
        }
    }
    float* gs0_row = gs0 + (static_cast<size_t>(bh) * N + i) * N;
#pragma unroll
    for (int j = 0; j < N; ++j) gs0_row[j] = G[j];
}

#ifndef WKV_CPU_EMULATION  // the emulator (tests/wkv_cpu_emulator.cpp) launches the kernels itself
template <typename F, int N>
void forward_as(int B, int T, int H, const void* r, const void* k, const void* v, const void* log_w, const float* u,
                const float* s0, void* y, float* s_out, float* ckpt, cudaStream_t stream) {
    wkv5_forward_kernel<F, N><<<B * H, N, 0, stream>>>(
        T, H, static_cast<const F*>(r), static_cast<const F*>(k), static_cast<const F*>(v),
        static_cast<const F*>(log_w), u, s0, static_cast<F*>(y), s_out, ckpt);
}

template <typename F, int N>
void backward_as(int B, int T, int H, const void* r, const void* k, const void* v, const void* log_w,
                 const float* u, const float* ckpt, const void* gy, const float* gs_out, float* scratch, void* gr,
                 void* gk, void* gv, void* glog_w, float* gs0, cudaStream_t stream) {
    wkv5_backward_kernel<F, N><<<B * H, N, 0, stream>>>(
        T, H, static_cast<const F*>(r), static_cast<const F*>(k), static_cast<const F*>(v),
        static_cast<const F*>(log_w), u, ckpt, static_cast<const F*>(gy), gs_out, scratch, static_cast<F*>(gr),
        static_cast<F*>(gk), static_cast<F*>(gv), static_cast<F*>(glog_w), gs0);
}

// Head sizes 8, 16, 32, 64 (the tiny test models use 8; the official ones 64).
template <typename F>
cudaError_t forward_sized(int N, int B, int T, int H, const void* r, const void* k, const void* v, const void* log_w,
                          const float* u, const float* s0, void* y, float* s_out, float* ckpt, cudaStream_t stream) {
    switch (N) {
        case 8:
            forward_as<F, 8>(B, T, H, r, k, v, log_w, u, s0, y, s_out, ckpt, stream);
            break;
        case 16:
            forward_as<F, 16>(B, T, H, r, k, v, log_w, u, s0, y, s_out, ckpt, stream);
            break;
        case 32:
            forward_as<F, 32>(B, T, H, r, k, v, log_w, u, s0, y, s_out, ckpt, stream);
            break;
        case 64:
            forward_as<F, 64>(B, T, H, r, k, v, log_w, u, s0, y, s_out, ckpt, stream);
            break;
        default: return cudaErrorInvalidValue;
    }
    return cudaGetLastError();
}

template <typename F>
cudaError_t backward_sized(int N, int B, int T, int H, const void* r, const void* k, const void* v, const void* log_w,
                           const float* u, const float* ckpt, const void* gy, const float* gs_out, float* scratch,
                           void* gr, void* gk, void* gv, void* glog_w, float* gs0, cudaStream_t stream) {
    switch (N) {
        case 8:
            backward_as<F, 8>(B, T, H, r, k, v, log_w, u, ckpt, gy, gs_out, scratch, gr, gk, gv, glog_w, gs0, stream);
            break;
        case 16:
            backward_as<F, 16>(B, T, H, r, k, v, log_w, u, ckpt, gy, gs_out, scratch, gr, gk, gv, glog_w, gs0,
                stream);
            break;
        case 32:
            backward_as<F, 32>(B, T, H, r, k, v, log_w, u, ckpt, gy, gs_out, scratch, gr, gk, gv, glog_w, gs0,
                stream);
            break;
        case 64:
            backward_as<F, 64>(B, T, H, r, k, v, log_w, u, ckpt, gy, gs_out, scratch, gr, gk, gv, glog_w, gs0,
                stream);
            break;
        default: return cudaErrorInvalidValue;
    }
    return cudaGetLastError();
}

#endif  // WKV_CPU_EMULATION

}  // namespace

#ifndef WKV_CPU_EMULATION

// bf16: the inputs are bfloat16 (else float32); the state and its gradient are always float32.
cudaError_t wkv5_forward_launch(bool bf16, int N, int B, int T, int H, const void* r, const void* k, const void* v,
                                const void* log_w, const float* u, const float* s0, void* y, float* s_out, float* ckpt,
                                cudaStream_t stream) {
    return bf16 ? forward_sized<__nv_bfloat16>(N, B, T, H, r, k, v, log_w, u, s0, y, s_out, ckpt, stream)
                : forward_sized<float>(N, B, T, H, r, k, v, log_w, u, s0, y, s_out, ckpt, stream);
}

cudaError_t wkv5_backward_launch(bool bf16, int N, int B, int T, int H, const void* r, const void* k, const void* v,
                                 const void* log_w, const float* u, const float* ckpt, const void* gy,
                                 const float* gs_out, float* scratch, void* gr, void* gk, void* gv, void* glog_w,
                                 float* gs0, cudaStream_t stream) {
    return bf16 ? backward_sized<__nv_bfloat16>(N, B, T, H, r, k, v, log_w, u, ckpt, gy, gs_out, scratch, gr, gk, gv,
                                                glog_w, gs0, stream)
                : backward_sized<float>(N, B, T, H, r, k, v, log_w, u, ckpt, gy, gs_out, scratch, gr, gk, gv, glog_w,
                                        gs0, stream);
}

#endif  // WKV_CPU_EMULATION
