/* Shared pieces of the fused CPU optimizer kernels (lightning_opt.kernels.cpu).
 *
 * Every kernel has one C signature, so one Python launcher serves them all:
 *   void NAME_SUFFIX(int64_t n, void **ptrs, const int64_t *sizes, const double *hp,
 *                    const int64_t *ip, double *out, int nthreads)
 *   n      tensors in the bucket; ptrs[l * n + t] is tensor t of list l (NULL where absent)
 *   sizes  elements of tensor t; hp / ip the float / integer hyperparameters (runtime values)
 *   out    per-tensor results (n * n_out doubles), e.g. a clipped lr or a trust ratio
 * SUFFIX names the parameter storage type and, where it differs, the state's: f32, f64, bf16, f16,
 * bf16_f32, f16_f32. Arithmetic is float32 for bf16/f16 (double for f64); bf16 stores round to
 * nearest even (or stochastically, or Kahan-compensated: lightning_opt.optim.precision).
 * Work is split into fixed chunks of LO_CHUNK elements, so per-tensor reductions add the same
 * partial sums in the same order whatever the thread count: results are deterministic.
 */
#ifndef LO_COMMON_H
#define LO_COMMON_H
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LO_CHUNK 16384

typedef struct {
  int64_t t, lo, hi;
} lo_chunk;

/* every (tensor, chunk) pair of the tensors t0 .. t1 - 1, in order; the caller frees *out */
static inline int64_t lo_make_chunks_in(int64_t t0, int64_t t1, const int64_t *sizes, lo_chunk **out) {
  int64_t nc = 0;
  for (int64_t t = t0; t < t1; t++) nc += (sizes[t] + LO_CHUNK - 1) / LO_CHUNK;
  lo_chunk *ch = (lo_chunk *)malloc(sizeof(lo_chunk) * (size_t)(nc > 0 ? nc : 1));
  int64_t k = 0;
  for (int64_t t = t0; t < t1; t++)
    for (int64_t lo = 0; lo < sizes[t]; lo += LO_CHUNK) {
      ch[k].t = t;
      ch[k].lo = lo;
      ch[k].hi = lo + LO_CHUNK < sizes[t] ? lo + LO_CHUNK : sizes[t];
      k++;
    }
  *out = ch;
  return nc;
}

#define LO_STR(x) #x
#define LO_PRAGMA(x) _Pragma(LO_STR(x))

/* Cache groups. A kernel with two passes over a tensor (a per-tensor reduction, then the update)
 * takes the bucket in groups of consecutive tensors of at most LO_GROUP_BYTES of parameter bytes (a
 * larger tensor alone), last group first: both passes over a group, then the next, so the second
 * pass re-reads from the cache what the first just touched (on the 2-core EPYC of docs/BENCHMARKS.md
 * that is 12% of LAMB's step). The first pass walks its chunks backwards, so it starts on what the
 * pass before it (a global gradient norm in tensor order, or the previous group's second pass)
 * touched last. Grouping changes no result: partial sums are added in chunk order. */
#define LO_GROUP_BYTES ((int64_t)4 << 20)
/* the first tensor of the group that ends before tensor t1 (elements of elem_bytes bytes) */
static inline int64_t lo_group_start(const int64_t *sizes, int64_t t1, int64_t elem_bytes) {
  int64_t t0 = t1 - 1, bytes = sizes[t0] * elem_bytes;
  while (t0 > 0 && bytes + sizes[t0 - 1] * elem_bytes <= LO_GROUP_BYTES) bytes += sizes[--t0] * elem_bytes;
  return t0;
}
/* for (t0, t1) over the groups of n tensors, last group first */
#define LO_FOR_GROUPS(n, sizes, elem_bytes, t0, t1) \
  for (int64_t t1 = (n), t0 = t1 > 0 ? lo_group_start((sizes), t1, (elem_bytes)) : 0; t1 > 0; \
       t1 = t0, t0 = t1 > 0 ? lo_group_start((sizes), t1, (elem_bytes)) : 0)

/* run the body (the variadic argument) for every chunk (t, lo, hi) of the tensors t0 .. t1 - 1,
 * chunks spread over nthreads threads (in reverse order when rev) */
