/* The float32 linear at a decode step's rows on an AVX-512 CPU: y[M, N] = x[M, K] . w[N, K]^T (+ b);
 * one row (M = 1) takes its own GEMV, below, which cpu_bloom.c also runs.
 *
 * Loaded by device_kernels/cpu_native.py (built like cpu_decode.c) and offered to the load-time
 * calibration as the "native" kernel (models/layers/cpu_gemm.py), which keeps it only where it
 * measures faster than oneDNN's and MKL's. Why it can be: at 2-48 rows a linear reads its weight
 * once, from memory, and does 2 * M flops per weight element, so it runs at the rate of streaming
 * the weight or of the arithmetic only if the two overlap. On the 2-core AVX-512/AMX machine this
 * was written on, oneDNN, MKL and the swapped product ran BLOOM-560m's 96 decoder projections at
 * 32 rows at 138-195 GFLOP/s, where MKL ran the 3,328-row prefill's at about 428.
 *
 * How: the weight is read in its own row-major layout, NR rows (a tile) at a time, each thread a
 * contiguous range of tiles. For each tile, x's rows go by MR at a time (a pass); one pass is
 * MR x NR dot products over K, 16 lanes wide, each ending in one horizontal sum. The tile (NR
 * rows of K floats) stays in L1/L2 across the passes, so it comes from memory once; while a tile
 * computes, its passes prefetch the next tile's rows (one row a pass, the rest after the last),
 * so the next tile's reads overlap this one's arithmetic. Rows past M or N repeat the last real
 * one (their results are not written): no separate edge kernels.
 *
 * Summation order: 16 partial sums per dot product, then a tree; MKL's and oneDNN's orders
 * differ from this and from each other, all within float32 rounding (tests/models/
 * test_cpu_gemm.py checks each kernel against float64).
 */
#include <stdint.h>

#if defined(__AVX512F__)
#include "cpu_simd.h"

#define MR 4 /* x rows per pass */
#define NR 6 /* weight rows per tile: MR * NR = 24 accumulators + NR weight vectors + 1 of x */

static void pass(const float* const* xr, const float* const* wr, int64_t k_len, __mmask16 tail,
                 float* y, int64_t ldy, int mr, int nr, const float* bias, const float* prefetch)
{
    __m512 acc[MR][NR];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) acc[i][j] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= k_len; k += 16) {
        __m512 wv[NR];
        for (int j = 0; j < NR; j++) wv[j] = _mm512_loadu_ps(wr[j] + k);
        if (prefetch) _mm_prefetch((const char*)(prefetch + k), _MM_HINT_T1);
        for (int i = 0; i < MR; i++) {
            __m512 xv = _mm512_loadu_ps(xr[i] + k);
            for (int j = 0; j < NR; j++) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
        }
    }
    if (tail) { /* K % 16 trailing elements: masked loads read zeros past the row */
        __m512 wv[NR];
        for (int j = 0; j < NR; j++) wv[j] = _mm512_maskz_loadu_ps(tail, wr[j] + k);
        for (int i = 0; i < MR; i++) {
            __m512 xv = _mm512_maskz_loadu_ps(tail, xr[i] + k);
            for (int j = 0; j < NR; j++) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
        }
    }
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++)
            y[i * ldy + j] = _mm512_reduce_add_ps(acc[i][j]) + (bias ? bias[j] : 0.0f);
}

/* Points wr[0..count) at weight rows n0, n0 + 1, ... (rows past N repeat the last real one);
 * returns how many are real. */
static inline int weight_rows(const float* w, int64_t ldw, int64_t n, int64_t n0, int count,
                              const float** wr)
{
    const int real = (int)(n - n0 < count ? n - n0 : count);
    for (int j = 0; j < count; j++) wr[j] = w + (n0 + (j < real ? j : real - 1)) * ldw;
    return real;
}

