// The CPU implementation of the operator ano::fused_step_ (schema and torch implementation:
// op.py, torch_step.py): one call updates every tensor of a parameter group (fused_step_.groups:
// of several groups, each with its options) in place, reading each parameter, gradient and both
// moments once and writing the three updated tensors once.
//
// native.py builds this file with torch.utils.cpp_extension on first use, with -march=native:
// the loops below are plain C++ over contiguous memory that the compiler vectorizes for the
// instructions of the machine it runs on (AVX2, AVX-512, NEON, ...), one source for every CPU
// (why not at::vec::Vectorized: benchmarks/README.md). One exception: on AVX2 without AVX-512,
// whole blocks of 8-bit codes run an intrinsics form of the same loops (see "AVX2" below).
//
// Every operation is torch_step.py's, in the same order and in float32 (the build has
// -ffp-contract=off: no fused multiply-adds), so the two implementations write the same bits;
// tests/test_fused.py holds them to it. The per-tensor scalars are computed in double from the
// step count (libm's pow, sqrt and log, as Python's float arithmetic) and rounded once.
//
// The kernel checks every tensor before anything changes: devices, layouts, dtypes, sizes,
// strides, storage extents, inference and zero tensors, the scales' shapes. A tensor it cannot
// take (a dtype or layout without a loop here) raises NotImplementedError, an invalid one
// ValueError; either way nothing has changed, and the Python dispatch (fused/__init__.py) then
// checks in Python and steps such tensors with the torch implementation.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/core/GradMode.h>
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <optional>
#include <string>
#include <vector>

// x86 CPUs with AVX2 but not AVX-512 (see "AVX2" below).
#if defined(__AVX2__) && !defined(__AVX512F__)
#define ANO_AVX2_LOOPS 1
#include <immintrin.h>
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

// ---------------------------------------------------------------------------------------------
// The update of one element.

// A tensor's float32 scalars for this step, rounded as torch_step.py rounds them.
struct Scalars {
    float weight;           // 1 - beta1_k
    float one_minus_beta2;  // 1 - beta2
    float eps_c;            // eps * sqrt(1 - beta2^k)
    float step_size;        // lr * sqrt(1 - beta2^k)
    float decay;            // 1 - lr * weight_decay
    float inv_scale;        // 1 / GradScaler's scale
    uint32_t negate;        // the sign bit, to maximize
};

// A tensor's rounding noise for this step: element i's 16 bits are (i * A + B) mod 2**16, for
// exp_avg (m) and exp_avg_sq (v) (rounding.py).
struct Noise {
    uint32_t m_multiplier, m_offset, v_multiplier, v_offset;
};

// torch.sign(x) * y, with sign(0) = sign(NaN) = 0 (so 0 * y: NaN for an infinite or NaN y): 1
// with x's sign bit, zeroed unless x < 0 or x > 0 (an ordered compare: false for NaN), times y.
inline float sign_times(float x, float y) {
    const uint32_t nonzero = std::islessgreater(x, 0.0f) ? 0xFFFFFFFFu : 0u;
    return float_of((bits_of(1.0f) | (bits_of(x) & 0x80000000u)) & nonzero) * y;
}

// Which multiplies by 1 a call leaves out: by 1 / grad scale (no GradScaler) and by
// 1 - lr * weight_decay (no decay). x * 1 is x, so the results are the same bits, and the
// common case does less work.
template <bool kScaled, bool kDecayed>
struct Flags {
    static constexpr bool scaled = kScaled;
    static constexpr bool decayed = kDecayed;
};

// The update: returns the new parameter, sets the new moments.
template <class F>
inline float update(float p, float grad, float m, float v, const Scalars& c, float& m_new,
                    float& v_new) {
    const float g = float_of(bits_of(F::scaled ? grad * c.inv_scale : grad) ^ c.negate);
    const float g2 = g * g;
    v_new = v + c.one_minus_beta2 * (sign_times(g2 - v, g2) - v);
    m_new = m + c.weight * (g - m);
    const float ratio = std::fabs(g) / (std::sqrt(v_new) + c.eps_c);
    return (F::decayed ? p * c.decay : p) - sign_times(m_new, c.step_size * ratio);
}

// Elements [begin, end) of a tensor with float32 moments.
template <class F>
void update_float32(float* __restrict__ param, const float* __restrict__ grad,
                    float* __restrict__ exp_avg, float* __restrict__ exp_avg_sq, int64_t begin,
                    int64_t end, const Scalars& scalars) {
    const Scalars c = scalars;  // a copy the stores below cannot alias: held in registers
    for (int64_t i = begin; i < end; ++i) {
        float m_new, v_new;
        param[i] = update<F>(param[i], grad[i], exp_avg[i], exp_avg_sq[i], c, m_new, v_new);
        exp_avg[i] = m_new;
        exp_avg_sq[i] = v_new;
    }
}

// Elements [begin, end) of a tensor with bfloat16 moments: widened (exactly), updated, and
// narrowed with stochastic rounding: 16 noise bits added below the kept half, then truncated.
template <class F>
void update_bfloat16(float* __restrict__ param, const float* __restrict__ grad,
                     uint16_t* __restrict__ exp_avg, uint16_t* __restrict__ exp_avg_sq,
                     int64_t begin, int64_t end, const Scalars& scalars, const Noise& noise) {
    const Scalars c = scalars;
    const uint32_t m_step = noise.m_multiplier, v_step = noise.v_multiplier;
    // Only the low 16 bits of i * A + B count: counters stepped by A serve.
    uint32_t m_noise = static_cast<uint32_t>(begin) * m_step + noise.m_offset;
    uint32_t v_noise = static_cast<uint32_t>(begin) * v_step + noise.v_offset;
    for (int64_t i = begin; i < end; ++i) {
        float m_new, v_new;
        param[i] = update<F>(param[i], grad[i], float_of(static_cast<uint32_t>(exp_avg[i]) << 16),
                          float_of(static_cast<uint32_t>(exp_avg_sq[i]) << 16), c, m_new, v_new);
        exp_avg[i] = static_cast<uint16_t>((bits_of(m_new) + (m_noise & 0xFFFFu)) >> 16);
        exp_avg_sq[i] = static_cast<uint16_t>((bits_of(v_new) + (v_noise & 0xFFFFu)) >> 16);
        m_noise += m_step;
        v_noise += v_step;
    }
}

