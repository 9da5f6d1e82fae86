// The WKV recurrences on CPU, one time step after another, with a state input, the final state output and the
// gradient to everything (the state included). Plain C++ with a C interface (no torch headers: it compiles in
// under a second in ~75 MB), built on first use by rwkv_state_hub/wkv/cpu.py and called through ctypes on the
// tensors' memory.
//
// Why a loop and not chunks: a 64 x 64 state (16 KB) stays in the L1 cache, so stepping through time costs
// about 5 N^2 multiply-adds a step forward and 13 backward, while the chunked torch form spends most of its time
// on many small tensors. The maths is the reference loops' (rwkv_state_hub/wkv/reference.py) and the CUDA
// kernels' (wkv7.cu, wkv5.cu); S is [value i][key j] and every input [B, T, H, N] fp32.
//
// RWKV-7:  S_t = S_{t-1} diag(w_t) + (S_{t-1} a_t) b_t^T + v_t k_t^T,   y_t = S_t r_t
//   backward, G = dS_t + gy_t r_t^T (the gradient to S_t) and sa = S_{t-1} a_t:
//   dS_{t-1} = G diag(w_t) + (G b_t) a_t^T     gv = G k    gk = G^T v    gb = G^T sa    ga = S_{t-1}^T (G b)
//   d log_w = w . diag(G^T S_{t-1})            gr = S_t^T gy = w . (S_{t-1}^T gy) + b (gy . sa) + k (gy . v)
// RWKV-5.2 / 6:  y_t = S_{t-1} r_t + v_t (u . k_t . r_t),   S_t = S_{t-1} diag(w_t) + v_t k_t^T
//   backward, G = dS_t:  dS_{t-1} = G diag(w_t) + gy_t r_t^T     gv = G k + gy (u . k . r)
//   gk = G^T v + u . r (gy . v)    gr = S_{t-1}^T gy + u . k (gy . v)    d log_w = w . diag(G^T S_{t-1})
//   (d u is summed by the caller from gy, v, k, r.)
// Backward walks the chunks of kChunk steps from the last: it recomputes the chunk's states S_{t-1} from the
// checkpoint the forward pass kept (no division by the decay), and for RWKV-7 each step's sa, which the step
// computes anyway; then it steps back through them.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int kChunk = 16;  // steps between checkpoints: a chunk's recomputed states take kChunk * 16 KB

#if defined(__AVX512F__)
constexpr bool kWideRegisters = true;  // 32 registers of 16 floats: RWKV-7's backward keeps a row of sums in them
#else
constexpr bool kWideRegisters = false;
#endif

struct Dims {
    int64_t B, T, H, N;
    int64_t chunks() const { return (T + kChunk - 1) / kChunk; }
    int64_t at(int64_t bh, int64_t t) const { return ((bh / H) * T + t) * H * N + (bh % H) * N; }
};

template <int W>
struct Lanes {
    typedef float V __attribute__((vector_size(W * sizeof(float))));
};

// A row of N floats as K vectors of W lanes (GCC/Clang vector extensions: AVX-512, AVX2, NEON alike).
template <int N>
struct Row {
    static constexpr int W = N < 16 ? N : 16, K = N / W;
    using V = typename Lanes<W>::V;
    static void load(V* x, const float* p) { std::memcpy(x, p, sizeof(V) * K); }
    static void store(float* p, const V* x) { std::memcpy(p, x, sizeof(V) * K); }
};

// The sum of a vector's lanes, halving it in registers (__builtin_shufflevector: GCC >= 12, Clang).
template <int W>
inline float hsum(typename Lanes<W>::V x) {
    if constexpr (W == 16) {
        return hsum<8>(__builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7) +
                       __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15));
    } else if constexpr (W == 8) {
        return hsum<4>(__builtin_shufflevector(x, x, 0, 1, 2, 3) + __builtin_shufflevector(x, x, 4, 5, 6, 7));
    } else if constexpr (W == 4) {
        return (x[0] + x[2]) + (x[1] + x[3]);
    } else {
        float s = 0.f;
        for (int l = 0; l < W; ++l) s += x[l];
        return s;
    }
}

template <int N>
inline float sum(typename Row<N>::V x) { return hsum<Row<N>::W>(x); }

// ---------------------------------------------------------------- one (batch, head), either architecture

