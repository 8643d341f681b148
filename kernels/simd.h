// The vectors of one instruction set, for the kernels compiled once per set (qmatmul_isa.cpp, attention_isa.cpp):
// the file that includes this defines one of QMM_AVX2, QMM_AVXVNNI, QMM_AVX512, QMM_AVX512VNNI, QMM_AMX (build.sh),
// and gets its namespace qmm::QMM_NS (impl_<set>) and vectors of W bytes: VI (integers), VF (LANES floats).
#pragma once
#include <immintrin.h>

#include <cstring>

#if defined(QMM_AVX512) || defined(QMM_AVX512VNNI) || defined(QMM_AMX)
#define QMM_512 1
#endif
#if defined(QMM_AVXVNNI) || defined(QMM_AVX512VNNI) || defined(QMM_AMX)
#define QMM_VNNI 1
#endif

#if defined(QMM_AVX2)
#define QMM_ISA avx2
#define QMM_NS impl_avx2
#define QMM_NAME "avx2"
#elif defined(QMM_AVXVNNI)
#define QMM_ISA avxvnni
#define QMM_NS impl_avxvnni
#define QMM_NAME "avxvnni"
#elif defined(QMM_AVX512)
#define QMM_ISA avx512
#define QMM_NS impl_avx512
#define QMM_NAME "avx512"
#elif defined(QMM_AVX512VNNI)
#define QMM_ISA avx512vnni
#define QMM_NS impl_avx512vnni
#define QMM_NAME "avx512vnni"
#elif defined(QMM_AMX)   // avx512vnni, with AMX tiles for w8a8's many-row products
#define QMM_ISA amx
#define QMM_NS impl_amx
#define QMM_NAME "amx"
#include <sys/syscall.h>
#include <unistd.h>
#else
#error "define one of QMM_AVX2, QMM_AVXVNNI, QMM_AVX512, QMM_AVX512VNNI, QMM_AMX"
#endif

namespace qmm {
namespace QMM_NS {
namespace {

const float INV127 = static_cast<float>(1.0 / 127.0);   // the graphs' `* (1 / 127)`, a float32 constant

#ifdef QMM_512
using VI = __m512i;
using VF = __m512;
constexpr int W = 64;
inline VI load(const void* p) { return _mm512_loadu_si512(p); }
inline VI load_bytes(const void* p, int n) {   // the first n < W bytes, zeros after
    return _mm512_maskz_loadu_epi8(n >= W ? ~0ULL : ((1ULL << n) - 1), p);
}
inline VI load_blocks(const void* p, int r) {  // r of the W/16 blocks of 16 bytes
    return r == W / 16 ? load(p) : _mm512_maskz_loadu_epi32(static_cast<__mmask16>((1u << (4 * r)) - 1), p);
}
inline VF block_scales(const float* p, int r) {  // r block scales, each repeated over its 4 lanes
    const __m128 s = r == 4 ? _mm_loadu_ps(p) : _mm_maskz_loadu_ps(static_cast<__mmask8>((1u << r) - 1), p);
    const __m512i idx = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    return _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(s));
}
inline void store(void* p, VI v) { _mm512_storeu_si512(p, v); }
inline VI set1_8(char v) { return _mm512_set1_epi8(v); }
inline VI set1_32(int32_t v) { return _mm512_set1_epi32(v); }
inline VI add8(VI a, VI b) { return _mm512_add_epi8(a, b); }
inline VI and_(VI a, VI b) { return _mm512_and_si512(a, b); }
inline VI high_nibbles(VI a) { return _mm512_and_si512(_mm512_srli_epi16(a, 4), _mm512_set1_epi8(0x0F)); }
inline VI unpacklo8(VI a, VI b) { return _mm512_unpacklo_epi8(a, b); }
inline VI unpackhi8(VI a, VI b) { return _mm512_unpackhi_epi8(a, b); }
inline VI unpacklo16(VI a, VI b) { return _mm512_unpacklo_epi16(a, b); }
inline VI unpackhi16(VI a, VI b) { return _mm512_unpackhi_epi16(a, b); }
inline VI dot(VI acc, VI u, VI s) {
#ifdef QMM_VNNI
    return _mm512_dpbusd_epi32(acc, u, s);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1)));
