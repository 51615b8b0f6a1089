// Host emulation of the CUDA subset used by csrc/cuda/*.cu (linchain, gram, jvp), so that the real kernels can run on
// a machine with no GPU (tests/test_cuda_emulated.py).  That test rewrites the real source mechanically:
//   kernel<<<grid, block, smem, stream>>>(args)   ->  ::emu::launch("kernel", grid, block, smem, stream, kernel, args)
//   __shared__ __align__(n) T name[d1][d2];       ->  EMU_SHARED(name, n, [d1][d2], T);
// and prepends #include "emu.h" (plus a #line directive, so diagnostics name the real file and line).
// Everything else (indexing, arithmetic, fp16/bf16 conversions, the dropout hash) is the real code, compiled
// for the host by the host compiler.
//
// Execution model
//   * A launch runs its blocks one after another (blockIdx.x fastest).  The threads of a block are fibers
//     (ucontext) on the calling OS thread, run by a deterministic scheduler: a thread runs until it reaches a
//     barrier (__syncthreads, __shfl_sync) or returns, then the next runnable thread runs.  Threads go in
//     index order on even blocks and in reverse index order on odd blocks (counted over all launches), so a
//     missing barrier is a wrong result every time (a thread reads a shared tile before the others wrote it,
//     or after they overwrote it) rather than a rare race.
//   * __shared__ arrays live in one static arena per array and kernel instantiation, and are filled with 0xFF
//     bytes (NaN as float / double, -1 as integers) before every block: a read of shared memory that the block
//     did not write first gives NaN instead of a stale or zero value.  The arrays of one kernel must fit the
//     48 KB of static shared memory a CUDA block may declare.
//   * __syncthreads() must be reached by every thread of the block, at the same source line: a thread that
//     returned while others wait at a barrier, or threads waiting at different barriers, are reported
//     (divergent barrier; undefined behaviour in CUDA).  So is any block where no thread can make progress.
//   * __shfl_sync(mask, v, src[, width]) waits for every lane of the warp and returns lane src's value (mod
//     width).  Assumption: the whole warp calls it together with the full mask (0xffffffff for a full warp),
//     as these kernels do; partial masks and lanes of one warp at different barriers are reported.
//   * The test compiles with -fsanitize=alignment,bounds and this file supplies the handlers: indexing a
//     __shared__ (or any fixed-size) array out of its bounds, or a misaligned vector access (float4, double2
//     through reinterpret_cast), inside a kernel is reported with the real file and line.
//   * A bad launch configuration (0 or > 1024 threads, grid.x >= 2^31, grid.y / grid.z > 65535, an empty grid)
//     is not run and makes cudaGetLastError() return cudaErrorInvalidConfiguration, as on a GPU.  Any problem
//     of the kernel found by the emulation throws std::runtime_error from the launch, which the torch binding
//     turns into a Python RuntimeError naming the kernel, the block and the thread.
//   * Streams are ignored (every launch is synchronous).  __half / __nv_bfloat16 are the CUDA toolkit's
//     host-side types, so the toolkit's headers are needed (no CUDA library and no GPU).
// Not emulated (a GPU run, compute-sanitizer, is needed for these): out-of-bounds accesses to global memory
// (plain pointers carry no bounds); races between blocks (blocks run one after another, so two blocks writing
// one location, or a block reading what another writes, are not flagged); orderings other than the two
// schedules above; warp lockstep (lanes run one at a time, so code relying on implicit warp synchrony fails
// here; __syncwarp and nvcuda::wmma are emulated in emu_wmma.h, votes and the other warp intrinsics are not
// provided); memory fences and atomics; dynamic
// shared memory (smem != 0 is rejected); device floating point (FMA contraction, --use_fast_math, the device's
// fp16 / bf16 intrinsics); register, occupancy and time limits.
#pragma once

