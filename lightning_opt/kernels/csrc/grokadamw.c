/* GrokAdamW (lightning_opt.optim.grokadamw): lists params, grads, exp_avgs, exp_avg_sqs, grok_emas,
 * kahan_comps; hp = lr, beta2, eps, weight_decay, alpha, lamb, gradient_clipping, then per tensor t:
 * hp[7 + 2t] = its layer beta1, hp[8 + 2t] = its step size lr sqrt(1 - beta2^t) / (1 - beta1^t);
 * ip = stochastic rounding (0/1), then with it per tensor t its seed key ip[1 + t] (common.h).
 * Equals grokadamw_update_: with gradient_clipping > 0, pass 1 sums
 * ||g||^2 per tensor (lo_sumsq, LO_TENSOR_SUMS_IN: deterministic), pass 2 is the update, one
 * cache group of tensors at a time (LO_FOR_GROUPS). */
/* Mirror torch's CPU rounding: in its vectorized kernels add_(x, alpha=a) is fma(x, a, self) and
 * addcmul_(a, b, value=c) is fma(c * a, b, self); every other product and sum rounds on its own.
 * Set before common.h, so its inline stores (p + d) are not contracted either. */
#pragma GCC optimize("fp-contract=off")
#include "common.h"

/* elements per block: the moments of a block are kept, its roots taken in one SIMD loop */
#define GA_BLOCK 256

/* torch.nn.utils.clip_grad_norm_'s 1e-6, as the reference */
#define GROK_CLIP_EPS 1e-6

#define GROK_KERNEL(SUFFIX, PTAG, PT, STAG, ST, CT)                             \
  LO_SIGNATURE(grokadamw, SUFFIX) {                                             \
    const CT b2 = (CT)hp[1], a2 = (CT)(1.0 - hp[1]), eps = (CT)hp[2];           \
    const CT decay = (CT)(1.0 - hp[0] * hp[3]);                                 \
    const CT alpha = (CT)hp[4], a_e = (CT)(1.0 - hp[4]), lamb = (CT)hp[5];      \
    const CT clipv = (CT)hp[6];                                                 \
    const int wd = hp[3] != 0.0, clip = hp[6] > 0.0, sr = (int)ip[0];           \
    const double *per = hp + 7;                                                 \
    CT *factor = (CT *)malloc(sizeof(CT) * (size_t)(n > 0 ? n : 1));            \
    for (int64_t t = 0; t < n; t++) factor[t] = (CT)1;                          \
    (void)out;                                                                  \
    double *sums = (double *)malloc(sizeof(double) * (size_t)(n > 0 ? n : 1));  \
    /* cache groups (common.h): the update re-reads g from the cache */         \
    LO_FOR_GROUPS(n, sizes, (int64_t)sizeof(PT), t0, t1) {                      \
      if (clip) {                                                               \
        LO_TENSOR_SUMS_IN(t0, t1, 1, sizes, nthreads, 1, sums, {                \
          acc[0] = lo_sumsq_##PTAG((const PT *)ptrs[n + t], lo, hi);            \
        });                                                                     \
        for (int64_t t = t0; t < t1; t++) {                                     \
          /* clip / (norm + 1e-6) is torch's reciprocal(norm + 1e-6) * clip */  \
          const CT norm = (CT)sqrt(sums[t]);                                    \
          CT f = ((CT)1 / (norm + (CT)GROK_CLIP_EPS)) * clipv;                  \
          factor[t] = f > (CT)1 ? (CT)1 : f;                                    \
        }                                                                       \
      }                                                                         \
      LO_FOR_CHUNKS_IN(t0, t1, 0, sizes, nthreads, {                            \
        PT *P = (PT *)ptrs[t];                                                  \
        const PT *G = (const PT *)ptrs[n + t];                                  \
        ST *M = (ST *)ptrs[2 * n + t];                                          \
        ST *V = (ST *)ptrs[3 * n + t];                                          \
        ST *E = (ST *)ptrs[4 * n + t];                                          \
        PT *C = (PT *)ptrs[5 * n + t];                                          \
        const CT b1 = (CT)per[2 * t], a1 = (CT)(1.0 - per[2 * t]);              \
        const CT step = (CT)per[2 * t + 1], f = factor[t];                      \
        const uint64_t srw = lo_sr_word(sr, ip + 1, t);                         \
        CT mb[GA_BLOCK], rb[GA_BLOCK];                                          \
        for (int64_t b0 = lo; b0 < hi; b0 += GA_BLOCK) {                        \
          const int64_t nb = hi - b0 < GA_BLOCK ? hi - b0 : GA_BLOCK;           \
          for (int64_t k = 0; k < nb; k++) {                                    \
            const int64_t i = b0 + k;                                           \
            CT g = LD_##PTAG(G[i]);                                             \
            if (clip) g = g * f;                                                \
            const CT e = LO_FMA(g, a_e, LD_##STAG(E[i]) * alpha);               \
            const CT h = LO_FMA(e, lamb, g);                                    \
            const CT m = LO_FMA(h, a1, LD_##STAG(M[i]) * b1);                   \
            const CT v = LO_FMA(a2 * h, h, LD_##STAG(V[i]) * b2);               \
            M[i] = ST_##STAG(m);                                                \
            V[i] = ST_##STAG(v);                                                \
            E[i] = ST_##STAG(e);                                                \
            mb[k] = m;                                                          \
            rb[k] = v;                                                          \
          }                                                                     \
          LO_SQRT_ARRAY(rb, nb);                                                \
          for (int64_t k = 0; k < nb; k++) {                                    \
            const int64_t i = b0 + k;                                           \
            CT p = LD_##PTAG(P[i]);                                             \
            if (wd) p = R_##PTAG(p * decay);                                    \
            lo_update_##PTAG(P, C, i, p, (mb[k] / (rb[k] + eps)) * (-step), srw);\
          }                                                                     \
        }                                                                       \
      });                                                                       \
    }                                                                           \
    free(sums);                                                                 \
    free(factor);                                                               \
  }

LO_INSTANTIATE(GROK_KERNEL)
