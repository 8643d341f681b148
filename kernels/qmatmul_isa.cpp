// The kernels of qmatmul.h for one instruction set, chosen at compile time: this file is compiled once per
// set (QMM_AVX2, QMM_AVXVNNI, QMM_AVX512, QMM_AVX512VNNI; build.sh), and ops.cpp picks one at run time.
//
// Vectors of W bytes (32: AVX2, 64: AVX-512). The integer dot products multiply unsigned by signed bytes
// in groups of 4 into int32 lanes (VNNI's vpdpbusd; without VNNI vpmaddubsw + vpmaddwd, whose int16 pair
// sums stay exact because one operand is below 128 in magnitude and the other below 128 too):
//   w4a8  unsigned: the 4-bit codes (0..15), signed: the int8 activations; the -8 of each code is the
//         activations' block sum times -8, the accumulator's starting value.
//   w8a8  unsigned: the weights + 64 (the form keeps them in [-63, 63]), signed: the activations; the
//         +64 is the activations' sum times -64, added at the end. The [K, N] weight is read 4 rows
//         at a time and interleaved in registers so that each int32 lane holds one column's 4 products.
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "qmatmul.h"
#include "simd.h"

namespace qmm {
namespace QMM_NS {
namespace {
constexpr int G = W / 16;      // int4 blocks per vector (16 bytes of codes each)

inline bool cpu_has() {
    __builtin_cpu_init();
#if defined(QMM_AMX)
    // AMX-TILE and AMX-INT8 (CPUID 7.0 EDX bits 24, 25), their state enabled by the OS (XCR0 bits 17, 18),
    // and this process allowed to use the tile data (Linux: arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)
    unsigned eax, ebx, ecx, edx;
    __asm__("cpuid" : "=a"(eax), "=b"(ebx), "=c"(ecx), "=d"(edx) : "a"(7), "c"(0));
    if (!(edx & (1u << 24)) || !(edx & (1u << 25))) return false;
    unsigned lo, hi;
    __asm__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & (3u << 17)) != (3u << 17)) return false;
    return __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512vnni") && syscall(SYS_arch_prctl, 0x1023, 18) == 0;
#elif defined(QMM_AVX512VNNI)
    return __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
#elif defined(QMM_AVX512)
    return __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
#elif defined(QMM_AVXVNNI)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("avxvnni");
#else
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
}

#ifdef QMM_AMX
constexpr int AMX_K = 64;     // inputs per tile row
#else
constexpr int AMX_K = 4;
#endif

inline int imin(int a, int b) { return a < b ? a : b; }
inline int imax(int a, int b) { return a > b ? a : b; }
inline float fmax_(float a, float b) { return a > b ? a : b; }

inline int8_t round_half_up(float v) {   // the graphs' clamp(floor(v + 1/2), -127, 127)
    const float r = floorf(v + 0.5f);
    return static_cast<int8_t>(r > 127.0f ? 127.0f : r < -127.0f ? -127.0f : r);
}

void layout(bool w4a8, int k, size_t* row_bytes, size_t* row_lanes) {
    if (w4a8) {
        const size_t groups = (k / GROUP + G - 1) / G;
        *row_bytes = groups * W * 2;
        *row_lanes = groups * LANES;
    } else {
        *row_bytes = (k + AMX_K - 1) / AMX_K * AMX_K;   // AMX: whole tiles of 64 inputs; else groups of 4
        *row_lanes = 1;
    }
}

// ---------------------------------------------------------------- w4a8

#ifdef QMM_512
inline __m512i round_clamp(__m512 v) {   // integer-valued float v -> clamp(floor(v + 1/2)) as int32
    const __m512 r = _mm512_floor_ps(_mm512_add_ps(v, _mm512_set1_ps(0.5f)));
    return _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(r, _mm512_set1_ps(-127.0f)), _mm512_set1_ps(127.0f)));
}

// 32 inputs -> their 16 even and 16 odd codes; returns the codes' sum, *amax their largest magnitude
inline int quantize_block(const float* x, int8_t* even, int8_t* odd, float* amax) {
    const __m512 a = _mm512_loadu_ps(x), b = _mm512_loadu_ps(x + 16);
    *amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    const __m512 inv = _mm512_set1_ps(127.0f / fmax_(*amax, 1e-30f));
    const __m512i qa = round_clamp(_mm512_mul_ps(a, inv)), qb = round_clamp(_mm512_mul_ps(b, inv));
    const __m512i evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odds = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(even), _mm512_cvtepi32_epi8(_mm512_permutex2var_epi32(qa, evens, qb)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(odd), _mm512_cvtepi32_epi8(_mm512_permutex2var_epi32(qa, odds, qb)));
    return _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
}

