// onnxruntime custom operators (domain com.cogvlm2) over the kernels of qmatmul.h, and the library's
// entry point RegisterCustomOps (SessionOptions.register_custom_ops_library).
//
//   MatMulW4A8(x fp32 [.., K], codes uint8 [N, K/2], scales fp32 [N, K/32]) -> y fp32 [.., N]
//   MatMulW8A8(x fp32 [.., K], smooth fp32 [K], weight int8 [K, N], scale fp32 [N]) -> y fp32 [.., N]
//   Attention(q [B, H, G*S, D], k0, v0 [B, H, T0, D], bias0?, k1?, v1? [B, H, T1, D], bias1?; scale, groups = G)
//             -> o fp32 [B, H, G*S, D]   (attention.h; a bias broadcasts to [B, H, G, S, T] as numpy does)
//   DecodeAttention(query [B, 1, H*D], key, value [B, 1, KV*D], past_key, past_value [B, KV, T, D], write_index int32 [B];
//                   num_heads = H, kv_num_heads = KV, scale) -> output [B, 1, H*D], present_key, present_value
//             (attention.h; the present outputs alias the past inputs where the caller binds them so)
//
// The weights are the graph's inputs as bound (the memory-mapped bundle): read in place by every graph.
// Rows are quantized qmm::ROWS at a time, then the column strips of each chunk are spread over
// onnxruntime's intra-op threads (KernelContext_ParallelFor): no threads of our own.
// The instruction set is the best the CPU has (amx, avx512vnni, avx512, avxvnni, avx2), or the one named
// by the environment variable COGVLM2_KERNELS_ISA when a kernel is created (tests use it to run each).
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "attention.h"
#include "qmatmul.h"

namespace {

const qmm::Isa* const ISAS[] = {&qmm::amx, &qmm::avx512vnni, &qmm::avx512, &qmm::avxvnni, &qmm::avx2};   // preferred first

// the instruction set the kernels use now -> nullptr with `why` set when none can run
const qmm::Isa* choose_isa(std::string& why) {
    const char* forced = std::getenv("COGVLM2_KERNELS_ISA");
    if (forced && *forced) {
        for (const qmm::Isa* isa : ISAS)
            if (std::string(forced) == isa->name) {
                if (isa->supported()) return isa;
                why = std::string("COGVLM2_KERNELS_ISA=") + forced + ": this CPU lacks that instruction set";
                return nullptr;
            }
        why = std::string("COGVLM2_KERNELS_ISA=") + forced + " is not one of amx, avx512vnni, avx512, avxvnni, avx2";
        return nullptr;
    }
    for (const qmm::Isa* isa : ISAS)
        if (isa->supported()) return isa;
    why = "the quantized kernels need at least AVX2 and FMA";
    return nullptr;
}

std::vector<int64_t> shape_of(const Ort::ConstValue& v) { return v.GetTensorTypeAndShapeInfo().GetShape(); }

int64_t elements(const std::vector<int64_t>& s) {
    int64_t n = 1;
    for (int64_t d : s) n *= d;
    return n;
}

// this call's quantized activations (a session may run from several threads at once)
struct Buffers {
    std::vector<int8_t> q;
    std::vector<float> scale;
    std::vector<int32_t> offset;
    std::vector<int32_t> partial;
    int bands_done = 0;

