// Helpers shared by the CUDA kernels (jvp_kernels.cu, gram_kernels.cu, linchain_kernels.cu): the accumulate type
// of each storage type, explicit conversions and stores, vector loads from shared memory, a warp sum, and the
// host-side dtype dispatch.  Torch-free: nvcc alone builds it.  tests/test_cuda_emulated.py inlines (and rewrites)
// this file into the kernels that include it (a local "*.cuh" include), so it may use the constructs they do.
#ifndef NTK_KERNELS_CSRC_CUDA_DTYPE_UTILS_CUH_
#define NTK_KERNELS_CSRC_CUDA_DTYPE_UTILS_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

namespace ntk {
namespace cuda_common {

// fp16 / bf16 / fp32 accumulate in fp32, fp64 in fp64.
template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <typename T> using acc_t = typename AccOf<T>::type;

// Explicit conversions: torch builds with __CUDA_NO_HALF_CONVERSIONS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__.
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }

template <typename T> __device__ __forceinline__ T from_acc(acc_t<T> v);
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }

// *p = v rounded to p's type (round to nearest even).
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }

__device__ __forceinline__ float sqrt_acc(float v) { return sqrtf(v); }
__device__ __forceinline__ double sqrt_acc(double v) { return sqrt(v); }

// Four consecutive acc values from 16-byte-aligned shared memory in one (float4) or two (double2) loads.
__device__ __forceinline__ void lds4(const float* p, float (&v)[4]) {
  const float4 t = *reinterpret_cast<const float4*>(p);
  v[0] = t.x, v[1] = t.y, v[2] = t.z, v[3] = t.w;
}
__device__ __forceinline__ void lds4(const double* p, double (&v)[4]) {
  const double2 a = reinterpret_cast<const double2*>(p)[0], b = reinterpret_cast<const double2*>(p)[1];
  v[0] = a.x, v[1] = a.y, v[2] = b.x, v[3] = b.y;
}

// Sum over the 32 lanes of a warp; every lane gets the same bits (a butterfly: lane and lane ^ m add the same
// two values).  The whole warp must call it.
template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int m = 16; m > 0; m /= 2) v += __shfl_sync(0xffffffffu, v, (threadIdx.x % 32) ^ m);
  return v;
}

__host__ __device__ constexpr int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// Host-side dtype dispatch: f(Tag<T>{}) with T the storage type of dtype (a DType enum of a *_kernels.h: kFloat16,
// kBFloat16, kFloat32, kFloat64), f's cudaError_t; cudaErrorInvalidValue for any other value.
template <typename T> struct Tag { using type = T; };

template <typename DType, typename F>
cudaError_t by_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat16: return f(Tag<__half>{});
    case DType::kBFloat16: return f(Tag<__nv_bfloat16>{});
    case DType::kFloat32: return f(Tag<float>{});
    case DType::kFloat64: return f(Tag<double>{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda_common
}  // namespace ntk

#endif  // NTK_KERNELS_CSRC_CUDA_DTYPE_UTILS_CUH_
