"""Issue 20: what bounds memory at run time, checked on a tiny config: weights mapped from the bundle
(not read into the heap), onnxruntime's packed copies one per decode bucket (not per graph) and
refused when they cannot fit, the KV cache sized from the memory that is free. Issue 18: fp32 decode
weights packed only when the copies fit."""
import collections
import os
import types

import numpy as np
import pytest
from safetensors import safe_open

from conftest import DEMO_TOKENIZER
from cogvlm2_lite.runtime.bundle import Bundle
from cogvlm2_lite.runtime.errors import UserError
from cogvlm2_lite.runtime.weights import load_rank_weights

FREE = collections.namedtuple("svmem", "available total")


@pytest.fixture(scope="module")
def w4_bundle(tmp_path_factory, tiny_cfg):
    """w4a16 ONNX, two prefill chunks and two decode buckets: 1 + 2 + 2 x 3 = 9 graphs, 2 of them decode."""
    from cogvlm2_lite.export.bundle import export_bundle
    return Bundle(export_bundle(tmp_path_factory.mktemp("mem") / "w4", random_init=tiny_cfg, tokenizer=DEMO_TOKENIZER,
                                buckets={"chunk": [8, 16], "decode": [32, 64]}, progress=False, formats=("onnx",),
                                quant="w4a16"))


def test_weights_are_mapped_from_the_bundle_and_never_written_back(tiny_bundle):
    b = Bundle(tiny_bundle)
    mapped = load_rank_weights(b, 0)
    read = {}
    for path in b.weight_files(0):
        with safe_open(str(path), "np") as f:
            read.update({n: f.get_tensor(n) for n in f.keys()})
    assert mapped.keys() == read.keys()
    for n, a in mapped.items():
        assert a.dtype == read[n].dtype and np.array_equal(a, read[n]), n
        assert not a.flags.owndata and a.flags.writeable, n   # a view of the mapping, writable for the backends
    name = next(iter(mapped))
    mapped[name].reshape(-1)[0] += 1   # copy-on-write: the file keeps its bytes
    assert np.array_equal(load_rank_weights(b, 0)[name], read[name])


def test_a_cut_weight_file_is_one_clear_error(tiny_bundle, tmp_path):
    """The reader's own check (Bundle also compares file sizes with the manifest, before this)."""
    from cogvlm2_lite.runtime.weights import map_safetensors
    f = tmp_path / "cut.safetensors"
    f.write_bytes(Bundle(tiny_bundle).weight_files(0)[0].read_bytes()[:-100])
    with pytest.raises(UserError, match="cut.safetensors cannot be read .*outside the file.* export it again"):
        map_safetensors(f)
    f.write_bytes(b"\x05\x00")
    with pytest.raises(UserError, match="cannot be read"):
        map_safetensors(f)


def test_packed_copies_are_one_per_decode_bucket_not_per_graph(w4_bundle):
    """onnxruntime packs the 4-bit weights in each decode graph only: 2 copies for 9 graphs, each the
    bytes of the codes and scales of the language model's quantized matmuls (vision and prefill read
    the weights unpacked)."""
    from cogvlm2_lite.runtime.onnx_backend import OnnxRuntimeBackend
    assert len(w4_bundle.graph_names) == 9
    be = OnnxRuntimeBackend(w4_bundle)
    assert sorted(be.packed_bytes) == ["decode_32", "decode_64"]
    forms = w4_bundle.manifest["quant"]["forms"]
    four_bit = [n for n in forms["int4"]["names"] if not n.startswith("model.vision.")]
    assert forms["int4"]["onnxruntime"] == {"ops": {"MatMulNBits": [1, 2]}, "every_graph": False}   # codes, scales
    weights = load_rank_weights(w4_bundle, 0)
    # a decode token is text: the vision expert's weights are not inputs of a decode graph
    expected = sum(weights[n + suffix].nbytes for n in four_bit if "vision_" not in n for suffix in (".qweight", ".scale"))
    assert be.packed_bytes == {"decode_32": expected, "decode_64": expected}


