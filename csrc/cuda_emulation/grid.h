// How an emulated launch runs (see README.md in this folder): the blocks of the grid one after
// another, each by one fiber per CUDA thread, with __syncthreads() a barrier across them.
#pragma once

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <new>
#include <stdexcept>
#include <type_traits>
#include <vector>

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};

inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};

namespace annloader::emulation {

// cudaGetLastError's state: per host thread, cleared when read.
inline thread_local int last_error = 0;

template <typename Error>
Error set_last_error(Error e) {
  last_error = static_cast<int>(e);
  return e;
}

template <typename Error>
Error take_last_error() {
  const int e = last_error;
  last_error = 0;
  return static_cast<Error>(e);
}

// Each CUDA thread of the block being run is a fiber (ucontext) on the calling OS thread, with a
// stack of its own. The block runs in rounds: every fiber in turn runs until its next
// __syncthreads() or its end. Fibers that meet at different kinds of crossing in one round
// mean some thread skipped a __syncthreads() the others reached: undefined on a GPU, an error
// here. Running each thread as far as it goes before the next starts is what exposes a missing
// __syncthreads(): a later thread's writes land after an earlier thread's, deterministically.
class FiberStacks {
 public:
  static constexpr size_t kStackBytes = size_t{64} << 10;

  ~FiberStacks() {
    for (void* region : regions_) munmap(region, kStackBytes + page());
  }

  // The stack of fiber t (its lowest usable byte); a guard page below each one turns an
  // overflow into a fault instead of silent corruption.
  char* stack(size_t t) {
    while (regions_.size() <= t) {
      void* region = mmap(nullptr, kStackBytes + page(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (region == MAP_FAILED) throw std::bad_alloc();
      mprotect(region, page(), PROT_NONE);
      regions_.push_back(region);
    }
    return static_cast<char*>(regions_[t]) + page();
  }

 private:
  static size_t page() { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }
  std::vector<void*> regions_;
};

// One pool per OS thread, shared by every kernel (a pool per kernel instantiation would map
// hundreds of megabytes and run into the kernel's limit on mappings).
inline FiberStacks& fiber_stacks() {
  static thread_local FiberStacks stacks;
  return stacks;
}

enum class Crossing { kRunning, kSyncthreads, kEnd };

struct Fiber {
  ucontext_t context;
  Crossing reached = Crossing::kRunning;
  const char* file = nullptr;  // the __syncthreads() reached, for kSyncthreads
  int line = 0;
};

struct BlockRun {
  ucontext_t scheduler;
  std::vector<Fiber> fibers;
  size_t current = 0;
  void (*call_body)(void*) = nullptr;
  void* body = nullptr;
};

inline thread_local BlockRun* running_block = nullptr;

inline void sync_block(const char* file, int line) {
  if (running_block == nullptr) throw std::logic_error("__syncthreads() outside an emulated kernel");
  Fiber& fiber = running_block->fibers[running_block->current];
  fiber.reached = Crossing::kSyncthreads;
  fiber.file = file;
  fiber.line = line;
  swapcontext(&fiber.context, &running_block->scheduler);
}

inline void fiber_entry() {
  BlockRun& run = *running_block;
  run.call_body(run.body);
  run.fibers[run.current].reached = Crossing::kEnd;
  // Returning resumes the scheduler through uc_link.
}

// The bounds of the section every __shared__ variable is placed in (see cuda_runtime.h), from
// the linker; null where no kernel declares shared memory.
extern "C" char __start_annloader_shared[] __attribute__((weak, visibility("hidden")));
extern "C" char __stop_annloader_shared[] __attribute__((weak, visibility("hidden")));

inline void poison_shared_memory() {
  if (__start_annloader_shared != nullptr) {
    std::memset(__start_annloader_shared, 0xA5, static_cast<size_t>(__stop_annloader_shared - __start_annloader_shared));
  }
}

// The limits CUDA enforces at launch (compute capability 9.0); a launcher that breaks one gets
// cudaErrorInvalidConfiguration from its launch check, as it would on the GPU.
inline bool valid_configuration(dim3 grid, dim3 block) {
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  return threads >= 1 && threads <= 1024 && block.z <= 64 && grid.x >= 1 && grid.x <= 0x7fffffffu &&
         grid.y >= 1 && grid.y <= 65535 && grid.z >= 1 && grid.z <= 65535;
}

inline void set_thread_index(size_t t, dim3 block) {
  const auto i = static_cast<unsigned int>(t);
  threadIdx = uint3{i % block.x, (i / block.x) % block.y, i / (block.x * block.y)};
}

// Runs one block to its end, round by round.
inline void run_block(BlockRun& run, FiberStacks& stacks, dim3 block) {
  poison_shared_memory();
  for (size_t t = 0; t < run.fibers.size(); ++t) {
    Fiber& fiber = run.fibers[t];
    fiber.reached = Crossing::kRunning;
    getcontext(&fiber.context);
    fiber.context.uc_stack.ss_sp = stacks.stack(t);
    fiber.context.uc_stack.ss_size = FiberStacks::kStackBytes;
    fiber.context.uc_link = &run.scheduler;
    makecontext(&fiber.context, fiber_entry, 0);
  }
  // Odd blocks run their threads last to first: a missing __syncthreads() then shows whichever
  // thread of a pair writes first.
  const bool backwards = (blockIdx.x + blockIdx.y + blockIdx.z) % 2 == 1;
  const size_t n = run.fibers.size();
  while (true) {
    for (size_t k = 0; k < n; ++k) {
      const size_t t = backwards ? n - 1 - k : k;
      run.current = t;
      set_thread_index(t, block);
      run.fibers[t].reached = Crossing::kRunning;
      swapcontext(&run.scheduler, &run.fibers[t].context);
    }
    const Fiber& first = run.fibers.front();
    for (const Fiber& fiber : run.fibers) {
      const bool same = fiber.reached == first.reached &&
                        (fiber.reached != Crossing::kSyncthreads ||
                         (fiber.line == first.line && std::strcmp(fiber.file, first.file) == 0));
      if (!same) {
        throw std::logic_error("emulated kernel: threads of a block reached different __syncthreads() calls");
      }
    }
    const Crossing reached = first.reached;
    if (reached == Crossing::kEnd) return;
  }
}

template <typename Body>
void run_grid(dim3 grid, dim3 block, Body&& body) {
  constexpr int kInvalidConfiguration = 9;  // cudaErrorInvalidConfiguration
  if (!valid_configuration(grid, block)) {
    last_error = kInvalidConfiguration;
    return;
  }
  if (running_block != nullptr) throw std::logic_error("emulated kernels cannot launch kernels");
  FiberStacks& stacks = fiber_stacks();
  BlockRun run;
  run.fibers.resize(size_t{block.x} * block.y * block.z);
  run.body = &body;
  run.call_body = [](void* b) { (*static_cast<std::remove_reference_t<Body>*>(b))(); };
  running_block = &run;
  blockDim = block;
  gridDim = grid;
  try {
    for (unsigned int z = 0; z < grid.z; ++z) {
      for (unsigned int y = 0; y < grid.y; ++y) {
        for (unsigned int x = 0; x < grid.x; ++x) {
          blockIdx = uint3{x, y, z};
          run_block(run, stacks, block);
        }
      }
    }
  } catch (...) {
    running_block = nullptr;
    throw;
  }
  running_block = nullptr;
}

}  // namespace annloader::emulation
