// The fused Ano/Anolog step for every float32 tensor of a parameter group, in one call.
//
// Compiled at run time by Inductor's C++ toolchain (the compiler, flags, OpenMP runtime and
// on-disk cache that torch.compile uses on CPU) with STATE_T set to float or uint16_t (the bits
// of a bfloat16), or to uint8_t with ANO_CODES for 8-bit codes with per-block scales
// (blockwise8.py; the group then has 8 role lists: the two moments' scales after the moments,
// and the rounding noise offsets last; a small tensor of the group keeps float32 moments and
// comes in the same call, its scales None). One OpenMP region covers all tensors: the work is
// cut into equal blocks and every block knows its tensor, so 161 small and large tensors cost
// one parallel region and one call from Python, not 161.
//
// The arithmetic is the float32 arithmetic of step_scalars.py (_step_scalars, the per-tensor
// scalars) and inductor.py (_ano_math, the elements), operation for operation and in the same order (the
// build uses -ffp-contract=off: no fused multiply-adds), so this kernel and the Inductor one
// produce the same bits. Tests check both against each other and the single-tensor path. The
// element loop is written twice: portable C++ that GCC vectorises, and AVX-512 intrinsics,
// used where the build's -march=native has them; both give the same bits.

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <c10/core/TensorImpl.h>
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#ifndef STATE_T
#define STATE_T float
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

// rounding.py's noise: (index * A + B) mod 2**16, with the odd multiplier A and the offset B
// hashes of the tensor's step count and the stream (noise_parameters below, the same bits as
// rounding.noise_parameters). Only the low 16 bits of index * A matter, so a uint32 counter that
// starts at begin * A + B and adds A per element gives the same noise with one vector add, where
// a product of the int64 index takes a conversion and a 32-bit multiply per vector.
struct Noise {
    uint32_t multiplier;
    uint32_t offset;
};

constexpr uint32_t kSignBit = 0x80000000u;
constexpr uint64_t kMask32 = 0xFFFFFFFFu;

uint64_t noise_hash(uint64_t step, uint64_t key) {
    uint64_t x = (step * 0x1E3779B1u + key * 0x05EBCA77u) & kMask32;
    x ^= x >> 16;
    x = (x * 0x7FEB352Du) & kMask32;
    x ^= x >> 15;
    x = (x * 0x2C1B3C6Du) & kMask32;
    return x ^ (x >> 16);
}

Noise noise_parameters(uint64_t step, uint64_t stream) {
    return {static_cast<uint32_t>((noise_hash(step, 2 * stream + 1) & 0x7FFFu) | 1u),
            static_cast<uint32_t>(noise_hash(step, 2 * stream) & 0xFFFFu)};
}