// rounding.noise_parameters: (A, B) for a step count and stream (1: exp_avg, 2: exp_avg_sq).
uint64_t noise_hash(uint64_t step, uint64_t key) {
    constexpr uint64_t kMask32 = 0xFFFFFFFFu;
    uint64_t x = (step * 0x1E3779B1u + key * 0x05EBCA77u) & kMask32;
    x ^= x >> 16;
    x = (x * 0x7FEB352Du) & kMask32;
    x ^= x >> 15;
    x = (x * 0x2C1B3C6Du) & kMask32;
    return x ^ (x >> 16);
}

void noise_parameters(double step, uint64_t stream, uint32_t& multiplier, uint32_t& offset) {
    // A whole number in any real run; a non-finite or huge one (a corrupted state) must not
    // reach an undefined float-to-integer conversion.
    const bool countable = std::isfinite(step) && std::fabs(step) < 9.0e18;
    const uint64_t count = countable ? static_cast<uint64_t>(static_cast<int64_t>(step)) : 0;
    multiplier = static_cast<uint32_t>((noise_hash(count, 2 * stream + 1) & 0x7FFFu) | 1u);
    offset = static_cast<uint32_t>(noise_hash(count, 2 * stream) & 0xFFFFu);
}

// ---------------------------------------------------------------------------------------------
// 8-bit moments (blockwise8.py's format): per block of kCodeBlock elements of a row, the codes
// are decoded, the elements updated, the block's new scales found and the codes encoded again.
//
// A code's bits shifted into a float32 (exp_avg's bit 7 to the sign bit, the others to the top
// of the exponent field: a tiny float, subnormal where its exponent is 0), times 2**96 and the
// block's scale, is its value; exp_avg keeps a sign, 5 exponent and 2 mantissa bits, exp_avg_sq
// 5 exponent and 3 mantissa bits.
constexpr int64_t kCodeBlock = 256;
constexpr float kRescale = 0x1p96f;
constexpr float kUnscale = 0x1p-96f;
// Scales up to this fold 2**-96 into the encoding's inverse (inverse * 2**-96 is then exact).
constexpr float kFoldLimit = 0x1p30f;

inline float decode_signed(uint8_t code) {
    const uint32_t c = code;
    return float_of(((c & 0x80u) << 24) | ((c & 0x7Fu) << 21));
}

inline float decode_unsigned(uint8_t code) { return float_of(static_cast<uint32_t>(code) << 20); }

// ---------------------------------------------------------------------------------------------
// AVX2 (x86 without AVX-512): whole blocks of codes in 8-lane vectors. GCC vectorizes the
// portable loops below 32 elements an iteration (the width of a byte vector), which spills
// AVX2's 16 vector registers; these take 8 at a time (benchmarks/README.md has the figures).
// The same operations in the same order as the scalar code, so the same bits: an AVX2 build's
// results are compared with the torch implementation's by tests/test_fused.py as every build's
// are. AVX-512 and NEON builds vectorize the portable loops well and run them.
#ifdef ANO_AVX2_LOOPS
// A tensor's Scalars in every lane.
struct Scalars8 {
    __m256 weight, one_minus_beta2, eps_c, step_size, decay, inv_scale, negate;
    explicit Scalars8(const Scalars& c)
        : weight(_mm256_set1_ps(c.weight)), one_minus_beta2(_mm256_set1_ps(c.one_minus_beta2)),
          eps_c(_mm256_set1_ps(c.eps_c)), step_size(_mm256_set1_ps(c.step_size)),
          decay(_mm256_set1_ps(c.decay)), inv_scale(_mm256_set1_ps(c.inv_scale)),
          negate(_mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(c.negate)))) {}
};

inline __m256i splat(uint32_t x) { return _mm256_set1_epi32(static_cast<int>(x)); }

// sign_times of 8 lanes.
inline __m256 sign_times8(__m256 x, __m256 y) {
    const __m256 nonzero = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_NEQ_OQ);
    const __m256 sign = _mm256_and_ps(x, _mm256_castsi256_ps(splat(0x80000000u)));
    return _mm256_mul_ps(_mm256_and_ps(_mm256_or_ps(_mm256_set1_ps(1.0f), sign), nonzero), y);
}

// update of 8 lanes.
template <class F>
inline __m256 update8(__m256 p, __m256 grad, __m256 m, __m256 v, const Scalars8& c,
                      __m256& m_new, __m256& v_new) {
    const __m256 g =
        _mm256_xor_ps(F::scaled ? _mm256_mul_ps(grad, c.inv_scale) : grad, c.negate);
    const __m256 g2 = _mm256_mul_ps(g, g);
    v_new = _mm256_add_ps(
        v, _mm256_mul_ps(c.one_minus_beta2,
                         _mm256_sub_ps(sign_times8(_mm256_sub_ps(g2, v), g2), v)));
    m_new = _mm256_add_ps(m, _mm256_mul_ps(c.weight, _mm256_sub_ps(g, m)));
    const __m256 magnitude = _mm256_and_ps(g, _mm256_castsi256_ps(splat(0x7FFFFFFFu)));
    const __m256 ratio =
        _mm256_div_ps(magnitude, _mm256_add_ps(_mm256_sqrt_ps(v_new), c.eps_c));
    return _mm256_sub_ps(F::decayed ? _mm256_mul_ps(p, c.decay) : p,
                         sign_times8(m_new, _mm256_mul_ps(c.step_size, ratio)));
}