#include <cuda_runtime_api.h>  // cudaError_t, cudaStream_t, dim3, uint3 (host declarations only)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// CUDA's keywords, as the host compiler should read them.  (The toolkit's headers define some of them as empty
// annotations for host compilers; __shared__ must not be one: the rewrite turns declarations into EMU_SHARED.)
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#undef __align__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ EMU_shared_declaration_not_rewritten_by_the_test  // a compile error, by design

inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;
constexpr int warpSize = 32;

namespace emu {

constexpr std::size_t kStaticSharedLimit = 48 * 1024;  // static __shared__ bytes one block may declare
constexpr std::size_t kSharedRedZone = 4096;           // after each array: absorbs a reported overrun
constexpr std::size_t kStackBytes = 256 * 1024;        // per CUDA thread, plus one guard page

enum class State : unsigned char { kReady, kAtSync, kAtShfl, kDone };

struct Thread {
  ucontext_t ctx;
  State state = State::kReady;
  int sync_line = 0;                  // the __syncthreads it waits at
  uint64_t shfl_value = 0, shfl_result = 0;
  unsigned shfl_mask = 0;
  int shfl_src = 0, shfl_width = 32;
};

struct Arena {
  void* data;
  std::size_t declared, padded;  // sizeof the array; allocated bytes (rounded up, plus the red zone)
};

// The state of the launch in progress (one at a time, under g_mutex).
inline std::mutex g_mutex;
inline ucontext_t g_scheduler;
inline std::vector<Thread> g_threads;
inline char* g_stacks = nullptr;
inline std::size_t g_stack_count = 0;
inline const std::size_t g_page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
inline unsigned g_current = 0;       // linear index of the running thread
inline void (*g_body)(void*) = nullptr;
inline void* g_body_arg = nullptr;
inline bool g_in_kernel = false;
inline std::string g_error;           // first problem found in this block
inline const void* g_kernel = nullptr;  // the kernel being launched (key of its shared arrays)
inline std::map<const void*, std::vector<Arena>> g_shared;
inline uint64_t g_blocks_run = 0;
inline cudaError_t g_last_error = cudaSuccess;

inline std::string where() {
  const unsigned t = g_current;
  return "block (" + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + "," +
         std::to_string(blockIdx.z) + ") thread " + std::to_string(t) + " (warp " + std::to_string(t / 32) +
         ", lane " + std::to_string(t % 32) + ")";
}

inline void report(const std::string& what) {
  if (g_error.empty()) g_error = what;
}

inline cudaError_t get_last_error() {
  const cudaError_t e = g_last_error;
  g_last_error = cudaSuccess;
  return e;
}

// Suspends the running thread and resumes the scheduler.
inline void yield_to_scheduler() { swapcontext(&g_threads[g_current].ctx, &g_scheduler); }

inline void syncthreads(int line) {
  Thread& t = g_threads[g_current];
  t.state = State::kAtSync;
  t.sync_line = line;
  yield_to_scheduler();
}

template <typename T>
T shfl_sync(unsigned mask, T value, int src, int width) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable<T>::value,
                "__shfl_sync emulation: T must be a trivially copyable type of at most 8 bytes");
  Thread& t = g_threads[g_current];
  t.state = State::kAtShfl;
  t.shfl_value = 0;
  std::memcpy(&t.shfl_value, &value, sizeof(T));
  t.shfl_mask = mask;
  t.shfl_src = src;
  t.shfl_width = width;
  yield_to_scheduler();
  T out;
  std::memcpy(&out, &g_threads[g_current].shfl_result, sizeof(T));
  return out;
}

// The static arena behind one __shared__ array of the kernel being launched (see EMU_SHARED).
template <typename T, std::size_t Align>
T& shared_array() {
  static_assert(Align <= 64 && (Align & (Align - 1)) == 0, "__align__ above 64 is not emulated");
  const std::size_t bytes = sizeof(T), padded = (bytes + 63) / 64 * 64 + kSharedRedZone;
  void* p = std::aligned_alloc(64, padded);
  if (p == nullptr) throw std::bad_alloc();
  std::memset(p, 0xFF, padded);
  g_shared[g_kernel].push_back({p, bytes, padded});
  return *static_cast<T*>(p);
}

