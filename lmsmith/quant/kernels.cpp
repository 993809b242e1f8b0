// Matrix products on packed GGUF blocks, without dequantizing a whole weight.
//
// Built once per machine by lmsmith/quant/kernels.py (g++ -O3 -march=native -fopenmp) and called
// through ctypes; torch is not linked (the OpenMP runtime torch has loaded is reused by soname).
//
// For each output row and each block, the block is dequantized into a small float buffer in L1
// (the same arithmetic as lmsmith's numpy/torch codecs: scale * q - min, in float32) and
// multiplied with every activation row while it is there. So the values used are exactly the
// dequantized weights: results equal dequantize-then-matmul up to the order of float additions.
// Activations stay float32 (unlike llama.cpp, which rounds them to 8 bits).
//
// Type codes are ggml's; 100 is lmsmith's int8 with one float scale per output row.

#include <cstdint>
#include <cstring>
#include <vector>
#include <cmath>
#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int kInt8Rows = 100;
constexpr int kMaxRows = 16;  // activation rows per tile (kernels.py tiles larger batches)

inline float h2f(const uint8_t* p) {
    uint16_t h = uint16_t(p[0] | (p[1] << 8));
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ffu, bits;
    if (exp == 0) {
        float f = std::ldexp(float(man), -24);
        return sign ? -f : f;
    }
    bits = exp == 31 ? (sign | 0x7f800000u | (man << 13)) : (sign | ((exp + 112) << 23) | (man << 13));
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
#endif
}

// ---- unpacking: 256 weights (a chunk) -> int8 values q and, per 16 weights, a scale and a min -------
//
// Weight i of a chunk is sc[i / 16] * q[i] - mn[i / 16]: lmsmith's dequantization, value for value.
// Byte work runs 32 lanes at a time with GCC vector types (AVX2 registers, or pairs of NEON ones).

typedef uint8_t u8x32 __attribute__((vector_size(32)));
typedef int8_t i8x8 __attribute__((vector_size(8)));
typedef float v8 __attribute__((vector_size(32)));

template <class V>
inline V ldv(const void* p) {
    V v;
    std::memcpy(&v, p, sizeof v);
    return v;
}
template <class V>
inline void stv(void* p, V v) {
    std::memcpy(p, &v, sizeof v);
}

constexpr int kChunk = 256;  // weights unpacked at a time: one K-quant super-block, or 8 blocks of 32

struct Unpacked {
    alignas(64) int8_t q[kChunk];
    float sc[kChunk / 16], mn[kChunk / 16];
};

inline void same_scale(Unpacked& u, int k, float d, float m) {  // 32-weight block k: groups 2k, 2k + 1
    u.sc[2 * k] = u.sc[2 * k + 1] = d;
    u.mn[2 * k] = u.mn[2 * k + 1] = m;
}

// Q8_0: 8 blocks of (f16 d, int8 q[32])
inline void unpack_q8_0(const uint8_t* b, Unpacked& u) {
    for (int k = 0; k < 8; k++, b += 34) {
        std::memcpy(u.q + 32 * k, b + 2, 32);
        same_scale(u, k, h2f(b), 0);
    }
}

// Q4_0: 8 blocks of (f16 d, 16 bytes: weight j in the low nibble, weight j + 16 in the high); q - 8
inline void unpack_q4_0(const uint8_t* b, Unpacked& u) {
    for (int k = 0; k < 8; k++, b += 18) {
        for (int j = 0; j < 16; j++) {
            u.q[32 * k + j] = int8_t((b[2 + j] & 15) - 8);
            u.q[32 * k + 16 + j] = int8_t((b[2 + j] >> 4) - 8);
        }
        same_scale(u, k, h2f(b), 0);
    }
}

inline uint32_t le32(const uint8_t* p) {
    return uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24;
}

