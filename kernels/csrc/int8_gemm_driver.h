// The int8 weight-only GEMV and GEMM drivers shared by the SIMD kernels (int8_gemm_avx2.cpp,
// int8_gemm_avx512.cpp). Each of those files defines an ISA struct (vector type, width,
// loads, conversions, reductions, transposes, micro-kernel sizes) and instantiates these
// templates with it, under its own -m flags.
//
// Include this file only from an ISA file, after <immintrin.h> and the ISA's flags: everything
// here is in an anonymous namespace, so each ISA file compiles its own copy with internal
// linkage. That matters: an inline function shared with external linkage would be merged by the
// linker across translation units, and an AVX-512 copy could then run on a CPU without AVX-512.
//
// The ISA struct provides (W = Isa::kWidth fp32 lanes per vector):
//   Vec, TailMask, ColMask; kWidth; kMR, kMC (GEMM micro-kernel rows, M block);
//   zero(), load(const float*), load_aligned(const float*), broadcast(const float*), set1(float),
//   store_aligned(float*, Vec), fmadd(a, b, c), mul(a, b), hsum(Vec);
//   load_q(const int8_t*)                W int8 -> W fp32;
//   tail_mask(len), load_tail(const float*, TailMask), load_q_tail(const int8_t*, len, TailMask)
//                                        the first len < W (or <= W) lanes, zeros beyond;
//   col_mask(cols), add_to(float*, ColMask, Vec)  masked y += c for up to W columns (cols may be
//                                        <= 0 or >= W);
//   transpose(Vec r[W])                  the W x W fp32 transpose in registers.
//
// GEMV (decode, small M): each task takes NR weight rows (8 for M = 1, else 4) and walks K one
// 64-byte cache line per row at a time, W elements per step: the int8 weights are widened and
// converted in registers, then one FMA per activation row with the W activations loaded once for
// all NR rows. NR * MR independent accumulators hide the FMA latency; K tails use masked loads,
// so any K works. Per-channel scales multiply the finished dot product; group scales multiply the
// dequantised weights (one multiply per W weights, shared by the MR rows), so no second set of
// accumulators is needed. Rows are handed out in dynamic chunks (robust to a preempted thread)
// and the line two tiles ahead is prefetched (see prefetch_ahead).
//
// GEMM (timed against the GEMV by the Python dispatcher for M > 4): BLIS-style. Per thread, a
// kKC x 2W panel of weights is dequantised, scaled and transposed (W x W register transposes)
// into a packed fp32 buffer, then a kMR x 2W outer-product micro-kernel (2 kMR accumulators,
// 2 weight loads + kMR broadcasts per k) runs over every activation row: no horizontal
// reductions, and the dequantisation is paid once per kMC rows instead of once per 4.
#pragma once

#include <immintrin.h>
#include <stdint.h>

#include "int8_gemm.h"

#if defined(B2F_HAVE_OPENMP)
#include <omp.h>
#endif

namespace b2f {
namespace {

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// ------------------------------------------------------------------------------------------ GEMV

// Software prefetch of the same cache line two tiles (2 * NR rows) ahead. Rows of 2-2.5 KiB
// (K = 2048 / 2560, OPT-2.7B's q/k/v/out/fc1) end before the hardware stream prefetcher has
// ramped up; measured with the AVX-512 kernels on Zen 4 from DRAM (weights cycled through
// 256 MiB), one thread: 2560 x 2560 12.4 -> 14.7 GB/s, 512 x 2048 11.4 -> 14.3 GB/s,
// 2560 x 10240 unchanged (18.9); two threads 23.2 -> 25.9 GB/s; in cache 27.7 -> 30.2
// Gweights/s (the 64-byte unroll). Prefetching past the end of the weights is harmless:
// prefetches never fault.
template <int NR>
inline void prefetch_ahead(const int8_t* const q[NR], int64_t k, int64_t K) {
    for (int j = 0; j < NR; ++j) _mm_prefetch(reinterpret_cast<const char*>(q[j] + 2 * NR * K + k), _MM_HINT_T0);
}

// Rows m0 .. m0 + MR - 1 of y, columns n0 .. n0 + NR - 1.
template <class Isa, int MR, int NR, bool GROUPED>
inline void gemv_tile(const Int8Problem& p, int64_t m0, int64_t n0) {
    using Vec = typename Isa::Vec;
    constexpr int W = Isa::kWidth;
    Vec acc[MR][NR];
    for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j) acc[i][j] = Isa::zero();
    const int8_t* q[NR];
    for (int j = 0; j < NR; ++j) q[j] = p.w + (n0 + j) * p.K;
    const float* x[MR];
    for (int i = 0; i < MR; ++i) x[i] = p.x + (m0 + i) * p.ldx;
    const int64_t K = p.K;

