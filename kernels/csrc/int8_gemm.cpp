// C ABI front end of the int8 weight-only linear op (loaded from Python with ctypes).
//
//   y (M, N) = x (M, K) @ (q (N, K) * scale)^T + bias
//
// This file is compiled for the baseline ISA. It validates arguments, converts bf16 / fp16
// activations, bias and outputs to and from fp32, and picks the ISA kernel at run time with
// __builtin_cpu_supports: AVX-512 (F+BW+VL), AVX2 (+FMA+F16C), or portable scalar code.
// Every entry point returns an error code instead of throwing: exceptions must not cross a C ABI.
#include "int8_gemm.h"

#include <stdint.h>
#include <string.h>

#include <new>
#include <vector>

#if defined(B2F_HAVE_OPENMP)
#include <omp.h>
#endif

#if defined(_WIN32)
#define B2F_API extern "C" __declspec(dllexport)
#else
#define B2F_API extern "C" __attribute__((visibility("default")))
#endif

namespace {

// Bump when a signature below changes: the Python loader refuses a library with another
// version (a stale build in the package directory) and says so.
constexpr int kAbiVersion = 1;

enum Dtype { kF32 = 0, kBF16 = 1, kF16 = 2 };
enum Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };
enum Algo { kAuto = -1, kGemv = 0, kGemm = 1 };
enum Err {
    kOk = 0, kBadDtype = 1, kBadShape = 2, kBadGroup = 3, kBadIsa = 4, kNullPointer = 5,
    kNoMemory = 6, kBadAlgo = 7,
};

// algo = auto: the GEMV kernel up to this many activation rows, the packed GEMM above (the GEMM
// cannot amortise its packing over fewer rows). Which is faster above it depends on the CPU:
// on Zen 4 the GEMV wins up to M = 128 (int8_gemm_avx512.cpp), so the Python dispatcher times
// both per shape instead of relying on this default.
constexpr int64_t kGemvMaxM = 4;

bool isa_supported(int isa) {
    switch (isa) {
        case kScalar:
            return true;
#if defined(B2F_HAVE_AVX2)
        case kAvx2:
            return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                   __builtin_cpu_supports("f16c");
#endif
#if defined(B2F_HAVE_AVX512)
        case kAvx512:
            return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                   __builtin_cpu_supports("avx512vl");
#endif
        default:
            return false;
    }
}

int best_isa() {
    if (isa_supported(kAvx512)) return kAvx512;
    if (isa_supported(kAvx2)) return kAvx2;
    return kScalar;
}

float bf16_to_f32(uint16_t h) {
    uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    return static_cast<uint16_t>(u >> 16);
}

