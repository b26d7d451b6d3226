/* BLOOM's decoder for one token (a batch-1 decode step), float32, on an AVX-512 CPU: the token's
 * embedding and its LayerNorm, the whole stack of blocks and the final LayerNorm in one call
 * (bloom_token_f32), instead of a dozen PyTorch ops and module calls per block.
 *
 * Loaded by device_kernels/cpu_native.py (built like cpu_decode.c, which it includes with
 * cpu_gemm.c: the same attention and the same one-row GEMV the unfused path runs) and called by
 * models/bloom_one_token.py, only where one step of it timed faster at load than one step of the
 * PyTorch blocks. Why: a batch-1 step reads every weight once, so its floor is
 * the time to stream them; each block's small ops (two LayerNorms, the GELU, two residual adds,
 * the KV store, the attention call) cost microseconds of work but, as PyTorch ops, tens of
 * microseconds of dispatch each, with the memory idle meanwhile. On the 2-core machine this was
 * written on, BLOOM-560m's step spent 7-8 ms of 78 outside its linears and LM head.
 *
 * Per block, as models/bloom.py's BloomBlock (the oracle; tests/models/test_bloom_one_token.py):
 *   n1 = LayerNorm1(h); [q|k|v] = W_qkv n1 + b_qkv; store k, v at the token's slot;
 *   a = attention(q, the sequence's cache, ALiBi); h2 = W_dense a + b_dense + (n1 or h);
 *   n2 = LayerNorm2(h2); u = gelu_tanh(W_up n2 + b_up); h = W_down u + b_down + (n2 or h2)
 * ("n1 or h": the residual is taken after the norm where apply_residual_connection_post_layernorm).
 * LayerNorm: mean, then the mean of squared deviations (two passes), in float32. GELU's tanh form
 * as x * sigmoid(2y) = x / (1 + exp(-2y)), y = sqrt(2/pi) (x + 0.044715 x^3), with exp by range
 * reduction and a degree-7 polynomial (cpu_simd.h; relative error under 1e-7).
 */
#include "cpu_decode.c"
#include "cpu_gemm.c"

/* One block's weights: float32, rows of each matrix `ld` floats apart, [q | k | v] rows for qkv. */
struct bloom_block {
    const float *ln1_w, *ln1_b, *qkv_w, *qkv_b, *dense_w, *dense_b;
    const float *ln2_w, *ln2_b, *up_w, *up_b, *down_w, *down_b;
    int64_t qkv_ld, dense_ld, up_ld, down_ld;
    float *key_cache, *value_cache; /* [num_blocks, heads, block_size, head_dim], contiguous */
};

/* The step: one sequence, its block table row, its length after this token, the token's slot. */
struct bloom_step {
    int64_t hidden, inter, heads, head_dim, block_size, num_blocks;
    float eps, scale;
    int32_t residual_after_norm;
    const float *slopes; /* [heads] ALiBi */
    const int32_t *table;
    int64_t max_blocks;
    int32_t len;
    int64_t slot; /* -1: don't store */
    float *scratch; /* 7 * hidden + inter floats */
    int nthreads;
    /* bloom_token_f32 only: the token, the embedding table [vocab, hidden] and the LayerNorms
     * before the first block and after the last */
    const float *embed, *embed_ln_w, *embed_ln_b, *final_ln_w, *final_ln_b;
    int64_t vocab, token;
};

#if defined(__AVX512F__)

static void layer_norm(const float *x, const float *w, const float *b, float eps, float *y,
                       int64_t n) {
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; i++) sum += x[i];
    const float mean = sum / (float)n;
    float sq = 0.0f;
#pragma omp simd reduction(+ : sq)
    for (int64_t i = 0; i < n; i++) sq += (x[i] - mean) * (x[i] - mean);
    const float inv = 1.0f / sqrtf(sq / (float)n + eps);
#pragma omp simd
    for (int64_t i = 0; i < n; i++) y[i] = (x[i] - mean) * inv * w[i] + b[i];
}

