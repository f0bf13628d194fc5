// Native CPU paged attention for decode tokens (fp32): see kernels/native.py and
// services/executor/kv.py.
//
// One query token per sequence, attended over the sequence's context, read in place through its
// block table (no gather copy, no padding). GQA: the heads of one KV head share each K/V row.
// Online softmax per tile of up to kTile tokens (running max and sum per head, fp32 throughout).
// One call per layer for the whole decode batch.
//
// Cache layout (kv.py): k[block][slot][kv_head][d] (v likewise), token p of a sequence at
// (blocks[p / block_size], p % block_size).
//
// Work items are (sequence, chunk of KV heads), taken from an atomic counter. nthreads > 1
// shares them with torch's OpenMP team where the library is built against it (native.py), else
// with helper threads (work_share.h). A late thread finds the items taken; with helpers it
// never stalls the call beyond the item it is running, but the OpenMP region's closing barrier
// waits for every team thread, even one the OS has descheduled (like every torch op's).
//
// The math is built twice (baseline ISA and AVX2+FMA), picked at run time, like lora_cpu.cpp.

#include <stdint.h>
#include <string.h>

#include <atomic>
#include <math.h>
#include <vector>

#include "work_share.h"  // the helper threads; includes <immintrin.h> on x86

typedef float v8 __attribute__((vector_size(32), aligned(4)));  // unaligned 8-float loads
typedef int32_t v8i __attribute__((vector_size(32), aligned(4)));

