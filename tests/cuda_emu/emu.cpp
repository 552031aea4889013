// Runs the CUDA kernel of csrc/cuda/apply_seeds_kernel.cuh on the CPU: every CTA's 256 threads are
// coroutines (ucontext) scheduled round-robin; __syncthreads() switches back to the scheduler, and
// a CTA resumes its threads only after all of them have reached the barrier (or exited), as on a
// GPU. Threads run in order 0..255 or, with emu_set_reverse(1), 255..0 between barriers: a result
// that depends on which thread of a phase runs first (a missing barrier) then changes. __shared__ arrays are function statics, shared by the CTA's threads. CTAs run one after
// another. Built and loaded by tests/test_cuda_emulated.py (g++, ctypes); a test tool only.
#include "cuda_shim.h"

#include <ucontext.h>

#include <vector>

#include "cuda/apply_seeds_kernel.cuh"

EmuDim threadIdx, blockIdx;
long long emu_vector_accesses = 0;

extern "C" long long emu_vector_access_count() { return emu_vector_accesses; }

namespace {

ucontext_t g_sched;
ucontext_t* g_cur = nullptr;
bool g_exited = false;
int g_reverse = 0;

struct Launch {
  const int64_t* desc;
  const int64_t* tile_start;
  int T;
  const int64_t* seeds;
  const float* coeffs;
  int K;
  float decay;
  bool apply_decay;
  bool gaussian;
} g_launch;

void thread_entry() {
  const Launch& a = g_launch;
  if (a.gaussian) {
    zo_cuda::apply_seeds_mt_kernel<true>(a.desc, a.tile_start, a.T, a.seeds, a.coeffs, a.K, a.decay,
                                         a.apply_decay);
  } else {
    zo_cuda::apply_seeds_mt_kernel<false>(a.desc, a.tile_start, a.T, a.seeds, a.coeffs, a.K,
                                          a.decay, a.apply_decay);
  }
  g_exited = true;  // back to the scheduler through uc_link
}

}  // namespace

void __syncthreads() { swapcontext(g_cur, &g_sched); }

extern "C" void emu_set_reverse(int reverse) { g_reverse = reverse; }

extern "C" int emu_apply_seeds_mt(const int64_t* desc, const int64_t* tile_start, int T,
                                  int64_t n_ctas, const int64_t* seeds, const float* coeffs, int K,
                                  float decay, int dist) {
  const int nt = zo_cuda::kThreads;
  g_launch = Launch{desc, tile_start, T, seeds, coeffs, K, decay, decay != 1.0f, dist == 1};
  const size_t stack = 256 * 1024;
  std::vector<std::vector<char>> stacks(nt, std::vector<char>(stack));
  std::vector<ucontext_t> ctx(nt);
  for (int64_t b = 0; b < n_ctas; ++b) {
    blockIdx.x = (unsigned)b;
    std::vector<bool> done(nt, false);
    for (int i = 0; i < nt; ++i) {
      getcontext(&ctx[i]);
      ctx[i].uc_stack.ss_sp = stacks[i].data();
      ctx[i].uc_stack.ss_size = stack;
      ctx[i].uc_link = &g_sched;
      makecontext(&ctx[i], thread_entry, 0);
    }
    int live = nt, passes = 0;
    while (live > 0) {
      if (++passes > 1000000) return 1;  // a barrier not every thread reaches
      for (int j = 0; j < nt; ++j) {
        const int i = g_reverse ? nt - 1 - j : j;
        if (done[i]) continue;
        threadIdx.x = (unsigned)i;
        g_cur = &ctx[i];
        g_exited = false;
        swapcontext(&g_sched, &ctx[i]);
        if (g_exited) {
          done[i] = true;
          --live;
        }
      }
    }
  }
  return 0;
}
