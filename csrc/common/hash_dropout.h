// Counter-based dropout mask shared bit-for-bit by every backend (see ntk_kernels/ops/_hash_dropout.py).
//   keep(seed, i, c) = H(seed, i, c) >= T(p),  T(p) = min(floor(p * 2^32), 2^32 - 1)
//   H = fmix32( fmix32( seed ^ (i * 0x9E3779B1) ) ^ (c * 0x85EBCA77) )     (uint32 arithmetic)
// Torch-free, so the CUDA launchers (compiled by nvcc without torch headers) include it too.
#pragma once
#include <stdint.h>

#if defined(__CUDACC__)
#define NTK_HD __host__ __device__ __forceinline__
#else
#define NTK_HD inline
#endif

namespace ntk {

NTK_HD uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

NTK_HD uint32_t dropout_row_hash(uint32_t seed, uint32_t row) { return fmix32(seed ^ (row * 0x9E3779B1u)); }

NTK_HD uint32_t dropout_hash(uint32_t row_hash, uint32_t col) { return fmix32(row_hash ^ (col * 0x85EBCA77u)); }

// The uint32 threshold: entries whose hash is below it are dropped.
NTK_HD uint32_t dropout_threshold(double p) {
  double t = p * 4294967296.0;
  return t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
}

}  // namespace ntk
