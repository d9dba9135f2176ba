/* The shared reductions' CPU kernels (lightning_opt.optim.precision.total_norm): lists xs;
 * out[t] = sum of x_t^2 in double (lo_sumsq, common.h: 8 fixed lanes per chunk, chunks added in
 * order, so deterministic and thread-count independent). One suffix per storage type. */
/* v * v + s rounds twice, as in the optimizers' kernels that share lo_sumsq */
#pragma GCC optimize("fp-contract=off")
#include "common.h"

#define SUMSQ_KERNEL(TAG, PT)                                                   \
  void sumsq_##TAG(int64_t n, void **ptrs, const int64_t *sizes, const double *hp, \
                   const int64_t *ip, double *out, int nthreads) {              \
    (void)hp;                                                                   \
    (void)ip;                                                                   \
    LO_TENSOR_SUMS(n, sizes, nthreads, 1, out, {                                \
      acc[0] = lo_sumsq_##TAG((const PT *)ptrs[t], lo, hi);                     \
    });                                                                         \
  }

SUMSQ_KERNEL(f32, float)
SUMSQ_KERNEL(f64, double)
SUMSQ_KERNEL(bf16, lo_bf16)
SUMSQ_KERNEL(f16, lo_f16)
