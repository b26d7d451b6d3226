/* AVX-512 helpers shared by the CPU path's native kernels (cpu_gemm.c, and through it cpu_bloom.c;
 * cpu_sample.c): the mask of a row's last partial vector, and exp of 16 floats. Included only
 * where __AVX512F__ is defined. */
#ifndef TGI_NPU_CPU_SIMD_H
#define TGI_NPU_CPU_SIMD_H
#include <immintrin.h>
#include <stdint.h>

/* The lanes of the last, partial 16-float vector of a row of k floats (0: none). */
static inline __mmask16 tail_mask(int64_t k) { return (__mmask16)((1u << (k % 16)) - 1u); }

/* exp(x), lane-wise: range reduction to |r| <= ln2 / 2 and a degree-7 polynomial (relative error
 * under 1e-7); x is clamped to [-87, 88] (float32's range), so exp(-inf) is about 1.6e-38, not 0. */
static inline __m512 exp512(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r); /* |r| <= ln2 / 2 */
    __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

#endif
