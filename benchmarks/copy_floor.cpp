// The bandwidth floor of a fused optimizer step on the CPU: read param, grad, exp_avg and
// exp_avg_sq once and write param, exp_avg and exp_avg_sq once (28 bytes per parameter with
// float32 state, 20 with bfloat16 state, 16 with 8-bit codes), with one add per value and
// nothing else, as the operator ano_bench::copy_floor_.
//
// Built by benchmarks/kernels.py with torch.utils.cpp_extension and the fused kernel's flags
// (ano_optimizer/fused/native.py), and cut into units of work as the kernel cuts its tensors,
// so that the two differ only in arithmetic.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace {

inline float widen(uint16_t x) {
    const uint32_t bits = static_cast<uint32_t>(x) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

inline uint16_t narrow(float x) {
    uint32_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    return static_cast<uint16_t>(bits >> 16);
}

inline float add(float x, float g) { return x + g; }
inline uint16_t add(uint16_t x, float g) { return narrow(widen(x) + g); }
// A code's add: a byte add (a conversion through float would make the loop's arithmetic, not
// its memory, the limit).
inline uint8_t add(uint8_t x, float) { return static_cast<uint8_t>(x + 1); }

template <typename State>
void copy(float* __restrict__ param, const float* __restrict__ grad, State* __restrict__ exp_avg,
          State* __restrict__ exp_avg_sq, int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
        const float g = grad[i];
        param[i] = param[i] + g;
        exp_avg[i] = add(exp_avg[i], g);
        exp_avg_sq[i] = add(exp_avg_sq[i], g);
    }
}

template <typename State>
void run(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
         const at::Tensor& exp_avg_sq, int64_t unit) {
    float* p = param.mutable_data_ptr<float>();
    const float* g = grad.const_data_ptr<float>();
    State* m = static_cast<State*>(exp_avg.mutable_data_ptr());
    State* v = static_cast<State*>(exp_avg_sq.mutable_data_ptr());
    at::parallel_for(0, param.numel(), unit, [&](int64_t begin, int64_t end) {
        copy(p, g, m, v, begin, end);
    });
}

void copy_floor(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                const at::Tensor& exp_avg_sq, int64_t unit) {
    const int64_t n = param.numel();
    TORCH_CHECK(param.is_contiguous() && grad.is_contiguous() && exp_avg.is_contiguous() &&
                    exp_avg_sq.is_contiguous() && grad.numel() == n && exp_avg.numel() == n &&
                    exp_avg_sq.numel() == n && param.scalar_type() == at::kFloat &&
                    grad.scalar_type() == at::kFloat &&
                    exp_avg.scalar_type() == exp_avg_sq.scalar_type(),
                "copy_floor_: contiguous float32 param and grad, moments alike");
    switch (exp_avg.scalar_type()) {
        case at::kFloat: return run<float>(param, grad, exp_avg, exp_avg_sq, unit);
        case at::kBFloat16: return run<uint16_t>(param, grad, exp_avg, exp_avg_sq, unit);
        case at::kByte: return run<uint8_t>(param, grad, exp_avg, exp_avg_sq, unit);
        default: TORCH_CHECK(false, "copy_floor_: float32, bfloat16 or uint8 moments");
    }
}

}  // namespace

TORCH_LIBRARY(ano_bench, m) {
    m.def("copy_floor_(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
          "int unit) -> ()");
    m.impl("copy_floor_", c10::DispatchKey::CPU, &copy_floor);
}