// Q5_0 (f16 d, u32 fifth bits, nibbles; q - 16) and Q5_1 (f16 d, f16 m, u32, nibbles; d q + m)
template <bool Min>
inline void unpack_q5(const uint8_t* b, Unpacked& u) {
    constexpr int bytes = Min ? 24 : 22, qh_at = Min ? 4 : 2, zero = Min ? 0 : 16;
    for (int k = 0; k < 8; k++, b += bytes) {
        const uint32_t qh = le32(b + qh_at);
        const uint8_t* qs = b + qh_at + 4;
        for (int j = 0; j < 16; j++) {
            u.q[32 * k + j] = int8_t(((qs[j] & 15) | (((qh >> j) & 1) << 4)) - zero);
            u.q[32 * k + 16 + j] = int8_t(((qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - zero);
        }
        same_scale(u, k, h2f(b), Min ? -h2f(b + 2) : 0);
    }
}

// Q4_K / Q5_K header: f16 d, f16 dmin, 8 six-bit scales and mins in 12 bytes (ggml get_scale_min_k4)
inline void scale_min_k4(const uint8_t* b, Unpacked& u) {
    const float d = h2f(b), dmin = h2f(b + 2);
    const uint8_t* s = b + 4;
    for (int j = 0; j < 8; j++) {
        const int a = j < 4 ? s[j] & 63 : (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
        const int m = j < 4 ? s[j + 4] & 63 : (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
        same_scale(u, j, d * float(a), dmin * float(m));
    }
}

// Q4_K: header, qs[128]: 32-byte chunk c holds sub-block 2c in the low nibbles, 2c + 1 in the high
inline void unpack_q4_k(const uint8_t* b, Unpacked& u) {
    scale_min_k4(b, u);
    for (int c = 0; c < 4; c++) {
        const u8x32 v = ldv<u8x32>(b + 16 + 32 * c);
        stv(u.q + 64 * c, v & 15);
        stv(u.q + 64 * c + 32, v >> 4);
    }
}

// Q5_K: header, qh[32], qs[128] as Q4_K; the fifth bit of weight 32s + l is bit s of qh[l]
inline void unpack_q5_k(const uint8_t* b, Unpacked& u) {
    scale_min_k4(b, u);
    const u8x32 qh = ldv<u8x32>(b + 16);
    for (int c = 0; c < 4; c++) {
        const u8x32 v = ldv<u8x32>(b + 48 + 32 * c);
        stv(u.q + 64 * c, (v & 15) | (((qh >> (2 * c)) & 1) << 4));
        stv(u.q + 64 * c + 32, (v >> 4) | (((qh >> (2 * c + 1)) & 1) << 4));
    }
}

// Q6_K: ql[128], qh[64], int8 scales[16], f16 d. Weight 128h + 32g + l: nibble g / 2 of
// ql[64h + 32(g % 2) + l], its two high bits at 2g of qh[32h + l]; q - 32
inline void unpack_q6_k(const uint8_t* b, Unpacked& u) {
    const float d = h2f(b + 208);
    for (int j = 0; j < 16; j++) u.sc[j] = d * float(int8_t(b[192 + j])), u.mn[j] = 0;
    for (int h = 0; h < 2; h++) {
        const u8x32 qh = ldv<u8x32>(b + 128 + 32 * h);
        for (int g = 0; g < 4; g++) {
            const u8x32 ql = ldv<u8x32>(b + 64 * h + 32 * (g % 2));
            const u8x32 q = ((ql >> (4 * (g / 2))) & 15) | (((qh >> (2 * g)) & 3) << 4);
            stv(u.q + 128 * h + 32 * g, q - 32);  // wraps modulo 256: read back as int8, the signed value
        }
    }
}

// Q3_K: hmask[32], qs[64], scales[12], f16 d. Weight 32k + l: 2 bits at 2(k % 4) of qs[32(k / 4) + l]
// and bit k of hmask[l] (clear: subtract 4); 16 six-bit scales stored + 32
inline void unpack_q3_k(const uint8_t* b, Unpacked& u) {
    const uint8_t* s = b + 96;
    const float d = h2f(b + 108);
    for (int j = 0; j < 16; j++) {
        const int low = j < 8 ? (s[j] & 15) : (s[j - 8] >> 4);
        const int high = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
        u.sc[j] = d * float((low | (high << 4)) - 32), u.mn[j] = 0;
    }
    const u8x32 hm = ldv<u8x32>(b);
    for (int k = 0; k < 8; k++) {
        const u8x32 qs = ldv<u8x32>(b + 32 + 32 * (k / 4));
        stv(u.q + 32 * k, (((qs >> (2 * (k % 4))) & 3) | (((hm >> k) & 1) << 2)) - 4);
    }
}

// ---- types --------------------------------------------------------------------------------------

template <void (*U)(const uint8_t*, Unpacked&), int Block, int Bytes>
struct Blocks {
    static constexpr int block = Block;
    static constexpr bool has_min = U == unpack_q4_k || U == unpack_q5_k || U == unpack_q5<true>;
    static int64_t row_bytes(int64_t K) { return K / Block * Bytes; }
    // weights [k, k + n) of a row; k is a multiple of kChunk, n < kChunk only for a row's last chunk
    static void unpack(const uint8_t* row, int64_t k, int n, Unpacked& u, float) {
        const uint8_t* src = row + k / Block * Bytes;
        if (n == kChunk) return U(src, u);
        alignas(64) uint8_t tmp[kChunk / Block * Bytes] = {};  // a short chunk of 32-weight blocks, zero-padded
        std::memcpy(tmp, src, size_t(n / Block * Bytes));
        U(tmp, u);
    }
};

using Q8_0 = Blocks<unpack_q8_0, 32, 34>;
using Q4_0 = Blocks<unpack_q4_0, 32, 18>;
using Q5_0 = Blocks<unpack_q5<false>, 32, 22>;
using Q5_1 = Blocks<unpack_q5<true>, 32, 24>;
using Q3_K = Blocks<unpack_q3_k, 256, 110>;
using Q4_K = Blocks<unpack_q4_k, 256, 144>;
using Q5_K = Blocks<unpack_q5_k, 256, 176>;
using Q6_K = Blocks<unpack_q6_k, 256, 210>;

// int8 with one float scale per row: a row is its K bytes, any K
struct Int8 {
    static constexpr int block = 1;
    static constexpr bool has_min = false;
    static int64_t row_bytes(int64_t K) { return K; }
    static void unpack(const uint8_t* row, int64_t k, int n, Unpacked& u, float scale) {
        std::memcpy(u.q, row + k, size_t(n));
        for (int j = 0; j < kChunk / 16; j++) u.sc[j] = scale, u.mn[j] = 0;
    }
};

// ---- products -------------------------------------------------------------------------------------

inline v8 ld(const float* p) { return ldv<v8>(p); }

inline v8 cvt8(const int8_t* p) {  // 8 int8 -> 8 floats (GCC's generic conversion is scalar code on x86)
#if defined(__AVX2__)
    return (v8)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#else
    return __builtin_convertvector(ldv<i8x8>(p), v8);
#endif
}

// out[0, n) = sc * q - mn, 16 weights per scale
inline void to_float(const Unpacked& u, int n, float* __restrict out) {
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        const float s = u.sc[i / 16], m = u.mn[i / 16];
        stv(out + i, cvt8(u.q + i) * s - m);
        stv(out + i + 8, cvt8(u.q + i + 8) * s - m);
    }
    for (; i < n; i++) out[i] = u.sc[i / 16] * float(u.q[i]) - u.mn[i / 16];  // int8 rows of any length
}

// acc[0..3] += x[0, n) * w[0, n), lane-wise (in registers across the chunk)
inline void dot_chunk(v8* acc, const float* __restrict x, const float* __restrict w, int n) {
    v8 a0 = acc[0], a1 = acc[1], a2 = acc[2], a3 = acc[3];
    int i = 0;
    for (; i + 32 <= n; i += 32) {
        a0 += ld(x + i) * ld(w + i);
        a1 += ld(x + i + 8) * ld(w + i + 8);
        a2 += ld(x + i + 16) * ld(w + i + 16);
        a3 += ld(x + i + 24) * ld(w + i + 24);
    }
    for (; i < n; i++) a0[0] += x[i] * w[i];
    acc[0] = a0, acc[1] = a1, acc[2] = a2, acc[3] = a3;
}

// y[r * ldy] = x[r] . row for the R activation rows of x (each K long)
template <class T, int R>
void rows_tile(const uint8_t* row, float scale, int64_t K, const float* x, float* y, int64_t ldy) {
    alignas(64) float buf[kChunk];
    Unpacked u;
    v8 acc[R][4] = {};
    for (int64_t k = 0; k < K; k += kChunk) {
        const int n = K - k < kChunk ? int(K - k) : kChunk;
        T::unpack(row, k, n, u, scale);
        to_float(u, n, buf);
        for (int r = 0; r < R; r++) dot_chunk(acc[r], x + r * K + k, buf, n);
    }
    for (int r = 0; r < R; r++) {
        const v8 s = (acc[r][0] + acc[r][1]) + (acc[r][2] + acc[r][3]);
        float t = 0;
        for (int l = 0; l < 8; l++) t += s[l];
        y[r * ldy] = t;
    }
}

// One activation row: y = sum over 16-weight groups g of sc[g] (q . x)_g - mn[g] sum(x)_g, so the
// weights are never written out as floats. xs: the sums of x over each 16 columns (K / 16 of them).
template <class T>
float row_dot(const uint8_t* row, float scale, int64_t K, const float* __restrict x, const float* __restrict xs) {
    Unpacked u;
    v8 a0 = {}, a1 = {}, m0 = {};
    float tail = 0;
    for (int64_t k = 0; k < K; k += kChunk) {
        const int n = K - k < kChunk ? int(K - k) : kChunk;
        T::unpack(row, k, n, u, scale);
        if (n < kChunk) {  // a row's short last chunk: plainly
            for (int i = 0; i < n; i++) tail += (u.sc[i / 16] * float(u.q[i]) - u.mn[i / 16]) * x[k + i];
            break;
        }
        const float* xk = x + k;
        for (int g = 0; g < kChunk / 16; g += 2) {
            a0 += (cvt8(u.q + 16 * g) * ld(xk + 16 * g) + cvt8(u.q + 16 * g + 8) * ld(xk + 16 * g + 8)) * u.sc[g];
            a1 += (cvt8(u.q + 16 * g + 16) * ld(xk + 16 * g + 16) + cvt8(u.q + 16 * g + 24) * ld(xk + 16 * g + 24)) *
                  u.sc[g + 1];
        }
        if (T::has_min) m0 += ld(u.mn) * ld(xs + k / 16) + ld(u.mn + 8) * ld(xs + k / 16 + 8);
    }
    const v8 s = a0 + a1 - m0;
    float t = tail;
    for (int l = 0; l < 8; l++) t += s[l];
    return t;
}

template <class T, int R>
void matmul_rows(const uint8_t* w, const float* scales, int64_t N, int64_t K, const float* x, const float* xs,
                 int64_t M, float* y, int threads) {
    if (M < R) {
        if constexpr (R > 1) matmul_rows<T, R - 1>(w, scales, N, K, x, xs, M, y, threads);
        return;
    }
    const int64_t rb = T::row_bytes(K);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const float scale = scales ? scales[n] : 1.0f;
        if constexpr (R == 1)
            y[n] = row_dot<T>(w + n * rb, scale, K, x, xs);
        else
            rows_tile<T, R>(w + n * rb, scale, K, x, y + n, N);
    }
}

template <class T>
int matmul(const uint8_t* w, const float* scales, int64_t N, int64_t K, const float* x, int64_t M, float* y,
           int threads) {
    if (K % T::block) return -1;
    std::vector<float> xs;
    for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
        const int64_t m = M - m0 < kMaxRows ? M - m0 : kMaxRows;
        if (m == 1 && T::has_min) {  // the single-row path needs the row's sums over every 16 columns
            xs.assign(size_t(K / 16 + 16), 0.0f);
            for (int64_t i = 0; i < K / 16 * 16; i++) xs[size_t(i / 16)] += x[m0 * K + i];
        }
        matmul_rows<T, kMaxRows>(w, scales, N, K, x + m0 * K, xs.data(), m, y + m0 * N, threads);
    }
    return 0;
}

template <class T>
int dequantize(const uint8_t* w, const float* scales, int64_t N, int64_t K, float* out, int threads) {
    if (K % T::block) return -1;
    const int64_t rb = T::row_bytes(K);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        Unpacked u;
        for (int64_t k = 0; k < K; k += kChunk) {
            const int c = K - k < kChunk ? int(K - k) : kChunk;
            T::unpack(w + n * rb, k, c, u, scales ? scales[n] : 1.0f);
            to_float(u, c, out + n * K + k);
        }
    }
    return 0;
}

