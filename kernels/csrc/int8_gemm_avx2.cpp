// AVX2 + FMA int8 weight-only kernels, for x86-64 CPUs without AVX-512. Compiled with
// -mavx2 -mfma -mf16c and called only after __builtin_cpu_supports said yes. Internal linkage
// only and no standard-library templates, for the reason given in int8_gemm_avx512.cpp.
//
// Same algorithms as the AVX-512 file at half the width:
// GEMV: NR weight rows at a time (8 for M = 1, else 4), one cache line per row per trip, 8
//   weights per step: vpmovsxbd from an 8-byte load, vcvtdq2ps, one FMA per activation row.
//   K tails go through a zero-padded copy; dynamic row chunks and prefetch as in the AVX-512 file.
// GEMM: KC x 16 panels dequantised and transposed (8 x 8 register transposes) into an fp32
//   buffer, then a 6 x 16 outer-product micro-kernel (12 ymm accumulators of the 16 registers).
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "int8_gemm.h"

#if defined(B2F_HAVE_OPENMP)
#include <omp.h>
#endif

namespace b2f {
namespace {

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

inline __m256 load_q8(const int8_t* q) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q))));
}

// First `len` (< 8) int8 values, zero padded: a masked byte load does not exist in AVX2.
inline __m256 load_q8_tail(const int8_t* q, int64_t len) {
    int8_t tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    memcpy(tmp, q, static_cast<size_t>(len));
    return load_q8(tmp);
}

inline __m256i lane_mask(int64_t len) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(len < 0 ? 0 : len)),
                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// ------------------------------------------------------------------------------------------ GEMV

// The line two tiles ahead: see int8_gemm_avx512.cpp for why and what it measured.
template <int NR>
inline void prefetch_ahead(const int8_t* const q[NR], int64_t k, int64_t K) {
    for (int j = 0; j < NR; ++j) _mm_prefetch(reinterpret_cast<const char*>(q[j] + 2 * NR * K + k), _MM_HINT_T0);
}

template <int MR, int NR, bool GROUPED>
inline void gemv_tile(const Int8Problem& p, int64_t m0, int64_t n0) {
    __m256 acc[MR][NR];
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
    const int8_t* q[NR];
    for (int j = 0; j < NR; ++j) q[j] = p.w + (n0 + j) * p.K;
    const float* x[MR];
    for (int i = 0; i < MR; ++i) x[i] = p.x + (m0 + i) * p.ldx;
    const int64_t K = p.K;

    if (!GROUPED) {
        int64_t k = 0;
        for (; k + 64 <= K; k += 64) {  // one cache line of each row per trip, prefetch included
            prefetch_ahead<NR>(q, k, K);
            for (int u = 0; u < 64; u += 8) {
                __m256 xv[MR];
                for (int i = 0; i < MR; ++i) xv[i] = _mm256_loadu_ps(x[i] + k + u);
                for (int j = 0; j < NR; ++j) {
                    const __m256 wv = load_q8(q[j] + k + u);
                    for (int i = 0; i < MR; ++i) acc[i][j] = _mm256_fmadd_ps(xv[i], wv, acc[i][j]);
                }
            }
        }
        for (; k + 8 <= K; k += 8) {
            __m256 xv[MR];
            for (int i = 0; i < MR; ++i) xv[i] = _mm256_loadu_ps(x[i] + k);
            for (int j = 0; j < NR; ++j) {
                const __m256 wv = load_q8(q[j] + k);
                for (int i = 0; i < MR; ++i) acc[i][j] = _mm256_fmadd_ps(xv[i], wv, acc[i][j]);
            }
        }
        if (k < K) {
            const __m256i m = lane_mask(K - k);
            __m256 xv[MR];
            for (int i = 0; i < MR; ++i) xv[i] = _mm256_maskload_ps(x[i] + k, m);
            for (int j = 0; j < NR; ++j) {
                const __m256 wv = load_q8_tail(q[j] + k, K - k);
                for (int i = 0; i < MR; ++i) acc[i][j] = _mm256_fmadd_ps(xv[i], wv, acc[i][j]);
            }
        }
        for (int j = 0; j < NR; ++j) {
            const float s = p.scale[n0 + j];
            const float b = p.bias ? p.bias[n0 + j] : 0.0f;
            for (int i = 0; i < MR; ++i) p.y[(m0 + i) * p.ldy + n0 + j] = hsum(acc[i][j]) * s + b;
        }
    } else {
        const int64_t G = p.group, groups = K / G;
        for (int64_t g = 0; g < groups; ++g) {
            __m256 sv[NR];
            for (int j = 0; j < NR; ++j) sv[j] = _mm256_set1_ps(p.scale[(n0 + j) * groups + g]);
            for (int64_t k = g * G; k < (g + 1) * G; k += 8) {
                if ((k & 63) == 0) prefetch_ahead<NR>(q, k, K);
                __m256 xv[MR];
                for (int i = 0; i < MR; ++i) xv[i] = _mm256_loadu_ps(x[i] + k);
                for (int j = 0; j < NR; ++j) {
                    const __m256 wv = _mm256_mul_ps(load_q8(q[j] + k), sv[j]);
                    for (int i = 0; i < MR; ++i) acc[i][j] = _mm256_fmadd_ps(xv[i], wv, acc[i][j]);
                }
            }
        }
        for (int j = 0; j < NR; ++j) {
            const float b = p.bias ? p.bias[n0 + j] : 0.0f;
            for (int i = 0; i < MR; ++i) p.y[(m0 + i) * p.ldy + n0 + j] = hsum(acc[i][j]) + b;
        }
    }
}

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

