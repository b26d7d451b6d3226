/* Decode attention over a paged float32 KV cache, for the CPU backend (device_kernels/cpu.py).
 *
 * Built at first use by device_kernels/cpu_native.py (cc -O3 -march=native -fopenmp) and called through
 * ctypes; the pure-PyTorch decode in device_kernels/cpu.py is the fallback, and reference.py the oracle.
 *
 * One query token per sequence attends to the first seq_lens[b] positions of its cache, read
 * where they lie: cache [num_blocks, kv_heads, block_size, head_dim], position t of sequence b in
 * block table[b][t / block_size] at offset t % block_size. Query head h reads KV head
 * h / (heads / kv_heads) (MHA, GQA, MQA). Optional ALiBi: slope[h] * (t - (len - 1)), as
 * reference.py's bias. Softmax in float32 with its maximum subtracted; weights below exp(-87)
 * (float32's underflow) are 0. Positions past a sequence's end are never read, so whatever the
 * unwritten slots of its last block hold (NaN included) cannot reach the output.
 *
 * Work: one task per (sequence, group of KV heads); a task walks its sequence's blocks in order,
 * every head of the group reading its rows of a block in turn (contiguous in this layout), once
 * for the scores and once for the values. Denormals are flushed while it runs (the CPU platform
 * sets the same for torch).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define UNDERFLOW (-87.0f)

static inline __attribute__((always_inline)) void
attend(const float *q, int64_t q_head_stride, const float *kc, const float *vc,
       const int32_t *blocks, int64_t len, const float *slopes, float scale, int64_t group,
       int64_t h0, int64_t h1, int64_t kv_heads, int64_t bs, const int64_t d, float *out,
       float *scores, int64_t stride) {
    const int64_t block_stride = kv_heads * bs * d;
    const int64_t nblocks = (len + bs - 1) / bs;
    for (int64_t j = 0; j < nblocks; j++) {
        const float *kb = kc + (int64_t)blocks[j] * block_stride;
        const int64_t t0 = j * bs, tn = len - t0 < bs ? len - t0 : bs;
        for (int64_t h = h0; h < h1; h++) {
            const float *qh = q + h * q_head_stride;
            const float *k = kb + (h / group) * bs * d;
            const float slope = slopes ? slopes[h] : 0.0f;
            float *s = scores + (h - h0) * stride + t0;
            for (int64_t t = 0; t < tn; t++) {
                float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
                for (int64_t i = 0; i < d; i++) acc += qh[i] * k[t * d + i];
                s[t] = acc * scale + slope * (float)(t0 + t - (len - 1));
            }
        }
    }
    for (int64_t h = h0; h < h1; h++) {
        float *s = scores + (h - h0) * stride;
        float mx = -INFINITY, sum = 0.0f;
        for (int64_t t = 0; t < len; t++) mx = s[t] > mx ? s[t] : mx;
        for (int64_t t = 0; t < len; t++) {
            const float x = s[t] - mx;
            s[t] = x < UNDERFLOW ? 0.0f : expf(x);
            sum += s[t];
        }
        const float inv = 1.0f / sum;
        for (int64_t t = 0; t < len; t++) s[t] *= inv;
        float *o = out + h * d;
        for (int64_t i = 0; i < d; i++) o[i] = 0.0f;
    }
    for (int64_t j = 0; j < nblocks; j++) {
        const float *vb = vc + (int64_t)blocks[j] * block_stride;
        const int64_t t0 = j * bs, tn = len - t0 < bs ? len - t0 : bs;
        for (int64_t h = h0; h < h1; h++) {
            const float *v = vb + (h / group) * bs * d;
            const float *p = scores + (h - h0) * stride + t0;
            float *o = out + h * d;
            for (int64_t t = 0; t < tn; t++) {
                const float w = p[t];
#pragma omp simd
                for (int64_t i = 0; i < d; i++) o[i] += w * v[t * d + i];
            }
        }
    }
}

/* Returns 0, or -1 - b for the first sequence b whose length or block ids do not fit the cache
 * (nothing is computed then). q: [batch, heads, d] with rows q_row_stride apart and heads
 * q_head_stride apart (d contiguous); out: [batch, heads, d] contiguous. */
int64_t paged_decode_f32(const float *q, int64_t q_row_stride, int64_t q_head_stride,
                         const float *kc, const float *vc, int64_t num_blocks,
                         const int32_t *table, int64_t max_blocks, const int32_t *seq_lens,
                         const float *slopes, float scale, int64_t batch, int64_t heads,
                         int64_t kv_heads, int64_t bs, int64_t d, float *out, int nthreads) {
    int64_t max_len = 1;
    for (int64_t b = 0; b < batch; b++) {
        const int64_t len = seq_lens[b], nblocks = (len + bs - 1) / bs;
        if (len < 1 || nblocks > max_blocks) return -1 - b;
        for (int64_t j = 0; j < nblocks; j++) {
            const int32_t blk = table[b * max_blocks + j];
            if (blk < 0 || blk >= num_blocks) return -1 - b;
        }
        if (len > max_len) max_len = len;
    }
    const int64_t group = heads / kv_heads;
    /* KV heads per task: whole ones, split until there are a few tasks per thread */
    int64_t chunks = 1;
    while (batch * chunks < 4 * nthreads && chunks < kv_heads) chunks *= 2;
    if (chunks > kv_heads) chunks = kv_heads;
    const int64_t per = (kv_heads + chunks - 1) / chunks;
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        const unsigned int csr = _mm_getcsr();
        _mm_setcsr(csr | 0x8040); /* flush-to-zero, denormals-are-zero */
        float *scores = (float *)malloc(sizeof(float) * (size_t)(per * group * max_len));
        if (!scores) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < batch * chunks; task++) {
            const int64_t b = task / chunks, c = task % chunks;
            const int64_t h0 = c * per * group;
            const int64_t h1 = h0 + per * group < heads ? h0 + per * group : heads;
            if (!scores || h0 >= h1) continue;
            const float *qb = q + b * q_row_stride;
            float *ob = out + b * heads * d;
            const int32_t *blocks = table + b * max_blocks;
            const int64_t len = seq_lens[b];
            /* head sizes of the models served (BLOOM 64/128, Gemma 256): unrolled; others too */
            switch (d) {
            case 64:
                attend(qb, q_head_stride, kc, vc, blocks, len, slopes, scale, group, h0, h1,
                       kv_heads, bs, 64, ob, scores, max_len);
                break;
            case 128:
                attend(qb, q_head_stride, kc, vc, blocks, len, slopes, scale, group, h0, h1,
                       kv_heads, bs, 128, ob, scores, max_len);
                break;
            case 256:
                attend(qb, q_head_stride, kc, vc, blocks, len, slopes, scale, group, h0, h1,
                       kv_heads, bs, 256, ob, scores, max_len);
                break;
            default:
                attend(qb, q_head_stride, kc, vc, blocks, len, slopes, scale, group, h0, h1,
                       kv_heads, bs, d, ob, scores, max_len);
            }
        }
        free(scores);
        _mm_setcsr(csr);
    }
    return failed ? -1 - batch : 0;
}
