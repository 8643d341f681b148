"""Quantized weights: one class per stored form of a linear weight, and schemes that map weights to forms.

As gpt-fast's quantize.py has one handler per scheme, each `Form` here owns everything about one way
of storing a linear weight NAME [out, in]: the bundle tensors that stand for it (`stored`), the numpy
quantizer that makes them (`quantize`) and the reference arithmetic (`dequantize`, `reference`),
what the graph computes with them (`graph_weight`, `graph_linear`), its manifest entry (`manifest`)
and the onnxruntime kernel the exported ONNX is rewritten to (`onnx_nodes`, with what that kernel
pre-packs), or our own kernel (`kernel_nodes`: kernels/, custom operators of domain KERNELS_DOMAIN
that read the stored tensors as they are; the export writes both forms of a graph). Nothing outside this file branches on a form's name: the export asks `form_of`, the
readers of a bundle take the form from its manifest (`weight_forms`).

  int8    NAME.qweight int8 [out, in] (conv weights [out, C, k, k] alike) + NAME.scale fp32 [out]:
          weight-only, symmetric, per output channel; the graph dequantizes `q * scale`.
  int4    NAME.qweight uint8 [out, in/2]: two 4-bit codes per byte, low nibble first, each code
          q + 8 for q in [-7, 7]; NAME.scale fp32 [out, in/GROUP]: symmetric per group of GROUP
          inputs; the graph dequantizes. onnxruntime's MatMulNBits layout (bits 4, zero point 8).
  int4x8  int4's tensors; the activations are quantized to int8 per GROUP inputs of a token at run
          time (llama.cpp's Q4_0 x Q8_0): what MatMulNBits computes with accuracy_level 4.
  int8x8  NAME.qweight int8 [in, out] (transposed: integer GEMMs take B as [K, N]) + NAME.scale fp32
          [out] + NAME.smooth fp32 [in]: SmoothQuant. The graph multiplies the activations by
          `smooth`, quantizes them per token (symmetric int8, at run time) and multiplies integers.

A scheme names its form; a weight that form cannot take (convolutions; an int4 input width that is
not a multiple of GROUP on a rank) falls back to int8.

Round-to-nearest everywhere, so |w - dequantize(quantize(w))| <= step / 2 element-wise.
"""
from dataclasses import replace

import mindspore as ms
import numpy as np
from mindspore import ops

from .weights import REPLICATED, Split, WeightSpec

GROUP = 32                 # int4 group size (inputs per scale)
KERNELS_DOMAIN = "com.cogvlm2"   # our quantized matmuls (kernels/ops.cpp)
NOT_LINEAR = ("embed_tokens", "position_embedding", "cls_embedding", ".boi", ".eoi")
CHUNK_ROWS = 4096          # rows quantized at a time: float temporaries stay small for the 19B's 2 GB lm_head
_matmul = ops.MatMul()
_matmul_t = ops.MatMul(transpose_b=True)
_QMAX = ms.Tensor(127.0, ms.float32)


def is_linear_weight(name: str, shape) -> bool:
    """A weight a scheme quantizes: 2-D linears and 4-D convolutions, not embeddings or boi/eoi."""
    return (name.endswith(".weight") and len(shape) in (2, 4)
            and not any(s in name for s in NOT_LINEAR))


def by_rows(fn, w: np.ndarray, *args) -> tuple:
    """fn(rows, *args) -> arrays with one leading row each, applied CHUNK_ROWS at a time and joined."""
    parts = [fn(w[i:i + CHUNK_ROWS], *args) for i in range(0, w.shape[0], CHUNK_ROWS)]
    return tuple(np.concatenate(p) for p in zip(*parts))