#define LO_FOR_CHUNKS_IN(t0, t1, rev, sizes, nthreads, ...)                       \
  do {                                                                            \
    lo_chunk *lo_ch_;                                                             \
    const int64_t lo_nc_ = lo_make_chunks_in((t0), (t1), (sizes), &lo_ch_);       \
    const int lo_rev_ = (rev);                                                    \
    LO_PRAGMA(omp parallel for num_threads(nthreads) schedule(static))            \
    for (int64_t lo_i_ = 0; lo_i_ < lo_nc_; lo_i_++) {                            \
      const int64_t lo_c_ = lo_rev_ ? lo_nc_ - 1 - lo_i_ : lo_i_;                 \
      const int64_t t = lo_ch_[lo_c_].t, lo = lo_ch_[lo_c_].lo, hi = lo_ch_[lo_c_].hi; \
      (void)t;                                                                    \
      __VA_ARGS__                                                                 \
    }                                                                             \
    free(lo_ch_);                                                                 \
  } while (0)
/* ... for every chunk of the bucket, in order */
#define LO_FOR_CHUNKS(n, sizes, nthreads, ...) LO_FOR_CHUNKS_IN(0, (n), 0, (sizes), (nthreads), __VA_ARGS__)

/* per-tensor sums of per-chunk partials (double) of the tensors t0 .. t1 - 1 into sums[t * k ..],
 * added in chunk order whatever the thread count or walking order: deterministic. The body
 * (variadic argument) must accumulate chunk (lo, hi) of tensor t into double acc[0..k-1]. */
#define LO_TENSOR_SUMS_IN(t0, t1, rev, sizes, nthreads, k, sums, ...)             \
  do {                                                                            \
    lo_chunk *lo_ch_;                                                             \
    const int64_t lo_nc_ = lo_make_chunks_in((t0), (t1), (sizes), &lo_ch_);       \
    const int lo_rev_ = (rev);                                                    \
    double *lo_part_ = (double *)calloc((size_t)(lo_nc_ > 0 ? lo_nc_ : 1) * (k), sizeof(double)); \
    LO_PRAGMA(omp parallel for num_threads(nthreads) schedule(static))            \
    for (int64_t lo_i_ = 0; lo_i_ < lo_nc_; lo_i_++) {                            \
      const int64_t lo_c_ = lo_rev_ ? lo_nc_ - 1 - lo_i_ : lo_i_;                 \
      const int64_t t = lo_ch_[lo_c_].t, lo = lo_ch_[lo_c_].lo, hi = lo_ch_[lo_c_].hi; \
      double *acc = lo_part_ + lo_c_ * (k);                                       \
      __VA_ARGS__                                                                 \
    }                                                                             \
    memset((sums) + (t0) * (k), 0, sizeof(double) * (size_t)((t1) - (t0)) * (k)); \
    for (int64_t lo_c_ = 0; lo_c_ < lo_nc_; lo_c_++)                              \
      for (int64_t j_ = 0; j_ < (k); j_++) (sums)[lo_ch_[lo_c_].t * (k) + j_] += lo_part_[lo_c_ * (k) + j_]; \
    free(lo_part_);                                                               \
    free(lo_ch_);                                                                 \
  } while (0)
/* ... of every tensor of the bucket */
#define LO_TENSOR_SUMS(n, sizes, nthreads, k, sums, ...) \
  LO_TENSOR_SUMS_IN(0, (n), 0, (sizes), (nthreads), (k), (sums), __VA_ARGS__)

/* ---- storage types: load to the compute type, store with rounding ---- */
typedef uint16_t lo_bf16;
typedef _Float16 lo_f16;

static inline float lo_bf16_to_f32(lo_bf16 x) {
  uint32_t u = ((uint32_t)x) << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

static inline uint32_t lo_f32_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}

