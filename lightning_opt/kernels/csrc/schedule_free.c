/* Schedule-free AdamW / SGD / RAdam (lightning_opt.optim.schedule_free): lists params (they hold y),
 * grads, zs, exp_avg_sqs (NULL entries for SGD); the state (z, v) is float32 for bf16/fp16 params.
 * hp = y_coef = lr (beta (1 - c) - 1), lr, beta2, eps, bias_correction2, weight_decay, c;
 * ip = direction (0: the raw gradient; 1: Adam's g / (sqrt(v' / bc2) + eps); 2: the raw gradient
 * while v' accumulates, RAdam's SGD phase), stochastic rounding of bf16 params (0/1), then with it
 * per tensor t its seed key ip[2 + t] (common.h; the optimizer passes the group's step for all).
 * One pass over memory: v' (directions 1, 2), d (+ weight_decay y), y' = lerp(y, z, c) + y_coef d,
 * z' = z - lr d. Equals schedule_free_step_ bit for bit (its square root is correctly rounded). */
#include "common.h"

/* elements per sub-block of the Adam direction: its roots go through a buffer on the stack */
#define SF_BLOCK 1024

/* the rest of the step once d (and y, z) are known: decay at y, the interpolation, the stores;
 * torch's lerp(s, e, w) is fma(w, e - s, s) for |w| < 0.5, fma(w - 1, e - s, e) otherwise */
#define SF_FINISH(PTAG, STAG, CT, WD)            \
  if (WD) d = LO_FMA(y, wdc, d);                 \
  y = LO_FMA(w, z - y, small ? y : z);           \
  y = LO_FMA(d, y_coef, y);                      \
  Z[i] = ST_##STAG(LO_FMA(d, neg_lr, z));        \
  LO_STORE(PTAG, P, i, y, srw);

/* the raw gradient as the direction; EMA: v' still accumulates (RAdam's SGD phase) */
#define SF_LOOP_GRAD(PTAG, STAG, CT, EMA, WD)                               \
  for (int64_t i = lo; i < hi; i++) {                                       \
    CT g = LD_##PTAG(G[i]), y = LD_##PTAG(P[i]), z = LD_##STAG(Z[i]);       \
    if (EMA) V[i] = ST_##STAG(LO_FMA(a2 * g, g, LD_##STAG(V[i]) * b2));     \
    CT d = g;                                                               \
    SF_FINISH(PTAG, STAG, CT, WD)                                           \
  }

/* Adam's direction g / (sqrt(v' / bc2) + eps), v' = v b2 + ((1 - b2) g) g (mul_, then addcmul_) */
#define SF_LOOP_ADAM(PTAG, STAG, CT, WD)                                    \
  for (int64_t b = lo; b < hi; b += SF_BLOCK) {                             \
    const int64_t e = b + SF_BLOCK < hi ? b + SF_BLOCK : hi;                \
    CT q[SF_BLOCK];                                                         \
    for (int64_t i = b; i < e; i++) {                                       \
      CT g = LD_##PTAG(G[i]);                                               \
      CT v = LO_FMA(a2 * g, g, LD_##STAG(V[i]) * b2);                       \
      V[i] = ST_##STAG(v);                                                  \
      q[i - b] = v / bc2;                                                   \
    }                                                                       \
    LO_SQRT_ARRAY(q, e - b);                                                \
    for (int64_t i = b; i < e; i++) {                                       \
      CT g = LD_##PTAG(G[i]), y = LD_##PTAG(P[i]), z = LD_##STAG(Z[i]);     \
      CT d = g / (q[i - b] + eps);                                          \
      SF_FINISH(PTAG, STAG, CT, WD)                                         \
    }                                                                       \
  }

/* One function per storage combination; each (direction, weight decay) pair is its own loop, since
 * a branch inside the loop would keep it from vectorizing. */
#define SF_KERNEL(SUFFIX, PTAG, PT, STAG, ST, CT)                                                 \
  typedef struct {                                                                                 \
    CT y_coef, neg_lr, b2, a2, eps, bc2, wdc, w;                                                   \
    int small, sr;                                                                                 \
    const int64_t *keys;                                                                           \
  } sf_hp_##SUFFIX;                                                                                \
  static void sf_chunk_##SUFFIX(int variant, const sf_hp_##SUFFIX *h, PT *restrict P,              \
                                const PT *restrict G, ST *restrict Z, ST *restrict V, int64_t t,   \
                                int64_t lo, int64_t hi) {                                          \
    const CT y_coef = h->y_coef, neg_lr = h->neg_lr, b2 = h->b2, a2 = h->a2, eps = h->eps;         \
    const CT bc2 = h->bc2, wdc = h->wdc, w = h->w;                                                 \
    const int small = h->small;                                                                    \
    const uint64_t srw = lo_sr_word(h->sr, h->keys, t);                                            \
    (void)srw, (void)b2, (void)a2, (void)eps, (void)bc2;                                            \
    switch (variant) {                                                                             \
      case 0: SF_LOOP_GRAD(PTAG, STAG, CT, 0, 0) break;                                            \
      case 1: SF_LOOP_GRAD(PTAG, STAG, CT, 0, 1) break;                                            \
      case 2: SF_LOOP_ADAM(PTAG, STAG, CT, 0) break;                                               \
      case 3: SF_LOOP_ADAM(PTAG, STAG, CT, 1) break;                                               \
      case 4: SF_LOOP_GRAD(PTAG, STAG, CT, 1, 0) break;                                            \
      default: SF_LOOP_GRAD(PTAG, STAG, CT, 1, 1) break;                                           \
    }                                                                                              \
  }                                                                                                \
  LO_SIGNATURE(schedule_free, SUFFIX) {                                                            \
    sf_hp_##SUFFIX h;                                                                              \
    h.y_coef = (CT)hp[0];                                                                          \
    h.neg_lr = -(CT)hp[1];                                                                         \
    h.b2 = (CT)hp[2];                                                                              \
    h.a2 = (CT)(1.0 - hp[2]);                                                                      \
    h.eps = (CT)hp[3];                                                                             \
    h.bc2 = (CT)hp[4];                                                                             \
    h.wdc = (CT)hp[5];                                                                             \
    const CT c = (CT)hp[6];                                                                        \
    h.small = (c < 0 ? -c : c) < (CT)0.5;                                                          \
    h.w = h.small ? c : c - (CT)1;                                                                 \
    h.sr = (int)ip[1];                                                                             \
    h.keys = ip + 2;                                                                               \
    const int variant = 2 * (int)ip[0] + (hp[5] != 0.0);                                           \
    (void)out;                                                                                     \
    LO_FOR_CHUNKS(n, sizes, nthreads, {                                                            \
      sf_chunk_##SUFFIX(variant, &h, (PT *)ptrs[t], (const PT *)ptrs[n + t], (ST *)ptrs[2 * n + t], \
                        (ST *)ptrs[3 * n + t], t, lo, hi);                                         \
    });                                                                                            \
  }

LO_INSTANTIATE(SF_KERNEL)
