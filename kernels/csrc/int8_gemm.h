// int8 weight-only GEMM / GEMV: y = x @ (q * s)^T (+ bias), fp32 accumulation.
//
// Internal interface between the C ABI front end (int8_gemm.cpp) and the per-ISA kernels
// (int8_gemm_{scalar,avx2,avx512}.cpp). Each ISA file is compiled with its own -m flags, so
// this header declares only plain data and functions: no inline code, no templates, nothing a
// generic translation unit could end up sharing with an AVX-512 one (an inline function
// emitted by both would be merged by the linker and could run AVX-512 code on a CPU without it).
// The drivers the SIMD files share are templates in int8_gemm_driver.h, which keeps them in an
// anonymous namespace for the same reason: each ISA file compiles its own private copy.
#pragma once

#include <stdint.h>

namespace b2f {

// The kernels see fp32 activations only: the front end converts bf16/fp16 activations, bias and
// outputs (a pass over M*K and M*N elements, small next to the N*K weight stream).
struct Int8Problem {
    const float* x;       // (M, K), row stride ldx, unit column stride
    int64_t ldx;
    const int8_t* w;      // (N, K) row-major, contiguous
    const float* scale;   // (N,) when group == 0, else (N, K / group) row-major
    int64_t group;        // 0: one scale per output channel; else K % group == 0
    const float* bias;    // (N,) or nullptr
    float* y;             // (M, N), row stride ldy
    int64_t ldy;
    int64_t M, N, K;
    int num_threads;      // > 0
    float* work;          // kWorkFloatsPerThread * num_threads floats, 64-byte aligned (GEMM packing)
};

// Packing buffer each thread of a GEMM kernel may use (fp32 elements): AVX-512 packs
// 256 x 32 and AVX2 256 x 16 weight panels. Allocated by the front end so that the kernels
// cannot fail half way.
constexpr int64_t kWorkFloatsPerThread = 256 * 32;

// GEMV-style kernel: several weight rows at a time, dequantised in registers on the fly and
// reused across up to 4 activation rows; for decode (small M).
void int8_gemv_scalar(const Int8Problem& p);
void int8_gemm_scalar(const Int8Problem& p);
#if defined(B2F_HAVE_AVX2)
void int8_gemv_avx2(const Int8Problem& p);
void int8_gemm_avx2(const Int8Problem& p);
#endif
#if defined(B2F_HAVE_AVX512)
void int8_gemv_avx512(const Int8Problem& p);
void int8_gemm_avx512(const Int8Problem& p);
#endif

}  // namespace b2f
