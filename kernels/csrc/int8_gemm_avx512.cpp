// AVX-512 (F + BW + VL) int8 weight-only kernels. Compiled with -mavx512f -mavx512bw -mavx512vl
// -mfma and called only after __builtin_cpu_supports said yes (int8_gemm.cpp). Everything here
// has internal linkage and no standard-library template is used, so no function compiled with
// AVX-512 can be merged into code that runs on older CPUs.
//
// GEMV: each task takes NR weight rows (8 for M = 1, else 4) and walks K one 64-byte cache line
// per row at a time, 16 elements per step: vpmovsxbd (16 int8 -> int32, load folded in),
// vcvtdq2ps, then one FMA per activation row with the 16 activations loaded once for all NR rows.
// NR * MR independent accumulators hide the 4-cycle FMA latency; K tails use masked loads, so
// any K works. Per-channel scales multiply the finished dot product; group scales multiply the
// dequantised weights (one vmulps per 16 weights, shared by the MR rows), so no second set of
// accumulators is needed. Rows are handed out in dynamic chunks (robust to a preempted thread)
// and the line two tiles ahead is prefetched (see prefetch_ahead).
// Measured on Zen 4, one thread, weights in L1/L2 (C harness calling the kernel directly):
//   M = 1: 30 Gweights/s, bound by the two conversion instructions per 16 weights (the FMA
//          pipes are half idle; the AVX2 file reaches the same 27-28 Gweights/s, as Zen 4 splits
//          512-bit operations in two);
//   M >= 8 (4 rows per pass): 108-110 GFLOPS, i.e. one 512-bit FMA per cycle, the core's peak:
//          the conversions run on other pipes beside the FMAs.
//
// GEMM (timed against the GEMV by the Python dispatcher for M > 4): BLIS-style. Per thread, a
// KC x 32 panel of weights is dequantised, scaled and transposed (16 x 16 register transposes)
// into a packed fp32 buffer, then an 8 x 32 outer-product micro-kernel (16 zmm accumulators,
// 2 weight loads + 8 broadcasts per k) runs over every activation row: ~0.6 instructions of
// dequantisation per weight once per 128 rows instead of 2 per weight per 4 rows, and no
// horizontal reductions. Measured on Zen 4, one thread: 53-105 GFLOPS for M = 8..128 at
// 512 x 2048, 42-92 at 2560 x 10240, i.e. slower than the GEMV above on this CPU because the
// GEMV's conversions are free there. It is kept for CPUs where conversions and FMAs share
// ports (not measured here); the dispatcher's timing decides per shape.

#include <immintrin.h>
#include <stdint.h>

#include "int8_gemm.h"

#if defined(B2F_HAVE_OPENMP)
#include <omp.h>
#endif

namespace b2f {
namespace {

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

inline __m512 load_q16(const int8_t* q) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))));
}

inline __m512 load_q16_masked(const int8_t* q, __mmask16 m) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, q)));
}

// ------------------------------------------------------------------------------------------ GEMV

// Software prefetch of the same cache line two tiles (2 * NR rows) ahead. Rows of 2-2.5 KiB
// (K = 2048 / 2560, OPT-2.7B's q/k/v/out/fc1) end before the hardware stream prefetcher has
// ramped up; measured on Zen 4 from DRAM (weights cycled through 256 MiB), one thread:
// 2560 x 2560 12.4 -> 14.7 GB/s, 512 x 2048 11.4 -> 14.3 GB/s, 2560 x 10240 unchanged (18.9);
// two threads 23.2 -> 25.9 GB/s; in cache 27.7 -> 30.2 Gweights/s (the 64-byte unroll).
// Prefetching past the end of the weights is harmless: prefetches never fault.
template <int NR>
inline void prefetch_ahead(const int8_t* const q[NR], int64_t k, int64_t K) {
    for (int j = 0; j < NR; ++j) _mm_prefetch(reinterpret_cast<const char*>(q[j] + 2 * NR * K + k), _MM_HINT_T0);
}

