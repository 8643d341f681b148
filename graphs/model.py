"""The whole model's weights: the union of what the vision and language graphs take."""
from .config import CogVLM2Config
from .language import LanguageModel
from .vision import VisionModel
from .weights import WeightSpec


def weight_specs(cfg: CogVLM2Config) -> list[WeightSpec]:
    """Every tensor of a CogVLM2 checkpoint we use, with its full shape and tensor-parallel split."""
    return VisionModel(cfg).table.specs + LanguageModel(cfg).table.specs