    qmm::Activations prepare(const qmm::Isa& isa, bool w4a8, int rows, int k, size_t partials) {
        qmm::Activations a{rows, k, 0, 0, nullptr, nullptr, nullptr, nullptr, &bands_done};
        isa.layout(w4a8, k, &a.row_bytes, &a.row_lanes);
        bands_done = 0;
        const size_t n = rows + qmm::PAD_ROWS;
        if (rows >= qmm::PAD_ROWS) {   // tile layouts leave padding rows to be zero
            q.assign(n * a.row_bytes, 0);
            scale.assign(n * a.row_lanes, 0.0f);
            offset.assign(n * a.row_lanes, 0);
        } else {   // the vector layouts write their padding themselves
            q.resize(n * a.row_bytes);
            scale.resize(n * a.row_lanes);
            offset.resize(n * a.row_lanes);
        }
        a.q = q.data();
        a.scale = scale.data();
        a.offset = offset.data();
        partial.resize(partials);
        a.partial = partial.data();
        return a;
    }
};

// f(0), ..., f(n - 1) on onnxruntime's intra-op threads
template <typename F>
void parallel(Ort::KernelContext& ctx, size_t n, F& f) {
    ctx.ParallelFor([](void* self, size_t i) { (*static_cast<F*>(self))(i); }, n, 0, &f);
}

constexpr int QUANTIZE_ROWS = 8;   // rows quantized per task (many rows: prefill, vision)

// a kernel's ComputeV2: its compute(), an exception (a bad input's one sentence) as onnxruntime's error status
template <typename K>
struct Checked {
    OrtStatusPtr ComputeV2(OrtKernelContext* context) {
        try {
            static_cast<K*>(this)->compute(context);
            return nullptr;
        } catch (const std::exception& e) {
            return Ort::GetApi().CreateStatus(ORT_INVALID_ARGUMENT, e.what());
        }
    }
};

struct Kernel : Checked<Kernel> {
    const qmm::Isa* isa;
    bool w4a8;

    Kernel(const qmm::Isa* isa, bool w4a8) : isa(isa), w4a8(w4a8) {}

    void compute(OrtKernelContext* context) {
        Ort::KernelContext ctx(context);
        const Ort::ConstValue x = ctx.GetInput(0);
        std::vector<int64_t> xs = shape_of(x);
        if (xs.empty()) throw std::invalid_argument("x must have at least one dimension");
        const int64_t k = xs.back(), m = k ? elements(xs) / k : 0;
        const float* xp = x.GetTensorData<float>();
        if (w4a8) {
            const Ort::ConstValue codes = ctx.GetInput(1), scales = ctx.GetInput(2);
            const int64_t n = shape_of(codes).at(0);
            if (k % qmm::GROUP || elements(shape_of(codes)) != n * k / 2 || elements(shape_of(scales)) != n * k / qmm::GROUP)
                throw std::invalid_argument("MatMulW4A8: codes must be [N, K/2] and scales [N, K/32] for x [.., K], K a multiple of 32");
            xs.back() = n;
            float* y = ctx.GetOutput(0, xs).GetTensorMutableData<float>();
            const qmm::W4A8 w{codes.GetTensorData<uint8_t>(), scales.GetTensorData<float>(), static_cast<int>(n), static_cast<int>(k)};
            run(ctx, w, xp, y, m, k, n, [&](const float* xc, int first, int count, qmm::Activations& a) { isa->quantize_w4a8(xc, first, count, a); },
                isa->tasks_w4a8, isa->run_w4a8, nullptr);
        } else {
            const Ort::ConstValue smooth = ctx.GetInput(1), weight = ctx.GetInput(2), scale = ctx.GetInput(3);
            const std::vector<int64_t> ws = shape_of(weight);
            if (ws.size() != 2 || ws[0] != k || elements(shape_of(smooth)) != k || elements(shape_of(scale)) != ws[1])
                throw std::invalid_argument("MatMulW8A8: weight must be [K, N], smooth [K] and scale [N] for x [.., K]");
            const int64_t n = ws[1];
            xs.back() = n;
            float* y = ctx.GetOutput(0, xs).GetTensorMutableData<float>();
            const float* sp = smooth.GetTensorData<float>();
            const qmm::W8A8 w{weight.GetTensorData<int8_t>(), scale.GetTensorData<float>(), sp, static_cast<int>(n), static_cast<int>(k)};
            run(ctx, w, xp, y, m, k, n, [&](const float* xc, int first, int count, qmm::Activations& a) { isa->quantize_w8a8(xc, sp, first, count, a); },
                isa->tasks_w8a8, isa->run_w8a8, isa->partial_w8a8);
        }
    }