// Steps through time from the state s0 (step(S, S, t): step t in place), keeping the state before every kChunk-th
// step in ckpt (unless null), and writes the final state.
template <int N, typename Step>
void forward(const Dims& d, int64_t bh, const float* s0, float* s_out, float* ckpt, Step step) {
    alignas(64) float S[N * N];
    std::memcpy(S, s0 + bh * N * N, sizeof S);
    for (int64_t t = 0; t < d.T; ++t) {
        if (ckpt != nullptr && t % kChunk == 0) std::memcpy(ckpt + (bh * d.chunks() + t / kChunk) * N * N, S, sizeof S);
        step(S, S, t);
    }
    std::memcpy(s_out + bh * N * N, S, sizeof S);
}

// Recomputes the states before each step of chunk c into S[0 .. t1 - t0) from the chunk's checkpoint
// (step(S_{t-1}, S_t, t): step t from one buffer into the next).
template <int N, typename Step>
void recompute(const Dims& d, int64_t bh, int64_t c, const float* ckpt, float* S, Step step) {
    const int64_t t0 = c * kChunk, t1 = std::min(d.T, t0 + kChunk);
    std::memcpy(S, ckpt + (bh * d.chunks() + c) * N * N, N * N * sizeof(float));
    for (int64_t t = t0; t + 1 < t1; ++t, S += N * N) step(S, S + N * N, t);
}

// Steps back through time from the final state's gradient gs_out, a chunk at a time from the last: its states
// recomputed from its checkpoint (step without outputs), then back(G, S_{t-1}, t) for each of its steps, last
// first. Writes the initial state's gradient.
template <int N, typename Step, typename Back>
void backward(const Dims& d, int64_t bh, const float* ckpt, const float* gs_out, float* gs0, Step step, Back back) {
    alignas(64) float G[N * N];
    std::vector<float> states(static_cast<size_t>(kChunk) * N * N);  // S_{t-1} for each step of a chunk
    std::memcpy(G, gs_out + bh * N * N, sizeof G);
    for (int64_t c = d.chunks() - 1; c >= 0; --c) {
        recompute<N>(d, bh, c, ckpt, states.data(), step);
        const int64_t t0 = c * kChunk, t1 = std::min(d.T, t0 + kChunk);
        for (int64_t t = t1 - 1; t >= t0; --t) back(G, states.data() + (t - t0) * N * N, t);
    }
    std::memcpy(gs0 + bh * N * N, G, sizeof G);
}

// ---------------------------------------------------------------- RWKV-7

// One forward step from S_in into S_out (the same buffer, or not): S <- S diag(w) + (S a) b^T + v k^T;
// y = S r (when y is given); S a before the step into sa (when given: the backward pass needs it).
template <int N>
inline void step7(const float* S_in, float* S_out, const float* w_, const float* k_, const float* v, const float* a_,
                  const float* b_, const float* r_, float* y, float* sa_out) {
    using R = Row<N>;
    using V = typename R::V;
    constexpr int K = R::K;
    V w[K], k[K], a[K], b[K], r[K];
    R::load(w, w_), R::load(k, k_), R::load(a, a_), R::load(b, b_);
    if (y != nullptr) R::load(r, r_);
    for (int i = 0; i < N; ++i) {
        V s[K];
        R::load(s, S_in + i * N);
        V acc = s[0] * a[0];
        for (int q = 1; q < K; ++q) acc += s[q] * a[q];
        const float sa = sum<N>(acc), vi = v[i];
        if (sa_out != nullptr) sa_out[i] = sa;
        for (int q = 0; q < K; ++q) s[q] = s[q] * w[q] + sa * b[q] + vi * k[q];
        R::store(S_out + i * N, s);
        if (y != nullptr) {
            acc = s[0] * r[0];
            for (int q = 1; q < K; ++q) acc += s[q] * r[q];
            y[i] = sum<N>(acc);
        }
    }
}

template <int N>
void forward7(const Dims& d, int64_t bh, const float* r, const float* k, const float* v, const float* w,
              const float* a, const float* b, const float* s0, float* y, float* s_out, float* ckpt) {
    forward<N>(d, bh, s0, s_out, ckpt, [&](const float* S, float* next, int64_t t) {
        const int64_t x = d.at(bh, t);
        step7<N>(S, next, w + x, k + x, v + x, a + x, b + x, r + x, y + x, nullptr);
    });
}

