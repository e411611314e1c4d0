/* y[M, N] = x[M, K] . w[N, K]^T with x, y in fp32 and w in 16 bits (fp16 or bf16), for the few rows of a decode
 * step.  Each weight is read from memory once per call and widened to fp32 in registers (F16C's vcvtph2ps, or a
 * 16-bit shift for bf16), then multiplied by up to ROWS rows of x with fused multiply-adds: at batch 1 the time is
 * the weights' bytes over the memory bandwidth, half of what fp32 weights cost.  Built by elmtune.models.weights16
 * with -mavx2 -mfma -mf16c -fopenmp; at run time the libgomp.so.1 that torch has loaded serves it (one pool). */
#include <immintrin.h>
#include <stdint.h>
#include <omp.h>

#define ROWS 4   /* rows of x per pass: 3 weight rows x ROWS accumulators + 3 weights fit in the 16 ymm registers */
#define TILE 60  /* weight rows per tile (a multiple of 3): 60 x K x 2 bytes stay in L2 while every pass reads them */

static inline __m256 load8(const uint16_t *p, const int bf16) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    if (bf16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_hadd_ps(s, s);
    return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}

/* y[i, n..n+W-1] = x[i, :] . w[n+j, :] for i < m (<= ROWS) and W (1 or 3) weight rows; m and W
 * are compile-time constants after inlining.  Three weight rows against four rows of x make 12 independent
 * accumulators, enough to cover the FMA latency (4-5 cycles on two ports); the x operands are read by the FMAs
 * themselves, so 12 accumulators + 3 weights fit the 16 registers.  K % 8 == 0. */
static inline __attribute__((always_inline)) void micro(const float *x, const uint16_t *w, float *y, const int m,
                                                        const int W, const int64_t N, const int64_t K, int64_t n,
                                                        const int bf16, const int fetch) {
    __m256 acc[3][ROWS];
    for (int j = 0; j < W; j++)
        for (int i = 0; i < m; i++) acc[j][i] = _mm256_setzero_ps();
    const uint16_t *w0 = w + n * K;
    for (int64_t k = 0; k < K; k += 8) {
        __m256 v[3];
        /* the tile's last pass brings the next tile's rows into L2 (a 64-byte line per row every 32 values), so
         * the memory streams while the FMAs run: 10-20% faster at 2-16 rows over a 270M model's weights on a
         * 2-core AVX2 EPYC. */
        if (fetch && (k & 31) == 0)
            for (int j = 0; j < W && n + TILE + j < N; j++)
                _mm_prefetch((const char *)(w0 + (TILE + j) * K + k), _MM_HINT_T1);
        for (int j = 0; j < W; j++) v[j] = load8(w0 + j * K + k, bf16);
        for (int i = 0; i < m; i++) {
            __m256 xv = _mm256_loadu_ps(x + i * K + k);
            for (int j = 0; j < W; j++) acc[j][i] = _mm256_fmadd_ps(v[j], xv, acc[j][i]);
        }
    }
    for (int i = 0; i < m; i++)
        for (int j = 0; j < W; j++) y[i * N + n + j] = hsum(acc[j][i]);
}

/* one row of x (batch 1): each thread streams whole weight rows front to back (the hardware prefetcher's best
 * case) with 4 independent accumulators — measured 20 GB/s on a 2-core AVX2 EPYC over a 270M model's weights,
 * against 17-19 GB/s reading 2-8 rows side by side and 15 GB/s for PyTorch's fp16 matrix-vector product */
static inline __attribute__((always_inline)) float row_dot(const float *x, const uint16_t *row, const int64_t K,
                                                           const int bf16) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        a0 = _mm256_fmadd_ps(load8(row + k, bf16), _mm256_loadu_ps(x + k), a0);
        a1 = _mm256_fmadd_ps(load8(row + k + 8, bf16), _mm256_loadu_ps(x + k + 8), a1);
        a2 = _mm256_fmadd_ps(load8(row + k + 16, bf16), _mm256_loadu_ps(x + k + 16), a2);
        a3 = _mm256_fmadd_ps(load8(row + k + 24, bf16), _mm256_loadu_ps(x + k + 24), a3);
    }
    for (; k < K; k += 8) a0 = _mm256_fmadd_ps(load8(row + k, bf16), _mm256_loadu_ps(x + k), a0);
    return hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
}

/* guided: big shares first, then rows of 16 to whichever thread is free, so a core slowed by a neighbour on a
 * shared machine does not hold the other at the barrier (1.5-4% faster than equal halves over a 270M model's
 * weights on a 2-core AVX2 EPYC VM, in three interleaved runs) */
static void single_row(const float *x, const uint16_t *w, float *y, int64_t N, int64_t K, int bf16, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(guided, 16)
    for (int64_t n = 0; n < N; n++)
        y[n] = bf16 ? row_dot(x, w + n * K, K, 1) : row_dot(x, w + n * K, K, 0);
}

#define MICRO(m_)                                               \
    for (n = t0; n + 2 < t1; n += 3)                            \
        if (bf16) micro(xm, w, ym, m_, 3, N, K, n, 1, fetch);   \
        else micro(xm, w, ym, m_, 3, N, K, n, 0, fetch);        \
    for (; n < t1; n++)                                         \
        if (bf16) micro(xm, w, ym, m_, 1, N, K, n, 1, fetch);   \
        else micro(xm, w, ym, m_, 1, N, K, n, 0, fetch);        \
    break;

void elmtune_gemv16(const float *x, const uint16_t *w, float *y, int64_t M, int64_t N, int64_t K, int bf16,
                    int threads) {
    if (M == 1) {
        single_row(x, w, y, N, K, bf16, threads);
        return;
    }
    #pragma omp parallel num_threads(threads)
    {
        /* each thread owns a contiguous share of the weight rows (a multiple of 3) and runs every row of x over it */
        int64_t T = omp_get_num_threads(), share = ((N + T - 1) / T + 2) / 3 * 3;
        int64_t first = omp_get_thread_num() * share, last = first + share < N ? first + share : N;
        for (int64_t t0 = first; t0 < last; t0 += TILE) {
            int64_t t1 = t0 + TILE < last ? t0 + TILE : last;
            int64_t n;
            for (int64_t r = 0; r < M; r += ROWS) {
                const int fetch = r + ROWS >= M && t0 + TILE < last;  /* the tile's last pass */
                const float *xm = x + r * K;
                float *ym = y + r * N;
                switch (M - r < ROWS ? M - r : ROWS) {
                    case 4: MICRO(4)
                    case 3: MICRO(3)
                    case 2: MICRO(2)
                    default: MICRO(1)
                }
            }
        }
    }
}
