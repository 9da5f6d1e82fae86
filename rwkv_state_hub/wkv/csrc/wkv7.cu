// RWKV-7 WKV (the generalised delta rule) with a state input, the final state output, and the gradient to
// the state.
//
//   S_t = S_{t-1} diag(w_t) + (S_{t-1} a_t) b_t^T + v_t k_t^T      (w_t = exp(log_w_t))
//   y_t = S_t r_t
//
// Each value row i of S evolves on its own (thread i holds it). Backward, with G = dS_t + gy_t r_t^T
// (the gradient to S_t, including y_t's use of it):
//   dS_{t-1} = G diag(w_t) + (G b_t) a_t^T
//   gv_t = G k_t            gk_t = G^T v_t          gb_t = G^T (S_{t-1} a_t)
//   gw_t = diag(G^T S_{t-1})   ga_t = S_{t-1}^T (G b_t)   gr_t = S_t^T gy_t
// S_{t-1} comes from checkpoints every WKV_CHUNK steps, recomputed chunk by chunk into `scratch` (no
// division by the decay, so any decay in (0, 1] is safe). Key-indexed gradients are sums over rows:
// each thread writes its rows of G and S_{t-1} to shared memory, then reads one column.
#include "wkv_common.cuh"

namespace {

template <typename F, int N>
__global__ void __launch_bounds__(N) wkv7_forward_kernel(
    int T, int H, const F* __restrict__ r, const F* __restrict__ k, const F* __restrict__ v,
    const F* __restrict__ log_w, const F* __restrict__ a, const F* __restrict__ bb, const float* __restrict__ s0,
    F* __restrict__ y, float* __restrict__ s_out, float* __restrict__ ckpt) {
    const int bh = blockIdx.x, b = bh / H, h = bh % H, i = threadIdx.x;
    const int n_chunks = (T + WKV_CHUNK - 1) / WKV_CHUNK;
    __shared__ float s_r[N], s_k[N], s_w[N], s_a[N], s_b[N];

    float S[N];
    const float* s0_row = s0 + (static_cast<size_t>(bh) * N + i) * N;
#pragma unroll
    for (int j = 0; j < N; ++j) S[j] = s0_row[j];

    // each step's inputs are loaded one step ahead, so that global-memory latency overlaps the arithmetic
    size_t idx = btn_index<N>(b, 0, T, h, H, i);
    float next_r = to_float(r[idx]), next_k = to_float(k[idx]), next_v = to_float(v[idx]);
    float next_lw = to_float(log_w[idx]), next_a = to_float(a[idx]), next_b = to_float(bb[idx]);
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
        s_a[i] = next_a;
        s_b[i] = next_b;
        const float vi = next_v;
        __syncthreads();
        if (t + 1 < T) {
            const size_t n = idx + static_cast<size_t>(H) * N;
            next_r = to_float(r[n]), next_k = to_float(k[n]), next_v = to_float(v[n]);
            next_lw = to_float(log_w[n]), next_a = to_float(a[n]), next_b = to_float(bb[n]);
        }
        float acc[4] = {0.f, 0.f, 0.f, 0.f};  // four partial sums: shorter dependency chains
#pragma unroll
        for (int j = 0; j < N; ++j) acc[j % 4] += S[j] * s_a[j];
        const float sa = (acc[0] + acc[1]) + (acc[2] + acc[3]);
        acc[0] = acc[1] = acc[2] = acc[3] = 0.f;
#pragma unroll
        for (int j = 0; j < N; ++j) {
            S[j] = S[j] * s_w[j] + sa * s_b[j] + vi * s_k[j];
            acc[j % 4] += S[j] * s_r[j];
        }
        y[idx] = from_float<F>((acc[0] + acc[1]) + (acc[2] + acc[3]));
    }
    float* out_row = s_out + (static_cast<size_t>(bh) * N + i) * N;
#pragma unroll
    for (int j = 0; j < N; ++j) out_row[j] = S[j];
}