    template <typename Weights, typename Quantize>
    void run(Ort::KernelContext& ctx, const Weights& w, const float* x, float* y, int64_t m, int64_t k, int64_t n,
             Quantize quantize, int (*tasks)(int, int, int),
             void (*kernel)(const Weights&, const qmm::Activations&, float*, int), size_t (*partials)(int, int, int)) {
        thread_local Buffers buffers;
        const int ni = static_cast<int>(n), ki = static_cast<int>(k);
        for (int64_t m0 = 0; m0 < m; m0 += qmm::ROWS) {
            const int rows = static_cast<int>(std::min<int64_t>(qmm::ROWS, m - m0));
            qmm::Activations a = buffers.prepare(*isa, w4a8, rows, ki, partials ? partials(ni, ki, rows) : 0);
            auto quantize_rows = [&](size_t task) {
                const int r0 = static_cast<int>(task) * QUANTIZE_ROWS;
                quantize(x + m0 * k, r0, std::min(QUANTIZE_ROWS, rows - r0), a);
            };
            parallel(ctx, (rows + QUANTIZE_ROWS - 1) / QUANTIZE_ROWS, quantize_rows);
            float* out = y + m0 * n;
            auto multiply = [&](size_t task) { kernel(w, a, out, static_cast<int>(task)); };
            parallel(ctx, tasks(ni, ki, rows), multiply);
        }
    }
};

// an operator's CreateKernelV2: the kernel `make(isa, node info)` returns for the instruction set chosen; none
// usable, or an attribute missing, as onnxruntime's error status
template <typename Make>
OrtStatusPtr create_kernel(const OrtApi& api, const OrtKernelInfo* info, void** kernel, Make make) {
    std::string why;
    const qmm::Isa* isa = choose_isa(why);
    if (!isa) return api.CreateStatus(ORT_FAIL, why.c_str());
    try {
        *kernel = make(*isa, Ort::ConstKernelInfo(info));
    } catch (const std::exception& e) {
        return api.CreateStatus(ORT_INVALID_ARGUMENT, e.what());
    }
    return nullptr;
}

template <bool W4A8>
struct Op : Ort::CustomOpBase<Op<W4A8>, Kernel, true> {
    OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
        return create_kernel(api, info, kernel, [](const qmm::Isa& isa, const Ort::ConstKernelInfo&) { return new Kernel(&isa, W4A8); });
    }
    const char* GetName() const { return W4A8 ? "MatMulW4A8" : "MatMulW8A8"; }
    size_t GetInputTypeCount() const { return W4A8 ? 3 : 4; }
    ONNXTensorElementDataType GetInputType(size_t i) const {
        if (W4A8) return i == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
        return i == 2 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    }
    size_t GetOutputTypeCount() const { return 1; }
    ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

Op<true> w4a8_op;
Op<false> w8a8_op;

// the attention kernels of the vector width the quantized kernels use
const qmm::AttentionIsa& attention_isa(const qmm::Isa& isa) {
    return &isa == &qmm::avx2 || &isa == &qmm::avxvnni ? qmm::attention_avx2 : qmm::attention_avx512;
}

struct AttentionKernel : Checked<AttentionKernel> {
    const qmm::AttentionIsa* isa;
    float scale;
    int64_t groups;

    // bias [.., T] -> its element strides over [B, H, G, S, T] (right-aligned, 0 where it broadcasts)
    static void bias_strides(const std::vector<int64_t>& shape, const int64_t (&dims)[5], int64_t (&out)[5]) {
        if (shape.size() > 5) throw std::invalid_argument("Attention: a bias has more than 5 dimensions");
        int64_t stride = 1;
        for (int i = 4, j = static_cast<int>(shape.size()) - 1; i >= 0; i--, j--) {
            const int64_t n = j >= 0 ? shape[j] : 1;
            if (n != 1 && n != dims[i])
                throw std::invalid_argument("Attention: a bias does not broadcast to [B, H, G, S, T]");
            out[i] = n == 1 ? 0 : stride;
            stride *= n;
        }
    }

