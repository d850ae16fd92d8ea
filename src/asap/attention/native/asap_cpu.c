/* The fused linear ASAP dual map for self-attention on the CPU, one pass per (batch, head).
 *
 * Built and loaded by asap.attention.native (plain C with GCC/Clang vector extensions, no Python or
 * torch headers: it compiles in about a second). The maths is SliceDualMap._forward_fused's
 * (asap/attention/dual_map.py): for every slice l, x_i = <theta_l, q_i> and y_j = <theta_l, k_j> over
 * the nv valid tokens, both sorted, the query of rank r gets
 *
 *     phi_l(r) = -scale coef_l sum_{s < r} ys_s (xs_{s+1} - xs_s),   phi_l(0) = 0,
 *
 * and
 *
 *     f_i = sum_l phi_l(rank_l(i)) + c_mean scale <q_i, kbar> + c_norm scale^2 |q_i|^2   (kbar: mean valid key),
 *
 * optionally centred over the valid queries. Padded queries get 0.
 *
 * Why a kernel: at the short sequences of real teachers the PyTorch path is ~25 small ops plus two
 * NumPy sorts of b*h*L short rows, and that fixed cost is most of ASAP's time. Here one head is one
 * pass over its tokens in cache, with the slices side by side in SIMD lanes (LANES per vector,
 * directions zero-padded to a multiple of LANES): all projections at once (project), every slice
 * ranked at once by branch-free counting (ranks), then scattered and summed in double.
 */
#include <stdint.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* Floats per vector: the build passes the widest the CPU has (-DASAP_LANES=16 with -mavx512f, 8 with
 * -mavx2; see asap/attention/native/__init__.py), since GCC lowers vectors wider than the registers
 * badly (a 16-lane vector on AVX2 went through memory and scalar comparisons: 3-8x slower than the
 * AVX-512 build on the same CPU). A build for an unknown CPU keeps 16 and lets the compiler lower them. */
#ifndef ASAP_LANES
#define ASAP_LANES 16
#endif
#define LANES ASAP_LANES
typedef float vfloat __attribute__((vector_size(4 * LANES)));
typedef int32_t vint __attribute__((vector_size(4 * LANES)));
/* Lanes of the integer vectors of the sorts and NaN checks: 16 where AVX-512 compares them natively, else 8
 * (GCC scalarises 16-lane integer comparisons combined into masks where the registers hold 8 lanes: 14x
 * slower on AVX2). LANES is a multiple of it. */
#if defined(__AVX512F__) && LANES % 16 == 0
#define SORT_LANES 16
#else
#define SORT_LANES 8
#endif
typedef int32_t vsort __attribute__((vector_size(4 * SORT_LANES)));
_Static_assert(LANES % SORT_LANES == 0, "LANES is a multiple of SORT_LANES");

/* Vector helpers are always inlined, so that their vectors stay in registers. */
#define VECTOR_HELPER static inline __attribute__((always_inline))

VECTOR_HELPER vfloat load(const float *p) {
    vfloat v;
    memcpy(&v, p, sizeof v);
    return v;
}

VECTOR_HELPER void store(float *p, vfloat v) { memcpy(p, &v, sizeof v); }

/* Lane-wise mask ? a : b, for a mask from a vector comparison (lanes -1 or 0); C has no vector ?:. */
VECTOR_HELPER vfloat vselect(vint mask, vfloat a, vfloat b) { return (vfloat)(((vint)a & mask) | ((vint)b & ~mask)); }

VECTOR_HELPER vfloat vmax(vfloat a, vfloat b) { return vselect(a > b, a, b); }

/* Sum of the LANES entries of v. */
VECTOR_HELPER float hsum(vfloat v) {
    float s = 0.0f;
    for (int l = 0; l < LANES; l++) s += v[l];
    return s;
}

/* Up to LANES entries p[0], p[stride], ... (count of them), zeros after: one chunk of a strided row. */
VECTOR_HELPER vfloat load_strided(const float *p, int64_t stride, int64_t count) {
    if (stride == 1 && count == LANES) return load(p);
    vfloat v = {0};
    for (int64_t l = 0; l < count; l++) v[l] = p[l * stride];
    return v;
}

/* The moment inputs over the nv valid tokens: the key sum kbar (d), the squared query norms qsq (nv)
 * and qk (nv), <q_t, kbar>. Features go LANES at a time, in the same order for every layout (so the
 * result is bit-equal for contiguous, transposed or sliced rows). */
static void moments(const float *q, const float *k, int64_t qn, int64_t qd, int64_t kn, int64_t kd,
                        const int64_t *tokens, int64_t nv, int64_t d, float *kbar, float *qsq, float *qk) {
    const int64_t dp = (d + LANES - 1) / LANES * LANES;
    for (int64_t e = 0; e < dp; e++) kbar[e] = 0.0f; /* padded to dp: the tail lanes stay 0 */
    for (int64_t t = 0; t < nv; t++) {
        const float *qi = q + tokens[t] * qn, *ki = k + tokens[t] * kn;
        vfloat sq = {0};
        for (int64_t e0 = 0; e0 < d; e0 += LANES) {
            const int64_t count = d - e0 < LANES ? d - e0 : LANES;
            const vfloat qv = load_strided(qi + e0 * qd, qd, count);
            sq += qv * qv;
            store(kbar + e0, load(kbar + e0) + load_strided(ki + e0 * kd, kd, count));
        }
        qsq[t] = hsum(sq);
    }
    for (int64_t t = 0; t < nv; t++) {
        const float *qi = q + tokens[t] * qn;
        vfloat dot = {0};
        for (int64_t e0 = 0; e0 < d; e0 += LANES) {
            const int64_t count = d - e0 < LANES ? d - e0 : LANES;
            dot += load_strided(qi + e0 * qd, qd, count) * load(kbar + e0);
        }
        qk[t] = hsum(dot);
    }
}

