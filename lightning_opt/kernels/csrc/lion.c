/* Lion (lightning_opt.optim.lion): lists params, grads, exp_avgs, kahan_comps;
 * hp = lr, beta1, beta2, weight_decay; ip = stochastic rounding (0/1), then with it per tensor t
 * its seed key ip[1 + t] (common.h). Equals lion_update_. */
#include "common.h"

#define LION_KERNEL(SUFFIX, PTAG, PT, STAG, ST, CT)                             \
  LO_SIGNATURE(lion, SUFFIX) {                                                  \
    const CT lr = (CT)hp[0], b1 = (CT)hp[1], b2 = (CT)hp[2];                    \
    const CT a1 = (CT)(1.0 - hp[1]), a2 = (CT)(1.0 - hp[2]);                    \
    const CT decay = (CT)(1.0 - hp[0] * hp[3]);                                 \
    const int wd = hp[3] != 0.0, sr = (int)ip[0];                               \
    (void)out;                                                                  \
    LO_FOR_CHUNKS(n, sizes, nthreads, {                                         \
      PT *P = (PT *)ptrs[t];                                                    \
      const PT *G = (const PT *)ptrs[n + t];                                    \
      ST *M = (ST *)ptrs[2 * n + t];                                            \
      PT *C = (PT *)ptrs[3 * n + t];                                            \
      const uint64_t srw = lo_sr_word(sr, ip + 1, t);                           \
      for (int64_t i = lo; i < hi; i++) {                                       \
        CT g = LD_##PTAG(G[i]), m = LD_##STAG(M[i]), p = LD_##PTAG(P[i]);       \
        if (wd) p = R_##PTAG(p * decay);                                        \
        CT u = m * b1 + g * a1;                                                 \
        CT s = (CT)((u > 0) - (u < 0));                                         \
        M[i] = ST_##STAG(m * b2 + g * a2);                                      \
        lo_update_##PTAG(P, C, i, p, s * (-lr), srw);                           \
      }                                                                         \
    });                                                                         \
  }

LO_INSTANTIATE(LION_KERNEL)
