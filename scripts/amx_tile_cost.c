/* What AMX's tile instructions cost on this machine (docs/design.md, "Kernels for rows": why the
   AMX path for q4 was dropped). Linux only, a CPU with AMX-INT8:

       gcc -O2 -march=native scripts/amx_tile_cost.c -o /tmp/amx_tile_cost && /tmp/amx_tile_cost

   Prints ns per int8 tile product (16 x 16 x 32 and x 64 bytes a row), per tile load and per
   tile store, each in a loop of a million with nothing else in it. */
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

typedef struct __attribute__((aligned(64))) {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
} tile_config;

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static void configure(int a_bytes) {  /* tiles 0-1: A (16 rows), 2-3: B, 4-7: C (16 x 16 int32) */
  static tile_config c;  /* static: GCC -O2 may drop the stores to a local that only ldtilecfg reads */
  memset(&c, 0, sizeof c);
  c.palette = 1;
  for (int t = 0; t < 8; t++) {
    c.rows[t] = (t == 2 || t == 3) ? a_bytes / 4 : 16;
    c.colsb[t] = t < 2 ? a_bytes : 64;
  }
  _tile_loadconfig(&c);
}

int main(void) {
  if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */)) {
    printf("no AMX here (or the kernel refused it)\n");
    return 1;
  }
  static uint8_t a[16 * 64] __attribute__((aligned(64))), b[16 * 64] __attribute__((aligned(64)));
  static int32_t c[4][256] __attribute__((aligned(64)));
  const int n = 1000000;
  for (int bytes = 32; bytes <= 64; bytes *= 2) {
    configure(bytes);
    _tile_loadd(0, a, bytes);
    _tile_loadd(1, a, bytes);
    _tile_loadd(2, b, 64);
    _tile_loadd(3, b, 64);
    double t0 = now();
    for (int i = 0; i < n; i++) {  /* four independent accumulators: throughput, not latency */
      _tile_dpbusd(4, 0, 2);
      _tile_dpbusd(5, 1, 2);
      _tile_dpbusd(6, 0, 3);
      _tile_dpbusd(7, 1, 3);
    }
    printf("int8 tile product, 16 x 16 x %d: %.1f ns\n", bytes, (now() - t0) / n / 4 * 1e9);
  }
  configure(32);
  double t0 = now();
  for (int i = 0; i < n; i++) {
    _tile_loadd(0, a, 32);
    _tile_loadd(2, b, 64);
  }
  printf("tile load (from L1): %.1f ns\n", (now() - t0) / n / 2 * 1e9);
  t0 = now();
  for (int i = 0; i < n; i++) _tile_stored(4, c[i & 3], 64);
  printf("tile store (to L1): %.1f ns\n", (now() - t0) / n * 1e9);
  _tile_release();
  return c[0][0] & 0;
}