constexpr int FLANES = 16;
inline VF mulf(const float* a, const float* b) { return _mm512_mul_ps(_mm512_loadu_ps(a), _mm512_loadu_ps(b)); }
inline float hmax_abs(VF m) { return _mm512_reduce_max_ps(m); }
inline VF max_abs(VF m, VF v) { return _mm512_max_ps(m, _mm512_abs_ps(v)); }
inline VI quantize_vector(VF v, VF step) { return round_clamp(_mm512_div_ps(v, step)); }   // 16 int32
inline void store_codes(int8_t* p, VI q) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtepi32_epi8(q)); }
inline int hsum_i(VI v) { return _mm512_reduce_add_epi32(v); }
inline VI add32(VI a, VI b) { return _mm512_add_epi32(a, b); }
#else
inline __m256i round_clamp(__m256 v) {
    const __m256 r = _mm256_floor_ps(_mm256_add_ps(v, _mm256_set1_ps(0.5f)));
    return _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, _mm256_set1_ps(-127.0f)), _mm256_set1_ps(127.0f)));
}

inline __m256 absf(__m256 v) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v); }

inline int hsum_i(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
}

inline int quantize_block(const float* x, int8_t* even, int8_t* odd, float* amax) {
    __m256 v[4];
    for (int i = 0; i < 4; i++) v[i] = _mm256_loadu_ps(x + 8 * i);
    *amax = hmaxf(_mm256_max_ps(_mm256_max_ps(absf(v[0]), absf(v[1])), _mm256_max_ps(absf(v[2]), absf(v[3]))));
    const __m256 inv = _mm256_set1_ps(127.0f / fmax_(*amax, 1e-30f));
    __m256i q[4];
    for (int i = 0; i < 4; i++) q[i] = round_clamp(_mm256_mul_ps(v[i], inv));
    const __m256i low = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[0], q[1]), 0xD8);    // int16 inputs 0..15
    const __m256i high = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[2], q[3]), 0xD8);   // 16..31
    __m256i b = _mm256_permute4x64_epi64(_mm256_packs_epi16(low, high), 0xD8);              // int8 0..31
    const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                           0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    b = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(b, split), 0xD8);                      // [evens | odds]
    _mm_storeu_si128(reinterpret_cast<__m128i*>(even), _mm256_castsi256_si128(b));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(odd), _mm256_extracti128_si256(b, 1));
    return hsum_i(_mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3])));
}

constexpr int FLANES = 8;
inline VF mulf(const float* a, const float* b) { return _mm256_mul_ps(_mm256_loadu_ps(a), _mm256_loadu_ps(b)); }
inline float hmax_abs(VF m) { return hmaxf(m); }
inline VF max_abs(VF m, VF v) { return _mm256_max_ps(m, absf(v)); }
inline VI quantize_vector(VF v, VF step) { return round_clamp(_mm256_div_ps(v, step)); }   // 8 int32
inline void store_codes(int8_t* p, VI q) {
    const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(q, q), _mm256_setzero_si256());
    _mm_storel_epi64(reinterpret_cast<__m128i*>(p),
                     _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 0, 0, 0, 0, 0, 0))));
}
inline VI add32(VI a, VI b) { return _mm256_add_epi32(a, b); }
#endif

#ifdef QMM_AMX
constexpr int AMX_MIN_ROWS = 16;   // fewer rows: the vector kernels
inline int tile_rows(int rows) { return (rows + 15) / 16 * 16; }
void quantize_w4a8_tiles(const float* x, int first, int count, Activations& a);
void w4a8_amx(const W4A8& w, const Activations& a, float* y, int n0);
#endif

void quantize_w4a8(const float* x, int first, int count, Activations& a) {
    const int nb = a.k / GROUP, k = a.k;
#ifdef QMM_AMX
    if (a.rows >= AMX_MIN_ROWS) return quantize_w4a8_tiles(x, first, count, a);
#endif
    for (int m = first; m < first + count; m++) {
        int8_t* even = a.q + m * a.row_bytes;
        int8_t* odd = even + a.row_bytes / 2;
        float* scale = a.scale + m * a.row_lanes;
        int32_t* offset = a.offset + m * a.row_lanes;
        std::memset(even + nb * 16, 0, a.row_bytes / 2 - nb * 16);   // the padding of the last vector
        std::memset(odd + nb * 16, 0, a.row_bytes / 2 - nb * 16);
        std::memset(scale + nb * 4, 0, (a.row_lanes - nb * 4) * sizeof(float));
        for (int b = 0; b < nb; b++) {
            float amax;
            const int sum = quantize_block(x + static_cast<size_t>(m) * k + b * GROUP, even + b * 16, odd + b * 16, &amax);
            scale[4 * b] = scale[4 * b + 1] = scale[4 * b + 2] = scale[4 * b + 3] = amax * INV127;
            offset[4 * b] = -8 * sum;
            offset[4 * b + 1] = offset[4 * b + 2] = offset[4 * b + 3] = 0;
        }
        for (size_t l = nb * 4; l < a.row_lanes; l++) offset[l] = 0;
    }
}