/* Projections of the nv valid tokens on the Lp (a multiple of LANES) directions dirs_t (d, Lp),
 * token-major into xl, yl (nv, Lp). TOKENS tokens at a time: their accumulators are independent, so
 * the multiply-adds overlap instead of waiting on one another, and each row of directions is loaded
 * once for all of them. */
#define TOKENS 4
static void project(const float *q, const float *k, int64_t qn, int64_t qd, int64_t kn, int64_t kd,
                        const int64_t *tokens, int64_t nv, int64_t d, int64_t Lp, const float *dirs_t, float *xl,
                        float *yl) {
    for (int64_t t0 = 0; t0 < nv; t0 += TOKENS) {
        const int64_t nt = nv - t0 < TOKENS ? nv - t0 : TOKENS;
        const float *qi[TOKENS], *ki[TOKENS];
        for (int64_t u = 0; u < TOKENS; u++) { /* a short last block repeats its last token */
            const int64_t t = t0 + (u < nt ? u : nt - 1);
            qi[u] = q + tokens[t] * qn;
            ki[u] = k + tokens[t] * kn;
        }
        for (int64_t l0 = 0; l0 < Lp; l0 += LANES) {
            vfloat ax[TOKENS] = {{0}}, ay[TOKENS] = {{0}};
            for (int64_t e = 0; e < d; e++) {
                const vfloat row = load(dirs_t + e * Lp + l0);
                for (int64_t u = 0; u < TOKENS; u++) {
                    ax[u] += row * qi[u][e * qd];
                    ay[u] += row * ki[u][e * kd];
                }
            }
            for (int64_t u = 0; u < nt; u++) {
                store(xl + (t0 + u) * Lp + l0, ax[u]);
                store(yl + (t0 + u) * Lp + l0, ay[u]);
            }
        }
    }
}

/* Ranks of every lane of v (n, Lp): rank[i][l] is the rank of v[i][l] among v[0..n-1][l], ties broken
 * by token index (each lane's ranks are a permutation). O(n^2) comparisons, but branch-free, LANES at
 * a time: for the short rows of real teachers this beats comparison sorts, whose branches mispredict
 * on random data and which sort one slice at a time. */
static void ranks(const float *v, int64_t n, int64_t Lp, int32_t *rank) {
    for (int64_t l0 = 0; l0 < Lp; l0 += LANES)
        for (int64_t i = 0; i < n; i++) {
            const vfloat vi = load(v + i * Lp + l0);
            vint r = {0};
            for (int64_t j = 0; j < i; j++) r -= load(v + j * Lp + l0) <= vi; /* a true comparison is -1 */
            for (int64_t j = i + 1; j < n; j++) r -= load(v + j * Lp + l0) < vi;
            memcpy(rank + i * Lp + l0, &r, sizeof r);
        }
}

/* Whether any of x[0..count) (count a multiple of SORT_LANES) is NaN: its bits, sign cleared, above
 * those of +inf. Integer comparisons in vectors of SORT_LANES, native on every x86-64 build (a 16-lane
 * float comparison outside the AVX-512 code was split into scalar ones: a fifth of the map at n = 32). */
static int any_nan(const float *x, int64_t count) {
    vsort found = {0};
    for (int64_t i = 0; i < count; i += SORT_LANES) {
        vsort bits;
        memcpy(&bits, x + i, sizeof bits);
        found |= (bits & 0x7fffffff) > 0x7f800000;
    }
    for (int l = 0; l < SORT_LANES; l++)
        if (found[l]) return 1;
    return 0;
}

/* The smallest power of 2 >= x (the row count of the bitonic sorts). */
static int64_t pow2_at_least(int64_t x) {
    int64_t r = 1;
    while (r < x) r <<= 1;
    return r;
}

/* Up to this many valid tokens the ranks are counted (O(n^2), no branches); above it the slices are
 * sorted by a bitonic network (O(n log^2 n)). Both give the same order: by value, ties by token index. */
#define RANKS_MAX_N 96

/* Every lane of v (nv, Lp) sorted by value, ties by token index, into sorted (P, Lp) with the token
 * indices in index (P, Lp), or the values only if index is NULL; P = nv rounded up to a power of 2, the
 * rows past nv padded with +inf and indices past nv, so that they sort last and the first nv rows are
 * the result. A bitonic sorting network: its compare-exchanges do not depend on the data, so the
 * SORT_LANES slices of a vector sort at once without a branch (a comparison sort takes one slice at a
 * time and mispredicts on random data). */