template <typename F, int N>
__global__ void __launch_bounds__(N) wkv7_backward_kernel(
    int T, int H, const F* __restrict__ r, const F* __restrict__ k, const F* __restrict__ v,
    const F* __restrict__ log_w, const F* __restrict__ a, const F* __restrict__ bb, const float* __restrict__ ckpt,
    const F* __restrict__ gy, const float* __restrict__ gs_out, float* __restrict__ scratch, F* __restrict__ gr,
    F* __restrict__ gk, F* __restrict__ gv, F* __restrict__ glog_w, F* __restrict__ ga, F* __restrict__ gb,
    float* __restrict__ gs0) {
    const int bh = blockIdx.x, b = bh / H, h = bh % H, i = threadIdx.x;
    const int n_chunks = (T + WKV_CHUNK - 1) / WKV_CHUNK;
    __shared__ float s_r[N], s_k[N], s_w[N], s_a[N], s_b[N], s_v[N], s_gy[N], s_sa[N], s_gb[N];
    __shared__ float sm_g[N][N + 1], sm_s[N][N + 1];  // +1: conflict-free row writes and column reads

    struct Inputs {
        float r, k, lw, a, b, v, gy;
    };
    const auto load = [&](int t) {  // this thread's element of step t; loaded a step ahead of its use
        const size_t n = btn_index<N>(b, t, T, h, H, i);
        return Inputs{to_float(r[n]), to_float(k[n]), to_float(log_w[n]), to_float(a[n]),
                      to_float(bb[n]), to_float(v[n]), to_float(gy[n])};
    };

    float G[N];  // row i of the gradient to S_t from everything after step t
    const float* gs_row = gs_out + (static_cast<size_t>(bh) * N + i) * N;
#pragma unroll
    for (int j = 0; j < N; ++j) G[j] = gs_row[j];
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
                s_a[i] = next.a;
                s_b[i] = next.b;
                const float vi = next.v;
                __syncthreads();
                if (t + 1 < t1) next = load(t + 1);
                float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
                for (int j = 0; j < N; ++j) acc[j % 4] += S[j] * s_a[j];
                const float sa = (acc[0] + acc[1]) + (acc[2] + acc[3]);
#pragma unroll
                for (int j = 0; j < N; ++j) S[j] = S[j] * s_w[j] + sa * s_b[j] + vi * s_k[j];
            }
        }
        Inputs next = load(t1 - 1);
        for (int t = t1 - 1; t >= t0; --t) {
            const size_t idx = btn_index<N>(b, t, T, h, H, i);
            __syncthreads();
            s_r[i] = next.r;
            s_k[i] = next.k;
            s_w[i] = expf(next.lw);
            s_a[i] = next.a;
            s_b[i] = next.b;
            s_v[i] = next.v;
            s_gy[i] = next.gy;
            __syncthreads();
            if (t > t0) next = load(t - 1);
            const float gyi = s_gy[i];
            const float* sc = scr + static_cast<size_t>(t - t0) * N * N;
            float acc[4] = {0.f, 0.f, 0.f, 0.f}, gbi = 0.f, gvi = 0.f;
#pragma unroll
            for (int j = 0; j < N; ++j) {
                const float s = sc[j * N + i];
                sm_s[i][j] = s;
                acc[j % 4] += s * s_a[j];
                G[j] += gyi * s_r[j];
                sm_g[i][j] = G[j];
                gbi += G[j] * s_b[j];
                gvi += G[j] * s_k[j];
            }
            s_sa[i] = (acc[0] + acc[1]) + (acc[2] + acc[3]);
            s_gb[i] = gbi;
            gv[idx] = from_float<F>(gvi);
            __syncthreads();
            // column pass: this thread now owns key channel i
            const float wi = s_w[i], bi = s_b[i], ki = s_k[i];
            float grj = 0.f, gkj = 0.f, gbj = 0.f, gwj = 0.f, gaj = 0.f;
#pragma unroll 8
            for (int m = 0; m < N; ++m) {
                const float g = sm_g[m][i], s = sm_s[m][i];
                gkj += g * s_v[m];
                gbj += g * s_sa[m];
                gwj += g * s;
                gaj += s_gb[m] * s;
                grj += s_gy[m] * (s * wi + s_sa[m] * bi + s_v[m] * ki);
            }
            gr[idx] = from_float<F>(grj);
            gk[idx] = from_float<F>(gkj);
            gb[idx] = from_float<F>(gbj);
            ga[idx] = from_float<F>(gaj);
            glog_w[idx] = from_float<F>(gwj * wi);
#pragma unroll
            for (int j = 0; j < N; ++j) G[j] = G[j] * s_w[j] + gbi * s_a[j];
        }
    }
    float* gs0_row = gs0 + (static_cast<size_t>(bh) * N + i) * N;
#pragma unroll
    for (int j = 0; j < N; ++j) gs0_row[j] = G[j];
}

#ifndef WKV_CPU_EMULATION  // the emulator (tests/wkv_cpu_emulator.cpp) launches the kernels itself
template <typename F, int N>
void forward_as(int B, int T, int H, const void* r, const void* k, const void* v, const void* log_w, const void* a,
                const void* b, const float* s0, void* y, float* s_out, float* ckpt, cudaStream_t stream) {
    wkv7_forward_kernel<F, N><<<B * H, N, 0, stream>>>(
        T, H, static_cast<const F*>(r), static_cast<const F*>(k), static_cast<const F*>(v),
        static_cast<const F*>(log_w), static_cast<const F*>(a), static_cast<const F*>(b), s0, static_cast<F*>(y),
        s_out, ckpt);
}

