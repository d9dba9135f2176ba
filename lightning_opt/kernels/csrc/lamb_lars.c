/* LAMB and LARS (lightning_opt.optim.lamb_lars): per-tensor trust ratios, so two passes at most:
 * the per-tensor norms (LO_TENSOR_SUMS_IN: deterministic, thread-count independent), then the
 * update, one cache group of tensors at a time (LO_FOR_GROUPS, common.h: the second pass re-reads
 * what the first touched from the cache).
 *
 * lamb: lists params, grads, exp_avgs, exp_avg_sqs, kahan_comps;
 *   hp = lr, beta1, beta2, eps, weight_decay, grad_scale, grad_weight (1 - beta1, or 1 without
 *        grad_averaging), then per tensor t: hp[7 + 2t] = k = sqrt(bc2) / bc1, hp[8 + 2t] = eps_q =
 *        eps sqrt(bc2) (lamb_scalars: u = (m' k) / (sqrt(v') + eps_q), one division per element);
 *   ip = adapt, trust_clip, stochastic, then with stochastic per tensor t its seed key ip[3 + t]
 *   (common.h). Equals lamb_update_ (the same roundings). Pass 1 (adapt
 *   only) sums ||p||^2 and ||u||^2; pass 2 applies the scaled update. With float32/float64 state
 *   pass 1 stores the moments and pass 2 reads them; with bf16/f16 state (stores that round) pass 2
 *   recomputes them from the untouched state (the reference takes u from the unrounded moments)
 *   and stores them.
 *
 * lars: lists params, grads, momentum_buffers (NULL without momentum), kahan_comps;
 *   hp = lr, momentum, dampening, weight_decay, trust_coeff, eps;
 *   ip = adapt, trust_clip, nesterov, stochastic, then per tensor t: ip[4 + t] = 1 if its momentum
 *   buffer is new (buf = d, as torch SGD's first step), then with stochastic per tensor t its seed
 *   key ip[4 + n + t] (common.h). Equals lars_update_ (the same roundings).
 *
 * Speed: one loop per element and pass, the options decided outside the loops (weight decay,
 * momentum, the store), so every loop vectorizes; the float64 norm sums keep 8 fixed lanes (lane j
 * gets the elements 8q + j of the chunk, the tail of the chunk lane 0). */
/* Mirror torch's CPU rounding: no contraction of a*b+c into an FMA except where torch's vectorized
 * kernels use one: add_(x, alpha=a) is fma(x, a, self), addcmul_(a, b, value=c) is
 * fma(c * a, b, self); mul-then-add rounds twice. Set before common.h, so its inline stores
 * (p + d) are not contracted either. */
#pragma GCC optimize("fp-contract=off")
#include "common.h"

#define LL_SQRT(x) _Generic((x), float: sqrtf, default: sqrt)(x)

/* sums of A^2, B^2 over the chunk lo .. hi (A, B: expressions of the element index ii, computed
 * by the statements BODY) in 8 fixed lanes, lane (i - lo) % 8, the chunk's tail into lane 0 */
#define LL_SUMS2_LOOP(CT, A, B, BODY)                                           \
  {                                                                             \
    double sa[8] = {0, 0, 0, 0, 0, 0, 0, 0}, sb[8] = {0, 0, 0, 0, 0, 0, 0, 0};  \
    int64_t i = lo;                                                             \
    for (; i + 8 <= hi; i += 8)                                                 \
      for (int j = 0; j < 8; j++) {                                             \
        const int64_t ii = i + j;                                               \
        BODY                                                                    \
        sa[j] += (double)(A) * (double)(A);                                     \
        sb[j] += (double)(B) * (double)(B);                                     \
      }                                                                         \
    for (; i < hi; i++) {                                                       \
      const int64_t ii = i;                                                     \
      BODY                                                                      \
      sa[0] += (double)(A) * (double)(A);                                       \
      sb[0] += (double)(B) * (double)(B);                                       \
    }                                                                           \
    acc[0] = ((sa[0] + sa[1]) + (sa[2] + sa[3])) + ((sa[4] + sa[5]) + (sa[6] + sa[7])); \
    acc[1] = ((sb[0] + sb[1]) + (sb[2] + sb[3])) + ((sb[4] + sb[5]) + (sb[6] + sb[7])); \
  }

/* LOOP(..., STORE) with the store of p + d into P[ii] by mode: Kahan-compensated (C),
 * stochastic (sr, the tensor's lo_sr_word), nearest */
