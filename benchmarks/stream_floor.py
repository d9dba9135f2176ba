"""The memory floor of each optimizer's access pattern on this CPU: plain C loops, no optimizer math.

``python benchmarks/stream_floor.py [--threads 2] [--rounds 15]``

The "per byte" column of ``optimizer_step.py`` counts every byte read or written once. On a CPU a
written array costs more than a read one (the line is read for ownership, then written back) and
the time also depends on how many arrays stream at once, so two patterns with the same byte count
can differ, and a pattern with fewer bytes need not be faster. This compiles (system C compiler,
``-O3 -march=native``, OpenMP) one loop per access pattern over 25.19M float32 elements (the
benchmark set), each doing one multiply-add per element and array, and prints the best of
``--rounds`` interleaved runs: the floor an optimizer with that pattern can reach here.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from optimizer_step import machine_line  # noqa: E402  (the same machine line as the step table)

# name: (arrays read, arrays written (also read)), as the optimizers in optimizer_step.py
PATTERNS = {
    "read 1 (a norm pass)": (1, 0),
    "read 2 (LARS' norm pass)": (2, 0),
    "lion (p, g, m; writes p, m)": (3, 2),
    "sophia (p, g, m, h; writes p, m)": (4, 2),
    "adamw (p, g, m, v; writes p, m, v)": (4, 3),
    "grokadamw (p, g, m, v, e; writes p, m, v, e)": (5, 4),
}

_SRC = r"""
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <time.h>
#define N 25165824
#define CH 16384
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1e3 + t.tv_nsec * 1e-6; }
/* r arrays read, the first w of them also written */
static void pattern(float **a, int r, int w, int64_t lo, int64_t hi) {
  switch (r * 10 + w) {
%(cases)s
  }
}
int main(int argc, char **argv) {
  int threads = atoi(argv[1]), rounds = atoi(argv[2]);
  static const int R[] = {%(reads)s}, W[] = {%(writes)s};
  const int np = sizeof(R) / sizeof(R[0]);
  float *a[8];
  for (int j = 0; j < 8; j++) {
    a[j] = (float *)aligned_alloc(64, (size_t)N * 4);
    for (int64_t i = 0; i < N; i++) a[j][i] = 1.0f + (float)(i %% 7) * 1e-3f;
  }
  double best[16];
  for (int k = 0; k < np; k++) best[k] = 1e30;
  for (int rep = 0; rep < rounds; rep++)
    for (int k = 0; k < np; k++) {
      double t0 = now();
      #pragma omp parallel for num_threads(threads) schedule(static)
      for (int64_t c = 0; c < N / CH; c++) pattern(a, R[k], W[k], c * CH, (c + 1) * CH);
      double ms = now() - t0;
      if (ms < best[k]) best[k] = ms;
    }
  for (int k = 0; k < np; k++) printf("%%.3f\n", best[k]);
  return 0;
}
"""


def _case(r: int, w: int) -> str:
    if w == 0:
        # a read-only pattern: 16 independent sums (one would be bound by the add latency, not memory),
        # kept alive through a volatile sink so the loads stay
        terms = " + ".join(f"a[{j}][i + k]" for j in range(r))
        return (
            f"    case {r * 10}: {{ float acc[16] = {{0}}; "
            f"for (int64_t i = lo; i < hi; i += 16) for (int k = 0; k < 16; k++) acc[k] += {terms}; "
            "volatile float sink = acc[0] + acc[15]; (void)sink; break; }"
        )
    terms = " + ".join(f"a[{j}][i]" for j in range(r))
    body = [f"const float s = {terms};"] + [f"a[{j}][i] = a[{j}][i] * 0.999f + s * 1e-3f;" for j in range(w)]
    return f"    case {r * 10 + w}: {{ for (int64_t i = lo; i < hi; i++) {{ {' '.join(body)} }} break; }}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    cc = next((c for c in (os.environ.get("CC"), "cc", "gcc", "clang") if c and shutil.which(c)), None)
    if cc is None:
        raise SystemExit("stream_floor needs a C compiler ($CC, cc, gcc or clang)")
    pats = list(PATTERNS.values())
    src = _SRC % {
        "cases": "\n".join(_case(r, w) for r, w in pats),
        "reads": ", ".join(str(r) for r, _ in pats),
        "writes": ", ".join(str(w) for _, w in pats),
    }
    with tempfile.TemporaryDirectory() as tmp:
        c, exe = Path(tmp, "floor.c"), Path(tmp, "floor")
        c.write_text(src)
        subprocess.run([cc, "-O3", "-march=native", "-fopenmp", str(c), "-o", str(exe)], check=True)
        out = subprocess.run([str(exe), str(args.threads), str(args.rounds)], capture_output=True, text=True, check=True)
    ms = [float(x) for x in out.stdout.split()]
    adamw = ms[list(PATTERNS).index("adamw (p, g, m, v; writes p, m, v)")]
    print(f"{machine_line(args.threads)}; best of {args.rounds}; 25.19M float32 elements per array\n")
    print("| access pattern | floor ms | bytes/elem (each once) | GB/s (each once) | vs the adamw pattern |")
    print("|---|---|---|---|---|")
    for (name, (r, w)), t in zip(PATTERNS.items(), ms):
        b = 4 * (r + w)
        print(f"| {name} | {t:.2f} | {b} | {25165824 * b / t / 1e6:.1f} | {t / adamw:.2f} |")


if __name__ == "__main__":
    main()
