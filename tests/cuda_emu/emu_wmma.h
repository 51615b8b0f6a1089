// Host emulation of the part of nvcuda::wmma (<mma.h>) and __syncwarp that csrc/cuda uses (jvp_kernels.cu), for
// tests/test_cuda_emulated.py; included at the end of emu.h.  On the host <mma.h> declares nothing (its contents
// need __CUDACC__), so these definitions stand in.
//
// Model: a fragment holds the WHOLE tile in every lane (row-major, logical coordinates), so the unspecified
// distribution of elements over lanes never matters: every lane loads, multiplies and stores the full tile.
// Code that only uses the documented API (load / store / fill / mma, element-wise ops on x[] that treat all
// elements alike) gets the same result as on a GPU.  Every wmma call and __syncwarp is a barrier of the whole
// warp (as the _sync API requires: all lanes must call it, with the same arguments), so a divergent call leaves
// the block stuck and is reported.  Checked: 256-bit (32-byte) alignment of the pointer, ldm a multiple of
// 16 bytes, as the CUDA programming guide requires of load_matrix_sync / store_matrix_sync.
// Not emulated: shapes other than 16 x 16 x 16; the precision of the device's tensor-core products (here exact
// products, accumulated in float in k order).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <string>

inline void __syncwarp(unsigned mask = 0xffffffffu) { (void)::emu::shfl_sync(mask, 0, 0, 32); }

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K> struct Dims;
template <int M, int N, int K> struct Dims<matrix_a, M, N, K> { static constexpr int rows = M, cols = K; };
template <int M, int N, int K> struct Dims<matrix_b, M, N, K> { static constexpr int rows = K, cols = N; };
template <int M, int N, int K> struct Dims<accumulator, M, N, K> { static constexpr int rows = M, cols = N; };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "wmma emulation: only 16 x 16 x 16 fragments");
  static constexpr int rows = Dims<Use, M, N, K>::rows, cols = Dims<Use, M, N, K>::cols;
  static constexpr int num_elements = rows * cols;
  T x[num_elements];  // the whole tile, row-major
};

namespace detail {
inline float to_float(__half v) { return __half2float(v); }
inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
inline float to_float(float v) { return v; }

inline void warp_barrier() { (void)::emu::shfl_sync(0xffffffffu, 0, 0, 32); }

template <typename T>
void check_access(const char* what, const T* p, unsigned ldm) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0)
    ::emu::report(std::string(what) + " in " + ::emu::where() + ": pointer " + ::emu::hex(reinterpret_cast<uintptr_t>(p)) +
                  " is not 256-bit (32-byte) aligned");
  if ((ldm * sizeof(T)) % 16 != 0)
    ::emu::report(std::string(what) + " in " + ::emu::where() + ": ldm " + std::to_string(ldm) +
                  " is not a multiple of 16 bytes");
}
}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const T* p, unsigned ldm) {
  static_assert(!std::is_same<Use, accumulator>::value, "accumulator loads take a layout_t");
  detail::warp_barrier();
  detail::check_access("wmma::load_matrix_sync", p, ldm);
  using F = fragment<Use, M, N, K, T, Layout>;
  constexpr bool row = std::is_same<Layout, row_major>::value;
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c) f.x[r * F::cols + c] = row ? p[r * ldm + c] : p[r + c * ldm];
}

template <int M, int N, int K, typename T>
void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, const T* p, unsigned ldm, layout_t layout) {
  detail::warp_barrier();
  detail::check_access("wmma::load_matrix_sync", p, ldm);
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) f.x[r * N + c] = layout == mem_row_major ? p[r * ldm + c] : p[r + c * ldm];
}

template <int M, int N, int K, typename T>
void store_matrix_sync(T* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm, layout_t layout) {
  detail::warp_barrier();
  detail::check_access("wmma::store_matrix_sync", p, ldm);
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) (layout == mem_row_major ? p[r * ldm + c] : p[r + c * ldm]) = f.x[r * N + c];
}

template <typename Use, int M, int N, int K, typename T, typename Layout, typename V>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, const V& v) {
  detail::warp_barrier();
  for (int e = 0; e < fragment<Use, M, N, K, T, Layout>::num_elements; ++e) f.x[e] = static_cast<T>(v);
}

template <int M, int N, int K, typename TA, typename LA, typename TB, typename LB, typename TC>
void mma_sync(fragment<accumulator, M, N, K, TC>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
              const fragment<matrix_b, M, N, K, TB, LB>& b, const fragment<accumulator, M, N, K, TC>& c) {
  detail::warp_barrier();
  TC out[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float s = detail::to_float(c.x[i * N + j]);
      for (int k = 0; k < K; ++k) s += detail::to_float(a.x[i * K + k]) * detail::to_float(b.x[k * N + j]);
      out[i * N + j] = s;
    }
  for (int e = 0; e < M * N; ++e) d.x[e] = out[e];
}

}  // namespace wmma
}  // namespace nvcuda