#endif
}
inline VF fzero() { return _mm512_setzero_ps(); }
inline VF loadf(const float* p) { return _mm512_loadu_ps(p); }
inline VF cvt(VI a) { return _mm512_cvtepi32_ps(a); }
inline VF mul(VF a, VF b) { return _mm512_mul_ps(a, b); }
inline VF fma(VF a, VF b, VF c) { return _mm512_fmadd_ps(a, b, c); }
inline float hsum(VF v) { return _mm512_reduce_add_ps(v); }
inline __m128 hsum4(VF a, VF b, VF c, VF d) {   // [hsum(a), hsum(b), hsum(c), hsum(d)], sharing the shuffles
    const VF ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    const VF cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    VF t = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, 0x44), _mm512_shuffle_ps(ab, cd, 0xEE));   // per 128 bits
    t = _mm512_add_ps(t, _mm512_shuffle_f32x4(t, t, 0x4E));
    t = _mm512_add_ps(t, _mm512_shuffle_f32x4(t, t, 0xB1));
    return _mm512_castps512_ps128(t);
}
inline float hmaxf(VF v) { return _mm512_reduce_max_ps(v); }
inline VF set1f(float v) { return _mm512_set1_ps(v); }
inline VF addf(VF a, VF b) { return _mm512_add_ps(a, b); }
inline VF subf(VF a, VF b) { return _mm512_sub_ps(a, b); }
inline VF maxf(VF a, VF b) { return _mm512_max_ps(a, b); }
inline VF minf(VF a, VF b) { return _mm512_min_ps(a, b); }
inline VF roundf_(VF a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline VF pow2i(VF n) {   // 2^n for integer-valued n in [-126, 127]
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
inline void storef(float* p, VF v) { _mm512_storeu_ps(p, v); }
inline VF loadf_n(const float* p, int n) {   // the first n < LANES floats, zeros after
    return n >= 16 ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p);
}
inline void storef_n(float* p, VF v, int n) {
    if (n >= 16) _mm512_storeu_ps(p, v); else _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), v);
}
#else
using VI = __m256i;
using VF = __m256;
constexpr int W = 32;
inline VI load(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
inline VI load_bytes(const void* p, int n) {
    if (n >= W) return load(p);
    alignas(32) uint8_t tmp[W] = {};
    std::memcpy(tmp, p, n);
    return load(tmp);
}
inline VI load_blocks(const void* p, int r) {
    return r == 2 ? load(p) : _mm256_zextsi128_si256(_mm_loadu_si128(static_cast<const __m128i*>(p)));
}
inline VF block_scales(const float* p, int r) {
    return _mm256_set_m128(r == 2 ? _mm_set1_ps(p[1]) : _mm_setzero_ps(), _mm_set1_ps(p[0]));
}
inline void store(void* p, VI v) { _mm256_storeu_si256(static_cast<__m256i*>(p), v); }
inline VI set1_8(char v) { return _mm256_set1_epi8(v); }
inline VI set1_32(int32_t v) { return _mm256_set1_epi32(v); }
inline VI add8(VI a, VI b) { return _mm256_add_epi8(a, b); }
inline VI and_(VI a, VI b) { return _mm256_and_si256(a, b); }
inline VI high_nibbles(VI a) { return _mm256_and_si256(_mm256_srli_epi16(a, 4), _mm256_set1_epi8(0x0F)); }
inline VI unpacklo8(VI a, VI b) { return _mm256_unpacklo_epi8(a, b); }
inline VI unpackhi8(VI a, VI b) { return _mm256_unpackhi_epi8(a, b); }
inline VI unpacklo16(VI a, VI b) { return _mm256_unpacklo_epi16(a, b); }
inline VI unpackhi16(VI a, VI b) { return _mm256_unpackhi_epi16(a, b); }
inline VI dot(VI acc, VI u, VI s) {
#ifdef QMM_VNNI
    return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}
inline VF fzero() { return _mm256_setzero_ps(); }
inline VF loadf(const float* p) { return _mm256_loadu_ps(p); }
inline VF cvt(VI a) { return _mm256_cvtepi32_ps(a); }
inline VF mul(VF a, VF b) { return _mm256_mul_ps(a, b); }
inline VF fma(VF a, VF b, VF c) { return _mm256_fmadd_ps(a, b, c); }
inline float hsum(VF v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline __m128 hsum4(VF a, VF b, VF c, VF d) {
    const VF ab = _mm256_add_ps(_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
    const VF cd = _mm256_add_ps(_mm256_unpacklo_ps(c, d), _mm256_unpackhi_ps(c, d));
    const VF t = _mm256_add_ps(_mm256_shuffle_ps(ab, cd, 0x44), _mm256_shuffle_ps(ab, cd, 0xEE));
    return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}
inline float hmaxf(VF v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}
inline VF set1f(float v) { return _mm256_set1_ps(v); }
inline VF addf(VF a, VF b) { return _mm256_add_ps(a, b); }
inline VF subf(VF a, VF b) { return _mm256_sub_ps(a, b); }
inline VF maxf(VF a, VF b) { return _mm256_max_ps(a, b); }
inline VF minf(VF a, VF b) { return _mm256_min_ps(a, b); }
inline VF roundf_(VF a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline VF pow2i(VF n) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
inline void storef(float* p, VF v) { _mm256_storeu_ps(p, v); }
inline __m256i lane_mask(int n) { return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)); }
inline VF loadf_n(const float* p, int n) { return n >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, lane_mask(n)); }
inline void storef_n(float* p, VF v, int n) {
    if (n >= 8) _mm256_storeu_ps(p, v); else _mm256_maskstore_ps(p, lane_mask(n), v);
}
#endif
constexpr int LANES = W / 4;   // int32 / fp32 lanes per vector

// e^x, |relative error| < 2e-7 over the floats whose e^x is normal; e^x for x < -87.3 (a masked score) is 0
inline VF expf_(VF x) {
    const VF lo = set1f(-87.3f);
    const VF under = x;   // remembered to zero what underflows
    x = minf(maxf(x, lo), set1f(88.3f));
    const VF n = roundf_(mul(x, set1f(1.44269504088896341f)));
    VF r = fma(n, set1f(-0.693359375f), x);             // x - n ln 2, ln 2 in two parts (Cephes)
    r = fma(n, set1f(2.12194440e-4f), r);
    VF p = set1f(1.9875691500e-4f);
    p = fma(p, r, set1f(1.3981999507e-3f));
    p = fma(p, r, set1f(8.3334519073e-3f));
    p = fma(p, r, set1f(4.1665795894e-2f));
    p = fma(p, r, set1f(1.6666665459e-1f));
    p = fma(p, r, set1f(5.0000001201e-1f));
    p = fma(mul(p, r), r, addf(r, set1f(1.0f)));
    p = mul(p, pow2i(n));
#ifdef QMM_512
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(under, lo, _CMP_GE_OQ), p);
#else
    return _mm256_and_ps(p, _mm256_cmp_ps(under, lo, _CMP_GE_OQ));
#endif
}

}  // namespace
}  // namespace QMM_NS
}  // namespace qmm