inline void poison_shared() {
  for (const Arena& a : g_shared[g_kernel]) std::memset(a.data, 0xFF, a.padded);
}

inline void check_shared_size() {
  std::size_t total = 0;
  for (const Arena& a : g_shared[g_kernel]) total += a.declared;
  if (total > kStaticSharedLimit)
    report("the kernel declares " + std::to_string(total) + " bytes of static __shared__ memory (a block may "
           "declare " + std::to_string(kStaticSharedLimit) + ")");
}

inline void thread_main() {
  try {
    g_body(g_body_arg);
  } catch (const std::exception& e) {
    report(std::string("exception in ") + where() + ": " + e.what());
  } catch (...) {
    report("unknown exception in " + where());
  }
  g_threads[g_current].state = State::kDone;
  // returning resumes uc_link, the scheduler
}

inline void reserve_stacks(std::size_t n) {
  if (n <= g_stack_count) return;
  const std::size_t page = g_page, each = kStackBytes + page;
  void* p = mmap(nullptr, n * each, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
  for (std::size_t i = 0; i < n; ++i) mprotect(static_cast<char*>(p) + i * each, page, PROT_NONE);  // guard
  if (g_stacks != nullptr) munmap(g_stacks, g_stack_count * each);
  g_stacks = static_cast<char*>(p);
  g_stack_count = n;
}

inline std::string describe_stuck(unsigned nt) {
  unsigned ready = 0, sync = 0, shfl = 0, done = 0;
  std::map<int, unsigned> lines;
  for (unsigned i = 0; i < nt; ++i) {
    switch (g_threads[i].state) {
      case State::kReady: ++ready; break;
      case State::kAtSync: ++sync; ++lines[g_threads[i].sync_line]; break;
      case State::kAtShfl: ++shfl; break;
      case State::kDone: ++done; break;
    }
  }
  std::string s = std::to_string(sync) + " threads wait at __syncthreads";
  if (!lines.empty()) {
    s += " (line";
    for (const auto& [line, n] : lines) s += " " + std::to_string(line) + ": " + std::to_string(n);
    s += ")";
  }
  return s + ", " + std::to_string(shfl) + " at __shfl_sync, " + std::to_string(done) + " have returned";
}

// Completes a warp's __shfl_sync once all its lanes have arrived.
inline void try_release_warp(unsigned warp, unsigned nt) {
  const unsigned first = warp * 32, last = first + 32 < nt ? first + 32 : nt;
  for (unsigned i = first; i < last; ++i)
    if (g_threads[i].state != State::kAtShfl) return;
  const unsigned n = last - first;
  const unsigned full = n == 32 ? 0xFFFFFFFFu : ((1u << n) - 1u);
  for (unsigned i = first; i < last; ++i) {
    const Thread& t = g_threads[i];
    const int w = t.shfl_width;
    if (t.shfl_mask != full || w <= 0 || w > 32 || (w & (w - 1)) != 0) {
      g_current = i;
      report("__shfl_sync in " + where() + " with mask " + std::to_string(t.shfl_mask) + " and width " +
             std::to_string(w) + ": the emulation supports only whole-warp shuffles (full mask, width a power "
             "of two <= 32)");
      return;
    }
  }
  for (unsigned i = first; i < last; ++i) {
    Thread& t = g_threads[i];
    const unsigned lane = i - first, w = static_cast<unsigned>(t.shfl_width);
    const unsigned src = (lane / w) * w + static_cast<unsigned>(t.shfl_src) % w;
    t.shfl_result = src < n ? g_threads[first + src].shfl_value : t.shfl_value;
  }
  for (unsigned i = first; i < last; ++i) g_threads[i].state = State::kReady;
}

// Runs one block to completion (or to the first problem, left in g_error).
inline void run_block(unsigned nt, bool reverse) {
  for (unsigned i = 0; i < nt; ++i) {
    Thread& t = g_threads[i];
    t = Thread{};
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = g_stacks + i * (kStackBytes + g_page) + g_page;  // above the guard page
    t.ctx.uc_stack.ss_size = kStackBytes;
    t.ctx.uc_link = &g_scheduler;
    makecontext(&t.ctx, &thread_main, 0);
  }
  auto at = [&](unsigned pos) { return reverse ? nt - 1 - pos : pos; };
  unsigned pos = 0, at_sync = 0, done = 0;
  while (done < nt) {
    unsigned k = 0;
    bool found = false;
    for (unsigned s = 0; s < nt && !found; ++s) {
      k = (pos + s) % nt;
      found = g_threads[at(k)].state == State::kReady;
    }
    if (!found) {
      report("no thread of block (" + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + "," +
             std::to_string(blockIdx.z) + ") can proceed: " + describe_stuck(nt) +
             " (a barrier not reached by every thread: divergent __syncthreads / __shfl_sync)");
      return;
    }
    const unsigned i = at(k);
    g_current = i;
    threadIdx = uint3{i % blockDim.x, (i / blockDim.x) % blockDim.y, i / (blockDim.x * blockDim.y)};
    g_in_kernel = true;
    swapcontext(&g_scheduler, &g_threads[i].ctx);
    g_in_kernel = false;
    if (!g_error.empty()) return;
    pos = (k + 1) % nt;
    switch (g_threads[i].state) {
      case State::kDone: ++done; break;
      case State::kAtShfl: try_release_warp(i / 32, nt); break;
      case State::kAtSync:
        if (++at_sync == nt) {  // everyone arrived: release the block, starting again from the first thread
          const int line = g_threads[0].sync_line;
          for (unsigned j = 0; j < nt; ++j) {
            if (g_threads[j].sync_line != line) {
              g_current = j;
              report("divergent __syncthreads: " + where() + " waits at line " +
                     std::to_string(g_threads[j].sync_line) + ", thread 0 at line " + std::to_string(line));
              return;
            }
            g_threads[j].state = State::kReady;
          }
          at_sync = 0;
          pos = 0;
        }
        break;
      case State::kReady: break;
    }
    if (!g_error.empty()) return;
  }
}

// kernel<<<grid, block, smem, stream>>>(args...): converts the arguments to the kernel's parameter types (as a
// launch does), then runs every block.
template <typename... P, typename... Args>
void launch(const char* name, dim3 grid, dim3 block, std::size_t smem, cudaStream_t /*stream*/,
            void (*kernel)(P...), Args&&... args) {
  static_assert(sizeof...(P) == sizeof...(Args), "kernel launched with the wrong number of arguments");
  std::lock_guard<std::mutex> lock(g_mutex);
  const uint64_t nt = uint64_t(block.x) * block.y * block.z;
  if (nt == 0 || nt > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.x > 2147483647u || grid.y > 65535u || grid.z > 65535u) {
    g_last_error = cudaErrorInvalidConfiguration;
    return;
  }
  if (smem != 0) throw std::runtime_error(std::string("emulated launch of ") + name + ": dynamic shared memory "
                                          "(smem != 0) is not emulated");
  std::tuple<P...> params(static_cast<P>(std::forward<Args>(args))...);
  auto body = [](void* arg) {
    auto* a = static_cast<std::pair<void (*)(P...), std::tuple<P...>*>*>(arg);
    std::apply(a->first, *a->second);
  };
  std::pair<void (*)(P...), std::tuple<P...>*> arg{kernel, &params};
  g_body = body;
  g_body_arg = &arg;
  g_kernel = reinterpret_cast<const void*>(kernel);
  gridDim = grid;
  blockDim = block;
  if (g_threads.size() < nt) g_threads.resize(nt);
  reserve_stacks(nt);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = uint3{x, y, z};
        poison_shared();
        run_block(static_cast<unsigned>(nt), (g_blocks_run++ & 1) != 0);
        check_shared_size();
        if (!g_error.empty()) {
          std::string e = std::string("emulated CUDA kernel ") + name + " <<<(" + std::to_string(grid.x) + "," +
                          std::to_string(grid.y) + "," + std::to_string(grid.z) + "), (" + std::to_string(block.x) +
                          "," + std::to_string(block.y) + "," + std::to_string(block.z) + ")>>>: " + g_error;
          g_error.clear();
          throw std::runtime_error(e);
        }
      }
}