// torch.sign(x) * y, with torch.sign's sign(0) = sign(NaN) = 0 (so 0 * y: NaN for an infinite
// or NaN y, as in the other paths): 1 with x's sign bit, zeroed unless x < 0 or x > 0, times y.
// Bit operations and one ordered compare; the nested selects they replace took four compares
// and three blends per vector in GCC's code.
inline float sign_times(float x, float y) {
    const uint32_t nonzero = std::islessgreater(x, 0.0f) ? 0xFFFFFFFFu : 0u;
    return float_of((bits_of(1.0f) | (bits_of(x) & kSignBit)) & nonzero) * y;
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && !defined(ANO_NO_INTRINSICS)
#define ANO_AVX512 1

// The same loop by hand for AVX-512, 16 elements at a time, with the same operations in the same
// order (the same bits; tests build the portable loop alone with ANO_NO_INTRINSICS and compare).
// It takes fewer vector operations than GCC's vectorisation of the portable loop, which can
// make the bfloat16 loop compute-bound when memory runs fast: a bfloat16 load widens with one
// word permutation (GCC: zero-extend and shift, plus an extract), a store narrows with one
// (GCC: shift, then permute); sign_times's bit operations are one masked ternary-logic
// instruction (GCC: and, then a masked or); the rounding noise is a 16-bit add per lane that
// wraps by itself (GCC: add, then mask). docs/performance.md has the measured effect.
namespace avx512 {

struct WordIndex {
    alignas(64) uint16_t widen[32];   // word j of 16 into the upper half of 32-bit lane j
    alignas(64) uint16_t narrow[32];  // the upper half of 32-bit lane j into word j
};

constexpr WordIndex make_word_index() {
    WordIndex index{};
    for (int k = 0; k < 32; ++k) {
        index.widen[k] = static_cast<uint16_t>(k / 2);
        index.narrow[k] = static_cast<uint16_t>((2 * k + 1) % 32);
    }
    return index;
}

constexpr WordIndex kWordIndex = make_word_index();

inline __m512 load(const float* p) { return _mm512_loadu_ps(p); }

inline __m512 load(const uint16_t* p) {
    const __m512i words =
        _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    const __m512i widen = _mm512_load_si512(kWordIndex.widen);
    return _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(0xAAAAAAAAu, widen, words));
}

inline void store(float* p, __m512 x, __m512i) { _mm512_storeu_ps(p, x); }

inline void store(uint16_t* p, __m512 x, __m512i noise) {
    const __m512i rounded = _mm512_add_epi32(_mm512_castps_si512(x), noise);
    const __m512i narrow = _mm512_load_si512(kWordIndex.narrow);
    _mm256_storeu_si256(
        reinterpret_cast<__m256i*>(p),
        _mm512_castsi512_si256(_mm512_permutexvar_epi16(narrow, rounded)));
}

// torch.sign(x) in one instruction: vfixupimmps replaces each x by the token its class picks
// from the table, 4 bits per class (NaN 0, signalling NaN 1, zero 2, +1.0 3, -inf 4, +inf 5,
// negative 6, positive 7): tokens 8 (+0.0), 9 (-1.0) and 10 (+1.0). (With MXCSR's
// denormals-are-zero set, a subnormal x counts as zero, as the ordered compare counts it.)
inline __m512 sign_times(__m512 x, __m512 y) {
    const __m512i table = _mm512_set1_epi32(static_cast<int>(0xA9A9A888u));
    return _mm512_mul_ps(_mm512_fixupimm_ps(_mm512_setzero_ps(), x, table, 0), y);
}

// The noise of elements i .. i + 15, (index * A + B) mod 2**16, one per 32-bit lane.
inline __m512i noise_at(int64_t i, Noise noise) {
    const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i first = _mm512_set1_epi32(
        static_cast<int>(static_cast<uint32_t>(i) * noise.multiplier + noise.offset));
    const __m512i lane_noise = _mm512_add_epi32(
        first, _mm512_mullo_epi32(lanes, _mm512_set1_epi32(static_cast<int>(noise.multiplier))));
    return _mm512_and_si512(lane_noise, _mm512_set1_epi32(0xFFFF));
}

// What 16 elements add to a lane's noise, mod 2**16.
inline __m512i noise_step(Noise noise) {
    return _mm512_set1_epi32(static_cast<int>((16u * noise.multiplier) & 0xFFFFu));
}

// The scalars of the update, broadcast once per block.
struct Scalars {
    __m512 weight, one_minus_beta2, eps_c, step_size, decay, inv_scale;

    Scalars(float weight_, float one_minus_beta2_, float eps_c_, float step_size_, float decay_,
            float inv_scale_)
        : weight(_mm512_set1_ps(weight_)),
          one_minus_beta2(_mm512_set1_ps(one_minus_beta2_)),
          eps_c(_mm512_set1_ps(eps_c_)),
          step_size(_mm512_set1_ps(step_size_)),
          decay(_mm512_set1_ps(decay_)),
          inv_scale(_mm512_set1_ps(inv_scale_)) {}
};

// 16 gradients, unscaled and negated as the flags say.
template <bool kMaximize, bool kScaled>
inline __m512 gradient(const float* p, const Scalars& c) {
    __m512 g = _mm512_loadu_ps(p);
    if constexpr (kScaled) g = _mm512_mul_ps(g, c.inv_scale);
    if constexpr (kMaximize)
        g = _mm512_castsi512_ps(
            _mm512_xor_si512(_mm512_castps_si512(g), _mm512_set1_epi32(static_cast<int>(kSignBit))));
    return g;
}

// ano_element on 16 lanes: stores the new parameters at param and returns the new moments.
template <bool kDecayed>
inline void update(float* param, __m512 g, __m512 m, __m512 v, const Scalars& c, __m512& m_new,
                   __m512& v_new) {
    const __m512 p = _mm512_loadu_ps(param);
    const __m512 g2 = _mm512_mul_ps(g, g);
    v_new = _mm512_add_ps(
        v, _mm512_mul_ps(c.one_minus_beta2, _mm512_sub_ps(sign_times(_mm512_sub_ps(g2, v), g2), v)));
    m_new = _mm512_add_ps(m, _mm512_mul_ps(c.weight, _mm512_sub_ps(g, m)));
    const __m512 ratio =
        _mm512_div_ps(_mm512_abs_ps(g), _mm512_add_ps(_mm512_sqrt_ps(v_new), c.eps_c));
    const __m512 kept = kDecayed ? _mm512_mul_ps(p, c.decay) : p;
    _mm512_storeu_ps(param, _mm512_sub_ps(kept, sign_times(m_new, _mm512_mul_ps(c.step_size, ratio))));
}

// Updates elements begin .. end in steps of 16 and returns the first it left.
template <bool kMaximize, bool kScaled, bool kDecayed, typename State>
int64_t update_vectors(
    float* __restrict__ param,
    const float* __restrict__ grad,
    State* __restrict__ exp_avg,
    State* __restrict__ exp_avg_sq,
    int64_t begin,
    int64_t end,
    float momentum_weight,
    float one_minus_beta2,
    float eps_c,
    float step_size,
    float decay,
    float inv_scale,
    Noise rounding_m,
    Noise rounding_v) {
    const Scalars c(momentum_weight, one_minus_beta2, eps_c, step_size, decay, inv_scale);
    // The upper halves of the lanes stay 0, so a 16-bit add steps each lane's noise mod 2**16.
    const __m512i step_m = noise_step(rounding_m);
    const __m512i step_v = noise_step(rounding_v);
    __m512i noise_m = noise_at(begin, rounding_m);
    __m512i noise_v = noise_at(begin, rounding_v);
    int64_t i = begin;
    for (; i + 16 <= end; i += 16) {
        __m512 m_new, v_new;
        update<kDecayed>(
            param + i, gradient<kMaximize, kScaled>(grad + i, c), load(exp_avg + i),
            load(exp_avg_sq + i), c, m_new, v_new);
        store(exp_avg + i, m_new, noise_m);
        store(exp_avg_sq + i, v_new, noise_v);
        noise_m = _mm512_add_epi16(noise_m, step_m);
        noise_v = _mm512_add_epi16(noise_v, step_v);
    }
    return i;
}

}  // namespace avx512
#endif

// The update of one element from its gradient g and old values: stores the new parameter and
// returns the new moments. Every loop here (and update() above, on 16 lanes) runs these
// operations in this order: the same bits as inductor.py's _ano_math.
template <bool kDecayed>
inline void ano_element(float& param, float g, float m, float v, float momentum_weight,
                        float one_minus_beta2, float eps_c, float step_size, float decay,
                        float& m_new, float& v_new) {
    const float g2 = g * g;
    v_new = v + one_minus_beta2 * (sign_times(g2 - v, g2) - v);
    m_new = m + momentum_weight * (g - m);
    const float ratio = std::fabs(g) / (std::sqrt(v_new) + eps_c);
    const float kept = kDecayed ? param * decay : param;
    param = kept - sign_times(m_new, step_size * ratio);
}