static void gelu_tanh(float *x, int64_t n) { /* in place; a partial last vector masked */
    const __m512 c = _mm512_set1_ps(-2.0f * 0.7978845608028654f), c3 = _mm512_set1_ps(0.044715f);
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : tail_mask(n - i);
        const __m512 v = _mm512_maskz_loadu_ps(m, x + i);
        const __m512 inner = _mm512_mul_ps(v, _mm512_fmadd_ps(_mm512_mul_ps(c3, v), v, one));
        const __m512 e = exp512(_mm512_mul_ps(c, inner)); /* exp(-2y) */
        _mm512_mask_storeu_ps(x + i, m, _mm512_div_ps(v, _mm512_add_ps(one, e)));
    }
}

/* Runs `count` blocks over h [hidden] in place. Returns 0; -1 when the slot is outside the
 * cache; -2 when the sequence's length or block ids do not fit it (nothing computed for that
 * block then); -3 when the attention's buffers could not be allocated. */
static int64_t bloom_blocks_f32(float *h, const struct bloom_block *blocks, int64_t count,
                                const struct bloom_step *s) {
    const int64_t hd = s->hidden, heads = s->heads, d = s->head_dim, bs = s->block_size;
    const int64_t capacity = s->num_blocks * bs;
    if (s->slot >= capacity || s->slot < -1) return -1;
    float *n1 = s->scratch, *qkv = n1 + hd, *attn = qkv + 3 * hd, *h2 = attn + hd, *n2 = h2 + hd;
    float *up = n2 + hd;
    for (int64_t l = 0; l < count; l++) {
        const struct bloom_block *b = blocks + l;
        layer_norm(h, b->ln1_w, b->ln1_b, s->eps, n1, hd);
        gemv(n1, b->qkv_w, b->qkv_ld, b->qkv_b, 0, qkv, 3 * hd, hd, s->nthreads);
        if (s->slot >= 0) {
            const int64_t blk = s->slot / bs, off = s->slot % bs;
            for (int64_t hh = 0; hh < heads; hh++) {
                const int64_t at = ((blk * heads + hh) * bs + off) * d;
                for (int64_t i = 0; i < d; i++) {
                    b->key_cache[at + i] = qkv[hd + hh * d + i];
                    b->value_cache[at + i] = qkv[2 * hd + hh * d + i];
                }
            }
        }
        const int64_t rc = paged_decode_f32(qkv, 0, d, b->key_cache, b->value_cache, s->num_blocks,
                                            s->table, s->max_blocks, &s->len, s->slopes, s->scale,
                                            1, heads, heads, bs, d, attn, s->nthreads);
        if (rc == -2) return -3; /* -1 - batch: its score buffers */
        if (rc < 0) return -2;   /* -1 - b: the sequence does not fit */
        gemv(attn, b->dense_w, b->dense_ld, b->dense_b, s->residual_after_norm ? n1 : h, h2, hd, hd,
             s->nthreads);
        layer_norm(h2, b->ln2_w, b->ln2_b, s->eps, n2, hd);
        gemv(n2, b->up_w, b->up_ld, b->up_b, 0, up, s->inter, hd, s->nthreads);
        gelu_tanh(up, s->inter);
        gemv(up, b->down_w, b->down_ld, b->down_b, s->residual_after_norm ? n2 : h2, h, hd,
             s->inter, s->nthreads);
    }
    return 0;
}

/* The token s->token through the whole decoder: its embedding row, that LayerNorm, the `count`
 * blocks, the final LayerNorm, into out [hidden] (the residual stream in between). Returns
 * bloom_blocks_f32's codes, and -5 when the token is outside the vocabulary. */
int64_t bloom_token_f32(float *out, const struct bloom_block *blocks, int64_t count,
                        const struct bloom_step *s) {
    if (s->token < 0 || s->token >= s->vocab) return -5;
    layer_norm(s->embed + s->token * s->hidden, s->embed_ln_w, s->embed_ln_b, s->eps, out, s->hidden);
    const int64_t rc = bloom_blocks_f32(out, blocks, count, s);
    if (rc != 0) return rc;
    layer_norm(out, s->final_ln_w, s->final_ln_b, s->eps, out, s->hidden); /* in place: y after x */
    return 0;
}

#else /* no AVX-512 at build time: the Python side sees -4 and keeps the unfused path */

int64_t bloom_token_f32(float *out, const struct bloom_block *blocks, int64_t count,
                        const struct bloom_step *s) {
    (void)out; (void)blocks; (void)count; (void)s;
    return -4;
}

#endif