/* round to nearest even; NaN stays NaN (quiet) */
static inline lo_bf16 lo_f32_to_bf16(float f) {
  uint32_t u = lo_f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (lo_bf16)((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (lo_bf16)(u >> 16);
}

/* Wellons' lowbias32 hash; the same in lightning_opt.optim.precision.sr_bits and the Triton kernels */
static inline uint32_t lo_hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

/* stochastic rounding of f, element i of its tensor, to bf16: add 16 hashed bits below the kept
 * ones, truncate. key is the tensor's seed key (lightning_opt.optim.precision.sr_key of its step
 * count), so a value rounded again at a later step draws fresh bits. */
static inline lo_bf16 lo_f32_to_bf16_sr(float f, int64_t i, uint32_t key) {
  uint32_t u = lo_f32_bits(f);
  if ((u & 0x7f800000u) == 0x7f800000u) return lo_f32_to_bf16(f);
  uint32_t r = lo_hash32(lo_hash32((uint32_t)i + key) ^ u) & 0xffffu;
  return (lo_bf16)((u + r) >> 16);
}

/* Stochastic-rounding seeds. A kernel with a stochastic-rounding switch (an ip entry, 0/1) takes,
 * after its other integer entries, one seed key per tensor: ip[base + t], base documented at the
 * kernel (lightning_opt.optim.precision.sr_key of the tensor's step count, a 32-bit value; the
 * entries need not be there when the switch is 0). lo_sr_word(sr, keys, t) folds switch and key
 * into the one word the stores take: 0 rounds to nearest; otherwise bit 32 is set and the low 32
 * bits are tensor t's key. */
static inline uint64_t lo_sr_word(int sr, const int64_t *keys, int64_t t) {
  return sr ? ((uint64_t)1 << 32) | (uint64_t)(uint32_t)keys[t] : 0;
}

/* LD_<tag>(x): storage -> compute type; ST_<tag>(v): compute type -> storage (nearest even) */
#define LD_f32(x) (x)
#define ST_f32(v) (v)
#define LD_f64(x) (x)
#define ST_f64(v) (v)
#define LD_bf16(x) lo_bf16_to_f32(x)
#define ST_bf16(v) lo_f32_to_bf16(v)
#define LD_f16(x) ((float)(x))
#define ST_f16(v) ((lo_f16)(v))
/* R_<tag>(v): v rounded through the storage type, back in the compute type */
#define R_f32(v) (v)
#define R_f64(v) (v)
#define R_bf16(v) lo_bf16_to_f32(lo_f32_to_bf16(v))
#define R_f16(v) ((float)(lo_f16)(v))

/* p_new = p + d stored into P[i] (p already loaded, possibly modified, in the compute type):
 * Kahan-compensated when C is not NULL (C in P's type, as torch's c += d; old = p; p += c;
 * c += old - p, each result rounded), stochastically rounded when sr (a lo_sr_word; bf16),
 * nearest otherwise. */
#define LO_DEFINE_UPDATE(TAG, PT, CT)                                                   \
  static inline void lo_update_##TAG(PT *P, PT *C, int64_t i, CT p, CT d, uint64_t sr) { \
    if (C) {                                                                            \
      CT c1 = R_##TAG(LD_##TAG(C[i]) + d);                                              \
      CT p1 = R_##TAG(p + c1);                                                          \
      CT dd = R_##TAG(p - p1);                                                          \
      P[i] = ST_##TAG(p1);                                                              \
      C[i] = ST_##TAG(c1 + dd);                                                         \
    } else {                                                                            \
      LO_STORE_##TAG(P, i, p + d, sr);                                                  \
    }                                                                                   \
  }
#define LO_STORE_f32(P, i, v, sr) ((P)[i] = (v))
#define LO_STORE_f64(P, i, v, sr) ((P)[i] = (v))
#define LO_STORE_f16(P, i, v, sr) ((P)[i] = (lo_f16)(v))
#define LO_STORE_bf16(P, i, v, sr) \
  ((P)[i] = (sr) ? lo_f32_to_bf16_sr((v), (i), (uint32_t)(sr)) : lo_f32_to_bf16(v))
LO_DEFINE_UPDATE(f32, float, float)
LO_DEFINE_UPDATE(f64, double, double)
LO_DEFINE_UPDATE(bf16, lo_bf16, float)
LO_DEFINE_UPDATE(f16, lo_f16, float)

/* the same store without Kahan: P[i] = v rounded (stochastically with a nonzero lo_sr_word sr, bf16 only) */
#define LO_STORE(TAG, P, i, v, sr) LO_STORE_##TAG(P, i, v, sr)

/* Instantiate KERNEL(SUFFIX, PTAG, PT, STAG, ST, CT) for every storage combination the launcher
 * asks for: parameters and state of one type, or bf16/f16 parameters with float32 state. */
#define LO_INSTANTIATE(KERNEL)                        \
  KERNEL(f32, f32, float, f32, float, float)          \
  KERNEL(f64, f64, double, f64, double, double)       \
  KERNEL(bf16, bf16, lo_bf16, bf16, lo_bf16, float)   \
  KERNEL(f16, f16, lo_f16, f16, lo_f16, float)        \
  KERNEL(bf16_f32, bf16, lo_bf16, f32, float, float)  \
  KERNEL(f16_f32, f16, lo_f16, f32, float, float)

#define LO_SIGNATURE(NAME, SUFFIX)                                                     \
  void NAME##_##SUFFIX(int64_t n, void **ptrs, const int64_t *sizes, const double *hp, \
                       const int64_t *ip, double *out, int nthreads)