// The update of elements begin .. end of a tensor with float moments (float32, or bfloat16's
// bits). The flags are template parameters so that what they switch leaves the loop: as a
// run-time flag GCC kept maximize's negation in the bfloat16 loop, a blend per vector; and a
// multiply by an inv_scale or decay of exactly 1 changes no bit, so it is left out.
template <bool kMaximize, bool kScaled, bool kDecayed, typename State>
void update_floats(
    float* __restrict__ param,
    const float* __restrict__ grad,
    State* __restrict__ exp_avg,
    State* __restrict__ exp_avg_sq,
    int64_t begin,
    int64_t end,
    float momentum_weight,
    float correction,
    float lr,
    float beta2,
    float eps,
    float decay,
    float inv_scale,
    Noise rounding_m,
    Noise rounding_v) {
    const float one_minus_beta2 = 1.0f - beta2;
    const float eps_c = eps * correction;
    const float step_size = lr * correction;
    int64_t i = begin;
#ifdef ANO_AVX512
    i = avx512::update_vectors<kMaximize, kScaled, kDecayed>(
            param, grad, exp_avg, exp_avg_sq, begin, end, momentum_weight, one_minus_beta2,
            eps_c, step_size, decay, inv_scale, rounding_m, rounding_v);
#endif
    uint32_t noise_m = static_cast<uint32_t>(i) * rounding_m.multiplier + rounding_m.offset;
    uint32_t noise_v = static_cast<uint32_t>(i) * rounding_v.multiplier + rounding_v.offset;
    for (; i < end; ++i) {
        float g = grad[i];
        if constexpr (kScaled) g = g * inv_scale;
        if constexpr (kMaximize) g = -g;
        float m_new, v_new;
        ano_element<kDecayed>(
            param[i], g, load(exp_avg, i), load(exp_avg_sq, i), momentum_weight, one_minus_beta2,
            eps_c, step_size, decay, m_new, v_new);
        store(exp_avg, i, m_new, noise_m & 0xFFFFu);
        store(exp_avg_sq, i, v_new, noise_v & 0xFFFFu);
        noise_m += rounding_m.multiplier;
        noise_v += rounding_v.multiplier;
    }
}

#ifdef ANO_CODES
// blockwise8.py's formats: a code's bits shifted into a float32 (its bit 7 to the sign bit of
// exp_avg's codes, the rest to the top of the exponent field: a tiny float, subnormal where its
// exponent is 0), times 2**96 and the block's scale, is its value; exp_avg keeps a sign, 5
// exponent and 2 mantissa bits, exp_avg_sq 5 exponent and 3 mantissa bits.
constexpr int64_t kCodeBlock = 256;
constexpr float kRescale = 0x1p96f;
constexpr float kUnscale = 0x1p-96f;
// Scales up to this fold 2**-96 into the encoding's inverse (inverse * 2**-96 is then exact).
constexpr float kFoldLimit = 0x1p30f;
// How far ahead of its use the 8-bit loop fetches an operand, in elements.
constexpr int64_t kPrefetch = 1024;

inline float decode_signed(uint8_t code) {
    const uint32_t c = code;
    return float_of(((c & 0x80u) << 24) | ((c & 0x7Fu) << 21)) * kRescale;
}

inline float decode_unsigned(uint8_t code) {
    return float_of(static_cast<uint32_t>(code) << 20) * kRescale;
}

// Rounds to nearest: half of the 21 bits cut. (The magnitude's bits plus the rounding bits stay
// below 2**32, and NaN's magnitude saturates, as in blockwise8.py.)
inline uint8_t encode_signed(float unit) {
    const uint32_t bits = bits_of(unit);
    const uint32_t magnitude = std::min(((bits & 0x7FFFFFFFu) + (0x8000u << 5)) >> 21, 127u);
    return static_cast<uint8_t>(magnitude | ((bits >> 24) & 0x80u));
}

// Rounds stochastically: 16 noise bits above the lowest 4 of the 20 cut.
inline uint8_t encode_unsigned(float unit, uint32_t noise) {
    return static_cast<uint8_t>(
        std::min(((bits_of(unit) & 0x7FFFFFFFu) + (noise << 4)) >> 20, 255u));
}

// The largest |x| of a block as the integer maximum of the magnitudes' bits: the order of
// non-negative floats, with NaN above infinity, as torch's amax propagates NaN.
inline uint32_t larger_magnitude(uint32_t a, float x) { return std::max(a, bits_of(x) & 0x7FFFFFFFu); }

#ifdef ANO_AVX512
// The two loops of update_codes below, 16 elements at a time (encoding: 64), with the same
// results as the scalar code.
namespace avx512_codes {

// A code's bits in the float32 lanes of 16 codes: exp_avg's sign-extended byte shifted left by
// 21 keeps bit 7 at bit 28 and above, of which the mask keeps the sign bit.
inline __m512 tiny_signed(const uint8_t* p) {
    const __m512i code = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm512_castsi512_ps(
        _mm512_and_si512(_mm512_slli_epi32(code, 21), _mm512_set1_epi32(static_cast<int>(0x8FE00000u))));
}

inline __m512 tiny_unsigned(const uint8_t* p) {
    const __m512i code = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(code, 20));
}

// Bytes of four vectors packed by vpackusdw and vpack[us]swb lie in each 128-bit lane as
// (a, b, c, d) x 4 elements; this dword permutation puts a's 16 first, then b's, c's and d's.
inline __m512i in_order(__m512i packed) {
    const __m512i index = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    return _mm512_permutexvar_epi32(index, packed);
}

// encode_signed of 64 units whose sign bits are 0 (magnitudes), the signs given apart as one bit
// per unit: the rounded magnitudes (at most 2**10) packed to bytes with signed saturation,
// which is the min with 127, then the sign bits set.
inline void encode_signed(uint8_t* p, const __m512 magnitude[4], __mmask64 negative) {
    __m512i code[4];
    for (int q = 0; q < 4; ++q)
        code[q] = _mm512_srli_epi32(
            _mm512_add_epi32(_mm512_castps_si512(magnitude[q]), _mm512_set1_epi32(0x8000 << 5)), 21);
    const __m512i codes = in_order(
        _mm512_packs_epi16(_mm512_packus_epi32(code[0], code[1]), _mm512_packus_epi32(code[2], code[3])));
    // The magnitudes' bit 7 is 0: adding 0x80 sets it.
    _mm512_storeu_si512(
        p, _mm512_mask_add_epi8(codes, negative, codes, _mm512_set1_epi8(static_cast<char>(0x80))));
}

// encode_signed of any 64 units: their magnitudes and sign bits apart.
inline void encode_signed(uint8_t* p, const __m512 unit[4]) {
    __m512 magnitude[4];
    __mmask16 sign[4];
    for (int q = 0; q < 4; ++q) {
        magnitude[q] = _mm512_abs_ps(unit[q]);
        sign[q] = _mm512_movepi32_mask(_mm512_castps_si512(unit[q]));
    }
    encode_signed(
        p, magnitude,
        _mm512_kunpackd(_mm512_kunpackw(sign[3], sign[2]), _mm512_kunpackw(sign[1], sign[0])));
}

