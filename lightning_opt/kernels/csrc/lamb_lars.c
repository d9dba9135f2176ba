/* LAMB and LARS (lightning_opt.optim.lamb_lars): per-tensor trust ratios, so two passes at most:
 * the per-tensor norms (LO_TENSOR_SUMS: deterministic, thread-count independent), then the update.
 *
 * lamb: lists params, grads, exp_avgs, exp_avg_sqs, kahan_comps;
 *   hp = lr, beta1, beta2, eps, weight_decay, grad_scale, grad_weight (1 - beta1, or 1 without
 *        grad_averaging), then per tensor t: hp[7 + 2t] = bias_correction1, hp[8 + 2t] = sqrt(bias_correction2);
 *   ip = adapt, trust_clip, stochastic. Equals lamb_update_. Pass 1 (adapt only) computes the new
 *   moments and the update without storing them, to sum ||p||^2 and ||u||^2; pass 2 recomputes them
 *   from the untouched state (the reference takes u from the unrounded moments), stores them and
 *   applies the scaled update.
 *
 * lars: lists params, grads, momentum_buffers (NULL without momentum), kahan_comps;
 *   hp = lr, momentum, dampening, weight_decay, trust_coeff, eps;
 *   ip = adapt, trust_clip, nesterov, stochastic, then per tensor t: ip[4 + t] = 1 if its momentum
 *   buffer is new (buf = d, as torch SGD's first step). Equals lars_update_. */
/* Mirror torch's CPU rounding: no contraction of a*b+c into an FMA except where torch's vectorized
 * kernels use one: add_(x, alpha=a) is fma(x, a, self), addcmul_(a, b, value=c) is
 * fma(c * a, b, self); mul-then-add rounds twice. Set before common.h, so its inline stores
 * (p + d) are not contracted either. */
#pragma GCC optimize("fp-contract=off")
#include "common.h"

/* elements per block: the moments of a block are kept, its roots taken in one SIMD loop */
#define LL_BLOCK 256

