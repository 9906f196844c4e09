// The fused Ano/Anolog step for every float32 tensor of a parameter group, in one call.
//
// Compiled at run time by Inductor's C++ toolchain (the compiler, flags, OpenMP runtime and
// on-disk cache that torch.compile uses on CPU) with STATE_T set to float or uint16_t (the bits
// of a bfloat16). One OpenMP region covers all tensors: the work is cut into equal blocks and
// every block knows its tensor, so 161 small and large tensors cost one parallel region and one
// call from Python, not 161.
//
// The arithmetic is the float32 arithmetic of fused.py (_step_scalars for the per-tensor
// scalars, _ano_math for the elements), operation for operation and in the same order (the
// build uses -ffp-contract=off: no fused multiply-adds), so this kernel and the Inductor one
// produce the same bits. Tests check both against each other and the single-tensor path.

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

#ifndef STATE_T
#define STATE_T float
#endif

// benchmarks/fused_step.py builds this file a second time with COPY_FLOOR defined: the same
// call, tensors, blocks and threads, with the update replaced by one add per value. That is the
// bandwidth floor of a step over these very tensors, Python around the call included.
#ifdef COPY_FLOOR
constexpr bool kCopyFloor = true;
#else
constexpr bool kCopyFloor = false;
#endif

namespace {

inline uint32_t bits_of(float x) {
    uint32_t b;
    std::memcpy(&b, &x, sizeof b);
    return b;
}

inline float float_of(uint32_t b) {
    float x;
    std::memcpy(&x, &b, sizeof x);
    return x;
}

inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const uint16_t* p, int64_t i) { return float_of(static_cast<uint32_t>(p[i]) << 16); }

inline void store(float* p, int64_t i, float x, uint32_t) { p[i] = x; }

// Stochastic rounding to bfloat16: 16 random bits added below the kept half, then truncated.
inline void store(uint16_t* p, int64_t i, float x, uint32_t noise) {
    p[i] = static_cast<uint16_t>((bits_of(x) + noise) >> 16);
}

// fused.py's _hashed_noise is (index * A + seed) mod 2**16, a fresh seed every step. Only the
// low 16 bits of index * A matter, so a uint32 counter that starts at begin * A + offset and
// adds A per element gives the same noise with one vector add, where a product of the int64
// index took a conversion and a 32-bit multiply per vector (a quarter of the bf16 kernel).
constexpr uint32_t kNoiseMultiplier = 0x6A09u;
constexpr uint32_t kSignBit = 0x80000000u;

// torch.sign(x) * y, with torch.sign's sign(0) = sign(NaN) = 0 (so 0 * y: NaN for an infinite
// or NaN y, as in the other paths): 1 with x's sign bit, zeroed unless x < 0 or x > 0, times y.
// Bit operations and one ordered compare; the nested selects they replace took four compares
// and three blends per vector in GCC's code.
inline float sign_times(float x, float y) {
    const uint32_t nonzero = std::islessgreater(x, 0.0f) ? 0xFFFFFFFFu : 0u;
    return float_of((bits_of(1.0f) | (bits_of(x) & kSignBit)) & nonzero) * y;
}

// The flags are template parameters so that what they switch leaves the loop: as a run-time
// flag GCC kept maximize's negation in the bfloat16 loop, a blend per vector; and a multiply by
// an inv_scale or decay of exactly 1 changes no bit, so it is left out. With data in cache:
// +2.5 % elements/s with float32 state, +7 % with bfloat16 state.
template <bool kMaximize, bool kScaled, bool kDecayed>
void update_block(
    float* __restrict__ param,
    const float* __restrict__ grad,
    STATE_T* __restrict__ exp_avg,
    STATE_T* __restrict__ exp_avg_sq,
    int64_t begin,
    int64_t end,
    float momentum_weight,
    float correction,
    float lr,
    float beta2,
    float eps,
    float decay,
    float inv_scale,
    uint32_t offset_m,
    uint32_t offset_v) {
    const float one_minus_beta2 = 1.0f - beta2;
    const float eps_c = eps * correction;
    const float step_size = lr * correction;
    uint32_t noise_m = static_cast<uint32_t>(begin) * kNoiseMultiplier + offset_m;
    uint32_t noise_v = static_cast<uint32_t>(begin) * kNoiseMultiplier + offset_v;
    for (int64_t i = begin; i < end; ++i) {
        float g = grad[i];
        if constexpr (kScaled) g = g * inv_scale;
        if constexpr (kMaximize) g = -g;
        const float m = load(exp_avg, i);
        const float v = load(exp_avg_sq, i);
        const float p = param[i];
        if constexpr (kCopyFloor) {
            param[i] = p + g;
            store(exp_avg, i, m + g, 0u);
            store(exp_avg_sq, i, v + g, 0u);
            continue;
        }
        const float g2 = g * g;
        const float v_new = v + one_minus_beta2 * (sign_times(g2 - v, g2) - v);
        const float m_new = m + momentum_weight * (g - m);
        const float ratio = std::fabs(g) / (std::sqrt(v_new) + eps_c);
        const float kept = kDecayed ? p * decay : p;
        param[i] = kept - sign_times(m_new, step_size * ratio);
        store(exp_avg, i, m_new, noise_m & 0xFFFFu);
        store(exp_avg_sq, i, v_new, noise_v & 0xFFFFu);
        noise_m += kNoiseMultiplier;
        noise_v += kNoiseMultiplier;
    }
}

using Update = decltype(&update_block<false, false, false>);