int w4a8_rows_per_task(int n) { return imax(4, (n / 32 + 3) / 4 * 4); }

int tasks_w4a8(int n, int k, int rows) {
    (void)k;
#ifdef QMM_AMX
    if (rows >= AMX_MIN_ROWS) return (n + 15) / 16;   // tiles of 16 weight rows
#endif
    (void)rows;
    const int per = w4a8_rows_per_task(n);
    return (n + per - 1) / per;
}

constexpr int W4A8_PREFETCH = 1024;   // bytes of codes ahead of the reads (their scales: a quarter as far)

// y[m, n0 + i * stride] for NR weight rows (stride apart) and MR activation rows from m0
template <int NR, int MR>
inline void w4a8_tile(const W4A8& w, const Activations& a, float* y, int n0, int m0, int stride = 1) {
    const int nb = w.k / GROUP, ng = (nb + G - 1) / G, half = static_cast<int>(a.row_bytes / 2);
    const VI low = set1_8(0x0F);
    VF acc[NR][MR];
    for (int i = 0; i < NR; i++)
        for (int j = 0; j < MR; j++) acc[i][j] = fzero();
    const uint8_t* codes[NR];
    const float* scales[NR];
    for (int i = 0; i < NR; i++) {
        codes[i] = w.codes + static_cast<size_t>(n0 + i * stride) * (w.k / 2);
        scales[i] = w.scales + static_cast<size_t>(n0 + i * stride) * nb;
    }
    for (int g = 0; g < ng; g++) {
        const int r = imin(G, nb - g * G);
        VI lo[NR], hi[NR];
        VF ws[NR];
        for (int i = 0; i < NR; i++) {
            _mm_prefetch(reinterpret_cast<const char*>(codes[i] + g * W + W4A8_PREFETCH), _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(scales[i] + g * G + W4A8_PREFETCH / 4), _MM_HINT_T0);
            const VI c = load_blocks(codes[i] + g * W, r);
            lo[i] = and_(c, low);
            hi[i] = high_nibbles(c);
            ws[i] = block_scales(scales[i] + g * G, r);
        }
        for (int j = 0; j < MR; j++) {
            const int8_t* xe = a.q + (m0 + j) * a.row_bytes + g * W;
            const VI e = load(xe), o = load(xe + half);
            const VI off = load(a.offset + (m0 + j) * a.row_lanes + g * LANES);
            const VF ds = loadf(a.scale + (m0 + j) * a.row_lanes + g * LANES);
            for (int i = 0; i < NR; i++)
                acc[i][j] = fma(cvt(dot(dot(off, lo[i], e), hi[i], o)), mul(ws[i], ds), acc[i][j]);
        }
    }
    for (int i = 0; i < NR; i++)
        for (int j = 0; j < MR; j++) y[static_cast<size_t>(m0 + j) * w.n + n0 + i * stride] = hsum(acc[i][j]);
}

template <int NR>
inline void w4a8_rows(const W4A8& w, const Activations& a, float* y, int n0) {
    constexpr int MR = W == 64 ? 4 : 2;
    int m = 0;
    for (; m + MR <= a.rows; m += MR) w4a8_tile<NR, MR>(w, a, y, n0, m);
    for (; m < a.rows; m++) w4a8_tile<NR, 1>(w, a, y, n0, m);
}