float f16_to_f32(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1fu;
    const uint32_t man = h & 0x3ffu;
    uint32_t u;
    if (exp == 0) {  // zero or subnormal: man * 2^-24 is exact in fp32
        float v = static_cast<float>(man) * (1.0f / 16777216.0f);
        memcpy(&u, &v, 4);
        u |= sign;
    } else if (exp == 31) {
        u = sign | 0x7f800000u | (man << 13);
    } else {
        u = sign | ((exp + 112u) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

uint16_t f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
    const uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return sign | 0x7e00u;   // NaN
    if (ax >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 rounds to infinity
    if (ax < 0x38800000u) {
        // Below 2^-14: a half subnormal, a multiple of 2^-24. Scaling by 2^24 is exact; adding
        // and removing 2^23 rounds to the nearest integer, ties to even (default FP rounding;
        // this file must not be built with -ffast-math, which would fold the two operations).
        float v;
        memcpy(&v, &ax, 4);
        volatile float h = v * 16777216.0f + 8388608.0f;
        return sign | static_cast<uint16_t>(h - 8388608.0f);
    }
    uint32_t r = ax - 0x38000000u;  // rebias the exponent from 127 to 15
    r += 0xfffu + ((r >> 13) & 1u);  // round the mantissa from 23 to 10 bits, ties to even
    return sign | static_cast<uint16_t>(r >> 13);
}

// Conversions run over M*K or M*N elements; parallel only when large enough to repay the
// fork (a decode step converts a few thousand elements).
constexpr int64_t kParallelConvert = 1 << 16;

void to_f32(const void* src, int dtype, int64_t rows, int64_t cols, int64_t ld, float* dst,
            int nt) {
    const int64_t n = rows * cols;
    (void)nt;
#if defined(B2F_HAVE_OPENMP)
#pragma omp parallel for num_threads(nt) schedule(static) if (n >= kParallelConvert)
#endif
    for (int64_t r = 0; r < rows; ++r) {
        float* d = dst + r * cols;
        if (dtype == kBF16) {
            const uint16_t* s = static_cast<const uint16_t*>(src) + r * ld;
            for (int64_t c = 0; c < cols; ++c) d[c] = bf16_to_f32(s[c]);
        } else if (dtype == kF16) {
            const uint16_t* s = static_cast<const uint16_t*>(src) + r * ld;
            for (int64_t c = 0; c < cols; ++c) d[c] = f16_to_f32(s[c]);
        } else {
            const float* s = static_cast<const float*>(src) + r * ld;
            memcpy(d, s, static_cast<size_t>(cols) * sizeof(float));
        }
    }
    (void)n;
}

void from_f32(const float* src, int64_t rows, int64_t cols, void* dst, int dtype, int64_t ld,
              int nt) {
    const int64_t n = rows * cols;
    (void)nt;
#if defined(B2F_HAVE_OPENMP)
#pragma omp parallel for num_threads(nt) schedule(static) if (n >= kParallelConvert)
#endif
    for (int64_t r = 0; r < rows; ++r) {
        const float* s = src + r * cols;
        uint16_t* d = static_cast<uint16_t*>(dst) + r * ld;
        if (dtype == kBF16) {
            for (int64_t c = 0; c < cols; ++c) d[c] = f32_to_bf16(s[c]);
        } else {
            for (int64_t c = 0; c < cols; ++c) d[c] = f32_to_f16(s[c]);
        }
    }
    (void)n;
}

typedef void (*Kernel)(const b2f::Int8Problem&);

Kernel pick_kernel(int isa, bool gemv, int64_t group) {
    // The SIMD kernels step through K 16 (AVX-512) or 8 (AVX2) elements at a time inside a
    // group; any other group size is served, correctly but slowly, by the scalar code. The
    // Python dispatcher refuses the native backend for such group sizes before getting here.
    const bool simd_group_ok = group == 0 || group % 16 == 0;
    (void)simd_group_ok;
#if defined(B2F_HAVE_AVX512)
    if (isa == kAvx512 && simd_group_ok) return gemv ? b2f::int8_gemv_avx512 : b2f::int8_gemm_avx512;
#endif
#if defined(B2F_HAVE_AVX2)
    if (isa == kAvx2 && simd_group_ok) return gemv ? b2f::int8_gemv_avx2 : b2f::int8_gemm_avx2;
#endif
    (void)isa;
    return gemv ? b2f::int8_gemv_scalar : b2f::int8_gemm_scalar;
}

int max_threads() {
#if defined(B2F_HAVE_OPENMP)
    return omp_get_max_threads();
#else
    return 1;
#endif
}

}  // namespace

B2F_API int b2f_abi_version(void) { return kAbiVersion; }

B2F_API int b2f_isa_supported(int isa) { return isa_supported(isa) ? 1 : 0; }

B2F_API int b2f_best_isa(void) { return best_isa(); }

B2F_API const char* b2f_isa_name(int isa) {
    switch (isa) {
        case kScalar: return "scalar";
        case kAvx2: return "avx2";
        case kAvx512: return "avx512";
        default: return "unknown";
    }
}

B2F_API int b2f_has_openmp(void) {
#if defined(B2F_HAVE_OPENMP)
    return 1;
#else
    return 0;
#endif
}

B2F_API int b2f_max_threads(void) { return max_threads(); }

B2F_API int64_t b2f_gemv_max_m(void) { return kGemvMaxM; }

B2F_API const char* b2f_strerror(int code) {
    switch (code) {
        case kOk: return "ok";
        case kBadDtype: return "unsupported dtype code (0 = float32, 1 = bfloat16, 2 = float16)";
        case kBadShape: return "bad shape: M, N, K must be > 0, ldx >= K and ldy >= N";
        case kBadGroup: return "bad group size: must be 0 (per channel) or a positive divisor of K";
        case kBadIsa: return "requested ISA is not compiled in or not supported by this CPU";
        case kNullPointer: return "null pointer for x, w, scale or y";
        case kNoMemory: return "out of memory for the fp32 staging buffers";
        case kBadAlgo: return "algo must be -1 (auto), 0 (gemv) or 1 (gemm)";
        default: return "unknown error code";
    }
}

// x: (M, K) with row stride ldx in x_dtype; w: (N, K) int8 contiguous; scale: fp32 (N,) or
// (N, K / group); bias: (N,) in bias_dtype or null; y: (M, N) with row stride ldy in y_dtype.
// num_threads <= 0: the OpenMP default. isa < 0: the best the CPU supports. algo < 0: by M.
B2F_API int b2f_int8_linear(const void* x, int x_dtype, int64_t ldx, const int8_t* w,
                            const float* scale, int64_t group, const void* bias, int bias_dtype,
                            void* y, int y_dtype, int64_t ldy, int64_t M, int64_t N, int64_t K,
                            int num_threads, int isa, int algo) {
    if (!x || !w || !scale || !y) return kNullPointer;
    for (int d : {x_dtype, y_dtype, bias ? bias_dtype : 0})
        if (d != kF32 && d != kBF16 && d != kF16) return kBadDtype;
    if (M <= 0 || N <= 0 || K <= 0 || ldx < K || ldy < N) return kBadShape;
    if (group < 0 || (group > 0 && K % group != 0)) return kBadGroup;
    if (algo < kAuto || algo > kGemm) return kBadAlgo;
    if (isa < 0) isa = best_isa();
    if (!isa_supported(isa)) return kBadIsa;
    const int nt = num_threads > 0 ? num_threads : max_threads();
    const bool gemv = algo == kGemv || (algo == kAuto && M <= kGemvMaxM);
    try {
        std::vector<float> xbuf, ybuf, bbuf;
        const float* xf = static_cast<const float*>(x);
        int64_t ldxf = ldx;
        if (x_dtype != kF32) {
            xbuf.resize(static_cast<size_t>(M * K));
            to_f32(x, x_dtype, M, K, ldx, xbuf.data(), nt);
            xf = xbuf.data();
            ldxf = K;
        }
        const float* bf = static_cast<const float*>(bias);
        if (bias && bias_dtype != kF32) {
            bbuf.resize(static_cast<size_t>(N));
            to_f32(bias, bias_dtype, 1, N, N, bbuf.data(), 1);
            bf = bbuf.data();
        }
        float* yf = static_cast<float*>(y);
        int64_t ldyf = ldy;
        if (y_dtype != kF32) {
            ybuf.resize(static_cast<size_t>(M * N));
            yf = ybuf.data();
            ldyf = N;
        }
        // Packing buffers for the GEMM kernels, over-allocated by 64 bytes to align by hand
        // (std::vector only guarantees 16-byte alignment; aligned loads need 64).
        std::vector<float> work;
        float* wk = nullptr;
        if (!gemv) {
            work.resize(static_cast<size_t>(b2f::kWorkFloatsPerThread * nt + 16));
            const uintptr_t a = reinterpret_cast<uintptr_t>(work.data());
            wk = reinterpret_cast<float*>((a + 63) & ~static_cast<uintptr_t>(63));
        }
        b2f::Int8Problem p{xf, ldxf, w, scale, group, bf, yf, ldyf, M, N, K, nt, wk};
        pick_kernel(isa, gemv, group)(p);
        if (y_dtype != kF32) from_f32(yf, M, N, y, y_dtype, ldy, nt);
    } catch (const std::bad_alloc&) {
        return kNoMemory;
    }
    return kOk;
}
