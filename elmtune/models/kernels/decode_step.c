/* A decode step of OpenELM's decoder stack — one new token per sequence — in one call from Python.
 *
 * Eager PyTorch spends ~50 operator calls per layer on a decode step (norms, views, RoPE, the cache write, SDPA,
 * the gated activation, residual adds), ~16 µs each with caches just flushed by the weights' stream: ~18 ms per
 * step of the 270M model against the ~30 ms its weights take to stream from memory.  Here the whole stack is one
 * C function over the same buffers:
 *
 *   h [B, D] = embedding rows of the tokens (or the caller's embeddings)
 *   per layer:  h += out_proj(attention(rope(qk_norm(qkv_proj(rms_norm(h))))))   (keys/values into the cache)
 *               h += proj_2(silu(gate) * up),  [gate | up] = proj_1(rms_norm(h))
 *   h = rms_norm(h)  (the final norm; the output head stays with the caller)
 *
 * with the weights' products through elmtune_gemv16 (gemv16.c: 16-bit weights, fp32 arithmetic) and everything
 * else fp32, in the reference model's order of operations (openelm.py), so results equal it up to summation
 * order.  Each layer's cache is PreallocatedCache's buffers, [B, hkv, capacity, hd]: the step writes position L
 * and attends to positions 0..L of each row where mask (uint8 [B, L+1], NULL = all) is set.  B is small (decode
 * batches); threads share the weights' rows (gemv16) and the (row, head) pairs of attention. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

void elmtune_gemv16(const float *x, const uint16_t *w, float *y, int64_t M, int64_t N, int64_t K, int bf16,
                    int threads);

/* a . b over n values, n % 8 == 0 (the compiler does not vectorise a float sum by itself: it would reorder it) */
static inline float dot(const float *a, const float *b, int64_t n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = s0;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    for (; i < n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s0 = _mm256_add_ps(s0, s1);
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(s0), _mm256_extractf128_ps(s0, 1));
    s = _mm_hadd_ps(s, s);
    return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}

/* y = x / sqrt(mean(x^2) + eps) * w over n values (F.rms_norm's arithmetic; the reference's fp32 path) */
static void rms_norm(const float *x, const float *w, float *y, int64_t n, float eps) {
    const float r = 1.0f / sqrtf(dot(x, x, n) / (float)n + eps);
    for (int64_t i = 0; i < n; i++) y[i] = x[i] * r * w[i];
}

/* rotate-half RoPE in place on one head: cos/sin [hd] repeat their first half (openelm.apply_rotary) */
static void rope(float *x, const float *cos, const float *sin, int64_t hd) {
    const int64_t half = hd / 2;
    for (int64_t j = 0; j < half; j++) {
        const float a = x[j], b = x[j + half];
        x[j] = a * cos[j] - b * sin[j];
        x[j + half] = b * cos[j + half] + a * sin[j + half];
    }
}

/* one query head of one row against its key/value head's first t positions; scores: t floats of scratch */
static void attend(const float *q, const float *keys, const float *values, const uint8_t *mask, float *scores,
                   float *out, int64_t t, int64_t hd, float scale) {
    float top = -INFINITY;
    for (int64_t p = 0; p < t; p++) {
        if (mask && !mask[p]) continue;
        scores[p] = dot(q, keys + p * hd, hd) * scale;
        if (scores[p] > top) top = scores[p];
    }
    float total = 0.0f;
    for (int64_t p = 0; p < t; p++) {
        scores[p] = (mask && !mask[p]) ? 0.0f : expf(scores[p] - top);
        total += scores[p];
    }
    memset(out, 0, hd * sizeof(float));
    for (int64_t p = 0; p < t; p++) {
        if (scores[p] == 0.0f) continue;
        const float weight = scores[p] / total, *v = values + p * hd;
        for (int64_t j = 0; j < hd; j++) out[j] += weight * v[j];
    }
}

/* one layer; w: attn_norm, ffn_norm, q_norm, k_norm (NULL without q/k norms), qkv_proj, out_proj, proj_1, proj_2;
 * scratch: at least layer_scratch() floats */
static int64_t layer_scratch(int64_t B, int64_t D, int64_t hq, int64_t hkv, int64_t hd, int64_t F, int64_t t) {
    const int64_t width = (hq + 2 * hkv) * hd, big = width > 2 * F ? width : 2 * F, mid = hq * hd > F ? hq * hd : F;
    return B * (2 * D + big + mid) + B * hq * t;
}