static void sort_lanes(const float *v, int64_t nv, int64_t Lp, float *sorted, int32_t *index) {
    const int64_t P = pow2_at_least(nv);
    /* The network compares integer keys (a float's bits, the negative ones' magnitude bits flipped, order
     * like the floats; -0 is made +0 first, so that it ties with 0 as a float comparison would) in
     * vectors of SORT_LANES (16 with AVX-512, where they are native, else 8). */
    int32_t *key = (int32_t *)sorted;
    for (int64_t r = 0; r < P; r++)
        for (int64_t l = 0; l < Lp; l++) {
            float x = r < nv ? v[r * Lp + l] + 0.0f : __builtin_inff();
            int32_t bits;
            memcpy(&bits, &x, sizeof bits);
            key[r * Lp + l] = bits ^ ((bits >> 31) & 0x7fffffff);
            if (index) index[r * Lp + l] = (int32_t)r;
        }
    for (int64_t l0 = 0; l0 < Lp; l0 += SORT_LANES)
        for (int64_t k = 2; k <= P; k <<= 1)
            for (int64_t j = k >> 1; j > 0; j >>= 1)
                for (int64_t i0 = 0; i0 < P; i0 += 2 * j) { /* the pairs (i, i + j), i's bit j clear */
                    const int descending = (i0 & k) != 0; /* the same for the whole run: 2 j <= k */
                    for (int64_t i = i0; i < i0 + j; i++) {
                        int32_t *ka = key + i * Lp + l0, *kb = key + (i + j) * Lp + l0;
                        vsort a, b;
                        memcpy(&a, ka, sizeof a);
                        memcpy(&b, kb, sizeof b);
                        vsort after = a > b; /* a belongs after b */
                        if (index) {         /* ties by token index */
                            int32_t *ia = index + i * Lp + l0, *ib = index + (i + j) * Lp + l0;
                            vsort ai, bi;
                            memcpy(&ai, ia, sizeof ai);
                            memcpy(&bi, ib, sizeof bi);
                            after |= (a == b) & (ai > bi);
                            if (descending) after = ~after;
                            const vsort ilo = (bi & after) | (ai & ~after), ihi = (ai & after) | (bi & ~after);
                            memcpy(ia, &ilo, sizeof ilo);
                            memcpy(ib, &ihi, sizeof ihi);
                        } else if (descending) {
                            after = ~after;
                        }
                        const vsort lo = (b & after) | (a & ~after), hi = (a & after) | (b & ~after);
                        memcpy(ka, &lo, sizeof lo);
                        memcpy(kb, &hi, sizeof hi);
                    }
                }
    for (int64_t r = 0; r < nv * Lp; r++) { /* keys back to floats, in place */
        const int32_t bits = key[r] ^ ((key[r] >> 31) & 0x7fffffff);
        memcpy(sorted + r, &bits, sizeof bits);
    }
}

/* exp of every lane (Cephes' single-precision polynomial after a base-2 range reduction, about 1 ulp
 * on [-87, 88]); below -87.3, including -inf, the result is exactly 0; NaN stays NaN. */

/* exp(x - fn ln 2) for |x - fn ln 2| <= ln 2 / 2 (ln 2 split in two constants, so that the reduction is
 * exact to float precision): Cephes' polynomial, shared by both versions of vexp below. */
VECTOR_HELPER vfloat exp_reduced(vfloat x, vfloat fn) {
    const vfloat r = x - fn * 0.693359375f + fn * 2.12194440e-4f;
    vfloat p = 1.9875691500e-4f * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    return p;
}

#if defined(__AVX512F__) && LANES == 16
/* AVX-512 has the reduction's two awkward steps as instructions: rounding (vrndscaleps) and the scaling by
 * 2^n (vscalefps, from a float n: no integer conversion, shift and add). Rounding to nearest instead of
 * Cephes' floor(t + 1/2) only differs at exact ties, where either n keeps |r| <= ln 2 / 2. */
