"""Issue 2: the MindSpore cells are CogVLM2 — checked against the independent numpy reference —
and the HF checkpoint is read (and refused) the way users need."""
import json
import shutil

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import eager
from numpy_reference import reference_logits, reference_pixel_embeds, reference_position_ids
from cogvlm2_lite.export.hf_checkpoint import Checkpoint, write_checkpoint
from cogvlm2_lite.graphs.config import CogVLM2Config, preset
from cogvlm2_lite.graphs.model import weight_specs
from cogvlm2_lite.runtime.errors import UserError
from cogvlm2_lite.runtime.tokenizer import position_ids


@pytest.fixture(scope="module")
def pixels(tiny_cfg):
    s = tiny_cfg.vision.image_size
    return np.random.default_rng(3).standard_normal((3, s, s)).astype(np.float32)


def image_prompt(cfg, text):
    n = cfg.num_image_tokens
    ids = np.array([cfg.bos_token_id] + [cfg.pad_token_id] * n + list(text), np.int64)
    types = np.array([0] + [1] * n + [0] * len(text))
    return ids, types


def test_experts_differ(tiny_weights):
    lang = tiny_weights["model.layers.0.self_attn.language_expert_query_key_value.weight"]
    vis = tiny_weights["model.layers.0.self_attn.vision_expert_query_key_value.weight"]
    assert np.abs(lang - vis).max() > 0.1


def test_vision_embeddings_match_numpy(tiny_cfg, tiny_weights, pixels):
    ours = eager.image_embeds(tiny_cfg, tiny_weights, pixels)[0]
    ref = reference_pixel_embeds(tiny_weights, tiny_cfg.to_hf(), pixels)
    assert ours.shape == (tiny_cfg.num_image_tokens, tiny_cfg.hidden_size)
    assert np.abs(ours - ref).max() <= 1e-4


def test_vision_attention_in_query_blocks_is_the_same(tiny_cfg, tiny_weights, pixels):
    """Issue 20: the 19B's vision attention runs in query blocks (its 9217 x 9217 scores would need
    5.4 GB at once); blocks that do not divide the 17 patch tokens give the same embeddings."""
    import mindspore as ms
    from cogvlm2_lite.graphs.entry import VisionGraph
    from cogvlm2_lite.graphs.vision import QUERY_BLOCK
    assert QUERY_BLOCK < preset("full").vision.num_positions   # the 19B's tower does attend in blocks
    g = VisionGraph(tiny_cfg, 1)
    for layer in g.model.layers:
        layer.attention.query_block = 5   # 17 tokens -> blocks of 5, 5, 5, 2
    blocked = g(ms.Tensor(pixels[None]), *eager.weight_args(g.table, tiny_weights)).asnumpy()[0]
    whole = eager.image_embeds(tiny_cfg, tiny_weights, pixels)[0]
    assert tiny_cfg.vision.num_positions == 17
    assert np.abs(blocked - whole).max() <= 1e-6
    assert np.abs(blocked - reference_pixel_embeds(tiny_weights, tiny_cfg.to_hf(), pixels)).max() <= 1e-4


def test_image_prompt_logits_match_numpy(tiny_cfg, tiny_weights, pixels):
    ids, types = image_prompt(tiny_cfg, [5, 300, 17, 42, 99, 512, 7])
    embeds = eager.image_embeds(tiny_cfg, tiny_weights, pixels)
    ours = eager.full_logits(tiny_cfg, tiny_weights, ids, position_ids(types), embeds)
    ref = reference_logits(tiny_weights, tiny_cfg.to_hf(), ids, types, pixels)
    diff = np.abs(ours - ref).max()
    print(f"image prompt: max |logit diff| = {diff:.2e} (logit scale {np.abs(ref).max():.1f})")
    assert diff <= 1e-4


def test_text_prompt_logits_match_numpy(tiny_cfg, tiny_weights):
    ids = np.array([tiny_cfg.bos_token_id, 11, 250, 3, 700, 64, 1000, 2], np.int64)
    types = np.zeros(len(ids), int)
    ours = eager.full_logits(tiny_cfg, tiny_weights, ids, np.arange(len(ids)))
    ref = reference_logits(tiny_weights, tiny_cfg.to_hf(), ids, types, None)
    diff = np.abs(ours - ref).max()
    print(f"text prompt: max |logit diff| = {diff:.2e}")
    assert diff <= 1e-4


def test_position_ids_share_one_id_for_patches(tiny_cfg):
    ids, types = image_prompt(tiny_cfg, [5, 6, 7])
    n = tiny_cfg.num_image_tokens
    expected = [0, 1] + [2] * (n - 2) + [3, 4, 5, 6]
    assert position_ids(types) == expected
    assert list(reference_position_ids(types)) == expected
    # the release's size: bos 0, boi 1, 2304 patches 2, eoi 3, first text 4
    full = position_ids([0] + [1] * 2306 + [0, 0])
    assert full[:3] == [0, 1, 2] and set(full[2:2306]) == {2} and full[2306:] == [3, 4, 5]


