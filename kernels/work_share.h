// Work sharing for the native CPU kernels (lora_cpu.cpp, attn_cpu.cpp), safe on shared cores.
//
// A call's work is a list of items taken through an atomic counter by whoever runs `fn`. With
// helpers > 0 the caller wakes helper threads (started on first use and kept, sleeping on a
// condition variable, for the life of the process), starts at once and takes items too, and at
// the end waits only for helpers that are inside the job: a helper that has not woken yet finds
// no job and goes back to sleep. So a descheduled helper never stalls the call beyond the item it
// is running, where an OpenMP parallel region waits at its barrier for every thread of the team
// (on a 2-core machine with another busy process that is a time slice, ~10x a decode step's LoRA
// ops). Each library that includes this has its own pool.

#pragma once

#include <stdint.h>

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>

#ifndef MM_PAUSE
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define MM_PAUSE() _mm_pause()
#else
#define MM_PAUSE() ((void)0)
#endif
#endif

namespace {
namespace share {

// One call's work: fn(arg) takes items until none are left (it may run on several threads at
// once: it must take them through an atomic counter in arg).
struct Work {
  void (*fn)(void*);
  void* arg;
};

struct Pool {
  std::mutex mu;
  std::condition_variable cv;
  uint64_t gen = 0;
  int started = 0;
  std::atomic<Work*> cur{nullptr};
  std::atomic<int> busy{0};

  void worker() {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lk(mu);
        cv.wait(lk, [&] { return gen != seen; });
        seen = gen;
      }
      busy.fetch_add(1);  // seq_cst: pairs with the caller's store of cur / load of busy
      Work* w = cur.load();
      if (w != nullptr) w->fn(w->arg);
      busy.fetch_sub(1);
    }
  }

  void ensure(int helpers) {
    std::lock_guard<std::mutex> lk(mu);
    while (started < helpers) {
      try {
        std::thread([this] { worker(); }).detach();
      } catch (...) {  // no more threads (a pids limit, say): the caller does the rest itself
        break;
      }
      ++started;
    }
  }
};

inline Pool* g_pool = nullptr;
inline std::mutex g_pool_mu;

// Helpers for `items` items with up to `nthreads` threads in all (the caller included), capped
// by the machine's hardware threads.
inline int helpers_for(int64_t items, int nthreads) {
  int helpers = nthreads - 1;
  if ((int64_t)helpers > items - 1) helpers = (int)(items - 1);
  // Read once: glibc answers it by reading /sys/devices/system/cpu/online (~6 us, three
  // syscalls), which every call of both kernels paid (a decode step makes dozens).
  static const unsigned hc = std::thread::hardware_concurrency();
  if (hc > 0 && helpers > (int)hc - 1) helpers = (int)hc - 1;
  return helpers;
}

// Runs w on the calling thread, shared with up to `helpers` helper threads; returns when every
// item is done.
inline void run(Work& w, int helpers) {
  if (helpers < 1) {
    w.fn(w.arg);
    return;
  }
  Pool* pool;
  {
    std::lock_guard<std::mutex> lk(g_pool_mu);
    if (g_pool == nullptr) g_pool = new Pool();  // never freed: helpers outlive any caller
    pool = g_pool;
  }
  pool->ensure(helpers);
  Work* expected = nullptr;
  if (!pool->cur.compare_exchange_strong(expected, &w)) {  // another caller holds the helpers
    w.fn(w.arg);
    return;
  }
  {
    std::lock_guard<std::mutex> lk(pool->mu);
    ++pool->gen;
  }
  pool->cv.notify_all();
  w.fn(w.arg);
  pool->cur.store(nullptr);
  // Only helpers inside the job (they incremented busy before reading cur) are waited for.
  for (int spin = 0; pool->busy.load() != 0; ++spin) {
    if (spin < 4096) {
      MM_PAUSE();
    } else {
      std::this_thread::yield();
    }
  }
}

// Runs w on the calling thread and `helpers` more: torch's OpenMP team where the library is
// built against the OpenMP runtime torch loaded (native.py), else this header's helper threads
// (run above). Right after one of the backbone's GEMMs that team's workers are still spinning
// for the next region, so they start at once; a helper thread of our own would share its core
// with a spinning worker, and in the model the call then ran no faster than on one thread
// (measured: 64 rows x 64 rank-16 adapters x 32 layers of LoRA ops, 21.3 ms in the model vs
// 13.2 alone; with the team 13.9 vs 9.9; decode attention, 24 sequences x 180 tokens x 8
// layers: 15 ms a step on two helper-shared threads, 13 on one, 7-10 on the team of two). The
// catch: the region's closing barrier waits for every team thread, as every torch op's does.
inline void run_shared(Work& w, int helpers) {
#ifdef _OPENMP
  if (helpers > 0) {
#pragma omp parallel num_threads(helpers + 1)
    w.fn(w.arg);
    return;
  }
  w.fn(w.arg);
#else
  run(w, helpers);
#endif
}

}  // namespace share
}  // namespace