// encode_unsigned of 64 units, noise4 the noise of each shifted left by 4: packed to bytes with
// unsigned saturation, which is the min with 255. Without encode_unsigned's mask of the sign
// bit: the units here are products of magnitudes and non-negative factors, whose sign bit is
// set only in the default NaN (0 * inf), 0xFFC00000, whose bits plus the noise stay below 2**32
// and saturate to 255 as its magnitude's do.
inline void encode_unsigned(uint8_t* p, const __m512 unit[4], const __m512i noise4[4]) {
    __m512i code[4];
    for (int q = 0; q < 4; ++q)
        code[q] = _mm512_srli_epi32(_mm512_add_epi32(_mm512_castps_si512(unit[q]), noise4[q]), 20);
    _mm512_storeu_si512(p, in_order(_mm512_packus_epi16(
        _mm512_packus_epi32(code[0], code[1]), _mm512_packus_epi32(code[2], code[3]))));
}

// The largest lanes of m and v (unsigned), reduced together: (m's, v's).
inline std::pair<uint32_t, uint32_t> reduce_max(__m512i m, __m512i v) {
    // 128-bit lanes (m0, m1, v0, v1) against (m2, m3, v2, v3), then within one vector.
    __m512i x = _mm512_max_epu32(
        _mm512_shuffle_i64x2(m, v, 0x44), _mm512_shuffle_i64x2(m, v, 0xEE));
    x = _mm512_max_epu32(x, _mm512_shuffle_i64x2(x, x, 0xB1));
    x = _mm512_max_epu32(x, _mm512_shuffle_epi32(x, _MM_PERM_BADC));
    x = _mm512_max_epu32(x, _mm512_shuffle_epi32(x, _MM_PERM_CDAB));
    alignas(64) uint32_t lanes[16];
    _mm512_store_si512(lanes, x);
    return {lanes[0], lanes[8]};
}

}  // namespace avx512_codes
#endif