VECTOR_HELPER vfloat vexp(vfloat x) {
    const __m512 v = (__m512)x;
    const __mmask16 underflow = _mm512_cmp_ps_mask(v, _mm512_set1_ps(-87.3f), _CMP_LT_OQ);
    const __m512 c = _mm512_min_ps(_mm512_set1_ps(88.0f), v); /* min(88, NaN) is the NaN */
    const vfloat fn = (vfloat)_mm512_roundscale_ps(_mm512_mul_ps(c, _mm512_set1_ps(1.44269504088896341f)),
                                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const vfloat p = exp_reduced((vfloat)c, fn);
    return (vfloat)_mm512_maskz_scalef_ps((__mmask16)~underflow, (__m512)p, (__m512)fn);
}
#else
VECTOR_HELPER vfloat vexp(vfloat x) {
    const vint underflow = x < -87.3f;
    x = vselect(x > 88.0f, (vfloat){0} + 88.0f, x);
    x = vselect(underflow, (vfloat){0}, x); /* keep the reduction finite; those lanes are zeroed at the end */
    vfloat t = x * 1.44269504088896341f + 0.5f;
    vint n = __builtin_convertvector(t, vint);
    n += __builtin_convertvector(n, vfloat) > t; /* truncation to floor: a true comparison is -1 */
    const vfloat fn = __builtin_convertvector(n, vfloat);
    const vfloat p = exp_reduced(x, fn);
    vint bits = (n + 127) << 23;
    vfloat scale;
    memcpy(&scale, &bits, sizeof scale);
    vfloat out = vselect(underflow, (vfloat){0}, p * scale);
    return vselect(x != x, x, out); /* NaN stays NaN (the reduction above would make it finite) */
}
#endif

VECTOR_HELPER float hmax(vfloat v) {
    float m = v[0];
    for (int l = 1; l < LANES; l++) m = v[l] > m ? v[l] : m;
    return m;
}

/* What one call computes. */
typedef struct {
    const float *q, *k, *v;     /* (b, h, n, d), (b, h, n, d), (b, h, n, dv), any strides */
    int64_t b, h, n, d, dv, L, Lp;  /* Lp: L rounded up to a multiple of LANES */
    int64_t qs[4], ks[4], vs[4];    /* strides in elements: batch, head, token, feature */
    const float *f_in;          /* (b, h, n) given query dual, or NULL: the dual map below computes it */
    int64_t fs[3];
    const float *dirs;          /* (h, L, d), contiguous */
    const float *coef;          /* (h, L), contiguous: slice coefficients */
    const float *c_mean;        /* (h) with stride cms, or NULL: coefficient of scale <q_i, kbar> */
    const float *c_norm;        /* (h) with stride cns, or NULL: coefficient of scale^2 |q_i|^2 */
    const float *c_lse;         /* (h) with stride cls, or NULL: coefficient of log mean_j exp(scale S_ij), closure only */
    int64_t cms, cns, cls;
    double scale, eps;
    const uint8_t *valid;       /* (b, n) with strides ms[0], ms[1], or NULL */
    int64_t ms[2];
    int center;
    float *f_out;               /* (b, h, n) contiguous, or NULL: the query dual */
    float *out;                 /* (b, h, n, dv) contiguous, or NULL: the attention output */
} problem_t;

/* The scratch of one call, carved from one allocation (8-byte items first) and reused for every head. */
typedef struct {
    double *f;                         /* (n) query dual of the valid tokens */
    int64_t *tokens;                   /* (n) indices of the valid tokens */
    int32_t *rank_x, *rank_y, *order;  /* (P, Lp), P = n rounded up to a power of 2: x's and y's ranks; the token of each rank of x */
    float *xl, *yl, *xs, *ys;          /* (n, Lp) projections of the valid tokens; (P, Lp) sorted */
    float *dirs_t, *kbar, *qsq, *qk;   /* (h, d, Lp) every head's directions, transposed and zero-padded; (d padded to LANES); (n); (n) */
    uint8_t *dirs_ready;               /* (h) whether dirs_t holds that head's (filled on first use: once per head, not per problem) */
    float *scores, *kt, *vp;           /* closure: (n, mp), (d, mp), (n, dvp); mp, dvp: n, dv padded to LANES */
    float *colsum, *weight;            /* (mp) each: column sums, then weights; column maxima */
} workspace_t;

static int64_t padded(int64_t x) { return (x + LANES - 1) / LANES * LANES; }

static char *workspace_alloc(workspace_t *w, const problem_t *p) {
    const int64_t n = p->n, d = p->d, Lp = p->Lp, mp = padded(p->n), dvp = padded(p->dv), P = pow2_at_least(p->n);
    const int closure = p->out != NULL, dual = p->f_in == NULL;
    const size_t floats = (dual ? (size_t)(2 * n * Lp + 2 * P * Lp + p->h * d * Lp + padded(d) + 2 * n) : 0) +
                          (closure ? (size_t)(n * mp + d * mp + n * dvp + 2 * mp) : 0);
    const size_t bytes = sizeof(double) * (size_t)n + sizeof(int64_t) * (size_t)n +
                         (dual ? sizeof(int32_t) * (size_t)(3 * P * Lp) + (size_t)p->h : 0) + sizeof(float) * floats + 64;
    char *buf = (char *)malloc(bytes);
    if (!buf) return NULL;
    memset(w, 0, sizeof(*w));
    w->f = (double *)buf;
    w->tokens = (int64_t *)(w->f + n);
    float *next = (float *)(w->tokens + n);
    if (dual) {
        w->rank_x = (int32_t *)next;
        w->rank_y = w->rank_x + P * Lp;
        w->order = w->rank_y + P * Lp;
        w->xl = (float *)(w->order + P * Lp);
        w->yl = w->xl + n * Lp;
        w->xs = w->yl + n * Lp;
        w->ys = w->xs + P * Lp;
        w->dirs_t = w->ys + P * Lp;
        w->kbar = w->dirs_t + p->h * d * Lp;
        w->qsq = w->kbar + padded(d);
        w->qk = w->qsq + n;
        next = w->qk + n;
    }
    if (closure) {
        w->scores = next;
        w->kt = w->scores + n * mp;
        w->vp = w->kt + d * mp;
        w->colsum = w->vp + n * dvp;
        w->weight = w->colsum + mp;
        next = w->weight + mp;
    }
    if (dual) {
        w->dirs_ready = (uint8_t *)next;
        memset(w->dirs_ready, 0, (size_t)p->h);
    }
    return buf;
}

/* f (nv) minus its mean: the centred dual. */
static void subtract_mean(double *f, int64_t nv) {
    double mean = 0.0;
    for (int64_t t = 0; t < nv; t++) mean += f[t];
    mean /= (double)nv;
    for (int64_t t = 0; t < nv; t++) f[t] -= mean;
}

/* The linear dual map of one head: f (nv) over the valid tokens, centred if asked. */
static void dual_map_head(const problem_t *p, int64_t bi, int64_t hi, int64_t nv, const workspace_t *w) {
    const int64_t d = p->d, L = p->L, Lp = p->Lp;
    const float *q = p->q + bi * p->qs[0] + hi * p->qs[1];
    const float *k = p->k + bi * p->ks[0] + hi * p->ks[1];
    const int64_t *tokens = w->tokens;
    double *f = w->f;

    float *dirs_t = w->dirs_t + hi * d * Lp;
    if (!w->dirs_ready[hi]) {
        const float *dirs = p->dirs + hi * L * d;
        for (int64_t e = 0; e < d; e++)
            for (int64_t l = 0; l < Lp; l++) dirs_t[e * Lp + l] = l < L ? dirs[l * d + e] : 0.0f;
        w->dirs_ready[hi] = 1;
    }
    project(q, k, p->qs[2], p->qs[3], p->ks[2], p->ks[3], tokens, nv, d, Lp, dirs_t, w->xl, w->yl);

    /* the moment extras: f_t = c_mean scale <q_t, kbar> + c_norm scale^2 |q_t|^2 (kbar from the key sum) */
    const double c_mean = p->c_mean ? p->c_mean[hi * p->cms] * p->scale / (double)nv : 0.0;
    const double c_norm = p->c_norm ? p->c_norm[hi * p->cns] * p->scale * p->scale : 0.0;
    for (int64_t t = 0; t < nv; t++) f[t] = 0.0;
    if (c_mean != 0.0 || c_norm != 0.0) {
        moments(q, k, p->qs[2], p->qs[3], p->ks[2], p->ks[3], tokens, nv, d, w->kbar, w->qsq, w->qk);
        for (int64_t t = 0; t < nv; t++) f[t] = c_mean * w->qk[t] + c_norm * w->qsq[t];
    }

    /* a NaN projection would make the ranks collide (it compares false with everything): the dual
     * becomes NaN instead, as the PyTorch path's would */
    if (any_nan(w->xl, nv * Lp) || any_nan(w->yl, nv * Lp)) {
        for (int64_t t = 0; t < nv; t++) f[t] = __builtin_nan("");
        return;
    }

    /* sort every slice (xs, ys, and order: the token of each rank of x), then one running sum per slice
     * added to the queries by rank */
    if (nv <= RANKS_MAX_N) {
        ranks(w->xl, nv, Lp, w->rank_x);
        ranks(w->yl, nv, Lp, w->rank_y);
        for (int64_t t = 0; t < nv; t++)
            for (int64_t l = 0; l < L; l++) {
                const int64_t rx = w->rank_x[t * Lp + l] * Lp + l;
                w->xs[rx] = w->xl[t * Lp + l];
                w->order[rx] = (int32_t)t;
                w->ys[w->rank_y[t * Lp + l] * Lp + l] = w->yl[t * Lp + l];
            }
    } else {
        sort_lanes(w->xl, nv, Lp, w->xs, w->order);
        sort_lanes(w->yl, nv, Lp, w->ys, NULL); /* y's order is not needed, only its sorted values */
    }
    const float *coef = p->coef + hi * L;
    for (int64_t l = 0; l < L; l++) {
        const double c = -p->scale * coef[l];
        const float *xs = w->xs + l, *ys = w->ys + l;
        const int32_t *order = w->order + l;
        double acc = 0.0;
        for (int64_t r = 1; r < nv; r++) {
            acc += c * (double)ys[(r - 1) * Lp] * ((double)xs[r * Lp] - (double)xs[(r - 1) * Lp]);
            f[order[r * Lp]] += acc;
        }
    }
    if (p->center) subtract_mean(f, nv);
}

/* kt (d, mp) = the nv valid keys (token j at k + tokens[j] * kn, feature e at + e * kd) transposed, zero
 * past nv, one masked vector gather per LANES keys and feature; returns 0 (nothing written) where the
 * build has no gathers (generic) or an offset does not fit 32 bits. */
static int transpose_keys_gather(const float *k, const int64_t *tokens, int64_t nv, int64_t d, int64_t kn,
                                     int64_t kd, int64_t mp, float *kt) {
#if (defined(__AVX512F__) && LANES == 16) || (defined(__AVX2__) && LANES == 8)
    if (kn < 0 || kd < 0 || (nv > 0 && (tokens[nv - 1] * kn + (d - 1) * kd) > INT32_MAX)) return 0;
    for (int64_t j0 = 0; j0 < mp; j0 += LANES) {
        vint rows = {0}, valid = {0}; /* the keys of this block are a prefix of it */
        for (int l = 0; l < LANES && j0 + l < nv; l++) {
            rows[l] = (int32_t)(tokens[j0 + l] * kn);
            valid[l] = -1;
        }
#if LANES == 16
        const __mmask16 mask = nv - j0 >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (nv - j0)) - 1u);
        (void)valid;
#endif
        for (int64_t e = 0; e < d; e++) {
            const vint offsets = rows + (int32_t)(e * kd);
#if LANES == 16
            const vfloat got = (vfloat)_mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask, (__m512i)offsets, k, 4);
#else
            const vfloat got = (vfloat)_mm256_mask_i32gather_ps(_mm256_setzero_ps(), k, (__m256i)offsets,
                                                                 (__m256)valid, 4);
#endif
            store(kt + e * mp + j0, got);
        }
    }
    return 1;