/* One row (a batch-1 decode step): y[N] = w[N, K] . x (+ b) (+ res). Each thread streams a contiguous
 * range of the weight's rows, GR rows at a time, each with its own accumulator; x stays in L1. The
 * tile kernel above would compute MR - 1 copies of the row here. Measured on the 2-core AVX-512
 * machine this was written on (BLOOM-560m's 96 decoder projections, back to back, out of cache):
 * 37-39 ms against MKL's 41; a 1 GiB weight at 33-34 GB/s against MKL's and oneDNN's 31. Software
 * prefetch of the next group (1 or 2 ahead) made it slower (45-46 ms): the hardware prefetcher
 * follows one sequential stream per thread on its own. */
#define GR 8

static void gemv(const float* x, const float* w, int64_t ldw, const float* b, const float* res,
                 float* y, int64_t n, int64_t k_len, int nthreads)
{
    const int64_t groups = (n + GR - 1) / GR;
    const __mmask16 tail = tail_mask(k_len);
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t g = 0; g < groups; g++) {
        const int64_t n0 = g * GR;
        const float* wr[GR];
        const int nr = weight_rows(w, ldw, n, n0, GR, wr);
        __m512 acc[GR];
        for (int j = 0; j < GR; j++) acc[j] = _mm512_setzero_ps();
        int64_t k = 0;
        for (; k + 16 <= k_len; k += 16) {
            const __m512 xv = _mm512_loadu_ps(x + k);
            for (int j = 0; j < GR; j++) acc[j] = _mm512_fmadd_ps(xv, _mm512_loadu_ps(wr[j] + k), acc[j]);
        }
        if (tail) {
            const __m512 xv = _mm512_maskz_loadu_ps(tail, x + k);
            for (int j = 0; j < GR; j++)
                acc[j] = _mm512_fmadd_ps(xv, _mm512_maskz_loadu_ps(tail, wr[j] + k), acc[j]);
        }
        for (int j = 0; j < nr; j++)
            y[n0 + j] = _mm512_reduce_add_ps(acc[j]) + (b ? b[n0 + j] : 0.0f) + (res ? res[n0 + j] : 0.0f);
    }
}

/* x: M rows of K floats, ldx apart; w: N rows of K floats, ldw apart; b: N floats or NULL;
 * y: M x N, contiguous. Returns 0. */
int64_t linear_nt_f32(const float* x, int64_t ldx, const float* w, int64_t ldw, const float* b,
                      float* y, int64_t m, int64_t n, int64_t k_len, int nthreads)
{
    if (m == 1) {
        gemv(x, w, ldw, b, 0, y, n, k_len, nthreads);
        return 0;
    }
    const __mmask16 tail = tail_mask(k_len);
    const int64_t tiles = (n + NR - 1) / NR;
    const int64_t passes = (m + MR - 1) / MR;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t t = 0; t < tiles; t++) {
        const int64_t n0 = t * NR;
        const float* wr[NR];
        const int nr = weight_rows(w, ldw, n, n0, NR, wr);
        const int64_t next = n0 + NR, next_rows = n - next < NR ? n - next : NR;
        for (int64_t g = 0; g < passes; g++) {
            const int64_t m0 = g * MR;
            const int mr = (int)(m - m0 < MR ? m - m0 : MR);
            const float* xr[MR];
            for (int i = 0; i < MR; i++) xr[i] = x + (m0 + (i < mr ? i : mr - 1)) * ldx;
            const float* prefetch = g < next_rows ? w + (next + g) * ldw : 0;
            pass(xr, wr, k_len, tail, y + m0 * n + n0, n, mr, nr, b ? b + n0 : 0, prefetch);
        }
        for (int64_t j = passes; j < next_rows; j++) /* rows no pass prefetched */
            for (int64_t k = 0; k < k_len; k += 16)
                _mm_prefetch((const char*)(w + (next + j) * ldw + k), _MM_HINT_T1);
    }
    return 0;
}

#else /* no AVX-512 at build time: the Python side sees -1 and leaves this kernel out */

int64_t linear_nt_f32(const float* x, int64_t ldx, const float* w, int64_t ldw, const float* b,
                      float* y, int64_t m, int64_t n, int64_t k_len, int nthreads)
{
    (void)x; (void)ldx; (void)w; (void)ldw; (void)b; (void)y; (void)m; (void)n; (void)k_len;
    (void)nthreads;
    return -1;
}

#endif