def quantize_rows(w: np.ndarray, qmax: int = 127) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row (output channel) int8: -> (q int8 like w, scale fp32 [rows])."""
    w2 = np.asarray(w, np.float32).reshape(w.shape[0], -1)
    absmax = np.abs(w2).max(axis=1)
    scale = np.where(absmax > 0, absmax / qmax, 1.0).astype(np.float32)
    q = np.clip(np.rint(w2 / scale[:, None]), -qmax, qmax).astype(np.int8)
    return q.reshape(w.shape), scale


def quantize_groups4(w: np.ndarray, group: int = GROUP) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric 4-bit per group of `group` inputs: -> (packed uint8 [out, in/2], scale fp32 [out, in/group])."""
    out, inp = w.shape
    g = np.asarray(w, np.float32).reshape(out, inp // group, group)
    absmax = np.abs(g).max(axis=2)
    scale = np.where(absmax > 0, absmax / 7, 1.0).astype(np.float32)
    codes = (np.clip(np.rint(g / scale[:, :, None]), -7, 7) + 8).astype(np.uint8).reshape(out, inp)
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8), scale


def unpack4(packed: np.ndarray) -> np.ndarray:
    """uint8 [out, in/2] -> int8 codes [out, in] in [-7, 7] (low nibble first)."""
    codes = np.empty((packed.shape[0], packed.shape[1] * 2), np.int8)
    codes[:, 0::2] = (packed & 0x0F).astype(np.int8) - 8
    codes[:, 1::2] = (packed >> 4).astype(np.int8) - 8
    return codes


def smoothing(w: np.ndarray, act_absmax: np.ndarray | None, alpha: float) -> np.ndarray:
    """SmoothQuant per-input-channel factors s > 0: s_j = absmax(x_j)^alpha / absmax(W[:, j])^(1 - alpha)
    (W' = W diag(s), x' = x / s); all ones without activation statistics."""
    if act_absmax is None:
        return np.ones(w.shape[1], np.float32)
    wmax = np.max([np.abs(np.asarray(w[i:i + CHUNK_ROWS], np.float32)).max(axis=0)
                   for i in range(0, w.shape[0], CHUNK_ROWS)], axis=0).astype(np.float64)
    amax = np.asarray(act_absmax, np.float64)
    ok = (wmax > 0) & (amax > 0)
    s = np.ones_like(amax)
    s[ok] = amax[ok] ** alpha / wmax[ok] ** (1 - alpha)
    return np.clip(s, 1e-5, 1e5).astype(np.float32)


def _per_output(split: Split) -> Split:
    return Split(0, split.parts) if split.dim == 0 else REPLICATED


def _rows(x):
    """[.., in] -> [rows, in] float32: the quantized linears compute in fp32 whatever the dtype."""
    return x.reshape(-1, x.shape[-1]).astype(ms.float32)


def _unrows(y, b, x):
    """[rows, out] fp32 (+ bias) -> [.., out] in x's dtype."""
    if b is not None:
        y = y + b.astype(ms.float32)
    return y.astype(x.dtype).reshape(x.shape[:-1] + (y.shape[-1],))


class Form:
    """One stored form of a linear weight. `suffixes` name its bundle tensors (NAME + suffix), in order."""
    name = ""
    suffixes = (".qweight", ".scale")
    layout = ""
    # the onnxruntime kernels this form's matmuls run as: {"ops": {op: [weight operands it pre-packs]},
    # "every_graph": whether every graph must pre-pack (else decode graphs only)}; None: plain float ops
    onnxruntime = None
    calibrated = False   # quantizing needs activation statistics (`cogvlm2-lite calibrate`)

    def takes(self, spec: WeightSpec, tp: int) -> bool:
        """Whether this form can store `spec` on each of `tp` ranks (else the scheme falls back to int8)."""
        return len(spec.shape) == 2

    def stored(self, spec: WeightSpec) -> list[WeightSpec]:
        """The bundle tensors (and graph inputs) that stand for `spec`, in order."""
        raise NotImplementedError

    def quantize(self, w: np.ndarray, act_absmax=None, alpha: float = 0.5) -> list[np.ndarray]:
        """The float weight [out, in] -> its stored arrays, in `stored` order (numpy, row chunk by row chunk)."""
        raise NotImplementedError

    def dequantize(self, arrays) -> np.ndarray:
        """The stored arrays -> the float32 weight [out, in...] they stand for."""
        raise NotImplementedError

    def reference(self, x: np.ndarray, arrays) -> np.ndarray:
        """x [N, in] -> [N, out] in float64 as the graphs compute this form (no bias)."""
        x = np.asarray(x, np.float64)
        return x @ self.dequantize(arrays).reshape(len(arrays[1]), -1).astype(np.float64).T

    def matrix(self, qweight_shape) -> list:
        """[out, in] of the linear whose NAME.qweight has this shape."""
        return list(qweight_shape)

    def graph_weight(self, w, i: int, rank: int, dtype):
        """In the graph: the weight inputs w[i:i+len(suffixes)] -> what `layers.linear` takes: a float
        tensor, or (form, tensors...) for a form that also quantizes the activations."""
        raise NotImplementedError

    def onnx_nodes(self, node, qweight: str, graph) -> list | None:
        """The nodes replacing the exported MatMul/Gemm `node` whose weight is computed from `qweight`
        (export/onnx_quant.py's QuantGraph), or None to keep it as exported."""
        return None

    kernel = None   # our custom operator for this form (kernels/ops.cpp), if any

    def kernel_nodes(self, node, qweight: str, graph) -> list | None:
        """As `onnx_nodes`, with our own kernel (`kernel`): the nodes replacing `node`, and possibly the
        nodes around it whose outputs they produce (export/onnx_quant.py drops those), or None."""
        return None

    def arrays(self, stored: dict, name: str) -> list:
        """This form's arrays of weight `name` from {stored tensor name: array}."""
        return [stored[name + s] for s in self.suffixes]

    def manifest(self) -> dict:
        """This form's entry in the manifest's quant.forms (the weights' names are added by Quantizer.manifest)."""
        return {"layout": self.layout, **({"onnxruntime": self.onnxruntime} if self.onnxruntime else {})}


