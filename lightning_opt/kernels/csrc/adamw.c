/* The AdamW side of the hybrid optimizers (lightning_opt.optim._hybrid.adamw_side): lists params,
 * grads, exp_avgs, exp_avg_sqs; hp = lr, beta1, beta2, eps, weight_decay, then two doubles per
 * tensor t: hp[5 + 2t] = lr / (1 - beta1^step_t), hp[6 + 2t] = sqrt(1 - beta2^step_t) (each tensor
 * has its own step count); no ip. Equals optim.base.adamw_update_ op for op:
 *   m = lerp(m, g, 1 - b1)        (torch's CPU lerp: one fma, w < 0.5 ? m + w (g - m) : g + (w - 1) (g - m))
 *   v = v b2 + ((1 - b2) g) g     (mul_, then addcmul_)
 *   d = sqrt(v) / sqrt(bc2) + eps
 *   p = p (1 - lr wd)             (only when wd != 0)
 *   p = p + (-lr / bc1) (m / d)   (addcdiv_), stored once (nearest even for bf16/f16)
 * Contraction into fma is off so the other products round as torch's do. */
#pragma GCC optimize("fp-contract=off")
#include "common.h"

#define LO_FMA_f32(a, b, c) fmaf((a), (b), (c))
#define LO_FMA_f64(a, b, c) fma((a), (b), (c))
#define LO_FMA_bf16(a, b, c) fmaf((a), (b), (c))
#define LO_FMA_f16(a, b, c) fmaf((a), (b), (c))
#define LO_SQRT_f32(x) sqrtf(x)
#define LO_SQRT_f64(x) sqrt(x)
#define LO_SQRT_bf16(x) sqrtf(x)
#define LO_SQRT_f16(x) sqrtf(x)

#define ADAMW_KERNEL(SUFFIX, PTAG, PT, STAG, ST, CT)                            \
  LO_SIGNATURE(adamw, SUFFIX) {                                                 \
    const CT b2 = (CT)hp[2], eps = (CT)hp[3];                                   \
    const CT w1 = (CT)(1.0 - hp[1]), a2 = (CT)(1.0 - hp[2]);                    \
    const CT decay = (CT)(1.0 - hp[0] * hp[4]);                                 \
    const int wd = hp[4] != 0.0, small = fabs(1.0 - hp[1]) < 0.5;               \
    const CT coeff = small ? w1 : w1 - (CT)1;                                   \
    (void)ip;                                                                   \
    (void)out;                                                                  \
    LO_FOR_CHUNKS(n, sizes, nthreads, {                                         \
      PT *P = (PT *)ptrs[t];                                                    \
      const PT *G = (const PT *)ptrs[n + t];                                    \
      ST *M = (ST *)ptrs[2 * n + t];                                            \
      ST *V = (ST *)ptrs[3 * n + t];                                            \
      const CT step = -(CT)hp[5 + 2 * t], sb2 = (CT)hp[6 + 2 * t];              \
      for (int64_t i = lo; i < hi; i++) {                                       \
        CT g = LD_##PTAG(G[i]), m = LD_##STAG(M[i]), v = LD_##STAG(V[i]);       \
        m = LO_FMA_##PTAG(coeff, g - m, small ? m : g);                         \
        v = v * b2;                                                             \
        v = v + a2 * g * g;                                                     \
        M[i] = ST_##STAG(m);                                                    \
        V[i] = ST_##STAG(v);                                                    \
        m = LD_##STAG(M[i]);                                                    \
        v = LD_##STAG(V[i]);                                                    \
        CT d = LO_SQRT_##PTAG(v) / sb2 + eps;                                   \
        CT p = LD_##PTAG(P[i]);                                                 \
        if (wd) p = p * decay;                                                  \
        p = p + step * (m / d);                                                 \
        LO_STORE(PTAG, P, i, p, 0);                                             \
      }                                                                         \
    });                                                                         \
  }

LO_INSTANTIATE(ADAMW_KERNEL)