    if (!GROUPED) {
        int64_t k = 0;
        for (; k + 64 <= K; k += 64) {  // one cache line of each row per trip, prefetch included
            prefetch_ahead<NR>(q, k, K);
            for (int u = 0; u < 64; u += W) {
                Vec xv[MR];
                for (int i = 0; i < MR; ++i) xv[i] = Isa::load(x[i] + k + u);
                for (int j = 0; j < NR; ++j) {
                    const Vec wv = Isa::load_q(q[j] + k + u);
                    for (int i = 0; i < MR; ++i) acc[i][j] = Isa::fmadd(xv[i], wv, acc[i][j]);
                }
            }
        }
        for (; k + W <= K; k += W) {
            Vec xv[MR];
            for (int i = 0; i < MR; ++i) xv[i] = Isa::load(x[i] + k);
            for (int j = 0; j < NR; ++j) {
                const Vec wv = Isa::load_q(q[j] + k);
                for (int i = 0; i < MR; ++i) acc[i][j] = Isa::fmadd(xv[i], wv, acc[i][j]);
            }
        }
        if (k < K) {
            const typename Isa::TailMask m = Isa::tail_mask(K - k);
            Vec xv[MR];
            for (int i = 0; i < MR; ++i) xv[i] = Isa::load_tail(x[i] + k, m);
            for (int j = 0; j < NR; ++j) {
                const Vec wv = Isa::load_q_tail(q[j] + k, K - k, m);
                for (int i = 0; i < MR; ++i) acc[i][j] = Isa::fmadd(xv[i], wv, acc[i][j]);
            }
        }
        for (int j = 0; j < NR; ++j) {
            const float s = p.scale[n0 + j];
            const float b = p.bias ? p.bias[n0 + j] : 0.0f;
            for (int i = 0; i < MR; ++i) p.y[(m0 + i) * p.ldy + n0 + j] = Isa::hsum(acc[i][j]) * s + b;
        }
    } else {
        // The front end sends only groups that are a multiple of 16, hence of W: no tails here.
        const int64_t G = p.group, groups = K / G;
        for (int64_t g = 0; g < groups; ++g) {
            Vec sv[NR];
            for (int j = 0; j < NR; ++j) sv[j] = Isa::set1(p.scale[(n0 + j) * groups + g]);
            for (int64_t k = g * G; k < (g + 1) * G; k += W) {
                if ((k & 63) == 0) prefetch_ahead<NR>(q, k, K);
                Vec xv[MR];
                for (int i = 0; i < MR; ++i) xv[i] = Isa::load(x[i] + k);
                for (int j = 0; j < NR; ++j) {
                    const Vec wv = Isa::mul(Isa::load_q(q[j] + k), sv[j]);
                    for (int i = 0; i < MR; ++i) acc[i][j] = Isa::fmadd(xv[i], wv, acc[i][j]);
                }
            }
        }
        for (int j = 0; j < NR; ++j) {
            const float b = p.bias ? p.bias[n0 + j] : 0.0f;
            for (int i = 0; i < MR; ++i) p.y[(m0 + i) * p.ldy + n0 + j] = Isa::hsum(acc[i][j]) + b;
        }
    }
}

// All activation rows against NR weight rows starting at n0, MR <= 4 rows at a time.
template <class Isa, int NR, bool GROUPED>
inline void gemv_rows(const Int8Problem& p, int64_t n0) {
    int64_t m = 0;
    for (; m + 4 <= p.M; m += 4) gemv_tile<Isa, 4, NR, GROUPED>(p, m, n0);
    switch (p.M - m) {
        case 3: gemv_tile<Isa, 3, NR, GROUPED>(p, m, n0); break;
        case 2: gemv_tile<Isa, 2, NR, GROUPED>(p, m, n0); break;
        case 1: gemv_tile<Isa, 1, NR, GROUPED>(p, m, n0); break;
        default: break;
    }
}

template <class Isa, int NR, bool GROUPED>
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
            gemv_rows<Isa, NR, GROUPED>(p, n0);
        } else {
            for (int64_t n = n0; n < p.N; ++n) gemv_rows<Isa, 1, GROUPED>(p, n);
        }
    }
}

