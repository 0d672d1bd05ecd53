// Portable int8 weight-only GEMV / GEMM (no intrinsics): the fallback on CPUs without AVX2 and
// on other architectures, and the reference the SIMD kernels are tested against.
//
// Eight independent partial sums per dot product let the compiler vectorise the reduction
// with the baseline ISA (SSE2 on x86-64, NEON on aarch64) without -ffast-math, which we avoid
// because it would change rounding from build to build.
#include <stddef.h>
#include <stdint.h>

#include <vector>

#include "int8_gemm.h"

namespace b2f {
namespace {

constexpr int kLanes = 8;

float dot_q(const float* x, const int8_t* q, int64_t len) {
    float acc[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t k = 0;
    for (; k + kLanes <= len; k += kLanes)
        for (int j = 0; j < kLanes; ++j) acc[j] += x[k + j] * static_cast<float>(q[k + j]);
    float s = 0.0f;
    for (; k < len; ++k) s += x[k] * static_cast<float>(q[k]);
    for (int j = 0; j < kLanes; ++j) s += acc[j];
    return s;
}

float dot_f(const float* x, const float* w, int64_t len) {
    float acc[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t k = 0;
    for (; k + kLanes <= len; k += kLanes)
        for (int j = 0; j < kLanes; ++j) acc[j] += x[k + j] * w[k + j];
    float s = 0.0f;
    for (; k < len; ++k) s += x[k] * w[k];
    for (int j = 0; j < kLanes; ++j) s += acc[j];
    return s;
}

}  // namespace

// One weight row at a time, kept in L1 while every activation row uses it; per-channel scales
// are applied once to the finished dot product, group scales once per group.
void int8_gemv_scalar(const Int8Problem& p) {
    const int64_t groups = p.group ? p.K / p.group : 1;
#if defined(B2F_HAVE_OPENMP)
#pragma omp parallel for num_threads(p.num_threads) schedule(dynamic, 16)
#endif
    for (int64_t n = 0; n < p.N; ++n) {
        const int8_t* q = p.w + n * p.K;
        const float* s = p.scale + n * groups;
        const float b = p.bias ? p.bias[n] : 0.0f;
        for (int64_t m = 0; m < p.M; ++m) {
            const float* x = p.x + m * p.ldx;
            float acc;
            if (p.group == 0) {
                acc = dot_q(x, q, p.K) * s[0];
            } else {
                acc = 0.0f;
                for (int64_t g = 0; g < groups; ++g)
                    acc += dot_q(x + g * p.group, q + g * p.group, p.group) * s[g];
            }
            p.y[m * p.ldy + n] = acc + b;
        }
    }
}

// Dequantise one weight row to fp32 once, then reuse it for every activation row.
void int8_gemm_scalar(const Int8Problem& p) {
    const int64_t groups = p.group ? p.K / p.group : 1;
    const int64_t gsize = p.group ? p.group : p.K;
#if defined(B2F_HAVE_OPENMP)
#pragma omp parallel num_threads(p.num_threads)
#endif
    {
        std::vector<float> row(static_cast<size_t>(p.K));
#if defined(B2F_HAVE_OPENMP)
#pragma omp for schedule(dynamic, 16)
#endif
        for (int64_t n = 0; n < p.N; ++n) {
            const int8_t* q = p.w + n * p.K;
            for (int64_t g = 0; g < groups; ++g) {
                const float s = p.scale[n * groups + g];
                for (int64_t k = g * gsize; k < (g + 1) * gsize; ++k)
                    row[k] = static_cast<float>(q[k]) * s;
            }
            const float b = p.bias ? p.bias[n] : 0.0f;
            for (int64_t m = 0; m < p.M; ++m)
                p.y[m * p.ldy + n] = dot_f(p.x + m * p.ldx, row.data(), p.K) + b;
        }
    }
}

}  // namespace b2f
