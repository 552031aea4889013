// Timing helpers of the CPU micro-benchmarks (variants.cpp, portable.cpp): thread CPU time, best of
// N runs, and a clock calibrated by a chain of dependent integer adds.
#pragma once

#include <time.h>

#include <algorithm>
#include <cstdint>

namespace zo_bench {

// CPU time of this thread (CLOCK_THREAD_CPUTIME_ID): on a shared machine the time slices other
// processes take do not count, so the figures track an idle machine's.
inline double thread_seconds() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

// Best of `reps` runs of f, in thread CPU time.
template <class Fn> double best_of(Fn f, int reps) {
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const double t0 = thread_seconds();
    f();
    best = std::min(best, thread_seconds() - t0);
  }
  return best;
}

// GHz from a chain of dependent integer adds (one per cycle); 0 where not x86-64.
inline double calibrate_ghz() {
#if defined(__x86_64__)
  const long n_add = 100000000L;
  const double t_add = best_of([&] {
    uint64_t y = 1;
    for (long i = 0; i < n_add; ++i) asm volatile("add $1, %0" : "+r"(y));
  }, 9);
  return n_add / t_add / 1e9;
#else
  return 0.0;
#endif
}

}  // namespace zo_bench
