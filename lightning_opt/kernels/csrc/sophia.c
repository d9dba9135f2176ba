/* Sophia's step (lightning_opt.optim.sophia): lists params, grads, exp_avgs, hessians, kahan_comps;
 * hp = lr, beta1, scale (rho * bs for SophiaG, rho for SophiaH), eps, weight_decay; ip = stochastic
 * rounding (0/1), then with it per tensor t its seed key ip[1 + t] (common.h). Equals sophia_update_ (the Hessian EMA refresh stays in torch, per tensor). */
/* Mirror torch's CPU rounding: add_(x, alpha=a) is one FMA in its vectorized kernels, every other
 * product and sum rounds on its own.
 * Set before common.h, so its inline stores (p + d) are not contracted either. */
#pragma GCC optimize("fp-contract=off")
#include "common.h"

#define LO_FMA(a, b, c) _Generic((a), float: fmaf, default: fma)(a, b, c)
#define LO_ABS(x) _Generic((x), float: fabsf, default: fabs)(x)

#define SOPHIA_KERNEL(SUFFIX, PTAG, PT, STAG, ST, CT)                           \
  LO_SIGNATURE(sophia, SUFFIX) {                                                \
    const CT lr = (CT)hp[0], b1 = (CT)hp[1], a1 = (CT)(1.0 - hp[1]);            \
    const CT scale = (CT)hp[2], eps = (CT)hp[3];                                \
    const CT decay = (CT)(1.0 - hp[0] * hp[4]);                                 \
    const int wd = hp[4] != 0.0, sr = (int)ip[0];                               \
    (void)out;                                                                  \
    LO_FOR_CHUNKS(n, sizes, nthreads, {                                         \
      PT *P = (PT *)ptrs[t];                                                    \
      const PT *G = (const PT *)ptrs[n + t];                                    \
      ST *M = (ST *)ptrs[2 * n + t];                                            \
      const ST *H = (const ST *)ptrs[3 * n + t];                                \
      PT *C = (PT *)ptrs[4 * n + t];                                            \
      const uint64_t srw = lo_sr_word(sr, ip + 1, t);                           \
      for (int64_t i = lo; i < hi; i++) {                                       \
        CT p = LD_##PTAG(P[i]);                                                 \
        if (wd) p = R_##PTAG(p * decay);                                        \
        const CT m = R_##STAG(LO_FMA(LD_##PTAG(G[i]), a1, R_##STAG(LD_##STAG(M[i]) * b1))); \
        M[i] = ST_##STAG(m);                                                    \
        CT den = R_##STAG(LD_##STAG(H[i]) * scale);                             \
        if (den < eps) den = eps;                                               \
        CT r = R_##STAG(LO_ABS(m) / den);                                       \
        if (r > (CT)1) r = (CT)1;                                               \
        const CT s = (CT)((m > 0) - (m < 0));                                   \
        lo_update_##PTAG(P, C, i, p, R_##STAG(R_##STAG(r * s) * (-lr)), srw);    \
      }                                                                         \
    });                                                                         \
  }

LO_INSTANTIATE(SOPHIA_KERNEL)
