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

/* vf: one register of the widest vector unit the compiler targets. Register tiles: RB (forward) or WRB (weight
   gradient) rows by 2 registers, plus the loads: within the 16 registers of AVX2 / NEON or the 32 of AVX-512 */
#if defined(__AVX512F__)
typedef float vf __attribute__((vector_size(64)));
#define VW 16 /* floats per vf */
#define RB 8  /* pairs per register block */
#define WRB 8
#else
typedef float vf __attribute__((vector_size(32)));
#define VW 8
#define RB 6
#define WRB 6
#endif
#define CB (2 * VW)                                 /* output columns per register tile */
#define PF 4                                        /* forward: prefetch the rows this many blocks ahead */
#define CH 256                                      /* weight gradient: pairs gathered at a time */
#define WPF 16                                      /* weight gradient: prefetch the rows this many pairs ahead */
#define INLINE static inline __attribute__((always_inline))

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

/* Columns [0, cout) in register tiles: nb full panels of CB columns, then one half panel of VW columns when at least
   VW are left (a 16-channel level on AVX-512, where CB is 32), then the few columns left over (fewer than VW) */
INLINE int64_t full_panels(int64_t cout) { return cout / CB; }
INLINE int64_t half_panel(int64_t cout) { return cout - cout / CB * CB >= VW; }
INLINE int64_t tiled_columns(int64_t cout) { return cout / CB * CB + half_panel(cout) * VW; }

/* The weight of one offset, w (cin, cout) row-major, repacked so that every loop below reads it in order: panel b
   holds columns [b * CB, b * CB + CB) as cin rows of CB floats, one after the other, the half panel its VW columns as
   cin rows of VW floats; the columns left over follow transposed, a row of cin floats per column, for dot products
   along cin. In w's own layout the tile's rows are cout floats apart, and at 128 channels (512 bytes) they fall into
   a few L1 sets and evict each other. */
static void pack_weight(const float *w, int64_t cin, int64_t cout, float *wp)
{
    int64_t nb = full_panels(cout), c0 = tiled_columns(cout);
    for (int64_t b = 0; b < nb; b++)
        for (int64_t k = 0; k < cin; k++) memcpy(wp + (b * cin + k) * CB, w + k * cout + b * CB, sizeof(float) * CB);
    if (half_panel(cout))
        for (int64_t k = 0; k < cin; k++) memcpy(wp + nb * cin * CB + k * VW, w + k * cout + nb * CB, sizeof(float) * VW);
    float *wt = wp + c0 * cin;
    for (int64_t j = c0; j < cout; j++)
        for (int64_t k = 0; k < cin; k++) wt[(j - c0) * cin + k] = w[k * cout + j];
}

/* orow[r] += xr[r] @ w for nr (a constant at each call) rows; wp: the packed weight */
INLINE void fwd_rows(const float *const *xr, float *const *orow, const int nr, int64_t cin, int64_t cout,
                     const float *wp)
{
    int64_t nb = full_panels(cout), c0 = tiled_columns(cout);
    for (int64_t b = 0; b < nb; b++) {
        const float *pb = wp + b * cin * CB;
        vf a0[RB], a1[RB];
        for (int r = 0; r < nr; r++) a0[r] = a1[r] = (vf){0};
        for (int64_t k = 0; k < cin; k++) {
            vf w0 = vload(pb + k * CB), w1 = vload(pb + k * CB + VW);
            for (int r = 0; r < nr; r++) {
                float s = xr[r][k];
                a0[r] += s * w0;
                a1[r] += s * w1;
            }
        }
        for (int r = 0; r < nr; r++) {
            vstore(orow[r] + b * CB, vload(orow[r] + b * CB) + a0[r]);
            vstore(orow[r] + b * CB + VW, vload(orow[r] + b * CB + VW) + a1[r]);
        }
    }
    if (half_panel(cout)) {
        const float *pb = wp + nb * cin * CB;
        vf a0[RB];
        for (int r = 0; r < nr; r++) a0[r] = (vf){0};
        for (int64_t k = 0; k < cin; k++) {
            vf w0 = vload(pb + k * VW);
            for (int r = 0; r < nr; r++) a0[r] += xr[r][k] * w0;
        }
        for (int r = 0; r < nr; r++) vstore(orow[r] + nb * CB, vload(orow[r] + nb * CB) + a0[r]);
    }
    const float *wt = wp + c0 * cin;
    for (int64_t c = c0; c < cout; c++) /* columns left over: dot products along cin */
        for (int r = 0; r < nr; r++) orow[r][c] += dot(xr[r], wt + (c - c0) * cin, cin);
}

/* out[oi[p]] += x[in[p]] @ w for the n pairs of one offset; wp: its packed weight */
static void fwd_offset(const float *x, int64_t cin, const float *wp, int64_t cout, const int64_t *in,
                       const int64_t *oi, int64_t n, float *out)
{
    const float *xr[RB];
    float *orow[RB];
    int64_t p = 0;
    for (; p + RB <= n; p += RB) {
        for (int r = 0; r < RB; r++) {
            xr[r] = x + in[p + r] * cin;
            orow[r] = out + oi[p + r] * cout;
        }
        if (p + (PF + 1) * RB <= n)
            for (int r = 0; r < RB; r++) {
                prefetch_row(x + in[p + PF * RB + r] * cin, cin, 0);
                prefetch_row(out + oi[p + PF * RB + r] * cout, cout, 1);
            }
        fwd_rows(xr, orow, RB, cin, cout, wp);
    }
    for (; p < n; p++) { /* pairs left over after the last full block, one at a time */
        xr[0] = x + in[p] * cin;
        orow[0] = out + oi[p] * cout;
        fwd_rows(xr, orow, 1, cin, cout, wp);
    }
}