// update_floats for 8-bit moments: per block of kCodeBlock elements, decode, update as above
// (the same arithmetic), keep the new moments in float32 while the block's new scales are
// found, then encode them. begin is a multiple of kCodeBlock.
//
// A decoded value is (tiny * 2**96) * scale, with tiny the code's bits as a float32. While
// scale * 2**96 is finite, tiny * (scale * 2**96) is the same real product rounded once, so the
// same float: one multiply per value instead of two.
template <bool kMaximize, bool kScaled, bool kDecayed>
void update_codes(
    float* __restrict__ param,
    const float* __restrict__ grad,
    uint8_t* __restrict__ exp_avg,
    uint8_t* __restrict__ exp_avg_sq,
    float* __restrict__ exp_avg_scale,
    float* __restrict__ exp_avg_sq_scale,
    int64_t begin,
    int64_t end,
    int64_t cols,
    int64_t noise_offset,
    float momentum_weight,
    float correction,
    float lr,
    float beta2,
    float eps,
    float decay,
    float inv_scale,
    Noise rounding_v) {
    const float one_minus_beta2 = 1.0f - beta2;
    const float eps_c = eps * correction;
    const float step_size = lr * correction;
    // A block's new moments while its new scales are found: their magnitudes, and the sign bits
    // of exp_avg's, one bit per element.
    alignas(64) float m_block[kCodeBlock];
    alignas(64) float v_block[kCodeBlock];
    alignas(64) uint16_t m_signs[kCodeBlock / 16];
#ifdef ANO_AVX512
    const avx512::Scalars c(momentum_weight, one_minus_beta2, eps_c, step_size, decay, inv_scale);
    // What lanes 0 .. 15 add to a vector's first element's noise, and what 16 elements add
    // (mod 2**16, which the encoding's shifted mask keeps).
    const __m512i lane_noise = avx512::noise_at(0, {rounding_v.multiplier, 0u});
    const __m512i step4 = _mm512_slli_epi32(avx512::noise_step(rounding_v), 4);
#endif
    // Rows begin .. end of the tensor, as (rows, cols); a block never crosses a row.
    const int64_t row_blocks = (cols + kCodeBlock - 1) / kCodeBlock;
    for (int64_t row = begin / cols; row * cols < end; ++row)
    for (int64_t k = 0; k < row_blocks; ++k) {
        const int64_t first = row * cols + k * kCodeBlock;
        const int64_t n = std::min(kCodeBlock, cols - k * kCodeBlock);
        const int64_t b = row * row_blocks + k;
        const float m_scale = exp_avg_scale[b], v_scale = exp_avg_sq_scale[b];
        uint32_t m_max = 0, v_max = 0;
        int64_t j = 0;
#ifdef ANO_AVX512
        {
            namespace v8 = avx512_codes;
            __m512i m_max_v = _mm512_setzero_si512(), v_max_v = _mm512_setzero_si512();
            const __m512i magnitude = _mm512_set1_epi32(0x7FFFFFFF);
            // kFolded: one multiply by scale * 2**96 (see above), else two.
            const auto decode = [&](auto folded) {
                constexpr bool kFolded = decltype(folded)::value;
                const __m512 m_by = _mm512_set1_ps(kFolded ? m_scale * kRescale : m_scale);
                const __m512 v_by = _mm512_set1_ps(kFolded ? v_scale * kRescale : v_scale);
                const __m512 rescale = _mm512_set1_ps(kRescale);
                const auto scaled = [&](__m512 tiny, __m512 by) {
                    return kFolded ? _mm512_mul_ps(tiny, by) : _mm512_mul_ps(_mm512_mul_ps(tiny, rescale), by);
                };
                for (; j + 16 <= n; j += 16) {
                    const int64_t i = first + j;
                    // The out-of-order window, full of this loop's arithmetic, holds few
                    // loads in flight: fetch the operands of later blocks now.
                    _mm_prefetch(reinterpret_cast<const char*>(grad + i + kPrefetch), _MM_HINT_T0);
                    _mm_prefetch(reinterpret_cast<const char*>(param + i + kPrefetch), _MM_HINT_T0);
                    if ((j & 63) == 0) {
                        _mm_prefetch(reinterpret_cast<const char*>(exp_avg + i + kPrefetch), _MM_HINT_T0);
                        _mm_prefetch(reinterpret_cast<const char*>(exp_avg_sq + i + kPrefetch), _MM_HINT_T0);
                    }
                    __m512 m_new, v_new;
                    avx512::update<kDecayed>(
                        param + i, avx512::gradient<kMaximize, kScaled>(grad + i, c),
                        scaled(v8::tiny_signed(exp_avg + i), m_by),
                        scaled(v8::tiny_unsigned(exp_avg_sq + i), v_by), c, m_new, v_new);
                    // The magnitudes serve both the block maxima and the encoding.
                    const __m512i m_abs = _mm512_and_si512(_mm512_castps_si512(m_new), magnitude);
                    const __m512i v_abs = _mm512_and_si512(_mm512_castps_si512(v_new), magnitude);
                    _mm512_store_si512(m_block + j, m_abs);
                    _mm512_store_si512(v_block + j, v_abs);
                    m_signs[j / 16] = _mm512_movepi32_mask(_mm512_castps_si512(m_new));
                    m_max_v = _mm512_max_epu32(m_max_v, m_abs);
                    v_max_v = _mm512_max_epu32(v_max_v, v_abs);
                }
            };
            // NaN compares false: folded, as NaN either way.
            if (m_scale >= 0x1p32f || v_scale >= 0x1p32f)
                decode(std::false_type{});
            else
                decode(std::true_type{});
            std::tie(m_max, v_max) = v8::reduce_max(m_max_v, v_max_v);
        }
#endif
        for (; j < n; ++j) {
            const int64_t i = first + j;
            if (j % 16 == 0) m_signs[j / 16] = 0;
            float g = grad[i];
            if constexpr (kScaled) g = g * inv_scale;
            if constexpr (kMaximize) g = -g;
            float m_new, v_new;
            ano_element<kDecayed>(
                param[i], g, decode_signed(exp_avg[i]) * m_scale,
                decode_unsigned(exp_avg_sq[i]) * v_scale, momentum_weight, one_minus_beta2, eps_c,
                step_size, decay, m_new, v_new);
            m_block[j] = std::fabs(m_new);
            v_block[j] = std::fabs(v_new);
            m_signs[j / 16] |= static_cast<uint16_t>((bits_of(m_new) >> 31) << (j % 16));
            m_max = larger_magnitude(m_max, m_new);
            v_max = larger_magnitude(v_max, v_new);
        }
        const float m_new_scale = float_of(m_max), v_new_scale = float_of(v_max);
        exp_avg_scale[b] = m_new_scale;
        exp_avg_sq_scale[b] = v_new_scale;
        const float m_inverse = m_new_scale > 0.0f ? 1.0f / m_new_scale : 0.0f;
        const float v_inverse = v_new_scale > 0.0f ? 1.0f / v_new_scale : 0.0f;
        // unit = x * (inverse * 2**-96) up to kFoldLimit, else (x * inverse) * 2**-96, as in
        // blockwise8.py: x * by * after, where after = 1 (exact) when folded.
        const bool m_folded = m_new_scale <= kFoldLimit, v_folded = v_new_scale <= kFoldLimit;
        const float m_by = m_folded ? m_inverse * kUnscale : m_inverse;
        const float v_by = v_folded ? v_inverse * kUnscale : v_inverse;
        const float m_after = m_folded ? 1.0f : kUnscale, v_after = v_folded ? 1.0f : kUnscale;
        const uint32_t noise_first =
            static_cast<uint32_t>(noise_offset + first) * rounding_v.multiplier + rounding_v.offset;
        j = 0;
#ifdef ANO_AVX512
        {
            // The noise shifted left by 4 as encode_unsigned adds it: (noise << 4) mod 2**20 is
            // (noise mod 2**16) << 4, so a uint32 counter stepped by the shifted step serves.
            __m512i noise4 = _mm512_slli_epi32(
                _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(noise_first)), lane_noise), 4);
            const __m512i low20 = _mm512_set1_epi32(0xFFFF0);
            // kFast: both folded and exp_avg's inverse finite (its scale 0 or normal), so that
            // the units are one product each and |m| * by has the sign bit 0 and m * by the
            // sign of m; else two products each, and exp_avg's units whole.
            const auto encode = [&](auto fast) {
                constexpr bool kFast = decltype(fast)::value;
                const __m512 m_by_v = _mm512_set1_ps(m_by), v_by_v = _mm512_set1_ps(v_by);
                const __m512 m_after_v = _mm512_set1_ps(m_after), v_after_v = _mm512_set1_ps(v_after);
                for (; j + 64 <= n; j += 64) {
                    __m512 m_unit[4], v_unit[4];
                    __m512i v_noise[4];
                    uint64_t signs;
                    std::memcpy(&signs, m_signs + j / 16, sizeof signs);
                    for (int q = 0; q < 4; ++q) {
                        const __m512 m = _mm512_load_ps(m_block + j + 16 * q);
                        const __m512 v = _mm512_load_ps(v_block + j + 16 * q);
                        if constexpr (kFast) {
                            m_unit[q] = _mm512_mul_ps(m, m_by_v);
                            v_unit[q] = _mm512_mul_ps(v, v_by_v);
                        } else {
                            const __m512 m_signed = _mm512_castsi512_ps(_mm512_mask_or_epi32(
                                _mm512_castps_si512(m), static_cast<__mmask16>(signs >> (16 * q)),
                                _mm512_castps_si512(m), _mm512_set1_epi32(static_cast<int>(kSignBit))));
                            m_unit[q] = _mm512_mul_ps(_mm512_mul_ps(m_signed, m_by_v), m_after_v);
                            v_unit[q] = _mm512_mul_ps(_mm512_mul_ps(v, v_by_v), v_after_v);
                        }
                        v_noise[q] = _mm512_and_si512(noise4, low20);
                        noise4 = _mm512_add_epi32(noise4, step4);
                    }
                    if constexpr (kFast)
                        avx512_codes::encode_signed(exp_avg + first + j, m_unit, _cvtu64_mask64(signs));
                    else
                        avx512_codes::encode_signed(exp_avg + first + j, m_unit);
                    avx512_codes::encode_unsigned(exp_avg_sq + first + j, v_unit, v_noise);
                }
            };
            if (m_folded && v_folded && (m_new_scale >= 0x1p-126f || m_max == 0))
                encode(std::true_type{});
            else
                encode(std::false_type{});
        }
#endif
        for (; j < n; ++j) {
            const float m = float_of(
                bits_of(m_block[j]) | (static_cast<uint32_t>(m_signs[j / 16] >> (j % 16)) & 1u) << 31);
            exp_avg[first + j] = encode_signed(m * m_by * m_after);
            const uint32_t noise =
                (noise_first + static_cast<uint32_t>(j) * rounding_v.multiplier) & 0xFFFFu;
            exp_avg_sq[first + j] = encode_unsigned(v_block[j] * v_by * v_after, noise);
        }
    }
}
#endif