#else
    (void)k, (void)tokens, (void)nv, (void)d, (void)kn, (void)kd, (void)mp, (void)kt;
    return 0;
#endif
}

/* The closure's elementwise passes on one block of scores (the maths of asap/attention/closure.py), shared
 * by the one-call path (closure_head, whose GEMM writes W_ij = alpha S_ij + bias_i itself: raw = 0) and the
 * split path (closure_block, on the S_ij of torch's GEMM: raw = 1). Rows of ld floats, the first m columns
 * used (the rest masked: whole vectors only, since a partial vector per row costs more than the passes at
 * short rows). With raw a constant at each call, the compiler drops the affine step where it is 0. */

/* W_ij - c_j for the LANES columns from j0, -inf past column m. */
VECTOR_HELPER vfloat shifted(const float *row, int64_t j0, float alpha, float b, const float *colmax, int64_t m,
                             vint lane, int raw) {
    const vfloat w = raw ? load(row + j0) * alpha + b : load(row + j0);
    return vselect(lane + (int32_t)j0 < (int32_t)m, w - load(colmax + j0), (vfloat){0} - __builtin_inff());
}

/* Per row, r_i = max_j (W_ij - c_j) <= 0 (finite: a valid row has a valid key), then in place
 * E_ij = exp(W_ij - c_j - r_i) (0 past column m) and colsum_j = sum_i E_ij e^{r_i}. The row is read twice
 * while it is in L1 and written once. */
VECTOR_HELPER void exponentials(float *s, int64_t ld, const float *bias, float alpha, int64_t n, int64_t m,
                                const float *colmax, float *colsum, int raw) {
    vint lane;
    for (int l = 0; l < LANES; l++) lane[l] = l;
    for (int64_t j0 = 0; j0 < ld; j0 += LANES) store(colsum + j0, (vfloat){0});
    for (int64_t i = 0; i < n; i++) {
        float *row = s + i * ld;
        const float b = raw ? bias[i] : 0.0f;
        vfloat rmax = (vfloat){0} - __builtin_inff();
        for (int64_t j0 = 0; j0 < ld; j0 += LANES) {
            const vfloat x = shifted(row, j0, alpha, b, colmax, m, lane, raw);
            store(row + j0, x);
            rmax = vmax(x, rmax);
        }
        const float r = hmax(rmax);
        const float er = __builtin_expf(r);
        for (int64_t j0 = 0; j0 < ld; j0 += LANES) {
            const vfloat e = vexp(load(row + j0) - r);
            store(row + j0, e);
            store(colsum + j0, load(colsum + j0) + e * er);
        }
    }
}