    void compute(OrtKernelContext* context) {
        Ort::KernelContext ctx(context);
        const Ort::ConstValue q = ctx.GetInput(0);
        const std::vector<int64_t> qs = shape_of(q);
        if (qs.size() != 4 || groups < 1 || qs[2] % groups)
            throw std::invalid_argument("Attention: q must be [B, H, G*S, D] with G = groups");
        qmm::Attention a{};
        a.q = q.GetTensorData<float>();
        a.b = static_cast<int>(qs[0]), a.h = static_cast<int>(qs[1]), a.g = static_cast<int>(groups);
        a.s = static_cast<int>(qs[2] / groups), a.d = static_cast<int>(qs[3]);
        a.scale = scale;
        const size_t inputs = ctx.GetInputCount();
        for (int i = 0; i < 2; i++) {
            const size_t first = 1 + 3 * i;
            if (first >= inputs || ctx.GetInput(first) == nullptr) break;
            const Ort::ConstValue k = ctx.GetInput(first), v = ctx.GetInput(first + 1);
            if (v == nullptr) throw std::invalid_argument("Attention: a source has keys but no values");
            const std::vector<int64_t> ks = shape_of(k);
            if (ks.size() != 4 || ks[0] != qs[0] || ks[1] != qs[1] || ks[3] != qs[3] || shape_of(v) != ks)
                throw std::invalid_argument("Attention: k and v must be [B, H, T, D] for q [B, H, G*S, D]");
            qmm::AttentionSource& src = a.src[a.sources++];
            src.k = k.GetTensorData<float>();
            src.v = v.GetTensorData<float>();
            src.t = static_cast<int>(ks[2]);
            const Ort::ConstValue bias = first + 2 < inputs ? ctx.GetInput(first + 2) : Ort::ConstValue{nullptr};
            if (bias != nullptr) {
                const int64_t dims[5] = {qs[0], qs[1], groups, qs[2] / groups, ks[2]};
                bias_strides(shape_of(bias), dims, src.bias_strides);
                src.bias = bias.GetTensorData<float>();
            }
        }
        if (a.sources == 0) throw std::invalid_argument("Attention: no keys");
        a.o = ctx.GetOutput(0, qs).GetTensorMutableData<float>();
        thread_local std::vector<float> kt;   // kept between calls: its pages are faulted in once
        if (kt.size() < a.kt_floats()) kt.resize(a.kt_floats());
        a.kt = kt.data();
        auto pack = [&](size_t task) { isa->pack(a, static_cast<int>(task)); };
        parallel(ctx, a.pack_tasks(), pack);
        auto attend = [&](size_t task) { isa->attend(a, static_cast<int>(task)); };
        parallel(ctx, a.attend_tasks(), attend);
    }
};

struct AttentionOp : Ort::CustomOpBase<AttentionOp, AttentionKernel, true> {
    OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
        return create_kernel(api, info, kernel, [](const qmm::Isa& isa, const Ort::ConstKernelInfo& ki) {
            return new AttentionKernel{{}, &attention_isa(isa), ki.GetAttribute<float>("scale"), ki.GetAttribute<int64_t>("groups")};
        });
    }
    const char* GetName() const { return "Attention"; }
    size_t GetInputTypeCount() const { return 7; }
    ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
    OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
        return i < 3 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
    }
    size_t GetOutputTypeCount() const { return 1; }
    ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

AttentionOp attention_op;

struct DecodeAttentionKernel : Checked<DecodeAttentionKernel> {
    const qmm::AttentionIsa* isa;
    int64_t heads, kv_heads;
    float scale;

