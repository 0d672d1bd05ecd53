// AVX2 + FMA int8 weight-only kernels, for x86-64 CPUs without AVX-512. Compiled with
// -mavx2 -mfma -mf16c and called only after __builtin_cpu_supports said yes (int8_gemm.cpp).
// Everything here has internal linkage and no standard-library template is used, so no
// function compiled with AVX2 can be merged into code that runs on older CPUs.
//
// The GEMV and GEMM drivers are int8_gemm_driver.h's, at 8 lanes: GEMV steps of 8 weights
// (vpmovsxbd from an 8-byte load, vcvtdq2ps, one FMA per activation row), K tails through a
// zero-padded copy (AVX2 has no masked byte load); GEMM panels of KC x 16 transposed with 8 x 8
// register transposes, and a 6 x 16 micro-kernel (12 ymm accumulators of the 16 registers).
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "int8_gemm.h"
#include "int8_gemm_driver.h"

namespace b2f {
namespace {

struct Avx2 {
    using Vec = __m256;
    using TailMask = __m256i;
    using ColMask = __m256i;
    static constexpr int kWidth = 8;
    static constexpr int kMR = 6;        // micro-kernel rows: 12 accumulators + 2 weights + 1 broadcast
    static constexpr int64_t kMC = 120;  // M block, a multiple of kMR

    static Vec zero() { return _mm256_setzero_ps(); }
    static Vec load(const float* x) { return _mm256_loadu_ps(x); }
    static Vec load_aligned(const float* x) { return _mm256_load_ps(x); }
    static Vec broadcast(const float* x) { return _mm256_broadcast_ss(x); }
    static Vec set1(float v) { return _mm256_set1_ps(v); }
    static void store_aligned(float* y, Vec v) { _mm256_store_ps(y, v); }
    static Vec fmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
    static Vec mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }

    static Vec load_q(const int8_t* q) {
        return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q))));
    }

    // Lanes [0, len) set; len may be <= 0 or >= 8.
    static __m256i lane_mask(int64_t len) {
        return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(len < 0 ? 0 : len)),
                                  _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    }
    static TailMask tail_mask(int64_t len) { return lane_mask(len); }
    static ColMask col_mask(int64_t cols) { return lane_mask(cols); }
    static Vec load_tail(const float* x, TailMask m) { return _mm256_maskload_ps(x, m); }

    // First `len` (< 8) int8 values, zero padded: a masked byte load does not exist in AVX2.
    static Vec load_q_tail(const int8_t* q, int64_t len, TailMask) {
        int8_t tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        memcpy(tmp, q, static_cast<size_t>(len));
        return load_q(tmp);
    }

    static void add_to(float* y, ColMask m, Vec c) {
        _mm256_maskstore_ps(y, m, _mm256_add_ps(_mm256_maskload_ps(y, m), c));
    }

    static float hsum(Vec v) {
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        s = _mm_add_ss(s, _mm_movehdup_ps(s));
        return _mm_cvtss_f32(s);
    }

    // In-register 8 x 8 fp32 transpose: r[i][j] -> r[j][i].
    static void transpose(Vec r[8]) {
        __m256 t[8], u[8];
        for (int g = 0; g < 2; ++g) {
            t[4 * g + 0] = _mm256_unpacklo_ps(r[4 * g + 0], r[4 * g + 1]);
            t[4 * g + 1] = _mm256_unpackhi_ps(r[4 * g + 0], r[4 * g + 1]);
            t[4 * g + 2] = _mm256_unpacklo_ps(r[4 * g + 2], r[4 * g + 3]);
            t[4 * g + 3] = _mm256_unpackhi_ps(r[4 * g + 2], r[4 * g + 3]);
            // u[4g + a], lane L = rows 4g..4g+3, element 4L + a
            u[4 * g + 0] = _mm256_shuffle_ps(t[4 * g + 0], t[4 * g + 2], 0x44);
            u[4 * g + 1] = _mm256_shuffle_ps(t[4 * g + 0], t[4 * g + 2], 0xEE);
            u[4 * g + 2] = _mm256_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
            u[4 * g + 3] = _mm256_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xEE);
        }
        for (int a = 0; a < 4; ++a) {
            r[a] = _mm256_permute2f128_ps(u[a], u[4 + a], 0x20);
            r[4 + a] = _mm256_permute2f128_ps(u[a], u[4 + a], 0x31);
        }
    }
};

}  // namespace

void int8_gemv_avx2(const Int8Problem& p) { run_gemv<Avx2>(p); }
void int8_gemm_avx2(const Int8Problem& p) { run_gemm<Avx2>(p); }

}  // namespace b2f