// update_block over a whole block.
template <class F, bool kFolded>
void update_block_avx2(float* __restrict__ param, const float* __restrict__ grad,
                       const uint8_t* __restrict__ m_codes, const uint8_t* __restrict__ v_codes,
                       float m_scale, float v_scale, const Scalars& scalars,
                       float* __restrict__ m_out, float* __restrict__ v_out, uint32_t& m_largest,
                       uint32_t& v_largest) {
    const Scalars8 c(scalars);
    const __m256 m_by = _mm256_set1_ps(kFolded ? m_scale * kRescale : m_scale);
    const __m256 v_by = _mm256_set1_ps(kFolded ? v_scale * kRescale : v_scale);
    const __m256 rescale = _mm256_set1_ps(kRescale);
    const __m256i magnitude = splat(0x7FFFFFFFu);
    __m256i m_max = _mm256_setzero_si256(), v_max = _mm256_setzero_si256();
    for (int64_t j = 0; j < kCodeBlock; j += 8) {
        // decode_signed: a sign-extended code shifted left by 21 has the code's low 7 bits at
        // 21-27 and its bit 7 from 28 up, of which bit 31 is kept.
        const __m256i m_code = _mm256_cvtepi8_epi32(
            _mm_loadl_epi64(reinterpret_cast<const __m128i*>(m_codes + j)));
        const __m256i v_code = _mm256_cvtepu8_epi32(
            _mm_loadl_epi64(reinterpret_cast<const __m128i*>(v_codes + j)));
        const __m256 m_tiny = _mm256_castsi256_ps(
            _mm256_and_si256(_mm256_slli_epi32(m_code, 21), splat(0x8FE00000u)));
        const __m256 v_tiny = _mm256_castsi256_ps(_mm256_slli_epi32(v_code, 20));
        const __m256 m = kFolded ? _mm256_mul_ps(m_tiny, m_by)
                                 : _mm256_mul_ps(_mm256_mul_ps(m_tiny, rescale), m_by);
        const __m256 v = kFolded ? _mm256_mul_ps(v_tiny, v_by)
                                 : _mm256_mul_ps(_mm256_mul_ps(v_tiny, rescale), v_by);
        __m256 m_new, v_new;
        _mm256_storeu_ps(param + j, update8<F>(_mm256_loadu_ps(param + j),
                                               _mm256_loadu_ps(grad + j), m, v, c, m_new,
                                               v_new));
        _mm256_store_ps(m_out + j, m_new);
        _mm256_store_ps(v_out + j, v_new);
        m_max = _mm256_max_epu32(m_max, _mm256_and_si256(_mm256_castps_si256(m_new), magnitude));
        v_max = _mm256_max_epu32(v_max, _mm256_and_si256(_mm256_castps_si256(v_new), magnitude));
    }
    alignas(32) uint32_t lanes[16];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), m_max);
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes + 8), v_max);
    m_largest = *std::max_element(lanes, lanes + 8);
    v_largest = *std::max_element(lanes + 8, lanes + 16);
}

// Four vectors of 8 values in 0-255, stored as 32 bytes in order: the packs interleave the
// vectors' 128-bit halves, the permutation puts them back.
inline void store_bytes(uint8_t* out, __m256i a, __m256i b, __m256i c, __m256i d) {
    const __m256i bytes =
        _mm256_packus_epi16(_mm256_packus_epi32(a, b), _mm256_packus_epi32(c, d));
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out),
                        _mm256_permutevar8x32_epi32(bytes, order));
}

// encode_block over a whole block, 32 elements an iteration (for store_bytes).
template <bool kMFolded, bool kVFolded>
void encode_block_avx2(const float* __restrict__ m, const float* __restrict__ v, float m_factor,
                       float v_factor, uint8_t* __restrict__ m_codes,
                       uint8_t* __restrict__ v_codes, uint32_t noise_first,
                       uint32_t multiplier) {
    const __m256 m_by = _mm256_set1_ps(m_factor), v_by = _mm256_set1_ps(v_factor);
    const __m256 unscale = _mm256_set1_ps(kUnscale);
    const __m256i magnitude = splat(0x7FFFFFFFu);
    // Lane j's noise counter starts at noise_first + j * multiplier.
    __m256i noise_next = _mm256_add_epi32(
        splat(noise_first), _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                               splat(multiplier)));
    const __m256i noise_step = splat(8 * multiplier);
    for (int64_t j = 0; j < kCodeBlock; j += 32) {
        __m256i m_code[4], v_code[4];
        for (int q = 0; q < 4; ++q) {
            const __m256 mq = _mm256_mul_ps(_mm256_load_ps(m + j + 8 * q), m_by);
            const __m256i m_bits = _mm256_castps_si256(kMFolded ? mq : _mm256_mul_ps(mq, unscale));
            const __m256i m_rounded =
                _mm256_add_epi32(_mm256_and_si256(m_bits, magnitude), splat(0x8000u << 5));
            m_code[q] = _mm256_or_si256(
                _mm256_min_epu32(_mm256_srli_epi32(m_rounded, 21), splat(127u)),
                _mm256_and_si256(_mm256_srli_epi32(m_bits, 24), splat(0x80u)));
            const __m256 vq = _mm256_mul_ps(_mm256_load_ps(v + j + 8 * q), v_by);
            const __m256i v_bits = _mm256_castps_si256(kVFolded ? vq : _mm256_mul_ps(vq, unscale));
            const __m256i noise =
                _mm256_slli_epi32(_mm256_and_si256(noise_next, splat(0xFFFFu)), 4);
            noise_next = _mm256_add_epi32(noise_next, noise_step);
            const __m256i v_rounded = _mm256_add_epi32(_mm256_and_si256(v_bits, magnitude), noise);
            v_code[q] = _mm256_min_epu32(_mm256_srli_epi32(v_rounded, 20), splat(255u));
        }
        store_bytes(m_codes + j, m_code[0], m_code[1], m_code[2], m_code[3]);
        store_bytes(v_codes + j, v_code[0], v_code[1], v_code[2], v_code[3]);
    }
}
#endif

// Decodes, updates and keeps the new moments of n elements; returns the largest magnitudes of
// the new moments as the integer maximum of their bits: the order of non-negative floats, with
// NaN above infinity, as torch's amax propagates NaN. A decoded value is (tiny * 2**96) * scale;
// while scale * 2**96 is finite, tiny * (scale * 2**96) is the same real product rounded once,
// so the same float: one multiply instead of two.
template <class F, bool kFolded, int64_t kN>
void update_block(float* __restrict__ param, const float* __restrict__ grad,
                  const uint8_t* __restrict__ m_codes, const uint8_t* __restrict__ v_codes,
                  float m_scale, float v_scale, int64_t n, const Scalars& scalars,
                  float* __restrict__ m_out, float* __restrict__ v_out, uint32_t& m_largest,
                  uint32_t& v_largest) {
#ifdef ANO_AVX2_LOOPS
    if constexpr (kN == kCodeBlock) {
        update_block_avx2<F, kFolded>(param, grad, m_codes, v_codes, m_scale, v_scale, scalars,
                                      m_out, v_out, m_largest, v_largest);
        return;
    }
#endif
    const Scalars c = scalars;
    const float m_by = kFolded ? m_scale * kRescale : m_scale;
    const float v_by = kFolded ? v_scale * kRescale : v_scale;
    uint32_t m_max = 0, v_max = 0;
    const int64_t count = kN > 0 ? kN : n;
    for (int64_t j = 0; j < count; ++j) {
        const float m = kFolded ? decode_signed(m_codes[j]) * m_by
                                : decode_signed(m_codes[j]) * kRescale * m_by;
        const float v = kFolded ? decode_unsigned(v_codes[j]) * v_by
                                : decode_unsigned(v_codes[j]) * kRescale * v_by;
        float m_new, v_new;
        param[j] = update<F>(param[j], grad[j], m, v, c, m_new, v_new);
        m_out[j] = m_new;
        v_out[j] = v_new;
        m_max = std::max(m_max, bits_of(m_new) & 0x7FFFFFFFu);
        v_max = std::max(v_max, bits_of(v_new) & 0x7FFFFFFFu);
    }
    m_largest = m_max;
    v_largest = v_max;
}