/* out (n_out, cout) += the conv of x (n_in, cin) over the offset groups; w: (K, cin, cout);
   groups: ngroups rows of (k, start, end) into in_idx / out_idx; returns nonzero if out of memory */
int haskd_conv_forward(const float *x, int64_t cin, const float *w, int64_t cout, const int64_t *in_idx,
                       const int64_t *out_idx, const int64_t *groups, int64_t ngroups, float *out)
{
    float *wp = malloc(sizeof(float) * (cin * cout > 0 ? cin * cout : 1));
    if (!wp)
        return 1;
    int64_t packed = -1;
    for (int64_t g = 0; g < ngroups; g++) {
        int64_t k = groups[3 * g], s = groups[3 * g + 1], e = groups[3 * g + 2];
        if (k != packed) {
            pack_weight(w + k * cin * cout, cin, cout, wp);
            packed = k;
        }
        fwd_offset(x, cin, wp, cout, in_idx + s, out_idx + s, e - s, out);
    }
    free(wp);
    return 0;
}

/* The weight gradient gathers CH pairs at a time into two buffers laid out for the register tile, so that the tile
   reads both in order: xb holds the pairs' input rows as panels of WRB channels (panel i: the CH pairs' channels
   [i * WRB, i * WRB + WRB), one pair after the other), gb their output-gradient rows as panels of CB columns and the
   half panel (hw = VW columns, when there is one; hw = 0 for xb); the channels and columns left over after the
   panels follow as plain rows. */
static void gather_panels(float *buf, const float *row, int64_t p, int64_t n, int64_t c, int64_t pw, int64_t hw)
{
    int64_t np = c / pw, rem = c - np * pw;
    for (int64_t b = 0; b < np; b++) memcpy(buf + (b * n + p) * pw, row + b * pw, sizeof(float) * pw);
    buf += np * pw * n;
    row += np * pw;
    if (hw && rem >= hw) {
        memcpy(buf + p * hw, row, sizeof(float) * hw);
        buf += hw * n;
        row += hw;
        rem -= hw;
    }
    if (rem)
        memcpy(buf + p * rem, row, sizeof(float) * rem);
}

/* acc (rows i .. i + nr of gw[k], row stride cout) += sum over the n buffered pairs of x[p][i + r] * g[p];
   xs: the pairs' channels i .. i + nr, xstride floats apart; nr is a constant at each call (a register tile) */
INLINE void wgrad_rows(float *acc, const float *xs, int64_t xstride, const float *gb, int64_t cout, int64_t n,
                       int64_t i, const int nr)
{
    int64_t nb = full_panels(cout), c0 = tiled_columns(cout), crem = cout - c0;
    for (int64_t b = 0; b < nb; b++) {
        const float *gp = gb + b * n * CB;
        float *ab = acc + i * cout + b * CB;
        vf a0[WRB], a1[WRB];
        for (int r = 0; r < nr; r++) {
            a0[r] = vload(ab + r * cout);
            a1[r] = vload(ab + r * cout + VW);
        }
        for (int64_t p = 0; p < n; p++) {
            vf g0 = vload(gp + p * CB), g1 = vload(gp + p * CB + VW);
            for (int r = 0; r < nr; r++) {
                float sx = xs[p * xstride + r];
                a0[r] += sx * g0;
                a1[r] += sx * g1;
            }
        }
        for (int r = 0; r < nr; r++) {
            vstore(ab + r * cout, a0[r]);
            vstore(ab + r * cout + VW, a1[r]);
        }
    }
    if (half_panel(cout)) {
        const float *gp = gb + nb * n * CB;
        float *ab = acc + i * cout + nb * CB;
        vf a0[WRB];
        for (int r = 0; r < nr; r++) a0[r] = vload(ab + r * cout);
        for (int64_t p = 0; p < n; p++) {
            vf g0 = vload(gp + p * VW);
            for (int r = 0; r < nr; r++) a0[r] += xs[p * xstride + r] * g0;
        }
        for (int r = 0; r < nr; r++) vstore(ab + r * cout, a0[r]);
    }
    const float *gr = gb + c0 * n; /* columns left over: plain rows of crem floats */
    for (int64_t c = 0; c < crem; c++)
        for (int r = 0; r < nr; r++) {
            float sm = 0;
            for (int64_t p = 0; p < n; p++) sm += xs[p * xstride + r] * gr[p * crem + c];
            acc[(i + r) * cout + c0 + c] += sm;
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
    int64_t nxp = cin / WRB, xrem = cin - nxp * WRB;
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
                gather_panels(xb, x + in_idx[p0 + p] * cin, p, n, cin, WRB, 0);
                gather_panels(gb, g + out_idx[p0 + p] * cout, p, n, cout, CB, VW);
            }
            for (int64_t b = 0; b < nxp; b++) wgrad_rows(acc, xb + b * n * WRB, WRB, gb, cout, n, b * WRB, WRB);
            const float *xr = xb + nxp * WRB * n; /* channels left over: a narrower tile */
            switch (xrem) {
#define REM(m) case m: if (m < WRB) wgrad_rows(acc, xr, xrem, gb, cout, n, nxp * WRB, m); break;
            REM(1) REM(2) REM(3) REM(4) REM(5) REM(6) REM(7)
#undef REM
            default: break;
            }
        }
    }
    free(xb);
    free(gb);
    return 0;
}