#define LL_STORE_LOOP(PTAG, LOOP, ...)                                          \
  if (C) {                                                                      \
    LOOP(__VA_ARGS__, lo_update_##PTAG(P, C, ii, p, d, sr))                     \
  } else if (sr) {                                                              \
    LOOP(__VA_ARGS__, LO_STORE(PTAG, P, ii, p + d, sr))                         \
  } else {                                                                      \
    LOOP(__VA_ARGS__, LO_STORE(PTAG, P, ii, p + d, 0))                          \
  }

/* ---- LAMB ---- */

/* m', v' of element ii (from the gradient and the stored moments), stored when STORE */
#define LAMB_MOMENTS(PTAG, STAG, CT, STORE)                                     \
  const CT g = LD_##PTAG(G[ii]) * scale;                                        \
  const CT m = LO_FMA(g, ga, LD_##STAG(M[ii]) * b1);                            \
  const CT v = LO_FMA(a2 * g, g, LD_##STAG(V[ii]) * b2);                        \
  if (STORE) {                                                                  \
    M[ii] = ST_##STAG(m);                                                       \
    V[ii] = ST_##STAG(v);                                                       \
  }
/* u of element ii, with weight decay when WD */
#define LAMB_U(CT, WD) CT u = (m * kq) / (LL_SQRT(v) + epsq); if (WD) u = LO_FMA(p, wdc, u);

/* pass 1 over a chunk: the moments (stored with float32/float64 state), sums of p^2 and u^2 */
#define LAMB_SUMS(PTAG, STAG, CT, KEEP, WD)                                     \
  LL_SUMS2_LOOP(CT, p, u,                                                       \
                LAMB_MOMENTS(PTAG, STAG, CT, KEEP)                              \
                const CT p = LD_##PTAG(P[ii]);                                  \
                LAMB_U(CT, WD))

/* pass 2 over a chunk: the moments (READ: those pass 1 stored), p += -lr * (r * u) */
#define LAMB_APPLY_ELEM(PTAG, STAG, CT, READ, WD, STORE)                        \
  for (int64_t ii = lo; ii < hi; ii++) {                                        \
    LAMB_APPLY_MOMENTS_##READ(PTAG, STAG, CT)                                   \
    const CT p = LD_##PTAG(P[ii]);                                              \
    LAMB_U(CT, WD)                                                              \
    const CT d = (u * r) * (-lr);                                               \
    STORE;                                                                      \
  }
#define LAMB_APPLY_MOMENTS_1(PTAG, STAG, CT) const CT m = LD_##STAG(M[ii]), v = LD_##STAG(V[ii]);
#define LAMB_APPLY_MOMENTS_0(PTAG, STAG, CT) LAMB_MOMENTS(PTAG, STAG, CT, 1)

#define LAMB_KERNEL(SUFFIX, PTAG, PT, STAG, ST, CT)                             \
  static void lamb_sums_##SUFFIX(int wd, CT b1, CT b2, CT a2, CT ga, CT scale, CT kq, CT epsq, \
                                 CT wdc, const PT *restrict P, const PT *restrict G, \
                                 ST *restrict M, ST *restrict V, int64_t lo, int64_t hi, \
                                 double *acc) {                                 \
    /* float32 / float64 state of the compute type: pass 1 stores the moments */ \
    enum { KEEP = sizeof(ST) == sizeof(CT) };                                   \
    if (wd) {                                                                   \
      LAMB_SUMS(PTAG, STAG, CT, KEEP, 1)                                        \
    } else {                                                                    \
      LAMB_SUMS(PTAG, STAG, CT, KEEP, 0)                                        \
    }                                                                           \
  }                                                                             \
  static void lamb_apply_##SUFFIX(int wd, int read, uint64_t sr, CT b1, CT b2, CT a2, CT ga, \
                                  CT scale, CT kq, CT epsq, CT wdc, CT lr, CT r, \
                                  PT *restrict P, const PT *restrict G, ST *restrict M, \
                                  ST *restrict V, PT *restrict C, int64_t lo, int64_t hi) { \
    if (read && wd) {                                                           \
      LL_STORE_LOOP(PTAG, LAMB_APPLY_ELEM, PTAG, STAG, CT, 1, 1)                                      \
    } else if (read) {                                                          \
      LL_STORE_LOOP(PTAG, LAMB_APPLY_ELEM, PTAG, STAG, CT, 1, 0)                                      \
    } else if (wd) {                                                            \
      LL_STORE_LOOP(PTAG, LAMB_APPLY_ELEM, PTAG, STAG, CT, 0, 1)                                      \
    } else {                                                                    \
      LL_STORE_LOOP(PTAG, LAMB_APPLY_ELEM, PTAG, STAG, CT, 0, 0)                                      \
    }                                                                           \
  }                                                                             \
  LO_SIGNATURE(lamb, SUFFIX) {                                                  \
    const CT lr = (CT)hp[0], b1 = (CT)hp[1], b2 = (CT)hp[2];                    \
    const CT wdc = (CT)hp[4], scale = (CT)hp[5], ga = (CT)hp[6];                \
    const CT a2 = (CT)(1.0 - hp[2]);                                            \
    const int wd = hp[4] != 0.0, adapt = (int)ip[0], clip = (int)ip[1];         \
    const int sr = (int)ip[2];                                                  \
    const int read = adapt && sizeof(ST) == sizeof(CT);                         \
    const double *per = hp + 7;                                                 \
    const size_t nn = (size_t)(n > 0 ? n : 1);                                  \
    CT *ratio = (CT *)malloc(sizeof(CT) * nn), *kq = (CT *)malloc(sizeof(CT) * nn); \
    CT *epsq = (CT *)malloc(sizeof(CT) * nn);                                   \
    double *sums = (double *)malloc(sizeof(double) * 2 * nn);                   \
    for (int64_t t = 0; t < n; t++) {                                           \
      ratio[t] = (CT)1;                                                         \
      kq[t] = (CT)per[2 * t];                                                   \
      epsq[t] = (CT)per[2 * t + 1];                                             \
    }                                                                           \
    (void)out;                                                                  \
    LO_FOR_GROUPS(n, sizes, (int64_t)sizeof(PT), t0, t1) {                      \
      if (adapt) {                                                              \
        LO_TENSOR_SUMS_IN(t0, t1, 1, sizes, nthreads, 2, sums, {                \
          lamb_sums_##SUFFIX(wd, b1, b2, a2, ga, scale, kq[t], epsq[t], wdc, (const PT *)ptrs[t], \
                             (const PT *)ptrs[n + t], (ST *)ptrs[2 * n + t], (ST *)ptrs[3 * n + t], \
                             lo, hi, acc);                                      \
        });                                                                     \
        for (int64_t t = t0; t < t1; t++) {                                     \
          const CT w = (CT)sqrt(sums[2 * t]), un = (CT)sqrt(sums[2 * t + 1]);  \
          CT r = (w > 0 && un > 0) ? w / un : (CT)1;                            \
          if (clip && r > (CT)1) r = (CT)1;                                     \
          ratio[t] = r;                                                         \
        }                                                                       \
      }                                                                         \
      LO_FOR_CHUNKS_IN(t0, t1, 0, sizes, nthreads, {                            \
        lamb_apply_##SUFFIX(wd, read, lo_sr_word(sr, ip + 3, t), b1, b2, a2, ga, scale, kq[t], epsq[t], wdc, lr, ratio[t], \
                            (PT *)ptrs[t], (const PT *)ptrs[n + t], (ST *)ptrs[2 * n + t], \
                            (ST *)ptrs[3 * n + t], (PT *)ptrs[4 * n + t], lo, hi); \
      });                                                                       \
    }                                                                           \
    free(sums);                                                                 \
    free(ratio);                                                                \
    free(kq);                                                                   \
    free(epsq);                                                                 \
  }