void run_w4a8(const W4A8& w, const Activations& a, float* y, int task) {
#ifdef QMM_AMX
    if (a.rows >= AMX_MIN_ROWS) return w4a8_amx(w, a, y, 16 * task);
#endif
    const int per = w4a8_rows_per_task(w.n), n1 = imin(w.n, (task + 1) * per);
    int n = task * per;
    if (a.rows == 1) {
        // decode: four weight rows at a time, each from its own quarter of the task's rows, so that the reads
        // are four long sequential streams. Four adjacent rows (a stream a row long, 2 KiB at K = 4096) leave
        // the hardware prefetcher starting over at every row: 20-40% slower from memory.
        const int quarter = (n1 - n) / 4;
        for (int r = 0; r < quarter; r++) w4a8_tile<4, 1>(w, a, y, n + r, 0, quarter);
        for (n += 4 * quarter; n < n1; n++) w4a8_tile<1, 1>(w, a, y, n, 0);
        return;
    }
    for (; n + 2 <= n1; n += 2) w4a8_rows<2>(w, a, y, n);
    for (; n < n1; n++) w4a8_rows<1>(w, a, y, n);
}

// ---------------------------------------------------------------- w8a8

void quantize_w8a8(const float* x, const float* smooth, int first, int count, Activations& a) {
    const int k = a.k, kv = k / FLANES * FLANES;
    for (int m = first; m < first + count; m++) {
        const float* xm = x + static_cast<size_t>(m) * k;
        VF vmax = set1f(0.0f);
        for (int i = 0; i < kv; i += FLANES) vmax = max_abs(vmax, mulf(xm + i, smooth + i));
        float amax = hmax_abs(vmax);
        for (int i = kv; i < k; i++) amax = fmax_(amax, fabsf(xm[i] * smooth[i]));
        const float step = fmax_(amax, 1e-30f) * INV127;
        const VF vstep = set1f(step);
        int8_t* q = a.q + m * a.row_bytes;
        VI vsum = set1_32(0);
        for (int i = 0; i < kv; i += FLANES) {
            const VI c = quantize_vector(mulf(xm + i, smooth + i), vstep);
            store_codes(q + i, c);
            vsum = add32(vsum, c);
        }
        int sum = hsum_i(vsum);
        for (int i = kv; i < k; i++) {
            q[i] = round_half_up(xm[i] * smooth[i] / step);
            sum += q[i];
        }
        for (size_t i = k; i < a.row_bytes; i++) q[i] = 0;
        a.scale[m] = step;
        a.offset[m] = -64 * sum;
    }
}

// 4 rows of W weight columns -> 4 vectors whose int32 lanes each hold one column's 4 weights (+ 64: `bias`)
inline void interleave(VI r0, VI r1, VI r2, VI r3, VI out[4], bool bias = true) {
    if (bias) {
        const VI b = set1_8(64);
        r0 = add8(r0, b);
        r1 = add8(r1, b);
        r2 = add8(r2, b);
        r3 = add8(r3, b);
    }
    const VI a = unpacklo8(r0, r1), b = unpackhi8(r0, r1), c = unpacklo8(r2, r3), d = unpackhi8(r2, r3);
    out[0] = unpacklo16(a, c);
    out[1] = unpackhi16(a, c);
    out[2] = unpacklo16(b, d);
    out[3] = unpackhi16(b, d);
}

// weight rows rows[0..3] at columns [c0, c0 + cols) (a row < 0: zeros)
inline void load_rows_at(const W8A8& w, const int rows[4], int c0, int cols, VI out[4], bool bias = true) {
    VI r[4];
    for (int t = 0; t < 4; t++) {
        const int8_t* p = w.weight + static_cast<size_t>(rows[t]) * w.n + c0;
        r[t] = rows[t] < 0 ? set1_8(0) : cols >= W ? load(p) : load_bytes(p, cols);
    }
    interleave(r[0], r[1], r[2], r[3], out, bias);
}

// 4 weight rows from row k0 at columns [c0, c0 + cols) (rows past K are zeros)
inline void load_rows(const W8A8& w, int k0, int c0, int cols, VI out[4], bool bias = true) {
    int rows[4];
    for (int t = 0; t < 4; t++) rows[t] = k0 + t < w.k ? k0 + t : -1;
    load_rows_at(w, rows, c0, cols, out, bias);
}

// lane (128-bit chunk L, int32 e) of interleaved vector j holds column 16 L + 4 j + e
inline void store_columns(const W8A8& w, const Activations& a, VI acc[4], int m, int c0, int cols, float* y) {
    alignas(64) int32_t lanes[4][LANES];
    for (int j = 0; j < 4; j++) store(lanes[j], acc[j]);
    const float step = a.scale[m];
    float* ym = y + static_cast<size_t>(m) * w.n + c0;
    for (int j = 0; j < 4; j++)
        for (int l = 0; l < LANES; l++) {
            const int col = 16 * (l / 4) + 4 * j + l % 4;
            if (col < cols) ym[col] = (static_cast<float>(lanes[j][l] + a.offset[m]) * step) * w.scale[c0 + col];
        }
}