// unit = x * (inverse * 2**-96) where the scale is at most kFoldLimit (one rounding), else
// (x * inverse) * 2**-96, as blockwise8.quantize. exp_avg rounds to nearest (half of the 21
// bits cut); exp_avg_sq stochastically (16 noise bits above the lowest 4 of the 20 cut). The
// magnitude's bits plus the rounding bits stay below 2**32, and NaN's magnitude saturates.
template <bool kMFolded, bool kVFolded, int64_t kN>
void encode_block(const float* __restrict__ m, const float* __restrict__ v, float m_by,
                  float v_by, uint8_t* __restrict__ m_codes, uint8_t* __restrict__ v_codes,
                  int64_t n, uint32_t noise_first, uint32_t multiplier) {
#ifdef ANO_AVX2_LOOPS
    if constexpr (kN == kCodeBlock) {
        encode_block_avx2<kMFolded, kVFolded>(m, v, m_by, v_by, m_codes, v_codes, noise_first,
                                              multiplier);
        return;
    }
#endif
    // A 32-bit index, and the noise as a counter stepped by the multiplier (only its low 16
    // bits count): a 64-bit index would have the vectorized loop narrow a vector of 64-bit
    // indices every iteration, and j * multiplier costs a vector multiply.
    const uint32_t count = static_cast<uint32_t>(kN > 0 ? kN : n);
    uint32_t noise_next = noise_first;
    for (uint32_t j = 0; j < count; ++j) {
        const uint32_t m_bits = bits_of(kMFolded ? m[j] * m_by : m[j] * m_by * kUnscale);
        m_codes[j] = static_cast<uint8_t>(
            std::min(((m_bits & 0x7FFFFFFFu) + (0x8000u << 5)) >> 21, 127u) |
            ((m_bits >> 24) & 0x80u));
        const uint32_t v_bits = bits_of(kVFolded ? v[j] * v_by : v[j] * v_by * kUnscale);
        const uint32_t noise = noise_next & 0xFFFFu;
        noise_next += multiplier;
        v_codes[j] = static_cast<uint8_t>(
            std::min(((v_bits & 0x7FFFFFFFu) + (noise << 4)) >> 20, 255u));
    }
}

template <int64_t kN>
void encode(const float* m, const float* v, float m_scale, float v_scale, uint8_t* m_codes,
            uint8_t* v_codes, int64_t n, uint32_t noise_first, uint32_t multiplier) {
    const float m_inverse = m_scale > 0.0f ? 1.0f / m_scale : 0.0f;
    const float v_inverse = v_scale > 0.0f ? 1.0f / v_scale : 0.0f;
    const bool m_folded = m_scale <= kFoldLimit, v_folded = v_scale <= kFoldLimit;
    const float m_by = m_folded ? m_inverse * kUnscale : m_inverse;
    const float v_by = v_folded ? v_inverse * kUnscale : v_inverse;
    if (m_folded && v_folded)
        encode_block<true, true, kN>(m, v, m_by, v_by, m_codes, v_codes, n, noise_first, multiplier);
    else if (m_folded)
        encode_block<true, false, kN>(m, v, m_by, v_by, m_codes, v_codes, n, noise_first, multiplier);
    else if (v_folded)
        encode_block<false, true, kN>(m, v, m_by, v_by, m_codes, v_codes, n, noise_first, multiplier);
    else
        encode_block<false, false, kN>(m, v, m_by, v_by, m_codes, v_codes, n, noise_first, multiplier);
}

// One block of a row: n elements from first, its scales at b.
template <class F, int64_t kN>
void step_block(float* param, const float* grad, uint8_t* exp_avg, uint8_t* exp_avg_sq,
                float* exp_avg_scale, float* exp_avg_sq_scale, int64_t first, int64_t n,
                int64_t b, int64_t noise_offset, const Scalars& c, const Noise& noise) {
    alignas(64) float m[kCodeBlock];
    alignas(64) float v[kCodeBlock];
    const float m_scale = exp_avg_scale[b], v_scale = exp_avg_sq_scale[b];
    uint32_t m_largest, v_largest;
    // NaN compares false: folded, NaN either way.
    if (m_scale >= 0x1p32f || v_scale >= 0x1p32f)
        update_block<F, false, kN>(param + first, grad + first, exp_avg + first, exp_avg_sq + first,
                                m_scale, v_scale, n, c, m, v, m_largest, v_largest);
    else
        update_block<F, true, kN>(param + first, grad + first, exp_avg + first, exp_avg_sq + first,
                               m_scale, v_scale, n, c, m, v, m_largest, v_largest);
    const float m_new_scale = float_of(m_largest), v_new_scale = float_of(v_largest);
    exp_avg_scale[b] = m_new_scale;
    exp_avg_sq_scale[b] = v_new_scale;
    const uint32_t noise_first =
        static_cast<uint32_t>(noise_offset + first) * noise.v_multiplier + noise.v_offset;
    encode<kN>(m, v, m_new_scale, v_new_scale, exp_avg + first, exp_avg_sq + first, n,
               noise_first, noise.v_multiplier);
}

