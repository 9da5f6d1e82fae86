// The cross-entropy through a frozen bf16 head, from its bf16 logits to the bf16 gradient of the logits, in one
// C++ pass per row (rwkv_state_hub/loss.py calls it through ctypes; built with wkv_cpu.cpp).
//
// For each row: top = max logit, total = sum e^(logit - top), nll = top + log(total) - logit[target], and the
// logits are overwritten with weight * (softmax - onehot(target)), rounded to bf16 for the product with the head.
// torch does the same in eight passes over an fp32 copy of the logits; here it is three over the bf16 ones.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

constexpr int W = 16;
typedef float V __attribute__((vector_size(W * sizeof(float))));
typedef int32_t I __attribute__((vector_size(W * sizeof(int32_t))));
typedef uint32_t U __attribute__((vector_size(W * sizeof(uint32_t))));
typedef uint16_t H __attribute__((vector_size(W * sizeof(uint16_t))));

inline V splat(float x) { return V{} + x; }

// e^x for x <= 0 (a logit minus its row's max), within 2e-7 relative: x = n ln2 + r with |r| <= ln2 / 2, e^r by its
// Taylor polynomial of degree 6, 2^n written into the exponent bits; 0 below -87 (e^-87 ~ 1.6e-38).
inline V exp_neg(V x) {
    const V t = (x < splat(-87.f) ? splat(-87.f) : x) * splat(1.44269504f) + splat(0.5f);
    V n = __builtin_convertvector(__builtin_convertvector(t, I), V);
    n -= n > t ? splat(1.f) : splat(0.f);  // floor (the conversion truncates toward zero)
    const V r = x - n * splat(0.693145751953125f) - n * splat(1.428606765330187e-06f);
    V p = splat(1.f / 720);
    for (float c : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = p * r + splat(c);
    const I bits = (__builtin_convertvector(n, I) + 127) << 23;
    V scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return x < splat(-87.f) ? splat(0.f) : p * scale;
}

inline float bf16_to_float(uint16_t h) {
    const uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, as torch does
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

inline V load(const uint16_t* p) {
    H h;
    std::memcpy(&h, p, sizeof h);
    const U u = __builtin_convertvector(h, U) << 16;
    V v;
    std::memcpy(&v, &u, sizeof v);
    return v;
}

inline void store(uint16_t* p, V v) {
    U u;
    std::memcpy(&u, &v, sizeof u);
    const H h = __builtin_convertvector((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16, H);
    std::memcpy(p, &h, sizeof h);
}

// One row: returns its nll and leaves weight * (softmax - onehot(target)) in it.
float row_xent(uint16_t* row, int64_t vocab, int64_t target, float weight) {
    const int64_t body = vocab - vocab % W;
    V m = splat(-INFINITY);
    for (int64_t j = 0; j < body; j += W) {
        const V x = load(row + j);
        m = x > m ? x : m;
    }
    float top = -INFINITY;
    for (int l = 0; l < W; ++l) top = std::max(top, m[l]);
    for (int64_t j = body; j < vocab; ++j) top = std::max(top, bf16_to_float(row[j]));
    V s = {};
    for (int64_t j = 0; j < body; j += W) s += exp_neg(load(row + j) - splat(top));
    float total = 0.f;
    for (int l = 0; l < W; ++l) total += s[l];
    for (int64_t j = body; j < vocab; ++j) total += std::exp(bf16_to_float(row[j]) - top);
    const float picked = bf16_to_float(row[target]);
    const float scale = weight / total;
    for (int64_t j = 0; j < body; j += W) store(row + j, exp_neg(load(row + j) - splat(top)) * splat(scale));
    for (int64_t j = body; j < vocab; ++j) row[j] = float_to_bf16(std::exp(bf16_to_float(row[j]) - top) * scale);
    row[target] = float_to_bf16((std::exp(picked - top) / total - 1.f) * weight);
    return top + std::log(total) - picked;
}

}  // namespace

extern "C" {

// logits [rows, vocab] bf16 (as uint16), overwritten with the gradient; targets [rows] int64 (each in
// [0, vocab): the caller checks); weight [rows] fp32; nll [rows] fp32 out. Rows are shared among `threads`.
int xent_bf16(int64_t rows, int64_t vocab, int threads, uint16_t* logits, const int64_t* targets,
              const float* weight, float* nll) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < rows; ++i) nll[i] = row_xent(logits + i * vocab, vocab, targets[i], weight[i]);
    return 0;
}

}  // extern "C"
