// Quantized matmuls on a bundle's stored codes (graphs/quant.py), one set per instruction set.
//
// Both kernels take fp32 activations x [M, K], quantize them to int8 the way the graphs spell it in
// float (so the results are the graphs' arithmetic, with int32 sums), and multiply with the weights
// where they lie (the memory-mapped bundle): nothing is packed ahead, nothing is kept between calls.
//
//   w4a8  (form int4x8)  codes uint8 [N, K/2] (low nibble = even input, q + 8), scales fp32 [N, K/32];
//         x per block of 32: q = clamp(floor(x * (127 / amax) + 1/2), +-127), d = amax * (1/127);
//         y[m, n] = sum_b (d[m, b] * scale[n, b]) * sum_j q[m, 32b + j] * (code[n, 32b + j] - 8).
//   w8a8  (form int8x8)  weight int8 [K, N] in [-63, 63], scale fp32 [N], smooth fp32 [K];
//         xs = x * smooth, step = max(amax(xs), 1e-30) * (1/127), q = clamp(floor(xs / step + 1/2), +-127);
//         y[m, n] = (sum_k q[m, k] * w[k, n] * step) * scale[n].
//
// The caller quantizes up to ROWS rows at a time into `Activations`, then runs an instruction set's tasks
// for them (`tasks_*`: strips of output columns, or decode's bands of weight rows), spread over threads.
//
// Each instruction set's file is compiled with its own -m flags, so it uses nothing from the C++ library
// that the linker could merge between them (templates, inline functions): its AVX-512 copy of a helper
// must never serve the AVX2 path. Buffers are allocated by the caller (ops.cpp).
#pragma once
#include <cstddef>
#include <cstdint>

namespace qmm {

constexpr int GROUP = 32;      // int4 block: inputs per scale (graphs/quant.py GROUP)
constexpr int ROWS = 128;      // activation rows quantized and multiplied at a time (they stay in L2)
constexpr int PAD_ROWS = 16;   // rows past the chunk's that tile layouts may use (amx: whole tiles of 16 rows)

// the quantized activations of one chunk of rows, laid out for one instruction set's vectors; the caller
// allocates (rows + PAD_ROWS) * row_bytes, and as many times row_lanes, elements (`Isa::layout`), zeroed
struct Activations {
    int rows, k;
    size_t row_bytes, row_lanes;
    int8_t* q;          // w4a8: per row [even inputs | odd inputs], blocks padded to whole vectors; w8a8: [K] padded to 4
    float* scale;       // w4a8: per row and block, the block's step repeated over its 4 int32 lanes; w8a8: step per row
    int32_t* offset;    // w4a8: per row and block, -8 * sum(q) in the block's first lane, 0 in its others;
                        // w8a8: per row, -64 * sum(q)
    int32_t* partial;   // w8a8 decode: the int32 sums of each band of weight rows (`Isa::partial_w8a8` elements)
    int* bands_done;    // w8a8 decode: bands summed so far (0 before the tasks run)
};

struct W4A8 {
    const uint8_t* codes; const float* scales; int n, k;
};
struct W8A8 {
    const int8_t* weight; const float* scale; const float* smooth; int n, k;
};

// one instruction set's kernels
struct Isa {
    const char* name;
    bool (*supported)();
    void (*layout)(bool w4a8, int k, size_t* row_bytes, size_t* row_lanes);
    // rows [first, first + count) of the chunk whose first row x points to (tasks quantize parts of a chunk)
    void (*quantize_w4a8)(const float* x, int first, int count, Activations& a);
    int (*tasks_w4a8)(int n, int k, int rows);
    void (*run_w4a8)(const W4A8& w, const Activations& a, float* y, int task);
    void (*quantize_w8a8)(const float* x, const float* smooth, int first, int count, Activations& a);
    int (*tasks_w8a8)(int n, int k, int rows);
    void (*run_w8a8)(const W8A8& w, const Activations& a, float* y, int task);
    // decode (one row) sums bands of weight rows apart (this many int32 shared by its tasks), and the
    // task that finishes last adds them up
    size_t (*partial_w8a8)(int n, int k, int rows);
};

extern const Isa avx2, avxvnni, avx512, avx512vnni, amx;

}  // namespace qmm
