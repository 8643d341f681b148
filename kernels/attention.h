// Fused attention in fp32 (flash attention on the CPU): the graphs' layers.attention and cached_attention in one
// kernel, so that the scores never leave a block of KEY_BLOCK keys and no [rows, keys] tensor is written.
//
//   o[b, h, r, :] = sum_j softmax_j(scale * q[b, h, r, :] . k_j + bias_j) v_j
//
// q [B, H, R, D] with R = G * S query rows per key head (grouped query heads: row r = g * S + s). The keys j run
// over source 0's T0 keys, then source 1's T1 (cached_attention: the KV cache, then the chunk's own keys), each
// source k, v [B, H, T, D] with an optional additive bias broadcast to [B, H, G, S, T] (its element strides, 0
// on broadcast axes). Each row's softmax is the graphs' (max subtracted, in fp32), kept online across key
// blocks (running max and sum, Milakov & Gimelshein 2018; Dao et al. 2022): sums in another order, so results
// agree with the unfused graph to float rounding, not bit for bit.
//
// The caller runs `pack_tasks` pack tasks (K transposed per block of keys into `kt`, for the score products'
// vectors), then `attend_tasks` attend tasks (a tile of query rows of one head over every key), each set spread
// over threads. Buffers are the caller's (ops.cpp).
#pragma once
#include <cstddef>
#include <cstdint>

namespace qmm {

constexpr int KEY_BLOCK = 64;   // keys per block: a block's scores for a tile of rows stay in L1
constexpr int QUERY_TILE = 64;  // query rows per attend task
// A key whose bias is at most this (the graphs' NEG_INF is -1e9: the KV cache's empty slots, the causal mask) has
// e^(score + bias - max) = 0 in fp32 for any score below 1e7: a block of such keys is skipped for a tile of query
// rows that it masks whole, and not packed when it masks every row. A row whose every block is skipped gets zeros
// (unfused, the mean of the values): the graphs' masks always leave a row its own key.
constexpr float MASKED = -1e8f;

// keys in block blk of `keys` keys taken KEY_BLOCK at a time (the last block may be short)
inline int block_keys(int keys, int blk) {
    const int left = keys - blk * KEY_BLOCK;
    return left < KEY_BLOCK ? left : KEY_BLOCK;
}

struct AttentionSource {
    const float* k;
    const float* v;
    int t;                        // keys
    const float* bias;            // nullptr: none
    int64_t bias_strides[5];      // over [B, H, G, S, T], in elements
};

struct Attention {
    const float* q;
    float* o;                     // [B, H, R, D]
    int b, h, g, s, d;
    float scale;
    AttentionSource src[2];
    int sources;                  // 1 or 2
    float* kt;                    // kt_floats() floats

    int blocks(int i) const { return (src[i].t + KEY_BLOCK - 1) / KEY_BLOCK; }
    int block_keys(int i, int blk) const { return qmm::block_keys(src[i].t, blk); }   // source i's block blk
    size_t kt_offset(int i) const {   // source i's packed K^T: [B, H, blocks, D, KEY_BLOCK], after those before it
        size_t n = 0;
        for (int j = 0; j < i; j++) n += static_cast<size_t>(b) * h * blocks(j) * d * KEY_BLOCK;
        return n;
    }
    size_t kt_floats() const { return kt_offset(sources); }
    float* kt_head(int i, int bh) const {   // source i's packed blocks of head bh (= batch row * H + head)
        return kt + kt_offset(i) + static_cast<size_t>(bh) * blocks(i) * d * KEY_BLOCK;
    }
    // source i's bias for query row r of batch row bi, head hi, from key j0 on (step bias_strides[4])
    const float* bias_row(int i, int bi, int hi, int r, int j0) const {
        const int64_t* st = src[i].bias_strides;
        return src[i].bias + bi * st[0] + hi * st[1] + r / s * st[2] + r % s * st[3] + j0 * st[4];
    }
    // whether source i's keys [j0, j0 + n) are masked for the query rows [r0, r0 + rows) of batch row bi, head hi
    bool masked(int i, int bi, int hi, int r0, int rows, int j0, int n) const {
        const AttentionSource& x = src[i];
        const int64_t* st = x.bias_strides;
        if (!x.bias || !st[4]) return false;
        const int last = st[2] || st[3] ? r0 + rows : r0 + 1;   // a bias the same for every row: one row
        for (int r = r0; r < last; r++) {
            const float* bias = bias_row(i, bi, hi, r, j0);
            for (int j = 0; j < n; j++)
                if (bias[j * st[4]] > MASKED) return false;
        }
        return true;
    }
    int pack_tasks() const { return sources * b * h; }
    int attend_tasks() const { return b * h * ((g * s + QUERY_TILE - 1) / QUERY_TILE); }
};

// One decode step's attention over the KV cache, in place: onnxruntime's GroupQueryAttention's work in the decode
// graphs (export/onnx_decode_attention.py). For batch row b with w = write_index[b] < T, the new key and value of
// each key head are written at cache slot w, then each query head attends over slots 0..w:
//
//   o[b, i, :] = sum_{j <= w} softmax_j(scale * q[b, i, :] . k[b, i / G, j, :]) v[b, i / G, j, :]   (G = H / KV)
//
// A row with w == T (its cache full: the runtime never decodes one) is idle: nothing written, o zeros. One task per
// batch row and key head reads that head's K, then its V, once each and never packed: after the weights, the
// cache is the step's largest read.
struct DecodeAttention {
    const float* q;               // [B, H, D]
    const float* k_new;           // [B, KV, D]
    const float* v_new;
    float* k;                     // the cache [B, KV, T, D], written at slot write_index[b]
    float* v;
    const int32_t* write_index;   // [B], each in [0, T]
    float* o;                     // [B, H, D]
    int b, h, kv, t, d;
    float scale;

    int tasks() const { return b * kv; }
};

struct AttentionIsa {
    void (*pack)(const Attention& a, int task);
    void (*attend)(const Attention& a, int task);
    void (*decode)(const DecodeAttention& a, int task);
};

extern const AttentionIsa attention_avx2, attention_avx512;

}  // namespace qmm