/* m' and v' of elements b0 .. b0 + nb into mb and rb (rb then holds sqrt(v')) */
#define LAMB_MOMENTS(PTAG, STAG, CT)                                            \
  for (int64_t k = 0; k < nb; k++) {                                            \
    const int64_t i = b0 + k;                                                   \
    const CT g = LD_##PTAG(G[i]) * scale;                                       \
    mb[k] = LO_FMA(g, ga, LD_##STAG(M[i]) * b1);                                \
    rb[k] = LO_FMA(a2 * g, g, LD_##STAG(V[i]) * b2);                            \
  }

/* the update u of element i = b0 + K of the block (p loaded) */
#define LAMB_U(PTAG, CT, K)                                                     \
  const CT p = LD_##PTAG(P[i]);                                                 \
  CT u = (mb[K] / bc1) / (rb[K] / sbc2 + eps);                                  \
  if (wd) u = LO_FMA(p, wdc, u);

#define LAMB_KERNEL(SUFFIX, PTAG, PT, STAG, ST, CT)                             \
  LO_SIGNATURE(lamb, SUFFIX) {                                                  \
    const CT lr = (CT)hp[0], b1 = (CT)hp[1], b2 = (CT)hp[2], eps = (CT)hp[3];  \
    const CT wdc = (CT)hp[4], scale = (CT)hp[5], ga = (CT)hp[6];                \
    const CT a2 = (CT)(1.0 - hp[2]);                                            \
    const int wd = hp[4] != 0.0, adapt = (int)ip[0], clip = (int)ip[1];         \
    const int sr = (int)ip[2];                                                  \
    const double *per = hp + 7;                                                 \
    CT *ratio = (CT *)malloc(sizeof(CT) * (size_t)(n > 0 ? n : 1));             \
    for (int64_t t = 0; t < n; t++) ratio[t] = (CT)1;                           \
    (void)out;                                                                  \
    if (adapt) {                                                                \
      double *sums = (double *)malloc(sizeof(double) * 2 * (size_t)(n > 0 ? n : 1)); \
      LO_TENSOR_SUMS(n, sizes, nthreads, 2, sums, {                             \
        const PT *P = (const PT *)ptrs[t];                                      \
        const PT *G = (const PT *)ptrs[n + t];                                  \
        const ST *M = (const ST *)ptrs[2 * n + t];                              \
        const ST *V = (const ST *)ptrs[3 * n + t];                              \
        const CT bc1 = (CT)per[2 * t], sbc2 = (CT)per[2 * t + 1];               \
        /* 8 fixed lanes: vectorizable, and the same sums whatever the threads */ \
        double sp[8] = {0, 0, 0, 0, 0, 0, 0, 0}, su[8] = {0, 0, 0, 0, 0, 0, 0, 0}; \
        CT mb[LL_BLOCK], rb[LL_BLOCK];                                          \
        for (int64_t b0 = lo; b0 < hi; b0 += LL_BLOCK) {                        \
          const int64_t nb = hi - b0 < LL_BLOCK ? hi - b0 : LL_BLOCK;           \
          LAMB_MOMENTS(PTAG, STAG, CT)                                          \
          LO_SQRT_ARRAY(rb, nb);                                                \
          int64_t k = 0;                                                        \
          for (; k + 8 <= nb; k += 8)                                           \
            for (int j = 0; j < 8; j++) {                                       \
              const int64_t i = b0 + k + j;                                     \
              LAMB_U(PTAG, CT, k + j)                                           \
              sp[j] += (double)p * (double)p;                                   \
              su[j] += (double)u * (double)u;                                   \
            }                                                                   \
          for (; k < nb; k++) {                                                 \
            const int64_t i = b0 + k;                                           \
            LAMB_U(PTAG, CT, k)                                                 \
            sp[0] += (double)p * (double)p;                                     \
            su[0] += (double)u * (double)u;                                     \
          }                                                                     \
        }                                                                       \
        acc[0] = ((sp[0] + sp[1]) + (sp[2] + sp[3])) + ((sp[4] + sp[5]) + (sp[6] + sp[7])); \
        acc[1] = ((su[0] + su[1]) + (su[2] + su[3])) + ((su[4] + su[5]) + (su[6] + su[7])); \
      });                                                                       \
      for (int64_t t = 0; t < n; t++) {                                         \
        const CT w = (CT)sqrt(sums[2 * t]), un = (CT)sqrt(sums[2 * t + 1]);    \
        CT r = (w > 0 && un > 0) ? w / un : (CT)1;                              \
        if (clip && r > (CT)1) r = (CT)1;                                       \
        ratio[t] = r;                                                           \
      }                                                                         \
      free(sums);                                                               \
    }                                                                           \
    LO_FOR_CHUNKS(n, sizes, nthreads, {                                         \
      PT *P = (PT *)ptrs[t];                                                    \
      const PT *G = (const PT *)ptrs[n + t];                                    \
      ST *M = (ST *)ptrs[2 * n + t];                                            \
      ST *V = (ST *)ptrs[3 * n + t];                                            \
      PT *C = (PT *)ptrs[4 * n + t];                                            \
      const CT bc1 = (CT)per[2 * t], sbc2 = (CT)per[2 * t + 1];                 \
      const CT r = ratio[t];                                                    \
      CT mb[LL_BLOCK], rb[LL_BLOCK];                                            \
      for (int64_t b0 = lo; b0 < hi; b0 += LL_BLOCK) {                          \
        const int64_t nb = hi - b0 < LL_BLOCK ? hi - b0 : LL_BLOCK;             \
        LAMB_MOMENTS(PTAG, STAG, CT)                                            \
        for (int64_t k = 0; k < nb; k++) {                                      \
          M[b0 + k] = ST_##STAG(mb[k]);                                         \
          V[b0 + k] = ST_##STAG(rb[k]);                                         \
        }                                                                       \
        LO_SQRT_ARRAY(rb, nb);                                                  \
        for (int64_t k = 0; k < nb; k++) {                                      \
          const int64_t i = b0 + k;                                             \
          LAMB_U(PTAG, CT, k)                                                   \
          if (adapt) u = u * r;                                                 \
          lo_update_##PTAG(P, C, i, p, u * (-lr), sr);                          \
        }                                                                       \
      }                                                                         \
    });                                                                         \
    free(ratio);                                                                \
  }

LO_INSTANTIATE(LAMB_KERNEL)

#define LARS_KERNEL(SUFFIX, PTAG, PT, STAG, ST, CT)                             \
  LO_SIGNATURE(lars, SUFFIX) {                                                  \
    const CT lr = (CT)hp[0], mu = (CT)hp[1], damp = (CT)(1.0 - hp[2]);          \
    const CT wdc = (CT)hp[3], tc = (CT)hp[4], eps = (CT)hp[5];                  \
    const int wd = hp[3] != 0.0, mom = hp[1] != 0.0;                            \
    const int adapt = (int)ip[0], clip = (int)ip[1], nesterov = (int)ip[2];     \
    const int sr = (int)ip[3];                                                  \
    const int64_t *first = ip + 4;                                              \
    CT *ratio = (CT *)malloc(sizeof(CT) * (size_t)(n > 0 ? n : 1));             \
    for (int64_t t = 0; t < n; t++) ratio[t] = (CT)1;                           \
    (void)out;                                                                  \
    if (adapt) {                                                                \
      double *sums = (double *)malloc(sizeof(double) * 2 * (size_t)(n > 0 ? n : 1)); \
      LO_TENSOR_SUMS(n, sizes, nthreads, 2, sums, {                             \
        const PT *P = (const PT *)ptrs[t];                                      \
        const PT *G = (const PT *)ptrs[n + t];                                  \
        /* 8 fixed lanes: vectorizable, and the same sums whatever the threads */ \
        double sp[8] = {0, 0, 0, 0, 0, 0, 0, 0}, sg[8] = {0, 0, 0, 0, 0, 0, 0, 0}; \
        int64_t i = lo;                                                         \
        for (; i + 8 <= hi; i += 8)                                             \
          for (int j = 0; j < 8; j++) {                                         \
            const double p = (double)LD_##PTAG(P[i + j]), g = (double)LD_##PTAG(G[i + j]); \
            sp[j] += p * p;                                                     \
            sg[j] += g * g;                                                     \
          }                                                                     \
        for (; i < hi; i++) {                                                   \
          const double p = (double)LD_##PTAG(P[i]), g = (double)LD_##PTAG(G[i]); \
          sp[0] += p * p;                                                       \
          sg[0] += g * g;                                                       \
        }                                                                       \
        acc[0] = ((sp[0] + sp[1]) + (sp[2] + sp[3])) + ((sp[4] + sp[5]) + (sp[6] + sp[7])); \
        acc[1] = ((sg[0] + sg[1]) + (sg[2] + sg[3])) + ((sg[4] + sg[5]) + (sg[6] + sg[7])); \
      });                                                                       \
      for (int64_t t = 0; t < n; t++) {                                         \
        const CT w = (CT)sqrt(sums[2 * t]), gn = (CT)sqrt(sums[2 * t + 1]);    \
        CT r = (w > 0 && gn > 0) ? (tc * w) / (gn + wdc * w + eps) : (CT)1;     \
        if (clip) {                                                             \
          if (hp[0] > 0.0) {                                                    \
            r = r / lr;                                                         \
            if (r > (CT)1) r = (CT)1;                                           \
          } else {                                                              \
            r = (CT)1;                                                          \
          }                                                                     \
        }                                                                       \
        ratio[t] = r;                                                           \
      }                                                                         \
      free(sums);                                                               \
    }                                                                           \
    LO_FOR_CHUNKS(n, sizes, nthreads, {                                         \
      PT *P = (PT *)ptrs[t];                                                    \
      const PT *G = (const PT *)ptrs[n + t];                                    \
      ST *B = (ST *)ptrs[2 * n + t];                                            \
      PT *C = (PT *)ptrs[3 * n + t];                                            \
      const CT r = ratio[t];                                                    \
      const int fresh = (int)first[t];                                          \
      for (int64_t i = lo; i < hi; i++) {                                       \
        const CT p = LD_##PTAG(P[i]);                                           \
        CT d = LD_##PTAG(G[i]);                                                 \
        if (wd) d = LO_FMA(p, wdc, d);                                          \
        if (adapt) d = d * r;                                                   \
        if (mom) {                                                              \
          CT buf;                                                               \
          if (fresh) {                                                          \
            buf = d;                                                            \
          } else {                                                              \
            buf = LO_FMA(d, damp, LD_##STAG(B[i]) * mu);                        \
          }                                                                     \
          B[i] = ST_##STAG(buf);                                                \
          d = nesterov ? LO_FMA(buf, mu, d) : buf;                              \
        }                                                                       \
        lo_update_##PTAG(P, C, i, p, d * (-lr), sr);                            \
      }                                                                         \
    });                                                                         \
    free(ratio);                                                                \
  }

LO_INSTANTIATE(LARS_KERNEL)