constexpr int PREFETCH_ROWS = 16;   // many rows: the strips' rows, strided by N, are fetched this far ahead
constexpr int BAND_SWEEP = 16;      // decode: weight rows read side by side, each a sequential stream

inline size_t padded(int n) { return (n + W - 1) / W * W; }   // a band's int32 sums: whole strips of W columns

// decode's bands of weight rows: enough that each holds >= 256 KiB of weights, at most 16, whole sweeps
inline int band_rows(int n, int k) {
    const int bands = imin(16, imax(1, static_cast<int>(static_cast<long long>(n) * k / (256 << 10))));
    return (k + bands * BAND_SWEEP - 1) / (bands * BAND_SWEEP) * BAND_SWEEP;
}

// decode, one band of weight rows: its int32 sums over every column into a.partial[band][N] (in the interleaved
// lane order of each strip of W columns). BAND_SWEEP rows are read side by side across all columns, each from
// its own 1/BAND_SWEEP of the band: every stream walks consecutive rows, one long sequential read (adjacent
// rows would make streams a row long, and the hardware prefetcher starts over at every one).
void w8a8_band(const W8A8& w, const Activations& a, int band) {
    const int rows = band_rows(w.n, w.k), k0 = band * rows, k1 = imin(w.k, k0 + rows);
    const int per = (k1 - k0 + BAND_SWEEP - 1) / BAND_SWEEP;   // consecutive rows per stream
    int32_t* part = a.partial + static_cast<size_t>(band) * padded(w.n);
    for (int r = 0; r < per; r++) {
        int row[BAND_SWEEP];
        VI xb[BAND_SWEEP / 4];
        for (int s = 0; s < BAND_SWEEP; s++) {
            const int k = k0 + s * per + r;
            row[s] = k < k1 ? k : -1;
        }
        for (int s = 0; s < BAND_SWEEP / 4; s++) {
            int8_t x4[4];
            for (int t = 0; t < 4; t++) x4[t] = row[4 * s + t] < 0 ? 0 : a.q[row[4 * s + t]];
            int32_t packed;
            std::memcpy(&packed, x4, 4);
            xb[s] = set1_32(packed);
        }
        for (int c0 = 0; c0 < w.n; c0 += W) {
            const int cols = w.n - c0;
            VI acc[4];
            for (int j = 0; j < 4; j++)
                acc[j] = r == 0 ? set1_32(0) : load(part + c0 + j * LANES);
            for (int s = 0; s < BAND_SWEEP / 4; s++) {
                VI v[4];
                load_rows_at(w, row + 4 * s, c0, cols, v);
                for (int j = 0; j < 4; j++) acc[j] = dot(acc[j], v[j], xb[s]);
            }
            for (int j = 0; j < 4; j++) store(part + c0 + j * LANES, acc[j]);
        }
    }
}

// decode: the bands' sums -> y (by the band that finishes last)
void finish_w8a8(const W8A8& w, const Activations& a, float* y) {
    const int bands = (w.k + band_rows(w.n, w.k) - 1) / band_rows(w.n, w.k);
    for (int c0 = 0; c0 < w.n; c0 += W) {
        VI acc[4];
        for (int j = 0; j < 4; j++) {
            acc[j] = load(a.partial + c0 + j * LANES);
            for (int b = 1; b < bands; b++)
                acc[j] = add32(acc[j], load(a.partial + static_cast<size_t>(b) * padded(w.n) + c0 + j * LANES));
        }
        store_columns(w, a, acc, 0, c0, w.n - c0, y);
    }
}

// MR activation rows from m0 over packed weight columns (K/4 steps of 4 interleaved vectors)
template <int MR>
inline void w8a8_packed_tile(const W8A8& w, const Activations& a, const VI* packed, float* y, int m0, int c0) {
    VI acc[MR][4];
    for (int j = 0; j < MR; j++)
        for (int t = 0; t < 4; t++) acc[j][t] = set1_32(0);
    const int steps = static_cast<int>(a.row_bytes / 4);
    for (int s = 0; s < steps; s++) {
        const VI* v = packed + 4 * s;
        for (int j = 0; j < MR; j++) {
            int32_t x4;
            std::memcpy(&x4, a.q + (m0 + j) * a.row_bytes + 4 * s, 4);
            const VI xb = set1_32(x4);
            for (int t = 0; t < 4; t++) acc[j][t] = dot(acc[j][t], load(v + t), xb);
        }
    }
    for (int j = 0; j < MR; j++) store_columns(w, a, acc[j], m0 + j, c0, w.n - c0, y);
}

