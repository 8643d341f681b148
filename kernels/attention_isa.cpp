// The fused attention of attention.h for one instruction set: compiled with QMM_AVX2 and with QMM_AVX512
// (build.sh); ops.cpp takes the AVX-512 copy wherever the quantized kernels run an AVX-512 set.
//
// Per attend task (one head, a tile of QUERY_TILE query rows), per block of KEY_BLOCK keys not masked:
//   scores  S[r, j] = q_r . k_j: MR rows by NV vectors of keys at a time, broadcasting q and reading the
//           block's packed K^T [D, KEY_BLOCK] a vector of keys at a time (the packing makes them contiguous);
//   softmax S * scale + bias, the row's running max and sum updated, P = e^(S - max), O rescaled when the max grew;
//   values  O[r, :] += P[r, j] v_j: MR rows by NV vectors of the head's dimensions, broadcasting P.
// Per decode task (one batch row's key head, its G query rows): the same softmax and values, the scores of every
// block first, read from the cache's K rows directly (decode_scores); then every block's values. Both reads
// prefetch PREFETCH_KEYS keys ahead.
#include <algorithm>
#include <cmath>
#include <vector>

#include "attention.h"
#include "simd.h"

namespace qmm {
namespace QMM_NS {
namespace {

constexpr int MR = 4;                               // query rows per register tile (decode_scores: hsum4)
constexpr int NV = W == 64 ? 4 : 2;                 // vectors per register tile (AVX2 has 16 registers)
constexpr int KV_VECTORS = KEY_BLOCK / LANES;       // vectors of keys per block

void pack(const Attention& a, int task) {
    const int i = task / (a.b * a.h), bh = task % (a.b * a.h), d = a.d;
    const float* k = a.src[i].k + static_cast<size_t>(bh) * a.src[i].t * d;
    for (int blk = 0; blk < a.blocks(i); blk++) {
        float* out = a.kt_head(i, bh) + static_cast<size_t>(blk) * d * KEY_BLOCK;
        const int j0 = blk * KEY_BLOCK, n = a.block_keys(i, blk);
        if (a.masked(i, bh / a.h, bh % a.h, 0, a.g * a.s, j0, n)) continue;
        for (int j = 0; j < KEY_BLOCK; j++) {
            const float* kj = k + static_cast<size_t>(j0 + j) * d;
            for (int c = 0; c < d; c++) out[c * KEY_BLOCK + j] = j < n ? kj[c] : 0.0f;
        }
    }
}

// S[i, :] = scale * (q[i, :] . K^T block) for rows [i0, i0 + MR), every key of the block
inline void scores(const float* q, const float* kt, int d, VF scale, float* s, int i0) {
    for (int v0 = 0; v0 < KV_VECTORS; v0 += NV) {
        VF acc[MR][NV];
        for (int r = 0; r < MR; r++)
            for (int v = 0; v < NV; v++) acc[r][v] = fzero();
        for (int c = 0; c < d; c++) {
            VF kv[NV];
            for (int v = 0; v < NV; v++) kv[v] = loadf(kt + c * KEY_BLOCK + (v0 + v) * LANES);
            for (int r = 0; r < MR; r++) {
                const VF x = set1f(q[(i0 + r) * d + c]);
                for (int v = 0; v < NV; v++) acc[r][v] = fma(x, kv[v], acc[r][v]);
            }
        }
        for (int r = 0; r < MR; r++)
            for (int v = 0; v < NV; v++) storef(s + (i0 + r) * KEY_BLOCK + (v0 + v) * LANES, mul(acc[r][v], scale));
    }
}

// decode: keys ahead of the reads that are prefetched (one key stream a task leaves the hardware prefetcher too
// little ahead of the arithmetic: ~15% slower from memory)
constexpr int PREFETCH_KEYS = 4;

inline void prefetch_row(const float* row, int d) {
    for (int c = 0; c < d; c += 16) _mm_prefetch(reinterpret_cast<const char*>(row + c), _MM_HINT_T0);
}

// O[i, :] += P[i, j] v_j over the block's n keys, rows [i0, i0 + MR); `prefetch`: PREFETCH_KEYS keys ahead
template <bool prefetch = false>
inline void values(const float* p, const float* v, int n, int d, float* o, int i0) {
    for (int c0 = 0; c0 < d; c0 += NV * LANES) {
        int width[NV];
        for (int u = 0; u < NV; u++) {
            const int left = d - c0 - u * LANES;
            width[u] = left < 0 ? 0 : left > LANES ? LANES : left;
        }
        VF acc[MR][NV];
        for (int r = 0; r < MR; r++)
            for (int u = 0; u < NV; u++) acc[r][u] = loadf_n(o + (i0 + r) * d + c0 + u * LANES, width[u]);
        for (int j = 0; j < n; j++) {
            if (prefetch && c0 == 0) prefetch_row(v + static_cast<size_t>(j + PREFETCH_KEYS) * d, d);
            VF vv[NV];
            for (int u = 0; u < NV; u++) vv[u] = loadf_n(v + static_cast<size_t>(j) * d + c0 + u * LANES, width[u]);
            for (int r = 0; r < MR; r++) {
                const VF x = set1f(p[(i0 + r) * KEY_BLOCK + j]);
                for (int u = 0; u < NV; u++) acc[r][u] = fma(x, vv[u], acc[r][u]);
            }
        }
        for (int r = 0; r < MR; r++)
            for (int u = 0; u < NV; u++) storef_n(o + (i0 + r) * d + c0 + u * LANES, acc[r][u], width[u]);
    }
}

struct Tile {   // one task's query rows: their queries, outputs, scores, running max and sum
    std::vector<float> q, o, s, max, sum;
    void prepare(int rows, int d) {   // rows <= QUERY_TILE, a multiple of MR
        q.resize(QUERY_TILE * d);
        o.resize(QUERY_TILE * d);
        std::fill(q.begin(), q.begin() + rows * d, 0.0f);
        std::fill(o.begin(), o.begin() + rows * d, 0.0f);
        s.resize(QUERY_TILE * KEY_BLOCK);
        max.assign(QUERY_TILE, -INFINITY);
        sum.assign(QUERY_TILE, 0.0f);
    }