// F<type>(args...) for a ggml type code (100: lmsmith's int8); -1 for an unknown code
#define LMSMITH_DISPATCH(code, F, ...)               \
    switch (code) {                                  \
        case 8: return F<Q8_0>(__VA_ARGS__);         \
        case 2: return F<Q4_0>(__VA_ARGS__);         \
        case 6: return F<Q5_0>(__VA_ARGS__);         \
        case 7: return F<Q5_1>(__VA_ARGS__);         \
        case 11: return F<Q3_K>(__VA_ARGS__);        \
        case 12: return F<Q4_K>(__VA_ARGS__);        \
        case 13: return F<Q5_K>(__VA_ARGS__);        \
        case 14: return F<Q6_K>(__VA_ARGS__);        \
        case kInt8Rows: return F<Int8>(__VA_ARGS__); \
        default: return -1;                          \
    }

template <class T>
int64_t row_bytes_of(int64_t K) { return T::row_bytes(K); }

// bytes of one packed row of K weights of type `code` (-1 for an unknown code)
inline int64_t packed_row_bytes(int code, int64_t K) { LMSMITH_DISPATCH(code, row_bytes_of, K) }

// ---- the int8-activation path (AVX2): llama.cpp's method ------------------------------------------
//
// Activations are rounded to int8 with one float scale per 256 (K-quant weights; plus their sums
// over every 16) or per 32 (Q8_0 and int8 weights), and every block's product runs in integers
// (maddubs: u8 x s8 pairs -> i16, madd: i16 x scale -> i32); one float multiply per block. About
// 3x fewer instructions than the float path, at the price of rounding x to 8 bits (llama.cpp does
// the same; bench/quant_decode_speed.py and tests/test_quant_kernels.py measure the difference).