// this worker's buffer of at least n elements, grown as needed (plain pointers: no TLS destructors)
template <typename T>
T* scratch(size_t n, int which = 0) {
    thread_local void* buffers[2] = {nullptr, nullptr};
    thread_local size_t capacity[2] = {0, 0};
    if (n * sizeof(T) > capacity[which]) {
        free(buffers[which]);
        capacity[which] = (n * sizeof(T) + 63) / 64 * 64;
        buffers[which] = aligned_alloc(64, capacity[which]);
    }
    return static_cast<T*>(buffers[which]);
}

#ifdef QMM_AMX
struct alignas(64) TileConfig {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

// tiles 0-3: int32 sums of 16 x 16; 4-5: A, 16 rows of `a_bytes`; 6-7: B, a_bytes / 4 rows of 16 x 4 bytes
inline void configure_tiles(int a_bytes) {
    TileConfig c;
    std::memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) {
        c.colsb[t] = t == 4 || t == 5 ? a_bytes : 64;
        c.rows[t] = t >= 6 ? a_bytes / 4 : 16;
    }
    __asm__ volatile("ldtilecfg %0" ::"m"(c));
}

// w4a8 activations as B tiles: per block, [8 groups of 4 inputs][tile_rows(rows) rows][4 bytes]; block scales
// per block and row; rows past the chunk's stay zero
void quantize_w4a8_tiles(const float* x, int first, int count, Activations& a) {
    const int nb = a.k / GROUP, mp = tile_rows(a.rows);
    for (int m = first; m < first + count; m++)
        for (int b = 0; b < nb; b++) {
            alignas(64) int8_t even[16], odd[16];
            float amax;
            quantize_block(x + static_cast<size_t>(m) * a.k + b * GROUP, even, odd, &amax);
            int8_t* dst = a.q + static_cast<size_t>(b) * 8 * mp * 4 + m * 4;
            for (int g = 0; g < 8; g++) {   // inputs 4 g .. 4 g + 3 of the block
                int8_t* d = dst + static_cast<size_t>(g) * mp * 4;
                d[0] = even[2 * g];
                d[1] = odd[2 * g];
                d[2] = even[2 * g + 1];
                d[3] = odd[2 * g + 1];
            }
            a.scale[static_cast<size_t>(b) * mp + m] = amax * INV127;
        }
}

// y for all rows over 16 weight rows from n0: per block, (16 weight rows x 32 codes) x (32 inputs x 16
// activation rows) in a tile, scaled by both blocks' scales into float sums
void w4a8_amx(const W4A8& w, const Activations& a, float* y, int n0) {
    const int nb = w.k / GROUP, mp = tile_rows(a.rows), rows = imin(16, w.n - n0);
    int8_t* codes = scratch<int8_t>(16 * static_cast<size_t>(w.k));   // the 16 rows' codes - 8, in input order
    const VI low = set1_8(0x0F), eight = set1_8(8);
    for (int r = 0; r < 16; r++) {
        int8_t* dst = codes + static_cast<size_t>(r) * w.k;
        if (r >= rows) {
            std::memset(dst, 0, w.k);
            continue;
        }
        const uint8_t* src = w.codes + static_cast<size_t>(n0 + r) * (w.k / 2);
        for (int i = 0; i < w.k / 2; i += 32) {   // 32 bytes -> 64 codes (the last step may read a half vector)
            const int bytes = imin(32, w.k / 2 - i);
            const __m256i c = bytes == 32 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))
                                          : _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
            const __m512i wide = _mm512_cvtepu8_epi16(c);   // byte j -> 16 bits: low nibble, then high nibble as a byte
            const __m512i pair = _mm512_or_si512(_mm512_and_si512(wide, _mm512_set1_epi16(0x0F)),
                                                 _mm512_slli_epi16(_mm512_srli_epi16(wide, 4), 8));
            const __m512i v = _mm512_sub_epi8(_mm512_and_si512(pair, low), eight);
            if (bytes == 32) _mm512_storeu_si512(dst + 2 * i, v);
            else _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 2 * i), _mm512_castsi512_si256(v));
        }
    }
    configure_tiles(32);
    alignas(64) int32_t sums[2][16][16];
    for (int m0 = 0; m0 < a.rows; m0 += 16) {
        __m512 acc[16];
        for (int r = 0; r < 16; r++) acc[r] = _mm512_setzero_ps();
        for (int b = 0; b < nb; b += 2) {
            const int two = imin(2, nb - b);
            for (int t = 0; t < two; t++) {
                const int8_t* xb = a.q + static_cast<size_t>(b + t) * 8 * mp * 4 + m0 * 4;
                if (t == 0) {
                    _tile_zero(0);
                    _tile_loadd(4, codes + b * GROUP, w.k);
                    _tile_loadd(6, xb, mp * 4);
                    _tile_dpbssd(0, 4, 6);
                    _tile_stored(0, sums[0], 64);
                } else {
                    _tile_zero(1);
                    _tile_loadd(5, codes + (b + 1) * GROUP, w.k);
                    _tile_loadd(7, xb, mp * 4);
                    _tile_dpbssd(1, 5, 7);
                    _tile_stored(1, sums[1], 64);
                }
            }
            for (int t = 0; t < two; t++) {
                const __m512 xs = _mm512_loadu_ps(a.scale + static_cast<size_t>(b + t) * mp + m0);
                for (int r = 0; r < rows; r++) {
                    const __m512 s = _mm512_mul_ps(_mm512_set1_ps(w.scales[static_cast<size_t>(n0 + r) * nb + b + t]), xs);
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(sums[t][r])), s, acc[r]);
                }
            }
        }
        alignas(64) float out[16][16];
        for (int r = 0; r < 16; r++) _mm512_store_ps(out[r], acc[r]);
        for (int j = 0; j < 16 && m0 + j < a.rows; j++)
            for (int r = 0; r < rows; r++) y[static_cast<size_t>(m0 + j) * w.n + n0 + r] = out[r][j];
    }
    _tile_release();
}