template <class Isa>
void run_gemv(const Int8Problem& p) {
    if (p.group) {
        if (p.M == 1) gemv_all<Isa, 8, true>(p); else gemv_all<Isa, 4, true>(p);
    } else {
        if (p.M == 1) gemv_all<Isa, 8, false>(p); else gemv_all<Isa, 4, false>(p);
    }
}

// ------------------------------------------------------------------------------------------ GEMM

constexpr int64_t kKC = 256;  // K block: the packed panel (kKC x 2W fp32, 32 KiB for W = 16) stays in L2

// Dequantise rows [n0, n0 + 2W) x columns [k0, k0 + kc) into dst[k][2W] (fp32, scaled).
// Rows past N are zeros, so the micro-kernel needs no row tail.
template <class Isa>
void pack_panel(const Int8Problem& p, int64_t n0, int64_t k0, int64_t kc, float* dst) {
    using Vec = typename Isa::Vec;
    constexpr int W = Isa::kWidth;
    const int64_t groups = p.group ? p.K / p.group : 1;
    for (int half = 0; half < 2; ++half) {
        const int64_t r0 = n0 + W * half;
        for (int64_t kk = 0; kk < kc; kk += W) {
            const int64_t len = min64(W, kc - kk);
            const typename Isa::TailMask m = Isa::tail_mask(len);
            // Within a W-column chunk the group index is constant (group % 16 == 0, k0 % 16 == 0).
            const int64_t g = p.group ? (k0 + kk) / p.group : 0;
            Vec r[W];
            for (int i = 0; i < W; ++i) {
                const int64_t n = r0 + i;
                if (n < p.N) {
                    const int8_t* src = p.w + n * p.K + k0 + kk;
                    const Vec v = len == W ? Isa::load_q(src) : Isa::load_q_tail(src, len, m);
                    r[i] = Isa::mul(v, Isa::set1(p.scale[n * groups + g]));
                } else {
                    r[i] = Isa::zero();
                }
            }
            Isa::transpose(r);
            for (int64_t c = 0; c < len; ++c) Isa::store_aligned(dst + (kk + c) * 2 * W + W * half, r[c]);
        }
    }
}

// y[0 .. MR) x [0 .. 2W) += x[0 .. MR) x [0 .. kc) @ wp (the packed panel), masked to the valid columns.
template <class Isa, int MR>
inline void micro(const float* x, int64_t ldx, const float* wp, int64_t kc, float* y, int64_t ldy,
                  typename Isa::ColMask m0, typename Isa::ColMask m1) {
    using Vec = typename Isa::Vec;
    constexpr int W = Isa::kWidth;
    Vec c[MR][2];
    for (int i = 0; i < MR; ++i) c[i][0] = c[i][1] = Isa::zero();
    for (int64_t k = 0; k < kc; ++k) {
        const Vec b0 = Isa::load_aligned(wp + k * 2 * W);
        const Vec b1 = Isa::load_aligned(wp + k * 2 * W + W);
        for (int i = 0; i < MR; ++i) {
            const Vec a = Isa::broadcast(x + i * ldx + k);
            c[i][0] = Isa::fmadd(a, b0, c[i][0]);
            c[i][1] = Isa::fmadd(a, b1, c[i][1]);
        }
    }
    for (int i = 0; i < MR; ++i) {
        Isa::add_to(y + i * ldy, m0, c[i][0]);
        Isa::add_to(y + i * ldy + W, m1, c[i][1]);
    }
}