// The moments of a build's float-state tensors: STATE_T, or float32 beside 8-bit codes.
#ifdef ANO_CODES
using FloatState = float;
#else
using FloatState = STATE_T;
#endif

using FloatUpdate = decltype(&update_floats<false, false, false, FloatState>);

// kFloatUpdates[maximize][scaled][decayed]
constexpr FloatUpdate kFloatUpdates[2][2][2] = {
    {{update_floats<false, false, false, FloatState>, update_floats<false, false, true, FloatState>},
     {update_floats<false, true, false, FloatState>, update_floats<false, true, true, FloatState>}},
    {{update_floats<true, false, false, FloatState>, update_floats<true, false, true, FloatState>},
     {update_floats<true, true, false, FloatState>, update_floats<true, true, true, FloatState>}},
};

#ifdef ANO_CODES
using CodesUpdate = decltype(&update_codes<false, false, false>);

constexpr CodesUpdate kCodesUpdates[2][2][2] = {
    {{update_codes<false, false, false>, update_codes<false, false, true>},
     {update_codes<false, true, false>, update_codes<false, true, true>}},
    {{update_codes<true, false, false>, update_codes<true, false, true>},
     {update_codes<true, true, false>, update_codes<true, true, true>}},
};
#endif

// torch's THPVariable (torch/csrc/autograd/python_variable.h): a tensor's Python object holds
// its at::Tensor, one intrusive pointer to the TensorImpl, right after the object header. That
// header pulls in pybind11 and all of ATen, several times slower to compile than c10's
// TensorImpl.h. _torch_internals.py checks the layout against Tensor._cdata before this kernel
// is built.
struct TensorObject {
    PyObject_HEAD
    c10::TensorImpl* impl;
};

// The tensors the kernel takes as they are: exactly torch.Tensor or nn.Parameter (a subclass
// may override __torch_dispatch__ or hold no storage of its own), a strided CPU tensor of the
// dtype whose elements fill a block of memory without gaps or overlaps (contiguous, or
// permuted as channels_last is), neither a zero tensor nor a negative or conjugate view, nor an
// inference tensor where it is written, and whose storage is allocated and holds every element
// (a storage freed or shrunk with untyped_storage().resize_() keeps its tensors' sizes).
c10::TensorImpl* taken(
    PyObject* object, PyTypeObject* tensor_type, PyTypeObject* parameter_type,
    c10::ScalarType dtype, bool written);

// taken()'s checks of the TensorImpl itself, whatever front end found it.
c10::TensorImpl* impl_taken(c10::TensorImpl* impl, c10::ScalarType dtype, bool written) {
    const bool ok = impl->device_type() == c10::DeviceType::CPU &&
        impl->layout() == c10::kStrided && !impl->is_nested() && impl->has_storage() &&
        impl->dtype() == dtype && !impl->is_neg() && !impl->is_conj() &&
        !impl->key_set().has(c10::DispatchKey::ZeroTensor) &&
        impl->is_non_overlapping_and_dense() &&
        !(written && (impl->is_inference() || !impl->version_counter().enabled()));
    if (!ok) return nullptr;
    // Dense and non-overlapping: the elements fill the numel() slots after the storage offset.
    const int64_t numel = impl->numel();
    const c10::Storage& storage = impl->storage();
    const bool held = numel == 0 ||
        (storage.data() != nullptr &&
         storage.nbytes() >= static_cast<size_t>(impl->storage_offset() + numel) * impl->itemsize());
    return held ? impl : nullptr;
}

c10::TensorImpl* taken(
    PyObject* object, PyTypeObject* tensor_type, PyTypeObject* parameter_type,
    c10::ScalarType dtype, bool written) {
    if (Py_TYPE(object) != tensor_type && Py_TYPE(object) != parameter_type) return nullptr;
    return impl_taken(reinterpret_cast<TensorObject*>(object)->impl, dtype, written);
}

// Whether the kernel, which walks memory, meets the elements of a and b in the same order: the
// same sizes, and both contiguous or both laid out alike (a channels_last weight and its
// gradient and state, which AccumulateGrad and zeros_like give the parameter's strides).
bool same_order(const c10::TensorImpl* a, const c10::TensorImpl* b) {
    if (!a->sizes().equals(b->sizes())) return false;
    if (a->is_contiguous() && b->is_contiguous()) return true;
    return a->strides().equals(b->strides());
}

PyObject* item(PyObject* sequence, int64_t i) {
    return PyList_Check(sequence) ? PyList_GET_ITEM(sequence, i) : PyTuple_GET_ITEM(sequence, i);
}

int64_t length(PyObject* sequence) {
    if (PyList_Check(sequence)) return PyList_GET_SIZE(sequence);
    return PyTuple_Check(sequence) ? PyTuple_GET_SIZE(sequence) : -1;
}

// The tensor roles of a group: params, grads, exp_avgs, exp_avg_sqs, (8-bit codes: their
// scales,) steps.
#ifdef ANO_CODES
constexpr int64_t kRoles = 7;
#else
constexpr int64_t kRoles = 5;
#endif
constexpr int64_t kStepRole = kRoles - 1;
constexpr c10::ScalarType kFloatState =
    std::is_same_v<FloatState, float> ? c10::ScalarType::Float : c10::ScalarType::BFloat16;
// 8-bit codes: after the tensor roles, a list of each tensor's rounding-noise offset.
#ifdef ANO_CODES
constexpr int64_t kOffsetLists = 1;
#else
constexpr int64_t kOffsetLists = 0;
#endif