// The rows of S times a: out = S a.
template <int N>
inline void rows_dot(const float* S, const float* a_, float* out) {
    using R = Row<N>;
    typename R::V a[R::K];
    R::load(a, a_);
    for (int i = 0; i < N; ++i) {
        typename R::V s[R::K], acc = {};
        R::load(s, S + i * N);
        for (int q = 0; q < R::K; ++q) acc += s[q] * a[q];
        out[i] = sum<N>(acc);
    }
}

// One backward step of RWKV-7: G (dS_t in, dS_{t-1} out), S = S_{t-1}, Sa = S_{t-1} a_t; writes step t's input
// gradients. First the row sums, row by row (G += gy r^T; G b and G k); then the column sums over all rows, QB
// blocks of W keys at a time, as many as keep every accumulator in a register.
template <int N>
inline void back7(float* G, const float* S, const float* Sa, const float* w_, const float* r_, const float* k_,
                  const float* v, const float* a_, const float* b_, const float* gy, float* gr, float* gk, float* gv,
                  float* gw, float* ga, float* gb) {
    using R = Row<N>;
    using V = typename R::V;
    constexpr int K = R::K, W = R::W;
    alignas(64) float Gb[N];
    {
        V r[K], k[K], b[K];
        R::load(r, r_), R::load(k, k_), R::load(b, b_);
        for (int i = 0; i < N; ++i) {
            V g[K], tb = {}, tk = {};
            R::load(g, G + i * N);
            for (int q = 0; q < K; ++q) {
                g[q] += gy[i] * r[q];
                tb += g[q] * b[q];
                tk += g[q] * k[q];
            }
            R::store(G + i * N, g);
            Gb[i] = sum<N>(tb), gv[i] = sum<N>(tk);
        }
    }
    float gy_sa = 0.f, gy_v = 0.f;
    for (int i = 0; i < N; ++i) gy_sa += gy[i] * Sa[i], gy_v += gy[i] * v[i];
    constexpr int QB = kWideRegisters ? K : 1;  // key blocks per sweep down the rows (each row's scalars read once)
    for (int q0 = 0; q0 < K; q0 += QB) {
        V w[QB], a[QB], gk_[QB] = {}, gb_[QB] = {}, gw_[QB] = {}, ga_[QB] = {}, gyS[QB] = {};
        for (int j = 0; j < QB; ++j) {
            std::memcpy(&w[j], w_ + (q0 + j) * W, sizeof(V)), std::memcpy(&a[j], a_ + (q0 + j) * W, sizeof(V));
        }
        for (int i = 0; i < N; ++i) {
            const float vi = v[i], sai = Sa[i], gbi = Gb[i], gyi = gy[i];
            for (int j = 0; j < QB; ++j) {
                float* Gq = G + i * N + (q0 + j) * W;
                V g, s;
                std::memcpy(&g, Gq, sizeof g), std::memcpy(&s, S + i * N + (q0 + j) * W, sizeof s);
                gk_[j] += vi * g;
                gb_[j] += sai * g;
                gw_[j] += g * s;
                ga_[j] += gbi * s;
                gyS[j] += gyi * s;
                g = g * w[j] + gbi * a[j];
                std::memcpy(Gq, &g, sizeof g);
            }
        }
        for (int j = 0; j < QB; ++j) {
            const int64_t o = (q0 + j) * W;
            V b, k;
            std::memcpy(&b, b_ + o, sizeof b), std::memcpy(&k, k_ + o, sizeof k);
            gyS[j] = w[j] * gyS[j] + gy_sa * b + gy_v * k;
            gw_[j] *= w[j];
            std::memcpy(gr + o, &gyS[j], sizeof(V)), std::memcpy(gk + o, &gk_[j], sizeof(V));
            std::memcpy(gb + o, &gb_[j], sizeof(V)), std::memcpy(ga + o, &ga_[j], sizeof(V));
            std::memcpy(gw + o, &gw_[j], sizeof(V));
        }
    }
}

template <int N>
void backward7(const Dims& d, int64_t bh, const float* r, const float* k, const float* v, const float* w,
               const float* a, const float* b, const float* ckpt, const float* gy, const float* gs_out, float* gr,
               float* gk, float* gv, float* gw, float* ga, float* gb, float* gs0) {
    alignas(64) float sas[kChunk * N];  // S_{t-1} a_t for each step of a chunk, kept by the recompute
    backward<N>(d, bh, ckpt, gs_out, gs0,
                [&](const float* S, float* next, int64_t t) {
                    const int64_t x = d.at(bh, t);
                    step7<N>(S, next, w + x, k + x, v + x, a + x, b + x, nullptr, nullptr, sas + t % kChunk * N);
                },
                [&](float* G, const float* S, int64_t t) {
                    const int64_t x = d.at(bh, t);
                    float* sa = sas + t % kChunk * N;
                    if ((t + 1) % kChunk == 0 || t + 1 == d.T) rows_dot<N>(S, a + x, sa);  // not stepped by recompute
                    back7<N>(G, S, sa, w + x, r + x, k + x, v + x, a + x, b + x, gy + x, gr + x, gk + x, gv + x,
                             gw + x, ga + x, gb + x);
                });
}

