/* The CPU kernels of haskd's "native" sparse conv backend (haskd/sparse/native.py compiles this file at first use).
 *
 * A sparse conv is out[o] += W_k x[i] over the pairs (i, o) of every kernel offset k (haskd/sparse/torch_backend.py).
 * The torch backend runs it as three passes over memory: gather the pairs' input rows into a (P, Cin) buffer, one
 * GEMM per offset into a (P, Cout) buffer, and a CSR reduction of that buffer into the output rows. For the narrow
 * levels of a UNet (32-64 channels) those passes cost as much as the GEMMs. Here the three are one loop: a block of
 * RB pairs reads its input rows in place, multiplies them by the offset's weight in registers and adds the result to
 * its output rows, while the rows PF blocks ahead are prefetched (pairs are in spatial order, but the rows are still
 * scattered: without the prefetch the loop waits on memory). The weight gradient gathers CH pairs at a time into two
 * small buffers that stay in cache and accumulates x^T g over them in a register tile.
 *
 * Plain C with GCC/Clang vector extensions: no intrinsics, so the compiler picks the widest vectors of the machine it
 * compiles on (-march=native). One thread, deterministic: the sums are taken in the same order on every run.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* vf: one register of the widest vector unit the compiler targets; register tiles of RB (forward) or WRB (weight
   gradient) rows by 2 registers: 8 or 16 accumulators, within the 16 registers of AVX2 / NEON, 32 of AVX-512 */
#if defined(__AVX512F__)
typedef float vf __attribute__((vector_size(64)));
#define VW 16 /* floats per vf */
#define WRB 8
#else
typedef float vf __attribute__((vector_size(32)));
#define VW 8
#define WRB 4
#endif
#define RB 4                                        /* pairs per register block */
#define PF 4                                        /* forward: prefetch the rows this many blocks ahead */
#define CH 256                                      /* weight gradient: pairs gathered at a time */
#define WPF 16                                      /* weight gradient: prefetch the rows this many pairs ahead */