    void compute(OrtKernelContext* context) {
        Ort::KernelContext ctx(context);
        const Ort::ConstValue q = ctx.GetInput(0), k = ctx.GetInput(1), v = ctx.GetInput(2);
        const Ort::ConstValue past_k = ctx.GetInput(3), past_v = ctx.GetInput(4), index = ctx.GetInput(5);
        const std::vector<int64_t> qs = shape_of(q), cs = shape_of(past_k);
        if (kv_heads < 1 || heads % kv_heads || heads / kv_heads > qmm::QUERY_TILE)
            throw std::invalid_argument("DecodeAttention: num_heads must be a multiple of kv_num_heads, at most " +
                                        std::to_string(qmm::QUERY_TILE) + " times it");
        if (cs.size() != 4 || cs[1] != kv_heads || shape_of(past_v) != cs)
            throw std::invalid_argument("DecodeAttention: past_key and past_value must be [B, kv_num_heads, T, D]");
        const int64_t b = cs[0], t = cs[2], d = cs[3];
        if (elements(qs) != b * heads * d || elements(shape_of(k)) != b * kv_heads * d || elements(shape_of(v)) != b * kv_heads * d)
            throw std::invalid_argument("DecodeAttention: query must hold B x num_heads x D values, key and value B x kv_num_heads x D");
        if (elements(shape_of(index)) != b) throw std::invalid_argument("DecodeAttention: write_index must hold one slot per batch row");
        const int32_t* w = index.GetTensorData<int32_t>();
        for (int64_t i = 0; i < b; i++)
            if (w[i] < 0 || w[i] > t) throw std::invalid_argument("DecodeAttention: a write_index is outside [0, T]");
        // the present outputs are the cache itself when the caller binds them to the past inputs' memory (the
        // runtime does); unbound, they are new buffers and get a copy of the cache first
        float* present[2];
        const Ort::ConstValue past[2] = {past_k, past_v};
        for (int i = 0; i < 2; i++) {
            present[i] = ctx.GetOutput(1 + i, cs).GetTensorMutableData<float>();
            const float* from = past[i].GetTensorData<float>();
            if (present[i] != from) std::copy(from, from + elements(cs), present[i]);
        }
        qmm::DecodeAttention a{q.GetTensorData<float>(), k.GetTensorData<float>(), v.GetTensorData<float>(),
                               present[0], present[1], w, ctx.GetOutput(0, qs).GetTensorMutableData<float>(),
                               static_cast<int>(b), static_cast<int>(heads), static_cast<int>(kv_heads),
                               static_cast<int>(t), static_cast<int>(d), scale};
        auto decode = [&](size_t task) { isa->decode(a, static_cast<int>(task)); };
        parallel(ctx, a.tasks(), decode);
    }
};

struct DecodeAttentionOp : Ort::CustomOpBase<DecodeAttentionOp, DecodeAttentionKernel, true> {
    OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
        return create_kernel(api, info, kernel, [](const qmm::Isa& isa, const Ort::ConstKernelInfo& ki) {
            return new DecodeAttentionKernel{{}, &attention_isa(isa), ki.GetAttribute<int64_t>("num_heads"),
                                             ki.GetAttribute<int64_t>("kv_num_heads"), ki.GetAttribute<float>("scale")};
        });
    }
    const char* GetName() const { return "DecodeAttention"; }
    size_t GetInputTypeCount() const { return 6; }
    ONNXTensorElementDataType GetInputType(size_t i) const {
        return i == 5 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    }
    size_t GetOutputTypeCount() const { return 3; }
    ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

DecodeAttentionOp decode_attention_op;

}  // namespace

extern "C" {

// The instruction set the kernels would use now, or "" with the reason in `why` (a buffer of `size` bytes).
__attribute__((visibility("default"))) const char* cogvlm2_kernels_isa(char* why, size_t size) {
    std::string reason;
    const qmm::Isa* isa = choose_isa(reason);
    if (why && size) {
        why[0] = 0;
        reason.copy(why, size - 1);
        why[std::min(reason.size(), size - 1)] = 0;
    }
    return isa ? isa->name : "";
}

// The instruction sets this CPU runs, comma-separated, preferred first.
__attribute__((visibility("default"))) const char* cogvlm2_kernels_supported() {
    static std::string names;
    static std::once_flag once;
    std::call_once(once, [] {
        for (const qmm::Isa* isa : ISAS)
            if (isa->supported()) names += (names.empty() ? "" : ",") + std::string(isa->name);
    });
    return names.c_str();
}

__attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                                  const OrtApiBase* api_base) {
    const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
    if (!api) return nullptr;   // cannot happen: runtimes serve every older API version
    Ort::InitApi(api);
    static OrtCustomOpDomain* domain = nullptr;
    static std::once_flag once;
    OrtStatus* status = nullptr;
    std::call_once(once, [&] {
        if ((status = api->CreateCustomOpDomain("com.cogvlm2", &domain))) return;
        if ((status = api->CustomOpDomain_Add(domain, &w4a8_op))) return;
        if ((status = api->CustomOpDomain_Add(domain, &w8a8_op))) return;
        if ((status = api->CustomOpDomain_Add(domain, &attention_op))) return;
        status = api->CustomOpDomain_Add(domain, &decode_attention_op);
    });
    return status ? status : api->AddCustomOpDomain(options, domain);
}

}  // extern "C"