// ---------------------------------------------------------------- RWKV-5.2 / 6

// The current token's bonus weight u . k . r (y_t gets v_t times it).
template <int N>
inline float bonus5(const typename Row<N>::V* u, const typename Row<N>::V* k, const typename Row<N>::V* r) {
    typename Row<N>::V ukr = {};
    for (int q = 0; q < Row<N>::K; ++q) ukr += u[q] * k[q] * r[q];
    return sum<N>(ukr);
}

// One forward step from S_in into S_out (the same buffer, or not): y = S r + v (u . k . r) (when y is given);
// S <- S diag(w) + v k^T.
template <int N>
inline void step5(const float* S_in, float* S_out, const float* w_, const float* k_, const float* v, const float* u_, const float* r_,
                  float* y) {
    using R = Row<N>;
    using V = typename R::V;
    constexpr int K = R::K;
    V w[K], k[K], r[K], u[K];
    R::load(w, w_), R::load(k, k_), R::load(r, r_), R::load(u, u_);
    const float bonus = y != nullptr ? bonus5<N>(u, k, r) : 0.f;
    for (int i = 0; i < N; ++i) {
        V s[K], acc = {};
        R::load(s, S_in + i * N);
        const float vi = v[i];
        for (int q = 0; q < K; ++q) {
            acc += s[q] * r[q];
            s[q] = s[q] * w[q] + vi * k[q];
        }
        R::store(S_out + i * N, s);
        if (y != nullptr) y[i] = sum<N>(acc) + vi * bonus;
    }
}

template <int N>
void forward5(const Dims& d, int64_t bh, const float* r, const float* k, const float* v, const float* w,
              const float* u, const float* s0, float* y, float* s_out, float* ckpt) {
    const float* uh = u + (bh % d.H) * N;
    forward<N>(d, bh, s0, s_out, ckpt, [&](const float* S, float* next, int64_t t) {
        const int64_t x = d.at(bh, t);
        step5<N>(S, next, w + x, k + x, v + x, uh, r + x, y + x);
    });
}

// One backward step of RWKV-5.2 / 6: G (dS_t in, dS_{t-1} out), S = S_{t-1}.
template <int N>
inline void back5(float* G, const float* S, const float* w_, const float* r_, const float* k_, const float* v,
                  const float* u_, const float* gy, float* gr, float* gk, float* gv, float* gw) {
    using R = Row<N>;
    using V = typename R::V;
    constexpr int K = R::K;
    V w[K], r[K], k[K], u[K];
    R::load(w, w_), R::load(r, r_), R::load(k, k_), R::load(u, u_);
    const float bonus = bonus5<N>(u, k, r);
    V gk_[K] = {}, gw_[K] = {}, gyS[K] = {};
    float gy_v = 0.f;
    for (int i = 0; i < N; ++i) {
        V g[K], s[K], tk = {};
        R::load(g, G + i * N), R::load(s, S + i * N);
        const float gyi = gy[i], vi = v[i];
        for (int q = 0; q < K; ++q) {
            tk += g[q] * k[q];
            gk_[q] += vi * g[q];
            gw_[q] += g[q] * s[q];
            gyS[q] += gyi * s[q];
            g[q] = g[q] * w[q] + gyi * r[q];
        }
        R::store(G + i * N, g);
        gv[i] = sum<N>(tk) + gyi * bonus;
        gy_v += gyi * vi;
    }
    for (int q = 0; q < K; ++q) {
        gyS[q] += gy_v * u[q] * k[q];
        gk_[q] += gy_v * u[q] * r[q];
        gw_[q] *= w[q];
    }
    R::store(gr, gyS), R::store(gk, gk_), R::store(gw, gw_);
}