constexpr int kMR = 6;
constexpr int kNR = 16;
constexpr int64_t kKC = 256;
constexpr int64_t kMC = 120;  // a multiple of kMR
static_assert(kKC * kNR <= kWorkFloatsPerThread, "packing buffer too small");

inline void transpose8(__m256 r[8]) {
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

void pack_panel(const Int8Problem& p, int64_t n0, int64_t k0, int64_t kc, float* dst) {
    const int64_t groups = p.group ? p.K / p.group : 1;
    for (int half = 0; half < 2; ++half) {
        const int64_t r0 = n0 + 8 * half;
        for (int64_t kk = 0; kk < kc; kk += 8) {
            const int64_t len = min64(8, kc - kk);
            const int64_t g = p.group ? (k0 + kk) / p.group : 0;  // constant over 8 columns
            __m256 r[8];
            for (int i = 0; i < 8; ++i) {
                const int64_t n = r0 + i;
                if (n < p.N) {
                    const int8_t* src = p.w + n * p.K + k0 + kk;
                    const __m256 v = len == 8 ? load_q8(src) : load_q8_tail(src, len);
                    r[i] = _mm256_mul_ps(v, _mm256_set1_ps(p.scale[n * groups + g]));
                } else {
                    r[i] = _mm256_setzero_ps();
                }
            }
            transpose8(r);
            for (int64_t c = 0; c < len; ++c) _mm256_store_ps(dst + (kk + c) * kNR + 8 * half, r[c]);
        }
    }
}

template <int MR>
inline void micro(const float* x, int64_t ldx, const float* wp, int64_t kc, float* y, int64_t ldy,
                  __m256i m0, __m256i m1) {
    __m256 c[MR][2];
    for (int i = 0; i < MR; ++i) c[i][0] = c[i][1] = _mm256_setzero_ps();
    for (int64_t k = 0; k < kc; ++k) {
        const __m256 b0 = _mm256_load_ps(wp + k * kNR);
        const __m256 b1 = _mm256_load_ps(wp + k * kNR + 8);
        for (int i = 0; i < MR; ++i) {
            const __m256 a = _mm256_broadcast_ss(x + i * ldx + k);
            c[i][0] = _mm256_fmadd_ps(a, b0, c[i][0]);
            c[i][1] = _mm256_fmadd_ps(a, b1, c[i][1]);
        }
    }
    for (int i = 0; i < MR; ++i) {
        float* yr = y + i * ldy;
        _mm256_maskstore_ps(yr, m0, _mm256_add_ps(_mm256_maskload_ps(yr, m0), c[i][0]));
        _mm256_maskstore_ps(yr + 8, m1, _mm256_add_ps(_mm256_maskload_ps(yr + 8, m1), c[i][1]));
    }
}

inline void micro_any(int mr, const float* x, int64_t ldx, const float* wp, int64_t kc, float* y,
                      int64_t ldy, __m256i m0, __m256i m1) {
    switch (mr) {
        case 6: micro<6>(x, ldx, wp, kc, y, ldy, m0, m1); break;
        case 5: micro<5>(x, ldx, wp, kc, y, ldy, m0, m1); break;
        case 4: micro<4>(x, ldx, wp, kc, y, ldy, m0, m1); break;
        case 3: micro<3>(x, ldx, wp, kc, y, ldy, m0, m1); break;
        case 2: micro<2>(x, ldx, wp, kc, y, ldy, m0, m1); break;
        case 1: micro<1>(x, ldx, wp, kc, y, ldy, m0, m1); break;
        default: break;
    }
}

void gemm_range(const Int8Problem& p, int64_t p0, int64_t p1, int64_t ma, int64_t mb, float* wp) {
    for (int64_t pn = p0; pn < p1; ++pn) {
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
                const __m256i c0 = lane_mask(nc), c1 = lane_mask(nc - 8);
                for (int64_t m = mc; m < mce; m += kMR)
                    micro_any(static_cast<int>(min64(kMR, mce - m)), p.x + m * p.ldx + k0, p.ldx, wp, kc,
                              p.y + m * p.ldy + n0, p.ldy, c0, c1);
            }
        }
    }
}

}  // namespace

void int8_gemv_avx2(const Int8Problem& p) {
    if (p.group) {
        if (p.M == 1) gemv_all<8, true>(p); else gemv_all<4, true>(p);
    } else {
        if (p.M == 1) gemv_all<8, false>(p); else gemv_all<4, false>(p);
    }
}

void int8_gemm_avx2(const Int8Problem& p) {
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