template <int MR, int NR, bool GROUPED>
inline void gemv_tile(const Int8Problem& p, int64_t m0, int64_t n0) {
    __m512 acc[MR][NR];
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
    const int8_t* q[NR];
    for (int j = 0; j < NR; ++j) q[j] = p.w + (n0 + j) * p.K;
    const float* x[MR];
    for (int i = 0; i < MR; ++i) x[i] = p.x + (m0 + i) * p.ldx;
    const int64_t K = p.K;

    if (!GROUPED) {
        int64_t k = 0;
        for (; k + 64 <= K; k += 64) {  // one cache line of each row per trip, prefetch included
            prefetch_ahead<NR>(q, k, K);
            for (int u = 0; u < 64; u += 16) {
                __m512 xv[MR];
                for (int i = 0; i < MR; ++i) xv[i] = _mm512_loadu_ps(x[i] + k + u);
                for (int j = 0; j < NR; ++j) {
                    const __m512 wv = load_q16(q[j] + k + u);
                    for (int i = 0; i < MR; ++i) acc[i][j] = _mm512_fmadd_ps(xv[i], wv, acc[i][j]);
                }
            }
        }
        for (; k + 16 <= K; k += 16) {
            __m512 xv[MR];
            for (int i = 0; i < MR; ++i) xv[i] = _mm512_loadu_ps(x[i] + k);
            for (int j = 0; j < NR; ++j) {
                const __m512 wv = load_q16(q[j] + k);
                for (int i = 0; i < MR; ++i) acc[i][j] = _mm512_fmadd_ps(xv[i], wv, acc[i][j]);
            }
        }
        if (k < K) {
            const __mmask16 m = static_cast<__mmask16>((1u << (K - k)) - 1u);
            __m512 xv[MR];
            for (int i = 0; i < MR; ++i) xv[i] = _mm512_maskz_loadu_ps(m, x[i] + k);
            for (int j = 0; j < NR; ++j) {
                const __m512 wv = load_q16_masked(q[j] + k, m);
                for (int i = 0; i < MR; ++i) acc[i][j] = _mm512_fmadd_ps(xv[i], wv, acc[i][j]);
            }
        }
        for (int j = 0; j < NR; ++j) {
            const float s = p.scale[n0 + j];
            const float b = p.bias ? p.bias[n0 + j] : 0.0f;
            for (int i = 0; i < MR; ++i) p.y[(m0 + i) * p.ldy + n0 + j] = _mm512_reduce_add_ps(acc[i][j]) * s + b;
        }
    } else {
        const int64_t G = p.group, groups = K / G;
        for (int64_t g = 0; g < groups; ++g) {
            __m512 sv[NR];
            for (int j = 0; j < NR; ++j) sv[j] = _mm512_set1_ps(p.scale[(n0 + j) * groups + g]);
            for (int64_t k = g * G; k < (g + 1) * G; k += 16) {
                if ((k & 63) == 0) prefetch_ahead<NR>(q, k, K);
                __m512 xv[MR];
                for (int i = 0; i < MR; ++i) xv[i] = _mm512_loadu_ps(x[i] + k);
                for (int j = 0; j < NR; ++j) {
                    const __m512 wv = _mm512_mul_ps(load_q16(q[j] + k), sv[j]);
                    for (int i = 0; i < MR; ++i) acc[i][j] = _mm512_fmadd_ps(xv[i], wv, acc[i][j]);
                }
            }
        }
        for (int j = 0; j < NR; ++j) {
            const float b = p.bias ? p.bias[n0 + j] : 0.0f;
            for (int i = 0; i < MR; ++i) p.y[(m0 + i) * p.ldy + n0 + j] = _mm512_reduce_add_ps(acc[i][j]) + b;
        }
    }
}

// All activation rows against NR weight rows starting at n0, MR <= 4 rows at a time.
template <int NR, bool GROUPED>
inline void gemv_rows(const Int8Problem& p, int64_t n0) {
    int64_t m = 0;
    for (; m + 4 <= p.M; m += 4) gemv_tile<4, NR, GROUPED>(p, m, n0);
    switch (p.M - m) {
        case 3: gemv_tile<3, NR, GROUPED>(p, m, n0); break;
        case 2: gemv_tile<2, NR, GROUPED>(p, m, n0); break;
        case 1: gemv_tile<1, NR, GROUPED>(p, m, n0); break;
        default: break;
    }
}