// micro<Isa, mr> for a run-time mr in 1 .. MR.
template <class Isa, int MR = Isa::kMR>
inline void micro_any(int mr, const float* x, int64_t ldx, const float* wp, int64_t kc, float* y, int64_t ldy,
                      typename Isa::ColMask m0, typename Isa::ColMask m1) {
    if (mr == MR) {
        micro<Isa, MR>(x, ldx, wp, kc, y, ldy, m0, m1);
    } else if constexpr (MR > 1) {
        micro_any<Isa, MR - 1>(mr, x, ldx, wp, kc, y, ldy, m0, m1);
    }
}

// One thread: panels [p0, p1) x rows [ma, mb).
template <class Isa>
void gemm_range(const Int8Problem& p, int64_t p0, int64_t p1, int64_t ma, int64_t mb, float* wp) {
    constexpr int W = Isa::kWidth;
    constexpr int64_t kNR = 2 * W;
    for (int64_t pn = p0; pn < p1; ++pn) {  // y starts as the bias (or 0): the K blocks add to it
        const int64_t n0 = pn * kNR, nc = min64(kNR, p.N - n0);
        for (int64_t m = ma; m < mb; ++m)
            for (int64_t j = 0; j < nc; ++j) p.y[m * p.ldy + n0 + j] = p.bias ? p.bias[n0 + j] : 0.0f;
    }
    for (int64_t mc = ma; mc < mb; mc += Isa::kMC) {
        const int64_t mce = min64(mb, mc + Isa::kMC);
        for (int64_t k0 = 0; k0 < p.K; k0 += kKC) {
            const int64_t kc = min64(kKC, p.K - k0);
            for (int64_t pn = p0; pn < p1; ++pn) {
                const int64_t n0 = pn * kNR, nc = p.N - n0;
                pack_panel<Isa>(p, n0, k0, kc, wp);
                const typename Isa::ColMask c0 = Isa::col_mask(nc), c1 = Isa::col_mask(nc - W);
                for (int64_t m = mc; m < mce; m += Isa::kMR)
                    micro_any<Isa>(static_cast<int>(min64(Isa::kMR, mce - m)), p.x + m * p.ldx + k0, p.ldx, wp,
                                   kc, p.y + m * p.ldy + n0, p.ldy, c0, c1);
            }
        }
    }
}

template <class Isa>
void run_gemm(const Int8Problem& p) {
    constexpr int64_t kNR = 2 * Isa::kWidth;
    constexpr int64_t kMR = Isa::kMR;
    static_assert(kKC * kNR <= kWorkFloatsPerThread, "packing buffer too small");
    static_assert(Isa::kMC % Isa::kMR == 0, "the M block must be a multiple of the micro-kernel's rows");
    const int64_t panels = (p.N + kNR - 1) / kNR;
    const int64_t nt = p.num_threads;
    // Work items taken dynamically (see gemv_all): groups of output panels when there are
    // enough (each item streams only its own weight rows, and the activation block of a K step
    // is reused across the item's panels), else blocks of rows.
    const bool by_panels = panels >= nt;
    const int64_t row_blocks = (p.M + kMR - 1) / kMR;
    const int64_t per_item = by_panels ? (panels / (4 * nt) > 0 ? panels / (4 * nt) : 1)
                                       : kMR * (row_blocks / (4 * nt) > 0 ? row_blocks / (4 * nt) : 1);
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
            if (by_panels) gemm_range<Isa>(p, a, b, 0, p.M, wp);
            else gemm_range<Isa>(p, 0, panels, a, b, wp);
        }
    }
}

}  // namespace
}  // namespace b2f
