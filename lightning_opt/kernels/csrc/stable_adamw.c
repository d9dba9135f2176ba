/* StableAdamW (lightning_opt.optim.stable_adamw): lists params, grads, exp_avgs, exp_avg_sqs, kahan_comps;
 * hp = lr, eps, weight_decay, max_lr, then per tensor t the debiased betas hp[4 + 2t] (beta1) and
 * hp[5 + 2t] (beta2) (a tensor's step count is its own); ip = stochastic rounding (0/1), decouple_lr
 * (0/1), then with stochastic rounding per tensor t its seed key ip[2 + t] (common.h); out[t] =
 * tensor t's clipped lr. Equals stable_adamw_update_.
 *
 * Two passes. The first computes each tensor's RMS = sqrt(mean(g^2 / max(v', eps^2))) with v' the
 * updated second moment, recomputed from the stored v (nothing is written), summed per chunk and
 * then in chunk order (LO_TENSOR_SUMS: deterministic, thread-count independent). The second
 * recomputes m' and v' the same way, stores them and applies the update: the step uses the
 * unrounded m', v' as the reference does for bf16 state. */
#include "common.h"

#define SA_SQRT(x) _Generic((x), float: sqrtf, default: sqrt)(x)


/* elements per sub-block of the apply pass: m' and the roots of v' wait in buffers on the stack */
#define SA_BLOCK 1024

/* the apply pass over one chunk, for a constant weight-decay switch WD (a branch inside the loop
 * would keep it from vectorizing) */
#define SA_APPLY(PTAG, STAG, CT, WD)                                        \
  for (int64_t b = lo; b < hi; b += SA_BLOCK) {                             \
    const int64_t e = b + SA_BLOCK < hi ? b + SA_BLOCK : hi;                \
    CT mq[SA_BLOCK], rq[SA_BLOCK];                                          \
    for (int64_t i = b; i < e; i++) {                                       \
      CT g = LD_##PTAG(G[i]);                                               \
      CT m = LO_FMA(g, a1, LD_##STAG(M[i]) * b1);                           \
      CT v = LO_FMA(a2 * g, g, LD_##STAG(V[i]) * b2);                       \
      M[i] = ST_##STAG(m);                                                  \
      V[i] = ST_##STAG(v);                                                  \
      mq[i - b] = m;                                                        \
      rq[i - b] = v;                                                        \
    }                                                                       \
    LO_SQRT_ARRAY(rq, e - b);                                               \
    for (int64_t i = b; i < e; i++) {                                       \
      CT p = LD_##PTAG(P[i]);                                               \
      if (WD) p = R_##PTAG(p * dec);                                        \
      lo_update_##PTAG(P, C, i, p, (mq[i - b] / (rq[i - b] + eps)) * neg_lr, srw); \
    }                                                                       \
  }

#define SADAMW_KERNEL(SUFFIX, PTAG, PT, STAG, ST, CT)                                          \
  static void sa_apply_##SUFFIX(int wd, CT b1, CT a1, CT b2, CT a2, CT eps, CT neg_lr, CT dec,  \
                                uint64_t srw, PT *restrict P, const PT *restrict G, ST *restrict M,   \
                                ST *restrict V, PT *restrict C, int64_t lo, int64_t hi) {       \
    if (wd) {                                                                                   \
      SA_APPLY(PTAG, STAG, CT, 1)                                                               \
    } else {                                                                                    \
      SA_APPLY(PTAG, STAG, CT, 0)                                                               \
    }                                                                                           \
  }                                                                                             \
  LO_SIGNATURE(stable_adamw, SUFFIX) {                                                          \
    const CT eps = (CT)hp[1], eps2 = (CT)(hp[1] * hp[1]), wdc = (CT)hp[2], max_lr = (CT)hp[3];  \
    const int wd = hp[2] != 0.0, sr = (int)ip[0], decouple = (int)ip[1];                        \
    const size_t nn = (size_t)(n > 0 ? n : 1);                                                  \
    double *sums = (double *)malloc(sizeof(double) * nn);                                       \
    CT *lr_t = (CT *)malloc(sizeof(CT) * nn), *decay = (CT *)malloc(sizeof(CT) * nn);           \
    /* cache groups (common.h): the update re-reads g and v from the cache */                   \
    LO_FOR_GROUPS(n, sizes, (int64_t)sizeof(PT), t0, t1) {                                      \
      LO_TENSOR_SUMS_IN(t0, t1, 1, sizes, nthreads, 1, sums, {                                  \
        const PT *G = (const PT *)ptrs[n + t];                                                  \
        const ST *V = (const ST *)ptrs[3 * n + t];                                              \
        const CT b2 = (CT)hp[5 + 2 * t], a2 = (CT)(1.0 - hp[5 + 2 * t]);                        \
        double s[8] = {0, 0, 0, 0, 0, 0, 0, 0};                                                 \
        int64_t i = lo;                                                                         \
        for (; i + 8 <= hi; i += 8)                                                             \
          for (int j = 0; j < 8; j++) {                                                         \
            CT g = LD_##PTAG(G[i + j]);                                                         \
            CT v = LO_FMA(a2 * g, g, LD_##STAG(V[i + j]) * b2);                                 \
            s[j] += (double)((g * g) / (v < eps2 ? eps2 : v));                                  \
          }                                                                                     \
        for (; i < hi; i++) {                                                                   \
          CT g = LD_##PTAG(G[i]);                                                               \
          CT v = LO_FMA(a2 * g, g, LD_##STAG(V[i]) * b2);                                       \
          s[0] += (double)((g * g) / (v < eps2 ? eps2 : v));                                    \
        }                                                                                       \
        acc[0] = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));             \
      });                                                                                       \
      for (int64_t t = t0; t < t1; t++) {                                                       \
        CT rms = SA_SQRT((CT)(sums[t] / (double)sizes[t]));                                     \
        if (rms < (CT)1) rms = (CT)1; /* clamp(min=1): NaN stays NaN */                         \
        lr_t[t] = ((CT)1 / rms) * (CT)hp[0]; /* lr / rms is reciprocal(rms) * lr in torch */    \
        const CT scale = decouple ? lr_t[t] / max_lr : lr_t[t];                                 \
        decay[t] = (CT)1 - scale * wdc;                                                         \
        out[t] = (double)lr_t[t];                                                               \
      }                                                                                         \
      LO_FOR_CHUNKS_IN(t0, t1, 0, sizes, nthreads, {                                            \
        sa_apply_##SUFFIX(wd, (CT)hp[4 + 2 * t], (CT)(1.0 - hp[4 + 2 * t]), (CT)hp[5 + 2 * t],  \
                          (CT)(1.0 - hp[5 + 2 * t]), eps, -lr_t[t], decay[t],          \
                          lo_sr_word(sr, ip + 2, t), (PT *)ptrs[t],                     \
                          (const PT *)ptrs[n + t], (ST *)ptrs[2 * n + t], (ST *)ptrs[3 * n + t],\
                          (PT *)ptrs[4 * n + t], lo, hi);                                       \
      });                                                                                       \
    }                                                                                           \
    free(sums);                                                                                 \
    free(lr_t);                                                                                 \
    free(decay);                                                                                \
  }

LO_INSTANTIATE(SADAMW_KERNEL)