def test_a_load_that_packs_shows_each_graph_it_packs_as_a_phase(w4_bundle, monkeypatch, capsys):
    """Off a terminal: one line per graph that packs, with the bytes it packs; a load packing less than
    PACK_SHOWN (this tiny one: kilobytes) says nothing."""
    import re

    from cogvlm2_lite.runtime import onnx_backend
    from cogvlm2_lite.runtime.progress import size
    onnx_backend.OnnxRuntimeBackend(w4_bundle)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(onnx_backend, "PACK_SHOWN", 0)
    be = onnx_backend.OnnxRuntimeBackend(w4_bundle)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and sorted(be.packed_bytes) == ["decode_32", "decode_64"]
    for line, name in zip(lines, ["decode_32", "decode_64"]):
        assert re.fullmatch(rf"load {name}: pack {size(be.packed_bytes[name])} of weights \[\d\d:\d\d\]", line), line


def test_a_packed_copy_that_cannot_fit_is_refused_before_packing(w4_bundle, monkeypatch):
    from cogvlm2_lite.runtime import onnx_backend
    monkeypatch.setattr(onnx_backend.psutil, "virtual_memory", lambda: FREE(available=64 << 10, total=1 << 30))
    with pytest.raises(UserError, match=r"packed copy .* for each of the 2 graphs .*decode_32, decode_64.*"
                                        r"--buckets 'decode=T'"):
        onnx_backend.OnnxRuntimeBackend(w4_bundle)


def test_the_kv_cache_is_sized_from_the_free_memory(w4_bundle, monkeypatch):
    """The slot bytes are the K and V of every layer: 2 x 2 layers x 2 KV heads x 8 dims x 4 bytes."""
    from cogvlm2_lite.runtime import runner
    from cogvlm2_lite.runtime.engine import Engine, Request
    from cogvlm2_lite.runtime.kv_cache import CACHE_SHARE, KVCache
    slot = KVCache.slot_bytes(2, 1, 2, 8, "float32")
    assert slot == 2 * 2 * 2 * 8 * 4
    free = int(48 * slot / CACHE_SHARE)   # room for 48 slots: bucket 32 fits, 64 does not
    def free_memory(available):   # what the runner sees after loading (the backend sees the machine's)
        monkeypatch.setattr(runner, "psutil", types.SimpleNamespace(
            virtual_memory=lambda: FREE(available=available, total=1 << 30)))
    free_memory(free)
    e = Engine(w4_bundle, backend="onnxruntime")
    assert e.cache.buckets == [32] and e.cache.nbytes == 32 * slot
    with pytest.raises(UserError, match="more than this bundle's cache holds \\(32"):
        e.prompt(Request("word " * 40))
    free_memory(16 * slot)
    with pytest.raises(UserError, match="smallest decode bucket \\(32 slots"):
        Engine(w4_bundle, backend="onnxruntime")


@pytest.fixture(scope="module")
def w4a8_bundle(tmp_path_factory, tiny_cfg):
    from cogvlm2_lite.export.bundle import export_bundle
    return Bundle(export_bundle(tmp_path_factory.mktemp("mem") / "w4a8", random_init=tiny_cfg, tokenizer=DEMO_TOKENIZER,
                                buckets={"chunk": [8, 16], "decode": [32, 64]}, progress=False, formats=("onnx",),
                                quant="w4a8"))


def test_w4a8_packs_every_graph_when_the_copies_fit_else_decode_only(w4a8_bundle, monkeypatch, caplog):
    """w4a8's kernel quantizes activations only on packed weights, so it packs in every graph that takes
    them; when those copies would not fit, prefill and vision run unpacked (fp32 activations), saying so,
    and decode, the same graph either way, gives the same logits. With our kernels (kernels/) nothing packs."""
    from cogvlm2_lite.runtime import kernels, onnx_backend
    if kernels.library():
        ours = onnx_backend.OnnxRuntimeBackend(w4a8_bundle)
        assert ours.kernels and ours.packed_bytes == {}
    monkeypatch.setenv(kernels.LIBRARY_ENV, os.devnull)   # onnxruntime's own kernels from here on
    every = onnx_backend.OnnxRuntimeBackend(w4a8_bundle)
    assert every.kernels is None
    decode = ["decode_32", "decode_64"]
    assert set(decode) < set(every.packed_bytes) and len(every.packed_bytes) > 4   # prefill graphs pack too
    need = sum(every.packed_bytes.values())
    free = (need + max(every.packed_bytes.values())) / 2 / onnx_backend.PACK_SHARE   # room for one copy, not all
    monkeypatch.setattr(onnx_backend.psutil, "virtual_memory", lambda: FREE(available=int(free), total=1 << 30))
    with caplog.at_level("WARNING"):
        tight = onnx_backend.OnnxRuntimeBackend(w4a8_bundle)
    assert sorted(tight.packed_bytes) == decode
    assert "packs them for decode only" in caplog.text and "fp32 activations" in caplog.text
    explicit = onnx_backend.OnnxRuntimeBackend(w4a8_bundle, pack_prefill=False)
    assert sorted(explicit.packed_bytes) == decode
    step = [np.array([[5]], np.int32), np.array([13], np.int32), np.array([13], np.int32),
            *[np.random.default_rng(i).standard_normal((1, 2, 32, 8)).astype(np.float32) for i in range(4)]]
    np.testing.assert_array_equal(tight.run("decode_32", [a.copy() for a in step])[0],
                                  every.run("decode_32", [a.copy() for a in step])[0])