/* ---- shared by the kernels with square roots and torch's fused multiply-adds ---- */
#if defined(__AVX__) || defined(__SSE2__)
#include <immintrin.h>
#endif

/* torch's vectorized CPU kernels fuse: add(x, y, alpha) is fma(y, alpha, x), addcmul(x, a, b, value)
 * is fma(value * a, b, x); the kernels spell the same fmas out so they agree with torch's ops */
#define LO_FMA(a, b, c) _Generic((a), float: fmaf, default: fma)(a, b, c)

/* In-place correctly rounded square roots of a block (the SIMD instructions are IEEE roots, as
 * CUDA's sqrtf; torch's CPU float32 sqrt is not, see lightning_opt.optim.precision.exact_sqrt) */
static inline void lo_sqrt_f32(float *x, int64_t n) {
  int64_t i = 0;
#if defined(__AVX__)
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_sqrt_ps(_mm256_loadu_ps(x + i)));
#elif defined(__SSE2__)
  for (; i + 4 <= n; i += 4) _mm_storeu_ps(x + i, _mm_sqrt_ps(_mm_loadu_ps(x + i)));
#endif
  for (; i < n; i++) x[i] = sqrtf(x[i]);
}
static inline void lo_sqrt_f64(double *x, int64_t n) {
  int64_t i = 0;
#if defined(__AVX__)
  for (; i + 4 <= n; i += 4) _mm256_storeu_pd(x + i, _mm256_sqrt_pd(_mm256_loadu_pd(x + i)));
#elif defined(__SSE2__)
  for (; i + 2 <= n; i += 2) _mm_storeu_pd(x + i, _mm_sqrt_pd(_mm_loadu_pd(x + i)));
#endif
  for (; i < n; i++) x[i] = sqrt(x[i]);
}
#define LO_SQRT_ARRAY(x, n) _Generic((x), float *: lo_sqrt_f32, default: lo_sqrt_f64)(x, n)

/* sum of the squares of x[lo .. hi) in double, in 8 fixed lanes (lane j gets x[lo + 8q + j], the
 * tail lane 0), the lanes added pairwise: the same bits whatever the thread count or the caller */
#define LO_DEFINE_SUMSQ(TAG, PT)                                                        \
  static inline double lo_sumsq_##TAG(const PT *restrict x, int64_t lo, int64_t hi) {  \
    double s[8] = {0, 0, 0, 0, 0, 0, 0, 0};                                             \
    int64_t i = lo;                                                                     \
    for (; i + 8 <= hi; i += 8)                                                         \
      for (int j = 0; j < 8; j++) {                                                     \
        const double v = (double)LD_##TAG(x[i + j]);                                    \
        s[j] = s[j] + v * v;                                                            \
      }                                                                                 \
    for (; i < hi; i++) {                                                               \
      const double v = (double)LD_##TAG(x[i]);                                          \
      s[0] = s[0] + v * v;                                                              \
    }                                                                                   \
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));          \
  }
LO_DEFINE_SUMSQ(f32, float)
LO_DEFINE_SUMSQ(f64, double)
LO_DEFINE_SUMSQ(bf16, lo_bf16)
LO_DEFINE_SUMSQ(f16, lo_f16)

#endif