class Int8(Form):
    """int8 weight-only, per output channel (w8a16, and every scheme's fallback: convolutions)."""
    name = "int8"
    layout = "NAME.qweight int8 [out, in] + NAME.scale fp32 [out]: symmetric per output channel, dequantized in graph"

    def takes(self, spec, tp):
        return True

    def stored(self, spec):
        return [replace(spec, name=spec.name + ".qweight", dtype="int8"),
                WeightSpec(spec.name + ".scale", (spec.shape[0],), _per_output(spec.split), "float32")]

    def quantize(self, w, act_absmax=None, alpha=0.5):
        return list(by_rows(quantize_rows, w))

    def dequantize(self, arrays):
        q, scale = arrays
        return (q.reshape(q.shape[0], -1).astype(np.float32) * scale[:, None]).reshape(q.shape)

    def graph_weight(self, w, i, rank, dtype):
        scale = w[i + 1].reshape((-1,) + (1,) * (rank - 1))
        return ops.cast(w[i], dtype) * ops.cast(scale, dtype)


class Int4(Form):
    """4-bit weight-only, per group of GROUP inputs (w4a16)."""
    name = "int4"
    layout = (f"NAME.qweight uint8 [out, in/2] (4-bit codes q+8, low nibble first) + NAME.scale fp32 [out, in/{GROUP}]: "
              "symmetric per group, dequantized in graph (onnxruntime: MatMulNBits)")
    onnxruntime = {"ops": {"MatMulNBits": [1, 2]}, "every_graph": False}
    accuracy_level = 0   # MatMulNBits: fp32 activations

    def takes(self, spec, tp):
        return len(spec.shape) == 2 and (spec.shape[1] // (tp if spec.split.dim == 1 else 1)) % GROUP == 0

    def stored(self, spec):
        out, inp = spec.shape
        return [WeightSpec(spec.name + ".qweight", (out, inp // 2), spec.split, "uint8"),
                WeightSpec(spec.name + ".scale", (out, inp // GROUP), spec.split, "float32")]

    def quantize(self, w, act_absmax=None, alpha=0.5):
        return list(by_rows(quantize_groups4, w))

    def dequantize(self, arrays):
        packed, scale = arrays
        codes = unpack4(packed).astype(np.float32)
        g = codes.shape[1] // scale.shape[1]
        return (codes.reshape(codes.shape[0], -1, g) * scale[:, :, None]).reshape(codes.shape)

    def matrix(self, qweight_shape):
        return [qweight_shape[0], 2 * qweight_shape[1]]

    def graph_weight(self, w, i, rank, dtype):
        return ops.cast(dequantize_int4(w[i], w[i + 1]), dtype)

    def _operands(self, node, qweight, graph):
        """For Gemm(x, dequantize(W.qweight, W.scale)^T) in an fp32 graph: (nodes viewing the activations as
        [rows, K], those rows, W.scale, N, K); else None."""
        scale = qweight[:-len(".qweight")] + ".scale"
        if (not graph.fp32 or not graph.attrs(node).get("transB", 0)
                or graph.sources(node.input[1]) != {qweight, scale}):
            return None
        from onnx import helper
        x, y = self.activations(node.input[0], graph), node.output[0]
        n_out, half = graph.shape(qweight)
        nodes = []
        if x != node.input[0]:  # the exporter may have merged the reshapes of x: view it as [rows, K] again
            nodes.append(helper.make_node("Reshape", [x, graph.add_const(f"quant_rows_{2 * half}",
                                                                         np.array([-1, 2 * half], np.int64))],
                                          [f"{y}_rows"]))
            x = f"{y}_rows"
        return nodes, x, scale, n_out, 2 * half

    def onnx_nodes(self, node, qweight, graph):
        """MatMulNBits(x, W.qweight, W.scale) (com.microsoft, bits 4, block GROUP, zero point 8) for
        Gemm(x, dequantize(W.qweight, W.scale)^T): W.qweight is declared [N, K/GROUP, GROUP/2] and
        W.scale [N * K/GROUP], the same bytes the bundle stores. fp32 graphs only."""
        found = self._operands(node, qweight, graph)
        if found is None:
            return None
        from onnx import helper
        nodes, x, scale, n_out, k = found
        graph.declare(qweight, "uint8", [n_out, k // GROUP, GROUP // 2])
        graph.declare(scale, "float32", [n_out * k // GROUP])
        return nodes + [helper.make_node("MatMulNBits", [x, qweight, scale], [node.output[0]], domain="com.microsoft",
                                         K=k, N=n_out, bits=4, block_size=GROUP, accuracy_level=self.accuracy_level)]

    def activations(self, a: str, graph) -> str:
        """The float activations MatMulNBits takes: `a` itself (the weight-only form)."""
        return a


class Int4x8(Int4):
    """int4's tensors with int8 activations per group at run time (w4a8: llama.cpp's Q4_0 x Q8_0)."""
    name = "int4x8"
    layout = ("int4's tensors; activations quantized to int8 per group of a token at run time "
              "(onnxruntime: MatMulNBits, accuracy_level 4)")
    # MatMulNBits quantizes the activations (accuracy_level 4) only with weights it has pre-packed
    onnxruntime = {"ops": {"MatMulNBits": [1, 2]}, "every_graph": True}
    accuracy_level = 4

    def graph_weight(self, w, i, rank, dtype):
        return (self, w[i], w[i + 1])

    def graph_linear(self, x, w, b=None):
        """4-bit weights x int8 activations: x [.., in] -> [.., out] in x's dtype; w = (form, packed, scale).

        Per GROUP inputs of a token: xq = round(x * (127 / amax)) (onnxruntime's MLAS quantizer: 127 / amax
        once, then a product; rounding half up here, half to even there: a difference only on exact .5
        ties), multiplied back by amax / 127; then the float product with the dequantized weights, which
        equals MatMulNBits' per-block integer dot products scaled by both block scales.
        """
        x2 = _rows(x)
        blocks = x2.reshape(x2.shape[0], -1, GROUP)
        amax = ops.abs(blocks).max(-1, keepdims=True)
        inverse = ops.div(_QMAX, ops.maximum(amax, 1e-30))  # a Div, not `127 / t` (Reciprocal: no ONNX export)
        xq = ops.clamp(ops.floor(blocks * inverse + 0.5), -127.0, 127.0)
        xdq = (xq * (amax * (1 / 127))).reshape(x2.shape)
        return _unrows(_matmul_t(xdq, dequantize_int4(w[1], w[2])), b, x)

    def reference(self, x, arrays):
        x = np.asarray(x, np.float64)
        blocks = x.reshape(x.shape[0], -1, GROUP)
        amax = np.abs(blocks).max(-1, keepdims=True)
        xq = np.clip(np.floor(blocks * (127 / np.maximum(amax, 1e-30)) + 0.5), -127, 127)
        return (xq * amax / 127).reshape(x.shape) @ self.dequantize(arrays).astype(np.float64).T

    def activations(self, a, graph):
        """MatMulNBits quantizes x per block itself: take x from before graph_linear's block quantization
        (the input of the Reshape an Abs reads)."""
        return graph.before_block_quantization(a) or a

    kernel = "MatMulW4A8"

    def kernel_nodes(self, node, qweight, graph):
        """MatMulW4A8(x, W.qweight, W.scale) (kernels/): graph_linear's arithmetic, the block quantization of
        x included, on W's tensors as the bundle stores them ([N, K/2] codes, [N, K/GROUP] scales)."""
        found = self._operands(node, qweight, graph)
        if found is None:
            return None
        from onnx import helper
        nodes, x, scale, _, _ = found
        return nodes + [helper.make_node(self.kernel, [x, qweight, scale], [node.output[0]], domain=KERNELS_DOMAIN)]


class Int8x8(Form):
    """SmoothQuant int8 weights x int8 activations per token (w8a8)."""
    name = "int8x8"
    suffixes = (".qweight", ".scale", ".smooth")
    layout = ("NAME.qweight int8 [in, out] + NAME.scale fp32 [out] + NAME.smooth fp32 [in]: SmoothQuant, activations "
              "x*smooth quantized per token to int8 at run time, integer matmul (onnxruntime: MatMulInteger)")
    # MatMulIntegerToFloat: what export/onnx_fuse.py makes of a one-row decode graph's quantize + MatMulInteger
    onnxruntime = {"ops": {"MatMulInteger": [1], "MatMulIntegerToFloat": [1]}, "every_graph": False}
    # 7-bit weights (onnxruntime's `reduce_range`): without VNNI, MLAS's uint8 x int8 kernel adds pairs of
    # products in int16 (AVX2 vpmaddubsw), which saturates past 255 * 63 * 2. Measured on an AVX2-only AMD
    # EPYC: 8-bit weights put w8a8 decode logits 0.8 off the exact integer result; 7-bit ones match it.
    qmax = 63
    calibrated = True

    def stored(self, spec):
        out, inp = spec.shape
        split = spec.split if spec.split.dim is None else Split(1 - spec.split.dim, spec.split.parts)
        return [WeightSpec(spec.name + ".qweight", (inp, out), split, "int8"),
                WeightSpec(spec.name + ".scale", (out,), _per_output(spec.split), "float32"),
                WeightSpec(spec.name + ".smooth", (inp,), Split(0) if spec.split.dim == 1 else REPLICATED, "float32")]

    def quantize(self, w, act_absmax=None, alpha=0.5):
        s = smoothing(w, act_absmax, alpha)
        q, scale = by_rows(lambda rows: quantize_rows(np.asarray(rows, np.float32) * s[None, :], self.qmax), w)
        return [np.ascontiguousarray(q.T), scale, (1 / s).astype(np.float32)]

    def dequantize(self, arrays):
        q, scale, smooth = arrays
        return q.T.astype(np.float32) * scale[:, None] * smooth[None, :]

    def matrix(self, qweight_shape):
        return [qweight_shape[1], qweight_shape[0]]

    def reference(self, x, arrays):
        q, scale, smooth = (np.asarray(a, np.float64) for a in arrays)
        xs = np.asarray(x, np.float64) * smooth
        step = np.maximum(np.abs(xs).max(-1, keepdims=True), 1e-30) / 127
        xq = np.clip(np.floor(xs / step + 0.5), -127, 127)
        return (xq @ q) * step * scale

    def graph_weight(self, w, i, rank, dtype):
        return (self, w[i], w[i + 1], w[i + 2])

    def graph_linear(self, x, w, b=None):
        """SmoothQuant linear: x [.., in] -> [.., out] in x's dtype; w = (form, qweight_t, scale, smooth).

        Per token: step = max|x * smooth| / 127, xq = floor(x * smooth / step + 1/2) in [-127, 127]
        (rounding half up: MindSpore exports Round to ONNX with an extra input);
        y = (xq @ qweight_t) * step * scale (+ b). The integer product is computed in fp32 here, exact
        while the sums stay below 2^24; onnxruntime runs it as MatMulInteger (`onnx_nodes`).
        """
        xs = _rows(x) * w[3]
        step = ops.maximum(ops.abs(xs).max(-1, keepdims=True), 1e-30) * (1 / 127)
        xq = ops.clamp(ops.floor(xs / step + 0.5), -127.0, 127.0)
        return _unrows(_matmul(xq, ops.cast(w[1], ms.float32)) * step * w[2], b, x)

    def onnx_nodes(self, node, qweight, graph):
        """MatMulInteger(uint8(xq + 128), W.qweight, 128) for Gemm(xq, Cast(W.qweight)): xq holds integers
        in [-127, 127], so the result is the same integer sum, computed in int32."""
        cast = graph.producer.get(node.input[1])
        if cast is None or cast.op_type != "Cast" or cast.input[0] != qweight or graph.attrs(node).get("transB", 0):
            return None
        from onnx import TensorProto, helper
        y = node.output[0]
        n = f"{y}_int"
        shift = graph.add_const("quant_128f", np.array(128, np.float32))
        zero = graph.add_const("quant_zero_point_128", np.array(128, np.uint8))
        return [helper.make_node("Add", [node.input[0], shift], [n + "_shift"]),
                helper.make_node("Cast", [n + "_shift"], [n + "_u8"], to=TensorProto.UINT8),
                helper.make_node("MatMulInteger", [n + "_u8", qweight, zero], [n + "_i32"]),
                helper.make_node("Cast", [n + "_i32"], [y], to=TensorProto.FLOAT)]

    kernel = "MatMulW8A8"
    _QUANTIZE = ("Clip", "Floor", "Add", "Div", "Mul")   # graph_linear's per-token quantization, from xq back to x * smooth

    def kernel_nodes(self, node, qweight, graph):
        """MatMulW8A8(x, W.smooth, W.qweight, W.scale) (kernels/) for all of graph_linear: the SmoothQuant
        multiply, the per-token quantization (xq = Clip(Floor(Div(x * smooth, step) + 0.5))), the integer
        Gemm(xq, Cast(W.qweight)) and the rescale Mul(Mul(., step), W.scale), whose output it produces."""
        name = qweight[:-len(".qweight")]
        cast = graph.producer.get(node.input[1])
        if (not graph.fp32 or cast is None or cast.op_type != "Cast" or cast.input[0] != qweight
                or graph.attrs(node).get("transB", 0)):
            return None
        chain, t = [], node.input[0]
        for op in self._QUANTIZE:
            p = graph.producer.get(t)
            if p is None or p.op_type != op:
                return None
            chain.append(p)
            t = p.input[0]
        clip, _, half, div, smooth = chain
        step = div.input[1]
        rescale = graph.only_reader(node.output[0], "Mul")
        out = rescale and graph.only_reader(rescale.output[0], "Mul")
        if (out is None or smooth.input[1] != name + ".smooth" or graph.scalar(half.input[1]) != 0.5
                or [graph.scalar(i) for i in clip.input[1:]] != [-127, 127]
                or set(rescale.input) != {node.output[0], step} or set(out.input) != {rescale.output[0], name + ".scale"}):
            return None
        from onnx import helper
        return [helper.make_node(self.kernel, [smooth.input[0], name + ".smooth", qweight, name + ".scale"],
                                 [out.output[0]], domain=KERNELS_DOMAIN)]


FORMS = {f.name: f for f in (Int8(), Int4(), Int4x8(), Int8x8())}
SCHEMES = {"w8a16": FORMS["int8"], "w8a8": FORMS["int8x8"], "w4a16": FORMS["int4"], "w4a8": FORMS["int4x8"]}


def form_of(spec: WeightSpec, scheme: str, tp: int = 1) -> Form | None:
    """The stored form of one checkpoint tensor under `scheme` (None: kept as it is).

    Raises ValueError for an unknown scheme."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}: choose one of {', '.join(SCHEMES)}")
    if not is_linear_weight(spec.name, spec.shape):
        return None
    form = SCHEMES[scheme]
    return form if form.takes(spec, tp) else FORMS["int8"]


def weight_forms(quant_manifest: dict | None) -> dict:
    """{weight name: Form} of a bundle, from its manifest's `quant` entry (empty for a float bundle)."""
    forms = (quant_manifest or {}).get("forms", {})
    return {n: FORMS[f] for f, entry in forms.items() for n in entry["names"]}


def quantized_table(table, scheme: str, tp: int = 1):
    """-> (the table of graph inputs, plan): plan[i] = (form, first input index, rank) for the
    original table's i-th weight, form None for one kept as it is."""
    from .weights import WeightTable
    out, plan = WeightTable(), []
    for s in table.specs:
        form = form_of(s, scheme, tp)
        plan.append((form, len(out.specs), len(s.shape)))
        out.specs.extend(form.stored(s) if form else [s])
    return out, tuple(plan)


def dequantize(w, plan, dtype):
    """The graph's weight inputs `w` -> the tuple the blocks read (`Form.graph_weight` of each)."""
    out = ()
    for form, i, rank in plan:
        out = out + ((w[i],) if form is None else (form.graph_weight(w, i, rank, dtype),))
    return out


def unpack_int4(packed):
    """uint8 [out, in/2] -> float32 codes [out, in] in [-7, 7] (arithmetic, not bit operations: ONNX
    opset 11 and Lite have none)."""
    p = packed.astype(ms.float32)
    high = ops.floor(p * 0.0625)
    low = p - high * 16
    n, half = packed.shape
    return ops.concat((low.expand_dims(-1), high.expand_dims(-1)), -1).reshape(n, 2 * half) - 8


def dequantize_int4(packed, scale):
    """uint8 [out, in/2] + fp32 [out, in/GROUP] -> fp32 [out, in]."""
    codes = unpack_int4(packed)
    n, k = codes.shape
    groups = scale.shape[1]
    return (codes.reshape(n, groups, k // groups) * scale.reshape(n, groups, 1)).reshape(n, k)


class Quantizer:
    """One scheme applied tensor by tensor (export streams the checkpoint through `tensors`).

    stats: {weight name: activation absmax [in]} from `cogvlm2-lite calibrate` (SmoothQuant's input);
    alpha: SmoothQuant's migration strength. Raises ValueError for an unknown scheme."""

    def __init__(self, scheme: str, tp: int = 1, stats: dict | None = None, alpha: float = 0.5):
        if scheme not in SCHEMES:
            raise ValueError(f"unknown quantization scheme {scheme!r}: choose one of {', '.join(SCHEMES)}")
        self.scheme, self.tp, self.stats, self.alpha = scheme, tp, stats or {}, alpha

    def form(self, spec: WeightSpec) -> Form | None:
        """The stored form of `spec` under this scheme (None: kept as it is)."""
        return form_of(spec, self.scheme, self.tp)

    def tensors(self, spec: WeightSpec, w: np.ndarray) -> list[tuple[WeightSpec, np.ndarray]]:
        """One checkpoint tensor (full, unsplit) -> [(stored spec, array)] as the bundle stores it."""
        form = self.form(spec)
        if form is None:
            return [(spec, w)]
        return list(zip(form.stored(spec), form.quantize(w, self.stats.get(spec.name), self.alpha)))

    def quantize(self, weights: dict) -> dict:
        """{name: array} (one rank's full weights) -> the stored tensors {stored name: array}."""
        return {spec.name: a for name, w in weights.items()
                for spec, a in self.tensors(WeightSpec(name, w.shape, REPLICATED), w)}

    def manifest(self, specs) -> dict:
        """The manifest's `quant` entry for a model of these checkpoint specs: what each stored form
        means and which weights use it; a reader needs nothing else."""
        names = {}
        for spec in specs:
            form = self.form(spec)
            if form is not None:
                names.setdefault(form.name, []).append(spec.name)
        out = {"scheme": self.scheme, "forms": {f: {**FORMS[f].manifest(), "names": v} for f, v in names.items()}}
        if any(isinstance(FORMS[f], Int4) for f in names):
            out["group_size"] = GROUP
        if any(isinstance(FORMS[f], Int8x8) for f in names):
            out["smooth_alpha"] = self.alpha
        return out