namespace {

constexpr int kTile = 16;        // tokens per online-softmax step
constexpr int kMaxAcc = 8192;    // floats of accumulator per work item (heads x head_dim)
constexpr int kMaxHeadDim = 1024;
constexpr int kMaxHeads = 256;   // query heads per work item

struct Job {
  float* out;
  int64_t out_st, out_sh;
  const float* q;
  int64_t q_st, q_sh;
  const float* k;
  const float* v;
  int64_t bs, H, KVH, D, G;  // G = H / KVH
  const int64_t* rows;
  const int32_t* lens;
  const int32_t* starts;
  const int32_t* blocks;
  int64_t batch;
  float scale;
  int64_t kv_chunk;  // KV heads per item
  int64_t chunks;    // items per sequence
  int64_t items;
  std::atomic<int64_t> next;
  int isa;
};

inline v8 splat(float f) { return v8{f, f, f, f, f, f, f, f}; }

inline float hsum(v8 v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

// exp(x) for x <= 0 (scores minus their running max), Cephes-style: 2^n * p(r), |r| <= ln2/2.
inline v8 vexp(v8 x) {
  const v8 lo = splat(-87.0f);
  x = x < lo ? lo : x;
  const v8 magic = splat(12582912.0f);  // 1.5 * 2^23: rounds to an integer in the low bits
  v8 t = x * splat(1.44269504088896341f) + magic;
  v8 n = t - magic;
  v8 r = x - n * splat(0.693359375f);
  r = r - n * splat(-2.12194440e-4f);
  v8 p = splat(1.9875691500E-4f);
  p = p * r + splat(1.3981999507E-3f);
  p = p * r + splat(8.3334519073E-3f);
  p = p * r + splat(4.1665795894E-2f);
  p = p * r + splat(1.6666665459E-1f);
  p = p * r + splat(5.0000001201E-1f);
  p = p * (r * r) + r + splat(1.0f);
  v8i ni = (v8i)t - (v8i)magic;
  v8i e = (ni + 127) << 23;
  return p * (v8)e;
}

inline __attribute__((always_inline)) float dot(const float* a, const float* b, int64_t D) {
  const int64_t D8 = D & ~int64_t(7);
  v8 acc0 = splat(0.f), acc1 = splat(0.f);
  int64_t d = 0;
  for (; d + 16 <= D8; d += 16) {
    acc0 += *(const v8*)(a + d) * *(const v8*)(b + d);
    acc1 += *(const v8*)(a + d + 8) * *(const v8*)(b + d + 8);
  }
  for (; d < D8; d += 8) acc0 += *(const v8*)(a + d) * *(const v8*)(b + d);
  float s = hsum(acc0 + acc1);
  for (; d < D; ++d) s += a[d] * b[d];
  return s;
}

// acc += p * v (D floats)
inline __attribute__((always_inline)) void axpy(float* acc, float p, const float* v, int64_t D) {
  const int64_t D8 = D & ~int64_t(7);
  const v8 ps = splat(p);
  int64_t d = 0;
  for (; d < D8; d += 8) *(v8*)(acc + d) += ps * *(const v8*)(v + d);
  for (; d < D; ++d) acc[d] += p * v[d];
}

inline __attribute__((always_inline)) void scale_row(float* acc, float a, int64_t D) {
  const int64_t D8 = D & ~int64_t(7);
  const v8 as = splat(a);
  int64_t d = 0;
  for (; d < D8; d += 8) *(v8*)(acc + d) *= as;
  for (; d < D; ++d) acc[d] *= a;
}

inline __attribute__((always_inline)) void run_item(const Job& J, int64_t item) {
  const int64_t s = item / J.chunks;
  const int64_t g0 = (item % J.chunks) * J.kv_chunk;
  const int64_t g1 = g0 + J.kv_chunk < J.KVH ? g0 + J.kv_chunk : J.KVH;
  const int64_t G = J.G, D = J.D, KVH = J.KVH, bs = J.bs;
  const int64_t h0 = g0 * G, nh = (g1 - g0) * G;
  const int64_t row = J.rows[s];
  const int64_t ctx = J.lens[s];
  const int32_t* table = J.blocks + J.starts[s];
  const int64_t tok_stride = KVH * D;

  alignas(32) float acc[kMaxAcc];
  alignas(32) float qs[kMaxAcc];
  // scores[h][t] for one tile (nh <= kMaxHeads).
  alignas(32) float scores[kMaxHeads][kTile];
  float m[kMaxHeads], l[kMaxHeads];

  for (int64_t i = 0; i < nh; ++i) {
    const float* qp = J.q + row * J.q_st + (h0 + i) * J.q_sh;
    for (int64_t d = 0; d < D; ++d) qs[i * D + d] = qp[d] * J.scale;
    memset(acc + i * D, 0, sizeof(float) * D);
    m[i] = -INFINITY;
    l[i] = 0.f;
  }

  for (int64_t p0 = 0; p0 < ctx; p0 += bs) {
    const int64_t blk = table[p0 / bs];
    const int64_t nblk = ctx - p0 < bs ? ctx - p0 : bs;
    const float* kb = J.k + blk * bs * tok_stride + g0 * D;
    const float* vb = J.v + blk * bs * tok_stride + g0 * D;
    for (int64_t t0 = 0; t0 < nblk; t0 += kTile) {
      const int nt = (int)(nblk - t0 < kTile ? nblk - t0 : kTile);
      // Scores, reading the tile's K rows in memory order.
      for (int t = 0; t < nt; ++t) {
        const float* kr = kb + (t0 + t) * tok_stride;
        for (int64_t g = 0; g < g1 - g0; ++g) {
          const float* kp = kr + g * D;
          for (int64_t j = 0; j < G; ++j) {
            const int64_t i = g * G + j;
            scores[i][t] = dot(qs + i * D, kp, D);
          }
        }
      }
      // Online softmax update per head: scores become probabilities (unnormalized).
      for (int64_t i = 0; i < nh; ++i) {
        float* sr = scores[i];
        float bm = sr[0];
        for (int t = 1; t < nt; ++t) bm = sr[t] > bm ? sr[t] : bm;
        const float mn = bm > m[i] ? bm : m[i];
        for (int t = nt; t < kTile; ++t) sr[t] = -INFINITY;
        v8 lo = vexp(*(v8*)sr - splat(mn));
        v8 hi = vexp(*(v8*)(sr + 8) - splat(mn));
        if (nt <= 8) hi = splat(0.f);
        for (int t = nt; t < 8; ++t) lo[t] = 0.f;
        for (int t = (nt > 8 ? nt : 8); t < 16; ++t) hi[t - 8] = 0.f;
        *(v8*)sr = lo;
        *(v8*)(sr + 8) = hi;
        const float sum = hsum(lo + hi);
        // A new running max rescales the sum and the accumulator by the same factor, always
        // both: where the rise is large (about 104 or more) the factor underflows to 0 and the
        // old accumulator must be cleared with the sum (skipping the scale when the factor is 0
        // kept a stale accumulator beside a zero sum: issue 11's wrong tokens).
        if (mn > m[i]) {
          if (m[i] != -INFINITY) {  // the first tile finds l = 0 and acc = 0: nothing to scale
            const float alpha = expf(m[i] - mn);
            l[i] *= alpha;
            scale_row(acc + i * D, alpha, D);
          }
          m[i] = mn;
        }
        l[i] += sum;
      }
      // acc += p V, reading the tile's V rows in memory order.
      for (int t = 0; t < nt; ++t) {
        const float* vr = vb + (t0 + t) * tok_stride;
        for (int64_t g = 0; g < g1 - g0; ++g) {
          const float* vp = vr + g * D;
          for (int64_t j = 0; j < G; ++j) {
            const int64_t i = g * G + j;
            axpy(acc + i * D, scores[i][t], vp, D);
          }
        }
      }
    }
  }
  for (int64_t i = 0; i < nh; ++i) {
    float* op = J.out + row * J.out_st + (h0 + i) * J.out_sh;
    const float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
    for (int64_t d = 0; d < D; ++d) op[d] = acc[i * D + d] * inv;
  }
}

#if defined(__x86_64__) || defined(__i386__)
#define MM_HAVE_AVX2_CLONE 1
__attribute__((target("avx2,fma"))) void work_avx2(Job& J) {
  for (int64_t i; (i = J.next.fetch_add(1, std::memory_order_relaxed)) < J.items;) run_item(J, i);
}
#endif

void work_base(Job& J) {
  for (int64_t i; (i = J.next.fetch_add(1, std::memory_order_relaxed)) < J.items;) run_item(J, i);
}

void work(Job& J) {
#ifdef MM_HAVE_AVX2_CLONE
  if (J.isa == 1) {
    work_avx2(J);
    return;
  }
#endif
  work_base(J);
}

int g_isa = -1;  // 1: AVX2+FMA clone, 0: baseline

int detect_isa() {
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

void work_fn(void* j) { work(*static_cast<Job*>(j)); }

void run(Job& J, int nthreads) {
  J.isa = detect_isa();
  share::Work w{work_fn, &J};
  share::run_shared(w, share::helpers_for(J.items, nthreads));
}

}  // namespace

extern "C" {

int mm_attn_abi_version() { return 3; }

int mm_attn_isa() { return detect_isa(); }

// 1: the work items are shared with torch's OpenMP team; 0: with this library's helper threads.
int mm_attn_openmp() {
#ifdef _OPENMP
  return 1;
#else
  return 0;
#endif
}

// Force the baseline code (0) or back to detection (-1), for tests; returns the ISA in use.
int mm_attn_set_isa(int isa) {
  g_isa = isa == 0 ? 0 : -1;
  return detect_isa();
}

// out[rows[s], h] = softmax(scale * q[rows[s], h] K_s^T) V_s for every decode sequence s and
// head h, K_s / V_s: the ctx_lens[s] tokens of its blocks blocks[starts[s] .. starts[s + 1]).
// Strides in floats; head_dim contiguous; rows index q and out (num_rows each), blocks the cache
// (num_blocks). Returns 0, or -1 (nothing written) for an unsupported shape or an index out of
// range.
int mm_paged_decode_attn_f32(float* out, int64_t out_st, int64_t out_sh, const float* q,
                             int64_t q_st, int64_t q_sh, const float* k_cache,
                             const float* v_cache, int64_t block_size, int64_t num_heads,
                             int64_t num_kv_heads, int64_t head_dim, const int64_t* rows,
                             const int32_t* ctx_lens, const int32_t* starts,
                             const int32_t* blocks, int64_t batch, int64_t num_rows,
                             int64_t num_blocks, float scale, int nthreads) {
  if (num_kv_heads < 1 || num_heads < num_kv_heads || num_heads % num_kv_heads != 0 ||
      head_dim < 1 ||
      head_dim > kMaxHeadDim || block_size < 1)
    return -1;
  const int64_t G = num_heads / num_kv_heads;
  if (G * head_dim > kMaxAcc || G > kMaxHeads) return -1;
  for (int64_t s = 0; s < batch; ++s) {
    if (rows[s] < 0 || rows[s] >= num_rows || ctx_lens[s] < 1 || starts[s] < 0 ||
        (int64_t)(starts[s + 1] - starts[s]) * block_size < ctx_lens[s])
      return -1;
    const int64_t nb = (ctx_lens[s] + block_size - 1) / block_size;
    for (int64_t b = 0; b < nb; ++b) {
      const int32_t blk = blocks[starts[s] + b];
      if (blk < 0 || blk >= num_blocks) return -1;
    }
  }
  if (batch == 0) return 0;
  Job J;
  J.out = out, J.out_st = out_st, J.out_sh = out_sh;
  J.q = q, J.q_st = q_st, J.q_sh = q_sh;
  J.k = k_cache, J.v = v_cache;
  J.bs = block_size, J.H = num_heads, J.KVH = num_kv_heads, J.D = head_dim, J.G = G;
  J.rows = rows, J.lens = ctx_lens, J.starts = starts, J.blocks = blocks;
  J.batch = batch;
  J.scale = scale;
  // KV heads per item: as many as fit the accumulator; split further when there are few
  // sequences for the threads.
  int64_t kc = kMaxAcc / (G * head_dim);
  if (kc > kMaxHeads / G) kc = kMaxHeads / G;
  if (kc > num_kv_heads) kc = num_kv_heads;
  const int nt = nthreads < 1 ? 1 : nthreads;
  while (nt > 1 && kc > 1 && batch * ((num_kv_heads + kc - 1) / kc) < 4 * (int64_t)nt)
    kc = (kc + 1) / 2;
  J.kv_chunk = kc;
  J.chunks = (num_kv_heads + kc - 1) / kc;
  J.items = batch * J.chunks;
  J.next.store(0);
  run(J, nt);
  return 0;
}

}  // extern "C"