def test_fp32_decode_weights_are_packed_only_when_the_copies_fit(onnx_bundle, monkeypatch, caplog):
    """Each decode graph packs the fp32 matmul weights a text token reads (the language expert's linears and
    lm_head; not the embedding, norms or biases); prefill and vision pack nothing. When those copies would
    not fit, the weights stay unpacked, said once, and decode gives the same logits (to float rounding)."""
    from cogvlm2_lite.runtime import onnx_backend
    b = Bundle(onnx_bundle)
    decode = sorted(n for n in b.graph_names if n.startswith("decode_"))
    packed = onnx_backend.OnnxRuntimeBackend(b)
    assert sorted(packed.packed_bytes) == decode and packed.floats_packed
    weights = load_rank_weights(b, 0)
    read = [n for n, a in weights.items() if a.ndim == 2 and not n.startswith("model.vision.")
            and "vision_" not in n and "embed_tokens" not in n]
    assert "lm_head.weight" in read and len(read) == 5 * 2 + 1   # tiny: 2 layers x (qkv, dense, gate, up, down)
    assert set(packed.packed_bytes.values()) == {sum(weights[n].nbytes for n in read)}
    need = sum(packed.packed_bytes.values())
    monkeypatch.setattr(onnx_backend.psutil, "virtual_memory", lambda: FREE(available=need, total=1 << 30))
    with caplog.at_level("WARNING"):
        unpacked = onnx_backend.OnnxRuntimeBackend(b)
    assert unpacked.packed_bytes == {} and not unpacked.floats_packed
    assert "fp32 matmul weights stay unpacked" in caplog.text
    step = [np.array([[5]], np.int32), np.array([13], np.int32), np.array([13], np.int32),
            *[np.random.default_rng(i).standard_normal((1, 2, 32, 8)).astype(np.float32) for i in range(4)]]
    got, ref = (be.run("decode_32", [a.copy() for a in step])[0] for be in (packed, unpacked))
    assert np.abs(got - ref).max() <= 1e-5


def test_a_materialized_kv_cache_is_memory_not_the_zero_page():
    """KVCache's buffers come from np.zeros: their pages are mapped on first write, and until then a read of them
    is of one shared zero page. The bench's steps at depth set `lengths` without a prefill; materialize() must
    map every page of both buffers, or those steps read no memory for their cache. Counted in the buffers' own
    mappings (psutil's memory_maps), not the process's RSS, which other memory and reclaim move meanwhile."""
    import psutil
    from cogvlm2_lite.runtime.kv_cache import KVCache

    # 2 x 64 MiB: above glibc's largest mmap threshold (32 MiB), so fresh mappings, not heap reused from earlier tests
    cache = KVCache(layers=4, batch=1, kv_heads=2, head_dim=64, buckets=[32768], dtype="float32")
    buffers = [(b.ctypes.data, b.ctypes.data + b.nbytes) for b in (cache._k, cache._v)]

    def resident() -> int:
        total = 0
        for m in psutil.Process().memory_maps(grouped=False):
            lo, hi = (int(x, 16) for x in m.addr.split("-"))
            if any(lo < end and start < hi for start, end in buffers):
                total += m.rss
        return total

    before = resident()
    assert float(cache.views()[0].sum()) == 0.0   # reading maps nothing
    read = resident()
    cache.materialize()
    after = resident()
    assert read - before < cache.nbytes // 8
    assert after - read >= cache.nbytes // 2   # (86-100% measured: the mappings share pages with other memory)
    assert (cache._k == np.float32(0.01)).all() and (cache._v == np.float32(0.01)).all()
