// Native CPU LoRA ops (fp32) over the paged adapter pool: see kernels/native.py.
//
// Plain C ABI (loaded with ctypes, no torch headers: compiles in a second or two). Weights are
// read in place through the page table (no gather copies); one call per layer and op; the work
// items are tiles of up to 4 rows of one adapter segment (rows are addressed through
// sorted_tokens, so a tile never copies x or y), shared by torch's OpenMP team where the library
// is built against it (native.py), else by helper threads of work_share.h. The inner loops use
// GCC vector extensions (8 floats), built twice: once for the baseline ISA and once with AVX2+FMA, picked at run time (so the library
// is safe on a machine without AVX2, whatever machine built it).
//
// Layout (pool.py): A row k of slot s is a_pages[(page_table[s][k / pr] * pr + k % pr) * in_f],
// B^T row k likewise in b_pages with out_f columns.

#include <stdint.h>
#include <string.h>

#include <atomic>
#include <vector>

#include "work_share.h"

typedef float v8 __attribute__((vector_size(32), aligned(4)));  // unaligned 8-float loads

namespace {

struct Layer {
  const float* a;  // [P, pr, in_f]
  const float* b;  // [P, pr, out_f]
  int64_t in_f, out_f, pr;
  const int32_t* table;  // [N, mp]
  int64_t mp;
  const int32_t* ranks;   // [N]
  const float* scales;    // [N] (may be null for shrink)
};

struct Tile {
  int32_t seg, first, n;  // segment, first position in sorted_tokens, rows (1..4)
};

constexpr int kMaxRank = 1024;
constexpr int kTile = 4;

inline const float* a_row(const Layer& L, int slot, int k) {
  int64_t page = L.table[slot * L.mp + k / L.pr];
  return L.a + (page * L.pr + k % L.pr) * L.in_f;
}

inline const float* b_row(const Layer& L, int slot, int k) {
  int64_t page = L.table[slot * L.mp + k / L.pr];
  return L.b + (page * L.pr + k % L.pr) * L.out_f;
}

inline float hsum(v8 v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

inline v8 splat(float f) { return v8{f, f, f, f, f, f, f, f}; }

// v[i][k] = x_i . A_k for the R rows of a tile and k < r; K rows of A at a time.
template <int R, int K>
inline __attribute__((always_inline)) void shrink_tile(const Layer& L, int slot, int r,
                                                       const float* const* xs, float (*v)[kMaxRank]) {
  const int64_t n = L.in_f, n8 = n & ~int64_t(7);
  int k = 0;
  for (; k + K <= r; k += K) {
    const float* a[K];
    for (int q = 0; q < K; ++q) a[q] = a_row(L, slot, k + q);
    v8 acc[R][K];
    for (int i = 0; i < R; ++i)
      for (int q = 0; q < K; ++q) acc[i][q] = splat(0.f);
    for (int64_t j = 0; j < n8; j += 8) {
      v8 av[K];
      for (int q = 0; q < K; ++q) av[q] = *(const v8*)(a[q] + j);
      for (int i = 0; i < R; ++i) {
        v8 xv = *(const v8*)(xs[i] + j);
        for (int q = 0; q < K; ++q) acc[i][q] += xv * av[q];
      }
    }
    for (int i = 0; i < R; ++i)
      for (int q = 0; q < K; ++q) {
        float s = hsum(acc[i][q]);
        for (int64_t j = n8; j < n; ++j) s += xs[i][j] * a[q][j];
        v[i][k + q] = s;
      }
  }
  for (; k < r; ++k) {
    const float* a = a_row(L, slot, k);
    v8 acc[R];
    for (int i = 0; i < R; ++i) acc[i] = splat(0.f);
    for (int64_t j = 0; j < n8; j += 8) {
      v8 av = *(const v8*)(a + j);
      for (int i = 0; i < R; ++i) acc[i] += *(const v8*)(xs[i] + j) * av;
    }
    for (int i = 0; i < R; ++i) {
      float s = hsum(acc[i]);
      for (int64_t j = n8; j < n; ++j) s += xs[i][j] * a[j];
      v[i][k] = s;
    }
  }
}

// y_i += sum_k v[i][k] * Bt_k for the R rows of a tile (v already scaled); JV vectors of y at
// a time, accumulated in registers over a chunk of at most kChunk rows of B^T (few enough
// concurrent read streams for the hardware prefetchers; y stays in L1 between chunks). 8 rows:
// expand 1.13x over 16 at decode (the measurement above); 4 and 2 were slower than 8.
constexpr int kChunk = 8;

template <int R, int JV>
inline __attribute__((always_inline)) void expand_chunk(int64_t n, int kn, float* const* ys,
                                                        const float (*v)[kMaxRank], int k0,
                                                        const float* const* bs) {
  int64_t j = 0;
  for (; j + 8 * JV <= n; j += 8 * JV) {
    v8 acc[R][JV];
    for (int i = 0; i < R; ++i)
      for (int q = 0; q < JV; ++q) acc[i][q] = *(const v8*)(ys[i] + j + 8 * q);
    for (int k = 0; k < kn; ++k) {
      const float* b = bs[k] + j;
      v8 bv[JV];
      for (int q = 0; q < JV; ++q) bv[q] = *(const v8*)(b + 8 * q);
      for (int i = 0; i < R; ++i) {
        v8 s = splat(v[i][k0 + k]);
        for (int q = 0; q < JV; ++q) acc[i][q] += s * bv[q];
      }
    }
    for (int i = 0; i < R; ++i)
      for (int q = 0; q < JV; ++q) *(v8*)(ys[i] + j + 8 * q) = acc[i][q];
  }
  for (; j + 8 <= n; j += 8) {
    v8 acc[R];
    for (int i = 0; i < R; ++i) acc[i] = *(const v8*)(ys[i] + j);
    for (int k = 0; k < kn; ++k) {
      v8 bv = *(const v8*)(bs[k] + j);
      for (int i = 0; i < R; ++i) acc[i] += splat(v[i][k0 + k]) * bv;
    }
    for (int i = 0; i < R; ++i) *(v8*)(ys[i] + j) = acc[i];
  }
  for (; j < n; ++j) {
    for (int i = 0; i < R; ++i) {
      float s = ys[i][j];
      for (int k = 0; k < kn; ++k) s += v[i][k0 + k] * bs[k][j];
      ys[i][j] = s;
    }
  }
}

template <int R, int JV>
inline __attribute__((always_inline)) void expand_tile(const Layer& L, int slot, int r,
                                                       float* const* ys, float (*v)[kMaxRank]) {
  for (int k0 = 0; k0 < r; k0 += kChunk) {
    const int kn = r - k0 < kChunk ? r - k0 : kChunk;
    const float* bs[kChunk];
    for (int k = 0; k < kn; ++k) bs[k] = b_row(L, slot, k0 + k);
    expand_chunk<R, JV>(L.out_f, kn, ys, v, k0, bs);
  }
}

enum Op { kFused = 0, kShrink = 1, kExpand = 2 };

struct Job {
  Layer L;
  int op;
  float* y;  // fused / expand output
  int64_t ldy;
  const float* x;  // fused / shrink input
  int64_t ldx;
  float* v;  // shrink output / expand input (float32)
  int64_t ldv;
  const int64_t* sorted;
  const int32_t* seg_starts;
  const int32_t* seg_slots;
};

template <int R>
inline __attribute__((always_inline)) void run_tile_r(const Job& J, const Tile& t) {
  const Layer& L = J.L;
  const int slot = J.seg_slots[t.seg];
  const int r = L.ranks[slot];
  if (r <= 0) {
    if (J.op == kShrink)
      for (int i = 0; i < R; ++i) memset(J.v + J.sorted[t.first + i] * J.ldv, 0, J.ldv * 4);
    return;
  }
  float v[R][kMaxRank];
  if (J.op == kExpand) {
    const float sc = L.scales[slot];
    for (int i = 0; i < R; ++i) {
      const float* vr = J.v + J.sorted[t.first + i] * J.ldv;
      for (int k = 0; k < r; ++k) v[i][k] = vr[k] * sc;
    }
  } else {
    const float* xs[R];
    for (int i = 0; i < R; ++i) xs[i] = J.x + J.sorted[t.first + i] * J.ldx;
    // Every (row, k) dot product is one accumulator over 8-float steps whatever R and K, so a
    // row's result does not depend on the rows batched with it (nor on the tile it lands in).
    // A 1-row tile (decode) streams 8 rows of A at once: more misses in flight per thread
    // (decode LoRA ops 0.95x the time of 4 rows, in fast and slow memory alike; 12 registers).
    shrink_tile<R, (R == 1 ? 8 : R <= 2 ? 4 : 2)>(L, slot, r, xs, v);
    if (J.op == kShrink) {
      for (int i = 0; i < R; ++i) {
        float* vr = J.v + J.sorted[t.first + i] * J.ldv;
        memcpy(vr, v[i], r * 4);
        memset(vr + r, 0, (J.ldv - r) * 4);
      }
      return;
    }
    const float sc = L.scales[slot];
    for (int i = 0; i < R; ++i)
      for (int k = 0; k < r; ++k) v[i][k] *= sc;
  }
  float* ys[R];
  for (int i = 0; i < R; ++i) ys[i] = J.y + J.sorted[t.first + i] * J.ldy;
  // A 1-row tile takes 2 vectors (one cache line) of each B^T row per step, not 8: the decode
  // LoRA ops 1.02-1.10x faster (5 in-process A/B runs of 21 pairs, median 1.07); 1 vector was
  // no faster than 8, nor were chunks of 4 or 16 rows with 2 vectors. Bit-identical: each y
  // element still adds its products in k order.
  expand_tile<R, (R == 1 ? 2 : R == 2 ? 4 : 2)>(L, slot, r, ys, v);
}

inline __attribute__((always_inline)) void run_tile(const Job& J, const Tile& t) {
  switch (t.n) {
    case 1: run_tile_r<1>(J, t); break;
    case 2: run_tile_r<2>(J, t); break;
    case 3: run_tile_r<3>(J, t); break;
    default: run_tile_r<4>(J, t); break;
  }
}

// One call's tiles, taken through an atomic counter by the caller and any helper threads.
struct Tiles {
  const Job* J;
  const Tile* tiles;
  int64_t n;
  std::atomic<int64_t> next{0};
  int isa;
};

#if defined(__x86_64__) || defined(__i386__)
#define MM_HAVE_AVX2_CLONE 1
__attribute__((target("avx2,fma"))) void run_tiles_avx2(Tiles& w) {
  for (int64_t i; (i = w.next.fetch_add(1, std::memory_order_relaxed)) < w.n;)
    run_tile(*w.J, w.tiles[i]);
}
#endif

void run_tiles_base(Tiles& w) {
  for (int64_t i; (i = w.next.fetch_add(1, std::memory_order_relaxed)) < w.n;)
    run_tile(*w.J, w.tiles[i]);
}

void run_tiles(void* p) {
  Tiles& w = *static_cast<Tiles*>(p);
#ifdef MM_HAVE_AVX2_CLONE
  if (w.isa == 1) {
    run_tiles_avx2(w);
    return;
  }
#endif
  run_tiles_base(w);
}

int g_isa = -1;  // 1: AVX2+FMA clone, 0: baseline

int run(const Job& J, int64_t nseg, int nthreads) {
  for (int64_t s = 0; s < nseg; ++s) {
    int r = J.L.ranks[J.seg_slots[s]];
    if (r > kMaxRank) return -1;
  }
  std::vector<Tile> tiles;
  tiles.reserve(nseg + (J.seg_starts[nseg] - J.seg_starts[0]) / kTile + 1);
  for (int64_t s = 0; s < nseg; ++s) {
    const int32_t e = J.seg_starts[s + 1];
    for (int32_t p = J.seg_starts[s]; p < e; p += kTile) {
      int32_t n = e - p < kTile ? e - p : kTile;
      tiles.push_back(Tile{int32_t(s), p, n});
    }
  }
  if (g_isa < 0) {
#ifdef MM_HAVE_AVX2_CLONE
    __builtin_cpu_init();
    g_isa = (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ? 1 : 0;
#else
    g_isa = 0;
#endif
  }
  Tiles w;
  w.J = &J, w.tiles = tiles.data(), w.n = (int64_t)tiles.size(), w.isa = g_isa;
  share::Work work{run_tiles, &w};
  share::run_shared(work, share::helpers_for(w.n, nthreads));
  return 0;
}

Layer make_layer(const float* a, const float* b, int64_t in_f, int64_t out_f, int64_t pr,
                 const int32_t* table, int64_t mp, const int32_t* ranks, const float* scales) {
  return Layer{a, b, in_f, out_f, pr, table, mp, ranks, scales};
}

}  // namespace

extern "C" {

int mm_abi_version() { return 1; }

// 1: the tiles are shared with torch's OpenMP team; 0: with this library's helper threads.
int mm_openmp() {
#ifdef _OPENMP
  return 1;
#else
  return 0;
#endif
}

int mm_isa() {
  if (g_isa < 0) {
#ifdef MM_HAVE_AVX2_CLONE
    __builtin_cpu_init();
    g_isa = (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ? 1 : 0;
#else
    g_isa = 0;
#endif
  }
  return g_isa;
}

// Force the baseline code (0) or back to detection (-1), for tests; returns the ISA in use.
int mm_set_isa(int isa) {
  g_isa = isa == 0 ? 0 : -1;
  return mm_isa();
}

// y[t] += scales[s] * (x[t] A_s^T) B_s^T for the rows t of every segment (slot s).
int mm_lora_fused_f32(float* y, int64_t ldy, const float* x, int64_t ldx, const float* a_pages,
                      const float* b_pages, int64_t in_f, int64_t out_f, int64_t pr,
                      const int32_t* page_table, int64_t mp, const int32_t* ranks,
                      const float* scales, const int64_t* sorted_tokens,
                      const int32_t* seg_starts, const int32_t* seg_slots, int64_t nseg,
                      int nthreads) {
  Job J{};
  J.L = make_layer(a_pages, b_pages, in_f, out_f, pr, page_table, mp, ranks, scales);
  J.op = kFused;
  J.y = y, J.ldy = ldy, J.x = x, J.ldx = ldx;
  J.sorted = sorted_tokens, J.seg_starts = seg_starts, J.seg_slots = seg_slots;
  return run(J, nseg, nthreads);
}

// v[t, :r] = x[t] A_s^T, v[t, r:] = 0 for the rows of every segment (other rows: untouched;
// the caller zeroes v first when some rows have no adapter).
int mm_lora_shrink_f32(float* v, int64_t ldv, const float* x, int64_t ldx, const float* a_pages,
                       int64_t in_f, int64_t pr, const int32_t* page_table, int64_t mp,
                       const int32_t* ranks, const int64_t* sorted_tokens,
                       const int32_t* seg_starts, const int32_t* seg_slots, int64_t nseg,
                       int nthreads) {
  Job J{};
  J.L = make_layer(a_pages, nullptr, in_f, 0, pr, page_table, mp, ranks, nullptr);
  J.op = kShrink;
  J.v = v, J.ldv = ldv, J.x = x, J.ldx = ldx;
  J.sorted = sorted_tokens, J.seg_starts = seg_starts, J.seg_slots = seg_slots;
  return run(J, nseg, nthreads);
}

// y[t] += scales[s] * v[t, :r] B_s^T for the rows of every segment.
int mm_lora_expand_f32(float* y, int64_t ldy, const float* v, int64_t ldv, const float* b_pages,
                       int64_t out_f, int64_t pr, const int32_t* page_table, int64_t mp,
                       const int32_t* ranks, const float* scales, const int64_t* sorted_tokens,
                       const int32_t* seg_starts, const int32_t* seg_slots, int64_t nseg,
                       int nthreads) {
  Job J{};
  J.L = make_layer(nullptr, b_pages, 0, out_f, pr, page_table, mp, ranks, scales);
  J.op = kExpand;
  J.y = y, J.ldy = ldy, J.v = const_cast<float*>(v), J.ldv = ldv;
  J.sorted = sorted_tokens, J.seg_starts = seg_starts, J.seg_slots = seg_slots;
  return run(J, nseg, nthreads);
}

}  // extern "C"