// 4 weight rows of 64 columns (interleaved, no +64) into B tiles: [K/64][4 tiles of 16 columns][16 groups of 4
// inputs][16 columns x 4 bytes]
inline void store_tiles(const VI v[4], int k0, int8_t* packed) {
    int8_t* row = packed + static_cast<size_t>(k0 / 64) * 4096 + (k0 % 64) / 4 * 64;
    for (int j = 0; j < 4; j++) {   // lane T of v[j]: columns 16 T + 4 j .. + 3 of tile T
        _mm_storeu_si128(reinterpret_cast<__m128i*>(row + 0 * 1024 + 16 * j), _mm512_extracti32x4_epi32(v[j], 0));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(row + 1 * 1024 + 16 * j), _mm512_extracti32x4_epi32(v[j], 1));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(row + 2 * 1024 + 16 * j), _mm512_extracti32x4_epi32(v[j], 2));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(row + 3 * 1024 + 16 * j), _mm512_extracti32x4_epi32(v[j], 3));
    }
}

// y for all rows over the strip of 64 columns from c0: signed x signed int8 tile products (no offsets)
void w8a8_amx(const W8A8& w, const Activations& a, const int8_t* packed, float* y, int c0) {
    const int kp = static_cast<int>(a.row_bytes), rb = kp;
    configure_tiles(64);
    alignas(64) int32_t sums[4][16][16];
    for (int m0 = 0; m0 < a.rows; m0 += 32) {
        const int8_t* x = a.q + static_cast<size_t>(m0) * rb;
        if (m0 + 32 > a.rows) {   // the last rows, padded to two tiles
            int8_t* pad = scratch<int8_t>(32 * static_cast<size_t>(rb), 1);
            std::memset(pad, 0, 32 * static_cast<size_t>(rb));
            std::memcpy(pad, x, static_cast<size_t>(a.rows - m0) * rb);
            x = pad;
        }
        for (int t0 = 0; t0 < 4 && c0 + 16 * t0 < w.n; t0 += 2) {
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int kb = 0; kb < kp / 64; kb++) {
                const int8_t* b = packed + static_cast<size_t>(kb) * 4096 + t0 * 1024;
                _tile_loadd(4, x + kb * 64, rb);
                _tile_loadd(5, x + 16 * rb + kb * 64, rb);
                _tile_loadd(6, b, 64);
                _tile_loadd(7, b + 1024, 64);
                _tile_dpbssd(0, 4, 6);
                _tile_dpbssd(1, 4, 7);
                _tile_dpbssd(2, 5, 6);
                _tile_dpbssd(3, 5, 7);
            }
            _tile_stored(0, sums[0], 64);
            _tile_stored(1, sums[1], 64);
            _tile_stored(2, sums[2], 64);
            _tile_stored(3, sums[3], 64);
            for (int t = 0; t < 4; t++) {   // sums[2 half + tile]: rows 16 half.., columns of tile t0 + tile
                const int c = c0 + 16 * (t0 + t % 2), cols = imin(16, w.n - c);
                if (cols <= 0) continue;
                const __mmask16 mask = static_cast<__mmask16>((1u << cols) - 1);
                const __m512 scale = _mm512_maskz_loadu_ps(mask, w.scale + c);
                for (int r = 0; r < 16 && m0 + 16 * (t / 2) + r < a.rows; r++) {
                    const int m = m0 + 16 * (t / 2) + r;
                    const __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_load_si512(sums[t][r])), _mm512_set1_ps(a.scale[m]));
                    _mm512_mask_storeu_ps(y + static_cast<size_t>(m) * w.n + c, mask, _mm512_mul_ps(v, scale));
                }
            }
        }
    }
    _tile_release();
}
#endif