template <int N>
void backward5(const Dims& d, int64_t bh, const float* r, const float* k, const float* v, const float* w,
               const float* u, const float* ckpt, const float* gy, const float* gs_out, float* gr, float* gk,
               float* gv, float* gw, float* gs0) {
    const float* uh = u + (bh % d.H) * N;
    backward<N>(d, bh, ckpt, gs_out, gs0,
                [&](const float* S, float* next, int64_t t) {
                    const int64_t x = d.at(bh, t);
                    step5<N>(S, next, w + x, k + x, v + x, uh, r + x, nullptr);
                },
                [&](float* G, const float* S, int64_t t) {
                    const int64_t x = d.at(bh, t);
                    back5<N>(G, S, w + x, r + x, k + x, v + x, uh, gy + x, gr + x, gk + x, gv + x, gw + x);
                });
}

// ---------------------------------------------------------------- the C interface

// Runs body<N>(bh) for every (batch, head) on `threads` OpenMP threads. The library links the libgomp that torch
// has loaded (same soname), so these are torch's own threads: a second pool would spin against them.
template <template <int> class Body, typename... Args>
int for_heads(const Dims& d, int threads, Args... args) {
    if (d.N != 8 && d.N != 16 && d.N != 32 && d.N != 64) return 1;
    const int64_t n = d.B * d.H;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t bh = 0; bh < n; ++bh) {
        switch (d.N) {
            case 8: Body<8>::run(d, bh, args...); break;
            case 16: Body<16>::run(d, bh, args...); break;
            case 32: Body<32>::run(d, bh, args...); break;
            default: Body<64>::run(d, bh, args...); break;
        }
    }
    return 0;
}

template <int N> struct Fwd7 { template <typename... A> static void run(const Dims& d, int64_t bh, A... a) { forward7<N>(d, bh, a...); } };
template <int N> struct Bwd7 { template <typename... A> static void run(const Dims& d, int64_t bh, A... a) { backward7<N>(d, bh, a...); } };
template <int N> struct Fwd5 { template <typename... A> static void run(const Dims& d, int64_t bh, A... a) { forward5<N>(d, bh, a...); } };
template <int N> struct Bwd5 { template <typename... A> static void run(const Dims& d, int64_t bh, A... a) { backward5<N>(d, bh, a...); } };

}  // namespace

// Every tensor is contiguous fp32: inputs [B, T, H, N], w = exp(log_w), states [B, H, N, N], u [H, N],
// checkpoints [B * H, ceil(T / wkv_chunk()), N, N] (ckpt may be null in forward: no backward wanted).
// Returns 0, or 1 for a head size other than 8, 16, 32, 64.
extern "C" {

int wkv_chunk() { return kChunk; }

int wkv7_forward(int64_t B, int64_t T, int64_t H, int64_t N, int threads, const float* r, const float* k,
                 const float* v, const float* w, const float* a, const float* b, const float* s0, float* y,
                 float* s_out, float* ckpt) {
    return for_heads<Fwd7>(Dims{B, T, H, N}, threads, r, k, v, w, a, b, s0, y, s_out, ckpt);
}

// Writes the gradients to r, k, v, log_w, a, b and the initial state.
int wkv7_backward(int64_t B, int64_t T, int64_t H, int64_t N, int threads, const float* r, const float* k,
                  const float* v, const float* w, const float* a, const float* b, const float* ckpt, const float* gy,
                  const float* gs, float* gr, float* gk, float* gv, float* glog_w, float* ga, float* gb, float* gs0) {
    return for_heads<Bwd7>(Dims{B, T, H, N}, threads, r, k, v, w, a, b, ckpt, gy, gs, gr, gk, gv, glog_w, ga, gb,
                           gs0);
}

int wkv5_forward(int64_t B, int64_t T, int64_t H, int64_t N, int threads, const float* r, const float* k,
                 const float* v, const float* w, const float* u, const float* s0, float* y, float* s_out,
                 float* ckpt) {
    return for_heads<Fwd5>(Dims{B, T, H, N}, threads, r, k, v, w, u, s0, y, s_out, ckpt);
}

// Writes the gradients to r, k, v, log_w and the initial state (u's is summed by the caller).
int wkv5_backward(int64_t B, int64_t T, int64_t H, int64_t N, int threads, const float* r, const float* k,
                  const float* v, const float* w, const float* u, const float* ckpt, const float* gy, const float* gs,
                  float* gr, float* gk, float* gv, float* glog_w, float* gs0) {
    return for_heads<Bwd5>(Dims{B, T, H, N}, threads, r, k, v, w, u, ckpt, gy, gs, gr, gk, gv, glog_w, gs0);
}

}  // extern "C"