// The checks of kernel()'s pass 1 over a group's kRoles x tensors TensorImpls, which
// impl_of(k, t, dtype) finds (nullptr: refused); true, with impls filled, where every tensor
// passes. An 8-bit build takes each tensor's moments as codes (uint8, with float32 scales) or,
// for a tensor too small for codes, as float32 with None for its scales (absent(k, t); its
// impls nullptr); coded says which.
template <typename ImplOf, typename Absent>
bool checked_group(
    int64_t tensors, std::vector<c10::TensorImpl*>& impls, std::vector<char>& coded,
    ImplOf impl_of, Absent absent) {
    constexpr auto kFloat = c10::ScalarType::Float;
    for (int64_t t = 0; t < tensors; ++t) {
        const auto at = [&](int64_t k) -> c10::TensorImpl*& { return impls[k * tensors + t]; };
        at(0) = impl_of(0, t, kFloat);
        at(1) = impl_of(1, t, kFloat);
        at(kStepRole) = impl_of(kStepRole, t, kFloat);
#ifdef ANO_CODES
        at(2) = impl_of(2, t, c10::ScalarType::Byte);
        coded[t] = at(2) != nullptr;
        if (coded[t]) {
            at(3) = impl_of(3, t, c10::ScalarType::Byte);
            at(4) = impl_of(4, t, kFloat);
            at(5) = impl_of(5, t, kFloat);
        } else {
            at(2) = impl_of(2, t, kFloatState);
            at(3) = impl_of(3, t, kFloatState);
            if (!absent(4, t) || !absent(5, t)) return false;
            at(4) = at(5) = nullptr;
        }
        const int64_t scale_roles = coded[t] ? 2 : 0;
#else
        at(2) = impl_of(2, t, kFloatState);
        at(3) = impl_of(3, t, kFloatState);
        const int64_t scale_roles = 0;
#endif
        for (int64_t k = 0; k < 4 + scale_roles; ++k)
            if (at(k) == nullptr) return false;
        if (at(kStepRole) == nullptr || at(kStepRole)->numel() != 1) return false;
        for (int64_t k = 1; k < 4; ++k)
            if (!same_order(at(0), at(k))) return false;
#ifdef ANO_CODES
        if (coded[t]) {
            // The codes walk in the parameter's memory order, which for 8-bit codes is theirs.
            if (!at(0)->is_contiguous()) return false;
            // Scales: one per row (the first dimension) and block of kCodeBlock of the row.
            if (at(0)->dim() < 1) return false;
            const int64_t rows = at(0)->size(0);
            const int64_t cols = rows > 0 ? at(0)->numel() / rows : 0;
            const int64_t blocks = rows * ((cols + kCodeBlock - 1) / kCodeBlock);
            for (int64_t k = 4; k < 6; ++k)
                if (at(k)->numel() != blocks) return false;
        }
#endif
    }
    return true;
}

// kernel()'s passes 2 and 3 over checked TensorImpls: versions, addresses, step counts, then
// the update. Touches no Python object; the caller keeps the TensorImpls alive.
void update_group(
    int64_t tensors,
    const std::vector<c10::TensorImpl*>& impls,
    const std::vector<char>& coded,
    const std::vector<int64_t>& noise_offsets,
    float lr,
    float momentum_weight,
    float beta2,
    float eps,
    float weight_decay,
    float inv_scale,
    int64_t block_size,
    int64_t maximize,
    int64_t logarithmic_schedule) {
    std::vector<int64_t> numels(tensors);
    for (int64_t t = 0; t < tensors; ++t) numels[t] = impls[t]->numel();
    // Pass 2: the autograd versions, the addresses (mutable_data materializes a copy-on-write
    // storage) and the step counts.
    std::vector<char*> pointers(kRoles * tensors);
    for (int64_t i = 0; i < kRoles * tensors; ++i) {
        if (impls[i] == nullptr) continue;  // the scales of a tensor without codes
        if (i / tensors != 1) impls[i]->bump_version();
        pointers[i] = static_cast<char*>(
            i / tensors == 1 ? const_cast<void*>(impls[i]->data()) : impls[i]->mutable_data());
    }
    // Per tensor: step += 1, then 1 - beta1_k and sqrt(1 - beta2^k) as _step_scalars computes
    // them on float32 0-d tensors (pow, neg, add 1, sqrt; Anolog: 1 / log(k + 2)), and the
    // rounding noise parameters of its two moments for this step.
    std::vector<float> weight(tensors), correction(tensors);
    std::vector<Noise> rounding_m(tensors), rounding_v(tensors);
    for (int64_t t = 0; t < tensors; ++t) {
        float* step = reinterpret_cast<float*>(pointers[kStepRole * tensors + t]);
        *step = *step + 1.0f;
        correction[t] = std::sqrt(-std::pow(beta2, *step) + 1.0f);
        weight[t] = logarithmic_schedule ? 1.0f / std::log(*step + 2.0f) : momentum_weight;
        // A whole number in any real run; a non-finite or huge one (a corrupted state) must not
        // reach an undefined float-to-integer conversion.
        const bool countable = std::isfinite(*step) && std::fabs(*step) < 9.0e18f;
        const uint64_t count = countable ? static_cast<uint64_t>(static_cast<int64_t>(*step)) : 0;
        rounding_m[t] = noise_parameters(count, 1);
        rounding_v[t] = noise_parameters(count, 2);
    }

    // The work: blocks of block_size elements (a tensor's last one shorter), each knowing its
    // tensor. Each thread takes a contiguous run of blocks holding an equal share of the
    // elements. An equal share of blocks (schedule(static)) is not one: a small tensor or the
    // tail of a large one is a short block, and they do not spread evenly, so one thread would
    // work longer than the other while it waited.
    std::vector<int64_t> block_tensor, block_begin, elements_before{0};
    std::vector<int64_t> cols(tensors, 1);
    for (int64_t t = 0; t < tensors; ++t) {
        int64_t step = block_size;
        if (coded[t]) {
            // Whole rows per unit of work: a scale block never crosses a row.
            const int64_t rows = impls[t]->size(0);
            cols[t] = rows > 0 ? std::max<int64_t>(numels[t] / rows, 1) : 1;
            step = std::max<int64_t>(block_size / cols[t], 1) * cols[t];
        }
        for (int64_t begin = 0; begin < numels[t]; begin += step) {
            block_tensor.push_back(t);
            block_begin.push_back(begin);
            elements_before.push_back(elements_before.back() + std::min(step, numels[t] - begin));
        }
    }
    const int64_t blocks = static_cast<int64_t>(block_tensor.size());
    const float decay = 1.0f - lr * weight_decay;
    const int m = maximize != 0, s = inv_scale != 1.0f, d = decay != 1.0f;
    const FloatUpdate update_floats = kFloatUpdates[m][s][d];
#ifdef ANO_CODES
    const CodesUpdate update_codes = kCodesUpdates[m][s][d];
#endif

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
            const int64_t end = b + 1 < blocks && block_tensor[b + 1] == t ? block_begin[b + 1] : numels[t];
            float* param = reinterpret_cast<float*>(pointers[t]);
            const float* grad = reinterpret_cast<const float*>(pointers[1 * tensors + t]);
#ifdef ANO_CODES
            if (coded[t]) {
                update_codes(
                    param, grad, reinterpret_cast<uint8_t*>(pointers[2 * tensors + t]),
                    reinterpret_cast<uint8_t*>(pointers[3 * tensors + t]),
                    reinterpret_cast<float*>(pointers[4 * tensors + t]),
                    reinterpret_cast<float*>(pointers[5 * tensors + t]), begin, end, cols[t],
                    noise_offsets[t], weight[t], correction[t], lr, beta2, eps, decay, inv_scale,
                    rounding_v[t]);
                continue;
            }
#endif
            update_floats(
                param, grad, reinterpret_cast<FloatState*>(pointers[2 * tensors + t]),
                reinterpret_cast<FloatState*>(pointers[3 * tensors + t]), begin, end, weight[t],
                correction[t], lr, beta2, eps, decay, inv_scale, rounding_m[t], rounding_v[t]);
        }
    }
}

}  // namespace