    // row i's scores of a block of n keys (scaled, biased; `row`, KEY_BLOCK floats) -> P = e^(S - max) in place,
    // the running max and sum updated, and the row's output rescaled when the max grew
    void softmax(int i, float* row, int n, int d) {
        float block_max = -INFINITY;
        if (n == KEY_BLOCK) {
            VF m = set1f(-INFINITY);
            for (int j = 0; j < KEY_BLOCK; j += LANES) m = maxf(m, loadf(row + j));
            block_max = hmaxf(m);
        } else {
            for (int j = 0; j < n; j++) block_max = row[j] > block_max ? row[j] : block_max;
        }
        const float new_max = block_max > max[i] ? block_max : max[i];
        const float rescale = std::exp(max[i] - new_max);   // 0 on the first block
        VF total = fzero();
        const VF mx = set1f(new_max);
        for (int j = 0; j < KEY_BLOCK; j += LANES) {
            VF e = expf_(subf(loadf(row + j), mx));
            if (j + LANES > n) {   // keys past the block's end weigh nothing
                alignas(64) float tmp[LANES];
                storef(tmp, e);
                for (int l = (n - j > 0 ? n - j : 0); l < LANES; l++) tmp[l] = 0.0f;
                e = loadf(tmp);
            }
            storef(row + j, e);
            total = addf(total, e);
        }
        sum[i] = sum[i] * rescale + hsum(total);
        max[i] = new_max;
        if (rescale != 1.0f) {
            float* out = o.data() + i * d;
            for (int c = 0; c < d; c++) out[c] *= rescale;
        }
    }

