// CUDA build of the int8 weight-only linear op: y (M, N) = x (M, K) @ (q (N, K) * scale)^T + bias.
//
// The fallback on CUDA when Triton is not importable (kernels/int8_matmul.py prefers its Triton
// kernels). Built only when CMake finds a CUDA compiler; loaded with ctypes like the CPU library.
//
// Algorithm: one warp per output channel n and up to kMT activation rows. Lanes stride over K
// four weights at a time (one 32-bit load per lane: 128 contiguous bytes per warp, coalesced),
// dequantise in registers (per-channel scale applied to the finished sum, group scale per
// weight), accumulate in fp32 and reduce with warp shuffles. Weights are read once per kMT
// rows, so it is a bandwidth-bound decode kernel; it makes no use of tensor cores, which is
// why the Triton GEMM serves prefill when available.
// Limits: x, bias and y share one dtype (float32, bfloat16 or float16); scale is float32.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#define B2F_API extern "C" __attribute__((visibility("default")))

namespace {

constexpr int kWarps = 8;  // output channels per block
constexpr int kMT = 4;     // activation rows per warp

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half(v); }

template <typename T, bool VEC4>
__global__ void int8_linear_warp_kernel(const T* __restrict__ x, int64_t ldx, const int8_t* __restrict__ w,
                                        const float* __restrict__ scale, int64_t group,
                                        const T* __restrict__ bias, T* __restrict__ y, int64_t ldy,
                                        int64_t M, int64_t N, int64_t K) {
    const int lane = threadIdx.x & 31;
    const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
    const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kMT;
    if (n >= N) return;
    const int8_t* q = w + n * K;
    const int64_t groups = group ? K / group : 1;
    float acc[kMT];
#pragma unroll
    for (int i = 0; i < kMT; ++i) acc[i] = 0.0f;

    if (VEC4) {  // K % 4 == 0 and 4-byte aligned rows
        for (int64_t k = 4 * lane; k < K; k += 128) {
            const char4 v = *reinterpret_cast<const char4*>(q + k);
            const float s = group ? scale[n * groups + k / group] : 1.0f;  // group % 4 == 0
            const float w0 = v.x * s, w1 = v.y * s, w2 = v.z * s, w3 = v.w * s;
#pragma unroll
            for (int i = 0; i < kMT; ++i) {
                if (m0 + i < M) {
                    const T* xr = x + (m0 + i) * ldx + k;
                    acc[i] += to_f(xr[0]) * w0 + to_f(xr[1]) * w1 + to_f(xr[2]) * w2 + to_f(xr[3]) * w3;
                }
            }
        }
    } else {
        for (int64_t k = lane; k < K; k += 32) {
            const float wk = static_cast<float>(q[k]) * (group ? scale[n * groups + k / group] : 1.0f);
#pragma unroll
            for (int i = 0; i < kMT; ++i)
                if (m0 + i < M) acc[i] += to_f(x[(m0 + i) * ldx + k]) * wk;
        }
    }
#pragma unroll
    for (int i = 0; i < kMT; ++i)
        for (int off = 16; off > 0; off >>= 1) acc[i] += __shfl_xor_sync(0xffffffffu, acc[i], off);
    if (lane == 0) {
        const float s = group ? 1.0f : scale[n];
        const float b = bias ? to_f(bias[n]) : 0.0f;
#pragma unroll
        for (int i = 0; i < kMT; ++i)
            if (m0 + i < M) y[(m0 + i) * ldy + n] = from_f<T>(acc[i] * s + b);
    }
}

template <typename T>
cudaError_t launch(const void* x, int64_t ldx, const int8_t* w, const float* scale, int64_t group,
                   const void* bias, void* y, int64_t ldy, int64_t M, int64_t N, int64_t K,
                   cudaStream_t stream) {
    const dim3 grid(static_cast<unsigned>((N + kWarps - 1) / kWarps), static_cast<unsigned>((M + kMT - 1) / kMT));
    const dim3 block(kWarps * 32);
    const bool vec4 = K % 4 == 0 && (group == 0 || group % 4 == 0) && reinterpret_cast<uintptr_t>(w) % 4 == 0;
    const T* xt = static_cast<const T*>(x);
    const T* bt = static_cast<const T*>(bias);
    T* yt = static_cast<T*>(y);
    if (vec4)
        int8_linear_warp_kernel<T, true><<<grid, block, 0, stream>>>(xt, ldx, w, scale, group, bt, yt, ldy, M, N, K);
    else
        int8_linear_warp_kernel<T, false><<<grid, block, 0, stream>>>(xt, ldx, w, scale, group, bt, yt, ldy, M, N, K);
    return cudaGetLastError();
}

}  // namespace

B2F_API int b2f_cuda_abi_version(void) { return 1; }

// dtype: 0 float32, 1 bfloat16, 2 float16 (x, bias and y). Returns 0, -1 for bad arguments,
// or a cudaError_t value; b2f_cuda_strerror names it.
B2F_API int b2f_cuda_int8_linear(const void* x, int dtype, int64_t ldx, const int8_t* w,
                                 const float* scale, int64_t group, const void* bias, void* y,
                                 int64_t ldy, int64_t M, int64_t N, int64_t K, int device,
                                 void* stream) {
    if (!x || !w || !scale || !y || M <= 0 || N <= 0 || K <= 0 || ldx < K || ldy < N) return -1;
    if (group < 0 || (group > 0 && K % group != 0)) return -1;
    if (M > static_cast<int64_t>(65535) * kMT) return -1;  // grid.y limit
    cudaError_t err = cudaSetDevice(device);
    if (err != cudaSuccess) return static_cast<int>(err);
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    switch (dtype) {
        case 0: err = launch<float>(x, ldx, w, scale, group, bias, y, ldy, M, N, K, s); break;
        case 1: err = launch<__nv_bfloat16>(x, ldx, w, scale, group, bias, y, ldy, M, N, K, s); break;
        case 2: err = launch<__half>(x, ldx, w, scale, group, bias, y, ldy, M, N, K, s); break;
        default: return -1;
    }
    return static_cast<int>(err);
}

B2F_API const char* b2f_cuda_strerror(int code) {
    if (code == -1) return "bad arguments (null pointer, shape, group size or dtype code)";
    return cudaGetErrorString(static_cast<cudaError_t>(code));
}