int w8a8_strips(int n) { return imin(4, imax(1, n / (8 * W))); }   // sub-strips per decode task: >= 8 tasks

int tasks_w8a8(int n, int k, int rows) {
    if (rows == 1) return (k + band_rows(n, k) - 1) / band_rows(n, k);
    const int cols = W * w8a8_strips(n);
    return (n + cols - 1) / cols;
}

size_t partial_w8a8(int n, int k, int rows) {   // int32 sums decode's bands share
    return rows == 1 ? static_cast<size_t>(tasks_w8a8(n, k, rows)) * padded(n) : 0;
}

void run_w8a8(const W8A8& w, const Activations& a, float* y, int task) {
    if (a.rows == 1) {   // decode: the band that finishes last adds them all up (no second round of tasks)
        w8a8_band(w, a, task);
        if (__atomic_add_fetch(a.bands_done, 1, __ATOMIC_ACQ_REL) == tasks_w8a8(w.n, w.k, 1)) finish_w8a8(w, a, y);
        return;
    }
    // many rows: interleave the task's strips of W columns once (every row then reads them from L2), reading
    // each weight row's strips side by side and fetching rows ahead, as decode does
    const int strips = w8a8_strips(w.n), c0 = task * strips * W, kp = static_cast<int>(a.row_bytes);
    const size_t per_strip = static_cast<size_t>(kp) * W;   // bytes
    int8_t* packed = reinterpret_cast<int8_t*>(scratch<VI>(strips * per_strip / sizeof(VI)));
#ifdef QMM_AMX
    const bool tiles = a.rows >= AMX_MIN_ROWS;
#else
    const bool tiles = false;
#endif
    for (int k0 = 0; k0 < kp; k0 += 4) {
        if (k0 + PREFETCH_ROWS + 3 < w.k)
            for (int t = 0; t < 4; t++)
                for (int s = 0; s < strips && c0 + s * W < w.n; s++)
                    _mm_prefetch(reinterpret_cast<const char*>(w.weight + static_cast<size_t>(k0 + PREFETCH_ROWS + t) * w.n
                                                               + c0 + s * W), _MM_HINT_T0);
        for (int s = 0; s < strips && c0 + s * W < w.n; s++) {
            VI v[4];
            load_rows(w, k0, c0 + s * W, w.n - c0 - s * W, v, !tiles);
#ifdef QMM_AMX
            if (tiles) {
                store_tiles(v, k0, packed + s * per_strip);
                continue;
            }
#endif
            for (int j = 0; j < 4; j++) store(packed + s * per_strip + static_cast<size_t>(k0) * W + j * W, v[j]);
        }
    }
    for (int s = 0; s < strips && c0 + s * W < w.n; s++) {
        const int8_t* strip = packed + s * per_strip;
#ifdef QMM_AMX
        if (tiles) {
            w8a8_amx(w, a, strip, y, c0 + s * W);
            continue;
        }
#endif
        constexpr int MR = W == 64 ? 4 : 2;
        const VI* v = reinterpret_cast<const VI*>(strip);
        int m = 0;
        for (; m + MR <= a.rows; m += MR) w8a8_packed_tile<MR>(w, a, v, y, m, c0 + s * W);
        for (; m < a.rows; m++) w8a8_packed_tile<1>(w, a, v, y, m, c0 + s * W);
    }
}

}  // namespace
}  // namespace QMM_NS

const Isa QMM_ISA = {QMM_NAME, QMM_NS::cpu_has, QMM_NS::layout, QMM_NS::quantize_w4a8, QMM_NS::tasks_w4a8, QMM_NS::run_w4a8,
                    QMM_NS::quantize_w8a8, QMM_NS::tasks_w8a8, QMM_NS::run_w8a8, QMM_NS::partial_w8a8};

}  // namespace qmm
