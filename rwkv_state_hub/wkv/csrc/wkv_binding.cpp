// Python binding of the WKV kernels (wkv5.cu, wkv7.cu): checks shapes, dtypes and devices, allocates the
// outputs, and launches on the stream the caller passes (torch.cuda.current_stream().cuda_stream, under
// `with torch.cuda.device(...)`). Built on first use by rwkv_state_hub/wkv/cuda.py. Only torch's CPU-side
// headers and the CUDA runtime API are needed, so the file also compiles against a CPU build of torch.
#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>

#include <cuda_runtime_api.h>

#include <vector>

#include "wkv_chunk.h"

cudaError_t wkv5_forward_launch(bool bf16, int N, int B, int T, int H, const void* r, const void* k, const void* v,
                                const void* log_w, const float* u, const float* s0, void* y, float* s_out,
                                float* ckpt, cudaStream_t stream);
cudaError_t wkv5_backward_launch(bool bf16, int N, int B, int T, int H, const void* r, const void* k, const void* v,
                                 const void* log_w, const float* u, const float* ckpt, const void* gy,
                                 const float* gs_out, float* scratch, void* gr, void* gk, void* gv, void* glog_w,
                                 float* gs0, cudaStream_t stream);
cudaError_t wkv7_forward_launch(bool bf16, int N, int B, int T, int H, const void* r, const void* k, const void* v,
                                const void* log_w, const void* a, const void* b, const float* s0, void* y,
                                float* s_out, float* ckpt, cudaStream_t stream);
cudaError_t wkv7_backward_launch(bool bf16, int N, int B, int T, int H, const void* r, const void* k, const void* v,
                                 const void* log_w, const void* a, const void* b, const float* ckpt, const void* gy,
                                 const float* gs_out, float* scratch, void* gr, void* gk, void* gv, void* glog_w,
                                 void* ga, void* gb, float* gs0, cudaStream_t stream);