#if defined(__AVX2__)

struct QRow {  // one activation row, quantized
    std::vector<float> d;        // a scale per block (256 or 32 weights)
    std::vector<int8_t> q;       // K values
    std::vector<int16_t> bsums;  // sums of q over every 16 (K-quants)
};

// Rounds one row to int8 per block (blocks of 32 values at least), 32 values at a time; the same
// values as std::nearbyint (round half to even) of x * 127 / max|x|.
void quantize_row(const float* x, int64_t K, int block, QRow& r) {
    const int64_t nb = K / block;
    r.d.resize(size_t(nb));
    r.q.resize(size_t(K));
    r.bsums.resize(size_t(K / 16));
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undo packs' lane interleave
    for (int64_t b = 0; b < nb; b++) {
        const float* xb = x + b * block;
        __m256 m = _mm256_setzero_ps();
        for (int i = 0; i < block; i += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(xb + i)));
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_movehdup_ps(h));
        const float amax = _mm_cvtss_f32(h);
        r.d[size_t(b)] = amax / 127.0f;
        const __m256 id = _mm256_set1_ps(amax > 0 ? 127.0f / amax : 0.0f);
        for (int i = 0; i < block; i += 32) {
            __m256i v[4];
            for (int k = 0; k < 4; k++)
                v[k] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(xb + i + 8 * k), id),
                                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
            const __m256i q16a = _mm256_packs_epi32(v[0], v[1]), q16b = _mm256_packs_epi32(v[2], v[3]);
            const __m256i q8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(q16a, q16b), order);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(r.q.data() + b * block + i), q8);
        }
    }
    for (int64_t g = 0; g < K / 16; g++) {  // sums of every 16 (K-quants' mins and zero points)
        int s = 0;
        for (int i = 0; i < 16; i++) s += r.q[size_t(16 * g + i)];
        r.bsums[size_t(g)] = int16_t(s);
    }
}

inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

inline __m256i ld256(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// The madd factor of each 32-weight chunk: int16 lanes 0-7 scale weights 0-15, lanes 8-15 weights 16-31
inline void chunk_scales_16(const int16_t* sc, __m256i* out) {  // 16 scales of 16 weights each
    for (int k = 0; k < 8; k++) out[k] = _mm256_set_m128i(_mm_set1_epi16(sc[2 * k + 1]), _mm_set1_epi16(sc[2 * k]));
}
inline void chunk_scales_32(const int16_t* sc, __m256i* out) {  // 8 scales of 32 weights each
    for (int k = 0; k < 8; k++) out[k] = _mm256_set1_epi16(sc[k]);
}

// Q4_K / Q5_K: the 8 six-bit scales (sc) and mins (mins, pair-duplicated into 16 int16 lanes to meet
// the activations' 16-sums), unpacked with ggml's word tricks
inline void k4_scales(const uint8_t* b, int16_t* sc, __m256i& mins) {
    uint32_t u[4];
    std::memcpy(u, b + 4, 12);
    const uint32_t k1 = 0x3f3f3f3f, k2 = 0x0f0f0f0f, k3 = 0x03030303;
    u[3] = ((u[2] >> 4) & k2) | (((u[1] >> 6) & k3) << 4);
    const uint32_t mins_lo = u[1] & k1;
    u[1] = (u[2] & k2) | (((u[0] >> 6) & k3) << 4);
    u[2] = mins_lo;
    u[0] &= k1;  // bytes of u[0], u[1]: the 8 scales; of u[2], u[3]: the 8 mins
    uint8_t bytes[16];
    std::memcpy(bytes, u, 16);
    for (int j = 0; j < 8; j++) sc[j] = bytes[j];
    const __m128i m8 = _mm_set_epi32(int(u[3]), int(u[2]), int(u[3]), int(u[2]));
    mins = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(m8, _mm_set_epi8(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0)));
}