/* In place, colsum_j becomes the weight w_j = 1 / colsum_j (0 past column m). */
VECTOR_HELPER void invert_column_sums(float *colsum, int64_t ld, int64_t m) {
    for (int64_t j = 0; j < ld; j++) colsum[j] = j < m ? 1.0f / colsum[j] : 0.0f;
}

/* One row of E in place becomes E_ij w_j (the row softmax up to its factor); returns its sum, the row's
 * denominator. */
VECTOR_HELPER float weigh_row(float *row, const float *weight, int64_t ld) {
    vfloat total = {0};
    for (int64_t j0 = 0; j0 < ld; j0 += LANES) {
        const vfloat e = load(row + j0) * load(weight + j0);
        store(row + j0, e);
        total += e;
    }
    return hsum(total);
}

/* ASAP's closure on the nv valid tokens of one head, with one exponential per score (the maths of
 * asap/attention/closure.py): W_ij = (S_ij + f_i)/eps - c_j - r_i with c_j the column max and r_i the
 * row max after it, E = exp(W), w_j = 1 / sum_i E_ij e^{r_i}, out_i = sum_j E_ij w_j v_j / sum_j E_ij w_j. */
static void closure_head(const problem_t *p, int64_t bi, int64_t hi, int64_t nv, const workspace_t *w,
                             float *out) {
    const int64_t d = p->d, dv = p->dv, mp = padded(nv), dvp = padded(dv);
    const float *q = p->q + bi * p->qs[0] + hi * p->qs[1];
    const float *k = p->k + bi * p->ks[0] + hi * p->ks[1];
    const float *v = p->v + bi * p->vs[0] + hi * p->vs[1];
    const int64_t *tokens = w->tokens;
    const float alpha = (float)(p->scale / p->eps), minus_inf = -__builtin_inff();
    float *scores = w->scores, *kt = w->kt, *vp = w->vp;
    vint lane;
    for (int l = 0; l < LANES; l++) lane[l] = l;

    /* keys transposed, (d, mp), zero past nv; values, (nv, dvp), zero past dv. The keys by vector gathers
     * where the build has them and the offsets fit 32 bits, else row by row with one row pointer each
     * (these copies were a fifth of the whole call at n = 32 when every element recomputed its address);
     * whole value rows copied where their features are contiguous. */
    if (!transpose_keys_gather(k, tokens, nv, d, p->ks[2], p->ks[3], mp, kt)) {
        for (int64_t j = 0; j < nv; j++) {
            const float *key = k + tokens[j] * p->ks[2];
            for (int64_t e = 0; e < d; e++) kt[e * mp + j] = key[e * p->ks[3]];
        }
        for (int64_t e = 0; e < d; e++)
            for (int64_t j = nv; j < mp; j++) kt[e * mp + j] = 0.0f;
    }
    for (int64_t j = 0; j < nv; j++) {
        const float *value = v + tokens[j] * p->vs[2];
        float *row = vp + j * dvp;
        if (p->vs[3] == 1) {
            memcpy(row, value, sizeof(float) * (size_t)dv);
        } else {
            for (int64_t c = 0; c < dv; c++) row[c] = value[c * p->vs[3]];
        }
        for (int64_t c = dv; c < dvp; c++) row[c] = 0.0f;
    }

    /* scores (S + f)/eps, -inf at padding keys, TOKENS rows at a time (independent multiply-add chains,
     * one load of keys for all); column maxima. With the lse_keys feature (c_lse), the product writes the
     * block's rows as scale S_ij instead; each row's log mean_j exp(scale S_ij) is then added to its dual while
     * the block is in L1 and the row becomes (scale S_ij + f_i)/eps, with the column maxima: one more pass over
     * the block, no second product. */
    float *colmax = w->weight, *colsum = w->colsum;
    for (int64_t j0 = 0; j0 < mp; j0 += LANES) store(colmax + j0, (vfloat){0} + minus_inf);
    const int lse = p->c_lse != NULL;
    const double beta = lse ? p->c_lse[hi * p->cls] : 0.0, log_nv = __builtin_log((double)nv);
    const float product = lse ? (float)p->scale : alpha, inv_eps = (float)(1.0 / p->eps);
    for (int64_t i0 = 0; i0 < nv; i0 += TOKENS) {
        const int64_t rows = nv - i0 < TOKENS ? nv - i0 : TOKENS;
        const float *qi[TOKENS];
        float bias[TOKENS];
        for (int64_t u = 0; u < TOKENS; u++) { /* a short last block repeats its last row */
            const int64_t i = i0 + (u < rows ? u : rows - 1);
            qi[u] = q + tokens[i] * p->qs[2];
            bias[u] = lse ? 0.0f : (float)(w->f[i] / p->eps);
        }
        for (int64_t j0 = 0; j0 < mp; j0 += LANES) {
            vfloat acc[TOKENS] = {{0}};
            for (int64_t e = 0; e < d; e++) {
                const vfloat key = load(kt + e * mp + j0);
                for (int64_t u = 0; u < TOKENS; u++) acc[u] += key * qi[u][e * p->qs[3]];
            }
            vfloat m = load(colmax + j0);
            const vint key = lane + (int32_t)j0 < (int32_t)nv; /* a valid key */
            for (int64_t u = 0; u < rows; u++) {
                const vfloat sc = vselect(key, acc[u] * product + bias[u], (vfloat){0} + minus_inf);
                store(scores + (i0 + u) * mp + j0, sc);
                m = vmax(sc, m);
            }
            if (!lse) store(colmax + j0, m);
        }
        for (int64_t u = 0; u < rows && lse; u++) { /* the block's rows are scale S_ij, in L1 */
            float *row = scores + (i0 + u) * mp;
            vfloat top = (vfloat){0} + minus_inf, total = {0};
            for (int64_t j0 = 0; j0 < mp; j0 += LANES) top = vmax(load(row + j0), top);
            const float r = hmax(top); /* finite: a valid row has a valid key */
            for (int64_t j0 = 0; j0 < mp; j0 += LANES) total += vexp(load(row + j0) - r);
            w->f[i0 + u] += beta * ((double)r + __builtin_log((double)hsum(total)) - log_nv);
            const float fi = (float)w->f[i0 + u];
            for (int64_t j0 = 0; j0 < mp; j0 += LANES) {
                const vfloat sc = (load(row + j0) + fi) * inv_eps; /* -inf stays -inf */
                store(row + j0, sc);
                store(colmax + j0, vmax(sc, load(colmax + j0)));
            }
        }
    }
    exponentials(scores, mp, NULL, 1.0f, nv, nv, colmax, colsum, 0);
    invert_column_sums(colsum, mp, nv);
    /* rows: out_i = sum_j E_ij w_j v_j / sum_j E_ij w_j, TOKENS rows at a time, each row weighed right
     * before the GEMM reads it (in L1) */
    const float *weight = colsum;
    float inv[TOKENS];
    for (int64_t i0 = 0; i0 < nv; i0 += TOKENS) {
        const int64_t rows = nv - i0 < TOKENS ? nv - i0 : TOKENS;
        const float *erow[TOKENS];
        for (int64_t u = 0; u < TOKENS; u++) { /* a short last block repeats its last row */
            const int64_t i = i0 + (u < rows ? u : rows - 1);
            float *row = scores + i * mp;
            if (u < rows) inv[u] = 1.0f / weigh_row(row, weight, mp);
            erow[u] = row;
        }
        for (int64_t c0 = 0; c0 < dvp; c0 += LANES) {
            vfloat acc[TOKENS] = {{0}};
            for (int64_t j = 0; j < nv; j++) {
                const vfloat value = load(vp + j * dvp + c0);
                for (int64_t u = 0; u < TOKENS; u++) acc[u] += value * erow[u][j];
            }
            for (int64_t u = 0; u < rows; u++) {
                float *o = out + tokens[i0 + u] * dv;
                const vfloat r = acc[u] * inv[u];
                if (c0 + LANES <= dv) {
                    store(o + c0, r);
                } else {
                    for (int64_t c = c0; c < dv; c++) o[c] = r[c - c0];
                }
            }
        }
    }
}