// roles: the address (CPython's id) of a tuple of 5 lists (or tuples) of n tensors: params,
// grads, exp_avgs, exp_avg_sqs and steps. With ANO_CODES, 8: exp_avg_scales and
// exp_avg_sq_scales before the steps (None for a tensor whose moments are float32, not codes),
// and a list of Python ints, the noise offsets, after. tensor_type, parameter_type: the
// addresses of torch.Tensor and torch.nn.Parameter. outcome: the address of a one-item list. check_only: 1
// to check the tensors and report whether the kernel takes them, changing nothing (a step over
// several groups checks every group before it updates any).
//
// The kernel checks every tensor itself, in one pass that reads from each tensor the memory
// that reading its data pointer reads anyway: in Python, the same checks cost several Python
// calls per tensor, each slow once forward and backward have evicted the tensors' objects from
// the caches. Where a tensor fails them (see taken() and same_order(); a step must hold one
// number), nothing changes and outcome[0] becomes False; the Python dispatch then checks in
// Python, raises a clear error or takes the per-tensor kernel. Otherwise the kernel bumps the
// autograd versions of the tensors it writes, as in-place ops do, updates them (without the
// GIL) and sets outcome[0] to True. Called with the GIL held.
//
// The scalars arrive rounded to float32 by the binding, as inductor.py rounds its float64
// hyper-parameter tensor: lr, 1 - beta1, beta2, eps, weight_decay, 1 / grad scale; skip is 1
// when GradScaler found inf/nan.
extern "C" void kernel(
    int64_t roles,
    int64_t tensor_type,
    int64_t parameter_type,
    int64_t outcome,
    float lr,
    float momentum_weight,
    float beta2,
    float eps,
    float weight_decay,
    float inv_scale,
    int64_t skip,
    int64_t block_size,
    int64_t maximize,
    int64_t logarithmic_schedule,
    int64_t check_only) {
    PyObject* outcome_list = reinterpret_cast<PyObject*>(outcome);
    PyObject* role_lists = reinterpret_cast<PyObject*>(roles);
    if (!PyList_Check(outcome_list) || PyList_GET_SIZE(outcome_list) != 1)
        throw std::runtime_error("outcome must be a list of one item");
    if (!PyTuple_Check(role_lists) || PyTuple_GET_SIZE(role_lists) != kRoles + kOffsetLists)
        throw std::runtime_error("roles must be a tuple of one list per role");
    const int64_t tensors = length(PyTuple_GET_ITEM(role_lists, 0));
    for (int64_t k = 0; k < kRoles + kOffsetLists; ++k)
        if (length(PyTuple_GET_ITEM(role_lists, k)) != tensors || tensors < 0)
            throw std::runtime_error("roles must be lists of one tensor per parameter");
    const auto finish = [&](bool taken) {
        PyObject* previous = PyList_GET_ITEM(outcome_list, 0);
        PyList_SET_ITEM(outcome_list, 0, Py_NewRef(taken ? Py_True : Py_False));
        Py_XDECREF(previous);
    };

    // Pass 1 reads and checks; nothing changes until every tensor has passed.
    const auto types = std::make_pair(
        reinterpret_cast<PyTypeObject*>(tensor_type), reinterpret_cast<PyTypeObject*>(parameter_type));
    std::vector<c10::TensorImpl*> impls(kRoles * tensors);
    std::vector<char> coded(tensors, 0);
    const auto impl_of = [&](int64_t k, int64_t t, c10::ScalarType dtype) {
        PyObject* object = item(PyTuple_GET_ITEM(role_lists, k), t);
        return taken(object, types.first, types.second, dtype, k != 1);
    };
    const auto absent = [&](int64_t k, int64_t t) {
        return item(PyTuple_GET_ITEM(role_lists, k), t) == Py_None;
    };
    const bool all_taken = checked_group(tensors, impls, coded, impl_of, absent);
    if (!all_taken) return finish(false);
    // 8-bit codes: the index of each tensor's first element in its whole tensor (a shard's),
    // which the rounding noise counts from; Python ints.
    std::vector<int64_t> noise_offsets(tensors, 0);
    for (int64_t t = 0; t < kOffsetLists * tensors; ++t) {
        PyObject* offset = item(PyTuple_GET_ITEM(role_lists, kRoles), t);
        noise_offsets[t] = PyLong_Check(offset) ? PyLong_AsLongLong(offset) : -1;
        if (noise_offsets[t] < 0) {
            PyErr_Clear();
            return finish(false);
        }
    }
    // GradScaler found inf/nan: every tensor keeps its values and its step count.
    if (skip || check_only) return finish(true);
    // The update touches no Python object, so other Python threads run meanwhile, as during a
    // torch op; and as a torch op does, the kernel holds a reference to every TensorImpl it
    // writes or reads, taken while it still holds the GIL, until it is done (another thread may
    // drop the tensors' last Python references meanwhile).
    for (c10::TensorImpl* impl : impls)
        if (impl != nullptr) c10::raw::intrusive_ptr::incref(impl);
    Py_BEGIN_ALLOW_THREADS
    update_group(
        tensors, impls, coded, noise_offsets, lr, momentum_weight, beta2, eps, weight_decay,
        inv_scale, block_size, maximize, logarithmic_schedule);
    Py_END_ALLOW_THREADS
    for (c10::TensorImpl* impl : impls)
        if (impl != nullptr) c10::raw::intrusive_ptr::decref(impl);
    finish(true);
}