// Each dot function computes out[r] = row . a[r] for R activation rows at once: the weight bits are
// unpacked once per block and used R times (batched decode, serving).

template <int R>
struct Acts {  // the R activation rows' data for one weight block
    const int8_t* q[R];
    const int16_t* bsums[R];
    float d[R];
    Acts(const QRow* const* a, int64_t b, int block) {
        for (int r = 0; r < R; r++) {
            q[r] = a[r]->q.data() + b * block;
            bsums[r] = a[r]->bsums.data() + b * block / 16;
            d[r] = a[r]->d[size_t(b)];
        }
    }
};

// sum[r] += madd(maddubs(q, a[r] chunk k), scale): u8 weights x s8 activations, then the chunk's scales
template <int R>
inline void chunk_rows(const Acts<R>& a, int k, __m256i q, __m256i scale, __m256i* sum) {
    for (int r = 0; r < R; r++)
        sum[r] = _mm256_add_epi32(sum[r], _mm256_madd_epi16(_mm256_maddubs_epi16(q, ld256(a.q[r] + 32 * k)), scale));
}

template <bool Five, int R>
void dot_k45(const uint8_t* row, int64_t K, const QRow* const* rows, float* out) {
    constexpr int bytes = Five ? 176 : 144;
    const __m256i m4 = _mm256_set1_epi8(0x0F), one = _mm256_set1_epi8(1);
    __m256 acc[R];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < K / 256; b++) {
        const uint8_t* x = row + b * bytes;
        const Acts<R> a(rows, b, 256);
        int16_t sc[8];
        __m256i mins, scv[8], sum[R];
        k4_scales(x, sc, mins);
        chunk_scales_32(sc, scv);
        for (int r = 0; r < R; r++) sum[r] = _mm256_setzero_si256();
        const __m256i qh = Five ? ld256(x + 16) : _mm256_setzero_si256();
        const uint8_t* qs = x + (Five ? 48 : 16);
#pragma GCC unroll 4
        for (int j = 0; j < 4; j++) {  // sub-blocks 2j (low nibbles) and 2j + 1 (high)
            const __m256i bits = ld256(qs + 32 * j);
            __m256i lo = _mm256_and_si256(bits, m4), hi = _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4);
            if (Five) {
                lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * j), one), 4));
                hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * j + 1), one), 4));
            }
            chunk_rows<R>(a, 2 * j, lo, scv[2 * j], sum);
            chunk_rows<R>(a, 2 * j + 1, hi, scv[2 * j + 1], sum);
        }
        const float d = h2f(x), dmin = h2f(x + 2);
        for (int r = 0; r < R; r++) {
            const __m256i m = _mm256_madd_epi16(mins, ld256(a.bsums[r]));  // min * sum(q8) per sub-block
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[r]), _mm256_set1_ps(d * a.d[r]), acc[r]);
            acc[r] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(m), _mm256_set1_ps(dmin * a.d[r]), acc[r]);
        }
    }
    for (int r = 0; r < R; r++) out[r] = hsum(acc[r]);
}

// Q6_K and Q3_K: unsigned q with a zero point z (32, 4) and 16 signed scales of 16 weights; the zero
// point comes off through the activations' 16-sums: sum (q - z) a = sum q a - z sum a.
template <int R>
void finish_zero_point(const Acts<R>& a, const int16_t* sc16, int shift, float d, const __m256i* sum, __m256* acc) {
    const __m256i sc = ld256(sc16);
    for (int r = 0; r < R; r++) {
        const __m256i z = _mm256_slli_epi32(_mm256_madd_epi16(sc, ld256(a.bsums[r])), shift);
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(sum[r], z)), _mm256_set1_ps(d * a.d[r]), acc[r]);
    }
}