// kUpdates[maximize][scaled][decayed]
constexpr Update kUpdates[2][2][2] = {
    {{update_block<false, false, false>, update_block<false, false, true>},
     {update_block<false, true, false>, update_block<false, true, true>}},
    {{update_block<true, false, false>, update_block<true, false, true>},
     {update_block<true, true, false>, update_block<true, true, true>}},
};

}  // namespace

// roles: the address (CPython's id) of a tuple of 5 lists of n tensors: params, grads,
// exp_avgs, exp_avg_sqs and float32 steps. tensor_data_ptr: the address of Inductor's
// void* (*)(PyObject*) that reads a tensor's data pointer, the one its own Python bindings use.
// Reading the 5 n addresses here costs ~2 us for ResNet-50's 161 tensors; doing it in Python
// and handing over an int64 tensor cost ~0.15 ms, 1 % of the step. Called with the GIL held.
// The scalars arrive rounded to float32 by the binding, as fused.py rounds its float64
// hyper-parameter tensor: lr, 1 - beta1, beta2, eps, weight_decay, 1 / grad scale; skip is 1
// when GradScaler found inf/nan. Block b covers elements
// [block_begin[b], block_begin[b] + block_size) of tensor block_tensor[b].
extern "C" void kernel(
    int64_t roles,
    int64_t tensor_data_ptr,
    const int64_t* numels,
    const int64_t* block_tensor,
    const int64_t* block_begin,
    float lr,
    float momentum_weight,
    float beta2,
    float eps,
    float weight_decay,
    float inv_scale,
    int64_t skip,
    int64_t tensors,
    int64_t blocks,
    int64_t block_size,
    int64_t maximize,
    int64_t logarithmic_schedule,
    int64_t seed) {
    // GradScaler found inf/nan: every tensor keeps its values and its step count.
    if (skip) return;
    const uint32_t offset_m = static_cast<uint32_t>(seed + 1 * 0x9E37) & 0xFFFFu;
    const uint32_t offset_v = static_cast<uint32_t>(seed + 2 * 0x9E37) & 0xFFFFu;

    const auto data_ptr = reinterpret_cast<void* (*)(PyObject*)>(tensor_data_ptr);
    PyObject* role_lists = reinterpret_cast<PyObject*>(roles);
    if (!PyTuple_Check(role_lists) || PyTuple_GET_SIZE(role_lists) != 5)
        throw std::runtime_error("roles must be a tuple of 5 lists");
    std::vector<char*> pointers(5 * tensors);
    for (int64_t k = 0; k < 5; ++k) {
        PyObject* role = PyTuple_GET_ITEM(role_lists, k);
        if (!PyList_Check(role) || PyList_GET_SIZE(role) != tensors)
            throw std::runtime_error("each role must be a list with one tensor per tensor");
        for (int64_t t = 0; t < tensors; ++t)
            pointers[k * tensors + t] = static_cast<char*>(data_ptr(PyList_GET_ITEM(role, t)));
    }

    // Per tensor: step += 1, then 1 - beta1_k and sqrt(1 - beta2^k) as _step_scalars computes
    // them on float32 0-d tensors (pow, neg, add 1, sqrt; Anolog: 1 / log(k + 2)).
    std::vector<float> weight(tensors), correction(tensors);
    for (int64_t t = 0; t < tensors; ++t) {
        float* step = reinterpret_cast<float*>(pointers[4 * tensors + t]);
        *step = *step + 1.0f;
        correction[t] = std::sqrt(-std::pow(beta2, *step) + 1.0f);
        weight[t] = logarithmic_schedule ? 1.0f / std::log(*step + 2.0f) : momentum_weight;
    }

    // Each thread takes a contiguous run of blocks holding an equal share of the elements. An
    // equal share of blocks (schedule(static)) is not one: a small tensor or the tail of a large
    // one is a short block, and they do not spread evenly. On ResNet-50's tensors the first half
    // of the 1,667 blocks held 12.1 M elements and the second 13.4 M, so one thread worked 10 %
    // longer than the other while it waited.
    const float decay = 1.0f - lr * weight_decay;
    const Update update = kUpdates[maximize != 0][inv_scale != 1.0f][decay != 1.0f];
    std::vector<int64_t> elements_before(blocks + 1, 0);
    for (int64_t b = 0; b < blocks; ++b) {
        const int64_t left = numels[block_tensor[b]] - block_begin[b];
        elements_before[b + 1] = elements_before[b] + (left < block_size ? left : block_size);
    }
#pragma omp parallel
    {
        const int64_t threads = omp_get_num_threads(), id = omp_get_thread_num();
        const int64_t total = elements_before[blocks];
        const auto first_at = [&](int64_t element) {
            return std::lower_bound(elements_before.begin(), elements_before.end() - 1, element) -
                elements_before.begin();
        };
        const int64_t first = first_at(total * id / threads);
        const int64_t last = first_at(total * (id + 1) / threads);
        for (int64_t b = first; b < last; ++b) {
            const int64_t t = block_tensor[b];
            const int64_t begin = block_begin[b];
            const int64_t end = begin + block_size < numels[t] ? begin + block_size : numels[t];
            update(
                reinterpret_cast<float*>(pointers[t]),
                reinterpret_cast<const float*>(pointers[1 * tensors + t]),
                reinterpret_cast<STATE_T*>(pointers[2 * tensors + t]),
                reinterpret_cast<STATE_T*>(pointers[3 * tensors + t]),
                begin,
                end,
                weight[t],
                correction[t],
                lr,
                beta2,
                eps,
                decay,
                inv_scale,
                offset_m,
                offset_v);
        }
    }
}