static inline vf vload(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void vstore(float *p, vf v) { memcpy(p, &v, sizeof v); }

static inline void prefetch_row(const float *row, int64_t c, int write)
{
    const char *b = (const char *)row;
    for (int64_t off = 0; off < c * (int64_t)sizeof(float); off += 64) {
        if (write)
            __builtin_prefetch(b + off, 1, 3);
        else
            __builtin_prefetch(b + off, 0, 3);
    }
}

/* out[oi[p]] += x[in[p]] @ w for the n pairs of one offset; w: (cin, cout) row-major */
static inline float dot(const float *a, const float *b, int64_t n)
{
    vf acc = {0};
    int64_t k = 0;
    for (; k + VW <= n; k += VW) acc += vload(a + k) * vload(b + k);
    float s = 0;
    for (int j = 0; j < VW; j++) s += acc[j];
    for (; k < n; k++) s += a[k] * b[k];
    return s;
}

/* out[oi[p]] += x[in[p]] @ w for the n pairs of one offset; w: (cin, cout) row-major; wt: scratch for cin x VW
   floats, where the columns left over after the vector tiles are copied transposed (dot products along cin) */
static void fwd_offset(const float *x, int64_t cin, const float *w, int64_t cout, const int64_t *in,
                       const int64_t *oi, int64_t n, float *out, float *wt)
{
    int64_t c_rem = cout - cout % VW, nrem = cout % VW;
    for (int64_t j = 0; j < nrem; j++)
        for (int64_t k = 0; k < cin; k++) wt[j * cin + k] = w[k * cout + c_rem + j];
    int64_t p = 0;
    for (; p + RB <= n; p += RB) {
        const float *xr[RB];
        float *orow[RB];
        for (int r = 0; r < RB; r++) {
            xr[r] = x + in[p + r] * cin;
            orow[r] = out + oi[p + r] * cout;
        }
        if (p + (PF + 1) * RB <= n)
            for (int r = 0; r < RB; r++) {
                prefetch_row(x + in[p + PF * RB + r] * cin, cin, 0);
                prefetch_row(out + oi[p + PF * RB + r] * cout, cout, 1);
            }
        int64_t c = 0;
        for (; c + 2 * VW <= cout; c += 2 * VW) {
            vf a0[RB], a1[RB];
            for (int r = 0; r < RB; r++) a0[r] = a1[r] = (vf){0};
            for (int64_t k = 0; k < cin; k++) {
                vf w0 = vload(w + k * cout + c), w1 = vload(w + k * cout + c + VW);
                for (int r = 0; r < RB; r++) {
                    float s = xr[r][k];
                    a0[r] += s * w0;
                    a1[r] += s * w1;
                }
            }
            for (int r = 0; r < RB; r++) {
                vstore(orow[r] + c, vload(orow[r] + c) + a0[r]);
                vstore(orow[r] + c + VW, vload(orow[r] + c + VW) + a1[r]);
            }
        }
        for (; c + VW <= cout; c += VW) {
            vf a0[RB];
            for (int r = 0; r < RB; r++) a0[r] = (vf){0};
            for (int64_t k = 0; k < cin; k++) {
                vf w0 = vload(w + k * cout + c);
                for (int r = 0; r < RB; r++) a0[r] += xr[r][k] * w0;
            }
            for (int r = 0; r < RB; r++) vstore(orow[r] + c, vload(orow[r] + c) + a0[r]);
        }
        for (; c < cout; c++) /* columns left over when cout is not a multiple of VW */
            for (int r = 0; r < RB; r++) orow[r][c] += dot(xr[r], wt + (c - c_rem) * cin, cin);
    }
    for (; p < n; p++) { /* pairs left over after the last full block */
        const float *xr = x + in[p] * cin;
        float *orow = out + oi[p] * cout;
        for (int64_t c = 0; c < c_rem; c++) {
            float s = 0;
            for (int64_t k = 0; k < cin; k++) s += xr[k] * w[k * cout + c];
            orow[c] += s;
        }
        for (int64_t c = c_rem; c < cout; c++) orow[c] += dot(xr, wt + (c - c_rem) * cin, cin);
    }
}

/* out (n_out, cout) += the conv of x (n_in, cin) over the offset groups; w: (K, cin, cout);
   groups: ngroups rows of (k, start, end) into in_idx / out_idx; returns nonzero if out of memory */
int haskd_conv_forward(const float *x, int64_t cin, const float *w, int64_t cout, const int64_t *in_idx,
                       const int64_t *out_idx, const int64_t *groups, int64_t ngroups, float *out)
{
    float *wt = malloc(sizeof(float) * VW * (cin > 0 ? cin : 1));
    if (!wt)
        return 1;
    for (int64_t g = 0; g < ngroups; g++) {
        int64_t k = groups[3 * g], s = groups[3 * g + 1], e = groups[3 * g + 2];
        fwd_offset(x, cin, w + k * cin * cout, cout, in_idx + s, out_idx + s, e - s, out, wt);
    }
    free(wt);
    return 0;
}

/* acc[i + r] (rows r < nr of gw[k], row stride cout) += sum over the n buffered pairs of xb[p][i + r] * gb[p];
   nr is a constant at each call, so the compiler keeps the tile in registers */
static inline void wgrad_rows(float *acc, const float *xb, int64_t cin, const float *gb, int64_t cout, int64_t n,
                              int64_t i, const int nr)
{
    int64_t c = 0;
    for (; c + 2 * VW <= cout; c += 2 * VW) {
        vf a0[WRB], a1[WRB];
        for (int r = 0; r < nr; r++) {
            a0[r] = vload(acc + (i + r) * cout + c);
            a1[r] = vload(acc + (i + r) * cout + c + VW);
        }
        for (int64_t p = 0; p < n; p++) {
            vf g0 = vload(gb + p * cout + c), g1 = vload(gb + p * cout + c + VW);
            for (int r = 0; r < nr; r++) {
                float sx = xb[p * cin + i + r];
                a0[r] += sx * g0;
                a1[r] += sx * g1;
            }
        }
        for (int r = 0; r < nr; r++) {
            vstore(acc + (i + r) * cout + c, a0[r]);
            vstore(acc + (i + r) * cout + c + VW, a1[r]);
        }
    }
    for (; c < cout; c++) /* columns left over when cout is not a multiple of 2 * VW */
        for (int r = 0; r < nr; r++) {
            float sm = 0;
            for (int64_t p = 0; p < n; p++) sm += xb[p * cin + i + r] * gb[p * cout + c];
            acc[(i + r) * cout + c] += sm;
        }
}

/* gw[k] (cin, cout) += sum over offset k's pairs of x[in]^T g[out]; returns nonzero if out of memory */
int haskd_conv_weight_grad(const float *x, int64_t cin, const float *g, int64_t cout, const int64_t *in_idx,
                           const int64_t *out_idx, const int64_t *groups, int64_t ngroups, float *gw)
{
    float *xb = malloc(sizeof(float) * CH * cin), *gb = malloc(sizeof(float) * CH * cout);
    if (!xb || !gb) {
        free(xb);
        free(gb);
        return 1;
    }
    for (int64_t gi = 0; gi < ngroups; gi++) {
        int64_t k = groups[3 * gi], s = groups[3 * gi + 1], e = groups[3 * gi + 2];
        float *acc = gw + k * cin * cout;
        for (int64_t p0 = s; p0 < e; p0 += CH) {
            int64_t n = e - p0 < CH ? e - p0 : CH;
            for (int64_t p = 0; p < n; p++) {
                if (p0 + p + WPF < e) {
                    prefetch_row(x + in_idx[p0 + p + WPF] * cin, cin, 0);
                    prefetch_row(g + out_idx[p0 + p + WPF] * cout, cout, 0);
                }
                memcpy(xb + p * cin, x + in_idx[p0 + p] * cin, sizeof(float) * cin);
                memcpy(gb + p * cout, g + out_idx[p0 + p] * cout, sizeof(float) * cout);
            }
            int64_t i = 0;
            for (; i + WRB <= cin; i += WRB) wgrad_rows(acc, xb, cin, gb, cout, n, i, WRB);
            for (; i < cin; i++) wgrad_rows(acc, xb, cin, gb, cout, n, i, 1); /* cin not a multiple of WRB */
        }
    }
    free(xb);
    free(gb);
    return 0;
}