static void run_head(const problem_t *p, int64_t bh, const workspace_t *w) {
    const int64_t n = p->n;
    const int64_t bi = bh / p->h, hi = bh % p->h;
    int64_t nv = 0; /* valid tokens, in file order */
    for (int64_t i = 0; i < n; i++)
        if (!p->valid || p->valid[bi * p->ms[0] + i * p->ms[1]]) w->tokens[nv++] = i;
    float *out = p->out ? p->out + bh * n * p->dv : NULL;
    if (out) memset(out, 0, sizeof(float) * (size_t)(n * p->dv)); /* padded queries output 0 */
    if (p->f_out) memset(p->f_out + bh * n, 0, sizeof(float) * (size_t)n);
    if (nv == 0) return;
    if (p->f_in) {
        const float *f = p->f_in + bi * p->fs[0] + hi * p->fs[1];
        for (int64_t t = 0; t < nv; t++) w->f[t] = f[w->tokens[t] * p->fs[2]];
    } else {
        dual_map_head(p, bi, hi, nv, w);
    }
    if (out) closure_head(p, bi, hi, nv, w, out); /* with c_lse, it adds the lse_keys term to w->f */
    if (p->c_lse && p->center) subtract_mean(w->f, nv); /* that term undid the dual map's centring */
    if (p->f_out)
        for (int64_t t = 0; t < nv; t++) p->f_out[bh * n + w->tokens[t]] = (float)w->f[t];
}

/* Sharp attention drives exponentials towards FLT_MIN, and x86 CPUs take a slow path for every
 * operation on a subnormal number; a call therefore flushes them to zero (FTZ and DAZ, restored
 * on exit). The flushed terms are below 1.2e-38 next to row and column sums of at least 1 (every row
 * and column of E holds a 1), so the result moves by less than that. Other targets keep their default. */
#if defined(__x86_64__) || defined(__i386__)
#define FLUSH_SUBNORMALS_BEGIN const unsigned int saved_csr = _mm_getcsr(); _mm_setcsr(saved_csr | 0x8040u);
#define FLUSH_SUBNORMALS_END _mm_setcsr(saved_csr);
#else
#define FLUSH_SUBNORMALS_BEGIN
#define FLUSH_SUBNORMALS_END
#endif

/* Runs heads [first, last) on the calling thread with its own workspace (and its own FTZ/DAZ: the
 * control register is per thread). Returns 0 on success, 1 if the workspace could not be allocated. */
static int run_heads(const problem_t *p, int64_t first, int64_t last) {
    if (first >= last) return 0;
    FLUSH_SUBNORMALS_BEGIN
    workspace_t w;
    char *buf = workspace_alloc(&w, p);
    if (buf) {
        for (int64_t bh = first; bh < last; bh++) run_head(p, bh, &w);
        free(buf);
    }
    FLUSH_SUBNORMALS_END
    return buf ? 0 : 1;
}

/* Splits the b*h heads into `threads` contiguous runs of (almost) equal length, one per OpenMP thread.
 * Built with -fopenmp, the library's libgomp.so.1 is the one torch already loaded (the dynamic linker
 * matches the soname), so these threads are torch's own pool: they are awake right after torch's ops and
 * never compete with it. Heads are independent, so the result does not depend on the split. */