    // the rows' outputs divided by their sums (a row whose every key was skipped: zeros) into out [rows, d]
    void finish(int rows, int d, float* out) const {
        for (int i = 0; i < rows; i++) {
            const float inv = sum[i] > 0.0f ? 1.0f / sum[i] : 0.0f;
            for (int c = 0; c < d; c++) out[i * d + c] = o[i * d + c] * inv;
        }
    }
};

void attend(const Attention& a, int task) {
    thread_local Tile tile;
    const int d = a.d, rows_all = a.g * a.s, tiles = (rows_all + QUERY_TILE - 1) / QUERY_TILE;
    const int bh = task / tiles, r0 = task % tiles * QUERY_TILE, bi = bh / a.h, hi = bh % a.h;
    const int rows = rows_all - r0 < QUERY_TILE ? rows_all - r0 : QUERY_TILE, padded = (rows + MR - 1) / MR * MR;
    tile.prepare(padded, d);
    const float* q = a.q + (static_cast<size_t>(bh) * rows_all + r0) * d;
    for (int i = 0; i < rows * d; i++) tile.q[i] = q[i];
    const VF scale = set1f(a.scale);
    for (int si = 0; si < a.sources; si++) {
        const AttentionSource& src = a.src[si];
        const float* kt = a.kt_head(si, bh);
        const float* v = src.v + static_cast<size_t>(bh) * src.t * d;
        for (int blk = 0; blk < a.blocks(si); blk++) {
            const int j0 = blk * KEY_BLOCK, n = a.block_keys(si, blk);
            if (a.masked(si, bi, hi, r0, rows, j0, n)) continue;
            for (int i0 = 0; i0 < padded; i0 += MR) scores(tile.q.data(), kt + static_cast<size_t>(blk) * d * KEY_BLOCK, d, scale, tile.s.data(), i0);
            for (int i = 0; i < rows; i++) {
                if (src.bias) {
                    float* s = tile.s.data() + i * KEY_BLOCK;
                    const float* bias = a.bias_row(si, bi, hi, r0 + i, j0);
                    for (int j = 0; j < n; j++) s[j] += bias[j * src.bias_strides[4]];
                }
                tile.softmax(i, tile.s.data() + i * KEY_BLOCK, n, d);
            }
            for (int i0 = 0; i0 < padded; i0 += MR) values(tile.s.data(), v + static_cast<size_t>(j0) * d, n, d, tile.o.data(), i0);
        }
    }
    tile.finish(rows, d, a.o + (static_cast<size_t>(bh) * rows_all + r0) * d);
}

// S[i, :] = scale * (q[i, :] . k_j) for rows [i0, i0 + MR) and n keys, read row by row from the cache (no packing:
// each key is read once, so a transposed copy would cost as much as the scores). KEYS keys at a time: their
// products interleave (each row's sum is a chain of D / LANES dependent FMAs) and share q's loads.
constexpr int KEYS = 2;
inline void decode_scores(const float* q, const float* k, int n, int d, float scale, float* s, int i0) {
    const __m128 vscale = _mm_set1_ps(scale);
    for (int j = 0; j < n; j += KEYS) {
        const float* kj[KEYS];
        for (int u = 0; u < KEYS; u++) kj[u] = k + static_cast<size_t>(j + u < n ? j + u : j) * d;   // past n: a repeat
        VF acc[KEYS][MR];
        for (int u = 0; u < KEYS; u++)
            for (int r = 0; r < MR; r++) acc[u][r] = fzero();
        for (int u = 0; u < KEYS; u++) prefetch_row(kj[u] + PREFETCH_KEYS * d, d);
        for (int c = 0; c < d; c += LANES) {
            const int width = d - c < LANES ? d - c : LANES;
            VF kv[KEYS];
            for (int u = 0; u < KEYS; u++) kv[u] = width == LANES ? loadf(kj[u] + c) : loadf_n(kj[u] + c, width);
            for (int r = 0; r < MR; r++) {
                const VF qv = loadf(q + (i0 + r) * d + c);
                for (int u = 0; u < KEYS; u++) acc[u][r] = fma(qv, kv[u], acc[u][r]);
            }
        }
        for (int u = 0; u < KEYS && j + u < n; u++) {
            alignas(16) float sums[4];
            _mm_store_ps(sums, _mm_mul_ps(hsum4(acc[u][0], acc[u][1], acc[u][2], acc[u][3]), vscale));
            for (int r = 0; r < MR; r++) s[(i0 + r) * KEY_BLOCK + j + u] = sums[r];
        }
    }
}

void decode(const DecodeAttention& a, int task) {
    thread_local Tile tile;
    const int bi = task / a.kv, hk = task % a.kv, g = a.h / a.kv, d = a.d, padded = (g + MR - 1) / MR * MR;
    const int w = a.write_index[bi];
    float* o = a.o + (static_cast<size_t>(bi) * a.h + static_cast<size_t>(hk) * g) * d;
    if (w >= a.t) {   // idle row
        for (int i = 0; i < g * d; i++) o[i] = 0.0f;
        return;
    }
    const size_t head = (static_cast<size_t>(bi) * a.kv + hk) * a.t * d, fresh = (static_cast<size_t>(bi) * a.kv + hk) * d;
    float* k = a.k + head;
    float* v = a.v + head;
    for (int c = 0; c < d; c++) {
        k[static_cast<size_t>(w) * d + c] = a.k_new[fresh + c];
        v[static_cast<size_t>(w) * d + c] = a.v_new[fresh + c];
    }
    tile.prepare(padded, d + LANES);   // q rows padded by a vector: decode_scores loads whole vectors of q
    const float* q = a.q + (static_cast<size_t>(bi) * a.h + static_cast<size_t>(hk) * g) * d;
    for (int i = 0; i < g * d; i++) tile.q[i] = q[i];
    // every block's scores first, then every block's values: K, then V, each one sequential read
    const int blocks = (w + KEY_BLOCK) / KEY_BLOCK;
    const size_t per_block = static_cast<size_t>(padded) * KEY_BLOCK;
    thread_local std::vector<float> scores;
    if (scores.size() < blocks * per_block) scores.resize(blocks * per_block);
    for (int blk = 0; blk < blocks; blk++) {
        const int j0 = blk * KEY_BLOCK, n = block_keys(w + 1, blk);
        for (int i0 = 0; i0 < padded; i0 += MR)
            decode_scores(tile.q.data(), k + static_cast<size_t>(j0) * d, n, d, a.scale, scores.data() + blk * per_block, i0);
    }
    for (int blk = 0; blk < blocks; blk++) {
        const int j0 = blk * KEY_BLOCK, n = block_keys(w + 1, blk);
        float* p = scores.data() + blk * per_block;
        for (int i = 0; i < g; i++) tile.softmax(i, p + i * KEY_BLOCK, n, d);
        for (int i0 = 0; i0 < padded; i0 += MR) values<true>(p, v + static_cast<size_t>(j0) * d, n, d, tile.o.data(), i0);
    }
    tile.finish(g, d, o);
}

}  // namespace
}  // namespace QMM_NS

#if defined(QMM_AVX2)
const AttentionIsa attention_avx2 = {QMM_NS::pack, QMM_NS::attend, QMM_NS::decode};
#elif defined(QMM_AVX512)
const AttentionIsa attention_avx512 = {QMM_NS::pack, QMM_NS::attend, QMM_NS::decode};
#else
#error "attention_isa.cpp is compiled with QMM_AVX2 or QMM_AVX512"
#endif

}  // namespace qmm