template <int R>
void dot_q6_k(const uint8_t* row, int64_t K, const QRow* const* rows, float* out) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(3);
    __m256 acc[R];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < K / 256; b++) {
        const uint8_t* x = row + b * 210;
        const Acts<R> a(rows, b, 256);
        alignas(32) int16_t sc[16];
        _mm256_store_si256(reinterpret_cast<__m256i*>(sc),
                           _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + 192))));
        __m256i scv[8], sum[R];
        chunk_scales_16(sc, scv);
        for (int r = 0; r < R; r++) sum[r] = _mm256_setzero_si256();
#pragma GCC unroll 2
        for (int h = 0; h < 2; h++) {
            const __m256i ql1 = ld256(x + 64 * h), ql2 = ld256(x + 64 * h + 32), qh = ld256(x + 128 + 32 * h);
            chunk_rows<R>(a, 4 * h, _mm256_or_si256(_mm256_and_si256(ql1, m4),
                                                     _mm256_slli_epi16(_mm256_and_si256(qh, m2), 4)), scv[4 * h], sum);
            chunk_rows<R>(a, 4 * h + 1, _mm256_or_si256(_mm256_and_si256(ql2, m4),
                          _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), m2), 4)), scv[4 * h + 1], sum);
            chunk_rows<R>(a, 4 * h + 2, _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                          _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4), m2), 4)), scv[4 * h + 2], sum);
            chunk_rows<R>(a, 4 * h + 3, _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql2, 4), m4),
                          _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 6), m2), 4)), scv[4 * h + 3], sum);
        }
        finish_zero_point<R>(a, sc, 5, h2f(x + 208), sum, acc);  // q - 32
    }
    for (int r = 0; r < R; r++) out[r] = hsum(acc[r]);
}

template <int R>
void dot_q3_k(const uint8_t* row, int64_t K, const QRow* const* rows, float* out) {
    const __m256i m2 = _mm256_set1_epi8(3), one = _mm256_set1_epi8(1);
    __m256 acc[R];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < K / 256; b++) {
        const uint8_t* x = row + b * 110;
        const Acts<R> a(rows, b, 256);
        uint32_t u[4];  // the 16 six-bit scales, one per byte (word tricks as in ggml), stored + 32
        std::memcpy(u, x + 96, 12);
        const uint32_t k1 = 0x03030303, k2 = 0x0f0f0f0f, top = u[2];
        u[2] = ((u[0] >> 4) & k2) | (((top >> 4) & k1) << 4);
        u[3] = ((u[1] >> 4) & k2) | (((top >> 6) & k1) << 4);
        u[0] = (u[0] & k2) | ((top & k1) << 4);
        u[1] = (u[1] & k2) | (((top >> 2) & k1) << 4);
        alignas(32) int16_t sc[16];
        const __m128i s8 = _mm_sub_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(u)), _mm_set1_epi8(32));
        _mm256_store_si256(reinterpret_cast<__m256i*>(sc), _mm256_cvtepi8_epi16(s8));
        __m256i scv[8], sum[R];
        chunk_scales_16(sc, scv);
        for (int r = 0; r < R; r++) sum[r] = _mm256_setzero_si256();
        const __m256i hm = ld256(x);
#pragma GCC unroll 8
        for (int k = 0; k < 8; k++) {
            const __m256i qs = ld256(x + 32 + 32 * (k / 4));
            const __m256i q = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(qs, 2 * (k % 4)), m2),
                                              _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hm, k), one), 2));
            chunk_rows<R>(a, k, q, scv[k], sum);
        }
        finish_zero_point<R>(a, sc, 2, h2f(x + 108), sum, acc);  // q - 4
    }
    for (int r = 0; r < R; r++) out[r] = hsum(acc[r]);
}

// signed int8 weights (Q8_0 blocks, or int8 rows with one scale) against per-32 activations
template <bool RowScale, int R>
void dot_i8(const uint8_t* row, int64_t K, const QRow* const* rows, float row_scale, float* out) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[R];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < K / 32; b++) {
        const uint8_t* x = RowScale ? row + 32 * b : row + 34 * b;
        const Acts<R> a(rows, b, 32);
        const __m256i w = ld256(RowScale ? x : x + 2), aw = _mm256_sign_epi8(w, w);
        const float dw = RowScale ? row_scale : h2f(x);
        for (int r = 0; r < R; r++) {
            const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(ld256(a.q[r]), w)), ones);
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(dw * a.d[r]), acc[r]);
        }
    }
    for (int r = 0; r < R; r++) out[r] = hsum(acc[r]);
}