static void layer(float *h, int64_t B, int64_t D, const void *const *w, int64_t hq, int64_t hkv, int64_t hd,
                  int64_t F, const float *cos, const float *sin, float *kcache, float *vcache, int64_t capacity,
                  int64_t L, const uint8_t *mask, float eps, float scale, int bf16, int threads, float *scratch) {
    const float *attn_norm = w[0], *ffn_norm = w[1], *q_norm = w[2], *k_norm = w[3];
    const uint16_t *qkv_w = w[4], *out_w = w[5], *proj1_w = w[6], *proj2_w = w[7];
    const int64_t heads = hq + 2 * hkv, width = heads * hd, t = L + 1, groups = hq / hkv;
    const int64_t big = width > 2 * F ? width : 2 * F, mid = hq * hd > F ? hq * hd : F;
    /* scratch: normed input [B, D], projections [B, big], attention output [B, hq*hd] or gated [B, F], product
     * [B, D], scores [B * hq, t] */
    float *xn = scratch, *proj = xn + B * D, *act = proj + B * big, *prod = act + B * mid, *scores = prod + B * D;

    for (int64_t b = 0; b < B; b++) rms_norm(h + b * D, attn_norm, xn + b * D, D, eps);
    elmtune_gemv16(xn, qkv_w, proj, B, width, D, bf16, threads);  /* [B, (hq + 2 hkv) hd]: q heads, k heads, v heads */
    for (int64_t b = 0; b < B; b++) {
        float *row = proj + b * width;
        for (int64_t i = 0; i < hq + hkv; i++) {  /* query and key heads: per-head norm, then RoPE */
            float *x = row + i * hd;
            if (q_norm) rms_norm(x, i < hq ? q_norm : k_norm, x, hd, eps);
            rope(x, cos + b * hd, sin + b * hd, hd);
        }
        for (int64_t i = 0; i < hkv; i++) {  /* this position's keys and values into the cache */
            const int64_t at = ((b * hkv + i) * capacity + L) * hd;
            memcpy(kcache + at, row + (hq + i) * hd, hd * sizeof(float));
            memcpy(vcache + at, row + (hq + hkv + i) * hd, hd * sizeof(float));
        }
    }
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t pair = 0; pair < B * hq; pair++) {  /* (row, query head) pairs; GQA: kv head = head / groups */
        const int64_t b = pair / hq, head = pair % hq, kv = (b * hkv + head / groups) * capacity * hd;
        attend(proj + b * width + head * hd, kcache + kv, vcache + kv, mask ? mask + b * t : NULL, scores + pair * t,
               act + pair * hd, t, hd, scale);  /* act: [B, hq * hd], heads side by side as out_proj reads them */
    }
    elmtune_gemv16(act, out_w, prod, B, D, hq * hd, bf16, threads);
    for (int64_t i = 0; i < B * D; i++) h[i] += prod[i];

    for (int64_t b = 0; b < B; b++) rms_norm(h + b * D, ffn_norm, xn + b * D, D, eps);
    elmtune_gemv16(xn, proj1_w, proj, B, 2 * F, D, bf16, threads);  /* [B, 2F]: gate, then up */
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < B * F; i++) {
        const int64_t b = i / F, j = i % F;
        const float gate = proj[b * 2 * F + j];
        act[i] = gate / (1.0f + expf(-gate)) * proj[b * 2 * F + F + j];  /* silu(gate) * up, rows [B, F] */
    }
    elmtune_gemv16(act, proj2_w, prod, B, D, F, bf16, threads);
    for (int64_t i = 0; i < B * D; i++) h[i] += prod[i];
}

/* The step.  ids [B] and table [vocab, D] (16-bit) give the embeddings; with ids NULL, h holds them on entry.
 * positions [B]: each row's position (RoPE); inv_freq [hd/2]: RoPE's frequencies as the reference computes them.
 * Per layer l: dims[4l..4l+3] = hq, hkv, F, capacity; weights[8l..8l+7] as layer() takes them; caches[2l], [2l+1]
 * its key and value buffers.  On return h [B, D] is the final norm's output.  Returns 0; -1 when scratch memory
 * could not be had, -2 for a token id outside the table (nothing has been written to the caches then). */
int elmtune_decode_step(float *h, const int64_t *ids, const uint16_t *table, int64_t vocab,
                        const int64_t *positions, const float *inv_freq, int64_t B, int64_t D, int64_t hd,
                        int64_t layers, const int64_t *dims, const void *const *weights, float *const *caches,
                        int64_t L, const uint8_t *mask, const float *final_norm, float eps, float scale, int bf16,
                        int threads) {
    for (int64_t b = 0; ids && b < B; b++)
        if (ids[b] < 0 || ids[b] >= vocab) return -2;
    int64_t need = 0;
    for (int64_t l = 0; l < layers; l++) {
        const int64_t n = layer_scratch(B, D, dims[4 * l], dims[4 * l + 1], hd, dims[4 * l + 2], L + 1);
        if (n > need) need = n;
    }
    float *scratch = malloc(sizeof(float) * (need + 2 * B * hd));
    if (!scratch) return -1;
    float *cos = scratch + need, *sin = cos + B * hd;
    for (int64_t b = 0; b < B; b++) {
        if (ids) {  /* widen the token's 16-bit embedding row to fp32 */
            const uint16_t *row = table + ids[b] * D;
            for (int64_t i = 0; i < D; i++) {
                uint32_t bits;
                float value;
                if (bf16) {
                    bits = (uint32_t)row[i] << 16;
                    memcpy(&value, &bits, sizeof value);
                } else {
                    value = _cvtsh_ss(row[i]);
                }
                h[b * D + i] = value;
            }
        }
        for (int64_t j = 0; j < hd / 2; j++) {  /* angles = position * inv_freq, repeated: [cos | cos], [sin | sin] */
            const float angle = (float)positions[b] * inv_freq[j];
            cos[b * hd + j] = cos[b * hd + j + hd / 2] = cosf(angle);
            sin[b * hd + j] = sin[b * hd + j + hd / 2] = sinf(angle);
        }
    }
    for (int64_t l = 0; l < layers; l++)
        layer(h, B, D, weights + 8 * l, dims[4 * l], dims[4 * l + 1], hd, dims[4 * l + 2], cos, sin, caches[2 * l],
              caches[2 * l + 1], dims[4 * l + 3], L, mask, eps, scale, bf16, threads, scratch);
    for (int64_t b = 0; b < B; b++) rms_norm(h + b * D, final_norm, h + b * D, D, eps);
    free(scratch);
    return 0;
}
