// The bandwidth floor of a fused optimizer step on CPU: read param, grad, exp_avg and
// exp_avg_sq once and write param, exp_avg and exp_avg_sq once (28 bytes per parameter with
// float32 state, 20 with bfloat16 state, 16 with 8-bit codes), with one add per value and
// nothing else.
//
// Built by ano_optimizer._torch_internals.build_cpu_kernel, the toolchain and flags of the fused
// Ano kernel (ano_optimizer/fused/cpu_kernel.cpp), and cut into the same OpenMP blocks, so the two differ
// only in arithmetic. STATE_T is float, uint16_t (the bits of a bfloat16, truncated) or uint8_t
// (a code; the 8-bit step's block scales add 2 * 8 / 256 bytes per parameter).

#include <cstdint>
#include <cstring>

#ifndef STATE_T
#define STATE_T float
#endif

namespace {

inline float load(const float* p, int64_t i) { return p[i]; }

inline float load(const uint16_t* p, int64_t i) {
    const uint32_t bits = static_cast<uint32_t>(p[i]) << 16;
    float x;
    std::memcpy(&x, &bits, sizeof x);
    return x;
}

inline void store(float* p, int64_t i, float x) { p[i] = x; }

inline void store(uint16_t* p, int64_t i, float x) {
    uint32_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    p[i] = static_cast<uint16_t>(bits >> 16);
}

// The state's one add per value: of the gradient, or of 1 to a code (a byte add, where a
// conversion through float would make the loop's arithmetic, not its memory, the limit).
template <typename State>
inline void add(State* p, int64_t i, float g) { store(p, i, load(p, i) + g); }

inline void add(uint8_t* p, int64_t i, float) { p[i] = static_cast<uint8_t>(p[i] + 1); }

}  // namespace

extern "C" void kernel(
    float* __restrict__ param,
    const float* __restrict__ grad,
    STATE_T* __restrict__ exp_avg,
    STATE_T* __restrict__ exp_avg_sq,
    int64_t numel,
    int64_t block_size) {
    const int64_t blocks = (numel + block_size - 1) / block_size;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
        const int64_t begin = b * block_size;
        const int64_t end = begin + block_size < numel ? begin + block_size : numel;
        for (int64_t i = begin; i < end; ++i) {
            const float g = grad[i];
            param[i] = param[i] + g;
            add(exp_avg, i, g);
            add(exp_avg_sq, i, g);
        }
    }
}
