// AVX-512 (F + BW + VL) int8 weight-only kernels. Compiled with -mavx512f -mavx512bw -mavx512vl
// -mfma and called only after __builtin_cpu_supports said yes (int8_gemm.cpp). Everything here
// has internal linkage and no standard-library template is used, so no function compiled with
// AVX-512 can be merged into code that runs on older CPUs.
//
// The GEMV and GEMM drivers are int8_gemm_driver.h's, at 16 lanes. GEMV: 16 weights per step,
// vpmovsxbd (16 int8 -> int32, load folded in), vcvtdq2ps, then one FMA per activation row;
// K tails use masked byte loads; 4 x NR independent accumulators hide the 4-cycle FMA latency.
// Measured on Zen 4, one thread, weights in L1/L2 (C harness calling the kernel directly):
//   M = 1: 30 Gweights/s, bound by the two conversion instructions per 16 weights (the FMA
//          pipes are half idle; the AVX2 file reaches the same 27-28 Gweights/s, as Zen 4 splits
//          512-bit operations in two);
//   M >= 8 (4 rows per pass): 108-110 GFLOPS, i.e. one 512-bit FMA per cycle, the core's peak:
//          the conversions run on other pipes beside the FMAs.
//
// GEMM: KC x 32 panels transposed with 16 x 16 register transposes, then an 8 x 32 outer-product
// micro-kernel (16 zmm accumulators, 2 weight loads + 8 broadcasts per k): ~0.6 instructions of
// dequantisation per weight once per 128 rows instead of 2 per weight per 4 rows, and no
// horizontal reductions. Measured on Zen 4, one thread: 53-105 GFLOPS for M = 8..128 at
// 512 x 2048, 42-92 at 2560 x 10240, i.e. slower than the GEMV above on this CPU because the
// GEMV's conversions are free there. It is kept for CPUs where conversions and FMAs share
// ports (not measured here); the dispatcher's timing decides per shape.

#include <immintrin.h>
#include <stdint.h>

#include "int8_gemm.h"
#include "int8_gemm_driver.h"

namespace b2f {
namespace {

struct Avx512 {
    using Vec = __m512;
    using TailMask = __mmask16;
    using ColMask = __mmask16;
    static constexpr int kWidth = 16;
    static constexpr int kMR = 8;        // micro-kernel rows: 16 accumulators
    static constexpr int64_t kMC = 128;  // M block: kMC x kKC activations (128 KiB) stay in L2 across panels

    static Vec zero() { return _mm512_setzero_ps(); }
    static Vec load(const float* x) { return _mm512_loadu_ps(x); }
    static Vec load_aligned(const float* x) { return _mm512_load_ps(x); }
    static Vec broadcast(const float* x) { return _mm512_set1_ps(*x); }
    static Vec set1(float v) { return _mm512_set1_ps(v); }
    static void store_aligned(float* y, Vec v) { _mm512_store_ps(y, v); }
    static Vec fmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
    static Vec mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
    static float hsum(Vec v) { return _mm512_reduce_add_ps(v); }

    static Vec load_q(const int8_t* q) {
        return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))));
    }

    // Lanes [0, len) set; len may be <= 0 or >= 16.
    static __mmask16 lane_mask(int64_t len) {
        if (len >= 16) return 0xFFFF;
        if (len <= 0) return 0;
        return static_cast<__mmask16>((1u << len) - 1u);
    }
    static TailMask tail_mask(int64_t len) { return lane_mask(len); }
    static ColMask col_mask(int64_t cols) { return lane_mask(cols); }
    static Vec load_tail(const float* x, TailMask m) { return _mm512_maskz_loadu_ps(m, x); }
    static Vec load_q_tail(const int8_t* q, int64_t, TailMask m) {
        return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, q)));
    }

    static void add_to(float* y, ColMask m, Vec c) {
        _mm512_mask_storeu_ps(y, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, y), c));
    }

    // In-register 16 x 16 fp32 transpose: r[i][j] -> r[j][i] (4 rounds of 16 shuffles).
    static void transpose(Vec r[16]) {
        __m512 t[16], u[16];
        for (int g = 0; g < 4; ++g) {
            t[4 * g + 0] = _mm512_unpacklo_ps(r[4 * g + 0], r[4 * g + 1]);
            t[4 * g + 1] = _mm512_unpackhi_ps(r[4 * g + 0], r[4 * g + 1]);
            t[4 * g + 2] = _mm512_unpacklo_ps(r[4 * g + 2], r[4 * g + 3]);
            t[4 * g + 3] = _mm512_unpackhi_ps(r[4 * g + 2], r[4 * g + 3]);
        }
        // u[4g + a], lane L = rows 4g..4g+3, element 4L + a
        for (int g = 0; g < 4; ++g) {
            u[4 * g + 0] = _mm512_shuffle_ps(t[4 * g + 0], t[4 * g + 2], 0x44);
            u[4 * g + 1] = _mm512_shuffle_ps(t[4 * g + 0], t[4 * g + 2], 0xEE);
            u[4 * g + 2] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
            u[4 * g + 3] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xEE);
        }
        // For each a, transpose the 4 x 4 grid of 128-bit lanes of u[a], u[4 + a], u[8 + a], u[12 + a].
        for (int a = 0; a < 4; ++a) {
            const __m512 w0 = _mm512_shuffle_f32x4(u[a], u[4 + a], 0x44);
            const __m512 w1 = _mm512_shuffle_f32x4(u[a], u[4 + a], 0xEE);
            const __m512 w2 = _mm512_shuffle_f32x4(u[8 + a], u[12 + a], 0x44);
            const __m512 w3 = _mm512_shuffle_f32x4(u[8 + a], u[12 + a], 0xEE);
            r[a] = _mm512_shuffle_f32x4(w0, w2, 0x88);
            r[4 + a] = _mm512_shuffle_f32x4(w0, w2, 0xDD);
            r[8 + a] = _mm512_shuffle_f32x4(w1, w3, 0x88);
            r[12 + a] = _mm512_shuffle_f32x4(w1, w3, 0xDD);
        }
    }
};

}  // namespace

void int8_gemv_avx512(const Int8Problem& p) { run_gemv<Avx512>(p); }
void int8_gemm_avx512(const Int8Problem& p) { run_gemm<Avx512>(p); }

}  // namespace b2f