// Rows [row_begin, row_end) of a tensor of cols columns with 8-bit moments.
template <class F>
void update_codes(float* param, const float* grad, uint8_t* exp_avg, uint8_t* exp_avg_sq,
                  float* exp_avg_scale, float* exp_avg_sq_scale, int64_t row_begin,
                  int64_t row_end, int64_t cols, int64_t noise_offset, const Scalars& c,
                  const Noise& noise) {
    const int64_t row_blocks = (cols + kCodeBlock - 1) / kCodeBlock;
    for (int64_t row = row_begin; row < row_end; ++row) {
        for (int64_t k = 0; k < row_blocks; ++k) {
            const int64_t first = row * cols + k * kCodeBlock;
            const int64_t n = std::min(kCodeBlock, cols - k * kCodeBlock);
            if (n == kCodeBlock)
                step_block<F, kCodeBlock>(param, grad, exp_avg, exp_avg_sq, exp_avg_scale,
                                       exp_avg_sq_scale, first, n, row * row_blocks + k,
                                       noise_offset, c, noise);
            else
                step_block<F, 0>(param, grad, exp_avg, exp_avg_sq, exp_avg_scale, exp_avg_sq_scale,
                              first, n, row * row_blocks + k, noise_offset, c, noise);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Checks.

enum class Moments { Float32, BFloat16, Codes };

const char* const kRoleNames[] = {"params", "grads", "exp_avgs", "exp_avg_sqs", "state_steps",
                                  "exp_avg_scales", "exp_avg_sq_scales"};

std::string where(int role, int64_t t) {
    return std::string("ano::fused_step_: ") + kRoleNames[role] + "[" + std::to_string(t) + "]";
}

// A tensor this kernel can address: a strided CPU tensor whose elements fill numel() slots
// after its storage offset (contiguous, or permuted as channels_last is), with storage that
// holds them all (a storage freed or shrunk with untyped_storage().resize_() keeps its
// tensor's sizes), not a zero tensor nor a negative or conjugate view; and, where the step
// writes it, one that may be written in place here.
void check_addressable(const at::Tensor& x, int role, int64_t t, bool written) {
    TORCH_CHECK_VALUE(x.defined(), where(role, t), " is undefined");
    TORCH_CHECK_NOT_IMPLEMENTED(
        x.device().is_cpu() && x.layout() == c10::kStrided && !x.is_nested(), where(role, t),
        " is a ", x.device(), " ", x.layout(), " tensor; this kernel takes strided CPU tensors");
    TORCH_CHECK_NOT_IMPLEMENTED(
        !x.is_neg() && !x.is_conj() && !x._is_zerotensor() && x.is_non_overlapping_and_dense(),
        where(role, t),
        " is a negative, conjugate or zero tensor, or its elements leave gaps or overlap");
    const int64_t numel = x.numel();
    if (numel > 0) {
        TORCH_CHECK_VALUE(x.has_storage() && x.storage().data() != nullptr, where(role, t),
                          " has no data (its storage was freed)");
        const uint64_t needed =
            (static_cast<uint64_t>(x.storage_offset()) + static_cast<uint64_t>(numel)) *
            static_cast<uint64_t>(x.element_size());
        TORCH_CHECK_VALUE(x.storage_offset() >= 0 && x.storage().nbytes() >= needed, where(role, t),
                          " needs ", needed, " bytes of storage and has ", x.storage().nbytes(),
                          " (a storage resized after the tensor was made)");
    }
    if (written) {
        TORCH_CHECK_VALUE(!x.is_inference() || c10::InferenceMode::is_enabled(), where(role, t),
                          " is an inference tensor, which cannot be updated in place outside "
                          "torch.inference_mode()");
        TORCH_CHECK_VALUE(!(c10::GradMode::is_enabled() && x.requires_grad()), where(role, t),
                          " requires grad: call the step under torch.no_grad()");
    }
}

// Whether the kernel, which walks memory, meets the elements of a and b in the same order: both
// contiguous or both laid out alike (a channels_last weight and its gradient and state, which
// AccumulateGrad and zeros_like give the parameter's strides).
bool same_order(const at::Tensor& a, const at::Tensor& b) {
    return (a.is_contiguous() && b.is_contiguous()) || a.strides().equals(b.strides());
}

// ---------------------------------------------------------------------------------------------
// Prefetches. The objects around the tensors' data (each tensor's TensorImpl, StorageImpl and
// Python object) reach a step out of cache: the forward and backward passes evicted them, and
// the step's own streaming evicts them again before the caller releases its references. Torch
// touches them one after another with atomic reference counts, which wait for each miss in turn
// (about 0.2-0.3 ms for ResNet-50's 161 tensors); a pass that only prefetches them first lets
// the misses overlap. Nothing is read through a prefetched address, so a wrong one costs nothing.

// A tensor's Python object where this torch's PyObjectSlot gives it (an address to prefetch);
// nullptr where it does not. Torch releases it as it releases the tensor where the slot holds a
// reference (torch 2.10 on); before, the prefetch costs only itself.
template <class Slot>
auto python_object(const Slot* slot, int) -> decltype(slot->load_pyobj()) {
    return slot->load_pyobj();
}
template <class Slot>
const void* python_object(const Slot*, long) {
    return nullptr;
}

// Before the checks: each tensor's storage, which they read.
void prefetch_storages(std::initializer_list<at::TensorList> lists) {
    for (const at::TensorList& tensors : lists)
        for (const at::Tensor& x : tensors)
            if (x.defined() && x.has_storage())
                __builtin_prefetch(
                    x.unsafeGetTensorImpl()->unsafe_storage().unsafeGetStorageImpl());
}

// After the step: what the caller's release of every argument touches.
void prefetch_releases(std::initializer_list<at::TensorList> lists) {
    for (const at::TensorList& tensors : lists)
        for (const at::Tensor& x : tensors) {
            const c10::TensorImpl* impl = x.unsafeGetTensorImpl();
            __builtin_prefetch(impl, 1);
            const void* object = python_object(impl->pyobj_slot(), 0);
            if (object != nullptr) __builtin_prefetch(object, 1);
        }
}

struct Group {
    int64_t tensors;
    std::vector<Moments> moments;
    bool any_codes;
};

Group check_group(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                  at::TensorList exp_avg_sqs, at::TensorList state_steps,
                  at::TensorList exp_avg_scales, at::TensorList exp_avg_sq_scales,
                  at::IntArrayRef noise_offsets) {
    const int64_t n = static_cast<int64_t>(params.size());
    TORCH_CHECK_VALUE(
        static_cast<int64_t>(grads.size()) == n && static_cast<int64_t>(exp_avgs.size()) == n &&
            static_cast<int64_t>(exp_avg_sqs.size()) == n &&
            static_cast<int64_t>(state_steps.size()) == n,
        "ano::fused_step_: params, grads, exp_avgs, exp_avg_sqs and state_steps need one tensor "
        "per parameter, got ", n, ", ", grads.size(), ", ", exp_avgs.size(), ", ",
        exp_avg_sqs.size(), " and ", state_steps.size());
    const bool scaled = !exp_avg_scales.empty() || !exp_avg_sq_scales.empty();
    TORCH_CHECK_VALUE(
        !scaled || (static_cast<int64_t>(exp_avg_scales.size()) == n &&
                    static_cast<int64_t>(exp_avg_sq_scales.size()) == n &&
                    static_cast<int64_t>(noise_offsets.size()) == n),
        "ano::fused_step_: exp_avg_scales, exp_avg_sq_scales and noise_offsets are empty or "
        "hold one entry per parameter, got ", exp_avg_scales.size(), ", ",
        exp_avg_sq_scales.size(), " and ", noise_offsets.size(), " for ", n, " parameters");
    prefetch_storages(
        {params, grads, exp_avgs, exp_avg_sqs, state_steps, exp_avg_scales, exp_avg_sq_scales});
    Group group{n, std::vector<Moments>(n, Moments::Float32), false};
    for (int64_t t = 0; t < n; ++t) {
        const at::Tensor& p = params[t];
        const at::Tensor& g = grads[t];
        const at::Tensor& m = exp_avgs[t];
        const at::Tensor& v = exp_avg_sqs[t];
        const at::Tensor& step = state_steps[t];
        check_addressable(p, 0, t, true);
        check_addressable(g, 1, t, false);
        check_addressable(m, 2, t, true);
        check_addressable(v, 3, t, true);
        check_addressable(step, 4, t, true);
        TORCH_CHECK_NOT_IMPLEMENTED(
            p.scalar_type() == at::kFloat && g.scalar_type() == at::kFloat, where(0, t), " is ",
            p.scalar_type(), " with a ", g.scalar_type(),
            " gradient; this kernel takes float32 parameters and gradients");
        TORCH_CHECK_NOT_IMPLEMENTED(
            m.scalar_type() == v.scalar_type() &&
                (m.scalar_type() == at::kFloat || m.scalar_type() == at::kBFloat16 ||
                 m.scalar_type() == at::kByte),
            where(2, t), " and exp_avg_sqs[", t, "] are ", m.scalar_type(), " and ",
            v.scalar_type(), "; this kernel takes moments that are both float32, bfloat16 or "
            "uint8 codes");
        TORCH_CHECK_VALUE(g.sizes().equals(p.sizes()) && m.sizes().equals(p.sizes()) &&
                              v.sizes().equals(p.sizes()),
                          where(0, t), " has shape ", p.sizes(), " but its gradient ", g.sizes(),
                          " and moments ", m.sizes(), ", ", v.sizes());
        TORCH_CHECK_NOT_IMPLEMENTED(
            same_order(p, g) && same_order(p, m) && same_order(p, v), where(0, t),
            " is laid out unlike its gradient or moments (strides ", p.strides(), ", ",
            g.strides(), ", ", m.strides(), ", ", v.strides(), ")");
        TORCH_CHECK_VALUE(
            step.numel() == 1 &&
                (step.scalar_type() == at::kFloat || step.scalar_type() == at::kDouble),
            where(4, t), " must hold one float32 or float64 number, got ", step.numel(),
            " elements of ", step.scalar_type());
        if (m.scalar_type() == at::kBFloat16) group.moments[t] = Moments::BFloat16;
        if (m.scalar_type() != at::kByte) {
            if (scaled)
                TORCH_CHECK_VALUE(exp_avg_scales[t].numel() == 0 && exp_avg_sq_scales[t].numel() == 0,
                                  where(5, t), " must be empty for float moments");
            continue;
        }
        // 8-bit codes: scales of shape (rows, blocks), one per row (the first dimension) and
        // block of kCodeBlock of the row.
        TORCH_CHECK_VALUE(scaled, where(2, t), " holds uint8 codes but no scales were given");
        TORCH_CHECK_NOT_IMPLEMENTED(p.dim() >= 1 && p.is_contiguous(), where(0, t),
                                    " has codes; this kernel takes them for contiguous tensors");
        group.moments[t] = Moments::Codes;
        group.any_codes = true;
        const int64_t rows = p.size(0);
        const int64_t cols = rows > 0 ? p.numel() / rows : 0;
        const int64_t blocks = (cols + kCodeBlock - 1) / kCodeBlock;
        for (int role = 5; role < 7; ++role) {
            const at::Tensor& scale = role == 5 ? exp_avg_scales[t] : exp_avg_sq_scales[t];
            check_addressable(scale, role, t, true);
            TORCH_CHECK_VALUE(scale.scalar_type() == at::kFloat && scale.dim() == 2 &&
                                  scale.size(0) == rows && scale.size(1) == blocks &&
                                  scale.is_contiguous(),
                              where(role, t), " must be a contiguous float32 tensor of shape (",
                              rows, ", ", blocks, "), got ", scale.scalar_type(), " of shape ",
                              scale.sizes(), " and strides ", scale.strides());
        }
        TORCH_CHECK_VALUE(noise_offsets[t] >= 0, "ano::fused_step_: noise_offsets[", t,
                          "] must be >= 0, got ", noise_offsets[t]);
    }
    return group;
}

// 0-d or one-element CPU floats: GradScaler's scale and inf flag.
double scalar_value(const std::optional<at::Tensor>& x, const char* name, double otherwise) {
    if (!x.has_value() || !x->defined()) return otherwise;
    TORCH_CHECK_VALUE(x->numel() == 1 && x->device().is_cpu() && x->is_floating_point(),
                      "ano::fused_step_: ", name, " must be one floating-point number on the CPU, "
                      "got ", x->numel(), " elements of ", x->scalar_type(), " on ", x->device());
    return x->item<double>();
}

// ---------------------------------------------------------------------------------------------
// The step.

// Elements per unit of work: 64 KiB of each float32 operand (with codes, of each code operand,
// in whole rows).
constexpr int64_t kFloatUnit = 1 << 14;
constexpr int64_t kCodesUnit = 1 << 16;

struct Unit {
    int64_t tensor, begin, end;  // elements, or for codes rows
};

// A parameter group's options, as the operator's keyword arguments give them.
struct Options {
    double lr, beta1, beta2, eps, weight_decay;
    bool logarithmic_schedule, maximize;
};

// The step of tensors from one or more parameter groups: tensor t takes the options of
// options[group_of[t]].
void step_groups(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                 at::TensorList exp_avg_sqs, at::TensorList state_steps,
                 at::TensorList exp_avg_scales, at::TensorList exp_avg_sq_scales,
                 at::IntArrayRef noise_offsets, const std::vector<Options>& options,
                 const std::vector<int64_t>& group_of,
                 const std::optional<at::Tensor>& grad_scale,
                 const std::optional<at::Tensor>& found_inf) {
    // Pass 1 checks; nothing changes until every tensor has passed.
    const Group group = check_group(params, grads, exp_avgs, exp_avg_sqs, state_steps,
                                    exp_avg_scales, exp_avg_sq_scales, noise_offsets);
    const double inv_scale = 1.0 / scalar_value(grad_scale, "grad_scale", 1.0);
    // GradScaler found inf/nan: every tensor keeps its values and its step count.
    if (scalar_value(found_inf, "found_inf", 0.0) != 0.0) return;
    const int64_t n = group.tensors;

    // The work: units of about kFloatUnit elements (codes: kCodesUnit, whole rows), each
    // knowing its tensor. Each thread takes a contiguous run of units holding an equal share of
    // the elements: small tensors and the tails of large ones make short units, which an equal
    // share of units would spread unevenly.
    std::vector<Unit> units;
    std::vector<int64_t> elements_before{0};
    std::vector<int64_t> cols(n, 1);
    for (int64_t t = 0; t < n; ++t) {
        const int64_t numel = params[t].numel();
        if (numel == 0) continue;
        if (group.moments[t] == Moments::Codes) {
            const int64_t rows = params[t].size(0);
            cols[t] = numel / rows;
            const int64_t rows_per_unit = std::max<int64_t>(kCodesUnit / cols[t], 1);
            for (int64_t row = 0; row < rows; row += rows_per_unit) {
                const int64_t last = std::min(rows, row + rows_per_unit);
                units.push_back({t, row, last});
                elements_before.push_back(elements_before.back() + (last - row) * cols[t]);
            }
            continue;
        }
        for (int64_t begin = 0; begin < numel; begin += kFloatUnit) {
            const int64_t end = std::min(numel, begin + kFloatUnit);
            units.push_back({t, begin, end});
            elements_before.push_back(elements_before.back() + end - begin);
        }
    }
    // Pass 2: the autograd versions (as in-place ops bump them) and the addresses (a
    // copy-on-write storage is materialized: it allocates, and may fail); then the step counts
    // and each tensor's scalars. No data changes before every address is in hand.
    std::vector<float*> param(n), exp_avg_scale(n), exp_avg_sq_scale(n);
    std::vector<const float*> grad(n);
    std::vector<void*> exp_avg(n), exp_avg_sq(n), step_data(n);
    std::vector<Scalars> scalars(n);
    std::vector<Noise> noise(n);
    const bool scaled = static_cast<float>(inv_scale) != 1.0f;
    const auto written = [](const at::Tensor& x) -> void* {
        if (!x.is_inference()) x.unsafeGetTensorImpl()->bump_version();
        return x.numel() > 0 ? x.mutable_data_ptr() : nullptr;
    };
    for (int64_t t = 0; t < n; ++t) {
        param[t] = static_cast<float*>(written(params[t]));
        grad[t] = grads[t].numel() > 0 ? grads[t].const_data_ptr<float>() : nullptr;
        exp_avg[t] = written(exp_avgs[t]);
        exp_avg_sq[t] = written(exp_avg_sqs[t]);
        if (group.moments[t] == Moments::Codes) {
            exp_avg_scale[t] = static_cast<float*>(written(exp_avg_scales[t]));
            exp_avg_sq_scale[t] = static_cast<float*>(written(exp_avg_sq_scales[t]));
        }
        step_data[t] = written(state_steps[t]);
    }
    for (int64_t t = 0; t < n; ++t) {
        const Options& o = options[group_of[t]];
        const float lr32 = static_cast<float>(o.lr), eps32 = static_cast<float>(o.eps);
        // step += 1 in the step's own dtype, as torch._foreach_add_(steps, 1) does.
        double step;
        if (state_steps[t].scalar_type() == at::kFloat) {
            float* s = static_cast<float*>(step_data[t]);
            *s = *s + 1.0f;
            step = *s;
        } else {
            double* s = static_cast<double*>(step_data[t]);
            *s = *s + 1.0;
            step = *s;
        }
        const float correction = static_cast<float>(std::sqrt(1.0 - std::pow(o.beta2, step)));
        const double weight =
            o.logarithmic_schedule ? 1.0 / std::log(step + 2.0) : 1.0 - o.beta1;
        scalars[t] = {static_cast<float>(weight), 1.0f - static_cast<float>(o.beta2),
                      eps32 * correction, lr32 * correction,
                      1.0f - lr32 * static_cast<float>(o.weight_decay),
                      static_cast<float>(inv_scale), o.maximize ? 0x80000000u : 0u};
        noise_parameters(step, 1, noise[t].m_multiplier, noise[t].m_offset);
        noise_parameters(step, 2, noise[t].v_multiplier, noise[t].v_offset);
    }

    if (units.empty()) return;
    const int64_t total = elements_before.back();
    const int64_t threads = std::max<int64_t>(
        1, std::min<int64_t>(at::get_num_threads(), static_cast<int64_t>(units.size())));
    const auto first_unit = [&](int64_t element) {
        return std::lower_bound(elements_before.begin(), elements_before.end() - 1, element) -
            elements_before.begin();
    };
    // One parallel region for the whole group; at::parallel_for gives each thread one share.
    at::parallel_for(0, threads, 1, [&](int64_t share_begin, int64_t share_end) {
        for (int64_t share = share_begin; share < share_end; ++share) {
            const int64_t last = first_unit(total * (share + 1) / threads);
            for (int64_t u = first_unit(total * share / threads); u < last; ++u) {
                const Unit& unit = units[u];
                const int64_t t = unit.tensor;
                const Scalars& c = scalars[t];
                const auto run = [&](auto flags) {
                    using F = decltype(flags);
                    switch (group.moments[t]) {
                        case Moments::Float32:
                            update_float32<F>(param[t], grad[t], static_cast<float*>(exp_avg[t]),
                                              static_cast<float*>(exp_avg_sq[t]), unit.begin,
                                              unit.end, c);
                            break;
                        case Moments::BFloat16:
                            update_bfloat16<F>(param[t], grad[t],
                                               static_cast<uint16_t*>(exp_avg[t]),
                                               static_cast<uint16_t*>(exp_avg_sq[t]), unit.begin,
                                               unit.end, c, noise[t]);
                            break;
                        case Moments::Codes:
                            update_codes<F>(param[t], grad[t], static_cast<uint8_t*>(exp_avg[t]),
                                            static_cast<uint8_t*>(exp_avg_sq[t]),
                                            exp_avg_scale[t], exp_avg_sq_scale[t], unit.begin,
                                            unit.end, cols[t], noise_offsets[t], c, noise[t]);
                            break;
                    }
                };
                const bool decayed = c.decay != 1.0f;
                if (scaled && decayed)
                    run(Flags<true, true>{});
                else if (scaled)
                    run(Flags<true, false>{});
                else if (decayed)
                    run(Flags<false, true>{});
                else
                    run(Flags<false, false>{});
            }
        }
    });
    prefetch_releases(
        {params, grads, exp_avgs, exp_avg_sqs, state_steps, exp_avg_scales, exp_avg_sq_scales});
}

void fused_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                at::TensorList exp_avg_sqs, at::TensorList state_steps,
                at::TensorList exp_avg_scales, at::TensorList exp_avg_sq_scales,
                at::IntArrayRef noise_offsets, double lr, double beta1, double beta2, double eps,
                double weight_decay, bool logarithmic_schedule, bool maximize,
                const std::optional<at::Tensor>& grad_scale,
                const std::optional<at::Tensor>& found_inf) {
    step_groups(params, grads, exp_avgs, exp_avg_sqs, state_steps, exp_avg_scales,
                exp_avg_sq_scales, noise_offsets,
                {{lr, beta1, beta2, eps, weight_decay, logarithmic_schedule, maximize}},
                std::vector<int64_t>(params.size(), 0), grad_scale, found_inf);
}

// Several parameter groups in one call: group g holds the next group_sizes[g] tensors of the
// lists and the options at index g of each option list.
void fused_step_groups(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                       at::TensorList exp_avg_sqs, at::TensorList state_steps,
                       at::TensorList exp_avg_scales, at::TensorList exp_avg_sq_scales,
                       at::IntArrayRef noise_offsets, at::IntArrayRef group_sizes,
                       at::ArrayRef<double> lr, at::ArrayRef<double> beta1,
                       at::ArrayRef<double> beta2, at::ArrayRef<double> eps,
                       at::ArrayRef<double> weight_decay,
                       const c10::List<bool>& logarithmic_schedule, const c10::List<bool>& maximize,
                       const std::optional<at::Tensor>& grad_scale,
                       const std::optional<at::Tensor>& found_inf) {
    const size_t groups = group_sizes.size();
    TORCH_CHECK_VALUE(lr.size() == groups && beta1.size() == groups && beta2.size() == groups &&
                          eps.size() == groups && weight_decay.size() == groups &&
                          logarithmic_schedule.size() == groups && maximize.size() == groups,
                      "ano::fused_step_.groups: every option list needs one entry per group, got ",
                      groups, " group sizes and ", lr.size(), ", ", beta1.size(), ", ",
                      beta2.size(), ", ", eps.size(), ", ", weight_decay.size(), ", ",
                      logarithmic_schedule.size(), " and ", maximize.size(), " options");
    const int64_t n = static_cast<int64_t>(params.size());
    std::vector<Options> options(groups);
    std::vector<int64_t> group_of;
    group_of.reserve(n);
    for (size_t g = 0; g < groups; ++g) {
        const int64_t left = n - static_cast<int64_t>(group_of.size());
        TORCH_CHECK_VALUE(group_sizes[g] >= 0 && group_sizes[g] <= left,
                          "ano::fused_step_.groups: group_sizes ", group_sizes,
                          " must be >= 0 and add up to the ", n, " tensors");
        options[g] = {lr[g], beta1[g], beta2[g], eps[g], weight_decay[g],
                      logarithmic_schedule[g], maximize[g]};
        group_of.insert(group_of.end(), group_sizes[g], static_cast<int64_t>(g));
    }
    TORCH_CHECK_VALUE(static_cast<int64_t>(group_of.size()) == n,
                      "ano::fused_step_.groups: group_sizes ", group_sizes,
                      " must be >= 0 and add up to the ", n, " tensors");
    step_groups(params, grads, exp_avgs, exp_avg_sqs, state_steps, exp_avg_scales,
                exp_avg_sq_scales, noise_offsets, options, group_of, grad_scale, found_inf);
}

void fused_step_tensor_lr(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                          at::TensorList exp_avg_sqs, at::TensorList state_steps,
                          at::TensorList exp_avg_scales, at::TensorList exp_avg_sq_scales,
                          at::IntArrayRef noise_offsets, const at::Tensor& lr, double beta1,
                          double beta2, double eps, double weight_decay,
                          bool logarithmic_schedule, bool maximize,
                          const std::optional<at::Tensor>& grad_scale,
                          const std::optional<at::Tensor>& found_inf) {
    const double lr_value = scalar_value(lr, "lr", 0.0);
    fused_step(params, grads, exp_avgs, exp_avg_sqs, state_steps, exp_avg_scales,
               exp_avg_sq_scales, noise_offsets, lr_value, beta1, beta2, eps, weight_decay,
               logarithmic_schedule, maximize, grad_scale, found_inf);
}

// What fused_step_ checks, without the step: a step over several groups checks every group
// before it updates any.
void fused_step_check(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, at::TensorList state_steps,
                      at::TensorList exp_avg_scales, at::TensorList exp_avg_sq_scales,
                      at::IntArrayRef noise_offsets) {
    check_group(params, grads, exp_avgs, exp_avg_sqs, state_steps, exp_avg_scales,
                exp_avg_sq_scales, noise_offsets);
}

}  // namespace

TORCH_LIBRARY_IMPL(ano, CPU, m) {
    m.impl("fused_step_", &fused_step);
    m.impl("fused_step_.tensor_lr", &fused_step_tensor_lr);
    m.impl("fused_step_.groups", &fused_step_groups);
    m.impl("fused_step_check", &fused_step_check);
}
