// Stand-ins for the CUDA pieces a torch binding uses, for the host emulation of csrc/cuda (see emu.h and
// tests/test_cuda_emulated.py).  The test rewrites csrc/cuda/*_binding.cpp:
//   #include <c10/cuda/CUDAGuard.h>, <c10/cuda/CUDAStream.h>   ->  #include "emu_stream.h"
//   c10::cuda::CUDAGuard, c10::cuda::getCurrentCUDAStream        ->  emu::CUDAGuard, emu::getCurrentCUDAStream
//   .is_cuda()                                                   ->  .is_cpu()
//   TORCH_LIBRARY(ntk_cuda, ...), TORCH_LIBRARY_FRAGMENT(ntk_cuda, ...), TORCH_LIBRARY_IMPL(ntk_cuda, CUDA, ...)
//        ->  TORCH_LIBRARY(ntk_cuda_emu, ...), TORCH_LIBRARY_FRAGMENT(ntk_cuda_emu, ...),
//            TORCH_LIBRARY_IMPL(ntk_cuda_emu, CPU, ...)
// so the real binding code runs on CPU tensors (a CPU build of torch has no libc10_cuda).  The device guard
// does nothing and the stream is the null stream: emulated launches are synchronous.
// It defines cudaGetErrorString, so that no CUDA library is linked: weak, as every binding includes it.
#pragma once

#include <c10/core/Device.h>
#include <cuda_runtime_api.h>

namespace emu {

struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
  explicit CUDAGuard(c10::DeviceIndex) {}
};

struct CUDAStream {
  cudaStream_t stream() const { return nullptr; }
  operator cudaStream_t() const { return nullptr; }
};

inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }

}  // namespace emu

// The one libcudart function the binding calls (on a launcher's error code).
extern "C" __attribute__((weak)) const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    default: return "CUDA error (emulated; see cudaError_t for the code)";
  }
}