// block of activation scales for a type code (0: no int8 path)
int int8_block(int code, int64_t K) {
    switch (code) {
        case 11: case 12: case 13: case 14: return K % 256 ? 0 : 256;
        case 8: case kInt8Rows: return K % 32 ? 0 : 32;
        default: return 0;
    }
}

template <int R>
void dot_int8(int code, const uint8_t* row, int64_t K, const QRow* const* a, float scale, float* out) {
    switch (code) {
        case 11: return dot_q3_k<R>(row, K, a, out);
        case 12: return dot_k45<false, R>(row, K, a, out);
        case 13: return dot_k45<true, R>(row, K, a, out);
        case 14: return dot_q6_k<R>(row, K, a, out);
        case 8: return dot_i8<false, R>(row, K, a, 1.0f, out);
        default: return dot_i8<true, R>(row, K, a, scale, out);
    }
}

constexpr int kInt8Tile = 4;  // activation rows per pass over a weight row

int matmul_int8(int code, const uint8_t* w, const float* scales, int64_t N, int64_t K, const float* x, int64_t M,
                float* y, int threads) {
    const int block = int8_block(code, K);
    if (!block) return -1;
    const int64_t rb = packed_row_bytes(code, K);
    std::vector<QRow> rows(static_cast<size_t>(M));
    for (int64_t m = 0; m < M; m++) quantize_row(x + m * K, K, block, rows[size_t(m)]);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const float scale = scales ? scales[n] : 1.0f;
        for (int64_t m0 = 0; m0 < M; m0 += kInt8Tile) {
            const QRow* a[kInt8Tile];
            float out[kInt8Tile];
            const int t = int(M - m0 < kInt8Tile ? M - m0 : kInt8Tile);
            for (int i = 0; i < t; i++) a[i] = &rows[size_t(m0 + i)];
            switch (t) {
                case 4: dot_int8<4>(code, w + n * rb, K, a, scale, out); break;
                case 3: dot_int8<3>(code, w + n * rb, K, a, scale, out); break;
                case 2: dot_int8<2>(code, w + n * rb, K, a, scale, out); break;
                default: dot_int8<1>(code, w + n * rb, K, a, scale, out);
            }
            for (int i = 0; i < t; i++) y[(m0 + i) * N + n] = out[i];
        }
    }
    return 0;
}

#else

int matmul_int8(int, const uint8_t*, const float*, int64_t, int64_t, const float*, int64_t, float*, int) { return -1; }

#endif

}  // namespace

extern "C" {

// y (M, N) = x (M, K) @ W^T, W given as N rows of K / block blocks of type `code`; float32 x and y,
// all row-major and contiguous. scales: one per output row for code 100 (int8: K bytes a row, any K),
// else unused. Returns 0, or -1 for an unknown type or a K that is not a multiple of the block size.
// The caller (kernels.py) checks every buffer's size.
int lmsmith_packed_matmul(int code, const uint8_t* w, const float* scales, int64_t N, int64_t K, const float* x,
                          int64_t M, float* y, int threads) {
    LMSMITH_DISPATCH(code, matmul, w, scales, N, K, x, M, y, threads)
}

// out (N, K) float32 = the dequantized rows of W (arguments as for lmsmith_packed_matmul).
int lmsmith_dequantize_rows(int code, const uint8_t* w, const float* scales, int64_t N, int64_t K, float* out,
                            int threads) {
    LMSMITH_DISPATCH(code, dequantize, w, scales, N, K, out, threads)
}

// As lmsmith_packed_matmul, with x rounded to int8 (per 256 weights for K-quants, per 32 for Q8_0 and
// int8 rows) and integer block products: faster, not exact. -1 where this build or type has no such
// path (no AVX2; Q4_0 / Q5_0 / Q5_1; K not a multiple of the block): use lmsmith_packed_matmul then.
int lmsmith_packed_matmul_int8(int code, const uint8_t* w, const float* scales, int64_t N, int64_t K,
                               const float* x, int64_t M, float* y, int threads) {
    return matmul_int8(code, w, scales, N, K, x, M, y, threads);
}

}  // extern "C"