// UndefinedBehaviorSanitizer's handlers for -fsanitize=alignment,bounds (no sanitizer runtime is linked).  The
// data blocks start with the source location; the type descriptor holds the type's name, quoted, after 4 bytes.
struct UbsanLocation {
  const char* file;
  uint32_t line, column;
};
struct UbsanTypeMismatch {
  UbsanLocation loc;
  const char* type;  // TypeDescriptor*
  unsigned char log_alignment, kind;
};
struct UbsanOutOfBounds {
  UbsanLocation loc;
  const char* array_type;  // TypeDescriptor*
  const char* index_type;
};

inline std::string hex(uintptr_t v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

inline std::string at_location(const UbsanLocation& l) {
  return std::string(l.file ? l.file : "?") + ":" + std::to_string(l.line) + ":" + std::to_string(l.column);
}

inline void ubsan_type_mismatch(void* data, uintptr_t ptr) {
  if (!g_in_kernel) return;
  const auto* d = static_cast<const UbsanTypeMismatch*>(data);
  report(std::string(ptr == 0 ? "null pointer access" : "misaligned access") + " of type " + (d->type + 4) +
         " at address " + hex(ptr) + " (needs " + std::to_string(1u << d->log_alignment) +
         "-byte alignment) at " + at_location(d->loc) + " in " + where());
}

inline void ubsan_out_of_bounds(void* data, uintptr_t index) {
  if (!g_in_kernel) return;
  const auto* d = static_cast<const UbsanOutOfBounds*>(data);
  report("index " + std::to_string(static_cast<long long>(index)) + " out of bounds for type " +
         (d->array_type + 4) + " at " + at_location(d->loc) + " in " + where());
}

}  // namespace emu