template <int NR, bool GROUPED>
void gemv_all(const Int8Problem& p) {
    const int64_t tiles = (p.N + NR - 1) / NR;
    // Dynamic chunks, ~8 per thread: on a loaded machine the share of a preempted thread is
    // taken over by the others instead of every call waiting for it at the closing barrier
    // (a static split measured 10-100x slower 2-thread calls beside other jobs on 2 cores).
    const int64_t chunk = tiles / (8 * p.num_threads) > 0 ? tiles / (8 * p.num_threads) : 1;
    (void)chunk;
#if defined(B2F_HAVE_OPENMP)
#pragma omp parallel for num_threads(p.num_threads) schedule(dynamic, chunk)
#endif
    for (int64_t t = 0; t < tiles; ++t) {
        const int64_t n0 = t * NR;
        if (n0 + NR <= p.N) {
            gemv_rows<NR, GROUPED>(p, n0);
        } else {
            for (int64_t n = n0; n < p.N; ++n) gemv_rows<1, GROUPED>(p, n);
        }
    }
}

// ------------------------------------------------------------------------------------------ GEMM

constexpr int kMR = 8;     // activation rows per micro-kernel
constexpr int kNR = 32;    // output columns per micro-kernel: two zmm
constexpr int64_t kKC = 256;  // K block: the packed panel (kKC x kNR fp32 = 32 KiB) stays in L2
constexpr int64_t kMC = 128;  // M block: kMC x kKC activations (128 KiB) stay in L2 across panels
static_assert(kKC * kNR <= kWorkFloatsPerThread, "packing buffer too small");

// In-register 16 x 16 fp32 transpose: r[i][j] -> r[j][i] (4 rounds of 16 shuffles).
inline void transpose16(__m512 r[16]) {
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

// Dequantise rows [n0, n0 + 32) x columns [k0, k0 + kc) into dst[k][32] (fp32, scaled).
// Rows past N are zeros, so the micro-kernel needs no row tail.
void pack_panel(const Int8Problem& p, int64_t n0, int64_t k0, int64_t kc, float* dst) {
    const int64_t groups = p.group ? p.K / p.group : 1;
    for (int half = 0; half < 2; ++half) {
        const int64_t r0 = n0 + 16 * half;
        for (int64_t kk = 0; kk < kc; kk += 16) {
            const int64_t len = min64(16, kc - kk);
            const __mmask16 m = static_cast<__mmask16>(len == 16 ? 0xFFFFu : (1u << len) - 1u);
            // Within a 16-column chunk the group index is constant (group % 16 == 0, k0 % 16 == 0).
            const int64_t g = p.group ? (k0 + kk) / p.group : 0;
            __m512 r[16];
            for (int i = 0; i < 16; ++i) {
                const int64_t n = r0 + i;
                if (n < p.N) {
                    const __m512 s = _mm512_set1_ps(p.scale[n * groups + g]);
                    r[i] = _mm512_mul_ps(load_q16_masked(p.w + n * p.K + k0 + kk, m), s);
                } else {
                    r[i] = _mm512_setzero_ps();
                }
            }
            transpose16(r);
            for (int64_t c = 0; c < len; ++c) _mm512_store_ps(dst + (kk + c) * kNR + 16 * half, r[c]);
        }
    }
}

template <int MR>
inline void micro(const float* x, int64_t ldx, const float* wp, int64_t kc, float* y, int64_t ldy,
                  __mmask16 m0, __mmask16 m1) {
    __m512 c[MR][2];
    for (int i = 0; i < MR; ++i) c[i][0] = c[i][1] = _mm512_setzero_ps();
    for (int64_t k = 0; k < kc; ++k) {
        const __m512 b0 = _mm512_load_ps(wp + k * kNR);
        const __m512 b1 = _mm512_load_ps(wp + k * kNR + 16);
        for (int i = 0; i < MR; ++i) {
            const __m512 a = _mm512_set1_ps(x[i * ldx + k]);
            c[i][0] = _mm512_fmadd_ps(a, b0, c[i][0]);
            c[i][1] = _mm512_fmadd_ps(a, b1, c[i][1]);
        }
    }
    for (int i = 0; i < MR; ++i) {
        float* yr = y + i * ldy;
        _mm512_mask_storeu_ps(yr, m0, _mm512_add_ps(_mm512_maskz_loadu_ps(m0, yr), c[i][0]));
        _mm512_mask_storeu_ps(yr + 16, m1, _mm512_add_ps(_mm512_maskz_loadu_ps(m1, yr + 16), c[i][1]));
    }
}

inline void micro_any(int mr, const float* x, int64_t ldx, const float* wp, int64_t kc, float* y,
                      int64_t ldy, __mmask16 m0, __mmask16 m1) {
    switch (mr) {
        case 8: micro<8>(x, ldx, wp, kc, y, ldy, m0, m1); break;
        case 7: micro<7>(x, ldx, wp, kc, y, ldy, m0, m1); break;
        case 6: micro<6>(x, ldx, wp, kc, y, ldy, m0, m1); break;
        case 5: micro<5>(x, ldx, wp, kc, y, ldy, m0, m1); break;
        case 4: micro<4>(x, ldx, wp, kc, y, ldy, m0, m1); break;
        case 3: micro<3>(x, ldx, wp, kc, y, ldy, m0, m1); break;
        case 2: micro<2>(x, ldx, wp, kc, y, ldy, m0, m1); break;
        case 1: micro<1>(x, ldx, wp, kc, y, ldy, m0, m1); break;
        default: break;
    }
}

inline __mmask16 col_mask(int64_t cols) {
    if (cols >= 16) return 0xFFFF;
    if (cols <= 0) return 0;
    return static_cast<__mmask16>((1u << cols) - 1u);
}

// One thread: panels [p0, p1) x rows [ma, mb).
void gemm_range(const Int8Problem& p, int64_t p0, int64_t p1, int64_t ma, int64_t mb, float* wp) {
    for (int64_t pn = p0; pn < p1; ++pn) {  // y starts as the bias (or 0): the K blocks add to it
        const int64_t n0 = pn * kNR, nc = min64(kNR, p.N - n0);
        for (int64_t m = ma; m < mb; ++m)
            for (int64_t j = 0; j < nc; ++j) p.y[m * p.ldy + n0 + j] = p.bias ? p.bias[n0 + j] : 0.0f;
    }
    for (int64_t mc = ma; mc < mb; mc += kMC) {
        const int64_t mce = min64(mb, mc + kMC);
        for (int64_t k0 = 0; k0 < p.K; k0 += kKC) {
            const int64_t kc = min64(kKC, p.K - k0);
            for (int64_t pn = p0; pn < p1; ++pn) {
                const int64_t n0 = pn * kNR, nc = p.N - n0;
                pack_panel(p, n0, k0, kc, wp);
                const __mmask16 c0 = col_mask(nc), c1 = col_mask(nc - 16);
                for (int64_t m = mc; m < mce; m += kMR)
                    micro_any(static_cast<int>(min64(kMR, mce - m)), p.x + m * p.ldx + k0, p.ldx, wp, kc,
                              p.y + m * p.ldy + n0, p.ldy, c0, c1);
            }
        }
    }
}

}  // namespace