LO_INSTANTIATE(LAMB_KERNEL)

/* ---- LARS ---- */

/* the update of a chunk: d = (g + wd p) r, through the momentum (buf = d on its first step,
 * nesterov d + mu buf), p += -lr d */
#define LARS_APPLY_ELEM(PTAG, STAG, CT, WD, MOM, STORE)                         \
  for (int64_t ii = lo; ii < hi; ii++) {                                        \
    const CT p = LD_##PTAG(P[ii]);                                              \
    CT d = LD_##PTAG(G[ii]);                                                    \
    if (WD) d = LO_FMA(p, wdc, d);                                              \
    d = d * r;                                                                  \
    if (MOM) {                                                                  \
      const CT bn = LO_FMA(d, damp, LD_##STAG(B[ii]) * mu);                     \
      const CT b = fresh ? d : bn;                                              \
      B[ii] = ST_##STAG(b);                                                     \
      const CT dn = LO_FMA(b, mu, d);                                           \
      d = nesterov ? dn : b;                                                    \
    }                                                                           \
    d = d * (-lr);                                                              \
    STORE;                                                                      \
  }

#define LARS_KERNEL(SUFFIX, PTAG, PT, STAG, ST, CT)                             \
  static void lars_sums_##SUFFIX(const PT *restrict P, const PT *restrict G, int64_t lo, \
                                 int64_t hi, double *acc) {                     \
    LL_SUMS2_LOOP(CT, p, g, const CT p = LD_##PTAG(P[ii]); const CT g = LD_##PTAG(G[ii]);) \
  }                                                                             \
  static void lars_apply_##SUFFIX(int wd, int fresh, int nesterov, uint64_t sr, CT lr, CT mu, CT damp, \
                                  CT wdc, CT r, PT *restrict P, const PT *restrict G, \
                                  ST *restrict B, PT *restrict C, int64_t lo, int64_t hi) { \
    if (B && wd) {                                                              \
      LL_STORE_LOOP(PTAG, LARS_APPLY_ELEM, PTAG, STAG, CT, 1, 1)                \
    } else if (B) {                                                             \
      LL_STORE_LOOP(PTAG, LARS_APPLY_ELEM, PTAG, STAG, CT, 0, 1)                \
    } else if (wd) {                                                            \
      LL_STORE_LOOP(PTAG, LARS_APPLY_ELEM, PTAG, STAG, CT, 1, 0)                \
    } else {                                                                    \
      LL_STORE_LOOP(PTAG, LARS_APPLY_ELEM, PTAG, STAG, CT, 0, 0)                \
    }                                                                           \
  }                                                                             \
  LO_SIGNATURE(lars, SUFFIX) {                                                  \
    const CT lr = (CT)hp[0], mu = (CT)hp[1], damp = (CT)(1.0 - hp[2]);          \
    const CT wdc = (CT)hp[3], tc = (CT)hp[4], eps = (CT)hp[5];                  \
    const int wd = hp[3] != 0.0, mom = hp[1] != 0.0;                            \
    const int adapt = (int)ip[0], clip = (int)ip[1], nesterov = (int)ip[2];     \
    const int sr = (int)ip[3];                                                  \
    const int64_t *first = ip + 4;                                              \
    const size_t nn = (size_t)(n > 0 ? n : 1);                                  \
    CT *ratio = (CT *)malloc(sizeof(CT) * nn);                                  \
    double *sums = (double *)malloc(sizeof(double) * 2 * nn);                   \
    for (int64_t t = 0; t < n; t++) ratio[t] = (CT)1;                           \
    (void)out;                                                                  \
    LO_FOR_GROUPS(n, sizes, (int64_t)sizeof(PT), t0, t1) {                      \
      if (adapt) {                                                              \
        LO_TENSOR_SUMS_IN(t0, t1, 1, sizes, nthreads, 2, sums, {                \
          lars_sums_##SUFFIX((const PT *)ptrs[t], (const PT *)ptrs[n + t], lo, hi, acc); \
        });                                                                     \
        for (int64_t t = t0; t < t1; t++) {                                     \
          const CT w = (CT)sqrt(sums[2 * t]), gn = (CT)sqrt(sums[2 * t + 1]);  \
          CT r = (w > 0 && gn > 0) ? (tc * w) / (gn + wdc * w + eps) : (CT)1;   \
          if (clip) {                                                           \
            if (hp[0] > 0.0) {                                                  \
              r = r / lr;                                                       \
              if (r > (CT)1) r = (CT)1;                                         \
            } else {                                                            \
              r = (CT)1;                                                        \
            }                                                                   \
          }                                                                     \
          ratio[t] = r;                                                         \
        }                                                                       \
      }                                                                         \
      LO_FOR_CHUNKS_IN(t0, t1, 0, sizes, nthreads, {                            \
        lars_apply_##SUFFIX(wd, (int)first[t], nesterov, lo_sr_word(sr, ip + 4 + n, t), lr, mu, damp, wdc, ratio[t], \
                            (PT *)ptrs[t], (const PT *)ptrs[n + t],             \
                            mom ? (ST *)ptrs[2 * n + t] : NULL, (PT *)ptrs[3 * n + t], lo, hi); \
      });                                                                       \
    }                                                                           \
    free(sums);                                                                 \
    free(ratio);                                                                \
  }

LO_INSTANTIATE(LARS_KERNEL)