def test_eoi_and_text_use_the_language_expert(tiny_cfg, tiny_weights, pixels):
    """NaN in the last layer's vision-expert MLP poisons exactly the vision-expert rows (boi +
    patches): eoi and text rows stay finite and unchanged. Proves the routing of the cells."""
    ids, types = image_prompt(tiny_cfg, [5, 6, 7])
    embeds = eager.image_embeds(tiny_cfg, tiny_weights, pixels)
    clean = eager.full_logits(tiny_cfg, tiny_weights, ids, position_ids(types), embeds)
    last = tiny_cfg.num_hidden_layers - 1
    poisoned = dict(tiny_weights)
    name = f"model.layers.{last}.mlp.vision_mlp.down_proj.weight"
    poisoned[name] = np.full_like(tiny_weights[name], np.nan)
    out = eager.full_logits(tiny_cfg, poisoned, ids, position_ids(types), embeds)
    n = tiny_cfg.num_image_tokens
    nan_rows = np.isnan(out).any(-1)
    assert nan_rows[1:n].all()                 # boi + patches: vision expert
    assert not nan_rows[0] and not nan_rows[n:].any()  # bos, eoi, text: language expert
    np.testing.assert_array_equal(out[n:], clean[n:])


def test_config_reads_release_json():
    """The released config.json (no num_multi_query_heads key) -> 8 kv heads, 19.5B parameters."""
    released = CogVLM2Config().to_hf()
    del released["num_multi_query_heads"]
    released.update({"architectures": ["CogVLMForCausalLM"], "torch_dtype": "bfloat16", "use_cache": True})
    cfg = CogVLM2Config.from_hf(released)
    assert cfg.num_multi_query_heads == 8 and cfg.num_image_tokens == 2306 and cfg.head_dim == 128
    assert cfg.extra["torch_dtype"] == "bfloat16"
    assert CogVLM2Config.from_hf(cfg.to_hf()) == cfg
    params = sum(int(np.prod(s.shape)) for s in weight_specs(preset("full")))
    assert 19.4e9 < params < 19.6e9


def test_sharded_and_single_file_checkpoints_read_the_same(tmp_path, tiny_cfg, tiny_hf, tiny_weights):
    single = write_checkpoint(tmp_path / "single", tiny_cfg, seed=1)
    ckpt = Checkpoint(single)
    ckpt.validate()
    for name in ("lm_head.weight", "model.vision.boi", "model.layers.1.mlp.vision_mlp.up_proj.weight"):
        np.testing.assert_array_equal(ckpt.read(name), tiny_weights[name])
    # partial reads fetch only a slice
    np.testing.assert_array_equal(ckpt.read("lm_head.weight", (slice(3, 7),)), tiny_weights["lm_head.weight"][3:7])


def test_bf16_checkpoint_is_read(tmp_path, tiny_cfg, tiny_weights):
    folder = write_checkpoint(tmp_path / "bf16", tiny_cfg, seed=1, dtype="bfloat16")
    ckpt = Checkpoint(folder)
    ckpt.validate()
    a = ckpt.read("model.norm.weight")
    assert a.dtype.name == "bfloat16"
    np.testing.assert_array_equal(a.astype(np.float32),
                                  tiny_weights["model.norm.weight"].astype(ml_dtypes.bfloat16).astype(np.float32))


def _edit_checkpoint(src, dst, edit):
    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    tensors = load_file(str(f))
    edit(tensors)
    save_file(tensors, str(f))
    return dst


@pytest.fixture(scope="module")
def single_file(tmp_path_factory, tiny_cfg):
    return write_checkpoint(tmp_path_factory.mktemp("single") / "ckpt", tiny_cfg, seed=1)


def test_missing_tensor_is_named(tmp_path, single_file):
    bad = _edit_checkpoint(single_file, tmp_path / "bad",
                           lambda t: t.pop("model.layers.1.self_attn.vision_expert_query_key_value.bias"))
    with pytest.raises(UserError, match=r"missing model\.layers\.1\.self_attn\.vision_expert_query_key_value\.bias"):
        Checkpoint(bad).validate()


def test_misshaped_tensor_is_named(tmp_path, single_file):
    def shrink(t):
        t["model.vision.conv.weight"] = t["model.vision.conv.weight"][:, :, :1]
    bad = _edit_checkpoint(single_file, tmp_path / "bad", shrink)
    with pytest.raises(UserError, match=r"model\.vision\.conv\.weight has shape \[48, 48, 1, 2\], expected \[48, 48, 2, 2\]"):
        Checkpoint(bad).validate()


def test_unexpected_tensor_is_named_but_inv_freq_is_tolerated(tmp_path, single_file):
    assert any(k.endswith("rotary_emb.inv_freq") for k in Checkpoint(single_file).weight_map)
    bad = _edit_checkpoint(single_file, tmp_path / "bad", lambda t: t.update(extra_head=np.zeros(3, np.float32)))
    with pytest.raises(UserError, match="unexpected extra_head"):
        Checkpoint(bad).validate()


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(UserError, match="config.json does not exist"):
        Checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(CogVLM2Config().to_hf()))
    with pytest.raises(UserError, match="neither model.safetensors nor model.safetensors.index.json"):
        Checkpoint(tmp_path)