void int8_gemv_avx512(const Int8Problem& p) {
    if (p.group) {
        if (p.M == 1) gemv_all<8, true>(p); else gemv_all<4, true>(p);
    } else {
        if (p.M == 1) gemv_all<8, false>(p); else gemv_all<4, false>(p);
    }
}

void int8_gemm_avx512(const Int8Problem& p) {
    const int64_t panels = (p.N + kNR - 1) / kNR;
    const int64_t nt = p.num_threads;
    // Work items taken dynamically (see gemv_all): groups of output panels when there are
    // enough (each item streams only its own weight rows, and the activation block of a K step
    // is reused across the item's panels), else blocks of rows.
    const bool by_panels = panels >= nt;
    const int64_t per_item = by_panels ? (panels / (4 * nt) > 0 ? panels / (4 * nt) : 1)
                                       : kMR * ((p.M + kMR - 1) / kMR / (4 * nt) > 0 ? (p.M + kMR - 1) / kMR / (4 * nt) : 1);
    const int64_t items = by_panels ? (panels + per_item - 1) / per_item : (p.M + per_item - 1) / per_item;
#if defined(B2F_HAVE_OPENMP)
#pragma omp parallel num_threads(p.num_threads)
#endif
    {
#if defined(B2F_HAVE_OPENMP)
        const int64_t tid = omp_get_thread_num();
#else
        const int64_t tid = 0;
#endif
        float* wp = p.work + tid * kWorkFloatsPerThread;
#if defined(B2F_HAVE_OPENMP)
#pragma omp for schedule(dynamic, 1)
#endif
        for (int64_t it = 0; it < items; ++it) {
            const int64_t a = it * per_item, b = min64(by_panels ? panels : p.M, a + per_item);
            if (by_panels) gemm_range(p, a, b, 0, p.M, wp);
            else gemm_range(p, 0, panels, a, b, wp);
        }
    }
}

}  // namespace b2f
