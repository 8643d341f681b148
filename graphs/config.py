"""The model's shape, read from (and written back to) the HF `config.json` of a CogVLM2 checkpoint."""
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

ROPE_THETA = 500000.0  # a fact of the release (hard-coded in its modeling code), not a config key


ACCEPTED = {int: int, float: (int, float), str: str, bool: bool}   # a field's type -> the JSON values it takes


class ConfigError(ValueError):
    """A config.json that does not describe a CogVLM2 model we can build."""


@dataclass(frozen=True)
class VisionConfig:
    """EVA2-CLIP-E tower; key names as in the HF `vision_config` sub-dict."""
    hidden_size: int = 1792
    intermediate_size: int = 15360
    num_hidden_layers: int = 63
    num_heads: int = 16
    patch_size: int = 14
    image_size: int = 1344
    in_channels: int = 3
    layer_norm_eps: float = 1e-6
    num_positions: int = 9217
    hidden_act: str = "gelu"
    dropout_prob: float = 0.0

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class CogVLM2Config:
    """The LM part and the whole model; defaults are cogvlm2-llama3-chat-19B."""
    vocab_size: int = 128256
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_multi_query_heads: int = 8  # absent from the released config.json: the config class default
    hidden_act: str = "silu"
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    template_version: str = "chat"
    bos_token_id: int = 128000
    eos_token_id: int | list = 128001
    pad_token_id: int = 128002
    tie_word_embeddings: bool = False
    vision: VisionConfig = field(default_factory=VisionConfig)
    extra: dict = field(default_factory=dict)  # keys we carry but do not use (architectures, auto_map, ...)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_image_tokens(self) -> int:
        """boi + the 2x2-conv-reduced patch grid + eoi (2306 for the release)."""
        return (self.vision.grid // 2) ** 2 + 2

    def stop_ids(self) -> list[int]:
        eos = self.eos_token_id if isinstance(self.eos_token_id, list) else [self.eos_token_id]
        return list(dict.fromkeys(eos))

    # --- HF config.json ---------------------------------------------------------------
    @classmethod
    def from_hf(cls, d: dict) -> "CogVLM2Config":
        d = dict(d)
        vision_keys = {f.name for f in dataclasses.fields(VisionConfig)}
        vis = {k: v for k, v in d.pop("vision_config", {}).items() if k in vision_keys}
        own = {f.name for f in dataclasses.fields(cls)} - {"vision", "extra"}
        kwargs = {k: d.pop(k) for k in list(d) if k in own}
        cfg = cls(**kwargs, vision=VisionConfig(**vis), extra=d)
        cfg.validate()
        return cfg

    @classmethod
    def from_file(cls, f) -> "CogVLM2Config":
        """An HF config.json file -> its config; ConfigError, naming the file, for one that is not valid."""
        try:
            return cls.from_hf(json.loads(Path(f).read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError, AttributeError) as e:
            raise ConfigError(f"{f} is not a valid CogVLM2 config.json ({e}).") from None

    @classmethod
    def from_dir(cls, path) -> "CogVLM2Config":
        f = Path(path) / "config.json"
        if not f.is_file():
            raise ConfigError(f"{f} does not exist: point at a CogVLM2 HF checkpoint folder.")
        return cls.from_file(f)

    def to_hf(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("vision", "extra")}
        return {**self.extra, **d, "vision_config": dataclasses.asdict(self.vision)}

    def validate(self):
        """Raises ConfigError, in one sentence, for a value of the wrong kind or a shape CogVLM2 cannot have."""
        v = self.vision
        for obj, where in ((self, ""), (v, "vision_config.")):
            for f in dataclasses.fields(obj):
                value = getattr(obj, f.name)
                ok = ACCEPTED.get(f.type)
                if ok and (not isinstance(value, ok) or isinstance(value, bool) and f.type is not bool):
                    raise ConfigError(f"config.json: {where}{f.name} must be {f.type.__name__}, not {value!r}.")
        checks = [
            (self.hidden_size % self.num_attention_heads == 0, "hidden_size must be a multiple of num_attention_heads"),
            (self.num_attention_heads % self.num_multi_query_heads == 0,
             "num_attention_heads must be a multiple of num_multi_query_heads"),
            (self.head_dim % 2 == 0, "head_dim must be even for RoPE"),
            (v.hidden_size % v.num_heads == 0, "vision hidden_size must be a multiple of num_heads"),
            (v.image_size % v.patch_size == 0, "vision image_size must be a multiple of patch_size"),
            (v.grid % 2 == 0, "the vision patch grid must be even (2x2 conv adapter)"),
            (v.num_positions == v.grid ** 2 + 1, "vision num_positions must be (image_size/patch_size)^2 + 1"),
            (v.hidden_act == "gelu" and self.hidden_act == "silu", "only gelu (vision) and silu (LM) are CogVLM2"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"config.json: {msg}.")

    def replace(self, **kw) -> "CogVLM2Config":
        return dataclasses.replace(self, **kw)


def _small(vocab, hidden, layers, heads, kv, inter, v_hidden, v_layers, v_heads, v_inter, image, max_pos) -> CogVLM2Config:
    """Special ids laid out as for a 768-rank tokenizer (the embedded demo one): bos 768, eos 769 and
    eot 777, pad 770; ids above 1023 (bench vocabulary) have no token and decode to nothing."""
    grid = image // 14
    vision = VisionConfig(hidden_size=v_hidden, intermediate_size=v_inter, num_hidden_layers=v_layers,
                          num_heads=v_heads, image_size=image, num_positions=grid * grid + 1)
    return CogVLM2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_multi_query_heads=kv, bos_token_id=768,
                         eos_token_id=[769, 777], pad_token_id=770, max_position_embeddings=max_pos, vision=vision)


PRESETS = {
    "full": CogVLM2Config,  # cogvlm2-llama3-chat-19B
    # tests: every dimension distinct where the architecture allows, 56x56 images -> 6 image embeddings
    "tiny": lambda: _small(vocab=1024, hidden=64, layers=2, heads=8, kv=2, inter=96,
                           v_hidden=48, v_layers=2, v_heads=4, v_inter=80, image=56, max_pos=256),
    # benchmarks: ~0.4B parameters in the CogVLM2 shape, decode really memory-bound
    "bench": lambda: _small(vocab=32000, hidden=1024, layers=12, heads=16, kv=4, inter=2816,
                            v_hidden=256, v_layers=4, v_heads=8, v_inter=1024, image=224, max_pos=2048),
}


def preset(name: str) -> CogVLM2Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}.")
    return PRESETS[name]()