namespace {

// The kernels take CUDA tensors. tests/test_cuda.py also builds this binding with -DWKV_CPU_EMULATION over
// tests/wkv_cpu_emulator.cpp (the same kernels on CPU threads), which takes CPU tensors.
#ifdef WKV_CPU_EMULATION
constexpr bool kOnGpu = false;
#else
constexpr bool kOnGpu = true;
#endif

struct Dims {
    int B, T, H, N;
    bool bf16;
};

// r, k, v, log_w (, a, b, gy): same [B, T, H, N] shape and dtype (fp32 or bf16), contiguous, on one CUDA device.
Dims check_inputs(const std::vector<at::Tensor>& xs) {
    const auto& r = xs[0];
    TORCH_CHECK(r.dim() == 4, "wkv: inputs must be [B, T, H, N], got ", r.sizes());
    TORCH_CHECK(r.scalar_type() == at::kFloat || r.scalar_type() == at::kBFloat16,
                "wkv: inputs must be float32 or bfloat16, got ", r.scalar_type());
    for (const auto& x : xs) {
        TORCH_CHECK(x.is_cuda() == kOnGpu && x.device() == r.device(), "wkv: every input must be on ", r.device());
        TORCH_CHECK(x.sizes() == r.sizes(), "wkv: input shapes differ: ", x.sizes(), " vs ", r.sizes());
        TORCH_CHECK(x.scalar_type() == r.scalar_type(), "wkv: input dtypes differ");
        TORCH_CHECK(x.is_contiguous(), "wkv: inputs must be contiguous");
    }
    Dims d{static_cast<int>(r.size(0)), static_cast<int>(r.size(1)), static_cast<int>(r.size(2)),
           static_cast<int>(r.size(3)), r.scalar_type() == at::kBFloat16};
    TORCH_CHECK(d.N == 8 || d.N == 16 || d.N == 32 || d.N == 64, "wkv: head size must be 8, 16, 32 or 64, got ", d.N);
    TORCH_CHECK(d.T >= 1, "wkv: need at least one time step");
    return d;
}

void check_state(const at::Tensor& s, const Dims& d, const at::Tensor& like, const char* what) {
    TORCH_CHECK(s.is_cuda() == kOnGpu && s.device() == like.device(), "wkv: ", what, " must be on ", like.device());
    TORCH_CHECK(s.scalar_type() == at::kFloat && s.is_contiguous(), "wkv: ", what, " must be contiguous float32");
    TORCH_CHECK(s.dim() == 4 && s.size(0) == d.B && s.size(1) == d.H && s.size(2) == d.N && s.size(3) == d.N,
                "wkv: ", what, " must be [B, H, N, N] = [", d.B, ", ", d.H, ", ", d.N, ", ", d.N, "], got ", s.sizes());
}

void check_u(const at::Tensor& u, const Dims& d, const at::Tensor& like) {
    TORCH_CHECK(u.is_cuda() == kOnGpu && u.device() == like.device(), "wkv5: u must be on ", like.device());
    TORCH_CHECK(u.scalar_type() == at::kFloat && u.is_contiguous(), "wkv5: u must be contiguous float32");
    TORCH_CHECK(u.dim() == 2 && u.size(0) == d.H && u.size(1) == d.N, "wkv5: u must be [H, N], got ", u.sizes());
}

int n_chunks(const Dims& d) { return (d.T + WKV_CHUNK - 1) / WKV_CHUNK; }

at::Tensor state_like(const at::Tensor& like, std::initializer_list<int64_t> shape) {
    return at::empty(shape, like.options().dtype(at::kFloat));
}

cudaStream_t as_stream(int64_t stream) { return reinterpret_cast<cudaStream_t>(static_cast<intptr_t>(stream)); }

void check_launch(cudaError_t err, const char* what) {
    TORCH_CHECK(err == cudaSuccess, what, ": kernel launch failed: ", cudaGetErrorString(err));
}

// -> y, final state, checkpoints (empty unless save_checkpoints: the backward pass needs them)
std::vector<at::Tensor> wkv5_forward(at::Tensor r, at::Tensor k, at::Tensor v, at::Tensor log_w,
                                        at::Tensor u, at::Tensor s0, bool save_checkpoints,
                                        int64_t stream) {
    const Dims d = check_inputs({r, k, v, log_w});
    check_u(u, d, r);
    check_state(s0, d, r, "state");
    auto y = at::empty_like(r);
    auto s_out = state_like(r, {d.B, d.H, d.N, d.N});
    auto ckpt = save_checkpoints ? state_like(r, {d.B * d.H, n_chunks(d), d.N, d.N}) : state_like(r, {0});
    check_launch(wkv5_forward_launch(d.bf16, d.N, d.B, d.T, d.H, r.data_ptr(), k.data_ptr(), v.data_ptr(),
                                     log_w.data_ptr(), u.data_ptr<float>(), s0.data_ptr<float>(), y.data_ptr(),
                                     s_out.data_ptr<float>(), save_checkpoints ? ckpt.data_ptr<float>() : nullptr,
                                     as_stream(stream)),
                 "wkv5_forward");
    return {y, s_out, ckpt};
}

// -> gradients to r, k, v, log_w and the initial state
std::vector<at::Tensor> wkv5_backward(at::Tensor r, at::Tensor k, at::Tensor v, at::Tensor log_w,
                                         at::Tensor u, at::Tensor ckpt, at::Tensor gy, at::Tensor gs_out,
                                         int64_t stream) {
    const Dims d = check_inputs({r, k, v, log_w, gy});
    check_u(u, d, r);
    check_state(gs_out, d, r, "final state gradient");
    TORCH_CHECK(ckpt.numel() == static_cast<int64_t>(d.B) * d.H * n_chunks(d) * d.N * d.N,
                "wkv5_backward: checkpoints of the wrong size (was the forward run with save_checkpoints?)");
    auto scratch = state_like(r, {d.B * d.H, WKV_CHUNK, d.N, d.N});
    auto gr = at::empty_like(r), gk = at::empty_like(r), gv = at::empty_like(r), gw = at::empty_like(r);
    auto gs0 = state_like(r, {d.B, d.H, d.N, d.N});
    check_launch(wkv5_backward_launch(d.bf16, d.N, d.B, d.T, d.H, r.data_ptr(), k.data_ptr(), v.data_ptr(),
                                      log_w.data_ptr(), u.data_ptr<float>(), ckpt.data_ptr<float>(), gy.data_ptr(),
                                      gs_out.data_ptr<float>(), scratch.data_ptr<float>(), gr.data_ptr(),
                                      gk.data_ptr(), gv.data_ptr(), gw.data_ptr(), gs0.data_ptr<float>(),
                                      as_stream(stream)),
                 "wkv5_backward");
    return {gr, gk, gv, gw, gs0};
}

std::vector<at::Tensor> wkv7_forward(at::Tensor r, at::Tensor k, at::Tensor v, at::Tensor log_w,
                                        at::Tensor a, at::Tensor b, at::Tensor s0, bool save_checkpoints,
                                        int64_t stream) {
    const Dims d = check_inputs({r, k, v, log_w, a, b});
    check_state(s0, d, r, "state");
    auto y = at::empty_like(r);
    auto s_out = state_like(r, {d.B, d.H, d.N, d.N});
    auto ckpt = save_checkpoints ? state_like(r, {d.B * d.H, n_chunks(d), d.N, d.N}) : state_like(r, {0});
    check_launch(wkv7_forward_launch(d.bf16, d.N, d.B, d.T, d.H, r.data_ptr(), k.data_ptr(), v.data_ptr(),
                                     log_w.data_ptr(), a.data_ptr(), b.data_ptr(), s0.data_ptr<float>(), y.data_ptr(),
                                     s_out.data_ptr<float>(), save_checkpoints ? ckpt.data_ptr<float>() : nullptr,
                                     as_stream(stream)),
                 "wkv7_forward");
    return {y, s_out, ckpt};
}

// -> gradients to r, k, v, log_w, a, b and the initial state
std::vector<at::Tensor> wkv7_backward(at::Tensor r, at::Tensor k, at::Tensor v, at::Tensor log_w,
                                         at::Tensor a, at::Tensor b, at::Tensor ckpt, at::Tensor gy,
                                         at::Tensor gs_out, int64_t stream) {
    const Dims d = check_inputs({r, k, v, log_w, a, b, gy});
    check_state(gs_out, d, r, "final state gradient");
    TORCH_CHECK(ckpt.numel() == static_cast<int64_t>(d.B) * d.H * n_chunks(d) * d.N * d.N,
                "wkv7_backward: checkpoints of the wrong size (was the forward run with save_checkpoints?)");
    auto scratch = state_like(r, {d.B * d.H, WKV_CHUNK, d.N, d.N});
    auto gr = at::empty_like(r), gk = at::empty_like(r), gv = at::empty_like(r), gw = at::empty_like(r);
    auto ga = at::empty_like(r), gb = at::empty_like(r);
    auto gs0 = state_like(r, {d.B, d.H, d.N, d.N});
    check_launch(wkv7_backward_launch(d.bf16, d.N, d.B, d.T, d.H, r.data_ptr(), k.data_ptr(), v.data_ptr(),
                                      log_w.data_ptr(), a.data_ptr(), b.data_ptr(), ckpt.data_ptr<float>(),
                                      gy.data_ptr(), gs_out.data_ptr<float>(), scratch.data_ptr<float>(),
                                      gr.data_ptr(), gk.data_ptr(), gv.data_ptr(), gw.data_ptr(), ga.data_ptr(),
                                      gb.data_ptr(), gs0.data_ptr<float>(), as_stream(stream)),
                 "wkv7_backward");
    return {gr, gk, gv, gw, ga, gb, gs0};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "RWKV WKV kernels with a state input and a state gradient (rwkv-state-hub)";
    m.attr("chunk") = WKV_CHUNK;
    m.def("wkv5_forward", &wkv5_forward, "RWKV-5.2/6 WKV forward -> (y, final state, checkpoints)");
    m.def("wkv5_backward", &wkv5_backward, "RWKV-5.2/6 WKV backward -> (gr, gk, gv, glog_w, gstate)");
    m.def("wkv7_forward", &wkv7_forward, "RWKV-7 WKV forward -> (y, final state, checkpoints)");
    m.def("wkv7_backward", &wkv7_backward, "RWKV-7 WKV backward -> (gr, gk, gv, glog_w, ga, gb, gstate)");
}