template <typename F, int N>
void backward_as(int B, int T, int H, const void* r, const void* k, const void* v, const void* log_w, const void* a,
                 const void* b, const float* ckpt, const void* gy, const float* gs_out, float* scratch, void* gr,
                 void* gk, void* gv, void* glog_w, void* ga, void* gb, float* gs0, cudaStream_t stream) {
    wkv7_backward_kernel<F, N><<<B * H, N, 0, stream>>>(
        T, H, static_cast<const F*>(r), static_cast<const F*>(k), static_cast<const F*>(v),
        static_cast<const F*>(log_w), static_cast<const F*>(a), static_cast<const F*>(b), ckpt,
        static_cast<const F*>(gy), gs_out, scratch, static_cast<F*>(gr), static_cast<F*>(gk), static_cast<F*>(gv),
        static_cast<F*>(glog_w), static_cast<F*>(ga), static_cast<F*>(gb), gs0);
}

// Head sizes 8, 16, 32, 64 (the tiny test models use 8; the official ones 64).
template <typename F>
cudaError_t forward_sized(int N, int B, int T, int H, const void* r, const void* k, const void* v, const void* log_w,
                          const void* a, const void* b, const float* s0, void* y, float* s_out, float* ckpt,
                          cudaStream_t stream) {
    switch (N) {
        case 8:
            forward_as<F, 8>(B, T, H, r, k, v, log_w, a, b, s0, y, s_out, ckpt, stream);
            break;
        case 16:
            forward_as<F, 16>(B, T, H, r, k, v, log_w, a, b, s0, y, s_out, ckpt, stream);
            break;
        case 32:
            forward_as<F, 32>(B, T, H, r, k, v, log_w, a, b, s0, y, s_out, ckpt, stream);
            break;
        case 64:
            forward_as<F, 64>(B, T, H, r, k, v, log_w, a, b, s0, y, s_out, ckpt, stream);
            break;
        default: return cudaErrorInvalidValue;
    }
    return cudaGetLastError();
}

template <typename F>
cudaError_t backward_sized(int N, int B, int T, int H, const void* r, const void* k, const void* v, const void* log_w,
                           const void* a, const void* b, const float* ckpt, const void* gy, const float* gs_out,
                           float* scratch, void* gr, void* gk, void* gv, void* glog_w, void* ga, void* gb, float* gs0,
                           cudaStream_t stream) {
    switch (N) {
        case 8:
            backward_as<F, 8>(B, T, H, r, k, v, log_w, a, b, ckpt, gy, gs_out, scratch, gr, gk, gv, glog_w, ga, gb,
                gs0, stream);
            break;
        case 16:
            backward_as<F, 16>(B, T, H, r, k, v, log_w, a, b, ckpt, gy, gs_out, scratch, gr, gk, gv, glog_w, ga, gb,
                gs0, stream);
            break;
        case 32:
            backward_as<F, 32>(B, T, H, r, k, v, log_w, a, b, ckpt, gy, gs_out, scratch, gr, gk, gv, glog_w, ga, gb,
                gs0, stream);
            break;
        case 64:
            backward_as<F, 64>(B, T, H, r, k, v, log_w, a, b, ckpt, gy, gs_out, scratch, gr, gk, gv, glog_w, ga, gb,
                gs0, stream);
            break;
        default: return cudaErrorInvalidValue;
    }
    return cudaGetLastError();
}

#endif  // WKV_CPU_EMULATION

}  // namespace

#ifndef WKV_CPU_EMULATION

// bf16: the inputs are bfloat16 (else float32); the state and its gradient are always float32.
cudaError_t wkv7_forward_launch(bool bf16, int N, int B, int T, int H, const void* r, const void* k, const void* v,
                                const void* log_w, const void* a, const void* b, const float* s0, void* y,
                                float* s_out, float* ckpt, cudaStream_t stream) {
    return bf16 ? forward_sized<__nv_bfloat16>(N, B, T, H, r, k, v, log_w, a, b, s0, y, s_out, ckpt, stream)
                : forward_sized<float>(N, B, T, H, r, k, v, log_w, a, b, s0, y, s_out, ckpt, stream);
}

cudaError_t wkv7_backward_launch(bool bf16, int N, int B, int T, int H, const void* r, const void* k, const void* v,
                                 const void* log_w, const void* a, const void* b, const float* ckpt, const void* gy,
                                 const float* gs_out, float* scratch, void* gr, void* gk, void* gv, void* glog_w,
                                 void* ga, void* gb, float* gs0, cudaStream_t stream) {
    return bf16 ? backward_sized<__nv_bfloat16>(N, B, T, H, r, k, v, log_w, a, b, ckpt, gy, gs_out, scratch, gr, gk,
                                                gv, glog_w, ga, gb, gs0, stream)
                : backward_sized<float>(N, B, T, H, r, k, v, log_w, a, b, ckpt, gy, gs_out, scratch, gr, gk, gv,
                                        glog_w, ga, gb, gs0, stream);
}

#endif  // WKV_CPU_EMULATION