#define EMU_SHARED(name, align, dims, ...)  \
  using name##_emu_shared_type = __VA_ARGS__ dims; \
  static name##_emu_shared_type& name = ::emu::shared_array<name##_emu_shared_type, align>()

#define __syncthreads() ::emu::syncthreads(__LINE__)
#define cudaGetLastError() ::emu::get_last_error()

template <typename T>
T __shfl_sync(unsigned mask, T value, int src_lane, int width = warpSize) {
  return ::emu::shfl_sync(mask, value, src_lane, width);
}

extern "C" {
__attribute__((weak, visibility("hidden"))) void __ubsan_handle_type_mismatch_v1(void* data, uintptr_t ptr) {
  ::emu::ubsan_type_mismatch(data, ptr);
}
__attribute__((weak, visibility("hidden"))) void __ubsan_handle_type_mismatch_v1_abort(void* data, uintptr_t ptr) {
  ::emu::ubsan_type_mismatch(data, ptr);
}
__attribute__((weak, visibility("hidden"))) void __ubsan_handle_out_of_bounds(void* data, uintptr_t index) {
  ::emu::ubsan_out_of_bounds(data, index);
}
__attribute__((weak, visibility("hidden"))) void __ubsan_handle_out_of_bounds_abort(void* data, uintptr_t index) {
  ::emu::ubsan_out_of_bounds(data, index);
}
}

// nvcuda::wmma and __syncwarp (jvp_kernels.cu), built on the barrier above
#include "emu_wmma.h"