static int run_problem(const problem_t *p, int threads) {
    const int64_t heads = p->b * p->h;
    if (threads > heads) threads = (int)heads;
#ifdef _OPENMP
    if (threads > 1) {
        int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
        {
            const int64_t part = omp_get_thread_num(), parts = omp_get_num_threads();
            failed |= run_heads(p, heads * part / parts, heads * (part + 1) / parts);
        }
        return failed;
    }
#endif
    return run_heads(p, 0, heads);
}

/* 1 if the library was built with OpenMP (the `threads` argument is honoured), else 0. */
int asap_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

static void copy_strides(int64_t *dst, const int64_t *src, int count) {
    for (int i = 0; i < count; i++) dst[i] = src ? src[i] : 0;
}

/* The elementwise passes of the one-exponential closure on one score block that torch's GEMM wrote
 * (asap/attention/closure.py has the algebra): s (n, ld), ld a multiple of LANES, holds S_ij in its
 * first m columns (the rest is scratch) and bias (n) holds f_i / eps, so W_ij = alpha s_ij + bias_i
 * (alpha = scale / eps > 0). In place, s becomes E_ij w_j (0 past column m), with E_ij =
 * exp(W_ij - c_j - r_i) (c_j the column maxima of W, r_i <= 0 the row maxima of W - c) and
 * w_j = 1 / sum_i E_ij e^{r_i}; den (n) gets sum_j E_ij w_j, so that the rows are (s v) / den.
 * Four passes over the block (column maxima; per row, its maximum and then its exponentials while the
 * row is in L1; the weights) where the PyTorch ops take nine. colmax, colsum: scratch (ld). */
static void closure_block(float *s, int64_t ld, const float *bias, float alpha, int64_t n, int64_t m,
                              float *colmax, float *colsum, float *den) {
    vint lane;
    for (int l = 0; l < LANES; l++) lane[l] = l;
    for (int64_t j0 = 0; j0 < ld; j0 += LANES) store(colmax + j0, (vfloat){0} - __builtin_inff());
    for (int64_t i = 0; i < n; i++) {
        const float *row = s + i * ld;
        for (int64_t j0 = 0; j0 < ld; j0 += LANES) {
            const vfloat w = vselect(lane + (int32_t)j0 < (int32_t)m, load(row + j0) * alpha + bias[i],
                                     (vfloat){0} - __builtin_inff());
            store(colmax + j0, vmax(w, load(colmax + j0)));
        }
    }
    exponentials(s, ld, bias, alpha, n, m, colmax, colsum, 1);
    invert_column_sums(colsum, ld, m);
    for (int64_t i = 0; i < n; i++) den[i] = weigh_row(s + i * ld, colsum, ld);
}

/* The entry point (see asap/attention/native/__init__.py). v, out NULL: the dual map only (into
 * f_out); f_in given: the closure from it; neither: the whole ASAP forward. */
int asap_forward_f32(const float *q, const float *k, const float *v, int64_t b, int64_t h, int64_t n, int64_t d,
                     int64_t dv, const int64_t *q_strides, const int64_t *k_strides, const int64_t *v_strides,
                     const float *f_in, const int64_t *f_strides, int64_t L, const float *dirs, const float *coef,
                     const float *c_mean, int64_t c_mean_stride, const float *c_norm, int64_t c_norm_stride,
                     const float *c_lse, int64_t c_lse_stride,
                     double scale, double eps, const uint8_t *valid, const int64_t *valid_strides, int center,
                     float *f_out, float *out, int threads) {
    if (c_lse && !out) return 2; /* the lse_keys term is formed from the closure's scores */
    problem_t p = {.q = q, .k = k, .v = v, .b = b, .h = h, .n = n, .d = d, .dv = dv, .L = L, .Lp = padded(L),
                   .f_in = f_in, .dirs = dirs, .coef = coef, .c_mean = c_mean, .cms = c_mean_stride,
                   .c_norm = c_norm, .cns = c_norm_stride, .c_lse = c_lse, .cls = c_lse_stride,
                   .scale = scale, .eps = eps, .valid = valid,
                   .center = center, .f_out = f_out, .out = out};
    copy_strides(p.qs, q_strides, 4);
    copy_strides(p.ks, k_strides, 4);
    copy_strides(p.vs, v_strides, 4);
    copy_strides(p.fs, f_strides, 3);
    copy_strides(p.ms, valid_strides, 2);
    return run_problem(&p, threads);
}

/* Entry point of the closure's elementwise passes over c score blocks (see closure_block), the blocks
 * split over `threads` OpenMP threads: s (c, n, ld) with m <= ld columns used, bias (c, n), den (c, n), all
 * contiguous. Returns 0, 1 if the scratch could not be allocated, 2 if ld is not a multiple of LANES. */
int asap_closure_blocks_f32(float *s, int64_t c, int64_t n, int64_t m, int64_t ld, const float *bias, double alpha,
                            float *den, int threads) {
    if (ld % LANES != 0 || ld < m) return 2;
    if (threads > c) threads = (int)c;
    if (threads < 1) threads = 1;
    int failed = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) reduction(| : failed) if (threads > 1)
#endif
    {
        int64_t part = 0, parts = 1;
#ifdef _OPENMP
        part = omp_get_thread_num();
        parts = omp_get_num_threads();
#endif
        float *scratch = (float *)malloc(sizeof(float) * (size_t)(2 * ld));
        if (!scratch) {
            failed |= 1;
        } else {
            FLUSH_SUBNORMALS_BEGIN
            for (int64_t p = c * part / parts; p < c * (part + 1) / parts; p++)
                closure_block(s + p * n * ld, ld, bias + p * n, (float)alpha, n, m, scratch, scratch + ld, den + p * n);
            FLUSH_SUBNORMALS_END
            free(scratch);
        }
    }
    return failed;
}
